//! Learning-rate schedules and the KL warm-up.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the learning rate decays after the warm-up.
///
/// `τ` is the number of steps since the warm-up ended and `span` the number of steps from the
/// end of the warm-up to `total_steps`. Serialised with a `"kind"` tag, e.g.
/// `{"kind": "cosine", "min_lr": 0.0}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrDecay {
    /// `lr = base_lr`.
    Constant,
    /// Cosine annealing from `base_lr` to `min_lr`:
    /// `lr = min_lr + (base_lr − min_lr) · (1 + cos(π · min(τ / span, 1))) / 2`.
    /// It reaches `min_lr` at `step = total_steps` and stays there.
    Cosine {
        /// The final learning rate.
        min_lr: f64,
    },
    /// Multiplication by `gamma` every `every` steps: `lr = base_lr · gamma^⌊τ / every⌋`.
    Step {
        /// The number of steps between decays (> 0).
        every: u64,
        /// The factor applied at each decay.
        gamma: f64,
    },
    /// Inverse-power decay, `lr = base_lr · (1 + rate · τ)^(−power)`; the WHVI paper uses
    /// `rate = 5e-4`, `power = 0.3` ([`LrSchedule::whvi_paper`]).
    InversePower {
        /// How fast the decay sets in (>= 0).
        rate: f64,
        /// The exponent (>= 0).
        power: f64,
    },
}

/// A learning-rate schedule: an optional linear warm-up, then an [`LrDecay`].
///
/// Steps count from 0 in whatever unit the caller chooses (optimiser steps, usually, or epochs),
/// the same for `step`, `total_steps`, `warmup_steps` and [`LrDecay::Step::every`]: to decay
/// every `N` epochs while querying per optimiser step, set `every = N · steps_per_epoch`.
/// In a training loop: `opt.set_learning_rate(schedule.lr_at(step, total_steps))` before each
/// `opt.step(..)`.
///
/// During the warm-up (`step < warmup_steps`) the learning rate rises linearly,
/// `lr = base_lr · (step + 1) / warmup_steps`, reaching `base_lr` at its last step; the decay
/// then starts from its beginning (`τ = step − warmup_steps`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LrSchedule {
    /// The learning rate at the start of the decay (default 1e-3).
    pub base_lr: f64,
    /// The length of the linear warm-up, 0 for none (default 0).
    pub warmup_steps: u64,
    /// The decay after the warm-up (default constant).
    pub decay: LrDecay,
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::constant(1e-3)
    }
}

impl LrSchedule {
    /// A constant learning rate.
    pub fn constant(base_lr: f64) -> Self {
        LrSchedule {
            base_lr,
            warmup_steps: 0,
            decay: LrDecay::Constant,
        }
    }

    /// Cosine annealing from `base_lr` to `min_lr` at `total_steps`.
    pub fn cosine(base_lr: f64, min_lr: f64) -> Self {
        LrSchedule {
            decay: LrDecay::Cosine { min_lr },
            ..LrSchedule::constant(base_lr)
        }
    }

    /// Multiplication by `gamma` every `every` steps.
    pub fn step(base_lr: f64, every: u64, gamma: f64) -> Self {
        LrSchedule {
            decay: LrDecay::Step { every, gamma },
            ..LrSchedule::constant(base_lr)
        }
    }

    /// `base_lr · (1 + rate · t)^(−power)`.
    pub fn inverse_power(base_lr: f64, rate: f64, power: f64) -> Self {
        LrSchedule {
            decay: LrDecay::InversePower { rate, power },
            ..LrSchedule::constant(base_lr)
        }
    }

    /// The WHVI paper's schedule, `base_lr · (1 + 5e-4 · t)^(−0.3)` with `t` the iteration.
    pub fn whvi_paper(base_lr: f64) -> Self {
        LrSchedule::inverse_power(base_lr, 5e-4, 0.3)
    }

    /// The same schedule preceded by a linear warm-up of `warmup_steps` steps.
    pub fn with_warmup(self, warmup_steps: u64) -> Self {
        LrSchedule {
            warmup_steps,
            ..self
        }
    }

    /// Checks the settings: learning rates finite and >= 0 with `min_lr <= base_lr`, `every > 0`,
    /// `gamma`, `rate` and `power` finite and >= 0.
    pub fn validate(&self) -> Result<()> {
        let non_negative = |what: &str, value: f64| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "learning-rate schedule: {what} must be a finite number >= 0, got {value}"
                )))
            }
        };
        non_negative("base_lr", self.base_lr)?;
        match self.decay {
            LrDecay::Constant => Ok(()),
            LrDecay::Cosine { min_lr } => {
                non_negative("min_lr", min_lr)?;
                if min_lr > self.base_lr {
                    return Err(Error::invalid(format!(
                        "learning-rate schedule: cosine min_lr {min_lr} exceeds base_lr {}",
                        self.base_lr
                    )));
                }
                Ok(())
            }
            LrDecay::Step { every, gamma } => {
                if every == 0 {
                    return Err(Error::invalid(
                        "learning-rate schedule: step decay needs every > 0",
                    ));
                }
                non_negative("gamma", gamma)
            }
            LrDecay::InversePower { rate, power } => {
                non_negative("rate", rate)?;
                non_negative("power", power)
            }
        }
    }

    /// The learning rate at `step` (counted from 0) of a run of `total_steps` steps.
    pub fn lr_at(&self, step: u64, total_steps: u64) -> f64 {
        let base = self.base_lr;
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let tau = step - self.warmup_steps;
        match self.decay {
            LrDecay::Constant => base,
            LrDecay::Cosine { min_lr } => {
                let span = total_steps.saturating_sub(self.warmup_steps);
                let progress = if span == 0 {
                    1.0
                } else {
                    (tau as f64 / span as f64).min(1.0)
                };
                min_lr + (base - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
            }
            // `every` is checked by `validate`; `max(1)` keeps an unchecked 0 from dividing by 0.
            LrDecay::Step { every, gamma } => {
                let decays = tau / every.max(1);
                base * gamma.powf(decays as f64)
            }
            LrDecay::InversePower { rate, power } => base * (1.0 + rate * tau as f64).powf(-power),
        }
    }
}

/// The KL warm-up: the weight `beta` of the KL term in the ELBO rises linearly from 0 to 1 over
/// the first `epochs` epochs, then stays at 1 (always 1 when `epochs` is 0, the default). A
/// run's KL weight (`TrainConfig::kl_weight`) scales the whole ramp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KlWarmup {
    /// The length of the warm-up in epochs.
    pub epochs: u64,
}

impl KlWarmup {
    /// `beta` after `epoch` epochs (`epoch` counts from 0 and may be fractional, e.g.
    /// `epoch + batch / batches_per_epoch` for a per-batch ramp): `clamp(epoch / epochs, 0, 1)`.
    pub fn beta(&self, epoch: f64) -> f64 {
        if self.epochs == 0 {
            1.0
        } else {
            (epoch / self.epochs as f64).clamp(0.0, 1.0)
        }
    }
}
