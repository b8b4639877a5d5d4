//! WHVI layers: `W = S1 · H · diag(g) · H · S2` per block, `g ~ N(mu, diag(sigma^2))`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::bias::add_bias;
use super::noise::standard_normal;
use super::prior::{gaussian_kl, PosteriorConfig};
use super::whvi_kernel::WhviProduct;
use super::{BayesianModule, ParamRole, Parameter, Pass};
use crate::conv::{self, ConvGeometry};
use crate::fwht::{fwht, Scaling};

/// The variational parameters of a stack of WHVI blocks representing a `d_out x d_in` matrix.
///
/// The input is zero-padded to `D = next_power_of_two(d_in)`; `ceil(d_out / D)` independent
/// `D x D` blocks are stacked and the first `d_out` rows kept. Per block: `s1`, `s2` (learned
/// diagonals), `mu` and `log_sigma` (sigma is stored as its logarithm, so it stays positive
/// without clamping). All four have shape `[blocks, D]`.
#[derive(Debug, Clone)]
pub struct WhviBlocks {
    d_in: usize,
    d_out: usize,
    d: usize,
    blocks: usize,
    s1: Tensor,
    s2: Tensor,
    mu: Tensor,
    log_sigma: Tensor,
    prior_var: f64,
}

impl WhviBlocks {
    /// Creates (or loads, through `vb`) the parameters of a `d_out x d_in` WHVI matrix.
    ///
    /// Initialisation (the method's section 5): `s1`, `s2` near 1 (`N(1, 0.1^2)`);
    /// `mu ~ N(0, 2 / (D · d_in))`, so the mean matrix has He-like scale `sqrt(2 / d_in)`;
    /// `sigma` at `posterior.initial_sigma` (1% by default) of `mu`'s scale. The diagonals are
    /// positive rather than random-sign: a sign flip of a row or column is orthogonal and
    /// changes nothing in the spectrum of the mean matrix, while the jitter already breaks the
    /// `W_ij = (H mu)_{i xor j}` symmetry.
    pub fn new(
        d_in: usize,
        d_out: usize,
        posterior: PosteriorConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        if d_in == 0 || d_out == 0 {
            candle_core::bail!("a WHVI matrix needs d_in, d_out >= 1 (got {d_out} x {d_in})");
        }
        // The FWHT takes rows of at most 2^30.
        let Some(d) = d_in.checked_next_power_of_two().filter(|&d| d <= 1 << 30) else {
            candle_core::bail!("a WHVI matrix takes d_in <= 2^30 (got {d_in})");
        };
        let blocks = d_out.div_ceil(d);
        let mu_std = (2.0 / (d as f64 * d_in as f64)).sqrt();
        let initial_log_sigma = posterior.initial_log_sigma(mu_std)?;
        let s_init = Init::Randn {
            mean: 1.0,
            stdev: 0.1,
        };
        let s1 = vb.get_with_hints((blocks, d), "s1", s_init)?;
        let s2 = vb.get_with_hints((blocks, d), "s2", s_init)?;
        let mu = vb.get_with_hints(
            (blocks, d),
            "mu",
            Init::Randn {
                mean: 0.0,
                stdev: mu_std,
            },
        )?;
        let log_sigma =
            vb.get_with_hints((blocks, d), "log_sigma", Init::Const(initial_log_sigma))?;
        let prior_var = posterior.prior.variance(2.0 / (d as f64 * d_in as f64));
        Ok(WhviBlocks {
            d_in,
            d_out,
            d,
            blocks,
            s1,
            s2,
            mu,
            log_sigma,
            prior_var,
        })
    }

    /// The input size.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// The output size.
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// The padded block size D (a power of two).
    pub fn block_size(&self) -> usize {
        self.d
    }

    /// The number of stacked blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks
    }

    /// The prior variance lambda of `g`.
    pub fn prior_variance(&self) -> f64 {
        self.prior_var
    }

    /// The parameters `(s1, s2, mu, log_sigma)`, each `[blocks, D]`.
    pub fn parameters(&self) -> (&Tensor, &Tensor, &Tensor, &Tensor) {
        (&self.s1, &self.s2, &self.mu, &self.log_sigma)
    }

    /// The four tensors with their roles: `s1`, `s2` are diagonals, `mu`, `log_sigma` the
    /// posterior of `g` (`4 · D · blocks` values in all).
    pub fn roles(&self) -> [Parameter; 4] {
        [
            Parameter::new(&self.s1, ParamRole::Diagonal),
            Parameter::new(&self.s2, ParamRole::Diagonal),
            Parameter::new(&self.mu, ParamRole::Variational),
            Parameter::new(&self.log_sigma, ParamRole::Variational),
        ]
    }

    /// Draws `g = mu + sigma ⊙ eps`: `[samples, blocks, D]`.
    pub fn sample_g(&self, samples: usize, rng: &mut crate::rng::WhviRng) -> Result<Tensor> {
        self.g_from_noise(&self.standard_noise(samples, rng)?)
    }

    /// `eps ~ N(0, I)` of shape `[samples, blocks, D]`.
    fn standard_noise(&self, samples: usize, rng: &mut crate::rng::WhviRng) -> Result<Tensor> {
        let (dtype, device) = (self.mu.dtype(), self.mu.device());
        standard_normal((samples, self.blocks, self.d), dtype, device, rng)
    }

    /// `g = mu + sigma ⊙ eps` for noise `eps` `[samples, blocks, D]`.
    fn g_from_noise(&self, eps: &Tensor) -> Result<Tensor> {
        eps.broadcast_mul(&self.log_sigma.exp()?)?
            .broadcast_add(&self.mu)
    }

    /// `g` for a pass: one draw `[1, blocks, D]` shared by the batch (`per_example` false) or
    /// one per example `[rows, blocks, D]` when sampling, else `mu` as `[1, blocks, D]`.
    fn g_for(&self, rows: usize, per_example: bool, pass: &mut Pass) -> Result<Tensor> {
        if per_example && pass.is_sampling() {
            return self.g_from_noise(&self.noise_for(rows, pass)?);
        }
        match pass.rng() {
            Some(rng) => self.sample_g(1, rng),
            None => self.mu.unsqueeze(0),
        }
    }

    /// The standard-normal noise of a pass: one draw `[rows, blocks, D]` per example when
    /// sampling (the draws [`WhviBlocks::sample_g`] makes), else zeros `[1, blocks, D]` (g = mu).
    fn noise_for(&self, rows: usize, pass: &mut Pass) -> Result<Tensor> {
        let (dtype, device) = (self.mu.dtype(), self.mu.device());
        match pass.per_example_noise((rows, self.blocks, self.d), |shape, rng| {
            standard_normal(shape, dtype, device, rng)
        }) {
            Some(noise) => noise,
            None => Tensor::zeros((1, self.blocks, self.d), dtype, device),
        }
    }

    /// `W x (+ bias)` for each row of `x` (`[B, d_in]` -> `[B, d_out]`) with
    /// `g = mu + sigma ⊙ eps`, `eps` `[B or 1, blocks, D]` and `bias` `[d_out]`: the same result
    /// as [`WhviBlocks::apply`] plus the bias, through one fused op on the CPU (f32 / f64) that
    /// keeps each row in cache for all its steps.
    pub fn apply_with_noise(
        &self,
        x: &Tensor,
        eps: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let fused = x.device().is_cpu()
            && matches!(self.mu.dtype(), DType::F32 | DType::F64)
            && x.dtype() == self.mu.dtype()
            && eps.dtype() == x.dtype()
            && bias.is_none_or(|b| {
                b.device().is_cpu() && b.dtype() == x.dtype() && b.dims() == [self.d_out]
            });
        if !fused {
            let y = self.apply(x, &self.g_from_noise(eps)?)?;
            return match bias {
                Some(bias) => add_bias(&y, bias),
                None => y.contiguous(),
            };
        }
        let x = if self.d > self.d_in {
            x.pad_with_zeros(D::Minus1, 0, self.d - self.d_in)?
        } else {
            x.contiguous()?
        };
        let width = self.blocks * self.d;
        let bias = match bias {
            Some(b) => b
                .pad_with_zeros(0, 0, width - self.d_out)?
                .reshape((self.blocks, self.d))?,
            None => self.mu.zeros_like()?,
        };
        let params = Tensor::stack(&[&self.s1, &self.s2, &self.mu, &self.log_sigma, &bias], 0)?;
        let y = x.apply_op3(&eps.contiguous()?, &params, WhviProduct)?;
        if self.d_out < width {
            // A contiguous output, as on the other path and as the separate bias add gave.
            y.narrow(1, 0, self.d_out)?.contiguous()
        } else {
            Ok(y)
        }
    }

    /// `W x` for each row of `x` (`[B, d_in]` -> `[B, d_out]`) with `g` `[B or 1, blocks, D]`,
    /// as `S1 · H · ((H · S2 x) ⊙ g)`: two FWHTs per example, `W` never formed.
    pub fn apply(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let batch = x.dim(0)?;
        let x = if self.d > self.d_in {
            x.pad_with_zeros(D::Minus1, 0, self.d - self.d_in)?
        } else {
            x.clone()
        };
        let v = x.unsqueeze(1)?.broadcast_mul(&self.s2)?;
        let v = fwht(&v, Scaling::None)?.broadcast_mul(g)?;
        let v = fwht(&v, Scaling::None)?.broadcast_mul(&self.s1)?;
        v.reshape((batch, self.blocks * self.d))?
            .narrow(1, 0, self.d_out)
    }

    /// The rows of H used by the rows of W (`[rows, D]`, row `r` is `h_{r mod D}`).
    pub fn hadamard_rows(&self, device: &Device) -> Result<Tensor> {
        let rows = self.d_out.min(self.d);
        let mut values = Vec::with_capacity(rows * self.d);
        for i in 0..rows {
            for j in 0..self.d {
                let parity = (i & j).count_ones() & 1;
                values.push(if parity == 0 { 1f32 } else { -1f32 });
            }
        }
        Tensor::from_vec(values, (rows, self.d), device)?.to_dtype(self.mu.dtype())
    }

    /// The explicit matrices `W` for `g` of shape `[S, blocks, D]`: `[S, d_out, d_in]`.
    ///
    /// Row `r` (block `b = r / D`, `i = r mod D`) is `s1_{b,i} · H (h_i ⊙ g_b) ⊙ s2_b`, since
    /// `H diag(g) H` is symmetric with rows `H (h_i ⊙ g)`. `hadamard_rows` is the tensor from
    /// [`WhviBlocks::hadamard_rows`] (cache it: it does not change).
    pub fn matrices(&self, g: &Tensor, hadamard_rows: &Tensor) -> Result<Tensor> {
        let samples = g.dim(0)?;
        let (h_rows, g_rows, s2_rows, s1_rows) = if self.blocks == 1 {
            (
                hadamard_rows.clone(),
                g.clone(),
                self.s2.clone(),
                self.s1.narrow(1, 0, self.d_out)?.squeeze(0)?,
            )
        } else {
            let block_of_row: Vec<u32> = (0..self.d_out).map(|r| (r / self.d) as u32).collect();
            let within: Vec<u32> = (0..self.d_out).map(|r| (r % self.d) as u32).collect();
            let device = g.device();
            let block_of_row = Tensor::new(block_of_row.as_slice(), device)?;
            let within = Tensor::new(within.as_slice(), device)?;
            (
                hadamard_rows.index_select(&within, 0)?,
                g.index_select(&block_of_row, 1)?,
                self.s2.index_select(&block_of_row, 0)?,
                self.s1.flatten_all()?.narrow(0, 0, self.d_out)?,
            )
        };
        // With one block g_rows is [S, 1, D] and broadcasts over the rows.
        let m = fwht(&h_rows.unsqueeze(0)?.broadcast_mul(&g_rows)?, Scaling::None)?;
        let w = m
            .broadcast_mul(&s2_rows.unsqueeze(0)?)?
            .broadcast_mul(&s1_rows.reshape((1, self.d_out, 1))?)?;
        w.narrow(2, 0, self.d_in)?
            .reshape((samples, self.d_out, self.d_in))
    }

    /// The mean matrix `S1 H diag(mu) H S2`, `[d_out, d_in]`.
    pub fn mean_matrix(&self) -> Result<Tensor> {
        let h_rows = self.hadamard_rows(self.mu.device())?;
        self.matrices(&self.mu.unsqueeze(0)?, &h_rows)?.squeeze(0)
    }

    /// KL(q(g) || p(g)) summed over blocks.
    pub fn kl(&self) -> Result<Tensor> {
        gaussian_kl(&self.mu, &self.log_sigma, self.prior_var)
    }
}

/// The settings of a WHVI dense layer (candle-nn's layers take a config the same way).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WhviLinearConfig {
    /// The prior of `g` and its initial width.
    pub posterior: PosteriorConfig,
}

/// A `d_in -> d_out` WHVI dense layer with its parameters under `vb`, as candle-nn's `linear`
/// builds a dense one.
pub fn whvi_linear(
    d_in: usize,
    d_out: usize,
    config: WhviLinearConfig,
    vb: VarBuilder,
) -> Result<WhviLinear> {
    WhviLinear::new(d_in, d_out, config, vb)
}

/// A WHVI dense layer `y = W x + b` with the local reparameterisation: a fresh `g` for every
/// example, applied through two FWHTs (the method's section 2).
#[derive(Debug, Clone)]
pub struct WhviLinear {
    blocks: WhviBlocks,
    bias: Tensor,
}

impl WhviLinear {
    /// A `d_in -> d_out` WHVI layer with a deterministic bias, parameters under `vb`
    /// (`s1`, `s2`, `mu`, `log_sigma`, `bias`).
    pub fn new(
        d_in: usize,
        d_out: usize,
        config: WhviLinearConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let blocks = WhviBlocks::new(d_in, d_out, config.posterior, vb.clone())?;
        let bias = vb.get_with_hints(d_out, "bias", Init::Const(0.0))?;
        Ok(WhviLinear { blocks, bias })
    }

    /// The WHVI matrix behind this layer.
    pub fn blocks(&self) -> &WhviBlocks {
        &self.blocks
    }

    /// The bias.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    fn forward_with_noise(&self, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (lead, d_in) = match x.dims() {
            [] => candle_core::bail!("WhviLinear: the input is a scalar; expected [.., d_in]"),
            dims => (&dims[..dims.len() - 1], dims[dims.len() - 1]),
        };
        if d_in != self.blocks.d_in {
            candle_core::bail!(
                "WhviLinear: the input has {d_in} features (shape {:?}) but the layer expects {}",
                x.dims(),
                self.blocks.d_in
            );
        }
        // Every reshape is a node whose gradient candle clears and adds in full: 2-D inputs, the
        // usual case, skip both.
        if lead.len() == 1 {
            return self.blocks.apply_with_noise(x, eps, Some(&self.bias));
        }
        let rows: usize = lead.iter().product();
        let y = self
            .blocks
            .apply_with_noise(&x.reshape((rows, d_in))?, eps, Some(&self.bias))?;
        let mut out_shape = lead.to_vec();
        out_shape.push(self.blocks.d_out);
        y.reshape(out_shape)
    }
}

impl BayesianModule for WhviLinear {
    fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        let eps = self.blocks.noise_for(rows, pass)?;
        self.forward_with_noise(x, &eps)
    }

    fn kl(&self) -> Result<Option<Tensor>> {
        self.blocks.kl().map(Some)
    }

    fn parameters(&self) -> Vec<Parameter> {
        let mut parameters = self.blocks.roles().to_vec();
        parameters.push(Parameter::new(&self.bias, ParamRole::Bias));
        parameters
    }

    fn describe(&self) -> String {
        format!(
            "WhviLinear({} -> {}, D={}, blocks={})",
            self.blocks.d_in, self.blocks.d_out, self.blocks.d, self.blocks.blocks
        )
    }
}

impl Module for WhviLinear {
    /// The posterior-mean forward pass, so the layer drops into plain candle code.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let eps = self.blocks.noise_for(1, &mut Pass::mean())?;
        self.forward_with_noise(x, &eps)
    }
}

/// How a WHVI convolution draws its filters (the method's section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConvSampling {
    /// One filter bank per forward pass, shared by the batch: the cheapest.
    #[default]
    Shared,
    /// One filter bank per example, applied as a grouped convolution: independent noise per
    /// example, like the local reparameterisation of dense layers.
    PerExample,
}

/// How a WHVI convolution is laid out and sampled: candle-nn's `Conv2dConfig` (groups 1,
/// dilation 1) plus the posterior's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WhviConv2dConfig {
    /// Stride (default 1).
    pub stride: usize,
    /// Zero padding on every side (default 0).
    pub padding: usize,
    /// One filter bank per batch or per example (default: per batch).
    pub sampling: ConvSampling,
    /// The prior of `g` and its initial width.
    pub posterior: PosteriorConfig,
}

impl Default for WhviConv2dConfig {
    fn default() -> Self {
        WhviConv2dConfig {
            stride: 1,
            padding: 0,
            sampling: ConvSampling::Shared,
            posterior: PosteriorConfig::default(),
        }
    }
}

/// A `k x k` WHVI convolution from `in_channels` to `out_channels` with its parameters under
/// `vb`, as candle-nn's `conv2d` builds a dense one.
pub fn whvi_conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    config: WhviConv2dConfig,
    vb: VarBuilder,
) -> Result<WhviConv2d> {
    WhviConv2d::new(in_channels, out_channels, kernel, config, vb)
}

/// A WHVI convolution: the filter bank `(C_out, C_in, k, k)` is a `C_out x (C_in·k·k)` WHVI
/// matrix. Stride and padding as in candle's `conv2d`; groups 1; deterministic bias.
#[derive(Debug, Clone)]
pub struct WhviConv2d {
    blocks: WhviBlocks,
    bias: Tensor,
    hadamard_rows: Tensor,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    sampling: ConvSampling,
}

impl WhviConv2d {
    /// A `k x k` WHVI convolution from `in_channels` to `out_channels`, laid out and sampled
    /// as `config` says; parameters under `vb` (`s1`, `s2`, `mu`, `log_sigma`, `bias`).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: WhviConv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let WhviConv2dConfig {
            stride,
            padding,
            sampling,
            posterior,
        } = config;
        if kernel == 0 || stride == 0 {
            candle_core::bail!("WhviConv2d: kernel size and stride must be >= 1");
        }
        let fan_in = kernel.checked_mul(kernel);
        let Some(fan_in) = fan_in.and_then(|k2| in_channels.checked_mul(k2)) else {
            candle_core::bail!(
                "WhviConv2d: {in_channels} x {kernel}^2 inputs per filter is too many"
            );
        };
        let blocks = WhviBlocks::new(fan_in, out_channels, posterior, vb.clone())?;
        let bias = vb.get_with_hints(out_channels, "bias", Init::Const(0.0))?;
        let hadamard_rows = blocks.hadamard_rows(vb.device())?;
        Ok(WhviConv2d {
            blocks,
            bias,
            hadamard_rows,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            sampling,
        })
    }

    /// The WHVI matrix behind the filter bank.
    pub fn blocks(&self) -> &WhviBlocks {
        &self.blocks
    }

    /// How filters are sampled.
    pub fn sampling(&self) -> ConvSampling {
        self.sampling
    }

    /// Filter banks `[S, C_out, C_in, k, k]` for `g` of shape `[S, blocks, D]`.
    pub fn filters(&self, g: &Tensor) -> Result<Tensor> {
        let samples = g.dim(0)?;
        self.blocks.matrices(g, &self.hadamard_rows)?.reshape((
            samples,
            self.out_channels,
            self.in_channels,
            self.kernel,
            self.kernel,
        ))
    }

    fn check_input(&self, x: &Tensor) -> Result<usize> {
        match x.dims() {
            &[b, c, _, _] if c == self.in_channels => Ok(b),
            dims => candle_core::bail!(
                "WhviConv2d: expected input [batch, {}, height, width], got {dims:?}",
                self.in_channels
            ),
        }
    }

    fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            stride: self.stride,
            padding: self.padding,
        }
    }
}

impl BayesianModule for WhviConv2d {
    fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let batch = self.check_input(x)?;
        let per_example = self.sampling == ConvSampling::PerExample && pass.is_sampling();
        let g = self.blocks.g_for(batch, per_example, pass)?;
        let filters = self.filters(&g)?;
        let bias = Some(&self.bias);
        if per_example {
            conv::conv2d_per_example(x, &filters, bias, self.geometry())
        } else {
            conv::conv2d(x, &filters.squeeze(0)?, bias, self.geometry())
        }
    }

    fn kl(&self) -> Result<Option<Tensor>> {
        self.blocks.kl().map(Some)
    }

    fn parameters(&self) -> Vec<Parameter> {
        let mut parameters = self.blocks.roles().to_vec();
        parameters.push(Parameter::new(&self.bias, ParamRole::Bias));
        parameters
    }

    fn describe(&self) -> String {
        format!(
            "WhviConv2d({} -> {}, k={}, s={}, p={}, D={}, blocks={}, {:?})",
            self.in_channels,
            self.out_channels,
            self.kernel,
            self.stride,
            self.padding,
            self.blocks.d,
            self.blocks.blocks,
            self.sampling
        )
    }
}

impl Module for WhviConv2d {
    /// The posterior-mean forward pass.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let filters = self.filters(&self.blocks.mu.unsqueeze(0)?)?;
        conv::conv2d(x, &filters.squeeze(0)?, Some(&self.bias), self.geometry())
    }
}
