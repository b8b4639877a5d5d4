//! MC dropout (Gal and Ghahramani, 2016): dropout kept on at prediction time, so that each
//! forward pass is one sample of an approximate posterior.

use candle_core::{Result, Tensor};

use super::noise::dropout_mask;
use super::{BayesianModule, Pass};

/// Dropout that is active in every sampling pass (training and MC prediction) and off in a
/// mean pass. Masks are drawn from the pass's seeded generator.
#[derive(Debug, Clone, Copy)]
pub struct McDropout {
    p: f64,
}

impl McDropout {
    /// Dropout with drop probability `p` in `[0, 1)`.
    pub fn new(p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}");
        }
        Ok(McDropout { p })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }
}

impl BayesianModule for McDropout {
    fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let (p, dtype, device) = (self.p, x.dtype(), x.device());
        match pass.per_example_noise(x.shape(), |shape, rng| {
            dropout_mask(shape, p, dtype, device, rng)
        }) {
            Some(mask) => x * mask?,
            None => Ok(x.clone()),
        }
    }

    fn kl(&self) -> Result<Option<Tensor>> {
        // The variational interpretation's KL reduces to weight decay, applied by the optimiser.
        Ok(None)
    }

    fn describe(&self) -> String {
        format!("McDropout(p={})", self.p)
    }
}
