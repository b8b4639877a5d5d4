//! The posterior-mean network of a checkpoint as a plain state dict with PyTorch's names, for
//! use outside whvi (`whvi export CK --mean OUT.safetensors`).
//!
//! The layers are numbered as in torchvision's VGG: `features.N` for every layer before the
//! flatten (convolutions, batch norms, ReLUs, pools), `classifier.N` after it, so a
//! `torch.nn.Sequential` rebuilt from the sidecar JSON (`OUT.json`) loads the file with
//! `load_state_dict` (see `examples/export_to_pytorch.py`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::{write_atomic, Checkpoint};
use crate::zoo::LayerKind;
use crate::{Error, Result};

/// Writes the posterior-mean network of `checkpoint` to `out` as f32 safetensors with PyTorch
/// names, and its architecture to `out` with the extension `.json`; returns the JSON's path.
/// Refuses to replace either file unless `overwrite`.
pub fn export_mean(checkpoint: &Path, out: &Path, overwrite: bool) -> Result<PathBuf> {
    let sidecar = out.with_extension("json");
    for path in [out, sidecar.as_path()] {
        crate::output::check_output(path, &[checkpoint], overwrite, "the export")?;
    }
    let model = Checkpoint::load(checkpoint, &Device::Cpu)?;
    let stored = model.params.named_vars();
    let stored = |name: &str| -> Result<Tensor> {
        stored
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor().clone())
            .ok_or_else(|| Error::checkpoint(checkpoint, format!("has no tensor {name}")))
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut sections: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    let mut section = 0;
    for (index, row) in model.network.plan().iter().enumerate() {
        let prefix = format!(
            "{}.{}",
            ["features", "classifier"][section],
            sections[section].len()
        );
        let layer = match row.kind {
            LayerKind::Conv {
                c_in,
                c_out,
                kernel,
                stride,
                padding,
            } => json!({"type": "conv2d", "in": c_in, "out": c_out, "kernel": kernel,
                        "stride": stride, "padding": padding}),
            LayerKind::Dense { d_in, d_out } => json!({"type": "linear", "in": d_in, "out": d_out}),
            LayerKind::BatchNorm(channels) => {
                for buffer in ["weight", "bias", "running_mean", "running_var"] {
                    let t = stored(&format!("{}.{buffer}", row.name))?;
                    tensors.push((format!("{prefix}.{buffer}"), t));
                }
                let tracked = Tensor::new(0i64, &Device::Cpu)?;
                tensors.push((format!("{prefix}.num_batches_tracked"), tracked));
                json!({"type": "batch_norm2d", "channels": channels, "eps": 1e-5})
            }
            LayerKind::Relu => json!({"type": "relu"}),
            LayerKind::MaxPool => json!({"type": "max_pool2d", "kernel": 2}),
            LayerKind::Dropout(p) => json!({"type": "dropout", "p": p}),
            LayerKind::Flatten => {
                section = 1;
                continue;
            }
        };
        if let Some((weight, bias)) = model.network.mean_weight(index)? {
            tensors.push((format!("{prefix}.weight"), weight));
            tensors.push((format!("{prefix}.bias"), bias));
        }
        sections[section].push(layer);
    }
    let metadata = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| Error::checkpoint(out, format!("cannot serialise: {e}")))?;
    write_atomic(out, |w| w.write_all(&bytes))?;
    let meta = &model.meta;
    let architecture = json!({
        "model": meta.spec.name,
        "source": checkpoint.display().to_string(),
        "weights": "posterior mean",
        "input": model.network.input_shape(),
        "class_names": meta.class_names,
        "normalization": meta.normalization.as_ref().map(|n| json!({"mean": n.mean(), "std": n.std()})),
        "features": sections[0],
        "classifier": sections[1],
    });
    let text = serde_json::to_string_pretty(&architecture)
        .map_err(|e| Error::invalid(format!("cannot serialise the architecture: {e}")))?;
    write_atomic(&sidecar, |w| w.write_all(text.as_bytes()))?;
    Ok(sidecar)
}
