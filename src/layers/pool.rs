//! Max pooling with a square window whose stride equals its size.
//!
//! candle's `max_pool2d` backward upsamples the output, compares it with the input and divides
//! by the tie count: several full-size tensors per layer. On the CPU the op here routes each
//! window's gradient to its first maximum in one sweep.

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{BayesianModule, Pass};
use crate::cpu::{slice, with_slices};

/// A `size x size` max pool with stride `size` (trailing rows and columns that do not fill a
/// window are dropped, as in candle and PyTorch).
#[derive(Debug, Clone, Copy)]
pub struct MaxPool2d {
    size: usize,
}

impl MaxPool2d {
    /// A `size x size` max pool with stride `size`.
    pub fn new(size: usize) -> Self {
        MaxPool2d { size }
    }
}

impl BayesianModule for MaxPool2d {
    fn forward_pass(&self, x: &Tensor, _pass: &mut Pass) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if self.size == 0 || h < self.size || w < self.size {
            bail!(
                "max pool: a {0}x{0} window does not fit a {h}x{w} input; use a larger input or \
                 fewer pooling stages",
                self.size
            );
        }
        let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        if !fused {
            return x.max_pool2d(self.size);
        }
        x.contiguous()?.apply_op1(MaxPoolOp { size: self.size })
    }

    fn describe(&self) -> String {
        format!("MaxPool2d({})", self.size)
    }
}

/// Whether `v` replaces `best` as a window's maximum: larger, or the first NaN. A NaN wins, so
/// the output is NaN as in PyTorch; the first NaN keeps the gradient (PyTorch's CPU kernel
/// moves it to the last). `v != v` is the NaN test that compiles to one compare; `|` and `&`
/// rather than `||` and `&&`, whose short circuits compiled to branches.
#[inline(always)]
#[allow(clippy::eq_op)]
fn beats<T: PartialOrd + Copy>(v: T, best: T) -> bool {
    (v > best) | ((v != v) & (best == best))
}

/// The maximum of a 2x2 window `[a, b, c, d]` (row-major) and the position of its first
/// maximum. The comparisons become selects, not branches: on real activations a branch per
/// comparison is mispredicted about half the time, which made pooling run at a few cycles per
/// input value.
#[inline(always)]
pub(super) fn window_max<T: PartialOrd + Copy>([a, b, c, d]: [T; 4]) -> (T, usize) {
    let (best, at) = challenge((a, 0), b, 1);
    let (best, at) = challenge((best, at), c, 2);
    challenge((best, at), d, 3)
}

/// The window's running maximum and its position after value `v` at position `i`.
#[inline(always)]
fn challenge<T: PartialOrd + Copy>((best, at): (T, usize), v: T, i: usize) -> (T, usize) {
    let wins = beats(v, best);
    (if wins { v } else { best }, if wins { i } else { at })
}

/// The 2x2 pool (every VGG pool) of one `h x w` plane into `out` (`ho x wo`).
fn forward_2x2<T: PartialOrd + Copy>(plane: &[T], w: usize, wo: usize, out: &mut [T]) {
    for (oy, out_row) in out.chunks_exact_mut(wo).enumerate() {
        for (window, y) in window_row(plane, w, oy).zip(out_row) {
            *y = window_max(window).0;
        }
    }
}

/// The 2x2 windows (stride 2) under output row `oy` of a plane `w` wide, each as its four
/// inputs in row-major order; a trailing column that does not fill a window is left out, as by
/// PyTorch's pool.
pub(super) fn window_row<T: Copy>(
    plane: &[T],
    w: usize,
    oy: usize,
) -> impl Iterator<Item = [T; 4]> + '_ {
    let wo = w / 2;
    let upper = plane[2 * oy * w..][..2 * wo].chunks_exact(2);
    let lower = plane[(2 * oy + 1) * w..][..2 * wo].chunks_exact(2);
    upper.zip(lower).map(|(u, l)| [u[0], u[1], l[0], l[1]])
}

/// The input gradient of the 2x2 pool for one plane: each window's output gradient `g` at its
/// first maximum and zero at its other three inputs, all four written (no scattered stores);
/// `d` starts zeroed, which covers rows and columns outside the windows.
fn input_grad_2x2<T: candle_core::WithDType>(
    plane: &[T],
    w: usize,
    wo: usize,
    g: &[T],
    d: &mut [T],
) {
    let zero = T::from_f64(0.0);
    for (oy, g_row) in g.chunks_exact(wo).enumerate() {
        let (d_upper, d_lower) = d[2 * oy * w..].split_at_mut(w);
        let grads = d_upper[..2 * wo]
            .chunks_exact_mut(2)
            .zip(d_lower[..2 * wo].chunks_exact_mut(2));
        for ((window, (du, dl)), &gv) in window_row(plane, w, oy).zip(grads).zip(g_row) {
            let at = window_max(window).1;
            du[0] = if at == 0 { gv } else { zero };
            du[1] = if at == 1 { gv } else { zero };
            dl[0] = if at == 2 { gv } else { zero };
            dl[1] = if at == 3 { gv } else { zero };
        }
    }
}

/// The CPU op: `[B, C, H, W]` to `[B, C, H / size, W / size]`.
#[derive(Debug, Clone, Copy)]
struct MaxPoolOp {
    size: usize,
}

impl MaxPoolOp {
    /// Input plane `h x w` and output plane sizes.
    fn planes(&self, dims: &[usize]) -> Result<(usize, usize, usize, usize)> {
        match *dims {
            [_, _, h, w] => Ok((h, w, h / self.size, w / self.size)),
            ref dims => bail!("max pool: expected [batch, channels, height, width], got {dims:?}"),
        }
    }

    /// Calls `f(output index in the plane, input index of the window's first maximum)` for every
    /// window of one `h x w` plane (windows other than 2x2, which have their own loops).
    fn for_each_window<T: PartialOrd + Copy>(
        &self,
        plane: &[T],
        w: usize,
        (ho, wo): (usize, usize),
        mut f: impl FnMut(usize, usize),
    ) {
        let k = self.size;
        for oy in 0..ho {
            for ox in 0..wo {
                let mut best = oy * k * w + ox * k;
                for dy in 0..k {
                    let row = (oy * k + dy) * w + ox * k;
                    for i in row..row + k {
                        if beats(plane[i], plane[best]) {
                            best = i;
                        }
                    }
                }
                f(oy * wo + ox, best);
            }
        }
    }

    fn forward<T: candle_core::WithDType>(&self, x: &[T], dims: &[usize]) -> Result<Vec<T>> {
        let (h, w, ho, wo) = self.planes(dims)?;
        let planes = x.len() / (h * w).max(1);
        let mut y = vec![T::from_f64(0.0); planes * ho * wo];
        if y.is_empty() {
            return Ok(y);
        }
        y.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each(|(out, plane)| {
                if self.size == 2 {
                    forward_2x2(plane, w, wo, out);
                } else {
                    self.for_each_window(plane, w, (ho, wo), |o, i| out[o] = plane[i]);
                }
            });
        Ok(y)
    }

    fn input_grad<T: candle_core::WithDType>(
        &self,
        x: &[T],
        dy: &[T],
        dims: &[usize],
    ) -> Result<Vec<T>> {
        let (h, w, ho, wo) = self.planes(dims)?;
        let mut dx = vec![T::from_f64(0.0); x.len()];
        if dy.is_empty() {
            return Ok(dx);
        }
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(dy.par_chunks(ho * wo)))
            .for_each(|(d, (plane, g))| {
                if self.size == 2 {
                    input_grad_2x2(plane, w, wo, g, d);
                } else {
                    self.for_each_window(plane, w, (ho, wo), |o, i| d[i] = g[o]);
                }
            });
        Ok(dx)
    }

    fn input_grad_tensor<T: candle_core::WithDType>(
        &self,
        x: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let dx = with_slices::<T, _>("max pool backward", &[x, dy], |d| {
            self.input_grad(d[0], d[1], x.dims())
        })??;
        Tensor::from_vec(dx, x.shape(), x.device())
    }
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "max-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.dims();
        let y = match storage {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward(slice(storage, layout, "max pool")?, dims)?)
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward(slice(storage, layout, "max pool")?, dims)?)
            }
            _ => bail!("max pool: f32 or f64 expected"),
        };
        let (_, _, ho, wo) = self.planes(dims)?;
        Ok((y, Shape::from((dims[0], dims[1], ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dy = grad_res.contiguous()?;
        let dx = match x.dtype() {
            DType::F32 => self.input_grad_tensor::<f32>(x, &dy)?,
            DType::F64 => self.input_grad_tensor::<f64>(x, &dy)?,
            other => bail!("max pool backward: f32 or f64 expected, got {other:?}"),
        };
        Ok(Some(dx))
    }
}
