//! 2-D convolution as im2col + gemm, forward and both gradients.
//!
//! candle 0.11.1's CPU `conv2d` computes the input gradient with a direct `conv_transpose2d`
//! loop that does not use gemm, so a training step spends most of its time there (about 4x the
//! forward). Here the convolution is three matrix products around one data-layout op:
//!
//! - forward: `cols = im2col(x)` (`[B·L, K]`, `L = H_out·W_out` output pixels, `K = C_in·k_h·k_w`),
//!   then `y = cols · Wᵀ` (`[B·L, C_out]`) and a transpose to NCHW;
//! - weight gradient: `colsᵀ · dy`, one gemm over the whole batch (candle's matmul backward);
//! - input gradient: `dy · W` (`[B·L, K]`), then [`Col2Im`] scatters the columns back onto the
//!   image (the backward of [`Im2Col`]). When the input does not need a gradient (the first
//!   layer, whose input is data) candle never calls it.
//!
//! The same path applies one filter bank per example (WHVI's per-example sampling) as a batched
//! matmul, see [`conv2d_per_example`].

mod im2col;

pub use im2col::{Col2Im, Im2Col};

use candle_core::{bail, Result, Tensor};

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

/// The columns of `x` for a `kh x kw` kernel: `[B, H_out·W_out, C·kh·kw]`, taking part in
/// backprop (its gradient is [`Col2Im`]).
fn columns(x: &Tensor, kh: usize, kw: usize, geo: ConvGeometry) -> Result<(Tensor, usize, usize)> {
    let (_, _, h, w) = x.dims4()?;
    let op = Im2Col {
        kernel_h: kh,
        kernel_w: kw,
        stride: geo.stride,
        padding: geo.padding,
    };
    let (ho, wo) = op.output_size(h, w)?;
    Ok((x.contiguous()?.apply_op1(op)?, ho, wo))
}

/// Convolves `x` (`[B, C_in, H, W]`) with `weight` (`[C_out, C_in, k_h, k_w]`): the same result
/// as candle's `x.conv2d(weight, padding, stride, 1, 1)`, with gemm-based gradients.
pub fn conv2d(x: &Tensor, weight: &Tensor, geo: ConvGeometry) -> Result<Tensor> {
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    let (b, _, _, _) = input_dims(x, c_in)?;
    if !x.device().is_cpu() {
        // GPU backends have their own gemm-based (or cuDNN) convolutions.
        return x.conv2d(weight, geo.padding, geo.stride, 1, 1);
    }
    let (cols, ho, wo) = columns(x, kh, kw, geo)?;
    let k = c_in * kh * kw;
    let y = cols
        .reshape((b * ho * wo, k))?
        .matmul(&weight.reshape((c_out, k))?.t()?)?;
    y.reshape((b, ho * wo, c_out))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, c_out, ho, wo))
}

/// Convolves each example with its own filter bank: `x` `[B, C_in, H, W]`, `weights`
/// `[B, C_out, C_in, k_h, k_w]`; example `i` of the result is `conv2d(x[i], weights[i])`.
pub fn conv2d_per_example(x: &Tensor, weights: &Tensor, geo: ConvGeometry) -> Result<Tensor> {
    let (wb, c_out, c_in, kh, kw) = weights.dims5()?;
    let (b, _, _, _) = input_dims(x, c_in)?;
    if wb != b {
        bail!("conv2d_per_example: {wb} filter banks for a batch of {b}; give one per example");
    }
    if !x.device().is_cpu() {
        // One group per example: the GPU backends' grouped convolution.
        let (_, _, h, w) = x.dims4()?;
        let x = x.reshape((1, b * c_in, h, w))?;
        let weights = weights.reshape((b * c_out, c_in, kh, kw))?;
        let y = x.conv2d(&weights, geo.padding, geo.stride, 1, b)?;
        let (_, _, ho, wo) = y.dims4()?;
        return y.reshape((b, c_out, ho, wo));
    }
    let (cols, ho, wo) = columns(x, kh, kw, geo)?;
    let k = c_in * kh * kw;
    let y = cols.matmul(&weights.reshape((b, c_out, k))?.transpose(1, 2)?)?;
    y.transpose(1, 2)?.contiguous()?.reshape((b, c_out, ho, wo))
}
