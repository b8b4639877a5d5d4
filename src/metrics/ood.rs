//! Out-of-distribution detection from per-example scores.
//!
//! In-distribution examples are the negatives (label 0) and OOD examples the positives
//! (label 1); a higher score means "more likely OOD". An example is flagged at threshold `τ`
//! when its score is `>= τ`, and the curves run over the distinct score values from the
//! highest down, so tied scores move together (as scikit-learn's `roc_curve` and
//! `precision_recall_curve` do).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AUROC, AUPR and FPR at 95% TPR of one OOD score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OodMetrics {
    /// The area under the ROC curve ([`auroc`]).
    pub auroc: f64,
    /// The area under the precision-recall curve as average precision ([`average_precision`]).
    pub aupr: f64,
    /// The false-positive rate at 95% true-positive rate ([`fpr_at_tpr`]).
    pub fpr95: f64,
}

/// All three OOD metrics of scores on in-distribution and OOD examples.
pub fn ood_detection(in_scores: &[f64], out_scores: &[f64]) -> Result<OodMetrics> {
    let curve = Curve::new(in_scores, out_scores)?;
    Ok(OodMetrics {
        auroc: curve.auroc(),
        aupr: curve.average_precision(),
        fpr95: curve.fpr_at_tpr(0.95),
    })
}

/// The area under the ROC curve (FPR on x, TPR on y, trapezoidal rule through the points of
/// the distinct thresholds, as `sklearn.metrics.roc_auc_score`): the probability that a random
/// OOD example scores above a random in-distribution one, ties counting one half.
pub fn auroc(in_scores: &[f64], out_scores: &[f64]) -> Result<f64> {
    Ok(Curve::new(in_scores, out_scores)?.auroc())
}

/// Average precision with OOD as the positive class, as
/// `sklearn.metrics.average_precision_score`: `Σ_j (R_j - R_{j-1}) · P_j` over the distinct
/// thresholds from the highest down, with `R_0 = 0` (no interpolation).
pub fn average_precision(in_scores: &[f64], out_scores: &[f64]) -> Result<f64> {
    Ok(Curve::new(in_scores, out_scores)?.average_precision())
}

/// The false-positive rate at the highest threshold whose true-positive rate is at least
/// `tpr` (the lowest FPR among thresholds that reach that TPR); `tpr` in `(0, 1]`.
///
/// Every distinct score is a threshold, tied scores (within or across the two sets) entering
/// together. This equals `fpr[argmax(tpr >= target)]` on scikit-learn's
/// `roc_curve(..., drop_intermediate=False)`. roc_curve's default (`drop_intermediate=True`)
/// drops thresholds whose ROC point is collinear with its neighbours, and can then report a
/// higher FPR than a threshold that exists reaches (see the tests).
pub fn fpr_at_tpr(in_scores: &[f64], out_scores: &[f64], tpr: f64) -> Result<f64> {
    if !(tpr > 0.0 && tpr <= 1.0) {
        return Err(Error::invalid(format!(
            "the target true-positive rate must lie in (0, 1], got {tpr}"
        )));
    }
    Ok(Curve::new(in_scores, out_scores)?.fpr_at_tpr(tpr))
}

/// The cumulative counts at each distinct threshold, highest first.
struct Curve {
    /// `(true positives, false positives)` flagged at each distinct threshold.
    points: Vec<(usize, usize)>,
    positives: usize,
    negatives: usize,
}

impl Curve {
    fn new(in_scores: &[f64], out_scores: &[f64]) -> Result<Self> {
        if in_scores.is_empty() || out_scores.is_empty() {
            return Err(Error::invalid(format!(
                "OOD detection needs both sets: got {} in-distribution and {} OOD scores",
                in_scores.len(),
                out_scores.len()
            )));
        }
        let mut scored: Vec<(f64, bool)> = Vec::with_capacity(in_scores.len() + out_scores.len());
        for (set, scores, positive) in [
            ("in-distribution", in_scores, false),
            ("OOD", out_scores, true),
        ] {
            if let Some((i, s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
                return Err(Error::invalid(format!(
                    "OOD detection: {set} score {i} is {s}; scores must be finite"
                )));
            }
            scored.extend(scores.iter().map(|&s| (s, positive)));
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut points = Vec::new();
        let (mut tp, mut fp) = (0, 0);
        for (i, &(score, positive)) in scored.iter().enumerate() {
            if positive {
                tp += 1;
            } else {
                fp += 1;
            }
            if scored.get(i + 1).is_none_or(|next| next.0 != score) {
                points.push((tp, fp));
            }
        }
        Ok(Curve {
            points,
            positives: out_scores.len(),
            negatives: in_scores.len(),
        })
    }

    fn rates(&self, (tp, fp): (usize, usize)) -> (f64, f64) {
        (
            tp as f64 / self.positives as f64,
            fp as f64 / self.negatives as f64,
        )
    }

    fn auroc(&self) -> f64 {
        let mut area = 0.0;
        let (mut prev_tpr, mut prev_fpr) = (0.0, 0.0);
        for &point in &self.points {
            let (tpr, fpr) = self.rates(point);
            area += (fpr - prev_fpr) * (tpr + prev_tpr) / 2.0;
            (prev_tpr, prev_fpr) = (tpr, fpr);
        }
        area
    }

    fn average_precision(&self) -> f64 {
        let mut ap = 0.0;
        let mut prev_recall = 0.0;
        for &(tp, fp) in &self.points {
            let recall = tp as f64 / self.positives as f64;
            let precision = tp as f64 / (tp + fp) as f64;
            ap += (recall - prev_recall) * precision;
            prev_recall = recall;
        }
        ap
    }

    fn fpr_at_tpr(&self, target: f64) -> f64 {
        self.points
            .iter()
            .map(|&p| self.rates(p))
            .find(|&(tpr, _)| tpr >= target)
            .map_or(1.0, |(_, fpr)| fpr)
    }
}
