//! What `whvi metrics` does, for any caller: load `.npy` predictions and labels, compute the
//! report, print it, write it as JSON and draw the plots.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::npy::{load_labels, load_predictions};
use super::plot::{plot_ood_histogram, plot_reliability};
use super::report::{compute_report, MetricsReport};
use super::uncertainty::{ood_scores, OodScore};
use super::{calibration::ReliabilityDiagram, Predictions, DEFAULT_BINS};
use crate::output::{check_output, write_atomic};
use crate::{Error, Result};

/// What to compute metrics on and where the results go (the inputs of `whvi metrics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsJob {
    /// Predictive probabilities, .npy float32/float64 of shape [N, K], or [T, N, K] per
    /// posterior sample (averaged here; enables the mutual-information metrics).
    pub probs: PathBuf,
    /// True labels, .npy integer array of shape `[N]` with values in 0..K.
    pub labels: PathBuf,
    /// Probabilities on an out-of-distribution set, [M, K] or [T, M, K]: adds OOD detection.
    pub ood_probs: Option<PathBuf>,
    /// Write the report as JSON to this file (never over an input; over an existing file only
    /// with `force`).
    pub report: Option<PathBuf>,
    /// Let `report` replace an existing file.
    pub force: bool,
    /// Write the plots (PNG and SVG) into this directory, created if missing.
    pub plots: Option<PathBuf>,
}

/// Runs a metrics job: computes the report, writes the table to `out`, and the JSON report
/// and plots where asked. Returns the report.
pub fn run_metrics(args: &MetricsJob, out: &mut dyn Write) -> Result<MetricsReport> {
    if let Some(report) = &args.report {
        let mut inputs = vec![args.probs.as_path(), args.labels.as_path()];
        inputs.extend(args.ood_probs.as_deref());
        check_output(report, &inputs, args.force, "--report")?;
    }
    let predictions = load_predictions(&args.probs)?;
    let labels = load_labels(&args.labels)?;
    if labels.len() != predictions.mean().n() {
        return Err(Error::invalid(format!(
            "{} holds {} labels but {} holds {} examples; they must match one to one",
            args.labels.display(),
            labels.len(),
            args.probs.display(),
            predictions.mean().n()
        )));
    }
    let ood = args
        .ood_probs
        .as_deref()
        .map(load_predictions)
        .transpose()?;
    let report = compute_report(&predictions, &labels, ood.as_ref())?;

    let stdout_err = |e| Error::io("<stdout>", e);
    write!(out, "{report}").map_err(stdout_err)?;
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::invalid(format!("cannot serialise the report: {e}")))?;
        write_atomic(path, |w| {
            w.write_all(json.as_bytes())?;
            w.write_all(b"\n")
        })?;
        writeln!(out, "report written to {}", path.display()).map_err(stdout_err)?;
    }
    if let Some(dir) = &args.plots {
        let written = write_plots(dir, &predictions, &labels, ood.as_ref())?;
        for path in written {
            writeln!(out, "plot written to {}", path.display()).map_err(stdout_err)?;
        }
    }
    Ok(report)
}

/// Draws the reliability diagram and, with an OOD set, the score histograms into `dir`, as PNG
/// and SVG; returns the files written.
fn write_plots(
    dir: &Path,
    predictions: &Predictions,
    labels: &[usize],
    ood: Option<&Predictions>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();
    let diagram = ReliabilityDiagram::new(predictions.mean(), labels, DEFAULT_BINS)?;
    for ext in ["png", "svg"] {
        let path = dir.join(format!("reliability.{ext}"));
        plot_reliability(&diagram, "Reliability diagram", &path)?;
        written.push(path);
    }
    if let Some(ood) = ood {
        let mut scores = vec![(OodScore::Entropy, "entropy")];
        if predictions.samples().is_some() && ood.samples().is_some() {
            scores.push((OodScore::MutualInformation, "mi"));
        }
        for (score, stem) in scores {
            let in_scores = ood_scores(predictions, score)?;
            let out_scores = ood_scores(ood, score)?;
            for ext in ["png", "svg"] {
                let path = dir.join(format!("ood_{stem}.{ext}"));
                plot_ood_histogram(&in_scores, &out_scores, score.name(), &path)?;
                written.push(path);
            }
        }
    }
    Ok(written)
}
