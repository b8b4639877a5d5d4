//! Uncertainty and calibration metrics, temperature scaling, `.npy` input, the `whvi metrics`
//! report and its plots.
//!
//! Everything here works on plain `f64` data; no tensors are needed. The definitions follow
//! section 7 of the method notes (`whvi-method.md`):
//!
//! * Probabilities are the predictive distribution averaged over posterior samples,
//!   `p(y|x) = (1/T) Σ_t softmax(f_t(x))`, held row-major as a [`Probs`] (`N` rows of `K`
//!   classes). Per-sample probabilities `[T, N, K]` are a [`SampleProbs`]; [`Predictions`] holds
//!   the average together with the samples when they exist.
//! * Labels are `&[usize]` class indices in `0..K`.
//! * Calibration errors use [`DEFAULT_BINS`] (15) equal-width bins unless told otherwise and are
//!   fractions (0.029, not 2.9).
//!
//! Bad input (no rows, no classes, mismatched shapes, labels out of range, NaN or negative
//! probabilities, rows that do not sum to 1) is an [`crate::Error`], never a panic.

pub mod calibration;
mod job;
pub mod npy;
pub mod ood;
pub mod plot;
pub mod report;
pub mod temperature;
pub mod uncertainty;

pub use calibration::{
    accuracy, adaptive_ece, aurc, brier, classwise_ece, ece, mce, nll, ReliabilityBin,
    ReliabilityDiagram,
};
pub use job::{run_metrics, MetricsJob};
pub use npy::{load_labels, load_predictions, read_npy, write_npy, NpyArray, NpyDtype, NpyElement};
pub use ood::{auroc, average_precision, fpr_at_tpr, ood_detection, OodMetrics};
pub use plot::{
    plot_corruption, plot_methods_under_shift, plot_ood_histogram, plot_reliability,
    CorruptionPoint,
};
pub use report::{compute_report, MetricsReport};
pub use temperature::{
    apply_temperature, fit_temperature, fit_temperature_from_probs, Logits, TemperatureFit,
};
pub use uncertainty::{entropy, mean_entropy, mutual_information, ood_scores, OodScore};

use crate::{Error, Result};

/// The number of bins of ECE-15, MCE-15 and their variants unless told otherwise.
pub const DEFAULT_BINS: usize = 15;

/// How far a row of probabilities may sum from 1 and still be accepted.
///
/// Loose enough for float32 softmax outputs averaged over many samples, tight enough to catch
/// logits or unnormalised scores passed by mistake.
pub const ROW_SUM_TOLERANCE: f64 = 1e-3;

/// Predictive probabilities of `n` examples over `k` classes, row-major `[n, k]`.
///
/// Construction checks that `n > 0`, `k > 0`, the length is `n·k`, every entry is finite and
/// non-negative and every row sums to 1 within [`ROW_SUM_TOLERANCE`]; the rows are not
/// renormalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Probs {
    data: Vec<f64>,
    n: usize,
    k: usize,
}

impl Probs {
    /// Checks and wraps row-major probabilities of shape `[n, k]`.
    pub fn new(data: Vec<f64>, n: usize, k: usize) -> Result<Self> {
        check_prob_block(&data, n, k, "probabilities")?;
        Ok(Probs { data, n, k })
    }

    /// Like [`Probs::new`] from `f32` values (converted exactly to `f64`).
    pub fn from_f32(data: &[f32], n: usize, k: usize) -> Result<Self> {
        Probs::new(data.iter().map(|&v| f64::from(v)).collect(), n, k)
    }

    /// Builds probabilities from one slice per example; all rows must have the same length.
    pub fn from_rows<R: AsRef<[f64]>>(rows: &[R]) -> Result<Self> {
        let k = rows.first().map_or(0, |r| r.as_ref().len());
        let mut data = Vec::with_capacity(rows.len() * k);
        for (i, row) in rows.iter().enumerate() {
            let row = row.as_ref();
            if row.len() != k {
                return Err(Error::invalid(format!(
                    "probabilities: row {i} has {} entries but row 0 has {k}; every row needs one \
                     probability per class",
                    row.len()
                )));
            }
            data.extend_from_slice(row);
        }
        Probs::new(data, rows.len(), k)
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

    /// The probabilities of example `i`.
    ///
    /// # Panics
    /// If `i >= n` (an indexing bug in the caller, not bad data).
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.k..(i + 1) * self.k]
    }

    /// The rows in order.
    pub fn rows(&self) -> std::slice::ChunksExact<'_, f64> {
        self.data.chunks_exact(self.k)
    }

    /// The predicted class (the first index of the largest probability) and its probability,
    /// the top-label confidence, for every example.
    pub fn top_labels(&self) -> Vec<(usize, f64)> {
        self.rows().map(argmax).collect()
    }
}

/// The index of the first largest entry and that entry; `row` must be non-empty.
fn argmax(row: &[f64]) -> (usize, f64) {
    let mut best = (0, row[0]);
    for (j, &v) in row.iter().enumerate().skip(1) {
        if v > best.1 {
            best = (j, v);
        }
    }
    best
}

/// Probabilities of `t` posterior samples for `n` examples over `k` classes, row-major
/// `[t, n, k]`: `softmax(f_t(x_i))` for every sample `t` and example `i`.
///
/// Every `[n, k]` block is checked like [`Probs`].
#[derive(Debug, Clone, PartialEq)]
pub struct SampleProbs {
    data: Vec<f64>,
    t: usize,
    n: usize,
    k: usize,
}

impl SampleProbs {
    /// Checks and wraps row-major per-sample probabilities of shape `[t, n, k]`.
    pub fn new(data: Vec<f64>, t: usize, n: usize, k: usize) -> Result<Self> {
        if t == 0 {
            return Err(Error::invalid(
                "per-sample probabilities: no samples (T = 0); give at least one posterior sample",
            ));
        }
        let expected = t.checked_mul(n).and_then(|tn| tn.checked_mul(k));
        if expected != Some(data.len()) {
            return Err(Error::invalid(format!(
                "per-sample probabilities: {} values do not fill the shape [T={t}, N={n}, K={k}]",
                data.len()
            )));
        }
        if n > 0 && k > 0 {
            for (s, block) in data.chunks_exact(n * k).enumerate() {
                check_prob_block(block, n, k, &format!("sample {s}"))?;
            }
        } else {
            check_prob_block(&[], n, k, "per-sample probabilities")?;
        }
        Ok(SampleProbs { data, t, n, k })
    }

    /// Like [`SampleProbs::new`] from `f32` values.
    pub fn from_f32(data: &[f32], t: usize, n: usize, k: usize) -> Result<Self> {
        SampleProbs::new(data.iter().map(|&v| f64::from(v)).collect(), t, n, k)
    }

    /// The number of posterior samples `T`.
    pub fn t(&self) -> usize {
        self.t
    }

    /// The number of examples `N`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The number of classes `K`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The `[n, k]` probabilities of sample `s`.
    ///
    /// # Panics
    /// If `s >= t`.
    pub fn sample(&self, s: usize) -> &[f64] {
        let block = self.n * self.k;
        &self.data[s * block..(s + 1) * block]
    }

    /// The predictive distribution: the mean over samples, `(1/T) Σ_t p_t`.
    pub fn mean(&self) -> Probs {
        let block = self.n * self.k;
        let mut mean = vec![0.0; block];
        for s in 0..self.t {
            for (m, &v) in mean.iter_mut().zip(self.sample(s)) {
                *m += v;
            }
        }
        let scale = 1.0 / self.t as f64;
        mean.iter_mut().for_each(|m| *m *= scale);
        // Each sample's rows pass the checks, so their mean does too.
        Probs {
            data: mean,
            n: self.n,
            k: self.k,
        }
    }
}

/// Predictions of a model on a set of examples: the averaged probabilities and, for a
/// Bayesian model evaluated with posterior samples, the per-sample probabilities behind them.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    mean: Probs,
    samples: Option<SampleProbs>,
}

impl Predictions {
    /// Predictions known only through their (averaged) probabilities.
    pub fn from_mean(mean: Probs) -> Self {
        Predictions {
            mean,
            samples: None,
        }
    }

    /// Predictions from per-sample probabilities; the mean is computed here.
    pub fn from_samples(samples: SampleProbs) -> Self {
        Predictions {
            mean: samples.mean(),
            samples: Some(samples),
        }
    }

    /// The predictive (sample-averaged) probabilities.
    pub fn mean(&self) -> &Probs {
        &self.mean
    }

    /// The per-sample probabilities, when known.
    pub fn samples(&self) -> Option<&SampleProbs> {
        self.samples.as_ref()
    }
}

/// Checks an `[n, k]` block of probabilities; `what` names it in messages.
fn check_prob_block(data: &[f64], n: usize, k: usize, what: &str) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid(format!(
            "{what}: no examples (N = 0); metrics need at least one example"
        )));
    }
    if k == 0 {
        return Err(Error::invalid(format!(
            "{what}: no classes (K = 0); give one probability per class"
        )));
    }
    if n.checked_mul(k) != Some(data.len()) {
        return Err(Error::invalid(format!(
            "{what}: {} values do not fill the shape [N={n}, K={k}]",
            data.len()
        )));
    }
    for (i, row) in data.chunks_exact(k).enumerate() {
        let mut sum = 0.0;
        for (j, &p) in row.iter().enumerate() {
            if !p.is_finite() || p < 0.0 {
                return Err(Error::invalid(format!(
                    "{what}: entry [{i}, {j}] is {p}; probabilities must be finite and \
                     non-negative (pass softmax outputs, not logits)"
                )));
            }
            sum += p;
        }
        if (sum - 1.0).abs() > ROW_SUM_TOLERANCE {
            return Err(Error::invalid(format!(
                "{what}: row {i} sums to {sum}, not 1 (tolerance {ROW_SUM_TOLERANCE}); pass \
                 softmax probabilities, not logits or unnormalised scores"
            )));
        }
    }
    Ok(())
}

/// Checks labels against probabilities: one label per example, each in `0..k`.
fn check_labels(probs: &Probs, labels: &[usize]) -> Result<()> {
    if labels.len() != probs.n() {
        return Err(Error::invalid(format!(
            "labels: {} labels for {} examples; give exactly one label per row of probabilities",
            labels.len(),
            probs.n()
        )));
    }
    if let Some((i, &y)) = labels.iter().enumerate().find(|(_, &y)| y >= probs.k()) {
        return Err(Error::invalid(format!(
            "labels: label {y} of example {i} is not a class index in 0..{}; labels must be \
             below the number of classes K = {}",
            probs.k(),
            probs.k()
        )));
    }
    Ok(())
}

/// Checks a bin count: at least 1.
fn check_bins(n_bins: usize) -> Result<()> {
    if n_bins == 0 {
        return Err(Error::invalid(
            "the number of bins must be at least 1 (15 is the usual choice)",
        ));
    }
    Ok(())
}

/// The equal-width bin of a value in `[0, 1]`: `min(floor(v·n_bins), n_bins - 1)`.
fn bin_index(v: f64, n_bins: usize) -> usize {
    ((v * n_bins as f64).floor() as usize).min(n_bins - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_index_clamps_the_top_edge() {
        assert_eq!(bin_index(0.0, 15), 0);
        assert_eq!(bin_index(0.5, 15), 7);
        assert_eq!(bin_index(0.999, 15), 14);
        assert_eq!(bin_index(1.0, 15), 14);
        assert_eq!(bin_index(1.0, 1), 0);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.25, 0.5, 0.25]), (1, 0.5));
        assert_eq!(argmax(&[0.5, 0.5]), (0, 0.5));
    }

    #[test]
    fn sample_mean_is_the_predictive_distribution() {
        let s = SampleProbs::new(vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], 2, 2, 2).unwrap();
        assert_eq!(s.mean().as_slice(), &[0.75, 0.25, 0.25, 0.75]);
        assert_eq!(s.sample(1), &[0.5, 0.5, 0.5, 0.5]);
    }
}
