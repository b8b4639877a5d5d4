//! Self-describing checkpoints: safetensors files whose metadata says what they hold.
//!
//! A checkpoint carries the network's weights (f32) and, in its metadata, everything needed to
//! rebuild and use the network without knowing it in advance: the format version, the full
//! architecture spec and posterior choices, input shape, class names, data normalisation, the
//! training configuration and seed, the epoch and step, and the last evaluation metrics.
//! Training state for resuming (optimiser tensors, random-generator state, data order) travels
//! in the same file under the `optimizer.` prefix and the `resume` metadata key.
//!
//! Writes are atomic: the file is written under a temporary name in the same directory, synced,
//! then renamed over the target, so a crash or Ctrl-C never leaves a broken checkpoint and never
//! destroys the previous one.
//!
//! Wherever a checkpoint path is taken, `pretrained:NAME` names a checkpoint shipped inside
//! whvi ([`pretrained`]); such files carry a [`ModelCard`] in their metadata, made by
//! [`publish`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use crate::output::write_atomic;

pub mod card;
pub mod export;
pub mod hub;
pub mod pretrained;

pub use card::{CardInput, ModelCard};

use crate::params::Params;
use crate::zoo::{BuildOptions, ModelSpec, Network};
use crate::{Error, Result};

/// The value of the `format` metadata key.
pub const FORMAT: &str = "whvi-checkpoint";
/// The checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of the tensors that hold optimiser state rather than weights.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";
/// The metadata key of the tensors' checksum: CRC-32 (IEEE) over every tensor's name, dtype,
/// shape and bytes, in name order, as 8 hex digits.
pub const CHECKSUM_KEY: &str = "tensors_crc32";

/// Whether reading a checkpoint verifies its tensors' checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksum {
    /// Refuse a file whose tensor data do not match the checksum written with them (files
    /// without one, from before it was recorded, are read as they are).
    #[default]
    Verify,
    /// Read the tensors whatever their checksum says (to rescue a damaged file).
    Skip,
}

/// Everything a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The architecture.
    pub spec: ModelSpec,
    /// Posterior per layer, width, classes, input shape.
    pub options: BuildOptions,
    /// Class names, in label order.
    pub class_names: Vec<String>,
    /// Input normalisation the network was trained with.
    pub normalization: Option<crate::data::Normalization>,
    /// The training configuration (optimiser, schedule, augmentation, seed...), as recorded by
    /// the trainer.
    pub training: Option<serde_json::Value>,
    /// The seed of the run.
    pub seed: Option<u64>,
    /// Completed epochs.
    pub epoch: usize,
    /// Completed optimisation steps.
    pub step: u64,
    /// The last evaluation metrics.
    pub metrics: Option<serde_json::Value>,
    /// State needed to resume training bit for bit (random generators, data order...).
    pub resume: Option<serde_json::Value>,
    /// The model card of a published checkpoint.
    pub card: Option<ModelCard>,
}

impl CheckpointMeta {
    /// Metadata for a freshly built network, with nothing trained yet.
    pub fn new(spec: ModelSpec, options: BuildOptions, class_names: Vec<String>) -> Self {
        CheckpointMeta {
            spec,
            options,
            class_names,
            normalization: None,
            training: None,
            seed: None,
            epoch: 0,
            step: 0,
            metrics: None,
            resume: None,
            card: None,
        }
    }

    fn to_strings(&self) -> Result<HashMap<String, String>> {
        let json = |v: &dyn erased::Json| v.to_json();
        let mut m = HashMap::new();
        m.insert("format".into(), FORMAT.into());
        m.insert("format_version".into(), FORMAT_VERSION.to_string());
        m.insert("whvi_version".into(), env!("CARGO_PKG_VERSION").into());
        m.insert("model".into(), self.spec.name.clone());
        m.insert("spec".into(), json(&self.spec)?);
        m.insert("options".into(), json(&self.options)?);
        m.insert("class_names".into(), json(&self.class_names)?);
        m.insert("normalization".into(), json(&self.normalization)?);
        m.insert("training".into(), json(&self.training)?);
        m.insert("seed".into(), json(&self.seed)?);
        m.insert("epoch".into(), self.epoch.to_string());
        m.insert("step".into(), self.step.to_string());
        m.insert("metrics".into(), json(&self.metrics)?);
        m.insert("resume".into(), json(&self.resume)?);
        if let Some(card) = &self.card {
            m.insert("card".into(), json(card)?);
        }
        Ok(m)
    }

    fn from_strings(path: &Path, m: &HashMap<String, String>) -> Result<Self> {
        let get = |key: &str| -> Result<&String> {
            m.get(key)
                .ok_or_else(|| Error::checkpoint(path, format!("metadata key '{key}' is missing")))
        };
        if get("format")? != FORMAT {
            return Err(Error::checkpoint(
                path,
                format!("metadata says format '{}', not '{FORMAT}'", get("format")?),
            ));
        }
        let version = get("format_version")?;
        if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
            return Err(Error::checkpoint(
                path,
                format!(
                    "format version {version} is not supported by this build of whvi \
                     (which reads version {FORMAT_VERSION}); use the whvi version that wrote it \
                     ({})",
                    m.get("whvi_version").map_or("unknown", |v| v.as_str())
                ),
            ));
        }
        fn parse<T: DeserializeOwned>(path: &Path, key: &str, text: &str) -> Result<T> {
            // serde_json's message ends with the line and column where they mean something.
            serde_json::from_str(text).map_err(|e| {
                Error::checkpoint(path, format!("metadata '{key}' does not parse: {e}"))
            })
        }
        let number = |key: &str| -> Result<u64> {
            get(key)?
                .parse()
                .map_err(|_| Error::checkpoint(path, format!("metadata '{key}' is not a number")))
        };
        Ok(CheckpointMeta {
            spec: parse(path, "spec", get("spec")?)?,
            options: parse(path, "options", get("options")?)?,
            class_names: parse(path, "class_names", get("class_names")?)?,
            normalization: parse(path, "normalization", get("normalization")?)?,
            training: parse(path, "training", get("training")?)?,
            seed: parse(path, "seed", get("seed")?)?,
            epoch: number("epoch")? as usize,
            step: number("step")?,
            metrics: parse(path, "metrics", get("metrics")?)?,
            resume: parse(path, "resume", get("resume")?)?,
            // Only published checkpoints have a card.
            card: m
                .get("card")
                .map(|text| parse(path, "card", text))
                .transpose()?,
        })
    }
}

mod erased {
    /// Serialises any metadata value to JSON for a safetensors metadata string.
    pub trait Json {
        fn to_json(&self) -> crate::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> crate::Result<String> {
            serde_json::to_string(self)
                .map_err(|e| crate::Error::invalid(format!("cannot serialise metadata: {e}")))
        }
    }
}

/// A checkpoint read from disk: metadata, weights and optimiser state.
pub struct Checkpoint {
    /// What the file says about itself.
    pub meta: CheckpointMeta,
    /// The network's tensors by name.
    pub weights: BTreeMap<String, Tensor>,
    /// Optimiser state tensors by name (without the `optimizer.` prefix).
    pub optimizer: BTreeMap<String, Tensor>,
}

/// A network loaded from a checkpoint, ready to predict (or to continue training).
pub struct LoadedModel {
    /// The network.
    pub network: Network,
    /// Its parameters as trainable variables.
    pub params: Params,
    /// The checkpoint's metadata.
    pub meta: CheckpointMeta,
    /// Optimiser state saved with it (empty for a checkpoint saved for inference only).
    pub optimizer: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Writes `params` (as f32), `optimizer` state and `meta` to `path`, atomically.
    pub fn save(
        path: impl AsRef<Path>,
        meta: &CheckpointMeta,
        params: &Params,
        optimizer: &[(String, Tensor)],
    ) -> Result<()> {
        let path = path.as_ref();
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, var) in params.named_vars() {
            let t = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            tensors.push((name, t));
        }
        for (name, t) in optimizer {
            tensors.push((
                format!("{OPTIMIZER_PREFIX}{name}"),
                t.to_device(&Device::Cpu)?,
            ));
        }
        write_tensors(path, meta, &tensors)
    }

    /// Loads the shipped checkpoint `name` (see [`pretrained`]) onto `device` in f32: the same
    /// as [`Checkpoint::load`] of `pretrained:NAME`.
    pub fn pretrained(name: &str, device: &Device) -> Result<LoadedModel> {
        Checkpoint::load(format!("{}{name}", pretrained::PREFIX), device)
    }

    /// Reads the metadata only (cheap: no tensor is decoded).
    pub fn read_meta(path: impl AsRef<Path>) -> Result<CheckpointMeta> {
        let path = path.as_ref();
        meta_of(path, &read_file(path)?)
    }

    /// Reads the whole checkpoint onto `device`, verifying its checksum.
    pub fn read(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Checkpoint::read_with(path, device, Checksum::Verify)
    }

    /// Reads the whole checkpoint onto `device`. Refuses a file whose tensor data do not match
    /// their checksum (unless `checksum` is [`Checksum::Skip`]) or hold NaN or infinite values.
    pub fn read_with(path: impl AsRef<Path>, device: &Device, checksum: Checksum) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        let meta = meta_of(path, &bytes)?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| not_safetensors(path, e))?;
        if checksum == Checksum::Verify {
            verify_checksum(path, &bytes, &file)?;
        }
        let mut weights = BTreeMap::new();
        let mut optimizer = BTreeMap::new();
        for (name, view) in file.tensors() {
            refuse_non_finite(path, &name, &view)?;
            let tensor = candle_core::safetensors::Load::load(&view, device).map_err(|e| {
                Error::checkpoint(
                    path,
                    format!("tensor {name} cannot be read: {}", Error::candle_message(e)),
                )
            })?;
            match name.strip_prefix(OPTIMIZER_PREFIX) {
                Some(rest) => optimizer.insert(rest.to_string(), tensor),
                None => weights.insert(name, tensor),
            };
        }
        Ok(Checkpoint {
            meta,
            weights,
            optimizer,
        })
    }

    /// Loads the network of the checkpoint at `path` onto `device`, its parameters in `dtype`
    /// (f32 for training; f16 or bf16 allowed for inference).
    pub fn load_as(path: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<LoadedModel> {
        Checkpoint::load_with(path, device, dtype, Checksum::Verify)
    }

    /// [`Checkpoint::load_as`], with the checksum verified or not as `checksum` says.
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        dtype: DType,
        checksum: Checksum,
    ) -> Result<LoadedModel> {
        let path = path.as_ref();
        let checkpoint = Checkpoint::read_with(path, device, checksum)?;
        let meta = &checkpoint.meta;
        let classes = meta.options.classes.unwrap_or(meta.spec.classes);
        if !meta.class_names.is_empty() && meta.class_names.len() != classes {
            return Err(Error::checkpoint(
                path,
                format!(
                    "names {} classes ({}) for a network with {classes} outputs; the metadata \
                     and the weights disagree",
                    meta.class_names.len(),
                    meta.class_names.join(", ")
                ),
            ));
        }
        // Published weights may be stored in f16 or bf16; the network runs in `dtype`.
        let weights = checkpoint
            .weights
            .into_iter()
            .map(|(name, t)| match t.dtype() {
                stored if stored.is_float() && stored != dtype => Ok((name, t.to_dtype(dtype)?)),
                _ => Ok((name, t)),
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let params = Params::from_tensors(weights)?;
        let network = Network::build(
            &checkpoint.meta.spec,
            &checkpoint.meta.options,
            params.var_builder(dtype, device),
        )
        .map_err(|e| {
            Error::checkpoint(
                path,
                format!("does not match its own spec: {}", e.without_backtrace()),
            )
        })?;
        let stray = params.unrequested();
        if !stray.is_empty() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "holds tensors that its network does not use: {}; the file and its spec \
                     disagree",
                    stray.join(", ")
                ),
            ));
        }
        Ok(LoadedModel {
            network,
            params,
            meta: checkpoint.meta,
            optimizer: checkpoint.optimizer,
        })
    }

    /// Loads the network of the checkpoint at `path` onto `device` in f32.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<LoadedModel> {
        Checkpoint::load_as(path, device, DType::F32)
    }
}

/// Writes `tensors` (on the CPU) and `meta` to `path` atomically, with the tensors' checksum.
fn write_tensors(path: &Path, meta: &CheckpointMeta, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut info = meta.to_strings()?;
    let serialise = |info| {
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(info))
            .map_err(|e| Error::checkpoint(path, format!("cannot serialise: {e}")))
    };
    // The checksum is taken over the tensors as the file stores them, then written into the
    // metadata (which it does not cover).
    let draft = serialise(info.clone())?;
    let stored = SafeTensors::deserialize(&draft).map_err(|e| not_safetensors(path, e))?;
    info.insert(CHECKSUM_KEY.into(), tensors_checksum(&stored));
    let bytes = serialise(info)?;
    write_atomic(path, |w| w.write_all(&bytes))
}

/// Writes the checkpoint at `source` to `out` for publishing: weights only (no optimiser or
/// resume state), stored as `dtype` (f32, f16 or bf16), with the card made from `input`.
/// Refuses to replace an existing `out` unless `overwrite`.
pub fn publish(
    source: impl AsRef<Path>,
    out: impl AsRef<Path>,
    input: CardInput,
    dtype: DType,
    overwrite: bool,
) -> Result<ModelCard> {
    let (source, out) = (source.as_ref(), out.as_ref());
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::invalid(format!(
            "published weights are stored as f32, f16 or bf16, not {dtype:?}"
        )));
    }
    crate::output::check_output(out, &[source], overwrite, "the published checkpoint")?;
    let checkpoint = Checkpoint::read(source, &Device::Cpu)?;
    let tensors: Vec<(String, Tensor)> = checkpoint
        .weights
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let parameters = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    let mut meta = checkpoint.meta;
    meta.resume = None;
    // The publisher's data path means nothing elsewhere; without it, `whvi eval` uses the
    // default location of the data set (for CIFAR-10 without one, the embedded sample).
    if let Some(serde_json::Value::Object(training)) = meta.training.as_mut() {
        if let Some(data) = training.get_mut("data") {
            *data = serde_json::Value::Null;
        }
    }
    let card = ModelCard::new(input, &meta, parameters, dtype.as_str())?;
    meta.card = Some(card.clone());
    write_tensors(out, &meta, &tensors)?;
    Ok(card)
}

/// The metadata of the checkpoint file `bytes` read from `path`.
fn meta_of(path: &Path, bytes: &[u8]) -> Result<CheckpointMeta> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| not_safetensors(path, e))?;
    let strings = metadata.metadata().clone().ok_or_else(|| {
        Error::checkpoint(
            path,
            "the file has no metadata: it is a plain safetensors file, not a whvi checkpoint",
        )
    })?;
    CheckpointMeta::from_strings(path, &strings)
}

/// CRC-32 of every tensor's name, dtype, shape and bytes, in name order (see [`CHECKSUM_KEY`]).
fn tensors_checksum(file: &SafeTensors) -> String {
    let mut tensors = file.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut crc = crc32fast::Hasher::new();
    for (name, view) in &tensors {
        crc.update(name.as_bytes());
        crc.update(format!("{:?}", view.dtype()).as_bytes());
        for &d in view.shape() {
            crc.update(&(d as u64).to_le_bytes());
        }
        crc.update(view.data());
    }
    format!("{:08x}", crc.finalize())
}

/// The checksum the file records, if any.
fn file_checksum(bytes: &[u8]) -> Option<String> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).ok()?;
    metadata.metadata().as_ref()?.get(CHECKSUM_KEY).cloned()
}

fn verify_checksum(path: &Path, bytes: &[u8], file: &SafeTensors) -> Result<()> {
    let Some(stored) = file_checksum(bytes) else {
        return Ok(());
    };
    let computed = tensors_checksum(file);
    if stored != computed {
        return Err(Error::checkpoint(
            path,
            format!(
                "its tensor data do not match the checksum written with them (crc32 {stored} \
                 recorded, {computed} now): the file is damaged; restore it from a copy, or read \
                 it anyway with --skip-checksum (Checksum::Skip)"
            ),
        ));
    }
    Ok(())
}

/// Refuses a floating-point tensor that holds NaN or infinite values (read from the file's
/// bytes: an all-ones exponent field).
fn refuse_non_finite(
    path: &Path,
    name: &str,
    view: &safetensors::tensor::TensorView,
) -> Result<()> {
    use safetensors::Dtype;
    let data = view.data();
    let bad = match view.dtype() {
        Dtype::F64 => count_all_ones(data, 8, 0x7ff0_0000_0000_0000),
        Dtype::F32 => count_all_ones(data, 4, 0x7f80_0000),
        Dtype::F16 => count_all_ones(data, 2, 0x7c00),
        Dtype::BF16 => count_all_ones(data, 2, 0x7f80),
        _ => 0,
    };
    if bad > 0 {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor {name} holds {bad} NaN or infinite values of {}: the run that wrote it \
                 diverged, or the file is damaged",
                view.shape().iter().product::<usize>()
            ),
        ));
    }
    Ok(())
}

/// How many little-endian values of `width` bytes have every bit of `exponent` set.
fn count_all_ones(data: &[u8], width: usize, exponent: u64) -> usize {
    data.chunks_exact(width)
        .filter(|bytes| {
            let bits = bytes
                .iter()
                .rev()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            bits & exponent == exponent
        })
        .count()
}

/// The bytes of the checkpoint at `path`: a file, a shipped checkpoint (`pretrained:NAME`) or
/// a file on the Hugging Face hub (`hf://OWNER/REPO/FILE`).
fn read_file(path: &Path) -> Result<Vec<u8>> {
    if let Some(name) = pretrained::name_of(path) {
        return Ok(pretrained::bytes(name)?.to_vec());
    }
    if let Some((owner, repo, file)) = hub::parse(path)? {
        let local = hub::fetch(path, owner, repo, file)?;
        return std::fs::read(&local).map_err(|e| Error::io(local, e));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn not_safetensors(path: &Path, e: safetensors::SafeTensorError) -> Error {
    Error::checkpoint(
        path,
        format!(
            "is not a readable safetensors file ({e}); it may be truncated or of another format"
        ),
    )
}

/// A readable description of the checkpoint at `path` (for `whvi info`).
pub fn describe(path: impl AsRef<Path>) -> Result<String> {
    use std::fmt::Write;
    let path = path.as_ref();
    let meta = Checkpoint::read_meta(path)?;
    let bytes = read_file(path)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| not_safetensors(path, e))?;
    let checksum = match verify_checksum(path, &bytes, &file) {
        Ok(()) if file_checksum(&bytes).is_some() => "verified".to_string(),
        Ok(()) => "none recorded".to_string(),
        Err(e) => format!("MISMATCH: {e}"),
    };
    let (mut weights, mut weight_count, mut optimizer) = (0usize, 0usize, 0usize);
    for (name, view) in file.tensors() {
        if name.starts_with(OPTIMIZER_PREFIX) {
            optimizer += 1;
        } else {
            weights += 1;
            weight_count += view.shape().iter().product::<usize>();
        }
    }
    let o = &meta.options;
    let [c, h, w] = o.input.unwrap_or(meta.spec.input);
    let mut s = String::new();
    let _ = writeln!(s, "checkpoint   {}", path.display());
    let _ = writeln!(s, "format       {FORMAT} v{FORMAT_VERSION}");
    let _ = writeln!(s, "model        {} — {}", meta.spec.name, meta.spec.summary);
    let _ = writeln!(
        s,
        "posterior    {} on {:?} layers{}; width x{}",
        o.method.name(),
        o.policy,
        if o.overrides.is_empty() {
            String::new()
        } else {
            format!(
                " (overrides: {})",
                o.overrides
                    .iter()
                    .map(|(n, m)| format!("{n}={}", m.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        o.width
    );
    let _ = writeln!(
        s,
        "prior        {:?}{}",
        o.prior,
        o.prior_overrides
            .iter()
            .map(|(n, p)| format!(", {n}: {p:?}"))
            .collect::<String>()
    );
    let _ = writeln!(
        s,
        "init sigma   {} of the initial mean's scale",
        o.initial_sigma
    );
    let _ = writeln!(s, "input        {c}x{h}x{w}");
    let _ = writeln!(s, "classes      {}", meta.class_names.join(", "));
    if let Some(n) = &meta.normalization {
        let _ = writeln!(s, "normalise    mean {:?}, std {:?}", n.mean(), n.std());
    }
    let _ = writeln!(
        s,
        "tensors      {weights} weight tensors ({weight_count} values), {optimizer} optimiser tensors{}",
        if meta.resume.is_some() { ", resumable" } else { "" }
    );
    let _ = writeln!(s, "checksum     {checksum}");
    let _ = writeln!(
        s,
        "trained      {} epochs, {} steps, seed {}",
        meta.epoch,
        meta.step,
        meta.seed.map_or("-".to_string(), |v| v.to_string())
    );
    if let Some(training) = &meta.training {
        let _ = writeln!(s, "training     {training}");
    }
    if let Some(metrics) = &meta.metrics {
        let _ = writeln!(s, "last metrics {metrics}");
    }
    if let Some(card) = &meta.card {
        s.push_str(&card.describe());
    }
    Ok(s)
}
