//! Adam with decoupled (AdamW) or coupled (Adam) weight decay.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

use super::params::{validate_lr_scales, LrScale, NameMatch, Params};
use super::state::{count_tensor, StateReader};
use super::{to_candle, NamedOptimizer, STEP_KEY};
use crate::{Error, Result};

/// The prefix of the first-moment buffers in the state: `adam_m.<variable name>`.
const FIRST_MOMENT: &str = "adam_m";
/// The prefix of the second-moment buffers in the state: `adam_v.<variable name>`.
const SECOND_MOMENT: &str = "adam_v";
/// The prefix of the per-variable step counts in the state: `adam_step.<variable name>`.
const VAR_STEP: &str = "adam_step";

/// The settings of [`AdamW`]; the defaults are PyTorch's `AdamW` defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// The learning rate (default 1e-3).
    pub lr: f64,
    /// The decay rate of the first-moment estimate (default 0.9).
    pub beta1: f64,
    /// The decay rate of the second-moment estimate (default 0.999).
    pub beta2: f64,
    /// Added to the denominator for numerical stability (default 1e-8).
    pub eps: f64,
    /// The weight decay (default 1e-2).
    pub weight_decay: f64,
    /// `true` (default): AdamW, the parameter shrinks by `lr · weight_decay · param` each step.
    /// `false`: Adam, `weight_decay · param` is added to the gradient (L2 penalty).
    pub decoupled_weight_decay: bool,
    /// Variables whose names match any of these rules are never decayed (default: none).
    pub no_decay: Vec<NameMatch>,
    /// Learning-rate factors for groups of variables (default: none, every factor 1).
    pub lr_scale: Vec<LrScale>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            decoupled_weight_decay: true,
            no_decay: Vec::new(),
            lr_scale: Vec::new(),
        }
    }
}

impl AdamWConfig {
    /// PyTorch's `Adam` defaults: as [`AdamWConfig::default`] with coupled weight decay 0.
    pub fn adam() -> Self {
        AdamWConfig {
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            ..AdamWConfig::default()
        }
    }

    /// Checks the settings: `lr`, `eps` and `weight_decay` finite and >= 0, betas in [0, 1).
    pub fn validate(&self) -> Result<()> {
        for (what, value) in [
            ("lr", self.lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::invalid(format!(
                    "AdamW {what} must be a finite number >= 0, got {value}"
                )));
            }
        }
        for (what, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(Error::invalid(format!(
                    "AdamW {what} must be in [0, 1), got {value}"
                )));
            }
        }
        validate_lr_scales("AdamW", &self.lr_scale)
    }
}

/// The moment estimates of one variable.
#[derive(Debug, Clone)]
struct Moments {
    m: Tensor,
    v: Tensor,
    /// The number of steps in which the variable had a gradient.
    step: u64,
}

/// Adam with decoupled weight decay, with exactly the update rule of PyTorch's
/// `torch.optim.AdamW` (or `torch.optim.Adam` with
/// [`AdamWConfig::decoupled_weight_decay`] off).
///
/// For each variable `p` with gradient `g` in the step's [`GradStore`] (variables without a
/// gradient are left alone; like PyTorch, each variable counts its own steps `t`):
///
/// ```text
/// lr ← lr · factor                      (the first `lr_scale` rule matching p, if any)
/// p ← p · (1 − lr · weight_decay)       (AdamW, if p is decayed)
/// g ← g + weight_decay · p              (Adam, if p is decayed)
/// t ← t + 1
/// m ← β1 · m + (1 − β1) · g             (m = v = 0 before the first step)
/// v ← β2 · v + (1 − β2) · g²
/// p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
/// ```
///
/// Build it with [`NamedOptimizer::from_named`]. [`Optimizer::new`] takes unnamed variables and
/// names them by position (`"0"`, `"1"`, …, zero-padded), which the `no_decay` rules and the
/// state then see.
///
/// State: [`STEP_KEY`] and, for every variable that has had a gradient, `adam_m.<name>`,
/// `adam_v.<name>` and its own step count `adam_step.<name>` (a scalar `i64`).
#[derive(Debug)]
pub struct AdamW {
    params: Params,
    config: AdamWConfig,
    moments: Vec<Option<Moments>>,
    step: u64,
}

impl AdamW {
    /// The settings (with the learning rate last set).
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    fn with_params(params: Params, config: AdamWConfig) -> Self {
        let moments = vec![None; params.len()];
        AdamW {
            params,
            config,
            moments,
            step: 0,
        }
    }
}

impl Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
        config.validate().map_err(to_candle)?;
        let params =
            Params::positional(vars, &config.no_decay, &config.lr_scale).map_err(to_candle)?;
        Ok(Self::with_params(params, config))
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let c = &self.config;
        for i in 0..self.params.len() {
            let var = &self.params.vars[i];
            let Some(grad) = grads.get(var) else {
                continue;
            };
            let mut param = var.as_detached_tensor();
            let decay = self.params.decay(i, c.weight_decay);
            let lr = c.lr * self.params.lr_factor[i];
            // Gradients of variables keep candle's backprop graph (only inner nodes are
            // detached); a moment built from one would hold every activation of the step
            // alive, and the next step's moment this one: memory grows without bound.
            let mut grad = grad.detach();
            if decay != 0.0 {
                if c.decoupled_weight_decay {
                    param = (param * (1.0 - lr * decay))?;
                } else {
                    grad = (grad + (&param * decay)?)?;
                }
            }
            let (m, v, step) = match &self.moments[i] {
                None => (
                    (&grad * (1.0 - c.beta1))?,
                    (grad.sqr()? * (1.0 - c.beta2))?,
                    1,
                ),
                Some(prev) => (
                    ((&prev.m * c.beta1)? + (&grad * (1.0 - c.beta1))?)?,
                    ((&prev.v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?,
                    prev.step + 1,
                ),
            };
            // f64 exponents: exact for every step count a run can reach.
            let bias_correction1 = 1.0 - c.beta1.powf(step as f64);
            let bias_correction2 = 1.0 - c.beta2.powf(step as f64);
            let step_size = lr / bias_correction1;
            let denom = v.sqrt()?.affine(1.0 / bias_correction2.sqrt(), c.eps)?;
            var.set(&(param - (m.div(&denom)? * step_size)?)?)?;
            self.moments[i] = Some(Moments { m, v, step });
        }
        self.step += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}

impl NamedOptimizer for AdamW {
    fn from_named(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let params = Params::new(vars, &config.no_decay, &config.lr_scale)?;
        Ok(Self::with_params(params, config))
    }

    fn names(&self) -> &[String] {
        &self.params.names
    }

    fn vars(&self) -> &[Var] {
        &self.params.vars
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn weight_decay_of(&self, name: &str) -> Option<f64> {
        let i = self.params.index_of(name)?;
        Some(self.params.decay(i, self.config.weight_decay))
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![(STEP_KEY.to_string(), count_tensor(self.step))];
        for (name, moments) in self.params.names.iter().zip(&self.moments) {
            if let Some(mo) = moments {
                state.push((format!("{FIRST_MOMENT}.{name}"), mo.m.clone()));
                state.push((format!("{SECOND_MOMENT}.{name}"), mo.v.clone()));
                state.push((format!("{VAR_STEP}.{name}"), count_tensor(mo.step)));
            }
        }
        state
    }

    fn load_state<I>(&mut self, state: I) -> Result<()>
    where
        I: IntoIterator<Item = (String, Tensor)>,
    {
        let mut reader = StateReader::new(
            state,
            &self.params,
            "AdamW",
            &[FIRST_MOMENT, SECOND_MOMENT, VAR_STEP],
        )?;
        let step = reader.required_count(STEP_KEY)?;
        let mut moments = Vec::with_capacity(self.params.len());
        for i in 0..self.params.len() {
            let m = reader.buffer(FIRST_MOMENT, i)?;
            let v = reader.buffer(SECOND_MOMENT, i)?;
            let var_step = reader.count(&format!("{VAR_STEP}.{}", reader.name(i)))?;
            moments.push(match (m, v, var_step) {
                (Some(m), Some(v), Some(step)) => Some(Moments { m, v, step }),
                (None, None, None) => None,
                (m, v, s) => {
                    let has = |present: bool, key: &str| {
                        format!(
                            "{} `{key}.{}`",
                            if present { "has" } else { "lacks" },
                            reader.name(i)
                        )
                    };
                    return Err(Error::invalid(format!(
                        "AdamW optimiser state for variable `{}` is incomplete: it {}, {} and {}",
                        reader.name(i),
                        has(m.is_some(), FIRST_MOMENT),
                        has(v.is_some(), SECOND_MOMENT),
                        has(s.is_some(), VAR_STEP),
                    )));
                }
            });
        }
        reader.finish()?;
        self.step = step;
        self.moments = moments;
        Ok(())
    }
}
