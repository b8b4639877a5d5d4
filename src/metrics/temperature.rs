//! Temperature scaling: one scalar `T > 0` that divides the logits, fitted by minimising the
//! NLL of `softmax(z / T)` on a held-out validation split.
//!
//! With `β = 1/T`, the NLL `mean_i [logsumexp(β z_i) - β z_i[y_i]]` is convex in `β`, so its
//! derivative `g(β) = mean_i [E_{softmax(β z_i)}[z] - z_i[y_i]]` is non-decreasing and the fit
//! is a root search: bisection on `ln T` over `[ln T_MIN, ln T_MAX]` on the sign of `g`,
//! which needs no step size and cannot diverge.

use serde::{Deserialize, Serialize};

use super::{check_labels, Probs};
use crate::{Error, Result};

/// The smallest temperature the fit returns.
pub const T_MIN: f64 = 1e-3;
/// The largest temperature the fit returns.
pub const T_MAX: f64 = 1e3;

/// Unnormalised scores (logits) of `n` examples over `k` classes, row-major `[n, k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    data: Vec<f64>,
    n: usize,
    k: usize,
}

impl Logits {
    /// Checks and wraps row-major logits of shape `[n, k]`: `n > 0`, `k > 0`, all finite.
    pub fn new(data: Vec<f64>, n: usize, k: usize) -> Result<Self> {
        if n == 0 || k == 0 {
            return Err(Error::invalid(format!(
                "logits: shape [N={n}, K={k}] is empty; temperature scaling needs at least one \
                 example and one class"
            )));
        }
        if n.checked_mul(k) != Some(data.len()) {
            return Err(Error::invalid(format!(
                "logits: {} values do not fill the shape [N={n}, K={k}]",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "logits: entry [{}, {}] is {}; logits must be finite",
                i / k,
                i % k,
                data[i]
            )));
        }
        Ok(Logits { data, n, k })
    }

    /// Logits `ln p` of probabilities, for when only probabilities are available
    /// (`softmax(ln p) = p`). A probability of 0 becomes `ln` of the smallest positive `f64`.
    pub fn from_probs(probs: &Probs) -> Self {
        Logits {
            data: probs
                .as_slice()
                .iter()
                .map(|&p| p.max(f64::MIN_POSITIVE).ln())
                .collect(),
            n: probs.n(),
            k: probs.k(),
        }
    }

    /// The number of examples `N`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The number of classes `K`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The row-major data, `n·k` values.
    pub fn as_slice(&self) -> &[f64] {
        &self.data
    }

    fn rows(&self) -> std::slice::ChunksExact<'_, f64> {
        self.data.chunks_exact(self.k)
    }
}

/// The result of [`fit_temperature`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TemperatureFit {
    /// The fitted temperature, in `[T_MIN, T_MAX]`.
    pub temperature: f64,
    /// The validation NLL at `T = 1`.
    pub nll_before: f64,
    /// The validation NLL at the fitted temperature.
    pub nll_after: f64,
}

/// Fits the temperature minimising the NLL of `softmax(logits / T)` against `labels`.
///
/// When the NLL keeps falling beyond `[T_MIN, T_MAX]` (e.g. every validation example is
/// correct with a margin, so sharper is always better) the nearer bound is returned; when
/// it does not depend on `T` at all (every row of logits constant) the result is `T = 1`.
pub fn fit_temperature(logits: &Logits, labels: &[usize]) -> Result<TemperatureFit> {
    check_logit_labels(logits, labels)?;
    // NLL'(ln T) = -g(1/T) / T: positive g means a larger T still lowers the NLL.
    let lowers_nll = |u: f64| nll_slope(logits, labels, (-u).exp()) > 0.0;
    let (mut lo, mut hi) = (T_MIN.ln(), T_MAX.ln());
    let temperature = match (lowers_nll(lo), lowers_nll(hi)) {
        (_, true) => T_MAX,
        // g <= 0 at the sharpest end and g = 0 at the flattest: g is 0 throughout.
        (false, false) if nll_slope(logits, labels, 1.0 / T_MAX) == 0.0 => 1.0,
        (false, false) => T_MIN,
        (true, false) => {
            while hi - lo > 1e-13 {
                let mid = 0.5 * (lo + hi);
                if mid <= lo || mid >= hi {
                    break;
                }
                if lowers_nll(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            (0.5 * (lo + hi)).exp()
        }
    };
    Ok(TemperatureFit {
        temperature,
        nll_before: scaled_nll(logits, labels, 1.0),
        nll_after: scaled_nll(logits, labels, temperature),
    })
}

/// [`fit_temperature`] on probabilities only, using `ln p` as the logits.
pub fn fit_temperature_from_probs(probs: &Probs, labels: &[usize]) -> Result<TemperatureFit> {
    check_labels(probs, labels)?;
    fit_temperature(&Logits::from_probs(probs), labels)
}

/// The calibrated probabilities `softmax(logits / temperature)`.
pub fn apply_temperature(logits: &Logits, temperature: f64) -> Result<Probs> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::invalid(format!(
            "the temperature must be finite and positive, got {temperature}"
        )));
    }
    let beta = 1.0 / temperature;
    let mut data = Vec::with_capacity(logits.data.len());
    for row in logits.rows() {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z));
        let start = data.len();
        data.extend(row.iter().map(|&z| (beta * (z - max)).exp()));
        let sum: f64 = data[start..].iter().sum();
        data[start..].iter_mut().for_each(|p| *p /= sum);
    }
    Probs::new(data, logits.n, logits.k)
}

/// Labels against logits: one per example, each below `k`.
fn check_logit_labels(logits: &Logits, labels: &[usize]) -> Result<()> {
    if labels.len() != logits.n {
        return Err(Error::invalid(format!(
            "labels: {} labels for {} rows of logits; give exactly one label per row",
            labels.len(),
            logits.n
        )));
    }
    if let Some((i, &y)) = labels.iter().enumerate().find(|(_, &y)| y >= logits.k) {
        return Err(Error::invalid(format!(
            "labels: label {y} of example {i} is not a class index in 0..{}",
            logits.k
        )));
    }
    Ok(())
}

/// `mean_i [logsumexp(z_i / T) - z_i[y_i] / T]`.
fn scaled_nll(logits: &Logits, labels: &[usize], temperature: f64) -> f64 {
    let beta = 1.0 / temperature;
    let total: f64 = logits
        .rows()
        .zip(labels)
        .map(|(row, &y)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z));
            let sum: f64 = row.iter().map(|&z| (beta * (z - max)).exp()).sum();
            sum.ln() - beta * (row[y] - max)
        })
        .sum();
    total / logits.n as f64
}

/// `g(β) = mean_i [Σ_k softmax(β z_i)_k z_ik - z_i[y_i]]`, the derivative of the NLL in `β`.
fn nll_slope(logits: &Logits, labels: &[usize], beta: f64) -> f64 {
    let total: f64 = logits
        .rows()
        .zip(labels)
        .map(|(row, &y)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z));
            let (mut weight, mut weighted) = (0.0, 0.0);
            for &z in row {
                let w = (beta * (z - max)).exp();
                weight += w;
                weighted += w * (z - max);
            }
            weighted / weight - (row[y] - max)
        })
        .sum();
    total / logits.n as f64
}
