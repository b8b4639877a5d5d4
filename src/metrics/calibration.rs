//! Accuracy, proper scoring rules, calibration errors and selective prediction.
//!
//! All functions take the sample-averaged probabilities and the true labels, and check the
//! labels (one per example, each below `K`). The top-label confidence of an example is
//! `c = max_k p_k`; it is correct when the first index of that maximum is the label.

use serde::{Deserialize, Serialize};

use super::{bin_index, check_bins, check_labels, Probs};
use crate::Result;

/// The fraction of examples whose predicted class (argmax) is the label.
pub fn accuracy(probs: &Probs, labels: &[usize]) -> Result<f64> {
    check_labels(probs, labels)?;
    let correct = correctness_conf(probs, labels)
        .filter(|&(_, ok)| ok)
        .count();
    Ok(correct as f64 / probs.n() as f64)
}

/// The negative log-likelihood `mean_i -ln p_i[y_i]` (nats).
///
/// A probability of exactly 0 for the true class is taken as the smallest positive `f64`
/// (`-ln` of it is about 708) so the value stays finite and can be written to JSON.
pub fn nll(probs: &Probs, labels: &[usize]) -> Result<f64> {
    check_labels(probs, labels)?;
    let total: f64 = probs
        .rows()
        .zip(labels)
        .map(|(row, &y)| -row[y].max(f64::MIN_POSITIVE).ln())
        .sum();
    Ok(total / probs.n() as f64)
}

/// The Brier score `mean_i Σ_k (p_ik - 1[y_i = k])^2` (summed over classes, so it lies in
/// `[0, 2]`).
pub fn brier(probs: &Probs, labels: &[usize]) -> Result<f64> {
    check_labels(probs, labels)?;
    let total: f64 = probs
        .rows()
        .zip(labels)
        .map(|(row, &y)| {
            row.iter()
                .enumerate()
                .map(|(k, &p)| {
                    let target = if k == y { 1.0 } else { 0.0 };
                    (p - target) * (p - target)
                })
                .sum::<f64>()
        })
        .sum();
    Ok(total / probs.n() as f64)
}

/// One equal-width bin of a [`ReliabilityDiagram`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// The lower edge of the bin's confidence interval.
    pub lower: f64,
    /// The upper edge of the bin's confidence interval.
    pub upper: f64,
    /// How many examples fall in the bin.
    pub count: usize,
    /// The fraction of those examples that are correct (0 for an empty bin).
    pub accuracy: f64,
    /// Their mean top-label confidence (0 for an empty bin).
    pub confidence: f64,
}

impl ReliabilityBin {
    /// `|accuracy - confidence|`, the bin's calibration gap.
    pub fn gap(&self) -> f64 {
        (self.accuracy - self.confidence).abs()
    }
}

/// Top-label confidence binned into equal-width bins: the data of a reliability diagram and
/// of ECE / MCE.
///
/// Example `i` with confidence `c_i` goes to bin `min(floor(c_i · n_bins), n_bins - 1)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityDiagram {
    /// The number of examples binned.
    pub n: usize,
    /// The bins, lowest confidence first.
    pub bins: Vec<ReliabilityBin>,
}

impl ReliabilityDiagram {
    /// Bins the top-label confidences of `probs` into `n_bins` equal-width bins.
    pub fn new(probs: &Probs, labels: &[usize], n_bins: usize) -> Result<Self> {
        check_labels(probs, labels)?;
        check_bins(n_bins)?;
        let (conf, correct): (Vec<f64>, Vec<bool>) = correctness_conf(probs, labels).unzip();
        Ok(binned(&conf, &correct, n_bins))
    }

    /// The expected calibration error `Σ_b (n_b / N) · |acc_b - conf_b|`; empty bins add 0.
    pub fn ece(&self) -> f64 {
        self.bins
            .iter()
            .map(|b| b.count as f64 / self.n as f64 * b.gap())
            .sum()
    }

    /// The maximum calibration error `max_b |acc_b - conf_b|` over non-empty bins.
    pub fn mce(&self) -> f64 {
        self.bins
            .iter()
            .filter(|b| b.count > 0)
            .map(ReliabilityBin::gap)
            .fold(0.0, f64::max)
    }
}

/// Bins `(value, hit)` pairs into `n_bins` equal-width bins of the value.
fn binned(values: &[f64], hits: &[bool], n_bins: usize) -> ReliabilityDiagram {
    let mut count = vec![0usize; n_bins];
    let mut hit_sum = vec![0.0; n_bins];
    let mut value_sum = vec![0.0; n_bins];
    for (&v, &hit) in values.iter().zip(hits) {
        let b = bin_index(v, n_bins);
        count[b] += 1;
        value_sum[b] += v;
        if hit {
            hit_sum[b] += 1.0;
        }
    }
    let bins = (0..n_bins)
        .map(|b| {
            let mean = |sum: f64| {
                if count[b] == 0 {
                    0.0
                } else {
                    sum / count[b] as f64
                }
            };
            ReliabilityBin {
                lower: b as f64 / n_bins as f64,
                upper: (b + 1) as f64 / n_bins as f64,
                count: count[b],
                accuracy: mean(hit_sum[b]),
                confidence: mean(value_sum[b]),
            }
        })
        .collect();
    ReliabilityDiagram {
        n: values.len(),
        bins,
    }
}

/// Expected calibration error with `n_bins` equal-width bins of top-label confidence
/// (ECE-15 for `n_bins = 15`, as torchmetrics computes it).
pub fn ece(probs: &Probs, labels: &[usize], n_bins: usize) -> Result<f64> {
    Ok(ReliabilityDiagram::new(probs, labels, n_bins)?.ece())
}

/// Maximum calibration error over the non-empty equal-width bins.
pub fn mce(probs: &Probs, labels: &[usize], n_bins: usize) -> Result<f64> {
    Ok(ReliabilityDiagram::new(probs, labels, n_bins)?.mce())
}

/// Adaptive (equal-mass) ECE: examples sorted by increasing confidence are split into
/// `n_bins` consecutive chunks whose sizes differ by at most one, the larger chunks first
/// (numpy `array_split`); the ECE sum runs over those chunks, empty ones adding 0.
pub fn adaptive_ece(probs: &Probs, labels: &[usize], n_bins: usize) -> Result<f64> {
    check_labels(probs, labels)?;
    check_bins(n_bins)?;
    let mut pairs: Vec<(f64, bool)> = correctness_conf(probs, labels).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = pairs.len();
    let (base, extra) = (n / n_bins, n % n_bins);
    let mut start = 0;
    let mut total = 0.0;
    for b in 0..n_bins {
        let size = base + usize::from(b < extra);
        let chunk = &pairs[start..start + size];
        start += size;
        if chunk.is_empty() {
            continue;
        }
        let conf: f64 = chunk.iter().map(|p| p.0).sum::<f64>() / size as f64;
        let acc = chunk.iter().filter(|p| p.1).count() as f64 / size as f64;
        total += size as f64 / n as f64 * (acc - conf).abs();
    }
    Ok(total)
}

/// Classwise ECE: for each class `k`, the ECE of the one-vs-rest problem with confidence
/// `p_k` and outcome `1[y = k]` over `n_bins` equal-width bins of `p_k`; the mean over classes.
pub fn classwise_ece(probs: &Probs, labels: &[usize], n_bins: usize) -> Result<f64> {
    check_labels(probs, labels)?;
    check_bins(n_bins)?;
    let mut total = 0.0;
    for k in 0..probs.k() {
        let values: Vec<f64> = probs.rows().map(|row| row[k]).collect();
        let hits: Vec<bool> = labels.iter().map(|&y| y == k).collect();
        total += binned(&values, &hits, n_bins).ece();
    }
    Ok(total / probs.k() as f64)
}

/// The area under the risk-coverage curve: examples sorted by decreasing confidence (ties
/// keep their input order), `risk_i` = errors among the first `i` / `i`, AURC = `mean_i risk_i`.
pub fn aurc(probs: &Probs, labels: &[usize]) -> Result<f64> {
    check_labels(probs, labels)?;
    let mut pairs: Vec<(f64, bool)> = correctness_conf(probs, labels).collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut errors = 0usize;
    let mut total = 0.0;
    for (i, &(_, ok)) in pairs.iter().enumerate() {
        errors += usize::from(!ok);
        total += errors as f64 / (i + 1) as f64;
    }
    Ok(total / pairs.len() as f64)
}

/// `(top-label confidence, correct?)` per example; labels already checked.
fn correctness_conf<'a>(
    probs: &'a Probs,
    labels: &'a [usize],
) -> impl Iterator<Item = (f64, bool)> + 'a {
    probs
        .top_labels()
        .into_iter()
        .zip(labels)
        .map(|((pred, c), &y)| (c, pred == y))
}
