//! Checkpoints shipped inside whvi, loaded by name: `pretrained:NAME` wherever a checkpoint
//! path is taken (`whvi eval pretrained:vgg11-x0.25-whvi-cifar10`, [`Checkpoint::load`]).
//!
//! The files live in `models/pretrained/NAME.safetensors`; the build script embeds every file
//! there, so the binary needs no download and no copy of the repository to use them.
//!
//! [`Checkpoint::load`]: super::Checkpoint::load

use std::path::Path;

use crate::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/pretrained.rs"));

/// The prefix that names a shipped checkpoint instead of a file.
pub const PREFIX: &str = "pretrained:";

/// The names of the shipped checkpoints, sorted.
pub fn names() -> impl Iterator<Item = &'static str> {
    SHIPPED.iter().map(|(name, _)| *name)
}

/// The shipped checkpoint `path` names (`pretrained:NAME`), if it names one.
pub fn name_of(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix(PREFIX)
}

/// The file bytes of the shipped checkpoint `name`; an unknown name is an error that lists
/// the known ones.
pub fn bytes(name: &str) -> Result<&'static [u8]> {
    SHIPPED
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, bytes)| *bytes)
        .ok_or_else(|| {
            let known: Vec<&str> = names().collect();
            Error::invalid(format!(
                "no shipped checkpoint is called '{name}'; whvi ships {} (`whvi zoo \
                 --pretrained` lists them with their metrics)",
                if known.is_empty() {
                    "none in this build".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
}

/// One line per shipped checkpoint: its name, summary and headline metrics (`whvi zoo
/// --pretrained`).
pub fn listing() -> Result<String> {
    use std::fmt::Write;
    let mut s = String::new();
    for name in names() {
        let path = format!("{PREFIX}{name}");
        let meta = super::Checkpoint::read_meta(&path)?;
        let Some(card) = meta.card else {
            let _ = writeln!(s, "{name:<36} (no card)");
            continue;
        };
        let metric = |key: &str| {
            card.metrics
                .get(key)
                .map_or("-".into(), |v| format!("{v:.4}"))
        };
        let _ = writeln!(
            s,
            "{name:<36} {}\n{:<36} accuracy {}, NLL {}, ECE-15 {}, corrupted ECE-15 {}, OOD AUROC {}",
            card.summary,
            "",
            metric("accuracy"),
            metric("nll"),
            metric("ece15"),
            metric("corrupted_ece15"),
            metric("ood_auroc_entropy"),
        );
    }
    if s.is_empty() {
        s.push_str("no checkpoints are shipped in this build\n");
    }
    let _ = writeln!(
        s,
        "\n(`whvi eval {PREFIX}NAME` evaluates one; `whvi info` shows its card)"
    );
    Ok(s)
}
