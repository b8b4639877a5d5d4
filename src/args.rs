//! Command-line arguments (clap) and their translation into library configurations.

use std::path::PathBuf;

use crate::bench::train::Head;
use clap::{Args, Parser, Subcommand, ValueEnum};
use whvi::data::DatasetKind;
use whvi::layers::{ConvSampling, Prior};
use whvi::optim::LrSchedule;
use whvi::train::{OptimizerKind, TrainConfig};
use whvi::zoo::{BayesPolicy, BuildOptions, Method};
use whvi::{Error, Result};

#[derive(Parser)]
#[command(
    name = "whvi",
    version,
    about = "Bayesian convnets with Walsh-Hadamard Variational Inference, on Candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a network (CIFAR-10, MNIST or Fashion-MNIST); without --data, a short run on the
    /// CIFAR-10 sample embedded in the binary.
    // Negative numbers are values (`--lr -1` reaches the check that says why it is wrong).
    #[command(allow_negative_numbers = true)]
    Train(Box<TrainArgs>),
    /// List the model zoo, or show one network's layers and parameter counts.
    Zoo(ZooArgs),
    /// Evaluate checkpoints: calibration, dataset shift, OOD detection; a table side by side
    /// for several checkpoints.
    Eval(EvalArgs),
    /// Write corrupted copies of the CIFAR-10 test set in the CIFAR-10-C layout
    /// (<corruption>.npy, labels.npy), made by whvi's on-the-fly corruptions.
    Corrupt(CorruptArgs),
    /// Print what a checkpoint holds (and its model card, for a published one).
    Info {
        /// The checkpoint (.safetensors, or pretrained:NAME).
        checkpoint: PathBuf,
    },
    /// Write a published checkpoint's model card as a Hugging Face model-card README.md.
    Card(CardArgs),
    /// Make a checkpoint ready to ship: weights only, in f16/bf16/f32, with a model card built
    /// from its `whvi eval --report`.
    Publish(PublishArgs),
    /// Write the posterior-mean network as a plain state dict with PyTorch's names
    /// (features.N / classifier.N) and its architecture as a sidecar JSON.
    Export(ExportArgs),
    /// Calibration and uncertainty metrics of saved probabilities (.npy).
    Metrics(MetricsArgs),
    /// Benchmarks; one JSON line per configuration.
    #[command(subcommand)]
    Bench(Bench),
}

/// A float element type (`whvi bench fwht --dtype`, `whvi publish --dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FloatDtype {
    /// 32-bit float.
    F32,
    /// bfloat16 (arithmetic in f32).
    Bf16,
    /// IEEE half (arithmetic in f32).
    F16,
}

impl From<FloatDtype> for candle_core::DType {
    fn from(dtype: FloatDtype) -> Self {
        match dtype {
            FloatDtype::F32 => candle_core::DType::F32,
            FloatDtype::Bf16 => candle_core::DType::BF16,
            FloatDtype::F16 => candle_core::DType::F16,
        }
    }
}

#[derive(Subcommand)]
pub enum Bench {
    /// The FWHT against a copy of the same bytes: on the CPU (kernel and op against memcpy), or
    /// with --device cuda / metal the op against a device-to-device copy.
    Fwht {
        /// cpu (default), cuda, cuda:N or metal.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Element types on a GPU (default: f32 and bf16).
        #[arg(long = "dtype", value_enum, num_args = 1..)]
        dtypes: Vec<FloatDtype>,
        /// Only this many threads (default: 1 and all available).
        #[arg(long)]
        threads: Option<usize>,
        /// Only rows of length 2^LOG2 (default: 6, 8, 10, 12, 14, 16).
        #[arg(long = "d", value_name = "LOG2")]
        log2_d: Option<u32>,
        /// Only batches of this many bytes (default on the CPU: 262144 and 134217728; on a
        /// GPU: 268435456).
        #[arg(long)]
        bytes: Option<usize>,
        /// Timed repetitions per configuration; the median is reported.
        #[arg(long, default_value_t = 9)]
        reps: usize,
    },
    /// Forward+backward of square WHVI, dense and mean-field layers.
    Layers {
        /// Layer sizes D (default 512 1024 2048 4096 8192).
        #[arg(long = "d", num_args = 1..)]
        sizes: Vec<usize>,
        /// Batch size.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Timed repetitions (median reported).
        #[arg(long, default_value_t = 9)]
        reps: usize,
        /// Threads for the compute pool.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Training images/s of zoo networks (deterministic and WHVI head) on 32x32x3 input.
    Train {
        /// Networks to time.
        #[arg(long = "model", num_args = 1.., default_values_t = ["vgg11".to_string(), "vgg16".to_string()])]
        models: Vec<String>,
        /// Heads to time: every layer deterministic, or the dense classifier layers WHVI.
        #[arg(long = "head", value_enum, num_args = 1.., default_values_t = [HeadArg::Deterministic, HeadArg::Whvi])]
        heads: Vec<HeadArg>,
        /// Width multiplier.
        #[arg(long, default_value_t = 1.0)]
        width: f64,
        /// Images per step.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Timed steps per configuration (median reported).
        #[arg(long, default_value_t = 6)]
        steps: usize,
        /// Then time each convolution shape of this network against candle's conv2d
        /// (forward and backward, same width and batch); `none` to skip. Default: vgg16 on the
        /// CPU, none on a GPU (the comparison is of the CPU convolution paths).
        #[arg(long)]
        conv_shapes: Option<String>,
        /// cpu (default), cuda, cuda:N or metal.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Threads for the compute pool.
        #[arg(long)]
        threads: Option<usize>,
    },
}

/// Which network and which posterior.
#[derive(Args, Clone)]
pub struct BuildArgs {
    /// Posterior of the Bayesian layers [default: whvi].
    #[arg(long, value_enum)]
    pub method: Option<MethodArg>,
    /// Which layers are Bayesian: the dense head, all, the last layer only, or none
    /// [default: head; when training on MNIST or Fashion-MNIST, last].
    #[arg(long, value_enum)]
    pub bayes: Option<PolicyArg>,
    /// Per-layer override, e.g. --layer conv5=whvi --layer fc1=deterministic (names as in
    /// `whvi zoo MODEL`).
    #[arg(long = "layer", value_name = "NAME=METHOD")]
    pub overrides: Vec<String>,
    /// Prior variance of the Bayesian layers: he (the He-like default), he*K (K times it) or a
    /// number; NAME=VALUE sets one layer's (repeat the flag for several).
    #[arg(long = "prior-variance", value_name = "[NAME=]VALUE")]
    pub priors: Vec<String>,
    /// Initial posterior standard deviation of the Bayesian layers, as a fraction of their
    /// initial mean's scale [default: 0.01; 0.3 when training a WHVI head on CIFAR-10 data].
    #[arg(long, value_name = "FRACTION")]
    pub initial_sigma: Option<f64>,
    /// Width multiplier for convolutions and hidden dense layers (e.g. 0.25 for CPU runs).
    #[arg(long)]
    pub width: Option<f64>,
    /// How WHVI convolutions sample filters: one bank per batch or one per example
    /// [default: shared].
    #[arg(long, value_enum)]
    pub conv_sampling: Option<ConvSamplingArg>,
    /// Drop probability of MC dropout layers [default: 0.2].
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Number of classes (default: the spec's, or the data set's when training).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Input shape C,H,W (default: the spec's, or the data set's when training).
    #[arg(long, value_delimiter = ',')]
    pub input: Option<Vec<usize>>,
}

impl BuildArgs {
    /// The options these flags give, with the library's defaults for the rest.
    pub fn to_options(&self) -> Result<BuildOptions> {
        self.apply(BuildOptions::default())
    }

    /// `base` with the flags given applied over it (layer overrides and per-layer priors are
    /// added to base's).
    pub fn apply(&self, base: BuildOptions) -> Result<BuildOptions> {
        let mut options = base;
        for o in &self.overrides {
            match o.split_once('=') {
                Some((name, method)) => options
                    .overrides
                    .push((name.to_string(), Method::parse(method)?)),
                None => {
                    return Err(Error::invalid(format!(
                        "--layer {o}: expected NAME=METHOD, e.g. --layer fc1=whvi"
                    )))
                }
            }
        }
        for text in &self.priors {
            match text.split_once('=') {
                Some((name, value)) => options
                    .prior_overrides
                    .push((name.to_string(), Prior::parse(value)?)),
                None => options.prior = Prior::parse(text)?,
            }
        }
        set(&mut options.method, self.method.map(Method::from));
        set(&mut options.policy, self.bayes.map(BayesPolicy::from));
        set(&mut options.width, self.width);
        set(&mut options.initial_sigma, self.initial_sigma);
        set(&mut options.dropout, self.dropout);
        if self.classes.is_some() {
            options.classes = self.classes;
        }
        match self.input.as_deref() {
            None => {}
            Some(&[c, h, w]) => options.input = Some([c, h, w]),
            Some(other) => {
                return Err(Error::invalid(format!(
                    "--input takes three numbers C,H,W (e.g. --input 3,32,32), got {other:?}"
                )))
            }
        }
        let sampling = self.conv_sampling.map(|s| match s {
            ConvSamplingArg::Shared => ConvSampling::Shared,
            ConvSamplingArg::PerExample => ConvSampling::PerExample,
        });
        set(&mut options.conv_sampling, sampling);
        Ok(options)
    }
}

/// Replaces `field` with the flag's value, when the flag was given.
fn set<T>(field: &mut T, flag: Option<T>) {
    if let Some(value) = flag {
        *field = value;
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Whvi,
    MeanField,
    McDropout,
    Deterministic,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Whvi => Method::Whvi,
            MethodArg::MeanField => Method::MeanField,
            MethodArg::McDropout => Method::McDropout,
            MethodArg::Deterministic => Method::Deterministic,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PolicyArg {
    Head,
    All,
    Last,
    None,
}

impl From<PolicyArg> for BayesPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Head => BayesPolicy::Head,
            PolicyArg::All => BayesPolicy::All,
            PolicyArg::Last => BayesPolicy::Last,
            PolicyArg::None => BayesPolicy::None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadArg {
    Deterministic,
    Whvi,
}

impl From<HeadArg> for Head {
    fn from(h: HeadArg) -> Self {
        match h {
            HeadArg::Deterministic => Head::Deterministic,
            HeadArg::Whvi => Head::Whvi,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ConvSamplingArg {
    Shared,
    PerExample,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OptimizerArg {
    Sgd,
    Nesterov,
    Adamw,
}

impl From<OptimizerArg> for OptimizerKind {
    fn from(o: OptimizerArg) -> Self {
        match o {
            OptimizerArg::Sgd => OptimizerKind::Sgd,
            OptimizerArg::Nesterov => OptimizerKind::Nesterov,
            OptimizerArg::Adamw => OptimizerKind::AdamW,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    Cosine,
    Step,
    Paper,
    Constant,
}

/// Where computations run.
#[derive(Args, Clone)]
pub struct RuntimeArgs {
    /// cpu, cuda, cuda:N or metal. Under an MPI launcher, cuda is each rank's own GPU (the
    /// rank's place on its machine).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl RuntimeArgs {
    pub fn apply(&self) -> Result<()> {
        match self.threads {
            Some(n) => set_threads(n),
            None => Ok(()),
        }
    }

    /// The device of this rank of `group` (a bare `cuda` is each rank's own GPU).
    pub fn device(&self, group: &whvi::dist::Group) -> Result<candle_core::Device> {
        whvi::device::parse_device_for_rank(&self.device, group.local_rank())
    }
}

/// Sizes the compute thread pools (rayon's, which candle and the FWHT kernels use).
pub fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("--threads must be at least 1"));
    }
    // candle's CPU kernels read RAYON_NUM_THREADS when they first size their pools.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::invalid(format!("cannot size the thread pool: {e}")))
}

#[derive(Args)]
pub struct TrainArgs {
    /// Network from the zoo (`whvi zoo`) or a spec file.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub build: BuildArgs,
    /// Data set.
    #[arg(long, value_enum, default_value_t = DatasetKind::Cifar10)]
    pub dataset: DatasetKind,
    /// Data directory or archive (CIFAR-10 / CIFAR-100: cifar-10-binary.tar.gz /
    /// cifar-100-binary.tar.gz or its extracted folder; MNIST / Fashion-MNIST: the folder of
    /// idx files). Without it: the embedded CIFAR-10
    /// sample, or Debian's Fashion-MNIST.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Epochs [default: 30; 6 for the quick start].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size [default: 128; 64 for the quick start, 32 for MNIST and Fashion-MNIST].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Optimiser [default: adamw]. AdamW is the default: with the KL term's stiff pull on the
    /// WHVI means (1 / (lambda · N_train) is large for small training sets), SGD at CIFAR
    /// learning rates can diverge, while Adam's per-parameter scaling stays stable.
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    /// Base learning rate (default 0.05 for SGD, 1e-3 for AdamW).
    #[arg(long)]
    pub lr: Option<f64>,
    /// SGD momentum [default: 0.9].
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Weight decay (not applied to biases, BatchNorm or variational parameters)
    /// [default: 5e-4].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Learning-rate factor for the WHVI diagonals s1 and s2 (they are O(1) while the means are
    /// O(1/sqrt(D · d_in)), so they need larger steps) [default: 10].
    #[arg(long)]
    pub diagonal_lr_scale: Option<f64>,
    /// Learning-rate schedule: cosine, step (x gamma every N steps), paper
    /// (lr · (1 + 5e-4 t)^-0.3) or constant [default: cosine].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// Step schedule: decay every this many optimisation steps.
    #[arg(long, default_value_t = 10_000)]
    pub step_every: u64,
    /// Step schedule: multiply the learning rate by this at each decay.
    #[arg(long, default_value_t = 0.1)]
    pub step_gamma: f64,
    /// Linear learning-rate warm-up, in optimisation steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// KL warm-up: beta rises from 0 to --kl-weight over this many epochs [default: 0].
    #[arg(long)]
    pub kl_warmup: Option<u64>,
    /// Weight of the KL term after the warm-up [default: 1, the ELBO; 10 when training a WHVI
    /// head on CIFAR-10 data]; another value than 1 trains a tempered posterior (below 1 a cold
    /// one, narrower than Bayes' rule gives).
    #[arg(long, value_name = "BETA")]
    pub kl_weight: Option<f64>,
    /// Posterior samples per training step [default: 1].
    #[arg(long)]
    pub mc_samples: Option<usize>,
    /// Clip the global gradient norm.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Validation images carved from the training set.
    #[arg(long)]
    pub validation: Option<usize>,
    /// Turn off random crops and flips.
    #[arg(long)]
    pub no_augment: bool,
    /// Seed of everything random [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Posterior samples for validation metrics [default: 8].
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// Posterior samples for the final test report (0: none) [default: 32].
    #[arg(long)]
    pub test_samples: Option<usize>,
    /// Stop after the epoch during which this many minutes have passed.
    #[arg(long, value_name = "MINUTES")]
    pub time_limit: Option<f64>,
    /// Output directory: last.safetensors, best.safetensors, metrics.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run saved in OUT/last.safetensors.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace the run in --out (its log and checkpoints) with a new one.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl TrainArgs {
    /// How the run treats its --out directory.
    pub fn start(&self) -> whvi::train::Start {
        use whvi::train::Start;
        match (self.resume, self.overwrite) {
            (true, _) => Start::Resume,
            (false, true) => Start::Replace,
            (false, false) => Start::New,
        }
    }

    /// The run's configuration: the library's preset for the data set
    /// ([`TrainConfig::for_dataset`]) with the flags given applied over it, and a note when
    /// the quick start (the embedded sample) applies.
    pub fn to_config(&self) -> Result<(TrainConfig, Option<String>)> {
        let mut config = TrainConfig::for_dataset(self.dataset, self.data.clone());
        if let Some(optimizer) = self.optimizer {
            config = config.with_optimizer(optimizer.into());
        }
        set(&mut config.model, self.model.clone());
        config.build = self.build.apply(config.build)?;
        // The recipe depends on --method, --bayes and --layer, so it follows them; an explicit
        // --initial-sigma then wins over it (--kl-weight is applied below).
        config = config.with_posterior_recipe();
        set(&mut config.build.initial_sigma, self.build.initial_sigma);
        set(&mut config.epochs, self.epochs);
        set(&mut config.batch_size, self.batch_size);
        set(&mut config.momentum, self.momentum);
        set(&mut config.weight_decay, self.weight_decay);
        set(&mut config.diagonal_lr_scale, self.diagonal_lr_scale);
        let schedule = self.schedule_of(&config.schedule);
        set(&mut config.schedule, schedule);
        set(&mut config.kl_warmup.epochs, self.kl_warmup);
        set(&mut config.kl_weight, self.kl_weight);
        set(&mut config.mc_samples, self.mc_samples);
        if self.clip_grad.is_some() {
            config.clip_grad = self.clip_grad;
        }
        set(&mut config.validation, self.validation);
        config.augment &= !self.no_augment;
        set(&mut config.seed, self.seed);
        set(&mut config.eval_samples, self.eval_samples);
        set(&mut config.test_samples, self.test_samples);
        if self.time_limit.is_some() {
            config.time_limit_minutes = self.time_limit;
        }
        set(&mut config.out, self.out.clone());
        let note = config.uses_embedded_sample().then(|| {
            format!(
                "no --data: training {} (width {}) for {} epoch{} on the CIFAR-10 (JPEG copy) \
                 sample embedded in whvi; pass --data DIR for the full data set",
                config.model,
                config.build.width,
                config.epochs,
                if config.epochs == 1 { "" } else { "s" }
            )
        });
        Ok((config, note))
    }

    /// The learning-rate schedule the flags ask for (`None`: `preset` as it is): `--schedule`
    /// builds a new one, `--lr` and `--warmup-steps` change the preset's.
    fn schedule_of(&self, preset: &LrSchedule) -> Option<LrSchedule> {
        if self.schedule.is_none() && self.lr.is_none() && self.warmup_steps.is_none() {
            return None;
        }
        let lr = self.lr.unwrap_or(preset.base_lr);
        let schedule = match self.schedule {
            None => LrSchedule {
                base_lr: lr,
                ..preset.clone()
            },
            Some(ScheduleArg::Cosine) => LrSchedule::cosine(lr, 0.0),
            Some(ScheduleArg::Step) => LrSchedule::step(lr, self.step_every, self.step_gamma),
            Some(ScheduleArg::Paper) => LrSchedule::whvi_paper(lr),
            Some(ScheduleArg::Constant) => LrSchedule::constant(lr),
        };
        Some(schedule.with_warmup(self.warmup_steps.unwrap_or(preset.warmup_steps)))
    }
}

#[derive(Args)]
pub struct ZooArgs {
    /// A network name or spec file; omit to list the zoo.
    pub model: Option<String>,
    /// List the shipped checkpoints (`pretrained:NAME`) with their metrics instead.
    #[arg(long, conflicts_with = "model")]
    pub pretrained: bool,
    #[command(flatten)]
    pub build: BuildArgs,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoints (.safetensors) to evaluate.
    #[arg(required = true, num_args = 1..)]
    pub checkpoints: Vec<PathBuf>,
    /// Evaluate the checkpoints as one deep ensemble (the mean of their predictive
    /// distributions) instead of side by side.
    #[arg(long)]
    pub ensemble: bool,
    /// Test data set (default: the one the checkpoint was trained on).
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    /// Data directory or archive (default: the training run's, else the default location).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Posterior samples T per image [default: 32].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Images per forward pass [default: 256].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of the posterior samples and corruptions [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate only the first N test images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Corrupted sets at severities 1-5: `cifar10-c:DIR` (every file of a CIFAR-10-C
    /// directory), `all` (the 14 made on the fly) or a comma list of them: gaussian-noise,
    /// shot-noise, impulse-noise, defocus-blur, glass-blur, motion-blur, zoom-blur, snow, fog,
    /// brightness, contrast, elastic-transform, pixelate, jpeg; extras speckle-noise,
    /// gaussian-blur, saturate.
    #[arg(long, value_delimiter = ',')]
    pub corruptions: Vec<String>,
    /// Images per corrupted set and severity (the first N) [default: 1000].
    #[arg(long)]
    pub corruption_images: Option<usize>,
    /// Out-of-distribution set: noise, svhn:PATH (test_32x32.mat), cifar10[:PATH],
    /// cifar100:PATH, mnist:DIR or fashion-mnist[:DIR].
    #[arg(long)]
    pub ood: Option<String>,
    /// Save the predictive probabilities and labels of every set as .npy files in DIR/RUN-STEM/
    /// (clean.probs.npy, clean.labels.npy, fog-3.probs.npy, ood-svhn.probs.npy, ...).
    #[arg(long, value_name = "DIR")]
    pub save_probs: Option<PathBuf>,
    /// With --save-probs, also save the per-sample probabilities [T, N, K] (SET.samples.npy).
    #[arg(long)]
    pub save_samples: bool,
    /// Write the JSON report here (an array of reports for several checkpoints). Never over
    /// an input; over an existing file only with --force.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Let --report replace an existing file, and --save-probs replace saved predictions.
    #[arg(long)]
    pub force: bool,
    /// Read checkpoints whose tensor data do not match their checksum (a damaged file).
    #[arg(long)]
    pub skip_checksum: bool,
    /// Write reliability, shift and OOD plots (PNG and SVG) into this directory.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Skip temperature scaling (by default a temperature is fitted on the validation images
    /// the training run held out, and the scaled test metrics are reported too).
    #[arg(long)]
    pub no_temperature: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl EvalArgs {
    /// The evaluation: [`whvi::eval::EvalConfig::new`] with the flags given applied over it.
    pub fn to_config(&self) -> Result<whvi::eval::EvalConfig> {
        use whvi::eval::{EvalConfig, OodSource, ShiftSource};
        let mut config = EvalConfig::new(self.checkpoints.clone());
        config.ensemble = self.ensemble;
        config.dataset = self.dataset;
        config.data = self.data.clone();
        set(&mut config.samples, self.samples);
        set(&mut config.batch_size, self.batch_size);
        set(&mut config.seed, self.seed);
        config.limit = self.limit;
        config.shift = ShiftSource::parse(&self.corruptions)?;
        set(&mut config.corruption_images, self.corruption_images);
        config.ood = self.ood.as_deref().map(OodSource::parse).transpose()?;
        config.save_probs = self.save_probs.clone();
        config.save_samples = self.save_samples;
        config.plots = self.plots.clone();
        config.temperature_scaling = !self.no_temperature;
        config.report = self.report.clone();
        config.overwrite = self.force;
        if self.skip_checksum {
            config.checksum = whvi::checkpoint::Checksum::Skip;
        }
        Ok(config)
    }
}

#[derive(Args)]
pub struct MetricsArgs {
    /// Predictive probabilities, .npy float32/float64 of shape [N, K], or [T, N, K] per
    /// posterior sample (averaged here; enables the mutual-information metrics).
    #[arg(long, value_name = "P.npy")]
    pub probs: PathBuf,
    /// True labels, .npy integer array of shape `[N]` with values in 0..K.
    #[arg(long, value_name = "Y.npy")]
    pub labels: PathBuf,
    /// Probabilities on an out-of-distribution set, [M, K] or [T, M, K]: adds OOD detection.
    #[arg(long, value_name = "Q.npy")]
    pub ood_probs: Option<PathBuf>,
    /// Write the report as JSON to this file (never over an input; over an existing file only
    /// with --force).
    #[arg(long, value_name = "R.json")]
    pub report: Option<PathBuf>,
    /// Let --report replace an existing file.
    #[arg(long)]
    pub force: bool,
    /// Write the plots (PNG and SVG) into this directory, created if missing.
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
}

impl MetricsArgs {
    /// The library's job for these flags.
    pub fn to_job(&self) -> whvi::metrics::MetricsJob {
        whvi::metrics::MetricsJob {
            probs: self.probs.clone(),
            labels: self.labels.clone(),
            ood_probs: self.ood_probs.clone(),
            report: self.report.clone(),
            force: self.force,
            plots: self.plots.clone(),
        }
    }
}

#[derive(Args)]
pub struct CorruptArgs {
    /// The directory to write (created if missing; existing corruption files are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// CIFAR-10 data (archive or directory); without it, the embedded sample's test images.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `all` or a comma list of corruptions made on the fly.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub corruptions: Vec<String>,
    /// Only the first N test images (all 10,000 by default).
    #[arg(long)]
    pub images: Option<usize>,
    /// Seed of the noise: the same as `whvi eval --seed` gives the same images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct CardArgs {
    /// A published checkpoint (.safetensors, or pretrained:NAME).
    pub checkpoint: PathBuf,
    /// Where to write the card (default: README.md next to the checkpoint file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing card.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct PublishArgs {
    /// The trained checkpoint.
    pub checkpoint: PathBuf,
    /// The published file to write (models/pretrained/NAME.safetensors ships it with whvi).
    #[arg(long)]
    pub out: PathBuf,
    /// The name it is published under (default: the output file's stem).
    #[arg(long)]
    pub name: Option<String>,
    /// The `whvi eval --report` JSON of this checkpoint: the card's metrics.
    #[arg(long)]
    pub report: PathBuf,
    /// One line on what the checkpoint is.
    #[arg(long)]
    pub summary: String,
    /// The command that trained it.
    #[arg(long)]
    pub training_command: String,
    /// What the metrics were measured on, and the command that measured them.
    #[arg(long)]
    pub evaluation: String,
    /// How the weights are stored (f16 halves the file; inference runs in f32 from it).
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: FloatDtype,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

impl PublishArgs {
    /// The card's inputs, with the report read and parsed.
    pub fn card_input(&self) -> Result<whvi::checkpoint::CardInput> {
        let text = std::fs::read_to_string(&self.report).map_err(|e| Error::io(&self.report, e))?;
        let report = serde_json::from_str(&text)
            .map_err(|e| Error::data(&self.report, format!("is not a JSON report ({e})")))?;
        let name = match &self.name {
            Some(name) => name.clone(),
            None => self
                .out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        Ok(whvi::checkpoint::CardInput {
            name,
            summary: self.summary.clone(),
            training_command: self.training_command.clone(),
            evaluation: self.evaluation.clone(),
            report,
        })
    }
}

#[derive(Args)]
pub struct ExportArgs {
    /// The checkpoint (.safetensors, or pretrained:NAME).
    pub checkpoint: PathBuf,
    /// The state dict to write (f32 safetensors); the architecture goes next to it as .json.
    #[arg(long, value_name = "OUT.safetensors")]
    pub mean: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    pub force: bool,
}
