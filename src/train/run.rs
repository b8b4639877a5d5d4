//! One training run's stages: set-up (fresh or resumed), an epoch of optimisation steps, and
//! the end of an epoch (validate, log, checkpoint), then the test report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;

use super::{
    append_log, check_matches_data, fmt_opt, named_parameters, paths, reconcile_log,
    refuse_existing_run, summary, train_step, trainable, EpochLog, EpochSums, Progress,
    ResumeState, RunFile, Start, StepSettings, TrainConfig,
};
use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::data::{self, shuffled_order, Augment, Batches, ImageDataset, Normalization};
use crate::dist::Group;
use crate::metrics::{self, MetricsReport};
use crate::optim::{AnyOptimizer, NamedOptimizer};
use crate::params::Params;
use crate::rng::{seeded, RngState};
use crate::zoo::{predict, ModelSpec, Network, PredictOptions};
use crate::{Error, Result};

/// What the epochs of a run share.
pub(super) struct Run<'a> {
    config: &'a TrainConfig,
    pub(super) last_path: PathBuf,
    pub(super) best_path: PathBuf,
    log_path: PathBuf,
    train_set: ImageDataset,
    val_set: ImageDataset,
    test_set: ImageDataset,
    normalization: Normalization,
    params: Params,
    network: Network,
    optimizer: AnyOptimizer,
    meta: CheckpointMeta,
    pub(super) state: ResumeState,
    batches_per_epoch: usize,
    total_steps: u64,
    augment: Augment,
    /// The ranks this run is split over; only the leader writes files.
    pub(super) group: Group,
}

impl<'a> Run<'a> {
    /// Loads the data, builds the network (fresh, or from the checkpoint being resumed) and
    /// its optimiser, and checks that an epoch holds at least one batch.
    pub(super) fn set_up(
        config: &'a TrainConfig,
        start: Start,
        device: &Device,
        group: &Group,
        progress: &mut dyn Progress,
    ) -> Result<Self> {
        config.validate()?;
        check_group(config, device, group)?;
        let group = &group.on_device(device)?;
        let leader = group.is_leader();
        let (last_path, best_path, log_path) = paths(&config.out);
        if start == Start::New && leader {
            refuse_existing_run(&config.out)?;
        }
        let data = data::load(config.dataset, config.data.as_deref())?;
        for note in &data.notes {
            progress.message(&format!("note: {note}"));
        }
        let normalization = Normalization::for_kind(config.dataset);
        let (train_set, val_set) =
            data::validation_split(&data.train, config.validation, config.seed)?;
        let spec = ModelSpec::lookup(&config.model)?;
        let mut options = config.build.clone();
        let (c, h, w) = train_set.shape();
        check_matches_data(&options, [c, h, w], train_set.num_classes())?;
        options.input = Some([c, h, w]);
        options.classes = Some(train_set.num_classes());
        crate::zoo::check_fits_in_memory(&crate::zoo::plan(&spec, &options)?, 4)?;

        let (params, state, optimizer_state) = match start {
            Start::Resume => resumed(config, &last_path, leader.then_some(&log_path), device)?,
            Start::New | Start::Replace => fresh(config, leader.then_some(&log_path))?,
        };
        group.check_same(
            "settings or data",
            settings_checksum(config, &train_set, &state)?,
        )?;
        let network = Network::build(&spec, &options, params.var_builder(DType::F32, device))?;
        let parameters = named_parameters(&params, &network.parameters())?;
        // Only now: a run that fails on its data or its network leaves no empty directory.
        if leader {
            std::fs::create_dir_all(&config.out).map_err(|e| Error::io(&config.out, e))?;
        }
        let mut optimizer =
            AnyOptimizer::from_named(trainable(&parameters), config.optimizer_config(&parameters))?;
        if start == Start::Resume {
            optimizer.load_state(optimizer_state)?;
        }
        let mut meta = CheckpointMeta::new(spec, options, train_set.classes().to_vec());
        meta.normalization = Some(normalization.clone());
        meta.training =
            Some(serde_json::to_value(config).map_err(|e| Error::invalid(e.to_string()))?);
        meta.seed = Some(config.seed);
        let batches_per_epoch = batches_per_epoch(&train_set, config, &state)?;
        Ok(Run {
            config,
            last_path,
            best_path,
            log_path,
            val_set,
            test_set: data.test,
            normalization,
            params,
            network,
            optimizer,
            meta,
            state,
            batches_per_epoch,
            total_steps: (batches_per_epoch as u64).saturating_mul(config.epochs as u64),
            augment: match config.augment {
                true => Augment::for_kind(config.dataset),
                false => Augment::NONE,
            },
            train_set,
            group: group.clone(),
        })
    }

    /// Trains the rest of the current epoch. `Some` (the shuffling generator after this
    /// epoch's draw) when it is complete, `None` when `stop` ended it early.
    pub(super) fn epoch(
        &mut self,
        progress: &mut dyn Progress,
        stop: &AtomicBool,
    ) -> Result<Option<RngState>> {
        let (config, state) = (self.config, &mut self.state);
        let epoch_start = Instant::now();
        let mut data_rng = state.data_rng_epoch_start.restore();
        let order = shuffled_order(self.train_set.len(), &mut data_rng);
        let mut augment_rng = state.augment_rng.restore();
        let mut noise_rng = state.noise_rng.restore();
        let done = state.batch_in_epoch * config.batch_size;
        let batches = Batches::new(
            &self.train_set,
            order[done..].to_vec(),
            config.batch_size,
            &self.normalization,
            self.network.device(),
        )?
        .drop_last(true)
        .augment(self.augment, &mut augment_rng);
        progress.start_epoch(
            state.epoch + 1,
            config.epochs,
            self.batches_per_epoch,
            state.batch_in_epoch,
        );
        let mut interrupted = false;
        for batch in batches {
            let (images, labels) = batch?;
            let step = self.optimizer.step_count();
            self.optimizer
                .set_learning_rate(config.schedule.lr_at(step, self.total_steps));
            let epoch_progress =
                state.epoch as f64 + state.batch_in_epoch as f64 / self.batches_per_epoch as f64;
            let settings = StepSettings {
                n_train: self.train_set.len(),
                beta: config.beta(epoch_progress),
                mc_samples: config.mc_samples,
                clip_grad: config.clip_grad,
            };
            let outcome = match train_step(
                &self.network,
                &mut self.optimizer,
                (&images, &labels),
                settings,
                &mut noise_rng,
                &self.group,
            ) {
                Err(Error::Diverged(what)) => {
                    return Err(Error::Diverged(format!(
                        "{what} at epoch {}, step {step}; the last good checkpoint is {}. Lower \
                         the learning rate (--lr) or add gradient clipping (--clip-grad 1.0)",
                        state.epoch + 1,
                        self.last_path.display()
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
            // Every rank stops at the same batch, whichever received the signal.
            if self.group.any(stop.load(Ordering::SeqCst)) {
                interrupted = true;
                break;
            }
        }
        state.augment_rng = RngState::capture(&augment_rng);
        state.noise_rng = RngState::capture(&noise_rng);
        state.sums.seconds += epoch_start.elapsed().as_secs_f64();
        Ok((!interrupted).then(|| RngState::capture(&data_rng)))
    }

    /// Saves a resumable checkpoint mid-epoch and returns the error that says so.
    pub(super) fn interrupt(&mut self, progress: &mut dyn Progress) -> Result<Error> {
        self.meta.epoch = self.state.epoch;
        self.meta.step = self.optimizer.step_count();
        let saver = match self.group.is_leader() {
            true => {
                self.save_last()?;
                "saved"
            }
            false => "rank 0 saved",
        };
        // A rank that exited now would make mpirun end the job while rank 0 is still saving.
        self.group.any(false);
        progress.finish_epoch("interrupted");
        Ok(Error::Interrupted(format!(
            "{saver} a resumable checkpoint at epoch {}, batch {}: {}; continue with --resume",
            self.state.epoch + 1,
            self.state.batch_in_epoch,
            self.last_path.display()
        )))
    }

    /// The end of a complete epoch (`data_rng`: the shuffling generator after its draw):
    /// validates, then writes the best checkpoint, the last one and the log line, in that
    /// order (see [`RunFile`]).
    pub(super) fn end_epoch(
        &mut self,
        progress: &mut dyn Progress,
        data_rng: RngState,
    ) -> Result<EpochLog> {
        if self.group.size() > 1 {
            let checksum = weights_checksum(&self.params)?;
            self.group.check_same("weights after an epoch", checksum)?;
        }
        let (val_accuracy, val_nll, val_ece) = self.validate()?;
        let state = &mut self.state;
        let seconds = state.sums.seconds;
        let log = EpochLog {
            epoch: state.epoch + 1,
            step: self.optimizer.step_count(),
            train_loss: state.sums.loss / state.sums.seen as f64,
            train_nll: state.sums.nll / state.sums.seen as f64,
            kl: self.network.kl()?.to_scalar::<f32>()? as f64,
            train_accuracy: state.sums.correct / state.sums.seen as f64,
            val_accuracy,
            val_nll,
            val_ece,
            lr: self.optimizer.learning_rate(),
            beta: self.config.beta((state.epoch + 1) as f64),
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
        state.data_rng_epoch_start = data_rng;
        state.sums = EpochSums::default();
        let improved = match (val_nll, state.best_val_nll) {
            (Some(v), Some(best)) => v < best,
            (Some(_), None) | (None, _) => true,
        };
        if improved {
            state.best_val_nll = val_nll;
        }
        self.meta.epoch = state.epoch;
        self.meta.step = self.optimizer.step_count();
        self.meta.metrics =
            Some(serde_json::to_value(&log).map_err(|e| Error::invalid(e.to_string()))?);
        if !self.group.is_leader() {
            return Ok(log);
        }
        if improved {
            let mut best = self.meta.clone();
            best.resume = None;
            Checkpoint::save(&self.best_path, &best, &self.params, &[])?;
            progress.saved(RunFile::Best);
        }
        self.save_last()?;
        progress.saved(RunFile::Last);
        append_log(&self.log_path, &log)?;
        progress.saved(RunFile::Log);
        Ok(log)
    }

    /// Writes `OUT/last.safetensors`: weights, optimiser state and the state that resumes the
    /// run bit for bit.
    fn save_last(&mut self) -> Result<()> {
        self.meta.resume =
            Some(serde_json::to_value(&self.state).map_err(|e| Error::invalid(e.to_string()))?);
        Checkpoint::save(
            &self.last_path,
            &self.meta,
            &self.params,
            &self.optimizer.state(),
        )
    }

    /// Validation accuracy, NLL and ECE-15 after the current epoch (`None` without a
    /// validation split).
    /// Only the leader validates: its result decides which checkpoint it writes.
    fn validate(&self) -> Result<(Option<f64>, Option<f64>, Option<f64>)> {
        if self.val_set.is_empty() || !self.group.is_leader() {
            return Ok((None, None, None));
        }
        let mut eval_rng = seeded(self.config.seed ^ (self.state.epoch as u64 + 1) << 20);
        let preds = predict(
            &self.network,
            &self.val_set,
            &self.normalization,
            PredictOptions {
                samples: self.config.eval_samples,
                batch_size: self.config.batch_size.max(128),
                keep_samples: false,
            },
            &mut eval_rng,
            |_| {},
        )?;
        let (acc, nll, ece) = summary(&preds, &self.val_set)?;
        Ok((Some(acc), Some(nll), Some(ece)))
    }

    /// The best checkpoint's metrics on the test set (`None` with `test_samples` 0, and on
    /// ranks other than the leader, which wrote the checkpoint).
    pub(super) fn test_report(&self, device: &Device) -> Result<Option<MetricsReport>> {
        if self.config.test_samples == 0 || !self.group.is_leader() {
            return Ok(None);
        }
        let loaded = Checkpoint::load(&self.best_path, device)?;
        let mut rng = seeded(self.config.seed ^ 0x7e57);
        let preds = predict(
            &loaded.network,
            &self.test_set,
            &self.normalization,
            PredictOptions {
                samples: self.config.test_samples,
                batch_size: 256,
                keep_samples: true,
            },
            &mut rng,
            |_| {},
        )?;
        let labels: Vec<usize> = self.test_set.labels().iter().map(|&l| l as usize).collect();
        Ok(Some(metrics::compute_report(&preds, &labels, None)?))
    }
}

/// The state of a new run; an old log in the directory is removed (`--overwrite`) when
/// `log_path` is given (by the rank that writes).
fn fresh(
    config: &TrainConfig,
    log_path: Option<&std::path::Path>,
) -> Result<(Params, ResumeState, BTreeMap<String, Tensor>)> {
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
    if let Some(log_path) = log_path.filter(|p| p.exists()) {
        std::fs::remove_file(log_path).map_err(|e| Error::io(log_path, e))?;
    }
    Ok((Params::new(config.seed), state, Default::default()))
}

/// The weights, state and optimiser tensors of the run saved in `last_path`, refused when it
/// was written with another configuration. The log at `log_path`, when given (to the rank that
/// writes), is made to match the checkpoint.
fn resumed(
    config: &TrainConfig,
    last_path: &std::path::Path,
    log_path: Option<&std::path::Path>,
    device: &Device,
) -> Result<(Params, ResumeState, BTreeMap<String, Tensor>)> {
    let checkpoint = Checkpoint::read(last_path, device)?;
    let mut state: ResumeState = match &checkpoint.meta.resume {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            Error::checkpoint(last_path, format!("resume state does not parse: {e}"))
        })?,
        None => {
            return Err(Error::checkpoint(
                last_path,
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
    state.config = config.clone();
    if let Some(log_path) = log_path {
        reconcile_log(log_path, state.epoch, checkpoint.meta.metrics.as_ref())?;
    }
    let params = Params::from_tensors(checkpoint.weights)?;
    Ok((params, state, checkpoint.optimizer))
}

/// Optimisation steps per epoch, refused when the training set holds less than one batch or
/// the resumed run stopped at a batch this data cannot reach.
fn batches_per_epoch(
    train_set: &ImageDataset,
    config: &TrainConfig,
    state: &ResumeState,
) -> Result<usize> {
    let n_train = train_set.len();
    let batches = n_train / config.batch_size;
    if batches == 0 {
        return Err(Error::invalid(format!(
            "the training set has {n_train} images, fewer than one batch of {}; use a smaller \
             --batch-size",
            config.batch_size
        )));
    }
    if state.batch_in_epoch > batches {
        return Err(Error::invalid(format!(
            "--resume: the run stopped after batch {} of an epoch, but an epoch of the training \
             set now has {batches} batches ({n_train} images): the data at the run's path \
             changed; resume with the data it was trained on",
            state.batch_in_epoch
        )));
    }
    Ok(batches)
}

/// Refuses a group this run cannot be split over: several ranks need the CPU or CUDA GPUs
/// (Metal has no all-reduce here) and a batch of at least one example per rank.
fn check_group(config: &TrainConfig, device: &Device, group: &Group) -> Result<()> {
    let ranks = group.size();
    if ranks == 1 {
        return Ok(());
    }
    if device.is_metal() {
        return Err(Error::invalid(format!(
            "training over {ranks} ranks runs on the CPU or on CUDA GPUs, not on Metal; use \
             --device cpu, or one process"
        )));
    }
    if config.batch_size < ranks {
        return Err(Error::invalid(format!(
            "--batch-size {} is the global batch and cannot be split over {ranks} ranks; use at \
             least {ranks}",
            config.batch_size
        )));
    }
    Ok(())
}

/// A checksum of what every rank must start from: the settings, the resume state and the
/// training labels.
fn settings_checksum(
    config: &TrainConfig,
    train_set: &ImageDataset,
    state: &ResumeState,
) -> Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&serde_json::to_vec(config).map_err(|e| Error::invalid(e.to_string()))?);
    crc.update(&serde_json::to_vec(state).map_err(|e| Error::invalid(e.to_string()))?);
    crc.update(train_set.labels());
    Ok(crc.finalize())
}

/// A checksum of every trained tensor's bytes, in name order.
fn weights_checksum(params: &Params) -> Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    for (name, var) in params.named_vars() {
        crc.update(name.as_bytes());
        let values = var.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        crc.update(&bytes);
    }
    Ok(crc.finalize())
}
