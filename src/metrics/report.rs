//! The metrics report: every metric of section 7 for one evaluation, as JSON and as a table.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::calibration::{
    accuracy, adaptive_ece, aurc, brier, classwise_ece, nll, ReliabilityDiagram,
};
use super::ood::{ood_detection, OodMetrics};
use super::uncertainty::{mean_entropy, mutual_information, ood_scores, OodScore};
use super::{Predictions, DEFAULT_BINS};
use crate::{Error, Result};

/// All metrics of one evaluation, with 15 bins for the calibration errors.
///
/// The JSON keys are the field names; optional fields are left out when absent: the OOD keys
/// without an OOD set, the mutual-information keys without per-sample probabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsReport {
    /// The number of in-distribution examples.
    pub n: usize,
    /// The number of classes.
    pub num_classes: usize,
    /// The number of posterior samples behind the probabilities, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_samples: Option<usize>,
    /// Accuracy (fraction).
    pub accuracy: f64,
    /// Negative log-likelihood (nats).
    pub nll: f64,
    /// Brier score, summed over classes.
    pub brier: f64,
    /// Expected calibration error, 15 equal-width bins.
    pub ece15: f64,
    /// Maximum calibration error, 15 equal-width bins.
    pub mce15: f64,
    /// Adaptive (equal-mass) ECE, 15 bins.
    pub adaptive_ece15: f64,
    /// Classwise ECE, 15 bins, mean over classes.
    pub classwise_ece15: f64,
    /// Mean predictive entropy (nats).
    pub mean_entropy: f64,
    /// Mean mutual information (nats), with per-sample probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_mutual_information: Option<f64>,
    /// Area under the risk-coverage curve.
    pub aurc: f64,
    /// The number of OOD examples, with an OOD set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_ood: Option<usize>,
    /// OOD AUROC with the entropy score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_auroc_entropy: Option<f64>,
    /// OOD AUPR (average precision) with the entropy score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_aupr_entropy: Option<f64>,
    /// OOD FPR at 95% TPR with the entropy score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_fpr95_entropy: Option<f64>,
    /// OOD AUROC with the `1 - max p` score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_auroc_max_prob: Option<f64>,
    /// OOD AUPR with the `1 - max p` score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_aupr_max_prob: Option<f64>,
    /// OOD FPR at 95% TPR with the `1 - max p` score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_fpr95_max_prob: Option<f64>,
    /// OOD AUROC with the mutual-information score (both sets with per-sample probabilities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_auroc_mi: Option<f64>,
    /// OOD AUPR with the mutual-information score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_aupr_mi: Option<f64>,
    /// OOD FPR at 95% TPR with the mutual-information score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_fpr95_mi: Option<f64>,
}

/// Computes the report of `predictions` against `labels`, with OOD detection when an OOD set
/// is given (it must have the same number of classes).
pub fn compute_report(
    predictions: &Predictions,
    labels: &[usize],
    ood: Option<&Predictions>,
) -> Result<MetricsReport> {
    let probs = predictions.mean();
    let diagram = ReliabilityDiagram::new(probs, labels, DEFAULT_BINS)?;
    let mut report = MetricsReport {
        n: probs.n(),
        num_classes: probs.k(),
        num_samples: predictions.samples().map(|s| s.t()),
        accuracy: accuracy(probs, labels)?,
        nll: nll(probs, labels)?,
        brier: brier(probs, labels)?,
        ece15: diagram.ece(),
        mce15: diagram.mce(),
        adaptive_ece15: adaptive_ece(probs, labels, DEFAULT_BINS)?,
        classwise_ece15: classwise_ece(probs, labels, DEFAULT_BINS)?,
        mean_entropy: mean_entropy(probs),
        mean_mutual_information: predictions.samples().map(|s| {
            let mi = mutual_information(s);
            mi.iter().sum::<f64>() / mi.len() as f64
        }),
        aurc: aurc(probs, labels)?,
        n_ood: None,
        ood_auroc_entropy: None,
        ood_aupr_entropy: None,
        ood_fpr95_entropy: None,
        ood_auroc_max_prob: None,
        ood_aupr_max_prob: None,
        ood_fpr95_max_prob: None,
        ood_auroc_mi: None,
        ood_aupr_mi: None,
        ood_fpr95_mi: None,
    };
    let Some(ood) = ood else {
        return Ok(report);
    };
    if ood.mean().k() != probs.k() {
        return Err(Error::invalid(format!(
            "the OOD probabilities have {} classes but the in-distribution ones have {}; both \
             must come from the same model",
            ood.mean().k(),
            probs.k()
        )));
    }
    report.n_ood = Some(ood.mean().n());
    let detect = |score| -> Result<OodMetrics> {
        ood_detection(&ood_scores(predictions, score)?, &ood_scores(ood, score)?)
    };
    let entropy = detect(OodScore::Entropy)?;
    report.ood_auroc_entropy = Some(entropy.auroc);
    report.ood_aupr_entropy = Some(entropy.aupr);
    report.ood_fpr95_entropy = Some(entropy.fpr95);
    let max_prob = detect(OodScore::OneMinusMaxProb)?;
    report.ood_auroc_max_prob = Some(max_prob.auroc);
    report.ood_aupr_max_prob = Some(max_prob.aupr);
    report.ood_fpr95_max_prob = Some(max_prob.fpr95);
    if predictions.samples().is_some() && ood.samples().is_some() {
        let mi = detect(OodScore::MutualInformation)?;
        report.ood_auroc_mi = Some(mi.auroc);
        report.ood_aupr_mi = Some(mi.aupr);
        report.ood_fpr95_mi = Some(mi.fpr95);
    }
    Ok(report)
}

impl fmt::Display for MetricsReport {
    /// A two-column table of the metrics that are present.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let samples = self
            .num_samples
            .map_or(String::new(), |t| format!(", T = {t} samples"));
        writeln!(
            f,
            "{} examples, {} classes{samples}",
            self.n, self.num_classes
        )?;
        let mut rows: Vec<(&str, Option<f64>)> = vec![
            ("accuracy", Some(self.accuracy)),
            ("NLL", Some(self.nll)),
            ("Brier", Some(self.brier)),
            ("ECE-15", Some(self.ece15)),
            ("MCE-15", Some(self.mce15)),
            ("adaptive ECE-15", Some(self.adaptive_ece15)),
            ("classwise ECE-15", Some(self.classwise_ece15)),
            ("mean entropy", Some(self.mean_entropy)),
            ("mean mutual information", self.mean_mutual_information),
            ("AURC", Some(self.aurc)),
        ];
        if let Some(n_ood) = self.n_ood {
            writeln!(f, "OOD set: {n_ood} examples")?;
            rows.extend([
                ("OOD AUROC (entropy)", self.ood_auroc_entropy),
                ("OOD AUPR (entropy)", self.ood_aupr_entropy),
                ("OOD FPR@95%TPR (entropy)", self.ood_fpr95_entropy),
                ("OOD AUROC (1 - max p)", self.ood_auroc_max_prob),
                ("OOD AUPR (1 - max p)", self.ood_aupr_max_prob),
                ("OOD FPR@95%TPR (1 - max p)", self.ood_fpr95_max_prob),
                ("OOD AUROC (MI)", self.ood_auroc_mi),
                ("OOD AUPR (MI)", self.ood_aupr_mi),
                ("OOD FPR@95%TPR (MI)", self.ood_fpr95_mi),
            ]);
        }
        let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        writeln!(f, "{:-<1$}", "", width + 12)?;
        for (name, value) in rows {
            if let Some(value) = value {
                // A value that rounds to zero prints as 0, not -0.000000 (entropies and NLLs
                // of certain predictions come out as -1e-17).
                let value = if value.abs() < 5e-7 { 0.0 } else { value };
                writeln!(f, "{name:<width$}  {value:>10.6}")?;
            }
        }
        Ok(())
    }
}
