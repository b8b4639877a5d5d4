//! The WHVI matrix-vector product with local reparameterisation as one fused CPU op.
//!
//! Composed from candle ops, `y = S1 H diag(mu + sigma ⊙ eps) H S2 x` costs about twenty
//! sweeps over `[batch, D]` tensors (each broadcast product, its backward and the reductions
//! over the batch allocate and stream a full tensor), which dominates the two FWHTs at large
//! `D`. Here every row goes through all the steps while it sits in L1/L2, forward and backward,
//! with the FWHT kernels of [`crate::fwht::cpu`]; rows run in parallel.
//!
//! The op is `WhviProduct(x, eps, params)` with `x` `[B, D]`, `eps` `[B or 1, blocks, D]` and
//! `params = stack(s1, s2, mu, log_sigma, bias)` `[5, blocks, D]` (the bias zero-padded to
//! `blocks x D`); it returns `[B, blocks * D]`. Its backward gives the gradients of `x` and
//! `params` (the noise has none). The bias and the flat output are part of the op because
//! candle's backward clears and adds a whole `[B, blocks * D]` gradient for every node in the
//! graph: at D = 4096 a separate bias add and a reshape took 40% of the layer's time, several
//! times the two FWHTs. Only the CPU with f32 / f64 runs it; [`super::WhviBlocks::apply`]
//! composes candle ops elsewhere.

use std::ops::{AddAssign, MulAssign};

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::cpu::slice;
use crate::fwht::cpu::Elem;

/// The op's name in error messages.
const OP: &str = "whvi product";

/// Element types of the fused kernel.
pub(crate) trait Float:
    Elem + AddAssign + MulAssign + Default + candle_core::WithDType
{
    fn exp(self) -> Self;
}

impl Float for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Float for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// The fused product; see the module documentation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WhviProduct;

/// Sizes of one application.
#[derive(Debug, Clone, Copy)]
struct Dims {
    rows: usize,
    blocks: usize,
    d: usize,
    /// Whether `eps` has one row per input row (else one row shared by all).
    eps_per_row: bool,
}

impl Dims {
    fn new(x: &[usize], eps: &[usize], params: &[usize]) -> Result<Self> {
        let (rows, d) = match *x {
            [rows, d] if d.is_power_of_two() => (rows, d),
            ref dims => bail!("whvi product: x must be [rows, 2^k], got {dims:?}"),
        };
        let blocks = match *params {
            [PARAMS, blocks, pd] if pd == d => blocks,
            ref dims => bail!("whvi product: params must be [5, blocks, {d}], got {dims:?}"),
        };
        let eps_per_row = match *eps {
            [1, b, ed] if b == blocks && ed == d => false,
            [r, b, ed] if r == rows && b == blocks && ed == d => true,
            ref dims => {
                bail!("whvi product: eps must be [{rows} or 1, {blocks}, {d}], got {dims:?}")
            }
        };
        Ok(Dims {
            rows,
            blocks,
            d,
            eps_per_row,
        })
    }

    fn eps_row<'a, T>(&self, eps: &'a [T], row: usize, block: usize) -> &'a [T] {
        let r = if self.eps_per_row { row } else { 0 };
        &eps[(r * self.blocks + block) * self.d..][..self.d]
    }
}

/// The parameter rows of the op: `s1, s2, mu, log_sigma, bias`.
const PARAMS: usize = 5;

/// The per-block parameters `s1, s2, mu, sigma, bias` as row slices.
struct Blocks<'a, T> {
    params: &'a [T],
    sigma: Vec<T>,
    blocks: usize,
    d: usize,
}

impl<'a, T: Float> Blocks<'a, T> {
    fn new(params: &'a [T], blocks: usize, d: usize) -> Self {
        let sigma = params[3 * blocks * d..4 * blocks * d]
            .iter()
            .map(|&v| v.exp())
            .collect();
        Blocks {
            params,
            sigma,
            blocks,
            d,
        }
    }

    fn get(&self, which: usize, block: usize) -> &[T] {
        &self.params[(which * self.blocks + block) * self.d..][..self.d]
    }

    fn sigma(&self, block: usize) -> &[T] {
        &self.sigma[block * self.d..][..self.d]
    }
}

fn forward<T: Float>(x: &[T], eps: &[T], params: &[T], dims: Dims) -> Vec<T> {
    let Dims { blocks, d, .. } = dims;
    let p = Blocks::new(params, blocks, d);
    let mut out = vec![T::default(); dims.rows * blocks * d];
    out.par_chunks_mut(blocks * d)
        .enumerate()
        .for_each(|(row, out_row)| {
            let x_row = &x[row * d..][..d];
            for (k, buf) in out_row.chunks_exact_mut(d).enumerate() {
                let (s1, s2, mu, sigma) = (p.get(0, k), p.get(1, k), p.get(2, k), p.sigma(k));
                let bias = p.get(4, k);
                let e = dims.eps_row(eps, row, k);
                for i in 0..d {
                    buf[i] = s2[i] * x_row[i];
                }
                crate::fwht::cpu::transform_in_place(buf, d, T::ONE);
                for i in 0..d {
                    buf[i] *= mu[i] + sigma[i] * e[i];
                }
                crate::fwht::cpu::transform_in_place(buf, d, T::ONE);
                for i in 0..d {
                    buf[i] = buf[i] * s1[i] + bias[i];
                }
            }
        });
    out
}

/// Gradients `(dx, dparams)` for upstream `dy` (`[rows, blocks * D]`).
fn backward<T: Float>(x: &[T], eps: &[T], params: &[T], dy: &[T], dims: Dims) -> (Vec<T>, Vec<T>) {
    let Dims {
        rows, blocks, d, ..
    } = dims;
    let p = Blocks::new(params, blocks, d);
    let mut dx = vec![T::default(); rows * d];
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = rows.div_ceil(4 * threads).max(1);
    let parts = dx
        .par_chunks_mut(rows_per_task * d)
        .enumerate()
        .map(|(task, dx_rows)| {
            // ds1, ds2, dmu, dlog_sigma, dbias of this task's rows.
            let mut acc = vec![T::default(); PARAMS * blocks * d];
            let (mut u, mut t, mut a) = (
                vec![T::default(); d],
                vec![T::default(); d],
                vec![T::default(); d],
            );
            for (r, dx_row) in dx_rows.chunks_exact_mut(d).enumerate() {
                let row = task * rows_per_task + r;
                let x_row = &x[row * d..][..d];
                for k in 0..blocks {
                    let (s1, s2, mu, sigma) = (p.get(0, k), p.get(1, k), p.get(2, k), p.sigma(k));
                    let e = dims.eps_row(eps, row, k);
                    let dy_row = &dy[(row * blocks + k) * d..][..d];
                    let (ds1, rest) = acc.split_at_mut(blocks * d);
                    let (ds2, rest) = rest.split_at_mut(blocks * d);
                    let (dmu, rest) = rest.split_at_mut(blocks * d);
                    let (dls, dbias) = rest.split_at_mut(blocks * d);
                    let ds1 = &mut ds1[k * d..][..d];
                    let ds2 = &mut ds2[k * d..][..d];
                    let dmu = &mut dmu[k * d..][..d];
                    let dls = &mut dls[k * d..][..d];
                    let dbias = &mut dbias[k * d..][..d];
                    // u = H (s2 ⊙ x), t = H (g ⊙ u): the forward intermediates, recomputed.
                    for i in 0..d {
                        u[i] = s2[i] * x_row[i];
                    }
                    crate::fwht::cpu::transform_in_place(&mut u, d, T::ONE);
                    for i in 0..d {
                        t[i] = u[i] * (mu[i] + sigma[i] * e[i]);
                    }
                    crate::fwht::cpu::transform_in_place(&mut t, d, T::ONE);
                    // a = H (s1 ⊙ dy) is the gradient of g ⊙ u.
                    for i in 0..d {
                        ds1[i] += dy_row[i] * t[i];
                        dbias[i] += dy_row[i];
                        a[i] = s1[i] * dy_row[i];
                    }
                    crate::fwht::cpu::transform_in_place(&mut a, d, T::ONE);
                    for i in 0..d {
                        let dg = a[i] * u[i];
                        dmu[i] += dg;
                        dls[i] += dg * e[i] * sigma[i];
                        a[i] *= mu[i] + sigma[i] * e[i];
                    }
                    // z = H (g ⊙ a) is the gradient of s2 ⊙ x.
                    crate::fwht::cpu::transform_in_place(&mut a, d, T::ONE);
                    for i in 0..d {
                        ds2[i] += a[i] * x_row[i];
                        dx_row[i] += a[i] * s2[i];
                    }
                }
            }
            acc
        })
        .collect::<Vec<_>>();
    // Summed in task order: rayon's `reduce` groups the parts as work stealing happened to run
    // them, so a run would not repeat bit for bit at the same thread count.
    let mut parts = parts.into_iter();
    let mut dparams = parts
        .next()
        .unwrap_or_else(|| vec![T::default(); PARAMS * blocks * d]);
    for part in parts {
        for (total, v) in dparams.iter_mut().zip(part) {
            *total += v;
        }
    }
    (dx, dparams)
}

/// [`backward`] on the storages of `x`, `eps`, `params` and the upstream gradient, as tensors
/// shaped like `x` and `params`.
fn gradients<T: Float>(
    inputs: [(&CpuStorage, &Layout); 4],
    dims: Dims,
    x: &Tensor,
    params: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let [xs, eps, ps, dy] = inputs;
    let (dx, dparams) = backward::<T>(
        slice(xs.0, xs.1, OP)?,
        slice(eps.0, eps.1, OP)?,
        slice(ps.0, ps.1, OP)?,
        slice(dy.0, dy.1, OP)?,
        dims,
    );
    Ok((
        Tensor::from_vec(dx, x.shape(), x.device())?,
        Tensor::from_vec(dparams, params.shape(), params.device())?,
    ))
}

impl CustomOp3 for WhviProduct {
    fn name(&self) -> &'static str {
        "whvi-product"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        eps: &CpuStorage,
        eps_layout: &Layout,
        params: &CpuStorage,
        params_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::new(x_layout.dims(), eps_layout.dims(), params_layout.dims())?;
        let out = match x {
            CpuStorage::F32(_) => CpuStorage::F32(forward::<f32>(
                slice(x, x_layout, OP)?,
                slice(eps, eps_layout, OP)?,
                slice(params, params_layout, OP)?,
                dims,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(forward::<f64>(
                slice(x, x_layout, OP)?,
                slice(eps, eps_layout, OP)?,
                slice(params, params_layout, OP)?,
                dims,
            )),
            _ => bail!("whvi product: f32 or f64 expected"),
        };
        Ok((out, Shape::from((dims.rows, dims.blocks * dims.d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        eps: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::new(x.dims(), eps.dims(), params.dims())?;
        let grad_res = grad_res.contiguous()?;
        // Read the inputs in place: copying them out would cost as much as the kernel.
        let guards = [x, eps, params, &grad_res].map(|t| t.storage_and_layout());
        let cpu = |i: usize| -> Result<(&CpuStorage, &Layout)> {
            match &*guards[i].0 {
                Storage::Cpu(s) => Ok((s, guards[i].1)),
                _ => bail!("whvi product: the backward pass runs on the CPU only"),
            }
        };
        let (xs, eps_s, ps, gs) = (cpu(0)?, cpu(1)?, cpu(2)?, cpu(3)?);
        let (dx, dparams) = match x.dtype() {
            DType::F32 => gradients::<f32>([xs, eps_s, ps, gs], dims, x, params)?,
            DType::F64 => gradients::<f64>([xs, eps_s, ps, gs], dims, x, params)?,
            other => bail!("whvi product: f32 or f64 expected, got {other:?}"),
        };
        drop(guards);
        Ok((Some(dx), None, Some(dparams)))
    }
}
