use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::parameters::NamedParameter;
use crate::data::DatasetKind;
use crate::layers::ParamRole;
use crate::optim::{
    AdamWConfig, KlWarmup, LrScale, LrSchedule, NameMatch, OptimizerConfig, SgdConfig,
};
use crate::zoo::BuildOptions;
use crate::{Error, Result};

/// The optimiser of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with momentum.
    Sgd,
    /// SGD with Nesterov momentum.
    Nesterov,
    /// AdamW (decoupled weight decay).
    AdamW,
}

/// Everything that defines a training run; recorded in every checkpoint it writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The data set.
    pub dataset: DatasetKind,
    /// Where the data are (`None`: the embedded CIFAR-10 sample, or the system Fashion-MNIST).
    pub data: Option<PathBuf>,
    /// Model name from the zoo, or a spec file path.
    pub model: String,
    /// Posterior per layer, width multiplier and layer options.
    pub build: BuildOptions,
    /// Epochs to train.
    pub epochs: usize,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// The optimiser.
    pub optimizer: OptimizerKind,
    /// Momentum for SGD.
    pub momentum: f64,
    /// Weight decay (L2 for SGD, decoupled for AdamW); never applied to biases, BatchNorm or
    /// variational parameters, whose prior is the KL term.
    pub weight_decay: f64,
    /// Learning-rate schedule (its `base_lr` is the learning rate).
    pub schedule: LrSchedule,
    /// Learning-rate factor of the WHVI diagonals `s1`, `s2`. They sit near 1 while the
    /// means `g` sit near `sqrt(2 / (D · d_in))`, so at one learning rate Adam moves the
    /// diagonals by a far smaller fraction of their size than the means; a factor of 10 lets
    /// them learn in a few epochs.
    #[serde(default = "default_diagonal_lr_scale")]
    pub diagonal_lr_scale: f64,
    /// KL warm-up.
    pub kl_warmup: KlWarmup,
    /// The weight `beta` of the KL term once the warm-up is over (1: the ELBO). Any other value
    /// trains a tempered posterior, `p(w | D)` with the likelihood raised to `1 / beta`: below
    /// 1 a "cold" posterior, narrower than Bayes' rule gives, above 1 a wider one.
    #[serde(default = "default_kl_weight")]
    pub kl_weight: f64,
    /// Posterior samples per training step (the loss is averaged over them).
    pub mc_samples: usize,
    /// Clip the global gradient norm to this value.
    pub clip_grad: Option<f64>,
    /// Validation images carved from the training set.
    pub validation: usize,
    /// Random crops and flips during training.
    pub augment: bool,
    /// The seed of everything random in the run.
    pub seed: u64,
    /// Posterior samples for validation metrics after each epoch.
    pub eval_samples: usize,
    /// Posterior samples for the final test-set report (0: no test report).
    pub test_samples: usize,
    /// Stop after the epoch during which this many minutes have passed.
    pub time_limit_minutes: Option<f64>,
    /// Output directory.
    pub out: PathBuf,
}

impl Default for TrainConfig {
    /// Defaults that make sense for CIFAR-10: VGG-16 with a WHVI head, AdamW at lr 1e-3 with
    /// cosine decay and no warm-up, weight decay 5e-4, batch 128, 30 epochs, random crops and
    /// flips. [`TrainConfig::for_dataset`] adapts them to a data set.
    fn default() -> Self {
        TrainConfig {
            dataset: DatasetKind::Cifar10,
            data: None,
            model: "vgg16".into(),
            build: BuildOptions::default(),
            epochs: 30,
            batch_size: 128,
            optimizer: OptimizerKind::AdamW,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: LrSchedule::cosine(OptimizerKind::AdamW.default_lr(), 0.0),
            diagonal_lr_scale: default_diagonal_lr_scale(),
            kl_warmup: KlWarmup::default(),
            kl_weight: 1.0,
            mc_samples: 1,
            clip_grad: None,
            validation: crate::data::DEFAULT_VALIDATION_SIZE,
            augment: true,
            seed: 0,
            eval_samples: 8,
            test_samples: 32,
            time_limit_minutes: None,
            out: PathBuf::from("runs/whvi"),
        }
    }
}

/// The default of [`TrainConfig::diagonal_lr_scale`].
pub const DEFAULT_DIAGONAL_LR_SCALE: f64 = 10.0;

fn default_diagonal_lr_scale() -> f64 {
    DEFAULT_DIAGONAL_LR_SCALE
}

fn default_kl_weight() -> f64 {
    1.0
}

impl TrainConfig {
    /// Checks every value, with a message that names the setting (the field, which the CLI
    /// spells with hyphens: `batch_size` is `--batch-size`; `time_limit_minutes` is
    /// `--time-limit`).
    pub fn validate(&self) -> Result<()> {
        let positive = |v: usize, name: &str| {
            if v == 0 {
                Err(Error::invalid(format!("{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        positive(self.epochs, "epochs")?;
        positive(self.batch_size, "batch_size")?;
        positive(self.mc_samples, "mc_samples")?;
        positive(self.eval_samples, "eval_samples")?;
        if let Some(c) = self.clip_grad {
            if !(c > 0.0 && c.is_finite()) {
                return Err(Error::invalid(format!(
                    "clip_grad must be positive, got {c}"
                )));
            }
        }
        if !(self.momentum >= 0.0 && self.momentum < 1.0) {
            return Err(Error::invalid(format!(
                "momentum must be in [0, 1), got {}",
                self.momentum
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            )));
        }
        if !(self.diagonal_lr_scale > 0.0 && self.diagonal_lr_scale.is_finite()) {
            return Err(Error::invalid(format!(
                "diagonal_lr_scale must be a positive number, got {}",
                self.diagonal_lr_scale
            )));
        }
        if !(self.kl_weight > 0.0 && self.kl_weight.is_finite()) {
            return Err(Error::invalid(format!(
                "kl_weight must be a positive number (1 for the ELBO), got {}",
                self.kl_weight
            )));
        }
        if let Some(t) = self.time_limit_minutes {
            if !(t > 0.0 && t.is_finite()) {
                return Err(Error::invalid(format!(
                    "time_limit_minutes must be a positive number, got {t}"
                )));
            }
        }
        self.schedule.validate()?;
        self.build.validate()?;
        Ok(())
    }

    /// The KL weight after `epoch` epochs (fractional, counted from 0): the warm-up's ramp
    /// times [`TrainConfig::kl_weight`].
    pub fn beta(&self, epoch: f64) -> f64 {
        self.kl_weight * self.kl_warmup.beta(epoch)
    }

    /// The optimiser configuration for `parameters`: weight decay only on the roles that take
    /// it ([`ParamRole::is_decayed`]: not on biases, BatchNorm parameters, WHVI diagonals or
    /// variational parameters, whose regulariser is the KL term), and the WHVI diagonals at
    /// [`TrainConfig::diagonal_lr_scale`] times the learning rate.
    pub fn optimizer_config(&self, parameters: &[NamedParameter]) -> OptimizerConfig {
        let no_decay = parameters
            .iter()
            .filter(|p| p.role.is_trained() && !p.role.is_decayed())
            .map(|p| NameMatch::Exact(p.name.clone()))
            .collect();
        let lr = self.schedule.base_lr;
        let lr_scale = parameters
            .iter()
            .filter(|p| p.role == ParamRole::Diagonal)
            .map(|p| LrScale {
                rule: NameMatch::Exact(p.name.clone()),
                factor: self.diagonal_lr_scale,
            })
            .collect();
        match self.optimizer {
            OptimizerKind::Sgd | OptimizerKind::Nesterov => OptimizerConfig::Sgd(SgdConfig {
                lr,
                momentum: self.momentum,
                nesterov: self.optimizer == OptimizerKind::Nesterov,
                weight_decay: self.weight_decay,
                no_decay,
                lr_scale,
                ..SgdConfig::default()
            }),
            OptimizerKind::AdamW => OptimizerConfig::AdamW(AdamWConfig {
                lr,
                weight_decay: self.weight_decay,
                no_decay,
                lr_scale,
                ..AdamWConfig::default()
            }),
        }
    }

    /// The settings in which `self` (of the run being resumed) and `other` differ and that
    /// change what the run computes, each as `name: old -> new` (nested settings by their path,
    /// `build.initial_sigma: 0.01 -> 0.3`); empty when `--resume` can continue bit for bit. The
    /// output directory (a run may be moved or named by another path) and the time limit do
    /// not count.
    pub(crate) fn resume_differences(&self, other: &TrainConfig) -> Vec<String> {
        const IGNORED: [&str; 2] = ["out", "time_limit_minutes"];
        let as_value = |c: &TrainConfig| {
            let mut value = serde_json::to_value(c).unwrap_or_default();
            if let Some(settings) = value.as_object_mut() {
                IGNORED.iter().for_each(|name| drop(settings.remove(*name)));
            }
            value
        };
        let mut differences = Vec::new();
        setting_differences("", &as_value(self), &as_value(other), &mut differences);
        differences
    }
}

/// Appends `path: old -> new` for every leaf setting in which `old` and `new` differ, going into
/// the objects both hold (a setting only one of them has is `unset` on the other side).
fn setting_differences(
    path: &str,
    old: &serde_json::Value,
    new: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                let path = match path {
                    "" => name.clone(),
                    _ => format!("{path}.{name}"),
                };
                let unset = Value::String("unset".into());
                let (a, b) = (a.get(name), b.get(name));
                match (a, b) {
                    (Some(a), Some(b)) => setting_differences(&path, a, b, out),
                    _ if a != b => out.push(format!(
                        "{path}: {} -> {}",
                        a.unwrap_or(&unset),
                        b.unwrap_or(&unset)
                    )),
                    _ => {}
                }
            }
        }
        _ if old != new => out.push(format!("{path}: {old} -> {new}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_differences_name_nested_settings_by_their_path_and_ignore_the_output_folder() {
        let run = TrainConfig::for_dataset(DatasetKind::Cifar10, None);
        let mut other = run.clone();
        assert!(run.resume_differences(&other).is_empty());
        other.build.initial_sigma = 0.25;
        other.batch_size = run.batch_size + 1;
        other.out = PathBuf::from("elsewhere");
        let differences = run.resume_differences(&other);
        assert_eq!(
            differences,
            [
                format!("batch_size: {} -> {}", run.batch_size, other.batch_size),
                format!("build.initial_sigma: {} -> 0.25", run.build.initial_sigma),
            ]
        );
    }
}
