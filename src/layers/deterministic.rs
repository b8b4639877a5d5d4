//! Point-estimate layers: candle-nn's modules behind the [`BayesianModule`] trait.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::{BayesianModule, ParamRole, Parameter, Pass};
use crate::conv::{self, ConvGeometry};

/// A deterministic dense layer (candle-nn's `Linear`, Kaiming-uniform initialised).
#[derive(Debug, Clone)]
pub struct DeterministicLinear {
    inner: candle_nn::Linear,
    d_in: usize,
    d_out: usize,
}

impl DeterministicLinear {
    /// A `d_in -> d_out` layer with bias; parameters `weight` `[d_out, d_in]` and `bias`.
    pub fn new(d_in: usize, d_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(DeterministicLinear {
            inner: candle_nn::linear(d_in, d_out, vb)?,
            d_in,
            d_out,
        })
    }
}

impl BayesianModule for DeterministicLinear {
    fn forward_pass(&self, x: &Tensor, _pass: &mut Pass) -> Result<Tensor> {
        self.inner.forward(x)
    }

    fn parameters(&self) -> Vec<Parameter> {
        weight_and_bias(self.inner.weight(), self.inner.bias())
    }

    fn describe(&self) -> String {
        format!("Linear({} -> {})", self.d_in, self.d_out)
    }
}

/// A deterministic convolution (candle-nn's `Conv2d`), groups 1, with bias.
#[derive(Debug, Clone)]
pub struct DeterministicConv2d {
    inner: candle_nn::Conv2d,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
}

impl DeterministicConv2d {
    /// A `k x k` convolution; parameters `weight` `[C_out, C_in, k, k]` and `bias`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let config = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(DeterministicConv2d {
            inner: candle_nn::conv2d(in_channels, out_channels, kernel, config, vb)?,
            in_channels,
            out_channels,
            kernel,
        })
    }
}

impl BayesianModule for DeterministicConv2d {
    fn forward_pass(&self, x: &Tensor, _pass: &mut Pass) -> Result<Tensor> {
        let config = self.inner.config();
        let geo = ConvGeometry {
            stride: config.stride,
            padding: config.padding,
        };
        conv::conv2d(x, self.inner.weight(), self.inner.bias(), geo)
    }

    fn parameters(&self) -> Vec<Parameter> {
        weight_and_bias(self.inner.weight(), self.inner.bias())
    }

    fn describe(&self) -> String {
        let c = self.inner.config();
        format!(
            "Conv2d({} -> {}, k={}, s={}, p={})",
            self.in_channels, self.out_channels, self.kernel, c.stride, c.padding
        )
    }
}

/// A point-estimate layer's tensors: its weight (decayed) and its bias, if any.
fn weight_and_bias(weight: &Tensor, bias: Option<&Tensor>) -> Vec<Parameter> {
    let mut parameters = vec![Parameter::new(weight, ParamRole::Weight)];
    parameters.extend(bias.map(|b| Parameter::new(b, ParamRole::Bias)));
    parameters
}
