//! Forward and backward time of each distinct convolution of a zoo network: `whvi::conv`
//! (im2col + gemm forward and weight gradient, gemm + col2im input gradient) against candle's
//! own `conv2d` on the same tensors, timed alternately.
//!
//! The backward time is the median of forward + backward (gradients of input and weights, as in
//! training past the first layer) minus the median forward time.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::{median, round_significant as round};
use whvi::conv::{conv2d, ConvGeometry};
use whvi::layers::standard_normal;
use whvi::rng::seeded;
use whvi::zoo::{plan, BuildOptions, LayerKind, ModelSpec};
use whvi::{Error, Result};

/// One convolution shape; printed as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConvTiming {
    /// Always `"conv"`.
    pub bench: &'static str,
    /// The network the shape comes from.
    pub model: String,
    /// Its layers with this shape.
    pub layers: Vec<String>,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding.
    pub padding: usize,
    /// Input height and width.
    pub hw: [usize; 2],
    /// Images per call.
    pub batch: usize,
    /// Median milliseconds of whvi's forward.
    pub whvi_forward_ms: f64,
    /// Median milliseconds of candle's forward.
    pub candle_forward_ms: f64,
    /// Milliseconds of whvi's backward (input and weight gradients).
    pub whvi_backward_ms: f64,
    /// Milliseconds of candle's backward.
    pub candle_backward_ms: f64,
    /// `candle_forward_ms / whvi_forward_ms`.
    pub forward_speedup: f64,
    /// `candle_backward_ms / whvi_backward_ms`.
    pub backward_speedup: f64,
}

/// A distinct convolution of a network: the layers that have it, the layer, its input shape.
struct ConvShape {
    layers: Vec<String>,
    kind: LayerKind,
    input: [usize; 3],
}

/// The distinct convolution shapes of `model` at `width` on 32x32x3 input, in network order.
fn conv_shapes(model: &str, width: f64) -> Result<Vec<ConvShape>> {
    let spec = ModelSpec::lookup(model)?;
    let options = BuildOptions {
        width,
        classes: Some(10),
        input: Some([3, 32, 32]),
        ..BuildOptions::default()
    };
    let mut shapes: Vec<ConvShape> = Vec::new();
    let mut input = [3, 32, 32];
    for layer in plan(&spec, &options)? {
        if let LayerKind::Conv { .. } = layer.kind {
            match shapes
                .iter_mut()
                .find(|shape| shape.kind == layer.kind && shape.input == input)
            {
                Some(shape) => shape.layers.push(layer.name.clone()),
                None => shapes.push(ConvShape {
                    layers: vec![layer.name.clone()],
                    kind: layer.kind,
                    input,
                }),
            }
        }
        if let [c, h, w] = layer.output[..] {
            input = [c, h, w];
        }
    }
    Ok(shapes)
}

/// Times every distinct convolution shape of `model` (width multiplier `width`, `batch` images,
/// `reps` timed repetitions after one warm-up); calls `report` with each line.
pub fn bench_conv_shapes(
    model: &str,
    width: f64,
    batch: usize,
    reps: usize,
    mut report: impl FnMut(&ConvTiming),
) -> Result<Vec<ConvTiming>> {
    if reps == 0 || batch == 0 {
        return Err(Error::invalid(
            "bench conv: the batch and the repetitions must be at least 1",
        ));
    }
    let device = Device::Cpu;
    let mut rng = seeded(0);
    let mut out = Vec::new();
    for ConvShape {
        layers,
        kind,
        input: [c_in, h, w],
    } in conv_shapes(model, width)?
    {
        let LayerKind::Conv {
            c_out,
            kernel,
            stride,
            padding,
            ..
        } = kind
        else {
            continue;
        };
        let x = Var::from_tensor(&standard_normal(
            (batch, c_in, h, w),
            DType::F32,
            &device,
            &mut rng,
        )?)?;
        let weight = Var::from_tensor(
            &(standard_normal((c_out, c_in, kernel, kernel), DType::F32, &device, &mut rng)?
                * 0.05)?,
        )?;
        let geo = ConvGeometry { stride, padding };
        let ours = || conv2d(x.as_tensor(), weight.as_tensor(), None, geo);
        let theirs = || {
            x.as_tensor()
                .conv2d(weight.as_tensor(), padding, stride, 1, 1)
        };
        let with_backward = |y: candle_core::Result<Tensor>| -> candle_core::Result<()> {
            let grads = y?.sum_all()?.backward()?;
            if grads.get(x.as_tensor()).is_none() || grads.get(weight.as_tensor()).is_none() {
                candle_core::bail!("bench conv: a gradient is missing");
            }
            Ok(())
        };
        let (mut f_ours, mut f_theirs, mut b_ours, mut b_theirs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..=reps {
            let forward_ours = timed(|| ours().map(drop))?;
            let forward_theirs = timed(|| theirs().map(drop))?;
            let both_ours = timed(|| with_backward(ours()))?;
            let both_theirs = timed(|| with_backward(theirs()))?;
            if rep > 0 {
                f_ours.push(forward_ours);
                f_theirs.push(forward_theirs);
                b_ours.push(both_ours);
                b_theirs.push(both_theirs);
            }
        }
        let (fo, ft) = (median(&mut f_ours), median(&mut f_theirs));
        let (bo, bt) = (median(&mut b_ours) - fo, median(&mut b_theirs) - ft);
        let timing = ConvTiming {
            bench: "conv",
            model: model.to_string(),
            layers,
            c_in,
            c_out,
            kernel,
            stride,
            padding,
            hw: [h, w],
            batch,
            whvi_forward_ms: round(fo * 1e3),
            candle_forward_ms: round(ft * 1e3),
            whvi_backward_ms: round(bo * 1e3),
            candle_backward_ms: round(bt * 1e3),
            forward_speedup: round(ft / fo),
            backward_speedup: round(bt / bo),
        };
        report(&timing);
        out.push(timing);
    }
    Ok(out)
}

/// Seconds one call of `f` takes.
fn timed(f: impl FnOnce() -> candle_core::Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vgg11_has_its_distinct_shapes_in_order() {
        let shapes = conv_shapes("vgg11", 0.25).unwrap();
        let summary: Vec<(usize, usize, usize)> = shapes
            .iter()
            .map(|shape| match shape.kind {
                LayerKind::Conv { c_out, .. } => (shape.input[0], c_out, shape.input[1]),
                other => panic!("not a convolution: {other:?}"),
            })
            .collect();
        // vgg11: 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M at a quarter of the width.
        assert_eq!(
            summary,
            vec![
                (3, 16, 32),
                (16, 32, 16),
                (32, 64, 8),
                (64, 64, 8),
                (64, 128, 4),
                (128, 128, 4),
                (128, 128, 2),
            ]
        );
        assert_eq!(
            shapes[6].layers.len(),
            2,
            "the last two convolutions share a shape"
        );
    }

    #[test]
    fn times_each_shape_of_a_small_network() {
        let mut lines = 0;
        let timings = bench_conv_shapes("lenet5", 1.0, 2, 1, |_| lines += 1).unwrap();
        assert_eq!(lines, 2);
        assert_eq!(timings.len(), 2);
        // On 32x32x3 input: conv1 3 -> 6 (5x5, padding 2) at 32x32, conv2 at 16x16 after the pool.
        assert_eq!(
            (timings[0].c_in, timings[0].c_out, timings[0].kernel),
            (3, 6, 5)
        );
        assert_eq!(timings[1].hw, [16, 16]);
        for t in &timings {
            assert!(
                t.whvi_forward_ms > 0.0 && t.candle_forward_ms > 0.0,
                "{t:?}"
            );
        }
        assert!(bench_conv_shapes("lenet5", 1.0, 2, 0, |_| {}).is_err());
    }
}
