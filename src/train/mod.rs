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
mod preset;
mod progress;
mod step;

pub use config::{OptimizerKind, TrainConfig, DEFAULT_DIAGONAL_LR_SCALE};
pub use progress::{BarProgress, Progress, QuietProgress, RunFile};
pub use step::{apply_gradients, train_step, StepOutcome, StepSettings};

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::data::{self, shuffled_order, Augment, Batches, ImageDataset};
use crate::metrics::{self, Predictions};
use crate::optim::{AnyOptimizer, NamedOptimizer};
use crate::params::Params;
use crate::rng::{seeded, RngState};
use crate::zoo::{predict, BuildOptions, ModelSpec, Network, PredictOptions};
use crate::{Error, Result};

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
    config.validate()?;
    let (last_path, best_path, log_path) = paths(&config.out);
    let resume = start == Start::Resume;
    if start == Start::New {
        refuse_existing_run(&config.out)?;
    }

    let data = data::load(config.dataset, config.data.as_deref())?;
    for note in &data.notes {
        progress.message(&format!("note: {note}"));
    }
    let normalization = data::Normalization::for_kind(config.dataset);
    let (train_set, val_set) = data::validation_split(&data.train, config.validation, config.seed)?;
    let spec = ModelSpec::lookup(&config.model)?;
    let mut options = config.build.clone();
    let (c, h, w) = train_set.shape();
    check_matches_data(&options, [c, h, w], train_set.num_classes())?;
    options.input = Some([c, h, w]);
    options.classes = Some(train_set.num_classes());
    crate::zoo::check_fits_in_memory(&crate::zoo::plan(&spec, &options)?, 4)?;

    // Build fresh, or from the checkpoint being resumed.
    let (params, mut state, optimizer_state) = if resume {
        let checkpoint = Checkpoint::read(&last_path, device)?;
        let state: ResumeState = match &checkpoint.meta.resume {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                Error::checkpoint(&last_path, format!("resume state does not parse: {e}"))
            })?,
            None => {
                return Err(Error::checkpoint(
                    &last_path,
                    "holds no resume state (it was saved for inference only)",
                ))
            }
        };
        let differences = state.config.resume_differences(config);
        if !differences.is_empty() {
            return Err(Error::invalid(format!(
                "--resume: {} was written by a run with another configuration ({}); resume with \
                 the same settings, or train into a new --out directory",
                last_path.display(),
                differences.join("; ")
            )));
        }
        // From here on the run lives where it is now (it may have been moved).
        let mut state = state;
        state.config = config.clone();
        reconcile_log(&log_path, state.epoch, checkpoint.meta.metrics.as_ref())?;
        let params = Params::from_tensors(checkpoint.weights)?;
        (params, state, checkpoint.optimizer)
    } else {
        let state = ResumeState {
            epoch: 0,
            batch_in_epoch: 0,
            data_rng_epoch_start: RngState::capture(&seeded(config.seed ^ 0xda7a)),
            augment_rng: RngState::capture(&seeded(config.seed ^ 0xa46e)),
            noise_rng: RngState::capture(&seeded(config.seed ^ 0x4015e)),
            sums: EpochSums::default(),
            best_val_nll: None,
            config: config.clone(),
        };
        if log_path.exists() {
            std::fs::remove_file(&log_path).map_err(|e| Error::io(&log_path, e))?;
        }
        (Params::new(config.seed), state, Default::default())
    };
    let network = Network::build(&spec, &options, params.var_builder(DType::F32, device))?;
    // Only now: a run that fails on its data or its network leaves no empty directory behind.
    std::fs::create_dir_all(&config.out).map_err(|e| Error::io(&config.out, e))?;
    let mut optimizer = AnyOptimizer::from_named(trainable(&params), config.optimizer_config())?;
    if resume {
        optimizer.load_state(optimizer_state)?;
    }

    let mut meta = CheckpointMeta::new(spec.clone(), options.clone(), train_set.classes().to_vec());
    meta.normalization = Some(normalization.clone());
    meta.training = Some(serde_json::to_value(config).map_err(|e| Error::invalid(e.to_string()))?);
    meta.seed = Some(config.seed);

    let n_train = train_set.len();
    let batches_per_epoch = n_train / config.batch_size;
    if batches_per_epoch == 0 {
        return Err(Error::invalid(format!(
            "the training set has {n_train} images, fewer than one batch of {}; use a smaller \
             --batch-size",
            config.batch_size
        )));
    }
    if state.batch_in_epoch > batches_per_epoch {
        return Err(Error::invalid(format!(
            "--resume: the run stopped after batch {} of an epoch, but an epoch of the training \
             set now has {batches_per_epoch} batches ({n_train} images): the data at the run's \
             path changed; resume with the data it was trained on",
            state.batch_in_epoch
        )));
    }
    let total_steps = (batches_per_epoch as u64).saturating_mul(config.epochs as u64);
    let augment = if config.augment {
        Augment::for_kind(config.dataset)
    } else {
        Augment::NONE
    };
    let started = Instant::now();
    let mut logs = Vec::new();

    while state.epoch < config.epochs {
        let epoch_start = Instant::now();
        let mut data_rng = state.data_rng_epoch_start.restore();
        let order = shuffled_order(n_train, &mut data_rng);
        let mut augment_rng = state.augment_rng.restore();
        let mut noise_rng = state.noise_rng.restore();
        let done = state.batch_in_epoch * config.batch_size;
        let batches = Batches::new(
            &train_set,
            order[done..].to_vec(),
            config.batch_size,
            &normalization,
            device,
        )?
        .drop_last(true)
        .augment(augment, &mut augment_rng);
        progress.start_epoch(
            state.epoch + 1,
            config.epochs,
            batches_per_epoch,
            state.batch_in_epoch,
        );

        let mut interrupted = false;
        for batch in batches {
            let (images, labels) = batch?;
            let step = optimizer.step_count();
            let lr = config.schedule.lr_at(step, total_steps);
            optimizer.set_learning_rate(lr);
            let epoch_progress =
                state.epoch as f64 + state.batch_in_epoch as f64 / batches_per_epoch as f64;
            let beta = config.kl_warmup.beta(epoch_progress);

            let settings = StepSettings {
                n_train,
                beta,
                mc_samples: config.mc_samples,
                clip_grad: config.clip_grad,
            };
            let outcome = match train_step(
                &network,
                &mut optimizer,
                &images,
                &labels,
                settings,
                &mut noise_rng,
            ) {
                Err(Error::Diverged(what)) => {
                    return Err(Error::Diverged(format!(
                        "{what} at epoch {}, step {step}; the last good checkpoint is {}. Lower \
                         the learning rate (--lr) or add gradient clipping (--clip-grad 1.0)",
                        state.epoch + 1,
                        last_path.display()
                    )))
                }
                other => other?,
            };

            let b = labels.dim(0)? as u64;
            state.sums.loss += outcome.loss * b as f64;
            state.sums.nll += outcome.nll * b as f64;
            state.sums.correct += outcome.correct;
            state.sums.seen += b;
            state.batch_in_epoch += 1;
            progress.batch(
                state.batch_in_epoch,
                state.sums.loss / state.sums.seen as f64,
                state.sums.correct / state.sums.seen as f64,
            );
            if stop.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
        }
        state.augment_rng = RngState::capture(&augment_rng);
        state.noise_rng = RngState::capture(&noise_rng);
        state.sums.seconds += epoch_start.elapsed().as_secs_f64();

        if interrupted {
            meta.epoch = state.epoch;
            meta.step = optimizer.step_count();
            save_last(&last_path, &mut meta, &params, &optimizer, &state)?;
            progress.finish_epoch("interrupted");
            return Err(Error::Interrupted(format!(
                "saved a resumable checkpoint at epoch {}, batch {}: {}; continue with --resume",
                state.epoch + 1,
                state.batch_in_epoch,
                last_path.display()
            )));
        }

        // End of epoch: validate, log, checkpoint.
        let (val_accuracy, val_nll, val_ece) = if val_set.is_empty() {
            (None, None, None)
        } else {
            let mut eval_rng = seeded(config.seed ^ (state.epoch as u64 + 1) << 20);
            let preds = predict(
                &network,
                &val_set,
                &normalization,
                PredictOptions {
                    samples: config.eval_samples,
                    batch_size: config.batch_size.max(128),
                    keep_samples: false,
                },
                &mut eval_rng,
                |_| {},
            )?;
            let (acc, nll, ece) = summary(&preds, &val_set)?;
            (Some(acc), Some(nll), Some(ece))
        };
        let seconds = state.sums.seconds;
        let log = EpochLog {
            epoch: state.epoch + 1,
            step: optimizer.step_count(),
            train_loss: state.sums.loss / state.sums.seen as f64,
            train_nll: state.sums.nll / state.sums.seen as f64,
            kl: network.kl()?.to_scalar::<f32>()? as f64,
            train_accuracy: state.sums.correct / state.sums.seen as f64,
            val_accuracy,
            val_nll,
            val_ece,
            lr: optimizer.learning_rate(),
            beta: config.kl_warmup.beta((state.epoch + 1) as f64),
            seconds,
            images_per_s: state.sums.seen as f64 / seconds.max(1e-9),
        };
        progress.finish_epoch(&format!(
            "epoch {}: loss {:.4}, val acc {}, val NLL {}, val ECE {}",
            log.epoch,
            log.train_loss,
            fmt_opt(log.val_accuracy),
            fmt_opt(log.val_nll),
            fmt_opt(log.val_ece)
        ));
        state.epoch += 1;
        state.batch_in_epoch = 0;
        state.data_rng_epoch_start = RngState::capture(&data_rng);
        state.sums = EpochSums::default();
        let improved = match (val_nll, state.best_val_nll) {
            (Some(v), Some(best)) => v < best,
            (Some(_), None) => true,
            (None, _) => true,
        };
        if improved {
            state.best_val_nll = val_nll;
        }
        meta.epoch = state.epoch;
        meta.step = optimizer.step_count();
        meta.metrics = Some(serde_json::to_value(&log).map_err(|e| Error::invalid(e.to_string()))?);
        // Best, then last (the commit point), then the log line: see `RunFile`.
        if improved {
            let mut best = meta.clone();
            best.resume = None;
            Checkpoint::save(&best_path, &best, &params, &[])?;
            progress.saved(RunFile::Best);
        }
        save_last(&last_path, &mut meta, &params, &optimizer, &state)?;
        progress.saved(RunFile::Last);
        append_log(&log_path, &log)?;
        progress.saved(RunFile::Log);
        logs.push(log);
        if let Some(limit) = config.time_limit_minutes {
            if started.elapsed().as_secs_f64() > limit * 60.0 && state.epoch < config.epochs {
                progress.message(&format!(
                    "time limit of {limit} minutes reached after epoch {}",
                    state.epoch
                ));
                break;
            }
        }
    }

    let test_report = if config.test_samples > 0 {
        let loaded = Checkpoint::load(&best_path, device)?;
        let mut rng = seeded(config.seed ^ 0x7e57);
        let preds = predict(
            &loaded.network,
            &data.test,
            &normalization,
            PredictOptions {
                samples: config.test_samples,
                batch_size: 256,
                keep_samples: true,
            },
            &mut rng,
            |_| {},
        )?;
        let labels: Vec<usize> = data.test.labels().iter().map(|&l| l as usize).collect();
        Some(metrics::compute_report(&preds, &labels, None)?)
    } else {
        None
    };
    Ok(TrainOutcome {
        epochs: logs,
        last_checkpoint: last_path,
        best_checkpoint: best_path,
        test_report,
    })
}

/// The parameters an optimiser updates: all but the running BatchNorm statistics (buffers).
pub fn trainable(params: &Params) -> Vec<(String, candle_core::Var)> {
    params
        .named_vars()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
        .collect()
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

fn save_last(
    path: &Path,
    meta: &mut CheckpointMeta,
    params: &Params,
    optimizer: &AnyOptimizer,
    state: &ResumeState,
) -> Result<()> {
    meta.resume = Some(serde_json::to_value(state).map_err(|e| Error::invalid(e.to_string()))?);
    Checkpoint::save(path, meta, params, &optimizer.state())
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
