//! Parameter-free layers and the container that chains layers.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{BayesianModule, Parameter, Pass};

/// An element-wise activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    /// max(x, 0)
    Relu,
    /// tanh(x)
    Tanh,
}

impl BayesianModule for Activation {
    fn forward_pass(&self, x: &Tensor, _pass: &mut Pass) -> Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Tanh => x.tanh(),
        }
    }

    fn describe(&self) -> String {
        format!("{self:?}")
    }
}

/// Flattens every dimension after the batch dimension.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flatten;

impl BayesianModule for Flatten {
    fn forward_pass(&self, x: &Tensor, _pass: &mut Pass) -> Result<Tensor> {
        x.flatten_from(1)
    }

    fn describe(&self) -> String {
        "Flatten".to_string()
    }
}

/// The row of a layer that an earlier layer applies (a ReLU or max pool fused into a
/// [`super::BatchNorm2d`] built `with_relu` or `with_max_pool`): the identity, so that a
/// network keeps one module per row of its plan.
#[derive(Debug, Clone, Copy)]
pub struct AppliedBefore {
    /// The layer's name, as [`BayesianModule::describe`] shows it.
    pub layer: &'static str,
}

impl BayesianModule for AppliedBefore {
    fn forward_pass(&self, x: &Tensor, _pass: &mut Pass) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn describe(&self) -> String {
        format!("{} (applied by an earlier layer)", self.layer)
    }
}

/// Layers applied one after the other; the KL is the sum of theirs.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn BayesianModule>>,
}

impl Sequential {
    /// An empty chain.
    pub fn new() -> Self {
        Sequential::default()
    }

    /// Appends a layer.
    pub fn push(&mut self, layer: impl BayesianModule + 'static) {
        self.layers.push(Box::new(layer));
    }

    /// Appends a layer (builder style).
    pub fn with(mut self, layer: impl BayesianModule + 'static) -> Self {
        self.push(layer);
        self
    }

    /// The layers in order.
    pub fn layers(&self) -> impl Iterator<Item = &dyn BayesianModule> {
        self.layers.iter().map(|l| l.as_ref())
    }

    /// Runs the layers `range` (indices into [`Sequential::layers`]) on `x`.
    pub fn forward_range(
        &self,
        x: &Tensor,
        range: std::ops::Range<usize>,
        pass: &mut Pass,
    ) -> Result<Tensor> {
        let Some(layers) = self.layers.get(range.clone()) else {
            candle_core::bail!(
                "forward_range {range:?}: the network has layers 0..{}",
                self.layers.len()
            );
        };
        let mut x = x.clone();
        for layer in layers {
            x = layer.forward_pass(&x, pass)?;
        }
        Ok(x)
    }

    /// The number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl BayesianModule for Sequential {
    fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        self.forward_range(x, 0..self.layers.len(), pass)
    }

    fn kl(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for layer in &self.layers {
            if let Some(kl) = layer.kl()? {
                total = Some(match total {
                    Some(t) => (t + kl)?,
                    None => kl,
                });
            }
        }
        Ok(total)
    }

    fn parameters(&self) -> Vec<Parameter> {
        self.layers.iter().flat_map(|l| l.parameters()).collect()
    }

    fn describe(&self) -> String {
        let inner: Vec<String> = self.layers.iter().map(|l| l.describe()).collect();
        format!("Sequential[{}]", inner.join(", "))
    }
}
