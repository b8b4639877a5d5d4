//! The training loop: data -> model -> ELBO / optimiser -> checkpoints and a metrics log.
//!
//! [`train`] runs a [`TrainConfig`] end to end: it loads the data, carves a validation split,
//! builds the network, and trains with the negative ELBO of the method doc (mean NLL +
//! beta · KL / N_train). After every epoch it evaluates on the validation split and writes, in
//! this order, `best.safetensors` (when the validation NLL improved), `last.safetensors`
//! (resumable) and a JSON line of `metrics.jsonl`, so that a crash between any two writes
//! resumes to a consistent run ([`RunFile`]). Ctrl-C saves a resumable checkpoint at the next
//! batch boundary; a NaN or infinite loss or gradient stops the run and keeps the last good
//! checkpoint.

mod config;
mod parameters;
mod preset;
mod progress;
mod run;
mod step;

pub use config::{OptimizerKind, TrainConfig, DEFAULT_DIAGONAL_LR_SCALE};
pub use parameters::{named_parameters, trainable, NamedParameter};
pub use preset::{CIFAR10_WHVI_INITIAL_SIGMA, CIFAR10_WHVI_KL_WEIGHT};
pub use progress::{BarProgress, Progress, QuietProgress, RunFile};
pub use step::{apply_gradients, train_step, StepOutcome, StepSettings};

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::ImageDataset;
use crate::dist::Group;
use crate::metrics::{self, Predictions};
use crate::rng::RngState;
use crate::zoo::BuildOptions;
use crate::{Error, Result};
use run::Run;

/// One line of `metrics.jsonl`: what an epoch did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// Optimisation steps done so far.
    pub step: u64,
    /// Mean training loss (negative ELBO per example) over the epoch.
    pub train_loss: f64,
    /// Mean training NLL over the epoch.
    pub train_nll: f64,
    /// The KL term (sum over layers) at the end of the epoch.
    pub kl: f64,
    /// Training accuracy over the epoch (on augmented images, one posterior sample).
    pub train_accuracy: f64,
    /// Validation accuracy (None without a validation split).
    pub val_accuracy: Option<f64>,
    /// Validation NLL.
    pub val_nll: Option<f64>,
    /// Validation ECE-15.
    pub val_ece: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// KL weight at the end of the epoch.
    pub beta: f64,
    /// Seconds spent in the epoch (training and validation).
    pub seconds: f64,
    /// Training images per second.
    pub images_per_s: f64,
}

/// The state that, with the weights and optimiser tensors, resumes a run bit for bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ResumeState {
    /// Epochs completed.
    epoch: usize,
    /// Batches completed in the current epoch.
    batch_in_epoch: usize,
    /// The shuffling generator before this epoch's order was drawn.
    data_rng_epoch_start: RngState,
    /// The augmentation generator after the last completed batch.
    augment_rng: RngState,
    /// The posterior-noise generator after the last completed batch.
    noise_rng: RngState,
    /// Running sums of the current epoch, so its log line is the same after a resume.
    sums: EpochSums,
    /// Best validation NLL so far.
    best_val_nll: Option<f64>,
    /// The configuration of the run.
    config: TrainConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct EpochSums {
    loss: f64,
    nll: f64,
    /// Correct predictions, averaged over the step's posterior samples (so fractional): a
    /// per-step rounding would bias the accuracy of runs with several samples.
    correct: f64,
    seen: u64,
    seconds: f64,
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The per-epoch logs of this invocation.
    pub epochs: Vec<EpochLog>,
    /// `OUT/last.safetensors`.
    pub last_checkpoint: PathBuf,
    /// `OUT/best.safetensors` (best validation NLL; the last one without validation).
    pub best_checkpoint: PathBuf,
    /// Metrics of the final network on the test set (mean predictive over T samples).
    pub test_report: Option<metrics::MetricsReport>,
}

/// The data decide a trained network's input shape and classes (a spec's class count is only
/// the default for building without data, so the zoo's heads fit CIFAR-100 as they fit
/// CIFAR-10): a --classes or --input given for training that disagrees with them is refused
/// rather than silently replaced.
fn check_matches_data(options: &BuildOptions, input: [usize; 3], classes: usize) -> Result<()> {
    if let Some(asked) = options.input.filter(|asked| *asked != input) {
        return Err(Error::invalid(format!(
            "--input {} but the training images are {}x{}x{}; leave --input out when \
             training (the data set decides it)",
            asked.map(|v| v.to_string()).join(","),
            input[0],
            input[1],
            input[2]
        )));
    }
    if let Some(asked) = options.classes.filter(|asked| *asked != classes) {
        return Err(Error::invalid(format!(
            "--classes {asked} but the training set has {classes} classes; leave --classes \
             out when training (the data set decides it)"
        )));
    }
    Ok(())
}

/// Refuses to start a new run in a directory that holds one.
fn refuse_existing_run(out: &Path) -> Result<()> {
    let (last, best, log) = paths(out);
    let found: Vec<String> = [last, best, log]
        .iter()
        .filter(|p| p.exists())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{} already holds a training run ({}); continue it with --resume, replace it with \
         --overwrite, or train into another --out directory",
        out.display(),
        found.join(", ")
    )))
}

/// Where a run writes.
fn paths(out: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        out.join("last.safetensors"),
        out.join("best.safetensors"),
        out.join("metrics.jsonl"),
    )
}

/// How [`train`] treats the output directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run: refused when the directory already holds one, so that nothing is lost.
    New,
    /// Continue the run saved in `OUT/last.safetensors` (same configuration) exactly where it
    /// stopped.
    Resume,
    /// A new run that replaces the one in the directory (its log and checkpoints).
    Replace,
}

/// Trains as `config` says, writing into `config.out`, started as `start` says.
///
/// `stop` is polled between batches (set it from a Ctrl-C handler); when set, a resumable
/// checkpoint is written and [`Error::Interrupted`] returned.
pub fn train(
    config: &TrainConfig,
    start: Start,
    device: &Device,
    progress: &mut dyn Progress,
    stop: Arc<AtomicBool>,
) -> Result<TrainOutcome> {
    train_in_group(config, start, device, &Group::solo(), progress, stop)
}

/// [`train`] as one rank of `group` (e.g. [`Group::from_environment`] under `mpirun`): every
/// rank runs this with the same `config`, computes its shard of each global batch of
/// `config.batch_size`, and all make the same updates (see [`crate::dist`]). Only rank 0
/// validates, writes the checkpoints and the log, reports `progress` and returns a test
/// report; a resumed run reads the same `last.safetensors` on every rank.
pub fn train_in_group(
    config: &TrainConfig,
    start: Start,
    device: &Device,
    group: &Group,
    progress: &mut dyn Progress,
    stop: Arc<AtomicBool>,
) -> Result<TrainOutcome> {
    let mut quiet = QuietProgress;
    let progress: &mut dyn Progress = match group.is_leader() {
        true => progress,
        false => &mut quiet,
    };
    let mut run = Run::set_up(config, start, device, group, progress)?;
    let started = Instant::now();
    let mut logs = Vec::new();
    while run.state.epoch < config.epochs {
        let Some(data_rng) = run.epoch(progress, &stop)? else {
            return Err(run.interrupt(progress)?);
        };
        logs.push(run.end_epoch(progress, data_rng)?);
        if let Some(limit) = config.time_limit_minutes {
            // The leader's clock decides (it also validates), so that all ranks stop together.
            let out_of_time = group.is_leader() && started.elapsed().as_secs_f64() > limit * 60.0;
            if group.any(out_of_time) && run.state.epoch < config.epochs {
                progress.message(&format!(
                    "time limit of {limit} minutes reached after epoch {}",
                    run.state.epoch
                ));
                break;
            }
        }
    }
    Ok(TrainOutcome {
        epochs: logs,
        test_report: run.test_report(device)?,
        last_checkpoint: run.last_path,
        best_checkpoint: run.best_path,
    })
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.4}"))
}

/// Accuracy, NLL and ECE-15 of predictions on a labelled set.
fn summary(preds: &Predictions, data: &ImageDataset) -> Result<(f64, f64, f64)> {
    let labels: Vec<usize> = data.labels().iter().map(|&l| l as usize).collect();
    let probs = preds.mean();
    Ok((
        metrics::accuracy(probs, &labels)?,
        metrics::nll(probs, &labels)?,
        metrics::ece(probs, &labels, 15)?,
    ))
}

/// Makes `metrics.jsonl` hold exactly one line for each of the `epochs` epochs that `last`
/// committed: a crash after `last` and before the log line leaves the line out (it is restored
/// from `last_metrics`, the epoch's log stored in `last`), and lines of epochs past `last` or a
/// torn last line are dropped. Rewritten atomically, and only when something changes.
fn reconcile_log(
    path: &Path,
    epochs: usize,
    last_metrics: Option<&serde_json::Value>,
) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let epoch_of = |v: &serde_json::Value| v.get("epoch").and_then(|e| e.as_u64());
    let mut kept: Vec<&str> = Vec::new();
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match epoch_of(&value) {
            Some(e) if e as usize == kept.len() + 1 && (e as usize) <= epochs => kept.push(line),
            _ => {}
        }
    }
    let mut lines: Vec<String> = kept.iter().map(|l| l.to_string()).collect();
    if lines.len() + 1 == epochs {
        let restored = last_metrics
            .filter(|m| epoch_of(m) == Some(epochs as u64))
            .and_then(|m| serde_json::from_value::<EpochLog>(m.clone()).ok());
        if let Some(log) = restored {
            // Through `EpochLog`, so the line reads exactly as `append_log` writes it.
            lines.push(serde_json::to_string(&log).map_err(|e| Error::invalid(e.to_string()))?);
        }
    }
    let rewritten: String = lines.iter().map(|l| format!("{l}\n")).collect();
    if rewritten == text {
        return Ok(());
    }
    crate::checkpoint::write_atomic(path, |w| w.write_all(rewritten.as_bytes()))
}

fn append_log(path: &Path, log: &EpochLog) -> Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(log).map_err(|e| Error::invalid(e.to_string()))?;
    writeln!(file, "{line}").map_err(|e| Error::io(path, e))
}
