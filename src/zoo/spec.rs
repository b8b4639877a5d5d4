//! Architecture specs: the short, human-readable files in `models/`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One entry of a spec's `features` list: a convolution or a max pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Feature {
    /// A 3x3 convolution (padding 1) with this many output channels, as in torchvision's VGG
    /// configuration lists.
    Conv3x3(usize),
    /// `"M"`: a 2x2 max pool with stride 2.
    Pool(PoolMarker),
    /// A convolution with explicit geometry.
    Conv(ConvSpec),
}

/// The `"M"` marker of a max pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolMarker {
    /// A 2x2 max pool with stride 2.
    M,
}

/// A convolution with explicit geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvSpec {
    /// Output channels (before the width multiplier).
    pub conv: usize,
    /// Kernel size (square).
    #[serde(default = "default_kernel")]
    pub kernel: usize,
    /// Stride.
    #[serde(default = "default_stride")]
    pub stride: usize,
    /// Zero padding; `kernel / 2` when absent.
    pub padding: Option<usize>,
}

/// The largest size (input side, channels, kernel, stride, head width) a spec may give: far
/// beyond any network that fits in memory, small enough that the geometry never overflows.
pub const MAX_SIZE: usize = 1 << 24;

fn default_kernel() -> usize {
    3
}

fn default_stride() -> usize {
    1
}

impl Feature {
    /// The convolution this entry describes, if it is one.
    pub fn conv(&self) -> Option<ConvSpec> {
        match *self {
            Feature::Conv3x3(c) => Some(ConvSpec {
                conv: c,
                kernel: 3,
                stride: 1,
                padding: Some(1),
            }),
            Feature::Conv(c) => Some(c),
            Feature::Pool(_) => None,
        }
    }
}

impl ConvSpec {
    /// The padding, defaulting to `kernel / 2`.
    pub fn padding(&self) -> usize {
        self.padding.unwrap_or(self.kernel / 2)
    }
}

/// A network architecture: convolutional features, then a dense head, then the classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name the zoo knows it by.
    pub name: String,
    /// One line for listings.
    pub summary: String,
    /// Default input shape `[channels, height, width]`.
    pub input: [usize; 3],
    /// Default number of classes.
    pub classes: usize,
    /// Whether every convolution is followed by BatchNorm (before the ReLU).
    #[serde(default)]
    pub batch_norm: bool,
    /// Convolutions (each followed by ReLU) and max pools, in order.
    pub features: Vec<Feature>,
    /// Hidden dense widths (each followed by ReLU); the classifier comes after them.
    #[serde(default)]
    pub head: Vec<usize>,
}

/// The specs shipped in `models/`, embedded in the binary: `(name, TOML text)`.
pub const BUILTIN: [(&str, &str); 6] = [
    ("lenet5", include_str!("../../models/lenet5.toml")),
    ("alexnet", include_str!("../../models/alexnet.toml")),
    ("vgg11", include_str!("../../models/vgg11.toml")),
    ("vgg13", include_str!("../../models/vgg13.toml")),
    ("vgg16", include_str!("../../models/vgg16.toml")),
    ("vgg19", include_str!("../../models/vgg19.toml")),
];

impl ModelSpec {
    /// Parses a spec from TOML; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let spec: ModelSpec = toml::from_str(text)
            .map_err(|e| Error::invalid(format!("model spec {origin} does not parse: {e}")))?;
        spec.validate(origin)?;
        Ok(spec)
    }

    /// A built-in network by name (`whvi zoo` lists them) or a spec file by path.
    pub fn lookup(name_or_path: &str) -> Result<Self> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return ModelSpec::from_toml(text, &format!("models/{name_or_path}.toml"));
        }
        let path = Path::new(name_or_path);
        if path.extension().is_some_and(|e| e == "toml") || path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            return ModelSpec::from_toml(&text, &path.display().to_string());
        }
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        Err(Error::invalid(format!(
            "unknown model '{name_or_path}': use one of {} or the path of a .toml spec file",
            names.join(", ")
        )))
    }

    /// Every built-in spec.
    pub fn builtin() -> Vec<ModelSpec> {
        BUILTIN
            .iter()
            .map(|(name, text)| {
                ModelSpec::from_toml(text, name).expect("built-in model specs are valid")
            })
            .collect()
    }

    /// Checks what the geometry needs: no zero sizes, paddings smaller than their kernels,
    /// sizes small enough to compute with. Spec files are checked when read; checkpoints' and
    /// hand-built specs when planned.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(format!("model spec {origin}: {what}")));
        if self.input.contains(&0) {
            return bad(format!("input shape {:?} has a zero dimension", self.input));
        }
        if self.input.iter().any(|&d| d > MAX_SIZE) {
            return bad(format!(
                "input shape {:?} has a dimension over {MAX_SIZE}",
                self.input
            ));
        }
        if self.classes < 2 {
            return bad(format!(
                "classes is {}; a classifier needs at least 2",
                self.classes
            ));
        }
        for (i, f) in self.features.iter().enumerate() {
            if let Some(c) = f.conv() {
                if c.conv == 0 || c.kernel == 0 || c.stride == 0 {
                    return bad(format!(
                        "features[{i}]: channels, kernel and stride must be >= 1"
                    ));
                }
                if [c.conv, c.kernel, c.stride].iter().any(|&v| v > MAX_SIZE) {
                    return bad(format!(
                        "features[{i}]: channels, kernel and stride must be at most {MAX_SIZE}"
                    ));
                }
                if c.padding() >= c.kernel {
                    return bad(format!(
                        "features[{i}]: padding {} of a {k}x{k} kernel must be less than {k} \
                         (more padding only adds outputs that see no input)",
                        c.padding(),
                        k = c.kernel
                    ));
                }
            }
        }
        if self.head.contains(&0) {
            return bad("head widths must be >= 1".to_string());
        }
        if self.head.iter().any(|&d| d > MAX_SIZE) {
            return bad(format!("head widths must be at most {MAX_SIZE}"));
        }
        Ok(())
    }
}
