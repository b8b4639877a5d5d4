//! Evaluation of saved Bayesian checkpoints: calibration and uncertainty on the clean test
//! set, under dataset shift (corruptions), and for out-of-distribution detection.
//!
//! [`evaluate`] loads each checkpoint, predicts with T posterior samples, and returns one
//! [`EvalReport`] per checkpoint whose top-level keys are those of `whvi metrics`
//! ([`MetricsReport`]) for the clean test set.

mod corrupt;
mod predict;

pub use corrupt::{corrupt_dataset, Corruption};
pub use predict::{mean_logits, predict, PredictOptions};

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{write_atomic, Checkpoint, CheckpointMeta, Checksum, LoadedModel};
use crate::data::{self, DatasetKind, ImageDataset, Normalization, Resize};
use crate::metrics::{
    self, apply_temperature, compute_report, fit_temperature_from_probs, plot_corruption,
    plot_ood_histogram, plot_reliability, CorruptionPoint, Logits, MetricsReport, OodScore,
    Predictions, ReliabilityDiagram,
};
use crate::output::check_output;
use crate::rng::{seeded, WhviRng};
use crate::zoo::{BayesPolicy, Method};
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
}

impl OodSource {
    /// Parses `noise`, `KIND` or `KIND:PATH` (KIND one of cifar10, mnist, fashion-mnist).
    pub fn parse(text: &str) -> Result<Self> {
        if text == "noise" {
            return Ok(OodSource::Noise);
        }
        let (kind, path) = match text.split_once(':') {
            Some((k, p)) => (k, Some(PathBuf::from(p))),
            None => (text, None),
        };
        let kind = match kind {
            "cifar10" => DatasetKind::Cifar10,
            "mnist" => DatasetKind::Mnist,
            "fashion-mnist" => DatasetKind::FashionMnist,
            other => {
                return Err(Error::invalid(format!(
                    "--ood {other}: use noise, cifar10[:PATH], mnist:PATH or fashion-mnist[:DIR]"
                )))
            }
        };
        Ok(OodSource::Dataset { kind, path })
    }
}

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// The checkpoints to evaluate (several give a side-by-side table).
    pub checkpoints: Vec<PathBuf>,
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
    /// Corruptions to evaluate (empty: none).
    pub corruptions: Vec<Corruption>,
    /// Images per corrupted set (the first N of the test set), to keep CPU runs short.
    pub corruption_images: usize,
    /// An out-of-distribution set.
    pub ood: Option<OodSource>,
    /// Directory for the plots (PNG and SVG).
    pub plots: Option<PathBuf>,
    /// Fit a temperature on the training run's validation split and report the test metrics
    /// after scaling as well.
    pub temperature_scaling: bool,
    /// Write the JSON report here (one object, or an array for several checkpoints),
    /// atomically. Never over one of the inputs; over an existing file only with `overwrite`.
    pub report: Option<PathBuf>,
    /// Let `report` replace an existing file.
    pub overwrite: bool,
    /// Whether the checkpoints' checksums are verified.
    pub checksum: Checksum,
}

impl EvalConfig {
    /// Checks every setting that does not need the data, so that a mistake is reported before
    /// the first forward pass rather than after the first checkpoint's evaluation.
    pub fn validate(&self) -> Result<()> {
        if self.checkpoints.is_empty() {
            return Err(Error::invalid("give at least one checkpoint to evaluate"));
        }
        for (value, name) in [
            (self.samples, "--samples"),
            (self.batch_size, "--batch-size"),
        ] {
            if value == 0 {
                return Err(Error::invalid(format!("{name} must be at least 1")));
            }
        }
        if !self.corruptions.is_empty() && self.corruption_images == 0 {
            return Err(Error::invalid(
                "--corruption-images must be at least 1 when corruptions are asked for",
            ));
        }
        if let Some(OodSource::Dataset { kind, path }) = &self.ood {
            match path {
                Some(path) if !path.exists() => {
                    return Err(Error::data(path, "the --ood data set is not there"))
                }
                None if *kind == DatasetKind::Mnist => {
                    return Err(Error::invalid(
                        "--ood mnist needs its directory: --ood mnist:DIR (the four idx files)",
                    ))
                }
                _ => {}
            }
        }
        if let Some(report) = &self.report {
            let mut inputs: Vec<&Path> = self.checkpoints.iter().map(PathBuf::as_path).collect();
            inputs.extend(self.data.as_deref());
            if let Some(OodSource::Dataset {
                path: Some(path), ..
            }) = &self.ood
            {
                inputs.push(path);
            }
            check_output(report, &inputs, self.overwrite, "--report")?;
        }
        Ok(())
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
}

/// One corrupted test set's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorruptionResult {
    /// The corruption.
    pub corruption: Corruption,
    /// Severity 1-5.
    pub severity: usize,
    /// Accuracy.
    pub accuracy: f64,
    /// NLL.
    pub nll: f64,
    /// ECE-15.
    pub ece15: f64,
}

/// Means over every corruption and severity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorruptionSummary {
    /// Mean accuracy.
    pub accuracy: f64,
    /// Mean NLL.
    pub nll: f64,
    /// Mean ECE-15.
    pub ece15: f64,
}

/// The evaluation of one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Clean test-set metrics (and OOD detection when an OOD set was given), at the top level.
    #[serde(flatten)]
    pub metrics: MetricsReport,
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Posterior samples T.
    pub samples: usize,
    /// Seed of the evaluation.
    pub seed: u64,
    /// Per corruption and severity.
    pub corruptions: Vec<CorruptionResult>,
    /// Means over the corruptions.
    pub corruption_mean: Option<CorruptionSummary>,
    /// The OOD set used.
    pub ood: Option<OodSource>,
    /// Temperature scaling, when the checkpoint records its validation split.
    pub temperature_scaling: Option<TemperatureReport>,
    /// The checkpoint's metadata.
    pub meta: CheckpointMeta,
    /// Seconds spent.
    pub seconds: f64,
}

fn labels_of(data: &ImageDataset) -> Vec<usize> {
    data.labels().iter().map(|&l| usize::from(l)).collect()
}

fn first(data: &ImageDataset, n: Option<usize>) -> Result<ImageDataset> {
    match n {
        Some(n) if n < data.len() => data.subset(&(0..n).collect::<Vec<_>>()),
        _ => Ok(data.clone()),
    }
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

/// Loads the OOD images in the model's input shape.
fn ood_images(
    source: &OodSource,
    shape: (usize, usize, usize),
    classes: &[String],
    n: usize,
    rng: &mut WhviRng,
) -> Result<ImageDataset> {
    match source {
        OodSource::Noise => uniform_noise(n, shape, classes, rng),
        OodSource::Dataset { kind, path } => {
            let test = first(&data::load(*kind, path.as_deref())?.test, Some(n))?;
            let (c, h, w) = shape;
            if test.shape() == shape {
                return Ok(test);
            }
            let resize = if test.height() <= h && test.width() <= w {
                Resize::Pad
            } else {
                Resize::Bilinear
            };
            test.convert(c, h, w, resize)
        }
    }
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

/// The name of the folder a checkpoint is in (its run), also for a bare file name.
fn run_name(path: &Path) -> Option<String> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    dir.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The file-name prefix of a checkpoint's plots: `RUN-STEM`, or `STEM` outside any folder.
fn plot_prefix(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    match run_name(path) {
        Some(run) => format!("{run}-{stem}"),
        None => stem,
    }
}

/// The validation images a training run held out, from the run's recorded configuration
/// (`None` when it used none or does not record it).
fn held_out_validation(
    training: &serde_json::Value,
    train: &ImageDataset,
) -> Result<Option<ImageDataset>> {
    let field = |name: &str| training.get(name).and_then(|v| v.as_u64());
    match (field("validation"), field("seed")) {
        (Some(n), Some(seed)) if n > 0 => {
            let (_, val) = crate::train::validation_split(train, n as usize, seed)?;
            Ok((!val.is_empty()).then_some(val))
        }
        _ => Ok(None),
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
    let scaled = apply_temperature(&Logits::from_probs(test.mean()), fit.temperature)?;
    Ok(TemperatureReport {
        temperature: fit.temperature,
        validation_images: validation_labels.len(),
        validation_nll: [fit.nll_before, fit.nll_after],
        nll: metrics::nll(&scaled, test_labels)?,
        ece15: metrics::ece(&scaled, test_labels, metrics::DEFAULT_BINS)?,
        brier: metrics::brier(&scaled, test_labels)?,
    })
}

/// Evaluates every checkpoint of `config` on `device`; `progress` receives a line per stage.
pub fn evaluate(
    config: &EvalConfig,
    device: &Device,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<EvalReport>> {
    config.validate()?;
    // Every checkpoint is loaded before any is evaluated: a bad second file is reported
    // before the first one's work is done.
    let mut models = Vec::new();
    for path in &config.checkpoints {
        models.push((
            path,
            Checkpoint::load_with(path, device, DType::F32, config.checksum)?,
        ));
    }
    let mut reports = Vec::new();
    for (path, LoadedModel { network, meta, .. }) in models {
        let started = Instant::now();
        let training: Option<(DatasetKind, Option<PathBuf>)> =
            meta.training.as_ref().and_then(|t| {
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
        let data_path = config.data.clone().or_else(|| {
            training
                .as_ref()
                .filter(|t| t.0 == kind)
                .and_then(|t| t.1.clone())
        });
        progress(&format!("{}: loading {kind} data", path.display()));
        let sets = data::load(kind, data_path.as_deref())?;
        for note in &sets.notes {
            progress(&format!("note: {note}"));
        }
        let test = first(&sets.test, config.limit)?;
        if test.is_empty() {
            return Err(Error::invalid("the test set holds no images"));
        }
        let normalization = meta
            .normalization
            .clone()
            .unwrap_or_else(|| Normalization::for_kind(kind));
        let options = PredictOptions {
            samples: config.samples,
            batch_size: config.batch_size,
            keep_samples: true,
        };
        let mut rng = seeded(config.seed);
        progress(&format!(
            "{}: predicting {} images x {} samples",
            path.display(),
            test.len(),
            config.samples
        ));
        let preds = predict(&network, &test, &normalization, options, &mut rng, |_| {})?;
        let labels = labels_of(&test);
        let ood_preds = match &config.ood {
            Some(source) => {
                let ood = ood_images(source, test.shape(), test.classes(), test.len(), &mut rng)?;
                progress(&format!(
                    "{}: predicting {} OOD images",
                    path.display(),
                    ood.len()
                ));
                Some(predict(
                    &network,
                    &ood,
                    &normalization,
                    options,
                    &mut rng,
                    |_| {},
                )?)
            }
            None => None,
        };
        let report = compute_report(&preds, &labels, ood_preds.as_ref())?;
        let temperature_scaling = match (config.temperature_scaling, &meta.training) {
            (true, Some(training)) if training_kind == Some(kind) => {
                let validation = held_out_validation(training, &sets.train)?;
                match validation {
                    Some(val) => {
                        progress(&format!(
                            "{}: fitting a temperature on {} validation images",
                            path.display(),
                            val.len()
                        ));
                        let val_preds =
                            predict(&network, &val, &normalization, options, &mut rng, |_| {})?;
                        Some(temperature_report(
                            &val_preds,
                            &labels_of(&val),
                            &preds,
                            &labels,
                        )?)
                    }
                    None => None,
                }
            }
            _ => None,
        };

        let mut corruptions = Vec::new();
        let corrupted_base = first(&test, Some(config.corruption_images))?;
        for &corruption in &config.corruptions {
            for severity in 1..=5 {
                progress(&format!(
                    "{}: {} severity {severity}",
                    path.display(),
                    corruption.name()
                ));
                let shifted = corrupt_dataset(&corrupted_base, corruption, severity, &mut rng)?;
                let p = predict(
                    &network,
                    &shifted,
                    &normalization,
                    PredictOptions {
                        keep_samples: false,
                        ..options
                    },
                    &mut rng,
                    |_| {},
                )?;
                let l = labels_of(&shifted);
                corruptions.push(CorruptionResult {
                    corruption,
                    severity,
                    accuracy: metrics::accuracy(p.mean(), &l)?,
                    nll: metrics::nll(p.mean(), &l)?,
                    ece15: metrics::ece(p.mean(), &l, metrics::DEFAULT_BINS)?,
                });
            }
        }
        let corruption_mean = (!corruptions.is_empty()).then(|| {
            let n = corruptions.len() as f64;
            CorruptionSummary {
                accuracy: corruptions.iter().map(|c| c.accuracy).sum::<f64>() / n,
                nll: corruptions.iter().map(|c| c.nll).sum::<f64>() / n,
                ece15: corruptions.iter().map(|c| c.ece15).sum::<f64>() / n,
            }
        });

        if let Some(dir) = &config.plots {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            let prefix = plot_prefix(path);
            let diagram = ReliabilityDiagram::new(preds.mean(), &labels, metrics::DEFAULT_BINS)?;
            for ext in ["png", "svg"] {
                plot_reliability(
                    &diagram,
                    &format!("{} — T = {}", label(path, &meta), config.samples),
                    &dir.join(format!("{prefix}-reliability.{ext}")),
                )?;
                if let Some(ood) = &ood_preds {
                    let in_scores = metrics::ood_scores(&preds, OodScore::Entropy)?;
                    let out_scores = metrics::ood_scores(ood, OodScore::Entropy)?;
                    plot_ood_histogram(
                        &in_scores,
                        &out_scores,
                        "predictive entropy (nats)",
                        &dir.join(format!("{prefix}-ood.{ext}")),
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
                    plot_corruption(&points, &dir.join(format!("{prefix}-shift.{ext}")))?;
                }
            }
        }
        reports.push(EvalReport {
            metrics: report,
            checkpoint: path.clone(),
            samples: config.samples,
            seed: config.seed,
            corruptions,
            corruption_mean,
            ood: config.ood.clone(),
            temperature_scaling,
            meta,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    if let Some(report) = &config.report {
        write_report(report, &reports)?;
    }
    Ok(reports)
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
            label(&r.checkpoint, &r.meta),
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
