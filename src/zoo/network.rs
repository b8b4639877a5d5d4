//! Builds a [`Network`] from a [`ModelSpec`] and a choice of posterior per layer.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::spec::{ModelSpec, MAX_SIZE};
use crate::layers::{
    Activation, AppliedBefore, BatchNorm2d, BayesianModule, ConvSampling, DeterministicConv2d,
    DeterministicLinear, Flatten, MaxPool2d, McDropout, MeanFieldConv2d, MeanFieldConv2dConfig,
    MeanFieldConvMode, MeanFieldLinear, Parameter, Pass, PosteriorConfig, Prior, Sequential,
    WhviConv2d, WhviConv2dConfig, WhviLinear, WhviLinearConfig, DEFAULT_INITIAL_SIGMA,
};
use crate::{Error, Result};

/// The posterior of a weight layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Walsh-Hadamard variational inference.
    Whvi,
    /// Mean-field Gaussian (Bayes by backprop).
    MeanField,
    /// Deterministic weights with MC dropout in front of the layer.
    McDropout,
    /// Point estimates.
    Deterministic,
}

impl Method {
    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Method::Whvi => "whvi",
            Method::MeanField => "mean-field",
            Method::McDropout => "mc-dropout",
            Method::Deterministic => "deterministic",
        }
    }

    /// Parses a method name (`whvi`, `mean-field`, `mc-dropout`, `deterministic`).
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "whvi" => Ok(Method::Whvi),
            "mean-field" | "meanfield" | "mf" => Ok(Method::MeanField),
            "mc-dropout" | "dropout" => Ok(Method::McDropout),
            "deterministic" | "det" => Ok(Method::Deterministic),
            other => Err(Error::invalid(format!(
                "unknown method '{other}': use whvi, mean-field, mc-dropout or deterministic"
            ))),
        }
    }
}

/// Which weight layers get the chosen posterior (the others are deterministic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BayesPolicy {
    /// The dense layers (hidden head and classifier): the paper's finding is that WHVI on
    /// convolution filters alone brings little.
    #[default]
    Head,
    /// Every convolution and dense layer.
    All,
    /// The classifier only.
    Last,
    /// No layer: a deterministic network.
    None,
}

impl BayesPolicy {
    /// Parses `head`, `all`, `last` or `none`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "head" => Ok(BayesPolicy::Head),
            "all" => Ok(BayesPolicy::All),
            "last" => Ok(BayesPolicy::Last),
            "none" => Ok(BayesPolicy::None),
            other => Err(Error::invalid(format!(
                "unknown Bayesian-layer policy '{other}': use head, all, last or none"
            ))),
        }
    }
}

/// Everything besides the spec that decides the network: posterior per layer, width, classes,
/// input shape and the layers' options. Stored in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildOptions {
    /// The posterior of the Bayesian layers.
    pub method: Method,
    /// Which layers are Bayesian.
    pub policy: BayesPolicy,
    /// Per-layer overrides `(layer name, method)`, applied after the policy.
    #[serde(default)]
    pub overrides: Vec<(String, Method)>,
    /// Multiplies every convolution and hidden dense width.
    pub width: f64,
    /// Number of classes; the spec's default when `None`.
    pub classes: Option<usize>,
    /// Input shape `[C, H, W]`; the spec's default when `None`.
    pub input: Option<[usize; 3]>,
    /// How WHVI convolutions sample their filters.
    #[serde(default)]
    pub conv_sampling: ConvSampling,
    /// How mean-field convolutions sample.
    #[serde(default)]
    pub meanfield_conv: MeanFieldConvMode,
    /// Drop probability of MC dropout layers.
    pub dropout: f64,
    /// The prior of the Bayesian layers.
    #[serde(default)]
    pub prior: Prior,
    /// Per-layer priors `(layer name, prior)`, in place of `prior` for those layers.
    #[serde(default)]
    pub prior_overrides: Vec<(String, Prior)>,
    /// The initial posterior standard deviation of the Bayesian layers, as a fraction of their
    /// initial mean's scale.
    #[serde(default = "default_initial_sigma")]
    pub initial_sigma: f64,
}

fn default_initial_sigma() -> f64 {
    DEFAULT_INITIAL_SIGMA
}

impl BuildOptions {
    /// The prior of layer `name`: its override (the last one given), else the global one.
    pub fn prior_of(&self, name: &str) -> Prior {
        self.prior_overrides
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map_or(self.prior, |(_, prior)| *prior)
    }

    /// Refuses a prior (global or per layer) or an initial sigma that no layer could be built
    /// with, so that a run fails before it loads its data rather than when it builds the model.
    pub fn validate(&self) -> crate::Result<()> {
        PosteriorConfig {
            prior: self.prior,
            initial_sigma: self.initial_sigma,
        }
        .validate()?;
        for (_, prior) in &self.prior_overrides {
            prior.validate()?;
        }
        Ok(())
    }

    /// The posterior settings of layer `name`: its prior and the initial width.
    pub fn posterior_of(&self, name: &str) -> PosteriorConfig {
        PosteriorConfig {
            prior: self.prior_of(name),
            initial_sigma: self.initial_sigma,
        }
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            method: Method::Whvi,
            policy: BayesPolicy::Head,
            overrides: Vec::new(),
            width: 1.0,
            classes: None,
            input: None,
            conv_sampling: ConvSampling::Shared,
            meanfield_conv: MeanFieldConvMode::Local,
            dropout: 0.2,
            prior: Prior::HeLike,
            prior_overrides: Vec::new(),
            initial_sigma: DEFAULT_INITIAL_SIGMA,
        }
    }
}

/// What a planned layer computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerKind {
    /// A convolution.
    Conv {
        /// Input channels.
        c_in: usize,
        /// Output channels.
        c_out: usize,
        /// Kernel size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Padding.
        padding: usize,
    },
    /// A dense layer.
    Dense {
        /// Input features.
        d_in: usize,
        /// Output features.
        d_out: usize,
    },
    /// Batch normalisation over channels.
    BatchNorm(usize),
    /// ReLU.
    Relu,
    /// 2x2 max pool.
    MaxPool,
    /// Flatten to `[batch, features]`.
    Flatten,
    /// MC dropout with this drop probability.
    Dropout(f64),
}

/// One row of a network's plan: a layer, its posterior and its output shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// The layer's name (and its parameters' prefix in checkpoints).
    pub name: String,
    /// What it computes.
    pub kind: LayerKind,
    /// Its posterior (deterministic for layers without weights).
    pub method: Method,
    /// Output shape without the batch dimension.
    pub output: Vec<usize>,
}

impl LayerPlan {
    /// Trainable parameters of this layer if it used `method`.
    /// Saturates rather than wraps for absurd sizes, so that a size check can refuse them.
    pub fn params_with(&self, method: Method) -> usize {
        let whvi = |d_in: usize, d_out: usize| {
            let d = d_in.checked_next_power_of_two().unwrap_or(usize::MAX);
            4usize
                .saturating_mul(d)
                .saturating_mul(d_out.div_ceil(d))
                .saturating_add(d_out)
        };
        let product = |factors: &[usize]| factors.iter().fold(1usize, |a, &b| a.saturating_mul(b));
        match (self.kind, method) {
            (
                LayerKind::Conv {
                    c_in,
                    c_out,
                    kernel,
                    ..
                },
                m,
            ) => {
                let w = product(&[c_out, c_in, kernel, kernel]);
                match m {
                    Method::Whvi => whvi(product(&[c_in, kernel, kernel]), c_out),
                    Method::MeanField => product(&[2, w]).saturating_add(c_out),
                    Method::McDropout | Method::Deterministic => w.saturating_add(c_out),
                }
            }
            (LayerKind::Dense { d_in, d_out }, m) => match m {
                Method::Whvi => whvi(d_in, d_out),
                Method::MeanField => product(&[2, d_in, d_out]).saturating_add(d_out),
                Method::McDropout | Method::Deterministic => {
                    product(&[d_in, d_out]).saturating_add(d_out)
                }
            },
            (LayerKind::BatchNorm(c), _) => c.saturating_mul(2),
            _ => 0,
        }
    }

    /// Trainable parameters with the layer's own method.
    pub fn params(&self) -> usize {
        self.params_with(self.method)
    }

    /// Whether the layer has weights that can take a posterior.
    pub fn is_weight_layer(&self) -> bool {
        matches!(self.kind, LayerKind::Conv { .. } | LayerKind::Dense { .. })
    }
}

fn scaled(width: usize, multiplier: f64) -> usize {
    ((width as f64 * multiplier).round() as usize).max(1)
}

/// Lays out the layers of `spec` under `options`, checking that the geometry works.
pub fn plan(spec: &ModelSpec, options: &BuildOptions) -> Result<Vec<LayerPlan>> {
    let (classes, input) = checked_shape(spec, options)?;
    let mut rows = Vec::new();
    let [c, h, w] = plan_features(spec, options, input, &mut rows)?;
    plan_head(spec, options, [c, h, w], classes, &mut rows)?;
    assign_methods(&mut rows, options)?;
    Ok(insert_dropout(rows, options.dropout))
}

/// Adds a deterministic row to a plan (the methods are assigned afterwards).
fn push_row(rows: &mut Vec<LayerPlan>, name: String, kind: LayerKind, output: Vec<usize>) {
    rows.push(LayerPlan {
        name,
        kind,
        method: Method::Deterministic,
        output,
    })
}

/// Checks the spec and the options, and returns the class count and the input shape.
fn checked_shape(spec: &ModelSpec, options: &BuildOptions) -> Result<(usize, [usize; 3])> {
    spec.validate(&spec.name)?;
    if !(options.width > 0.0 && options.width.is_finite()) {
        return Err(Error::invalid(format!(
            "width multiplier must be a positive number, got {}",
            options.width
        )));
    }
    if !(0.0..1.0).contains(&options.dropout) {
        return Err(Error::invalid(format!(
            "dropout probability must be in [0, 1), got {}",
            options.dropout
        )));
    }
    let classes = options.classes.unwrap_or(spec.classes);
    if classes < 2 {
        return Err(Error::invalid(format!(
            "need at least 2 classes, got {classes}"
        )));
    }
    let [c, h, w] = options.input.unwrap_or(spec.input);
    if c == 0 || h == 0 || w == 0 || [c, h, w].iter().any(|&d| d > MAX_SIZE) {
        return Err(Error::invalid(format!(
            "input shape [{c}, {h}, {w}] has a zero dimension or one over {MAX_SIZE}"
        )));
    }
    Ok((classes, [c, h, w]))
}

/// The convolution, batch-norm, ReLU and pooling rows; returns the shape that reaches the
/// head.
fn plan_features(
    spec: &ModelSpec,
    options: &BuildOptions,
    input: [usize; 3],
    rows: &mut Vec<LayerPlan>,
) -> Result<[usize; 3]> {
    let [mut c, mut h, mut w] = input;
    let mut push =
        |name: String, kind: LayerKind, output: Vec<usize>| push_row(rows, name, kind, output);
    let (mut conv_index, mut pool_index) = (0, 0);
    for feature in &spec.features {
        match feature.conv() {
            Some(conv) => {
                conv_index += 1;
                let c_out = scaled(conv.conv, options.width);
                let (k, s, p) = (conv.kernel, conv.stride, conv.padding());
                if h + 2 * p < k || w + 2 * p < k {
                    return Err(Error::invalid(format!(
                        "{}: conv{conv_index} ({k}x{k}) does not fit a {h}x{w} input; use a \
                         larger input or fewer pooling stages",
                        spec.name
                    )));
                }
                h = (h + 2 * p - k) / s + 1;
                w = (w + 2 * p - k) / s + 1;
                let kind = LayerKind::Conv {
                    c_in: c,
                    c_out,
                    kernel: k,
                    stride: s,
                    padding: p,
                };
                c = c_out;
                push(format!("conv{conv_index}"), kind, vec![c, h, w]);
                if spec.batch_norm {
                    push(
                        format!("bn{conv_index}"),
                        LayerKind::BatchNorm(c),
                        vec![c, h, w],
                    );
                }
                push(
                    format!("relu.conv{conv_index}"),
                    LayerKind::Relu,
                    vec![c, h, w],
                );
            }
            None => {
                pool_index += 1;
                if h < 2 || w < 2 {
                    return Err(Error::invalid(format!(
                        "{}: max pool {pool_index} gets a {h}x{w} map; the input [{}, {}, {}] \
                         is too small for this network",
                        spec.name,
                        options.input.unwrap_or(spec.input)[0],
                        options.input.unwrap_or(spec.input)[1],
                        options.input.unwrap_or(spec.input)[2]
                    )));
                }
                h /= 2;
                w /= 2;
                push(
                    format!("pool{pool_index}"),
                    LayerKind::MaxPool,
                    vec![c, h, w],
                );
            }
        }
    }
    Ok([c, h, w])
}

/// The flatten, dense and ReLU rows of the head, from `[c, h, w]` features to `classes`.
fn plan_head(
    spec: &ModelSpec,
    options: &BuildOptions,
    [c, h, w]: [usize; 3],
    classes: usize,
    rows: &mut Vec<LayerPlan>,
) -> Result<()> {
    let mut push =
        |name: String, kind: LayerKind, output: Vec<usize>| push_row(rows, name, kind, output);
    let mut features = [c, h, w]
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{}: the features reach the head as {c}x{h}x{w} values, more than 64 bits \
                 count; use a smaller --width",
                spec.name
            ))
        })?;
    push("flatten".to_string(), LayerKind::Flatten, vec![features]);
    let dense: Vec<(String, usize)> = spec
        .head
        .iter()
        .enumerate()
        .map(|(i, &d)| (format!("fc{}", i + 1), scaled(d, options.width)))
        .chain(std::iter::once(("out".to_string(), classes)))
        .collect();
    let last = dense.len() - 1;
    for (i, (name, d_out)) in dense.into_iter().enumerate() {
        push(
            name.clone(),
            LayerKind::Dense {
                d_in: features,
                d_out,
            },
            vec![d_out],
        );
        features = d_out;
        if i != last {
            push(format!("relu.{name}"), LayerKind::Relu, vec![d_out]);
        }
    }
    Ok(())
}

fn assign_methods(rows: &mut [LayerPlan], options: &BuildOptions) -> Result<()> {
    for row in rows.iter_mut().filter(|r| r.is_weight_layer()) {
        let bayesian = match options.policy {
            BayesPolicy::Head => matches!(row.kind, LayerKind::Dense { .. }),
            BayesPolicy::All => true,
            BayesPolicy::Last => row.name == "out",
            BayesPolicy::None => false,
        };
        if bayesian {
            row.method = options.method;
        }
    }
    for (name, method) in &options.overrides {
        match rows
            .iter_mut()
            .find(|r| &r.name == name && r.is_weight_layer())
        {
            Some(row) => row.method = *method,
            None => {
                let names: Vec<&str> = rows
                    .iter()
                    .filter(|r| r.is_weight_layer())
                    .map(|r| r.name.as_str())
                    .collect();
                return Err(Error::invalid(format!(
                    "override names layer '{name}', which this network does not have; its \
                     weight layers are {}",
                    names.join(", ")
                )));
            }
        }
    }
    check_priors(rows, options)
}

/// Every prior and the initial posterior width are positive numbers, and every per-layer prior
/// names a Bayesian weight layer (on a deterministic one it would silently do nothing).
fn check_priors(rows: &[LayerPlan], options: &BuildOptions) -> Result<()> {
    PosteriorConfig {
        prior: options.prior,
        initial_sigma: options.initial_sigma,
    }
    .validate()?;
    for (name, prior) in &options.prior_overrides {
        prior.validate()?;
        let bayesian: Vec<&str> = rows
            .iter()
            .filter(|r| r.is_weight_layer() && matches!(r.method, Method::Whvi | Method::MeanField))
            .map(|r| r.name.as_str())
            .collect();
        if !bayesian.contains(&name.as_str()) {
            return Err(Error::invalid(format!(
                "a prior is set for layer '{name}', which is not a Bayesian (WHVI or mean-field) \
                 layer of this network; its Bayesian layers are {}",
                if bayesian.is_empty() {
                    "none".to_string()
                } else {
                    bayesian.join(", ")
                }
            )));
        }
    }
    Ok(())
}

/// Puts an MC dropout layer in front of every MC-dropout weight layer but the first layer
/// (dropping raw pixels would only add input noise).
fn insert_dropout(rows: Vec<LayerPlan>, p: f64) -> Vec<LayerPlan> {
    let mut out = Vec::with_capacity(rows.len() + 4);
    for (i, row) in rows.into_iter().enumerate() {
        if row.method == Method::McDropout && i > 0 {
            let input = out
                .last()
                .map(|r: &LayerPlan| r.output.clone())
                .unwrap_or_default();
            out.push(LayerPlan {
                name: format!("dropout.{}", row.name),
                kind: LayerKind::Dropout(p),
                method: Method::McDropout,
                output: input,
            });
        }
        out.push(row);
    }
    out
}

/// Refuses a network whose parameters, held `copies` times in f32 (1 to predict; 4 to train
/// with AdamW: weights, gradients and two moments), would not fit in the memory available now,
/// instead of letting the allocation abort the process.
pub fn check_fits_in_memory(rows: &[LayerPlan], copies: u64) -> Result<()> {
    // Row counts saturate: usize::MAX means more than can be counted.
    let params = rows
        .iter()
        .try_fold(0usize, |total, row| total.checked_add(row.params()))
        .filter(|&p| p != usize::MAX);
    let bytes = params.and_then(|p| (p as u64).checked_mul(4)?.checked_mul(copies));
    let count = params.map_or("more than 2^64".to_string(), |p| p.to_string());
    let purpose = if copies > 1 {
        "training it"
    } else {
        "holding it"
    };
    crate::device::check_memory(
        bytes,
        format_args!("the network has {count} parameters: {purpose}"),
        "use a smaller --width or smaller layers",
    )
}

/// A network from the zoo, ready to train or predict.
pub struct Network {
    spec: ModelSpec,
    options: BuildOptions,
    plan: Vec<LayerPlan>,
    body: Sequential,
    device: Device,
}

impl Network {
    /// Builds `spec` under `options`, with parameters created or loaded through `vb`.
    pub fn build(spec: &ModelSpec, options: &BuildOptions, vb: VarBuilder) -> Result<Self> {
        let plan = plan(spec, options)?;
        check_fits_in_memory(&plan, 1)?;
        let mut body = Sequential::new();
        for (i, row) in plan.iter().enumerate() {
            let vb = vb.pp(&row.name);
            // A ReLU right after a batch norm, and a max pool right after that ReLU, run
            // inside the batch norm's op.
            let kind_at = |j: usize| plan.get(j).map(|row| row.kind);
            let relu_follows = kind_at(i + 1) == Some(LayerKind::Relu);
            let pool_follows = relu_follows && kind_at(i + 2) == Some(LayerKind::MaxPool);
            let after_norm = |back: usize| {
                i >= back && matches!(kind_at(i - back), Some(LayerKind::BatchNorm(_)))
            };
            let relu_fused = after_norm(1);
            let pool_fused = after_norm(2) && kind_at(i - 1) == Some(LayerKind::Relu);
            match (row.kind, row.method) {
                (
                    LayerKind::Conv {
                        c_in,
                        c_out,
                        kernel,
                        stride,
                        padding,
                    },
                    method,
                ) => match method {
                    Method::Whvi => body.push(WhviConv2d::new(
                        c_in,
                        c_out,
                        kernel,
                        WhviConv2dConfig {
                            stride,
                            padding,
                            sampling: options.conv_sampling,
                            posterior: options.posterior_of(&row.name),
                        },
                        vb,
                    )?),
                    Method::MeanField => body.push(MeanFieldConv2d::new(
                        c_in,
                        c_out,
                        kernel,
                        MeanFieldConv2dConfig {
                            stride,
                            padding,
                            mode: options.meanfield_conv,
                            posterior: options.posterior_of(&row.name),
                        },
                        vb,
                    )?),
                    Method::McDropout | Method::Deterministic => body.push(
                        DeterministicConv2d::new(c_in, c_out, kernel, stride, padding, vb)?,
                    ),
                },
                (LayerKind::Dense { d_in, d_out }, method) => match method {
                    Method::Whvi => body.push(WhviLinear::new(
                        d_in,
                        d_out,
                        WhviLinearConfig {
                            posterior: options.posterior_of(&row.name),
                        },
                        vb,
                    )?),
                    Method::MeanField => body.push(MeanFieldLinear::new(
                        d_in,
                        d_out,
                        options.posterior_of(&row.name),
                        vb,
                    )?),
                    Method::McDropout | Method::Deterministic => {
                        body.push(DeterministicLinear::new(d_in, d_out, vb)?)
                    }
                },
                (LayerKind::BatchNorm(c), _) if pool_follows => {
                    body.push(BatchNorm2d::new(c, vb)?.with_relu().with_max_pool())
                }
                (LayerKind::BatchNorm(c), _) if relu_follows => {
                    body.push(BatchNorm2d::new(c, vb)?.with_relu())
                }
                (LayerKind::BatchNorm(c), _) => body.push(BatchNorm2d::new(c, vb)?),
                (LayerKind::Relu, _) if relu_fused => body.push(AppliedBefore { layer: "Relu" }),
                (LayerKind::Relu, _) => body.push(Activation::Relu),
                (LayerKind::MaxPool, _) if pool_fused => body.push(AppliedBefore {
                    layer: "MaxPool2d(2)",
                }),
                (LayerKind::MaxPool, _) => body.push(MaxPool2d::new(2)),
                (LayerKind::Flatten, _) => body.push(Flatten),
                (LayerKind::Dropout(p), _) => body.push(McDropout::new(p)?),
            }
        }
        Ok(Network {
            spec: spec.clone(),
            options: options.clone(),
            plan,
            body,
            device: vb.device().clone(),
        })
    }

    /// The architecture.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The options it was built with.
    pub fn options(&self) -> &BuildOptions {
        &self.options
    }

    /// The layers, their posteriors and output shapes.
    pub fn plan(&self) -> &[LayerPlan] {
        &self.plan
    }

    /// The input shape `[C, H, W]`.
    pub fn input_shape(&self) -> [usize; 3] {
        self.options.input.unwrap_or(self.spec.input)
    }

    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.options.classes.unwrap_or(self.spec.classes)
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[B, classes]` for images `[B, C, H, W]`.
    pub fn forward_pass(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        self.check_input(x)?;
        Ok(self.body.forward_pass(x, pass)?)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let [c, h, w] = self.input_shape();
        match x.dims() {
            &[_, xc, xh, xw] if (xc, xh, xw) == (c, h, w) => Ok(()),
            dims => Err(Error::invalid(format!(
                "{} expects images [batch, {c}, {h}, {w}], got {dims:?}",
                self.spec.name
            ))),
        }
    }

    /// The number of leading layers whose output does not depend on the posterior sample: the
    /// layers before the first WHVI / mean-field layer or dropout.
    pub fn deterministic_prefix(&self) -> usize {
        self.plan
            .iter()
            .position(|row| match row.kind {
                LayerKind::Dropout(_) => true,
                LayerKind::Conv { .. } | LayerKind::Dense { .. } => {
                    matches!(row.method, Method::Whvi | Method::MeanField)
                }
                _ => false,
            })
            .unwrap_or(self.plan.len())
    }

    /// The output of the [`Network::deterministic_prefix`] layers in prediction mode
    /// (BatchNorm on running statistics): compute it once per batch, then draw posterior
    /// samples of the rest with [`Network::forward_from_features`]. For a network with a
    /// Bayesian head only, that makes T-sample prediction cost about one forward pass.
    pub fn prediction_features(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let prefix = self.deterministic_prefix();
        Ok(self.body.forward_range(x, 0..prefix, &mut Pass::mean())?)
    }

    /// Logits from [`Network::prediction_features`], running the remaining layers under `pass`
    /// (a prediction pass: [`Pass::sample`] or [`Pass::mean`]).
    pub fn forward_from_features(&self, features: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        let prefix = self.deterministic_prefix();
        Ok(self
            .body
            .forward_range(features, prefix..self.body.len(), pass)?)
    }

    /// The posterior-mean weight and bias of the weight layer `index` of the plan: `[c_out,
    /// c_in, k, k]` and `[c_out]` for a convolution, `[d_out, d_in]` and `[d_out]` for a dense
    /// layer; `None` for a layer without weights. They are read off the layer's mean pass
    /// (its response to zero and to each unit input, less the bias), so every posterior gives
    /// its dense equivalent without a formula of its own (WHVI: `S1 H diag(mu) H S2`).
    pub fn mean_weight(&self, index: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some(row) = self.plan.get(index) else {
            return Err(Error::invalid(format!(
                "{} has {} layers, not {}",
                self.spec.name,
                self.plan.len(),
                index + 1
            )));
        };
        let (inputs, shape) = match row.kind {
            LayerKind::Dense { d_in, .. } => (d_in, vec![d_in]),
            LayerKind::Conv { c_in, kernel, .. } => {
                (c_in * kernel * kernel, vec![c_in, kernel, kernel])
            }
            _ => return Ok(None),
        };
        let unit = Tensor::eye(inputs, DType::F32, &self.device)?;
        let zero = Tensor::zeros((1, inputs), DType::F32, &self.device)?;
        let probe = Tensor::cat(&[&zero, &unit], 0)?;
        let probe = probe.reshape([vec![inputs + 1], shape.clone()].concat())?;
        let out = self
            .body
            .forward_range(&probe, index..index + 1, &mut Pass::mean())?;
        let response = match row.kind {
            // The output position whose receptive field starts at the probe's first pixel.
            LayerKind::Conv {
                stride, padding, ..
            } if padding % stride == 0 => {
                let at = padding / stride;
                out.narrow(2, at, 1)?.narrow(3, at, 1)?.flatten_from(1)?
            }
            LayerKind::Conv { .. } => {
                return Err(Error::invalid(format!(
                "layer {}: a padding that is not a multiple of the stride has no probe position",
                row.name
            )))
            }
            _ => out,
        };
        let bias = response.get(0)?;
        let weight = response.narrow(0, 1, inputs)?.broadcast_sub(&bias)?.t()?;
        let out_dim = bias.dim(0)?;
        let weight = weight
            .contiguous()?
            .reshape([vec![out_dim], shape].concat())?;
        Ok(Some((weight, bias)))
    }

    /// The summed KL of every Bayesian layer (an f32 scalar; 0 for a deterministic network).
    pub fn kl(&self) -> Result<Tensor> {
        Ok(match self.body.kl()? {
            Some(kl) => kl.to_dtype(DType::F32)?,
            None => Tensor::zeros((), DType::F32, &self.device)?,
        })
    }

    /// Every tensor of the network with its role, as its layers declare them.
    pub fn parameters(&self) -> Vec<Parameter> {
        self.body.parameters()
    }

    /// Trainable parameters (running BatchNorm statistics excluded).
    pub fn num_params(&self) -> usize {
        self.body.num_params()
    }

    /// Whether any layer samples (so Monte Carlo prediction makes sense).
    pub fn is_bayesian(&self) -> bool {
        self.plan.iter().any(|r| r.method != Method::Deterministic)
    }
}

/// A readable table of the network's layers: output shape and parameters with the chosen
/// posterior, next to the counts for deterministic and mean-field layers.
pub fn summary(spec: &ModelSpec, options: &BuildOptions) -> Result<String> {
    use std::fmt::Write;
    let rows = plan(spec, options)?;
    let mut s = String::new();
    let [c, h, w] = options.input.unwrap_or(spec.input);
    let _ = writeln!(s, "{} — {}", spec.name, spec.summary);
    let _ = writeln!(
        s,
        "input {c}x{h}x{w}, {} classes, width x{}, method {}, Bayesian layers: {:?}\n",
        options.classes.unwrap_or(spec.classes),
        options.width,
        options.method.name(),
        options.policy
    );
    let _ = writeln!(
        s,
        "{:<14} {:<14} {:<16} {:>12} {:>14} {:>14}",
        "layer", "posterior", "output", "params", "deterministic", "mean-field"
    );
    let (mut total, mut det, mut mf) = (0usize, 0usize, 0usize);
    for row in &rows {
        let shape = row
            .output
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        let (p, d, m) = (
            row.params(),
            row.params_with(Method::Deterministic),
            if row.method == Method::Deterministic && row.is_weight_layer() {
                row.params_with(Method::Deterministic)
            } else {
                row.params_with(Method::MeanField)
            },
        );
        // Counts saturate at usize::MAX for networks too large to build (zoo --width 1e9).
        total = total.saturating_add(p);
        det = det.saturating_add(d);
        mf = mf.saturating_add(m);
        let posterior = if row.is_weight_layer() || matches!(row.kind, LayerKind::Dropout(_)) {
            row.method.name()
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "{:<14} {:<14} {:<16} {:>12} {:>14} {:>14}",
            row.name, posterior, shape, p, d, m
        );
    }
    let _ = writeln!(
        s,
        "{:<14} {:<14} {:<16} {:>12} {:>14} {:>14}",
        "total", "", "", total, det, mf
    );
    let _ = writeln!(
        s,
        "\n(mean-field column: the same layers made mean-field where this network has a \
         posterior; BatchNorm running statistics are buffers and not counted)"
    );
    Ok(s)
}
