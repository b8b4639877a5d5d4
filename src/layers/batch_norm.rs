//! Batch normalisation over channels, optionally followed by a ReLU and a 2x2 max pool, as one
//! CPU op.
//!
//! candle-nn's `BatchNorm` composes about ten tensor ops (a transpose and copy, means,
//! broadcast arithmetic), and autograd then runs the backward of each and adds every gradient
//! into a fresh zero tensor: some thirty sweeps over the activation per layer and step. Here
//! the forward is two sweeps (channel moments, then normalise-scale-shift-clamp) and the
//! backward two (channel sums, then the input gradient), with the gradient through the batch
//! statistics in closed form. With the pool fused in, the forward pools each window as it
//! normalises it and keeps a byte per window (where its maximum sits), so neither the
//! full-size output nor the pool's full-size input gradient is ever stored. Other devices and
//! element types use candle-nn's module (and [`MaxPool2d`]); trained on one rank's shard of a
//! batch, tensor ops whose channel sums are summed over the ranks.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, Var};
use candle_nn::{BatchNormConfig, ModuleT, VarBuilder};
use rayon::prelude::*;

use super::pool::{window_max, window_row, MaxPool2d};
use super::pool_simd::{pool_row_f32, Normalise};
use super::{BayesianModule, ParamRole, Parameter, Pass};
use crate::cpu::{slice, with_slices};
use crate::dist::{Group, Shard};
use crate::simd;
use std::sync::OnceLock;

/// Batch normalisation over the channels of `[B, C, H, W]` (eps 1e-5, momentum 0.1, affine),
/// with an optional ReLU and 2x2 max pool applied in the same op. Running statistics are stored as parameters
/// (`running_mean`, `running_var`) so that checkpoints carry them.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    inner: candle_nn::BatchNorm,
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    channels: usize,
    relu: bool,
    pool: bool,
}

impl BatchNorm2d {
    /// Batch normalisation of `channels` channels; parameters `weight`, `bias` and the buffers
    /// `running_mean`, `running_var`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::batch_norm(channels, BatchNormConfig::default(), vb)?;
        let Some((weight, bias)) = inner.weight_and_bias() else {
            bail!("batch norm: the default configuration is affine");
        };
        let (weight, bias) = (weight.clone(), bias.clone());
        // The running statistics are the variables candle-nn updates; sharing them keeps the
        // two paths (and the checkpoint) on one set of buffers.
        let running_mean = Var::from_tensor(inner.running_mean())?;
        let running_var = Var::from_tensor(inner.running_var())?;
        Ok(BatchNorm2d {
            inner,
            weight,
            bias,
            running_mean,
            running_var,
            channels,
            relu: false,
            pool: false,
        })
    }

    /// The same layer with a ReLU applied to its output (in the op itself on the CPU).
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }

    /// The same layer with a 2x2 max pool (stride 2) applied to its output, after the ReLU if
    /// it has one. On the CPU the op pools each window as it normalises it, so the full-size
    /// output is never stored, nor the pool's full-size input gradient; the backward reads
    /// where each window's maximum was from a byte the forward kept.
    pub fn with_max_pool(mut self) -> Self {
        self.pool = true;
        self
    }

    /// `[batch, channels, height, width]` of an input with this layer's channels.
    fn input_dims(&self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.channels {
            bail!(
                "batch norm: expected input [batch, {}, height, width], got {:?}",
                self.channels,
                x.dims()
            );
        }
        Ok((b, c, h, w))
    }

    fn fused_path(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() == 4
    }

    /// The CPU op. With `sync`, the batch statistics (and, in the backward pass, their
    /// gradients' channel sums) are summed over the group's ranks: the global batch's.
    fn forward_fused(
        &self,
        x: &Tensor,
        train: bool,
        update_statistics: bool,
        sync: Option<Group>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = self.input_dims(x)?;
        if self.pool && h.min(w) < 2 {
            bail!(
                "max pool: a 2x2 window does not fit a {h}x{w} input; use a larger input or \
                 fewer pooling stages"
            );
        }
        let x = x.contiguous()?;
        let mut count = b * h * w;
        let (mean, var) = if train {
            if count < 2 && sync.is_none() {
                bail!(
                    "batch norm: training needs more than one value per channel, got input \
                     {:?}; use a larger batch",
                    x.dims()
                );
            }
            let mut sums = match x.dtype() {
                DType::F32 => {
                    with_slices::<f32, _>("batch norm", &[&x], |d| channel_sums(d[0], c, h * w))?
                }
                _ => with_slices::<f64, _>("batch norm", &[&x], |d| channel_sums(d[0], c, h * w))?,
            };
            if let Some(group) = &sync {
                sums.push(count as f64);
                group.sum_f64(&mut sums);
                count = sums.pop().expect("pushed above") as usize;
                if count < 2 {
                    bail!(
                        "batch norm: training needs more than one value per channel, got {count} \
                         over all ranks; use a larger batch"
                    );
                }
            }
            let (mean, var) = moments(&sums, c, count);
            if update_statistics {
                let host = |values: &[f64]| Tensor::new(values, x.device());
                self.update_running(&host(&mean)?, &host(&var)?, count)?;
            }
            (mean, var)
        } else {
            (
                to_f64(self.running_mean.as_tensor())?,
                to_f64(self.running_var.as_tensor())?,
            )
        };
        let eps = BatchNormConfig::default().eps;
        if x.elem_count() == 0 {
            return match self.pool {
                true => Tensor::zeros((b, c, h / 2, w / 2), x.dtype(), x.device()),
                false => Ok(x),
            };
        }
        let op = BatchNormOp {
            plane: h * w,
            count,
            sync: sync.filter(|_| train),
            inv_std: var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect(),
            mean,
            batch_stats: train,
            relu: self.relu,
            pool: self.pool.then_some(w),
            maxima: OnceLock::new(),
        };
        x.apply_op3(&self.weight, &self.bias, op)
    }

    /// `running = (1 - momentum)·running + momentum·batch`, with the unbiased batch variance
    /// (PyTorch's convention). In tensor ops, so that on a GPU nothing waits for the host.
    fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let momentum = BatchNormConfig::default().momentum;
        let unbiased = count as f64 / (count - 1) as f64;
        for (stat, batch, factor) in [
            (&self.running_mean, mean, 1.0),
            (&self.running_var, var, unbiased),
        ] {
            let batch = batch.detach().flatten_all()?.to_dtype(stat.dtype())?;
            let new = ((stat.as_tensor() * (1.0 - momentum))? + (batch * (momentum * factor))?)?;
            stat.set(&new)?;
        }
        Ok(())
    }

    /// Training on one rank's shard in tensor ops (on a GPU, or an element type or shape the
    /// CPU op does not take): the statistics are the global batch's, summed over the ranks by
    /// [`Group::sum_tensor`], whose gradient brings the other ranks' share back to this shard.
    fn forward_synchronised(&self, x: &Tensor, pass: &mut Pass, shard: &Shard) -> Result<Tensor> {
        let (b, c, h, w) = self.input_dims(x)?;
        let count = shard.global_rows(b)? * h * w;
        let n = count as f64;
        if count < 2 {
            bail!(
                "batch norm: training needs more than one value per channel, got {n} over all \
                 ranks; use a larger batch"
            );
        }
        // Statistics in f32 at least: half-precision sums of a batch lose too much.
        let xs = match x.dtype() {
            DType::F64 => x.clone(),
            _ => x.to_dtype(DType::F32)?,
        };
        let group = shard.group();
        let global_mean = |t: &Tensor| group.sum_tensor(&t.sum_keepdim((0, 2, 3))?)? / n;
        let mean = global_mean(&xs)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = global_mean(&centred.sqr()?)?;
        if pass.updates_statistics() {
            self.update_running(&mean, &var, count)?;
        }
        let per_channel = |t: &Tensor| t.to_dtype(xs.dtype())?.reshape((1, c, 1, 1));
        let eps = BatchNormConfig::default().eps;
        let scale = (var + eps)?
            .sqrt()?
            .recip()?
            .broadcast_mul(&per_channel(&self.weight)?)?;
        let y = centred
            .broadcast_mul(&scale)?
            .broadcast_add(&per_channel(&self.bias)?)?
            .to_dtype(x.dtype())?;
        self.activate_and_pool(y, pass)
    }

    /// The ReLU and max pool after the normalisation, outside the CPU op.
    fn activate_and_pool(&self, y: Tensor, pass: &mut Pass) -> Result<Tensor> {
        let y = if self.relu { y.relu()? } else { y };
        if self.pool {
            MaxPool2d::new(2).forward_pass(&y, pass)
        } else {
            Ok(y)
        }
    }
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.to_vec1::<f64>()
}

impl BayesianModule for BatchNorm2d {
    fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let shard = pass
            .shard()
            .filter(|shard| shard.group().size() > 1)
            .cloned();
        if self.fused_path(x) {
            let sync = shard.map(|shard| shard.group().clone());
            return self.forward_fused(x, pass.is_train(), pass.updates_statistics(), sync);
        }
        if let (Some(shard), true) = (&shard, pass.is_train()) {
            return self.forward_synchronised(x, pass, shard);
        }
        // candle-nn's layer updates the running statistics in every training pass: put them
        // back when this pass must not.
        let kept = if pass.is_train() && !pass.updates_statistics() {
            Some((
                self.running_mean.as_tensor().copy()?,
                self.running_var.as_tensor().copy()?,
            ))
        } else {
            None
        };
        let y = self.inner.forward_t(x, pass.is_train())?;
        if let Some((mean, var)) = kept {
            self.running_mean.set(&mean)?;
            self.running_var.set(&var)?;
        }
        self.activate_and_pool(y, pass)
    }

    fn parameters(&self) -> Vec<Parameter> {
        vec![
            Parameter::new(&self.weight, ParamRole::Normalization),
            Parameter::new(&self.bias, ParamRole::Normalization),
            Parameter::new(self.running_mean.as_tensor(), ParamRole::RunningStatistic),
            Parameter::new(self.running_var.as_tensor(), ParamRole::RunningStatistic),
        ]
    }

    fn describe(&self) -> String {
        let relu = if self.relu { " + ReLU" } else { "" };
        let pool = if self.pool { " + MaxPool2d(2)" } else { "" };
        format!("BatchNorm2d({}){relu}{pool}", self.channels)
    }
}

/// Per-channel sums of NCHW data with `plane` pixels per channel, in f64: `channels` sums of
/// the values, then `channels` sums of their squares.
fn channel_sums<T: candle_core::WithDType>(x: &[T], channels: usize, plane: usize) -> Vec<f64> {
    let partial: Vec<(f64, f64)> = x
        .par_chunks(plane)
        .map(|p| {
            p.iter().fold((0.0, 0.0), |(s, q), &v| {
                let v = v.to_f64();
                (s + v, q + v * v)
            })
        })
        .collect();
    let mut sums = vec![0.0; 2 * channels];
    for (i, (s, q)) in partial.into_iter().enumerate() {
        sums[i % channels] += s;
        sums[channels + i % channels] += q;
    }
    sums
}

/// Mean and (biased) variance per channel from [`channel_sums`] over `count` values a channel.
fn moments(sums: &[f64], channels: usize, count: usize) -> (Vec<f64>, Vec<f64>) {
    let n = count as f64;
    (0..channels)
        .map(|c| {
            let m = sums[c] / n;
            (m, (sums[channels + c] / n - m * m).max(0.0))
        })
        .unzip()
}

/// `y = [pool]([relu](weight·(x - mean)·inv_std + bias))` per channel, applied through
/// `apply_op3(x, weight, bias)`. With `batch_stats` the statistics are the batch's own, so the
/// input gradient includes the path through them.
#[derive(Debug, Clone)]
struct BatchNormOp {
    /// Pixels per channel and image (`H·W`, at least 1).
    plane: usize,
    /// Values per channel in the (global) batch.
    count: usize,
    /// The ranks whose shards make up the batch, when the statistics are synchronised.
    sync: Option<Group>,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    batch_stats: bool,
    relu: bool,
    /// The input's width when a 2x2 max pool follows: the output is then pooled.
    pool: Option<usize>,
    /// With `pool`, per output value: where its window's first maximum sits (bits 0-1, row-major)
    /// and whether the ReLU zeroed it ([`MASKED`]). The forward writes them so that the backward
    /// reads a byte per window instead of normalising the window again.
    maxima: OnceLock<Vec<u8>>,
}

/// The bit of a window's entry in `BatchNormOp::maxima` that says the ReLU zeroed its maximum,
/// and with it the window's gradient.
const MASKED: u8 = 4;

/// Per-channel `(scale, shift)` of a normalisation: `z = scale·x + shift`.
type Affine<T> = (T, T);

/// One plane of the backward pass's operands: the input, the output gradient and (pooled) the
/// plane's entries of `BatchNormOp::maxima`.
type PlaneOperands<'a, T> = (&'a [T], &'a [T], &'a [u8]);

/// The gradients of the input (when asked for), the weight and the bias.
type Gradients<T> = (Option<Vec<T>>, Vec<T>, Vec<T>);

/// The element types of the op; f32 pools with the SIMD kernels of [`super::pool_simd`].
trait Element: candle_core::WithDType {
    /// Pools the leading windows of one output row from its two input rows in vectors, as
    /// [`BatchNormOp::pool_window`] would; returns how many it wrote.
    fn pool_row_simd(
        op: &BatchNormOp,
        rows: (&[Self], &[Self]),
        affine: Affine<Self>,
        outputs: (&mut [Self], &mut [u8]),
    ) -> usize;
}

impl Element for f32 {
    fn pool_row_simd(
        op: &BatchNormOp,
        rows: (&[f32], &[f32]),
        (scale, shift): Affine<f32>,
        outputs: (&mut [f32], &mut [u8]),
    ) -> usize {
        let norm = Normalise {
            scale,
            shift,
            relu: op.relu,
        };
        pool_row_f32(simd::level(), rows, norm, MASKED, outputs)
    }
}

impl Element for f64 {
    fn pool_row_simd(
        _: &BatchNormOp,
        _: (&[f64], &[f64]),
        _: Affine<f64>,
        _: (&mut [f64], &mut [u8]),
    ) -> usize {
        0
    }
}

/// The input gradient's coefficients for one channel: `dx = k·(dy' - shift - (x - mean)·slope)`.
#[derive(Clone, Copy)]
struct InputGrad<T> {
    k: T,
    shift: T,
    slope: T,
    mean: T,
}

impl<T: candle_core::WithDType> InputGrad<T> {
    #[inline(always)]
    fn at(&self, x: T, dy: T) -> T {
        self.k * (dy - self.shift - (x - self.mean) * self.slope)
    }
}

impl BatchNormOp {
    /// Channel `c`'s normalisation as a scale and shift.
    fn affine<T: candle_core::WithDType>(&self, c: usize, weight: &[T], bias: &[T]) -> Affine<T> {
        let scale = weight[c].to_f64() * self.inv_std[c];
        let shift = bias[c].to_f64() - self.mean[c] * scale;
        (T::from_f64(scale), T::from_f64(shift))
    }

    /// One value normalised, then clamped when a ReLU follows. The backward's mask
    /// ([`BatchNormOp::clamped`]) is exact only because it calls this with the same `affine`:
    /// a multiply and an add rounded apart, never fused.
    #[inline(always)]
    fn normalise<T: candle_core::WithDType>(&self, x: T, (scale, shift): Affine<T>) -> T {
        let z = x * scale + shift;
        let zero = T::from_f64(0.0);
        if self.relu && z < zero {
            zero
        } else {
            z
        }
    }

    /// [`BatchNormOp::normalise`] of a window's four values (written out: `[T; 4]::map` is
    /// left out of line, a call per window).
    #[inline(always)]
    fn normalise_window<T: candle_core::WithDType>(
        &self,
        [a, b, c, d]: [T; 4],
        affine: Affine<T>,
    ) -> [T; 4] {
        [
            self.normalise(a, affine),
            self.normalise(b, affine),
            self.normalise(c, affine),
            self.normalise(d, affine),
        ]
    }

    /// A window of inputs `x` pooled: its maximum after normalisation (and the ReLU), and its
    /// entry in `maxima`. Selects rather than branches: the mask is as unpredictable as the data.
    #[inline(always)]
    fn pool_window<T: candle_core::WithDType>(&self, x: [T; 4], affine: Affine<T>) -> (T, u8) {
        let (best, at) = window_max(self.normalise_window(x, affine));
        let masked = self.relu && best <= T::from_f64(0.0);
        (best, (at & 3) as u8 | if masked { MASKED } else { 0 })
    }

    /// Output values per channel and image.
    fn out_plane(&self) -> usize {
        match self.pool {
            Some(w) => (self.plane / w / 2) * (w / 2),
            None => self.plane,
        }
    }

    /// The output, and with `pool` the entries of `maxima`.
    fn forward<T: Element>(&self, x: &[T], weight: &[T], bias: &[T]) -> (Vec<T>, Vec<u8>) {
        let (channels, plane, out_plane) = (self.mean.len(), self.plane, self.out_plane());
        let outputs = x.len() / plane * out_plane;
        let mut y = vec![T::from_f64(0.0); outputs];
        let Some(w) = self.pool else {
            y.par_chunks_mut(plane)
                .zip(x.par_chunks(plane))
                .enumerate()
                .for_each(|(i, (out, xp))| {
                    let affine = self.affine(i % channels, weight, bias);
                    for (v, &xv) in out.iter_mut().zip(xp) {
                        *v = self.normalise(xv, affine);
                    }
                });
            return (y, Vec::new());
        };
        let mut maxima = vec![0; outputs];
        let wo = w / 2;
        y.par_chunks_mut(out_plane)
            .zip(maxima.par_chunks_mut(out_plane))
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(i, ((out, codes), xp))| {
                let affine = self.affine(i % channels, weight, bias);
                let rows = out.chunks_exact_mut(wo).zip(codes.chunks_exact_mut(wo));
                for (oy, (out_row, code_row)) in rows.enumerate() {
                    let input_rows = (&xp[2 * oy * w..][..w], &xp[(2 * oy + 1) * w..][..w]);
                    let done = T::pool_row_simd(self, input_rows, affine, (out_row, code_row));
                    let windows = window_row(xp, w, oy).skip(done);
                    let rest = out_row[done..].iter_mut().zip(&mut code_row[done..]);
                    for (x, (y, code)) in windows.zip(rest) {
                        (*y, *code) = self.pool_window(x, affine);
                    }
                }
            });
        (y, maxima)
    }

    /// Whether the ReLU zeroed (or left at zero) the output of input `x`: the forward's own
    /// arithmetic again, so neither backward sweep reads the output (one full-size stream fewer
    /// in each).
    #[inline(always)]
    fn clamped<T: candle_core::WithDType>(&self, x: T, affine: Affine<T>) -> bool {
        self.relu && self.normalise(x, affine) <= T::from_f64(0.0)
    }

    /// Per plane: `(Σ dy', Σ dy'·(x - mean))`, `dy'` the gradient past the pool and the ReLU
    /// (`codes`: the plane's entries of `maxima`, with `pool`).
    fn plane_grad_sums<T: candle_core::WithDType>(
        &self,
        c: usize,
        (xp, gp, codes): PlaneOperands<'_, T>,
        affine: Affine<T>,
    ) -> (f64, f64) {
        let m = self.mean[c];
        let Some(w) = self.pool else {
            return xp.iter().zip(gp).fold((0.0, 0.0), |(s, sx), (&xv, &g)| {
                let g = if self.clamped(xv, affine) {
                    0.0
                } else {
                    g.to_f64()
                };
                (s + g, sx + g * (xv.to_f64() - m))
            });
        };
        let (mut s, mut sx) = (0.0, 0.0);
        let wo = w / 2;
        for (oy, (g_row, code_row)) in gp.chunks_exact(wo).zip(codes.chunks_exact(wo)).enumerate() {
            for ((x, &g), &code) in window_row(xp, w, oy).zip(g_row).zip(code_row) {
                let g = if code & MASKED != 0 { 0.0 } else { g.to_f64() };
                s += g;
                sx += g * (x[usize::from(code & 3)].to_f64() - m);
            }
        }
        (s, sx)
    }

    /// One plane of the input gradient.
    fn plane_input_grad<T: candle_core::WithDType>(
        &self,
        dp: &mut [T],
        (xp, gp, codes): PlaneOperands<'_, T>,
        affine: Affine<T>,
        coefficients: InputGrad<T>,
    ) {
        let zero = T::from_f64(0.0);
        let Some(w) = self.pool else {
            for ((d, &xv), &g) in dp.iter_mut().zip(xp).zip(gp) {
                let g = if self.clamped(xv, affine) { zero } else { g };
                *d = coefficients.at(xv, g);
            }
            return;
        };
        // `dy'` is zero but at each window's maximum.
        let wo = w / 2;
        for (oy, (g_row, code_row)) in gp.chunks_exact(wo).zip(codes.chunks_exact(wo)).enumerate() {
            let (upper, lower) = dp[2 * oy * w..][..2 * w].split_at_mut(w);
            let grads = upper.chunks_exact_mut(2).zip(lower.chunks_exact_mut(2));
            let windows = window_row(xp, w, oy).zip(g_row).zip(code_row);
            for (((x, &g), &code), (du, dl)) in windows.zip(grads) {
                let g = if code & MASKED != 0 { zero } else { g };
                let at = code & 3;
                let pick = |i: u8| if at == i { g } else { zero };
                du[0] = coefficients.at(x[0], pick(0));
                du[1] = coefficients.at(x[1], pick(1));
                dl[0] = coefficients.at(x[2], pick(2));
                dl[1] = coefficients.at(x[3], pick(3));
            }
        }
        // A trailing column or row outside the windows.
        let pooled_rows = 2 * (gp.len() / wo);
        for (row, (d, xr)) in dp.chunks_exact_mut(w).zip(xp.chunks_exact(w)).enumerate() {
            let from = if row < pooled_rows { 2 * wo } else { 0 };
            for (d, &xv) in d[from..].iter_mut().zip(&xr[from..]) {
                *d = coefficients.at(xv, zero);
            }
        }
    }

    /// Gradients of x, weight and bias from the input, the parameters and the output gradient
    /// (the ReLU's mask recomputed from the input, the pool's windows read from `maxima`).
    fn gradients<T: candle_core::WithDType>(
        &self,
        [x, weight, bias, dy]: [&[T]; 4],
        want_input: bool,
    ) -> Result<Gradients<T>> {
        let (channels, plane, out_plane) = (self.mean.len(), self.plane, self.out_plane());
        // One (unused) entry per plane when nothing is pooled, so that the planes zip alike.
        let unpooled = vec![0; x.len() / plane];
        let (codes, code_plane) = match (self.pool, self.maxima.get()) {
            (None, _) => (unpooled.as_slice(), 1),
            (Some(_), Some(maxima)) => (maxima.as_slice(), out_plane),
            (Some(_), None) => bail!("batch norm backward: the pooled forward did not run"),
        };
        let sums: Vec<(f64, f64)> = x
            .par_chunks(plane)
            .zip(dy.par_chunks(out_plane).zip(codes.par_chunks(code_plane)))
            .enumerate()
            .map(|(i, (xp, (gp, cp)))| {
                let c = i % channels;
                self.plane_grad_sums(c, (xp, gp, cp), self.affine(c, weight, bias))
            })
            .collect();
        let mut sum_dy = vec![0.0; channels];
        let mut sum_dy_xc = vec![0.0; channels];
        for (i, (s, sx)) in sums.into_iter().enumerate() {
            sum_dy[i % channels] += s;
            sum_dy_xc[i % channels] += sx;
        }
        let d_weight = (0..channels)
            .map(|c| T::from_f64(sum_dy_xc[c] * self.inv_std[c]))
            .collect();
        let d_bias = sum_dy.iter().map(|&s| T::from_f64(s)).collect();
        // The input gradient goes through the global batch's statistics; the parameter
        // gradients stay this shard's share (the training step sums those over the ranks).
        if let (Some(group), true, true) = (&self.sync, want_input, self.batch_stats) {
            let mut global = [sum_dy.as_slice(), sum_dy_xc.as_slice()].concat();
            group.sum_f64(&mut global);
            sum_dy_xc = global.split_off(channels);
            sum_dy = global;
        }
        let dx = want_input.then(|| {
            let mut dx = vec![T::from_f64(0.0); x.len()];
            dx.par_chunks_mut(plane)
                .zip(x.par_chunks(plane))
                .zip(dy.par_chunks(out_plane).zip(codes.par_chunks(code_plane)))
                .enumerate()
                .for_each(|(i, ((dp, xp), (gp, cp)))| {
                    let c = i % channels;
                    let coefficients = self.input_grad_coefficients(c, weight, &sum_dy, &sum_dy_xc);
                    let affine = self.affine(c, weight, bias);
                    self.plane_input_grad(dp, (xp, gp, cp), affine, coefficients);
                });
            dx
        });
        Ok((dx, d_weight, d_bias))
    }

    /// `dx = k·(dy' - mean(dy') - (x - mean)·inv_std²·mean(dy'·(x - mean)))` for channel `c`,
    /// from the (global) channel sums; without batch statistics only `k·dy'` remains.
    fn input_grad_coefficients<T: candle_core::WithDType>(
        &self,
        c: usize,
        weight: &[T],
        sum_dy: &[f64],
        sum_dy_xc: &[f64],
    ) -> InputGrad<T> {
        let n = self.count as f64;
        let (shift, slope) = if self.batch_stats {
            let s = self.inv_std[c];
            (sum_dy[c] / n, sum_dy_xc[c] / n * s * s)
        } else {
            (0.0, 0.0)
        };
        InputGrad {
            k: T::from_f64(weight[c].to_f64() * self.inv_std[c]),
            shift: T::from_f64(shift),
            slope: T::from_f64(slope),
            mean: T::from_f64(self.mean[c]),
        }
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "batch-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        w_layout: &Layout,
        bias: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let channels = self.mean.len();
        if w_layout.dims() != [channels] || b_layout.dims() != [channels] {
            bail!("batch norm: weight and bias must be [{channels}]");
        }
        let (out, maxima) = match x {
            CpuStorage::F32(_) => {
                let (y, maxima) = self.forward(
                    slice(x, x_layout, "batch norm")?,
                    slice(weight, w_layout, "batch norm")?,
                    slice(bias, b_layout, "batch norm")?,
                );
                (CpuStorage::F32(y), maxima)
            }
            CpuStorage::F64(_) => {
                let (y, maxima) = self.forward(
                    slice(x, x_layout, "batch norm")?,
                    slice(weight, w_layout, "batch norm")?,
                    slice(bias, b_layout, "batch norm")?,
                );
                (CpuStorage::F64(y), maxima)
            }
            _ => bail!("batch norm: f32 or f64 expected"),
        };
        if self.pool.is_some() && self.maxima.set(maxima).is_err() {
            bail!("batch norm: an op object runs its pooled forward once");
        }
        let shape = match (self.pool, x_layout.dims()) {
            (Some(_), &[b, c, h, w]) => Shape::from((b, c, h / 2, w / 2)),
            (Some(_), dims) => bail!("batch norm + max pool: expected [B, C, H, W], got {dims:?}"),
            (None, _) => x_layout.shape().clone(),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = grad_res.contiguous()?;
        let want_input = x.track_op();
        let tensors = [x, weight, bias, &dy];
        match x.dtype() {
            DType::F32 => gradient_tensors::<f32>(self, tensors, want_input),
            DType::F64 => gradient_tensors::<f64>(self, tensors, want_input),
            other => bail!("batch norm backward: f32 or f64 expected, got {other:?}"),
        }
    }
}

/// The op's gradients as tensors: `[x, weight, bias, dy]` in, `(dx, dweight, dbias)` out.
fn gradient_tensors<T: candle_core::WithDType>(
    op: &BatchNormOp,
    tensors: [&Tensor; 4],
    want_input: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let [x, weight, bias, _] = tensors;
    let (dx, dw, db) = with_slices::<T, _>("batch norm backward", &tensors, |d| {
        op.gradients([d[0], d[1], d[2], d[3]], want_input)
    })??;
    let device = x.device();
    Ok((
        dx.map(|v| Tensor::from_vec(v, x.shape(), device))
            .transpose()?,
        Some(Tensor::from_vec(dw, weight.shape(), device)?),
        Some(Tensor::from_vec(db, bias.shape(), device)?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::mirrored_group;
    use crate::rng::seeded;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// A layer with a scale and shift other than 1 and 0, so that their gradients count.
    fn layer() -> BatchNorm2d {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let layer = BatchNorm2d::new(3, vb).unwrap().with_relu().with_max_pool();
        let set = |t: &Tensor, values: &[f32]| {
            let var = vars.data().lock().unwrap();
            let var = var.values().find(|v| v.as_tensor().id() == t.id()).unwrap();
            var.set(&Tensor::new(values, &Device::Cpu).unwrap())
                .unwrap();
        };
        set(&layer.weight, &[0.5, 1.5, -1.0]);
        set(&layer.bias, &[0.1, -0.2, 0.3]);
        layer
    }

    fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
        let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
        assert_eq!(a.dims(), b.dims(), "{what}");
        let worst = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
        let worst = worst
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(worst < 1e-5, "{what}: differs by {worst}");
    }

    /// The layer's output, the gradients of `sum(output · upstream)` with respect to its input,
    /// weight and bias, and its running statistics afterwards. The input is `copies` copies
    /// of a shard, and so is `upstream`.
    fn outcome(
        layer: &BatchNorm2d,
        x: &Tensor,
        copies: usize,
        forward: impl FnOnce(&BatchNorm2d, &Tensor) -> Tensor,
    ) -> Vec<Tensor> {
        let x = Var::from_tensor(x).unwrap();
        let y = forward(layer, x.as_tensor());
        let per_copy = y.elem_count() / copies;
        let upstream = Tensor::arange(0f32, per_copy as f32, &Device::Cpu)
            .unwrap()
            .affine(0.1, -1.0)
            .unwrap()
            .repeat(copies)
            .unwrap()
            .reshape(y.shape())
            .unwrap();
        let grads = (&y * upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = |t: &Tensor| grads.get(t).unwrap().clone();
        vec![
            y.clone(),
            grad(x.as_tensor()),
            grad(&layer.weight),
            grad(&layer.bias),
            layer.running_mean.as_tensor().clone(),
            layer.running_var.as_tensor().clone(),
        ]
    }

    /// Two ranks holding the same shard `x` (and the same gradient of their loss) make the
    /// global batch `[x; x]`. The tensor-op path
    /// (the GPU's) and the CPU op, both synchronised, must give rank 0 the global batch's
    /// output, the input gradient of the global loss (both halves' losses reach `x` through
    /// the statistics) and its running statistics; the weight's gradient is this shard's
    /// half, which the training step sums over the ranks.
    #[test]
    fn synchronised_statistics_in_tensor_ops_match_the_global_batch_and_the_cpu_op() {
        let x = Tensor::arange(0f32, 96.0, &Device::Cpu)
            .unwrap()
            .affine(0.37, 0.0)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((2, 3, 4, 4))
            .unwrap();
        let group = mirrored_group(0, 2);
        // Rank 0's rows of a global batch of 4.
        let shard = group.shard(4).unwrap();
        let mut rng = seeded(7);
        let tensor_ops = outcome(&layer(), &x, 1, |l, x| {
            l.forward_synchronised(x, &mut Pass::train(&mut rng), &shard)
                .unwrap()
        });
        let cpu_op = outcome(&layer(), &x, 1, |l, x| {
            l.forward_fused(x, true, true, Some(group.clone())).unwrap()
        });
        let both = Tensor::cat(&[&x, &x], 0).unwrap();
        let mut global = outcome(&layer(), &both, 2, |l, x| {
            l.forward_pass(x, &mut Pass::train(&mut rng)).unwrap()
        });
        // Rank 0's rows of the global output and input gradient; half of the global batch's
        // parameter gradients.
        for rows in &mut global[..2] {
            *rows = rows.narrow(0, 0, 2).unwrap();
        }
        for gradient in &mut global[2..4] {
            *gradient = (&*gradient * 0.5).unwrap();
        }
        let names = [
            "output",
            "input gradient",
            "weight gradient",
            "bias gradient",
        ];
        let names = names.iter().chain(&["running mean", "running variance"]);
        for (((name, t), c), g) in names.zip(&tensor_ops).zip(&cpu_op).zip(&global) {
            assert_close(t, g, &format!("tensor ops vs the global batch: {name}"));
            assert_close(c, g, &format!("CPU op vs the global batch: {name}"));
        }
    }
}
