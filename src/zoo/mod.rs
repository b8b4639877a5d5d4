//! The model zoo: architectures looked up by name (or read from a spec file), built with any
//! posterior per layer.
//!
//! Specs are TOML files in `models/`, embedded in the binary: TOML because a person edits them
//! (comments, no quoting of keys) and serde reads them into [`ModelSpec`] with clear errors.

mod network;
mod predict;
mod spec;

pub use network::{
    check_fits_in_memory, plan, summary, BayesPolicy, BuildOptions, LayerKind, LayerPlan, Method,
    Network,
};
pub use predict::{ensemble_predictions, mean_logits, predict, PredictOptions};
pub use spec::{ConvSpec, Feature, ModelSpec, PoolMarker, BUILTIN, MAX_SIZE};
