//! Bayesian and deterministic layers behind one trait.
//!
//! Every layer implements [`BayesianModule`]: a forward pass that either samples from the
//! posterior or uses its mean (chosen by the [`Pass`]), and the KL divergence of its posterior
//! from its prior. Deterministic layers have no KL. The same network can therefore be trained
//! with WHVI, a mean-field Gaussian posterior, MC dropout or point estimates and compared on
//! equal terms.

mod batch_norm;
mod bias;
mod deterministic;
mod dropout;
mod meanfield;
mod noise;
mod pool;
mod pool_simd;
mod prior;
mod sequential;
mod whvi;
mod whvi_kernel;

pub use batch_norm::BatchNorm2d;
pub use deterministic::{DeterministicConv2d, DeterministicLinear};
pub use dropout::McDropout;
pub use meanfield::{MeanFieldConv2d, MeanFieldConv2dConfig, MeanFieldConvMode, MeanFieldLinear};
pub use noise::standard_normal;
pub use pool::MaxPool2d;
pub use prior::{gaussian_kl, PosteriorConfig, Prior, DEFAULT_INITIAL_SIGMA};
pub use sequential::{Activation, AppliedBefore, Flatten, Sequential};
pub use whvi::{
    whvi_conv2d, whvi_linear, ConvSampling, WhviBlocks, WhviConv2d, WhviConv2dConfig, WhviLinear,
    WhviLinearConfig,
};

use candle_core::{Result, Shape, Tensor};

use crate::dist::Shard;
use crate::rng::WhviRng;

/// What a forward pass does with the posterior, and where its noise comes from.
///
/// The caller owns the random generator, so a seed reproduces a run bit for bit on the CPU.
/// A pass over one rank's [`Shard`] of a global batch draws per-example noise for the whole
/// batch and keeps its rows, and batch normalisation sums its statistics over the ranks.
pub struct Pass<'a> {
    train: bool,
    statistics: bool,
    rng: Option<&'a mut WhviRng>,
    shard: Option<Shard>,
}

impl<'a> Pass<'a> {
    /// A training pass: sample from the posterior, dropout on, BatchNorm uses batch statistics
    /// and updates its running statistics with them.
    pub fn train(rng: &'a mut WhviRng) -> Self {
        Pass {
            train: true,
            statistics: true,
            rng: Some(rng),
            shard: None,
        }
    }

    /// The same pass over this rank's `shard` of a global batch: the input holds the shard's
    /// rows only.
    pub fn on_shard(mut self, shard: Shard) -> Self {
        self.shard = Some(shard);
        self
    }

    /// The shard of a global batch this pass computes, if it computes one.
    pub fn shard(&self) -> Option<&Shard> {
        self.shard.as_ref()
    }

    /// The same pass, leaving BatchNorm's running statistics as they are: for the second and
    /// later posterior samples of one step, which see the same batch (updating once per sample
    /// would make the running average forget S times as fast).
    pub fn without_statistics(mut self) -> Self {
        self.statistics = false;
        self
    }

    /// Whether BatchNorm updates its running statistics in this pass.
    pub fn updates_statistics(&self) -> bool {
        self.train && self.statistics
    }

    /// A prediction pass that draws one posterior sample (one Monte Carlo sample of the
    /// predictive distribution); BatchNorm uses its running statistics.
    pub fn sample(rng: &'a mut WhviRng) -> Self {
        Pass {
            train: false,
            statistics: false,
            rng: Some(rng),
            shard: None,
        }
    }

    /// A prediction pass through the posterior mean (no noise, dropout off).
    pub fn mean() -> Self {
        Pass {
            train: false,
            statistics: false,
            rng: None,
            shard: None,
        }
    }

    /// Whether this pass trains (BatchNorm updates and uses batch statistics).
    pub fn is_train(&self) -> bool {
        self.train
    }

    /// Whether layers draw from their posterior in this pass.
    pub fn is_sampling(&self) -> bool {
        self.rng.is_some()
    }

    /// The generator of a sampling pass; `None` in a mean pass.
    pub fn rng(&mut self) -> Option<&mut WhviRng> {
        self.rng.as_deref_mut()
    }

    /// Per-example noise of `shape` (its first dimension a whole number of entries per input
    /// row) from `draw`; `None` in a mean pass. On a shard, `draw` makes the global batch's
    /// noise and this rank's rows are kept, so every rank's generator stays in step with one
    /// process drawing for the whole batch.
    pub fn per_example_noise(
        &mut self,
        shape: impl Into<Shape>,
        draw: impl FnOnce(Shape, &mut WhviRng) -> Result<Tensor>,
    ) -> Option<Result<Tensor>> {
        let rng = self.rng.as_deref_mut()?;
        let shape = shape.into();
        let Some(shard) = &self.shard else {
            return Some(draw(shape, rng));
        };
        let noise = || {
            let mut dims = shape.dims().to_vec();
            let local = *dims.first().unwrap_or(&1);
            if let Some(first) = dims.first_mut() {
                *first = shard.global_rows(local)?;
            }
            shard.take(&draw(Shape::from(dims), rng)?)
        };
        Some(noise())
    }
}

/// What a layer's tensor is for, as the layer that creates it declares: the optimiser and the
/// training loop treat each role differently, whatever the tensor is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// A weight matrix or filter bank of a point-estimate layer: trained, with weight decay.
    Weight,
    /// A bias: trained, without weight decay.
    Bias,
    /// A WHVI diagonal (`S1`, `S2`): trained at its own learning-rate factor (the diagonals
    /// scale every weight of the block, so they move slowly at the base rate), without weight
    /// decay.
    Diagonal,
    /// A posterior's mean or log standard deviation: trained; the KL term is its regulariser,
    /// so no weight decay.
    Variational,
    /// A BatchNorm scale or shift: trained, without weight decay.
    Normalization,
    /// A running statistic: updated by training forward passes, not by the optimiser, and not
    /// counted as a parameter.
    RunningStatistic,
}

impl ParamRole {
    /// Whether the optimiser updates tensors of this role.
    pub fn is_trained(self) -> bool {
        self != ParamRole::RunningStatistic
    }

    /// Whether weight decay applies to tensors of this role.
    pub fn is_decayed(self) -> bool {
        self == ParamRole::Weight
    }
}

/// One tensor of a layer, with its role.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// The tensor (the variable's own, so it can be matched to the [`candle_core::Var`] that
    /// holds it by [`Tensor::id`]).
    pub tensor: Tensor,
    /// What it is for.
    pub role: ParamRole,
}

impl Parameter {
    /// `tensor` in the role `role`.
    pub fn new(tensor: &Tensor, role: ParamRole) -> Self {
        Parameter {
            tensor: tensor.clone(),
            role,
        }
    }
}

/// The number of trained values among `parameters` (running statistics excluded).
pub fn count_trained(parameters: &[Parameter]) -> usize {
    parameters
        .iter()
        .filter(|p| p.role.is_trained())
        .map(|p| p.tensor.elem_count())
        .sum()
}

/// A layer with a (possibly degenerate) posterior over its weights.
pub trait BayesianModule: Send + Sync {
    /// The forward pass; samples or uses the posterior mean as `pass` says.
    fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor>;

    /// KL(q || p) of this layer's posterior from its prior, a scalar; `None` (the default) for
    /// layers without a posterior (deterministic layers, activations), whose KL is zero.
    fn kl(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The tensors this layer owns, each with its role; none (the default) for activations,
    /// pooling and dropout.
    fn parameters(&self) -> Vec<Parameter> {
        Vec::new()
    }

    /// The number of trained values, counted from [`parameters`](Self::parameters) (a WHVI
    /// block counts its 4·D variational parameters; running statistics are not counted).
    fn num_params(&self) -> usize {
        count_trained(&self.parameters())
    }

    /// A short description for model summaries, e.g. `WhviLinear(512 -> 10, D=512, 1 block)`.
    fn describe(&self) -> String;
}

/// Sums the KL terms of `layers` (zero, as an f32 scalar on `device`, if none has a posterior).
pub fn total_kl<'a>(
    layers: impl IntoIterator<Item = &'a dyn BayesianModule>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut total = Tensor::zeros((), candle_core::DType::F32, device)?;
    for layer in layers {
        if let Some(kl) = layer.kl()? {
            total = (total + kl.to_dtype(candle_core::DType::F32)?)?;
        }
    }
    Ok(total)
}
