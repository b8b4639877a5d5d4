//! Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

use super::params::{validate_lr_scales, LrScale, NameMatch, Params};
use super::state::{count_tensor, StateReader};
use super::{to_candle, NamedOptimizer, STEP_KEY};
use crate::{Error, Result};

/// The prefix of SGD's momentum buffers in its state: `momentum.<variable name>`.
const MOMENTUM: &str = "momentum";

/// The settings of [`Sgd`]. The defaults are PyTorch's, except momentum 0.9 (PyTorch: 0), the
/// usual choice for CIFAR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SgdConfig {
    /// The learning rate (default 1e-3).
    pub lr: f64,
    /// The momentum factor, 0 for none (default 0.9).
    pub momentum: f64,
    /// The dampening of the gradient's contribution to the momentum buffer (default 0).
    pub dampening: f64,
    /// Nesterov momentum; requires a positive momentum and zero dampening (default false).
    pub nesterov: bool,
    /// The L2 penalty: `weight_decay · param` is added to the gradient (default 0).
    pub weight_decay: f64,
    /// Variables whose names match any of these rules are never decayed (default: none).
    pub no_decay: Vec<NameMatch>,
    /// Learning-rate factors for groups of variables (default: none, every factor 1).
    pub lr_scale: Vec<LrScale>,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            no_decay: Vec::new(),
            lr_scale: Vec::new(),
        }
    }
}

impl SgdConfig {
    /// Checks the settings: non-negative finite numbers, and Nesterov only with a positive
    /// momentum and zero dampening.
    pub fn validate(&self) -> Result<()> {
        let non_negative = [
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("dampening", self.dampening),
            ("weight_decay", self.weight_decay),
        ];
        for (what, value) in non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::invalid(format!(
                    "SGD {what} must be a finite number >= 0, got {value}"
                )));
            }
        }
        if self.nesterov && (self.momentum == 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid(format!(
                "SGD Nesterov momentum requires momentum > 0 and dampening 0, got momentum {} \
                 and dampening {}",
                self.momentum, self.dampening
            )));
        }
        validate_lr_scales("SGD", &self.lr_scale)
    }
}

/// Stochastic gradient descent, with exactly the update rule of PyTorch's `torch.optim.SGD`.
///
/// For each variable `p` with gradient `g` in the step's [`GradStore`] (variables without a
/// gradient are left alone, buffers included):
///
/// ```text
/// g ← g + weight_decay · p                       (if weight_decay ≠ 0 and p is decayed)
/// if momentum ≠ 0:
///     b ← g                                      (first step of p)
///     b ← momentum · b + (1 − dampening) · g     (later steps)
///     g ← g + momentum · b   if nesterov,   else   g ← b
/// p ← p − lr · factor · g                       (factor: the first matching `lr_scale` rule, else 1)
/// ```
///
/// Build it with [`NamedOptimizer::from_named`]. [`Optimizer::new`] takes unnamed variables and
/// names them by position (`"0"`, `"1"`, …, zero-padded), which the `no_decay` rules and the
/// state then see.
///
/// State: [`STEP_KEY`] and `momentum.<variable name>` for every variable that has a momentum
/// buffer.
#[derive(Debug)]
pub struct Sgd {
    params: Params,
    config: SgdConfig,
    /// The momentum buffer of each variable, `None` until its first gradient.
    momentum: Vec<Option<Tensor>>,
    step: u64,
}

impl Sgd {
    /// The settings (with the learning rate last set).
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

impl Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, config: SgdConfig) -> candle_core::Result<Self> {
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
            // Detached so the momentum buffer cannot keep the step's backprop graph alive
            // (see the note in AdamW::step).
            let grad = &grad.detach();
            let param = var.as_detached_tensor();
            let decay = self.params.decay(i, c.weight_decay);
            let mut d = if decay != 0.0 {
                (grad + (&param * decay)?)?
            } else {
                grad.clone()
            };
            if c.momentum != 0.0 {
                let buf = match &self.momentum[i] {
                    None => d.clone(),
                    Some(b) => ((b * c.momentum)? + (&d * (1.0 - c.dampening))?)?,
                };
                d = if c.nesterov {
                    (d + (&buf * c.momentum)?)?
                } else {
                    buf.clone()
                };
                self.momentum[i] = Some(buf);
            }
            var.set(&(param - (d * (c.lr * self.params.lr_factor[i]))?)?)?;
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

impl Sgd {
    fn with_params(params: Params, config: SgdConfig) -> Self {
        let momentum = vec![None; params.len()];
        Sgd {
            params,
            config,
            momentum,
            step: 0,
        }
    }
}

impl NamedOptimizer for Sgd {
    fn from_named(vars: Vec<(String, Var)>, config: SgdConfig) -> Result<Self> {
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
        for (name, buf) in self.params.names.iter().zip(&self.momentum) {
            if let Some(buf) = buf {
                state.push((format!("{MOMENTUM}.{name}"), buf.clone()));
            }
        }
        state
    }

    fn load_state<I>(&mut self, state: I) -> Result<()>
    where
        I: IntoIterator<Item = (String, Tensor)>,
    {
        let mut reader = StateReader::new(state, &self.params, "SGD", &[MOMENTUM])?;
        let step = reader.required_count(STEP_KEY)?;
        let momentum = (0..self.params.len())
            .map(|i| reader.buffer(MOMENTUM, i))
            .collect::<Result<Vec<_>>>()?;
        reader.finish()?;
        self.step = step;
        self.momentum = momentum;
        Ok(())
    }
}
