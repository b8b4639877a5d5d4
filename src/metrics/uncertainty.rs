//! Predictive entropy, mutual information and the uncertainty scores used for OOD detection.
//!
//! Entropies are in nats, with `0 · ln 0 = 0`.

use serde::{Deserialize, Serialize};

use super::{Predictions, Probs, SampleProbs};
use crate::{Error, Result};

/// The entropy `H[p] = -Σ_k p_k ln p_k` of one distribution.
fn row_entropy(row: &[f64]) -> f64 {
    -row.iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| p * p.ln())
        .sum::<f64>()
}

/// The predictive entropy `H[p_i]` of every example (nats).
pub fn entropy(probs: &Probs) -> Vec<f64> {
    probs.rows().map(row_entropy).collect()
}

/// The mean predictive entropy over examples (nats).
pub fn mean_entropy(probs: &Probs) -> f64 {
    entropy(probs).iter().sum::<f64>() / probs.n() as f64
}

/// The mutual information between the prediction and the weights (the epistemic part of the
/// predictive entropy) for every example: `H[mean_t p_t] - mean_t H[p_t]`.
///
/// It is non-negative in exact arithmetic; rounding can push it a few ulps below zero, and
/// such values are returned as 0.
pub fn mutual_information(samples: &SampleProbs) -> Vec<f64> {
    let total = entropy(&samples.mean());
    let (n, k) = (samples.n(), samples.k());
    let mut expected = vec![0.0; n];
    for s in 0..samples.t() {
        for (e, row) in expected.iter_mut().zip(samples.sample(s).chunks_exact(k)) {
            *e += row_entropy(row);
        }
    }
    let scale = 1.0 / samples.t() as f64;
    total
        .iter()
        .zip(&expected)
        .map(|(&h, &e)| (h - e * scale).max(0.0))
        .collect()
}

/// A per-example uncertainty score for OOD detection; higher means "more likely OOD".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OodScore {
    /// The predictive entropy of the averaged probabilities.
    Entropy,
    /// The mutual information (needs per-sample probabilities).
    MutualInformation,
    /// One minus the top-label confidence, `1 - max_k p_k`.
    OneMinusMaxProb,
}

impl OodScore {
    /// A short name for reports and plot labels.
    pub fn name(self) -> &'static str {
        match self {
            OodScore::Entropy => "entropy",
            OodScore::MutualInformation => "mutual information",
            OodScore::OneMinusMaxProb => "1 - max p",
        }
    }
}

/// The score of every example of `predictions`.
///
/// [`OodScore::MutualInformation`] needs per-sample probabilities; without them this is an
/// error.
pub fn ood_scores(predictions: &Predictions, score: OodScore) -> Result<Vec<f64>> {
    match score {
        OodScore::Entropy => Ok(entropy(predictions.mean())),
        OodScore::OneMinusMaxProb => Ok(predictions
            .mean()
            .top_labels()
            .into_iter()
            .map(|(_, c)| 1.0 - c)
            .collect()),
        OodScore::MutualInformation => {
            predictions
                .samples()
                .map(mutual_information)
                .ok_or_else(|| {
                    Error::invalid(
                        "the mutual-information score needs per-sample probabilities [T, N, K]; \
                     only averaged probabilities [N, K] were given",
                    )
                })
        }
    }
}
