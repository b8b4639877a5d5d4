use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// The prior of a layer's random weights: a zero-mean Gaussian with one variance per layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub enum Prior {
    /// The variance that gives the weights He-like prior variance `2 / d_in` (for WHVI,
    /// `lambda = 2 / (D · d_in)`, since `Var(W_ij) = D · lambda · s^2` with `|s|` about 1).
    #[default]
    HeLike,
    /// A fixed prior variance (lambda).
    Variance(f64),
}

impl Prior {
    /// The prior variance, given what [`Prior::HeLike`] should evaluate to for this layer.
    pub fn variance(self, he_like: f64) -> f64 {
        match self {
            Prior::HeLike => he_like,
            Prior::Variance(v) => v,
        }
    }
}

/// KL( N(mu, diag(exp(log_sigma)^2)) || N(0, prior_var · I) ), summed over all elements:
/// `0.5 · sum[ log(lambda) - log(sigma^2) + (mu^2 + sigma^2) / lambda - 1 ]`.
pub fn gaussian_kl(mu: &Tensor, log_sigma: &Tensor, prior_var: f64) -> Result<Tensor> {
    let var = (log_sigma * 2.0)?.exp()?;
    let n = mu.elem_count() as f64;
    let quad = ((mu.sqr()? + &var)?.sum_all()? / prior_var)?;
    let log_det = (log_sigma.sum_all()? * 2.0)?;
    // 0.5 · [ n·log(lambda) - sum log sigma^2 + sum (mu^2 + sigma^2)/lambda - n ]
    ((quad - log_det)? + n * (prior_var.ln() - 1.0))? * 0.5
}
