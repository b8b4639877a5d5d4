//! 2-D convolution with gemm-based forward and gradients on the CPU.
//!
//! candle 0.11.1's CPU `conv2d` computes the input gradient with a direct `conv_transpose2d`
//! loop that does not use gemm, so a training step spends most of its time there (about 4x the
//! forward). Here, per image, with `cols = im2col(x)` the `[K, L]` columns (`K = C_in·k_h·k_w`
//! kernel taps, `L = H_out·W_out` output pixels) and `W` the `[C_out, K]` filters:
//!
//! - forward: `y = W · cols (+ bias)`, straight into the image's block of the NCHW output;
//! - weight gradient: `dW = Σ_images dy · colsᵀ`, the columns unfolded again rather than kept
//!   (a batch's columns are 9x its input);
//! - input gradient: `dx = col2im(Wᵀ · dy)`, skipped when the input does not take part in
//!   backprop (the first layer, whose input is data).
//!
//! 3x3 convolutions at stride 1 with one filter bank, at least 16 channels on both sides and at
//! least 64 tiles of 2x2 outputs in the batch (all but the first layer of a CIFAR VGG at batch
//! 64) take Winograd's F(2x2, 3x3) instead, for all three: 2.25x fewer multiplies
//! (`winograd.rs`).
//!
//! The same op applies one filter bank per image (WHVI's per-example sampling), see
//! [`conv2d_per_example`]. Other devices and element types than f32 / f64 use candle's own
//! convolution.

mod matmul;
mod op;
mod unfold;
mod winograd;

use candle_core::{bail, DType, Result, Tensor};

use op::{Conv2dNode, Conv2dOp};
use unfold::ConvShape;

/// Stride and zero padding of a convolution (dilation 1, groups 1), as in candle's `conv2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Step between output pixels, in input pixels.
    pub stride: usize,
    /// Zero rows and columns added on each side of the input.
    pub padding: usize,
}

impl Default for ConvGeometry {
    fn default() -> Self {
        ConvGeometry {
            stride: 1,
            padding: 0,
        }
    }
}

/// Checks `x` is `[B, C, H, W]` and returns its dimensions.
fn input_dims(x: &Tensor, in_channels: usize) -> Result<(usize, usize, usize, usize)> {
    match *x.dims() {
        [b, c, h, w] if c == in_channels => Ok((b, c, h, w)),
        ref dims => {
            bail!("conv2d: expected input [batch, {in_channels}, height, width], got {dims:?}")
        }
    }
}

/// Checks the bias is `[C_out]`.
fn check_bias(bias: Option<&Tensor>, out_channels: usize) -> Result<()> {
    match bias.map(|b| b.dims()) {
        Some(dims) if dims != [out_channels] => {
            bail!("conv2d: expected a bias of [{out_channels}] (one per output channel), got {dims:?}")
        }
        _ => Ok(()),
    }
}

/// Whether the gemm op handles tensors of this device and element type.
fn gemm_path(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Adds a `[C_out]` bias to `[B, C_out, H, W]` outputs (the path of other devices).
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// Runs the op on `x`, the filters and the optional bias.
fn apply(op: Conv2dOp, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let node = Conv2dNode::new(op, x.track_op());
    match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, node),
        None => x.apply_op2(&weight, node),
    }
}

/// Convolves `x` (`[B, C_in, H, W]`) with `weight` (`[C_out, C_in, k_h, k_w]`) and adds `bias`
/// (`[C_out]`) if given: the result of candle's `x.conv2d(weight, padding, stride, 1, 1)` (plus
/// the bias), with gemm-based gradients.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geo: ConvGeometry,
) -> Result<Tensor> {
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    let (b, _, h, w) = input_dims(x, c_in)?;
    check_bias(bias, c_out)?;
    let shape = ConvShape::new([c_in, h, w], [kh, kw], geo)?;
    if !gemm_path(x) {
        // GPU backends have their own gemm-based (or cuDNN) convolutions.
        return add_bias(x.conv2d(weight, geo.padding, geo.stride, 1, 1)?, bias);
    }
    let op = Conv2dOp {
        shape,
        batch: b,
        out_channels: c_out,
        per_example: false,
    };
    apply(op, x, weight, bias)
}

/// Convolves each example with its own filter bank: `x` `[B, C_in, H, W]`, `weights`
/// `[B, C_out, C_in, k_h, k_w]`, an optional shared `bias` `[C_out]`; example `i` of the result
/// is `conv2d(x[i], weights[i], bias)`.
pub fn conv2d_per_example(
    x: &Tensor,
    weights: &Tensor,
    bias: Option<&Tensor>,
    geo: ConvGeometry,
) -> Result<Tensor> {
    let (wb, c_out, c_in, kh, kw) = weights.dims5()?;
    let (b, _, h, w) = input_dims(x, c_in)?;
    if wb != b {
        bail!("conv2d_per_example: {wb} filter banks for a batch of {b}; give one per example");
    }
    check_bias(bias, c_out)?;
    let shape = ConvShape::new([c_in, h, w], [kh, kw], geo)?;
    if !gemm_path(x) {
        // One group per example: the GPU backends' grouped convolution.
        let x = x.reshape((1, b * c_in, h, w))?;
        let weights = weights.reshape((b * c_out, c_in, kh, kw))?;
        let y = x.conv2d(&weights, geo.padding, geo.stride, 1, b)?;
        return add_bias(y.reshape((b, c_out, shape.out_h, shape.out_w))?, bias);
    }
    let op = Conv2dOp {
        shape,
        batch: b,
        out_channels: c_out,
        per_example: true,
    };
    apply(op, x, weights, bias)
}

/// Partial sums of [`plane_sum`]: one running sum waits on each add (four cycles), so a bias
/// gradient summed that way ran at a quarter of the speed the adds allow.
const SUM_LANES: usize = 8;

/// The sum of `values` (a plane of an output gradient, for the bias gradient) in
/// [`SUM_LANES`] partial sums, added in a fixed order: the same bits for the same input.
fn plane_sum<T: candle_core::WithDType>(values: &[T]) -> T {
    let mut lanes = [T::zero(); SUM_LANES];
    let chunks = values.chunks_exact(SUM_LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    let mut total = T::zero();
    for &v in lanes.iter().chain(rest) {
        total += v;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::plane_sum;

    /// Every value counts once, lanes and remainder alike (integers, so the sums are exact).
    #[test]
    fn plane_sum_adds_every_value_once() {
        for n in [0usize, 1, 7, 8, 9, 17, 1000] {
            let values: Vec<f64> = (0..n).map(|i| i as f64).collect();
            assert_eq!(
                plane_sum(&values),
                (n * n.saturating_sub(1) / 2) as f64,
                "n = {n}"
            );
        }
    }
}
