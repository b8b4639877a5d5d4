//! Optimisers, learning-rate schedules, KL warm-up and gradient clipping for the training loop.
//!
//! The optimisers implement [`candle_nn::Optimizer`] (`new`, `step`, `learning_rate`,
//! `set_learning_rate`, `backward_step`), so they drop into any candle training loop, and add
//! what candle-nn's optimisers lack:
//!
//! * [`Sgd`]: momentum, dampening, Nesterov momentum and coupled (L2) weight decay, with exactly
//!   the update rule of PyTorch's `torch.optim.SGD`.
//! * [`AdamW`]: decoupled weight decay with bias-corrected moments, exactly PyTorch's
//!   `torch.optim.AdamW`; with [`AdamWConfig::decoupled_weight_decay`] off it is PyTorch's
//!   `torch.optim.Adam` (weight decay added to the gradient).
//! * Per-variable weight decay: a configuration's `no_decay` list of [`NameMatch`] rules names
//!   the variables that are never decayed (biases, BatchNorm parameters, the posterior's
//!   variational parameters). The rules are data, not closures, so a configuration can be
//!   recorded in a checkpoint and compared on resume.
//! * State by name, for bit-for-bit resume: the optimisers are built from *named* variables
//!   ([`NamedOptimizer::from_named`], e.g. from `VarMap::data()`), hold them sorted by name, and
//!   [`NamedOptimizer::state`] / [`NamedOptimizer::load_state`] save and restore every buffer
//!   under a name derived from the variable's name.
//!
//! [`AnyOptimizer`] and [`OptimizerConfig`] choose between the two at run time.
//!
//! Alongside: [`LrSchedule`] (constant, cosine, step and the WHVI paper's inverse-power decay,
//! each with an optional linear warm-up), [`KlWarmup`] (the weight of the KL term ramping from 0
//! to 1) and [`clip_grad_norm`] (clipping by the global L2 norm).
//!
//! # Using them in a training loop
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use candle_nn::{Optimizer, VarBuilder, VarMap};
//! use whvi::optim::{clip_grad_norm, NameMatch, NamedOptimizer, Sgd, SgdConfig, LrSchedule};
//!
//! # fn main() -> whvi::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let layer = candle_nn::linear(4, 2, vb.pp("fc"))?;
//! # let _ = layer;
//! let config = SgdConfig {
//!     lr: 0.1,
//!     weight_decay: 5e-4,
//!     no_decay: vec![NameMatch::Suffix(".bias".into())],
//!     ..SgdConfig::default()
//! };
//! let named: Vec<_> = varmap.data().lock().unwrap().clone().into_iter().collect();
//! let mut opt = Sgd::from_named(named, config)?;
//! let schedule = LrSchedule::cosine(0.1, 0.0).with_warmup(500);
//! let total_steps = 10_000;
//! # let loss_at = |_: u64| -> candle_core::Result<candle_core::Tensor> { unimplemented!() };
//! for step in 0..total_steps {
//!     let loss = loss_at(step)?;
//!     let mut grads = loss.backward()?;
//!     let _norm = clip_grad_norm(&mut grads, opt.vars(), 5.0)?;
//!     opt.set_learning_rate(schedule.lr_at(step, total_steps));
//!     opt.step(&grads)?;
//! }
//! // Checkpoint: `opt.state()` holds every buffer by name; `opt.load_state(..)` restores it.
//! let _state = opt.state();
//! # Ok(())
//! # }
//! ```

mod adamw;
mod clip;
mod params;
mod schedule;
mod sgd;
mod state;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, gradients_are_finite};
pub use params::{LrScale, NameMatch};
pub use schedule::{KlWarmup, LrDecay, LrSchedule};
pub use sgd::{Sgd, SgdConfig};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

/// The state entry holding the number of [`Optimizer::step`] calls made so far, as a scalar
/// `i64` tensor.
pub const STEP_KEY: &str = "step";

/// An optimiser built from named variables, whose state can be saved and restored by name.
///
/// The variables are held sorted by name. Variables whose dtype is not a float type are
/// dropped (as candle-nn's optimisers do), so integer buffers in a `VarMap` are harmless;
/// variables that never receive a gradient (BatchNorm running statistics) are never touched.
pub trait NamedOptimizer: Optimizer {
    /// Builds the optimiser over `vars` (name, variable) with `config`.
    ///
    /// Fails if the configuration is invalid or two variables share a name.
    fn from_named(vars: Vec<(String, Var)>, config: Self::Config) -> crate::Result<Self>;

    /// The names of the optimised variables, sorted.
    fn names(&self) -> &[String];

    /// The optimised variables, in the order of [`NamedOptimizer::names`].
    fn vars(&self) -> &[Var];

    /// The number of [`Optimizer::step`] calls made so far (restored by `load_state`).
    fn step_count(&self) -> u64;

    /// The weight decay applied to the variable called `name` (0 for those excluded by the
    /// configuration's `no_decay` rules), or `None` if the optimiser holds no such variable.
    fn weight_decay_of(&self, name: &str) -> Option<f64>;

    /// The optimiser's full state: [`STEP_KEY`] plus, for every variable that has received a
    /// gradient, its buffers named `<buffer>.<variable name>`. The tensors are snapshots: later
    /// steps do not change them.
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Replaces the optimiser's state with `state` (as returned by [`NamedOptimizer::state`],
    /// possibly after a round trip through a file), so that the next step continues exactly
    /// where the saving optimiser stopped.
    ///
    /// Tensors are moved to their variable's device. Fails, leaving the optimiser unchanged,
    /// when an entry names a variable this optimiser does not hold, belongs to another
    /// optimiser, has the wrong shape or dtype, or when the step count or part of a variable's
    /// buffers is missing; the error names the entry and the variable.
    fn load_state<I>(&mut self, state: I) -> crate::Result<()>
    where
        I: IntoIterator<Item = (String, Tensor)>;
}

/// The configuration of an [`AnyOptimizer`]: which optimiser, and its settings.
///
/// Serialised with a `"kind"` tag: `{"kind": "sgd", "lr": 0.1, ...}` or
/// `{"kind": "adam_w", ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerConfig {
    /// Stochastic gradient descent ([`Sgd`]).
    Sgd(SgdConfig),
    /// Adam / AdamW ([`AdamW`]).
    AdamW(AdamWConfig),
}

impl Default for OptimizerConfig {
    /// SGD with [`SgdConfig::default`].
    fn default() -> Self {
        OptimizerConfig::Sgd(SgdConfig::default())
    }
}

/// Either optimiser, chosen at run time by an [`OptimizerConfig`].
#[derive(Debug)]
pub enum AnyOptimizer {
    /// An [`Sgd`] optimiser.
    Sgd(Sgd),
    /// An [`AdamW`] optimiser.
    AdamW(AdamW),
}

impl Optimizer for AnyOptimizer {
    type Config = OptimizerConfig;

    /// Builds the optimiser over unnamed variables (named by position, see [`Sgd`]).
    fn new(vars: Vec<Var>, config: OptimizerConfig) -> candle_core::Result<Self> {
        Ok(match config {
            OptimizerConfig::Sgd(c) => AnyOptimizer::Sgd(Sgd::new(vars, c)?),
            OptimizerConfig::AdamW(c) => AnyOptimizer::AdamW(AdamW::new(vars, c)?),
        })
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        match self {
            AnyOptimizer::Sgd(o) => o.step(grads),
            AnyOptimizer::AdamW(o) => o.step(grads),
        }
    }

    fn learning_rate(&self) -> f64 {
        match self {
            AnyOptimizer::Sgd(o) => o.learning_rate(),
            AnyOptimizer::AdamW(o) => o.learning_rate(),
        }
    }

    fn set_learning_rate(&mut self, lr: f64) {
        match self {
            AnyOptimizer::Sgd(o) => o.set_learning_rate(lr),
            AnyOptimizer::AdamW(o) => o.set_learning_rate(lr),
        }
    }
}

impl NamedOptimizer for AnyOptimizer {
    fn from_named(vars: Vec<(String, Var)>, config: OptimizerConfig) -> crate::Result<Self> {
        Ok(match config {
            OptimizerConfig::Sgd(c) => AnyOptimizer::Sgd(Sgd::from_named(vars, c)?),
            OptimizerConfig::AdamW(c) => AnyOptimizer::AdamW(AdamW::from_named(vars, c)?),
        })
    }

    fn names(&self) -> &[String] {
        match self {
            AnyOptimizer::Sgd(o) => o.names(),
            AnyOptimizer::AdamW(o) => o.names(),
        }
    }

    fn vars(&self) -> &[Var] {
        match self {
            AnyOptimizer::Sgd(o) => o.vars(),
            AnyOptimizer::AdamW(o) => o.vars(),
        }
    }

    fn step_count(&self) -> u64 {
        match self {
            AnyOptimizer::Sgd(o) => o.step_count(),
            AnyOptimizer::AdamW(o) => o.step_count(),
        }
    }

    fn weight_decay_of(&self, name: &str) -> Option<f64> {
        match self {
            AnyOptimizer::Sgd(o) => o.weight_decay_of(name),
            AnyOptimizer::AdamW(o) => o.weight_decay_of(name),
        }
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        match self {
            AnyOptimizer::Sgd(o) => o.state(),
            AnyOptimizer::AdamW(o) => o.state(),
        }
    }

    fn load_state<I>(&mut self, state: I) -> crate::Result<()>
    where
        I: IntoIterator<Item = (String, Tensor)>,
    {
        match self {
            AnyOptimizer::Sgd(o) => o.load_state(state),
            AnyOptimizer::AdamW(o) => o.load_state(state),
        }
    }
}

/// Converts the crate's error into candle's, for the [`Optimizer`] trait's methods.
fn to_candle(err: crate::Error) -> candle_core::Error {
    match err {
        crate::Error::Candle(e) => e,
        other => candle_core::Error::msg(other),
    }
}
