//! The fast Walsh-Hadamard transform (FWHT) as a candle custom op.
//!
//! [`fwht`] transforms the last dimension of a tensor of any rank in natural (Sylvester) order:
//! `y = scale · H · x` with `H` the `D x D` Walsh-Hadamard matrix (entries ±1, `H·H = D·I`) and
//! `scale` set by [`Scaling`]. The cost is `D·log2(D)` additions per row instead of the
//! `D^2` multiply-adds of a matrix product.
//!
//! `H` is symmetric, so the gradient of the op is the same op (same scale) applied to the
//! incoming gradient: the transform takes part in backprop through [`Tensor::apply_op1`].

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, unix))]
mod gpu_emulation;
#[cfg(any(feature = "cuda", feature = "metal", test))]
mod gpu_plan;
mod kernel;
#[cfg(feature = "metal")]
mod metal;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod tests;

pub use cpu::{auto_kernel, fwht_rows_f32, fwht_rows_f32_into, fwht_rows_f64, fwht_rows_f64_into};

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// The largest transform length accepted, `2^30`.
pub const MAX_LEN: usize = 1 << 30;

/// How the transform is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scaling {
    /// `y = H·x`: entries of `H` are ±1, and `H·H = D·I`.
    #[default]
    None,
    /// `y = H·x / sqrt(D)`: orthonormal, so the transform is its own inverse.
    Orthonormal,
}

impl Scaling {
    /// The factor applied to `H·x` for rows of length `d`.
    pub fn scale(self, d: usize) -> f64 {
        match self {
            Scaling::None => 1.0,
            Scaling::Orthonormal => 1.0 / (d as f64).sqrt(),
        }
    }
}

/// The FWHT over the last dimension as a [`CustomOp1`].
///
/// Use [`fwht`] rather than applying this directly: it checks the input first and gives the
/// clearer error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fwht {
    /// How the transform is scaled.
    pub normalization: Scaling,
}

/// Applies the fast Walsh-Hadamard transform to the last dimension of `x`.
///
/// The last dimension must be a power of two (1, 2, 4, ..., up to [`MAX_LEN`]); use
/// [`fwht_padded`] to zero-pad other lengths. f32 and f64 are transformed in their own
/// precision; f16 and bf16 are computed in f32 and rounded once at the end. Non-contiguous
/// inputs are accepted. The result supports [`Tensor::backward`].
pub fn fwht(x: &Tensor, normalization: Scaling) -> candle_core::Result<Tensor> {
    check_input(x.dims(), x.dtype())?;
    let op = Fwht { normalization };
    if x.device().is_cpu() {
        x.apply_op1(op)
    } else {
        // The GPU kernels read rows in place, so they need a contiguous input.
        x.contiguous()?.apply_op1(op)
    }
}

/// Zero-pads the last dimension of `x` to the next power of two, then applies [`fwht`].
///
/// With [`Scaling::Orthonormal`] the scale is that of the padded length.
pub fn fwht_padded(x: &Tensor, normalization: Scaling) -> candle_core::Result<Tensor> {
    let d = last_dim(x.dims())?;
    let padded = d.next_power_of_two();
    if padded == d {
        return fwht(x, normalization);
    }
    let x = x.pad_with_zeros(x.rank() - 1, 0, padded - d)?;
    fwht(&x, normalization)
}

fn last_dim(dims: &[usize]) -> candle_core::Result<usize> {
    match dims.last() {
        Some(&d) => Ok(d),
        None => candle_core::bail!(
            "fwht: the input is a scalar (rank 0); the transform runs over the last dimension, \
             so give it at least one dimension (e.g. x.unsqueeze(0))"
        ),
    }
}

fn check_input(dims: &[usize], dtype: DType) -> candle_core::Result<()> {
    let d = last_dim(dims)?;
    if d == 0 {
        candle_core::bail!(
            "fwht: the last dimension of the input (shape {dims:?}) has size 0; the transform \
             needs a power-of-two length of at least 1"
        );
    }
    if !d.is_power_of_two() {
        candle_core::bail!(
            "fwht: the last dimension of the input (shape {dims:?}) is {d}, not a power of two; \
             zero-pad it to {} with whvi::fwht::fwht_padded, or pad the data yourself",
            d.next_power_of_two()
        );
    }
    if d > MAX_LEN {
        candle_core::bail!("fwht: the last dimension {d} is larger than the supported 2^30");
    }
    if !matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
        candle_core::bail!(
            "fwht: the input has dtype {dtype:?}; the transform needs a float tensor \
             (f32, f64, f16 or bf16): convert it first, e.g. x.to_dtype(DType::F32)"
        );
    }
    Ok(())
}

/// Copies the elements of a possibly strided tensor into a new contiguous vector.
fn gather<T: Copy>(src: &[T], layout: &Layout) -> Vec<T> {
    match layout.contiguous_offsets() {
        Some((start, end)) => src[start..end].to_vec(),
        None => candle_core::cpu_backend::unary_map(src, layout, |v| v),
    }
}

/// Transforms `src` (laid out by `layout`) into a new contiguous vector.
///
/// A contiguous input is read once by the kernel's first pass, straight into an output that
/// is never zeroed; a strided one is gathered first and transformed in place.
fn forward<T: cpu::Elem>(src: &[T], layout: &Layout, d: usize, scale: T) -> Vec<T> {
    match layout.contiguous_offsets() {
        Some((start, end)) => cpu::fwht_rows_to_vec(&src[start..end], d, scale),
        None => {
            let mut dst = gather(src, layout);
            cpu::transform_in_place(&mut dst, d, scale);
            dst
        }
    }
}

/// Half-precision inputs: widen to f32, transform, round once.
fn forward_half<T: Copy + Send + Sync>(
    src: &[T],
    layout: &Layout,
    d: usize,
    scale: f32,
    widen: fn(T) -> f32,
    narrow: fn(f32) -> T,
) -> Vec<T> {
    let mut wide: Vec<f32> = match layout.contiguous_offsets() {
        Some((start, end)) => src[start..end].iter().map(|&v| widen(v)).collect(),
        None => candle_core::cpu_backend::unary_map(src, layout, widen),
    };
    cpu::fwht_rows_f32(&mut wide, d, scale);
    wide.into_iter().map(narrow).collect()
}

impl CustomOp1 for Fwht {
    fn name(&self) -> &'static str {
        "whvi-fwht"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        check_input(dims, storage.dtype())?;
        let d = dims[dims.len() - 1];
        let scale = self.normalization.scale(d);
        let out = match storage {
            CpuStorage::F32(src) => CpuStorage::F32(forward(src, layout, d, scale as f32)),
            CpuStorage::F64(src) => CpuStorage::F64(forward(src, layout, d, scale)),
            CpuStorage::F16(src) => CpuStorage::F16(forward_half(
                src,
                layout,
                d,
                scale as f32,
                half::f16::to_f32,
                half::f16::from_f32,
            )),
            CpuStorage::BF16(src) => CpuStorage::BF16(forward_half(
                src,
                layout,
                d,
                scale as f32,
                half::bf16::to_f32,
                half::bf16::from_f32,
            )),
            other => candle_core::bail!("fwht: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        check_input(layout.shape().dims(), storage.dtype())?;
        cuda::fwht(storage, layout, self.normalization)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        storage: &candle_core::MetalStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        check_input(layout.shape().dims(), storage.dtype())?;
        metal::fwht(storage, layout, self.normalization)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // H is symmetric, so d(scale·H·x)/dx applied to g is scale·H·g.
        Ok(Some(fwht(grad_res, self.normalization)?))
    }
}
