//! Mean-field Gaussian layers (Bayes by backprop, Blundell et al. 2015): every weight has its
//! own independent Gaussian posterior, `2·d_in·d_out` variational parameters.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::bias::add_bias;
use super::noise::standard_normal;
use super::prior::{gaussian_kl, PosteriorConfig};
use super::{BayesianModule, ParamRole, Parameter, Pass};
use crate::conv::{self, ConvGeometry};

/// Keeps the square root of the local-reparameterisation variance differentiable at zero.
const VARIANCE_FLOOR: f64 = 1e-12;

/// The mean-field weights of a layer: `mu` and `log_sigma` of the same shape (sigma stored as
/// its logarithm), plus a deterministic bias.
#[derive(Debug, Clone)]
struct GaussianWeights {
    mu: Tensor,
    log_sigma: Tensor,
    bias: Tensor,
    prior_var: f64,
}

impl GaussianWeights {
    /// `shape` is `[out, in, ...]`; the fan-in is the product of all but the first.
    fn new(shape: &[usize], posterior: PosteriorConfig, vb: VarBuilder) -> Result<Self> {
        let fan_in = shape[1..]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .filter(|&n| n > 0);
        let (Some(fan_in), true) = (fan_in, shape[0] > 0) else {
            candle_core::bail!(
                "a mean-field layer needs sizes >= 1 whose product fits in 64 bits, got {shape:?}"
            );
        };
        let he_var = 2.0 / fan_in as f64;
        let initial_log_sigma = posterior.initial_log_sigma(he_var.sqrt())?;
        let mu = vb.get_with_hints(
            shape,
            "mu",
            Init::Randn {
                mean: 0.0,
                stdev: he_var.sqrt(),
            },
        )?;
        let log_sigma = vb.get_with_hints(shape, "log_sigma", Init::Const(initial_log_sigma))?;
        let bias = vb.get_with_hints(shape[0], "bias", Init::Const(0.0))?;
        Ok(GaussianWeights {
            mu,
            log_sigma,
            bias,
            prior_var: posterior.prior.variance(he_var),
        })
    }

    fn sigma_sq(&self) -> Result<Tensor> {
        (&self.log_sigma * 2.0)?.exp()
    }

    fn sample(&self, rng: &mut crate::rng::WhviRng) -> Result<Tensor> {
        let eps = standard_normal(self.mu.shape(), self.mu.dtype(), self.mu.device(), rng)?;
        &self.mu + (eps * self.log_sigma.exp()?)?
    }

    fn kl(&self) -> Result<Tensor> {
        gaussian_kl(&self.mu, &self.log_sigma, self.prior_var)
    }

    fn parameters(&self) -> Vec<Parameter> {
        vec![
            Parameter::new(&self.mu, ParamRole::Variational),
            Parameter::new(&self.log_sigma, ParamRole::Variational),
            Parameter::new(&self.bias, ParamRole::Bias),
        ]
    }
}

/// Adds `sqrt(var) ⊙ eps` to `mean`: the local reparameterisation (Kingma et al. 2015), which
/// samples pre-activations instead of weights, independently per example.
/// In a mean pass, `mean` itself.
fn local_noise(mean: Tensor, var: Tensor, pass: &mut Pass) -> Result<Tensor> {
    let (dtype, device) = (mean.dtype(), mean.device().clone());
    match pass.per_example_noise(mean.shape(), |shape, rng| {
        standard_normal(shape, dtype, &device, rng)
    }) {
        Some(eps) => mean + ((var + VARIANCE_FLOOR)?.sqrt()? * eps?)?,
        None => Ok(mean),
    }
}

/// A mean-field Gaussian dense layer with the local reparameterisation.
#[derive(Debug, Clone)]
pub struct MeanFieldLinear {
    weights: GaussianWeights,
    d_in: usize,
    d_out: usize,
}

impl MeanFieldLinear {
    /// A `d_in -> d_out` layer; parameters `mu`, `log_sigma` `[d_out, d_in]` and `bias`.
    pub fn new(
        d_in: usize,
        d_out: usize,
        posterior: PosteriorConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(MeanFieldLinear {
            weights: GaussianWeights::new(&[d_out, d_in], posterior, vb)?,
            d_in,
            d_out,
        })
    }
}

impl BayesianModule for MeanFieldLinear {
    fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let w = &self.weights;
        let mean = add_bias(&x.broadcast_matmul(&w.mu.t()?)?, &w.bias)?;
        if !pass.is_sampling() {
            return Ok(mean);
        }
        let var = x.sqr()?.broadcast_matmul(&w.sigma_sq()?.t()?)?;
        local_noise(mean, var, pass)
    }

    fn kl(&self) -> Result<Option<Tensor>> {
        self.weights.kl().map(Some)
    }

    fn parameters(&self) -> Vec<Parameter> {
        self.weights.parameters()
    }

    fn describe(&self) -> String {
        format!("MeanFieldLinear({} -> {})", self.d_in, self.d_out)
    }
}

/// How a mean-field convolution samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeanFieldConvMode {
    /// Local reparameterisation: sample the output from its Gaussian given the input,
    /// `conv(x, mu) + sqrt(conv(x^2, sigma^2)) ⊙ eps`; independent per example and position.
    #[default]
    Local,
    /// One weight sample per forward pass, shared by the batch.
    Shared,
}

/// A mean-field Gaussian convolution, groups 1, with a deterministic bias.
#[derive(Debug, Clone)]
pub struct MeanFieldConv2d {
    weights: GaussianWeights,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    mode: MeanFieldConvMode,
}

/// How a mean-field convolution is laid out and sampled: candle-nn's `Conv2dConfig` (groups
/// 1, dilation 1) plus the posterior's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanFieldConv2dConfig {
    /// Stride (default 1).
    pub stride: usize,
    /// Zero padding on every side (default 0).
    pub padding: usize,
    /// How the weight noise is drawn (default: local reparameterisation).
    pub mode: MeanFieldConvMode,
    /// The prior of the weights and their initial width.
    pub posterior: PosteriorConfig,
}

impl Default for MeanFieldConv2dConfig {
    fn default() -> Self {
        MeanFieldConv2dConfig {
            stride: 1,
            padding: 0,
            mode: MeanFieldConvMode::Local,
            posterior: PosteriorConfig::default(),
        }
    }
}

impl MeanFieldConv2d {
    /// A `k x k` mean-field convolution, laid out and sampled as `config` says; parameters
    /// `mu`, `log_sigma` `[C_out, C_in, k, k]` and `bias`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: MeanFieldConv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let MeanFieldConv2dConfig {
            stride,
            padding,
            mode,
            posterior,
        } = config;
        let shape = [out_channels, in_channels, kernel, kernel];
        Ok(MeanFieldConv2d {
            weights: GaussianWeights::new(&shape, posterior, vb)?,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            mode,
        })
    }

    fn conv(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let geo = ConvGeometry {
            stride: self.stride,
            padding: self.padding,
        };
        conv::conv2d(x, w, None, geo)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        y.broadcast_add(&self.weights.bias.reshape((1, self.out_channels, 1, 1))?)
    }
}

impl BayesianModule for MeanFieldConv2d {
    fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let w = &self.weights;
        let y = if self.mode == MeanFieldConvMode::Local && pass.is_sampling() {
            let mean = self.conv(x, &w.mu)?;
            let var = self.conv(&x.sqr()?, &w.sigma_sq()?)?;
            local_noise(mean, var, pass)?
        } else {
            match pass.rng() {
                Some(rng) => self.conv(x, &w.sample(rng)?)?,
                None => self.conv(x, &w.mu)?,
            }
        };
        self.add_bias(y)
    }

    fn kl(&self) -> Result<Option<Tensor>> {
        self.weights.kl().map(Some)
    }

    fn parameters(&self) -> Vec<Parameter> {
        self.weights.parameters()
    }

    fn describe(&self) -> String {
        format!(
            "MeanFieldConv2d({} -> {}, k={}, s={}, p={}, {:?})",
            self.in_channels, self.out_channels, self.kernel, self.stride, self.padding, self.mode
        )
    }
}
