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
    /// The He-like variance times a factor (a wider or narrower prior that still follows the
    /// layer's size).
    ScaledHeLike(f64),
}

impl Prior {
    /// The prior variance, given what [`Prior::HeLike`] should evaluate to for this layer.
    pub fn variance(self, he_like: f64) -> f64 {
        match self {
            Prior::HeLike => he_like,
            Prior::Variance(v) => v,
            Prior::ScaledHeLike(k) => k * he_like,
        }
    }

    /// Parses `he` (the He-like default), `he*K` (scaled by `K`) or a variance such as `0.01`.
    pub fn parse(text: &str) -> crate::Result<Self> {
        let text = text.trim();
        let number = |t: &str| {
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| *v > 0.0 && v.is_finite())
        };
        let prior = if text == "he" {
            Some(Prior::HeLike)
        } else if let Some(k) = text.strip_prefix("he*") {
            number(k).map(Prior::ScaledHeLike)
        } else {
            number(text).map(Prior::Variance)
        };
        prior.ok_or_else(|| {
            crate::Error::invalid(format!(
                "prior variance '{text}': use he (the He-like default), he*K for K times it, or \
                 a positive variance such as 0.01"
            ))
        })
    }

    /// Refuses a variance or factor that is not a positive finite number.
    pub fn validate(self) -> crate::Result<()> {
        match self {
            Prior::HeLike => Ok(()),
            Prior::Variance(v) | Prior::ScaledHeLike(v) if v > 0.0 && v.is_finite() => Ok(()),
            other => Err(crate::Error::invalid(format!(
                "prior {other:?}: the variance (or factor) must be a positive finite number"
            ))),
        }
    }
}

/// The initial posterior standard deviation of [`PosteriorConfig::default`], as a fraction of
/// the scale of the initial mean.
pub const DEFAULT_INITIAL_SIGMA: f64 = 1e-2;

/// The Gaussian posterior of a Bayesian layer: its prior, and how wide it starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PosteriorConfig {
    /// The prior (default: He-like).
    pub prior: Prior,
    /// The initial standard deviation, as a fraction of the initial mean's scale (default
    /// [`DEFAULT_INITIAL_SIGMA`]). A narrow start lets the network first learn like a
    /// deterministic one; the KL term then widens the posterior where the data allow, at the
    /// pace the optimiser gives it.
    pub initial_sigma: f64,
}

impl Default for PosteriorConfig {
    fn default() -> Self {
        PosteriorConfig {
            prior: Prior::HeLike,
            initial_sigma: DEFAULT_INITIAL_SIGMA,
        }
    }
}

impl PosteriorConfig {
    /// Refuses a prior or an initial sigma that is not a positive finite number.
    pub fn validate(&self) -> crate::Result<()> {
        self.prior.validate()?;
        let fraction = self.initial_sigma;
        if !(fraction > 0.0 && fraction.is_finite()) {
            return Err(crate::Error::invalid(format!(
                "initial_sigma {fraction} (--initial-sigma): it must be a positive fraction of \
                 the mean's scale (the default is {DEFAULT_INITIAL_SIGMA})"
            )));
        }
        Ok(())
    }

    /// The initial `log sigma` of a layer whose initial mean has standard deviation
    /// `mean_scale`, once [`PosteriorConfig::validate`] passes.
    pub(crate) fn initial_log_sigma(&self, mean_scale: f64) -> Result<f64> {
        self.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((self.initial_sigma * mean_scale).ln())
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
