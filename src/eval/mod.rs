//! Evaluation of saved Bayesian checkpoints: calibration and uncertainty on the clean test
//! set, under dataset shift (corruptions), and for out-of-distribution detection.
//!
//! [`evaluate`] loads each checkpoint, predicts with T posterior samples, and returns one
//! [`EvalReport`] per checkpoint whose top-level keys are those of `whvi metrics`
//! ([`MetricsReport`]) for the clean test set.

mod cifar10c;
mod corrupt;

pub use cifar10c::{write_cifar10c, Cifar10C, LABELS_FILE as CIFAR10C_LABELS_FILE};
pub use corrupt::{corrupt_dataset, Corruption};

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use rand::Rng;
use serde::{Deserialize, Serialize};

use cifar10c::{corruption_rng, SEVERITIES};

use crate::checkpoint::{
    pretrained, write_atomic, Checkpoint, CheckpointMeta, Checksum, LoadedModel,
};
use crate::data::{self, DatasetKind, ImageDataset, Normalization, Resize};
use crate::dist::Group;
use crate::metrics::{
    self, apply_temperature, compute_report, fit_temperature_from_probs, plot_corruption,
    plot_ood_histogram, plot_reliability, CorruptionPoint, Logits, MetricsReport, NpyArray,
    OodScore, Predictions, ReliabilityDiagram,
};
use crate::output::check_output;
use crate::rng::{seeded_stream, WhviRng};
use crate::zoo::{ensemble_predictions, predict, BayesPolicy, Method, PredictOptions};
use crate::{Error, Result};

/// Where out-of-distribution images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OodSource {
    /// Uniform noise images of the model's input shape.
    Noise,
    /// The test set of another data set, converted to the model's input shape (grey images are
    /// copied into every channel and zero-padded or resized).
    Dataset {
        /// Which data set.
        kind: DatasetKind,
        /// Where it is (`None`: its default location).
        path: Option<PathBuf>,
    },
    /// The SVHN test set (`test_32x32.mat`, or the directory holding it).
    Svhn {
        /// Where it is.
        path: PathBuf,
    },
}

impl OodSource {
    /// Parses `noise`, `svhn:PATH`, `KIND` or `KIND:PATH` (KIND one of cifar10, cifar100,
    /// mnist, fashion-mnist).
    pub fn parse(text: &str) -> Result<Self> {
        if text == "noise" {
            return Ok(OodSource::Noise);
        }
        let (kind, path) = match text.split_once(':') {
            Some((k, p)) => (k, Some(PathBuf::from(p))),
            None => (text, None),
        };
        let kind = match (kind, path) {
            ("svhn", Some(path)) => return Ok(OodSource::Svhn { path }),
            ("cifar10", path) => (DatasetKind::Cifar10, path),
            ("cifar100", path) => (DatasetKind::Cifar100, path),
            ("mnist", path) => (DatasetKind::Mnist, path),
            ("fashion-mnist", path) => (DatasetKind::FashionMnist, path),
            (other, _) => {
                return Err(Error::invalid(format!(
                    "--ood {other}: use noise, svhn:PATH, cifar10[:PATH], cifar100:PATH, \
                     mnist:PATH or fashion-mnist[:DIR]"
                )))
            }
        };
        Ok(OodSource::Dataset {
            kind: kind.0,
            path: kind.1,
        })
    }

    /// The name of the set in reports and file names (`svhn`, `noise`, `cifar100`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            OodSource::Noise => "noise",
            OodSource::Dataset { kind, .. } => kind.name(),
            OodSource::Svhn { .. } => "svhn",
        }
    }

    /// The file or directory it reads, if any.
    fn path(&self) -> Option<&Path> {
        match self {
            OodSource::Noise => None,
            OodSource::Dataset { path, .. } => path.as_deref(),
            OodSource::Svhn { path } => Some(path),
        }
    }
}

/// Where corrupted test sets come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShiftSource {
    /// Made from the test set on the fly, at severities 1-5.
    OnTheFly(Vec<Corruption>),
    /// Read from a directory in the published CIFAR-10-C layout: every corruption file in it.
    Cifar10C(PathBuf),
}

impl ShiftSource {
    /// Parses the values of `--corruptions`: `cifar10-c:DIR` alone, `all` (every corruption
    /// made on the fly) or corruption names. No value means no corrupted sets (`None`).
    pub fn parse(values: &[String]) -> Result<Option<Self>> {
        if let Some(dir) = values.iter().find_map(|v| v.strip_prefix("cifar10-c:")) {
            if values.len() > 1 {
                return Err(Error::invalid(
                    "--corruptions cifar10-c:DIR evaluates every file in DIR; give it alone",
                ));
            }
            return Ok(Some(ShiftSource::Cifar10C(PathBuf::from(dir))));
        }
        if values.is_empty() {
            return Ok(None);
        }
        let corruptions = if values.iter().any(|v| v == "all") {
            Corruption::ON_THE_FLY.to_vec()
        } else {
            values
                .iter()
                .map(|v| Corruption::parse(v))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Some(ShiftSource::OnTheFly(corruptions)))
    }
}

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// The checkpoints to evaluate (several give a side-by-side table).
    pub checkpoints: Vec<PathBuf>,
    /// Evaluate the checkpoints as one deep ensemble: its predictive is the mean of the
    /// members' predictive distributions, and one report comes back.
    pub ensemble: bool,
    /// The test data set (`None`: the one the first checkpoint was trained on).
    pub dataset: Option<DatasetKind>,
    /// Where the data are (`None`: the training run's path, else the default location).
    pub data: Option<PathBuf>,
    /// Posterior samples T.
    pub samples: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Seed of the posterior samples and corruptions.
    pub seed: u64,
    /// Evaluate only the first N test images (all when `None`).
    pub limit: Option<usize>,
    /// Corrupted test sets to evaluate (`None`: none).
    pub shift: Option<ShiftSource>,
    /// Images per corrupted set and severity (the first N), to keep CPU runs short.
    pub corruption_images: usize,
    /// An out-of-distribution set.
    pub ood: Option<OodSource>,
    /// Directory for the plots (PNG and SVG).
    pub plots: Option<PathBuf>,
    /// Fit a temperature on the training run's validation split and report the test metrics
    /// after scaling as well.
    pub temperature_scaling: bool,
    /// Write the predictive probabilities of every set evaluated into this directory, as
    /// `.npy` files (see [`evaluate`]).
    pub save_probs: Option<PathBuf>,
    /// With `save_probs`, also write the per-sample probabilities `[T, N, K]`.
    pub save_samples: bool,
    /// Write the JSON report here (one object, or an array for several checkpoints),
    /// atomically. Never over one of the inputs; over an existing file only with `overwrite`.
    pub report: Option<PathBuf>,
    /// Let `report` replace an existing file, and `save_probs` replace saved predictions.
    pub overwrite: bool,
    /// Whether the checkpoints' checksums are verified.
    pub checksum: Checksum,
}

impl EvalConfig {
    /// The defaults of `whvi eval` for `checkpoints`, side by side: T = 32 posterior samples in
    /// batches of 256 images, seed 0, every test image, no corrupted or OOD sets (1,000 images
    /// per corrupted set when they are asked for), temperature scaling fitted on the run's
    /// validation split, checksums verified, nothing written.
    pub fn new(checkpoints: Vec<PathBuf>) -> Self {
        EvalConfig {
            checkpoints,
            ensemble: false,
            dataset: None,
            data: None,
            samples: 32,
            batch_size: 256,
            seed: 0,
            limit: None,
            shift: None,
            corruption_images: 1000,
            ood: None,
            plots: None,
            temperature_scaling: true,
            save_probs: None,
            save_samples: false,
            report: None,
            overwrite: false,
            checksum: Checksum::Verify,
        }
    }

    /// Checks every setting that does not need the data, so that a mistake is reported before
    /// the first forward pass rather than after the first checkpoint's evaluation.
    pub fn validate(&self) -> Result<()> {
        if self.checkpoints.is_empty() {
            return Err(Error::invalid("give at least one checkpoint to evaluate"));
        }
        if self.ensemble && self.checkpoints.len() < 2 {
            return Err(Error::invalid(
                "an ensemble needs at least two checkpoints (its members)",
            ));
        }
        for (value, name) in [(self.samples, "samples"), (self.batch_size, "batch_size")] {
            if value == 0 {
                return Err(Error::invalid(format!("{name} must be at least 1")));
            }
        }
        if self.shift.is_some() && self.corruption_images == 0 {
            return Err(Error::invalid(
                "corruption_images must be at least 1 when corruptions are asked for",
            ));
        }
        if let Some(ShiftSource::Cifar10C(dir)) = &self.shift {
            if !dir.is_dir() {
                return Err(Error::data(dir, "the CIFAR-10-C directory is not there"));
            }
        }
        match &self.ood {
            Some(OodSource::Dataset {
                kind: kind @ (DatasetKind::Mnist | DatasetKind::Cifar100),
                path: None,
            }) => {
                let what = match kind {
                    DatasetKind::Mnist => "DIR (the four idx files)",
                    _ => "PATH (the archive or the extracted directory)",
                };
                return Err(Error::invalid(format!(
                    "--ood {kind} needs its location: --ood {kind}:{what}"
                )));
            }
            Some(source) => match source.path() {
                Some(path) if !path.exists() => {
                    return Err(Error::data(path, "the --ood data set is not there"))
                }
                _ => {}
            },
            None => {}
        }
        if self.save_samples && self.save_probs.is_none() {
            return Err(Error::invalid("--save-samples needs --save-probs DIR"));
        }
        let mut inputs: Vec<&Path> = self.checkpoints.iter().map(PathBuf::as_path).collect();
        inputs.extend(self.data.as_deref());
        inputs.extend(self.ood.as_ref().and_then(OodSource::path));
        if let Some(report) = &self.report {
            check_output(report, &inputs, self.overwrite, "--report")?;
        }
        if let Some(dir) = &self.save_probs {
            self.check_probs_dirs(dir, &inputs)?;
        }
        Ok(())
    }
}

impl EvalConfig {
    /// Refuses a `--save-probs` directory that is an input, two checkpoints whose predictions
    /// would go to the same folder, and a folder that holds predictions already (unless
    /// `overwrite`).
    fn check_probs_dirs(&self, dir: &Path, inputs: &[&Path]) -> Result<()> {
        if inputs.contains(&dir) {
            return Err(Error::invalid(format!(
                "--save-probs {} is one of the inputs; choose a new directory",
                dir.display()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for prefix in self.run_prefixes() {
            let folder = dir.join(prefix);
            if !seen.insert(folder.clone()) {
                return Err(Error::invalid(format!(
                    "two checkpoints would save their predictions in {}: evaluate them in \
                     separate runs or rename one",
                    folder.display()
                )));
            }
            let holds_files = std::fs::read_dir(&folder).is_ok_and(|mut d| d.next().is_some());
            if holds_files && !self.overwrite {
                return Err(Error::invalid(format!(
                    "{} holds saved predictions already; pass --force to replace them or \
                     choose another --save-probs directory",
                    folder.display()
                )));
            }
        }
        Ok(())
    }
}

impl EvalConfig {
    /// The file-name prefix of each evaluation's plots and saved predictions, in order: one
    /// per checkpoint, or one for the ensemble.
    fn run_prefixes(&self) -> Vec<String> {
        match (self.ensemble, self.checkpoints.as_slice()) {
            (true, [first, ..]) => vec![self.prefix_of(first)],
            _ => self.checkpoints.iter().map(|c| plot_prefix(c)).collect(),
        }
    }

    /// The prefix of the evaluation whose (first) checkpoint is `first`.
    fn prefix_of(&self, first: &Path) -> String {
        match self.ensemble {
            true => ensemble_prefix(first, self.checkpoints.len()),
            false => plot_prefix(first),
        }
    }
}

/// Writes `reports` as JSON to `path` atomically: one object for one checkpoint, an array for
/// several.
pub fn write_report(path: &Path, reports: &[EvalReport]) -> Result<()> {
    let json = match reports {
        [one] => serde_json::to_string_pretty(one),
        all => serde_json::to_string_pretty(all),
    }
    .map_err(|e| Error::invalid(format!("cannot serialise the report: {e}")))?;
    write_atomic(path, |w| {
        w.write_all(json.as_bytes())?;
        w.write_all(b"\n")
    })
}

/// Temperature scaling of the mean predictive distribution: `softmax(ln p / T)`, `T` fitted
/// by minimising the NLL on the validation images the training run held out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemperatureReport {
    /// The fitted temperature (above 1: the model was over-confident).
    pub temperature: f64,
    /// Validation images it was fitted on.
    pub validation_images: usize,
    /// Validation NLL before and after scaling.
    pub validation_nll: [f64; 2],
    /// Test NLL after scaling.
    pub nll: f64,
    /// Test ECE-15 after scaling.
    pub ece15: f64,
    /// Test Brier score after scaling.
    pub brier: f64,
    /// The corrupted sets' mean NLL, Brier and ECE-15 after scaling with the same temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupted: Option<ScaledMetrics>,
}

/// NLL, Brier score and ECE-15 after temperature scaling (which leaves accuracy as it is).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScaledMetrics {
    /// NLL.
    pub nll: f64,
    /// Brier score.
    pub brier: f64,
    /// ECE-15.
    pub ece15: f64,
}

impl ScaledMetrics {
    /// The metrics of `probs` scaled by `temperature`.
    fn of(probs: &metrics::Probs, labels: &[usize], temperature: f64) -> Result<Self> {
        let scaled = apply_temperature(&Logits::from_probs(probs), temperature)?;
        Ok(ScaledMetrics {
            nll: metrics::nll(&scaled, labels)?,
            brier: metrics::brier(&scaled, labels)?,
            ece15: metrics::ece(&scaled, labels, metrics::DEFAULT_BINS)?,
        })
    }

    /// The means of `all` (`None` when there are none).
    fn mean(all: &[ScaledMetrics]) -> Option<Self> {
        let n = all.len() as f64;
        let mean = |f: fn(&ScaledMetrics) -> f64| all.iter().map(f).sum::<f64>() / n;
        (!all.is_empty()).then(|| ScaledMetrics {
            nll: mean(|m| m.nll),
            brier: mean(|m| m.brier),
            ece15: mean(|m| m.ece15),
        })
    }
}

/// One corrupted test set's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorruptionResult {
    /// The corruption.
    pub corruption: Corruption,
    /// Severity 1-5.
    pub severity: usize,
    /// Images evaluated.
    pub images: usize,
    /// Accuracy.
    pub accuracy: f64,
    /// NLL.
    pub nll: f64,
    /// Brier score.
    pub brier: f64,
    /// ECE-15.
    pub ece15: f64,
    /// NLL, Brier and ECE-15 after temperature scaling, when a temperature was fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaled: Option<ScaledMetrics>,
}

/// Means over every corruption and severity (uncertainty-baselines' `corrupted_*` metrics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorruptionSummary {
    /// Mean accuracy.
    #[serde(rename = "corrupted_accuracy")]
    pub accuracy: f64,
    /// Mean NLL.
    #[serde(rename = "corrupted_nll")]
    pub nll: f64,
    /// Mean Brier score.
    #[serde(rename = "corrupted_brier")]
    pub brier: f64,
    /// Mean ECE-15.
    #[serde(rename = "corrupted_ece15")]
    pub ece15: f64,
}

impl CorruptionSummary {
    /// The means of `results` (`None` when there are none).
    pub fn of(results: &[CorruptionResult]) -> Option<Self> {
        let n = results.len() as f64;
        let mean = |f: fn(&CorruptionResult) -> f64| results.iter().map(f).sum::<f64>() / n;
        (!results.is_empty()).then(|| CorruptionSummary {
            accuracy: mean(|c| c.accuracy),
            nll: mean(|c| c.nll),
            brier: mean(|c| c.brier),
            ece15: mean(|c| c.ece15),
        })
    }
}

/// The evaluation of one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Clean test-set metrics (and OOD detection when an OOD set was given), at the top level.
    #[serde(flatten)]
    pub metrics: MetricsReport,
    /// The checkpoint file (an ensemble's first member).
    pub checkpoint: PathBuf,
    /// An ensemble's members, the first one included (empty for a single checkpoint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<PathBuf>,
    /// Values the network stores (weights, variational parameters, batch-norm statistics),
    /// summed over an ensemble's members.
    #[serde(default)]
    pub parameters: usize,
    /// Posterior samples T.
    pub samples: usize,
    /// Seed of the evaluation.
    pub seed: u64,
    /// Per corruption and severity.
    pub corruptions: Vec<CorruptionResult>,
    /// Means over the corruptions, at the top level as `corrupted_accuracy`, ...
    #[serde(flatten)]
    pub corruption_mean: Option<CorruptionSummary>,
    /// The corrupted sets' source.
    pub shift: Option<ShiftSource>,
    /// The OOD set used.
    pub ood: Option<OodSource>,
    /// Temperature scaling, when the checkpoint records its validation split.
    pub temperature_scaling: Option<TemperatureReport>,
    /// The checkpoint's metadata (an ensemble's first member's).
    pub meta: CheckpointMeta,
    /// Seconds spent.
    pub seconds: f64,
}

fn labels_of(data: &ImageDataset) -> Vec<usize> {
    data.labels().iter().map(|&l| usize::from(l)).collect()
}

fn uniform_noise(
    n: usize,
    (c, h, w): (usize, usize, usize),
    classes: &[String],
    rng: &mut WhviRng,
) -> Result<ImageDataset> {
    let images: Vec<u8> = (0..n * c * h * w).map(|_| rng.random()).collect();
    ImageDataset::new(images, vec![0; n], c, h, w, classes.to_vec())
}

/// Loads the OOD images in the model's input shape, labelled with the model's classes (the
/// labels are never used: OOD detection only looks at the predictions).
fn ood_images(
    source: &OodSource,
    shape: (usize, usize, usize),
    classes: &[String],
    n: usize,
    rng: &mut WhviRng,
) -> Result<ImageDataset> {
    let images = match source {
        OodSource::Noise => return uniform_noise(n, shape, classes, rng),
        OodSource::Dataset { kind, path } => data::load(*kind, path.as_deref())?.test,
        OodSource::Svhn { path } => data::svhn::load(path)?,
    };
    let images = images.first(n)?;
    let (c, h, w) = shape;
    let images = if images.shape() == shape {
        images
    } else {
        let resize = if images.height() <= h && images.width() <= w {
            Resize::Pad
        } else {
            Resize::Bilinear
        };
        images.convert(c, h, w, resize)?
    };
    ImageDataset::new(
        images.images().to_vec(),
        vec![0; images.len()],
        c,
        h,
        w,
        classes.to_vec(),
    )
}

/// A short name for a checkpoint in tables: its network, method and run folder.
fn label(path: &Path, meta: &CheckpointMeta) -> String {
    let options = &meta.options;
    let method = if options.policy == BayesPolicy::None && options.overrides.is_empty() {
        Method::Deterministic.name()
    } else {
        options.method.name()
    };
    match run_name(path) {
        Some(run) => format!("{} {method} ({run})", meta.spec.name),
        None => format!("{} {method}", meta.spec.name),
    }
}

/// A report's name in tables and plots: [`label`], with the size of an ensemble.
fn report_label(report: &EvalReport) -> String {
    let single = label(&report.checkpoint, &report.meta);
    match report.members.len() {
        0 => single,
        m => format!("{single} ensemble of {m}"),
    }
}

/// The file-name prefix of an ensemble's plots and saved predictions, named after its first
/// member.
fn ensemble_prefix(first: &Path, members: usize) -> String {
    format!("{}-ensemble-of-{members}", plot_prefix(first))
}

/// The name of the folder a checkpoint is in (its run), also for a bare file name.
fn run_name(path: &Path) -> Option<String> {
    if let Some(name) = pretrained::name_of(path) {
        return Some(name.to_string());
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    dir.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The file-name prefix of a checkpoint's plots: `RUN-STEM`, or `STEM` outside any folder.
fn plot_prefix(path: &Path) -> String {
    if let Some(name) = pretrained::name_of(path) {
        return name.to_string();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    match run_name(path) {
        Some(run) => format!("{run}-{stem}"),
        None => stem,
    }
}

/// The validation images a training run held out, from the run's recorded configuration:
/// `Err` with the reason when it used none, does not record it, or held out more images than
/// these training data can give (another copy of the data set, such as the embedded sample).
fn held_out_validation(
    training: &serde_json::Value,
    train: &ImageDataset,
) -> std::result::Result<ImageDataset, String> {
    let field = |name: &str| training.get(name).and_then(|v| v.as_u64());
    match (field("validation"), field("seed")) {
        (Some(n), Some(seed)) if n > 0 => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > train.len() / 2 {
                return Err(format!(
                    "the run held out {n} validation images, more than these training data \
                     ({} images) can give: pass the data it was trained on with --data",
                    train.len()
                ));
            }
            data::validation_split(train, n, seed)
                .map(|(_, val)| val)
                .map_err(|e| e.to_string())
        }
        _ => Err("the run held out no validation images".into()),
    }
}

/// Fits the temperature on validation predictions and applies it to the test predictions.
fn temperature_report(
    validation: &Predictions,
    validation_labels: &[usize],
    test: &Predictions,
    test_labels: &[usize],
) -> Result<TemperatureReport> {
    let fit = fit_temperature_from_probs(validation.mean(), validation_labels)?;
    let scaled = ScaledMetrics::of(test.mean(), test_labels, fit.temperature)?;
    Ok(TemperatureReport {
        temperature: fit.temperature,
        validation_images: validation_labels.len(),
        validation_nll: [fit.nll_before, fit.nll_after],
        nll: scaled.nll,
        ece15: scaled.ece15,
        brier: scaled.brier,
        corrupted: None,
    })
}

/// Evaluates every checkpoint of `config` on `device`; `progress` receives a line per stage.
///
/// Each set draws its posterior samples (and its corruption noise) from a generator of its
/// own, seeded from `config.seed` and the set's name, so a set's numbers do not depend on
/// which other sets are evaluated, and a corruption read from files written by
/// [`write_cifar10c`] with the same seed gives the numbers of the same corruption made on the
/// fly.
///
/// With `save_probs`, each checkpoint's predictions go into `DIR/RUN-STEM/`:
/// `SET.probs.npy` (float64 `[N, K]`, the mean predictive), `SET.labels.npy` (int64 `[N]`)
/// and, with `save_samples`, `SET.samples.npy` (float32 `[T, N, K]`), for SET `clean`,
/// `CORRUPTION-SEVERITY` (e.g. `fog-3`) and `ood-NAME` (no labels). `whvi metrics` reads them.
pub fn evaluate(
    config: &EvalConfig,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<EvalReport>> {
    evaluate_in_group(config, device, &Group::solo(), progress)
}

/// [`evaluate`] as one rank of `group` (e.g. [`Group::from_environment`] under `mpirun`):
/// the corruptions of a shift evaluation are spread over the ranks (rank r takes corruptions
/// r, r + N, ...; each set keeps its own generator, so the numbers are those of one process),
/// the clean, OOD and validation sets are predicted by every rank, and every rank returns the
/// whole reports. Only rank 0 writes the report file and the plots; saved predictions are
/// written by the rank that made them.
pub fn evaluate_in_group(
    config: &EvalConfig,
    device: &Device,
    group: &Group,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<EvalReport>> {
    config.validate()?;
    // Every checkpoint is loaded before any is evaluated: a bad second file is reported
    // before the first one's work is done.
    let mut models = Vec::new();
    for path in &config.checkpoints {
        models.push(Member {
            path: path.clone(),
            model: Checkpoint::load_with(path, device, DType::F32, config.checksum)?,
        });
    }
    let shift = match &config.shift {
        Some(ShiftSource::Cifar10C(dir)) => {
            let opened = Cifar10C::open(dir)?;
            opened
                .notes()
                .iter()
                .for_each(|n| progress(&format!("note: {n}")));
            Some(opened)
        }
        _ => None,
    };
    let groups: Vec<Vec<Member>> = if config.ensemble {
        vec![models]
    } else {
        models.into_iter().map(|m| vec![m]).collect()
    };
    let mut reports = Vec::new();
    for members in groups {
        reports.push(evaluate_one(
            config,
            members,
            shift.as_ref(),
            group,
            progress,
        )?);
    }
    if !group.is_leader() {
        return Ok(reports);
    }
    if let (Some(dir), true) = (&config.plots, reports.len() > 1 && config.shift.is_some()) {
        let points = methods_under_shift(&reports);
        for ext in ["png", "svg"] {
            metrics::plot_methods_under_shift(
                &points,
                &dir.join(format!("shift-by-method.{ext}")),
            )?;
        }
    }
    if let Some(report) = &config.report {
        write_report(report, &reports)?;
    }
    Ok(reports)
}

/// Each report's accuracy and ECE-15 at each severity, averaged over its corruptions, as one
/// series per checkpoint.
fn methods_under_shift(reports: &[EvalReport]) -> Vec<CorruptionPoint> {
    let mut points = Vec::new();
    for r in reports {
        for severity in 1..=5 {
            let at: Vec<&CorruptionResult> = r
                .corruptions
                .iter()
                .filter(|c| c.severity == severity)
                .collect();
            if at.is_empty() {
                continue;
            }
            let n = at.len() as f64;
            points.push(CorruptionPoint {
                name: report_label(r),
                severity: severity as u32,
                accuracy: at.iter().map(|c| c.accuracy).sum::<f64>() / n,
                ece: at.iter().map(|c| c.ece15).sum::<f64>() / n,
            });
        }
    }
    points
}

/// The data set and its location a checkpoint is evaluated on.
fn test_data_of(
    config: &EvalConfig,
    meta: &CheckpointMeta,
) -> (DatasetKind, Option<PathBuf>, bool) {
    let training: Option<(DatasetKind, Option<PathBuf>)> = meta.training.as_ref().and_then(|t| {
        let kind = serde_json::from_value(t.get("dataset")?.clone()).ok()?;
        let data = serde_json::from_value(t.get("data")?.clone()).ok()?;
        Some((kind, data))
    });
    let training_kind = training.as_ref().map(|t| t.0);
    let kind = config
        .dataset
        .or(training_kind)
        .unwrap_or(DatasetKind::Cifar10);
    // The training run's data path only serves the data set it was trained on.
    let path = config.data.clone().or_else(|| {
        training
            .as_ref()
            .filter(|t| t.0 == kind)
            .and_then(|t| t.1.clone())
    });
    (kind, path, training_kind == Some(kind))
}

/// A loaded checkpoint and the path it came from.
struct Member {
    path: PathBuf,
    model: LoadedModel,
}

/// What every set of one evaluation (one checkpoint, or one ensemble) shares.
struct Evaluation<'a> {
    config: &'a EvalConfig,
    /// The network, or an ensemble's members.
    networks: Vec<crate::zoo::Network>,
    normalization: Normalization,
    /// Where the predictions are saved (`None`: they are not).
    probs_dir: Option<PathBuf>,
    /// The ranks the corrupted sets are spread over.
    group: Group,
}

impl Evaluation<'_> {
    /// Predicts `data` with the set's own generator (one per ensemble member) and saves the
    /// predictions when asked. A set that every rank predicts (`every_rank`) is saved by the
    /// leader; one that a single rank predicts, by that rank.
    fn predict(
        &self,
        set: &str,
        data: &ImageDataset,
        keep_samples: bool,
        every_rank: bool,
    ) -> Result<Predictions> {
        let ensemble = self.networks.len() > 1;
        let options = PredictOptions {
            samples: self.config.samples,
            batch_size: self.config.batch_size,
            keep_samples: keep_samples || self.config.save_samples || ensemble,
        };
        let mut members = Vec::with_capacity(self.networks.len());
        for (i, network) in self.networks.iter().enumerate() {
            // The first member draws what a single checkpoint would.
            let stream = match i {
                0 => format!("predict/{set}"),
                i => format!("predict/{set}/member-{i}"),
            };
            let mut rng = seeded_stream(self.config.seed, &stream);
            members.push(predict(
                network,
                data,
                &self.normalization,
                options,
                &mut rng,
                |_| {},
            )?);
        }
        let preds = ensemble_predictions(members)?;
        let saves = !every_rank || self.group.is_leader();
        if let Some(dir) = self.probs_dir.as_ref().filter(|_| saves) {
            let labels = (!set.starts_with("ood-")).then(|| data.labels());
            save_predictions(dir, set, &preds, labels, self.config.save_samples)?;
        }
        Ok(preds)
    }

    /// Accuracy, NLL, Brier and ECE-15 of one corrupted set.
    fn corrupted(
        &self,
        corruption: Corruption,
        severity: usize,
        data: &ImageDataset,
        temperature: Option<f64>,
    ) -> Result<CorruptionResult> {
        let set = format!("{}-{severity}", corruption.name());
        let mean = self.predict(&set, data, false, false)?;
        let (p, l) = (mean.mean(), labels_of(data));
        Ok(CorruptionResult {
            scaled: temperature
                .map(|t| ScaledMetrics::of(p, &l, t))
                .transpose()?,
            corruption,
            severity,
            images: data.len(),
            accuracy: metrics::accuracy(p, &l)?,
            nll: metrics::nll(p, &l)?,
            brier: metrics::brier(p, &l)?,
            ece15: metrics::ece(p, &l, metrics::DEFAULT_BINS)?,
        })
    }

    /// Every corrupted set of `source`, each severity of each corruption. In a group of ranks,
    /// rank r predicts the corruptions r, r + N, ... and every rank ends with all results.
    fn shift(
        &self,
        source: &ShiftSource,
        files: Option<&Cifar10C>,
        test: &ImageDataset,
        temperature: Option<f64>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<CorruptionResult>> {
        let limit = self.config.corruption_images;
        let (rank, ranks) = (self.group.rank(), self.group.size());
        let mine = |i: usize| i % ranks == rank;
        // Each set's corruption and severity, and its result where this rank computed it.
        let mut results: Vec<(Corruption, usize, Option<CorruptionResult>)> = Vec::new();
        match (source, files) {
            (ShiftSource::Cifar10C(_), Some(files)) => {
                if test.shape() != (3, 32, 32) || test.num_classes() != 10 {
                    return Err(Error::invalid(
                        "CIFAR-10-C holds 3x32x32 images of the 10 CIFAR-10 classes; evaluate a \
                         CIFAR-10 model on it",
                    ));
                }
                for (i, corruption) in files.corruptions().into_iter().enumerate() {
                    if !mine(i) {
                        results.extend((1..=SEVERITIES).map(|s| (corruption, s, None)));
                        continue;
                    }
                    progress(&format!(
                        "{}: {} (CIFAR-10-C files)",
                        files.dir().display(),
                        corruption.name()
                    ));
                    // --limit caps the corrupted sets as it caps the clean one.
                    let sets = files.load(corruption, limit.min(test.len()), test.classes())?;
                    for (severity, set) in (1..).zip(&sets) {
                        let result = self.corrupted(corruption, severity, set, temperature)?;
                        results.push((corruption, severity, Some(result)));
                    }
                }
            }
            (ShiftSource::OnTheFly(corruptions), _) => {
                let base = test.first(limit)?;
                for (i, &corruption) in corruptions.iter().enumerate() {
                    for severity in 1..=SEVERITIES {
                        if !mine(i) {
                            results.push((corruption, severity, None));
                            continue;
                        }
                        progress(&format!("{} severity {severity}", corruption.name()));
                        let mut rng = corruption_rng(self.config.seed, corruption, severity);
                        let set = corrupt_dataset(&base, corruption, severity, &mut rng)?;
                        let result = self.corrupted(corruption, severity, &set, temperature)?;
                        results.push((corruption, severity, Some(result)));
                    }
                }
            }
            (ShiftSource::Cifar10C(dir), None) => {
                return Err(Error::data(dir, "the CIFAR-10-C directory was not opened"))
            }
        }
        Ok(gather_results(&self.group, results, temperature.is_some()))
    }
}

/// Every rank's corrupted-set results on every rank: each set's metrics are summed over the
/// ranks, where only the rank that computed them contributes (others add zeros, which leaves
/// the values as they are, bit for bit).
fn gather_results(
    group: &Group,
    results: Vec<(Corruption, usize, Option<CorruptionResult>)>,
    scaled: bool,
) -> Vec<CorruptionResult> {
    const FIELDS: usize = 8;
    let mut values = vec![0.0; results.len() * FIELDS];
    for (slot, (_, _, result)) in values.chunks_mut(FIELDS).zip(&results) {
        if let Some(r) = result {
            let s = r.scaled.unwrap_or(ScaledMetrics {
                nll: 0.0,
                brier: 0.0,
                ece15: 0.0,
            });
            let images = r.images as f64;
            slot.copy_from_slice(&[
                r.accuracy, r.nll, r.brier, r.ece15, images, s.nll, s.brier, s.ece15,
            ]);
        }
    }
    group.sum_f64(&mut values);
    results
        .into_iter()
        .zip(values.chunks(FIELDS))
        .map(|((corruption, severity, _), v)| CorruptionResult {
            corruption,
            severity,
            images: v[4] as usize,
            accuracy: v[0],
            nll: v[1],
            brier: v[2],
            ece15: v[3],
            scaled: scaled.then_some(ScaledMetrics {
                nll: v[5],
                brier: v[6],
                ece15: v[7],
            }),
        })
        .collect()
}

/// Writes one set's predictions as `.npy` files into `dir` (see [`evaluate`]).
fn save_predictions(
    dir: &Path,
    set: &str,
    preds: &Predictions,
    labels: Option<&[u8]>,
    samples: bool,
) -> Result<()> {
    let mean = preds.mean();
    let probs = NpyArray::new(&[mean.n(), mean.k()], mean.as_slice())?;
    metrics::write_npy(dir.join(format!("{set}.probs.npy")), &probs)?;
    if let Some(labels) = labels {
        let labels: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
        metrics::write_npy(
            dir.join(format!("{set}.labels.npy")),
            &NpyArray::new(&[labels.len()], &labels)?,
        )?;
    }
    if let (true, Some(s)) = (samples, preds.samples()) {
        let values: Vec<f32> = (0..s.t())
            .flat_map(|t| s.sample(t))
            .map(|&v| v as f32)
            .collect();
        metrics::write_npy(
            dir.join(format!("{set}.samples.npy")),
            &NpyArray::new(&[s.t(), s.n(), s.k()], &values)?,
        )?;
    }
    Ok(())
}

/// The network, normalisation and test data of one evaluation, and the training data the
/// validation split comes from; for an ensemble, checked to agree across its members.
struct Prepared<'a> {
    /// The checkpoints' paths (one, or an ensemble's members).
    paths: Vec<PathBuf>,
    /// Values the networks store, summed over the members.
    parameters: usize,
    eval: Evaluation<'a>,
    metas: Vec<CheckpointMeta>,
    sets: data::TrainTest,
    test: ImageDataset,
    trained_on_it: bool,
}

/// Loads the test data of `members` and checks that an ensemble's members can be averaged.
fn prepare<'a>(
    config: &'a EvalConfig,
    members: Vec<Member>,
    group: &Group,
    progress: &mut dyn FnMut(&str),
) -> Result<Prepared<'a>> {
    let paths: Vec<PathBuf> = members.iter().map(|m| m.path.clone()).collect();
    let first = paths[0].clone();
    let parameters = members
        .iter()
        .flat_map(|m| m.model.params.named_vars())
        .map(|(_, v)| v.elem_count())
        .sum();
    let (networks, metas): (Vec<_>, Vec<_>) = members
        .into_iter()
        .map(|m| (m.model.network, m.model.meta))
        .unzip();
    let (kind, data_path, trained_on_it) = test_data_of(config, &metas[0]);
    let normalization_of = |meta: &CheckpointMeta| {
        meta.normalization
            .clone()
            .unwrap_or_else(|| Normalization::for_kind(kind))
    };
    let normalization = normalization_of(&metas[0]);
    for (i, (network, meta)) in networks.iter().zip(&metas).enumerate().skip(1) {
        let path = &paths[i];
        if network.input_shape() != networks[0].input_shape()
            || meta.class_names != metas[0].class_names
        {
            return Err(Error::invalid(format!(
                "ensemble member {} takes other images or predicts other classes than {}; \
                 ensemble checkpoints trained on the same data set",
                path.display(),
                first.display()
            )));
        }
        if normalization_of(meta) != normalization {
            return Err(Error::invalid(format!(
                "ensemble member {} normalises its input unlike {}; ensemble checkpoints \
                 trained with the same normalisation",
                path.display(),
                first.display()
            )));
        }
    }
    progress(&format!("{}: loading {kind} data", first.display()));
    let sets = data::load(kind, data_path.as_deref())?;
    for note in &sets.notes {
        progress(&format!("note: {note}"));
    }
    let test = match config.limit {
        Some(n) => sets.test.first(n)?,
        None => sets.test.clone(),
    };
    if test.is_empty() {
        return Err(Error::invalid("the test set holds no images"));
    }
    let probs_dir = match &config.save_probs {
        Some(dir) => {
            let dir = dir.join(config.prefix_of(&first));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            Some(dir)
        }
        None => None,
    };
    let eval = Evaluation {
        config,
        networks,
        normalization,
        probs_dir,
        group: group.clone(),
    };
    Ok(Prepared {
        paths,
        parameters,
        eval,
        metas,
        sets,
        test,
        trained_on_it,
    })
}

/// The training configuration whose validation split every member held out, or why there is
/// none (an ensemble of runs with different seeds held out different images, each one part
/// of another member's training data).
fn shared_training(metas: &[CheckpointMeta]) -> std::result::Result<&serde_json::Value, String> {
    let split = |meta: &CheckpointMeta| {
        let t = meta.training.as_ref()?;
        Some((t.get("validation")?.as_u64()?, t.get("seed")?.as_u64()?))
    };
    let first = metas[0]
        .training
        .as_ref()
        .ok_or("the checkpoint records no training run")?;
    if metas.iter().any(|m| split(m) != split(&metas[0])) {
        return Err("the ensemble's members held out different validation images".into());
    }
    Ok(first)
}

/// Temperature scaling fitted on the run's validation split, when there is one.
fn temperature_of(
    prepared: &Prepared,
    preds: &Predictions,
    labels: &[usize],
    progress: &mut dyn FnMut(&str),
) -> Result<Option<TemperatureReport>> {
    // A checkpoint that records no training run (e.g. saved by hand) has no split to use.
    let asked = prepared.eval.config.temperature_scaling && prepared.trained_on_it;
    if !asked || prepared.metas[0].training.is_none() {
        return Ok(None);
    }
    let validation = shared_training(&prepared.metas)
        .and_then(|training| held_out_validation(training, &prepared.sets.train));
    match validation {
        Ok(val) => {
            progress(&format!(
                "{}: fitting a temperature on {} validation images",
                prepared.eval.config.prefix_of(&prepared.paths[0]),
                val.len()
            ));
            let val_preds = prepared.eval.predict("validation", &val, false, true)?;
            Ok(Some(temperature_report(
                &val_preds,
                &labels_of(&val),
                preds,
                labels,
            )?))
        }
        Err(reason) => {
            progress(&format!("note: no temperature scaling: {reason}"));
            Ok(None)
        }
    }
}

/// Evaluates one loaded checkpoint, or an ensemble of them, on every set `config` asks for.
fn evaluate_one(
    config: &EvalConfig,
    members: Vec<Member>,
    shift_files: Option<&Cifar10C>,
    group: &Group,
    progress: &mut dyn FnMut(&str),
) -> Result<EvalReport> {
    let started = Instant::now();
    let prepared = prepare(config, members, group, progress)?;
    let path = prepared.paths[0].as_path();
    let (eval, test) = (&prepared.eval, &prepared.test);
    progress(&format!(
        "{}: predicting {} images x {} samples",
        path.display(),
        test.len(),
        config.samples
    ));
    let preds = eval.predict("clean", test, true, true)?;
    let labels = labels_of(test);
    let ood_preds = match &config.ood {
        Some(source) => {
            let mut rng = seeded_stream(config.seed, "ood-images");
            let ood = ood_images(source, test.shape(), test.classes(), test.len(), &mut rng)?;
            progress(&format!(
                "{}: predicting {} OOD images ({})",
                path.display(),
                ood.len(),
                source.name()
            ));
            Some(eval.predict(&format!("ood-{}", source.name()), &ood, true, true)?)
        }
        None => None,
    };
    let report = compute_report(&preds, &labels, ood_preds.as_ref())?;
    let mut temperature_scaling = temperature_of(&prepared, &preds, &labels, progress)?;
    let temperature = temperature_scaling.as_ref().map(|t| t.temperature);
    let corruptions = match &config.shift {
        Some(source) => eval.shift(source, shift_files, test, temperature, progress)?,
        None => Vec::new(),
    };
    if let Some(ts) = &mut temperature_scaling {
        let scaled: Vec<ScaledMetrics> = corruptions.iter().filter_map(|c| c.scaled).collect();
        ts.corrupted = ScaledMetrics::mean(&scaled);
    }
    let members = match config.ensemble {
        true => prepared.paths.clone(),
        false => Vec::new(),
    };
    let mut report = EvalReport {
        metrics: report,
        checkpoint: path.to_path_buf(),
        members,
        parameters: prepared.parameters,
        samples: config.samples,
        seed: config.seed,
        corruption_mean: CorruptionSummary::of(&corruptions),
        corruptions,
        shift: config.shift.clone(),
        ood: config.ood.clone(),
        temperature_scaling,
        meta: prepared.metas[0].clone(),
        seconds: 0.0,
    };
    if let Some(dir) = config.plots.as_ref().filter(|_| group.is_leader()) {
        let title = format!("{} — T = {}", report_label(&report), config.samples);
        let prefix = dir.join(config.prefix_of(path));
        write_plots(
            &prefix,
            &title,
            &preds,
            &labels,
            ood_preds.as_ref(),
            &report.corruptions,
        )?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The reliability diagram, and the OOD histogram and the shift plot when measured, as PNG
/// and SVG files named `PREFIX-reliability.png` and so on.
fn write_plots(
    prefix: &Path,
    title: &str,
    preds: &Predictions,
    labels: &[usize],
    ood: Option<&Predictions>,
    corruptions: &[CorruptionResult],
) -> Result<()> {
    if let Some(dir) = prefix.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let named = |what: &str, ext: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(format!("-{what}.{ext}"));
        PathBuf::from(name)
    };
    let diagram = ReliabilityDiagram::new(preds.mean(), labels, metrics::DEFAULT_BINS)?;
    for ext in ["png", "svg"] {
        plot_reliability(&diagram, title, &named("reliability", ext))?;
        if let Some(ood) = ood {
            let in_scores = metrics::ood_scores(preds, OodScore::Entropy)?;
            let out_scores = metrics::ood_scores(ood, OodScore::Entropy)?;
            plot_ood_histogram(
                &in_scores,
                &out_scores,
                "predictive entropy (nats)",
                &named("ood", ext),
            )?;
        }
        if !corruptions.is_empty() {
            let points: Vec<CorruptionPoint> = corruptions
                .iter()
                .map(|c| CorruptionPoint {
                    name: c.corruption.name().to_string(),
                    severity: c.severity as u32,
                    accuracy: c.accuracy,
                    ece: c.ece15,
                })
                .collect();
            plot_corruption(&points, &named("shift", ext))?;
        }
    }
    Ok(())
}

/// A side-by-side table of the reports: accuracy, NLL, Brier, ECE-15, and the mean ECE over
/// corrupted sets and the OOD AUROC when measured.
pub fn comparison_table(reports: &[EvalReport]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<46} {:>8} {:>8} {:>8} {:>8} {:>6} {:>8} {:>12} {:>10}",
        "model", "acc", "NLL", "Brier", "ECE-15", "T", "ECE(T)", "shift ECE", "OOD AUROC"
    );
    for r in reports {
        let m = &r.metrics;
        let ts = r.temperature_scaling.as_ref();
        let _ = writeln!(
            s,
            "{:<46} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>6} {:>8} {:>12} {:>10}",
            report_label(r),
            m.accuracy,
            m.nll,
            m.brier,
            m.ece15,
            ts.map_or("-".into(), |t| format!("{:.3}", t.temperature)),
            ts.map_or("-".into(), |t| format!("{:.4}", t.ece15)),
            r.corruption_mean
                .as_ref()
                .map_or("-".into(), |c| format!("{:.4}", c.ece15)),
            m.ood_auroc_entropy
                .map_or("-".into(), |v| format!("{v:.4}")),
        );
    }
    s
}
