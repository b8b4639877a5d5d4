//! Model cards: what a published checkpoint is, how it was made and how well it does, stored in
//! the checkpoint's own metadata (key `card`) and written out as a Hugging Face model-card
//! README (YAML front matter, then Markdown) by `whvi card`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::CheckpointMeta;
use crate::{Error, Result};

/// The metrics a card keeps from a `whvi eval` report (top-level keys of its JSON), in the
/// order the card shows them, with the label each gets.
pub const CARD_METRICS: [(&str, &str); 11] = [
    ("accuracy", "accuracy"),
    ("nll", "NLL"),
    ("brier", "Brier"),
    ("ece15", "ECE-15"),
    ("corrupted_accuracy", "corrupted accuracy"),
    ("corrupted_nll", "corrupted NLL"),
    ("corrupted_brier", "corrupted Brier"),
    ("corrupted_ece15", "corrupted ECE-15"),
    ("ood_auroc_entropy", "OOD AUROC (entropy)"),
    ("ood_auroc_mi", "OOD AUROC (mutual information)"),
    ("mean_mutual_information", "mean mutual information"),
];

/// A published checkpoint's card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The name it is published under (`pretrained:NAME`).
    pub name: String,
    /// One line on what it is.
    pub summary: String,
    /// The training data set (`cifar10`, `fashion-mnist`, ...).
    pub dataset: String,
    /// The command that trained it.
    pub training_command: String,
    /// What the metrics were measured on, and the command that measured them.
    pub evaluation: String,
    /// Number of stored weight values.
    pub parameters: usize,
    /// The dtype the weights are stored in.
    pub weights_dtype: String,
    /// Metrics from the evaluation, by the keys of [`CARD_METRICS`].
    pub metrics: BTreeMap<String, f64>,
    /// The licence of the weights.
    pub license: String,
}

/// What the publisher says about a checkpoint; the rest of its card comes from the checkpoint
/// and the evaluation report.
#[derive(Debug, Clone)]
pub struct CardInput {
    /// The name to publish under.
    pub name: String,
    /// One line on what it is.
    pub summary: String,
    /// The command that trained it.
    pub training_command: String,
    /// What the metrics were measured on, and how.
    pub evaluation: String,
    /// The `whvi eval --report` JSON of this checkpoint (one object, or an array of one).
    pub report: serde_json::Value,
}

impl ModelCard {
    /// The card of a checkpoint with `meta`, `parameters` weight values stored as `dtype`.
    pub fn new(
        input: CardInput,
        meta: &CheckpointMeta,
        parameters: usize,
        dtype: &str,
    ) -> Result<Self> {
        if input.name.is_empty()
            || !input
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(Error::invalid(format!(
                "a published name takes letters, digits, '-', '.' and '_' only, not '{}'",
                input.name
            )));
        }
        let report = match &input.report {
            serde_json::Value::Array(items) if items.len() == 1 => &items[0],
            serde_json::Value::Array(items) => {
                return Err(Error::invalid(format!(
                    "the report holds {} evaluations; give the report of this checkpoint alone",
                    items.len()
                )))
            }
            other => other,
        };
        let metrics: BTreeMap<String, f64> = CARD_METRICS
            .iter()
            .filter_map(|(key, _)| Some((key.to_string(), report.get(*key)?.as_f64()?)))
            .collect();
        if !metrics.contains_key("accuracy") {
            return Err(Error::invalid(
                "the report has no top-level `accuracy`: give the JSON that `whvi eval --report` \
                 wrote",
            ));
        }
        Ok(ModelCard {
            name: input.name,
            summary: input.summary,
            dataset: dataset_of(meta),
            training_command: input.training_command,
            evaluation: input.evaluation,
            parameters,
            weights_dtype: dtype.to_string(),
            metrics,
            license: "MIT OR Apache-2.0".into(),
        })
    }

    /// The card as a Hugging Face model-card README: YAML front matter (`library_name`,
    /// `license`, `tags`, `datasets`, `metrics`), then the description in Markdown.
    pub fn to_markdown(&self, meta: &CheckpointMeta) -> String {
        let mut s = String::from("---\nlibrary_name: whvi\n");
        let _ = writeln!(s, "license: {}", hub_license(&self.license));
        s.push_str("tags:\n- bayesian-deep-learning\n- variational-inference\n- uncertainty\n");
        let _ = writeln!(
            s,
            "- image-classification\n- {}",
            meta.options.method.name()
        );
        let _ = writeln!(s, "datasets:\n- {}", self.dataset);
        s.push_str("metrics:\n");
        for key in self.metrics.keys() {
            let _ = writeln!(s, "- {key}");
        }
        s.push_str("---\n\n");
        let _ = writeln!(s, "# {}\n\n{}\n", self.name, self.summary);
        self.write_model(&mut s, meta);
        let _ = writeln!(s, "## Training\n\n```sh\n{}\n```\n", self.training_command);
        let _ = writeln!(
            s,
            "Seed {}, {} epochs, {} steps.\n",
            meta.seed.map_or("-".into(), |v| v.to_string()),
            meta.epoch,
            meta.step
        );
        if let Some(beta) = tempering_of(meta) {
            let _ = writeln!(
                s,
                "A tempered posterior: the KL term was weighted by beta = {beta} (the likelihood \
                 raised to 1/beta), not the plain ELBO.\n"
            );
        }
        let _ = writeln!(s, "## Evaluation\n\n{}\n", self.evaluation);
        s.push_str("| metric | value |\n|---|---|\n");
        for (key, label) in CARD_METRICS {
            if let Some(value) = self.metrics.get(key) {
                let _ = writeln!(s, "| {label} | {value:.4} |");
            }
        }
        let _ = writeln!(
            s,
            "\n## Use\n\n```sh\nwhvi eval pretrained:{0} --plots plots/\n```\n\n```rust\nlet \
             model = whvi::checkpoint::Checkpoint::pretrained(\"{0}\", &candle_core::Device::Cpu)?;\n```",
            self.name
        );
        s
    }

    fn write_model(&self, s: &mut String, meta: &CheckpointMeta) {
        let o = &meta.options;
        let [c, h, w] = o.input.unwrap_or(meta.spec.input);
        let _ = writeln!(s, "## Model\n");
        let _ = writeln!(
            s,
            "- architecture: {} ({}), width x{}",
            meta.spec.name, meta.spec.summary, o.width
        );
        let _ = writeln!(
            s,
            "- posterior: {} on the {:?} layers",
            o.method.name(),
            o.policy
        );
        let _ = writeln!(
            s,
            "- parameters: {} ({})",
            self.parameters, self.weights_dtype
        );
        let _ = writeln!(
            s,
            "- input: {c}x{h}x{w}; classes: {}",
            meta.class_names.join(", ")
        );
        let _ = writeln!(s, "- licence: {}\n", self.license);
    }

    /// The card's lines for `whvi info`.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "card         {} — {}", self.name, self.summary);
        let _ = writeln!(s, "  data       {}", self.dataset);
        let _ = writeln!(s, "  trained by {}", self.training_command);
        let _ = writeln!(s, "  evaluation {}", self.evaluation);
        let _ = writeln!(
            s,
            "  parameters {} ({})",
            self.parameters, self.weights_dtype
        );
        for (key, label) in CARD_METRICS {
            if let Some(value) = self.metrics.get(key) {
                let _ = writeln!(s, "  {label:<31} {value:.4}");
            }
        }
        s
    }
}

/// The KL weight of a run that trained a tempered posterior (`None` for the ELBO, and for
/// checkpoints that record no weight).
fn tempering_of(meta: &CheckpointMeta) -> Option<f64> {
    meta.training
        .as_ref()?
        .get("kl_weight")?
        .as_f64()
        .filter(|beta| *beta != 1.0)
}

/// The training data set a checkpoint records (`unknown` when it records none).
fn dataset_of(meta: &CheckpointMeta) -> String {
    meta.training
        .as_ref()
        .and_then(|t| t.get("dataset"))
        .and_then(|d| d.as_str())
        .unwrap_or("unknown")
        .to_string()
}

/// The hub's licence identifier for an SPDX expression it has no single id for.
fn hub_license(spdx: &str) -> &str {
    match spdx {
        "MIT OR Apache-2.0" => "mit",
        other => other,
    }
}

/// Writes the card of the published checkpoint `checkpoint` as a model-card README to `out`
/// (default: `README.md` next to the checkpoint file) and returns where it went. Refuses a
/// checkpoint without a card, and an existing README unless `overwrite`.
pub fn write_readme(
    checkpoint: &std::path::Path,
    out: Option<&std::path::Path>,
    overwrite: bool,
) -> Result<std::path::PathBuf> {
    let meta = super::Checkpoint::read_meta(checkpoint)?;
    let card = meta.card.as_ref().ok_or_else(|| {
        Error::checkpoint(
            checkpoint,
            "has no model card: `whvi publish` makes a checkpoint with one",
        )
    })?;
    let out = match (out, super::pretrained::name_of(checkpoint)) {
        (Some(out), _) => out.to_path_buf(),
        (None, Some(_)) => {
            return Err(Error::invalid(
                "a shipped checkpoint has no folder of its own: give --out README.md",
            ))
        }
        (None, None) => checkpoint.with_file_name("README.md"),
    };
    crate::output::check_output(&out, &[checkpoint], overwrite, "the model card")?;
    let text = card.to_markdown(&meta);
    super::write_atomic(&out, |w| w.write_all(text.as_bytes()))?;
    Ok(out)
}
