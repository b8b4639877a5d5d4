//! A WHVI network built the way candle-nn builds one: layers from a `VarBuilder` with free
//! constructors (`whvi_conv2d`, `whvi_linear`) and config structs, a few training steps with
//! the toolkit's ELBO and AdamW, then a checkpoint that `whvi eval` (or any whvi user) loads.
//!
//! ```sh
//! cargo run --release --example candle_layers -- /tmp/tiny-whvi.safetensors
//! whvi eval /tmp/tiny-whvi.safetensors --samples 16
//! ```
//!
//! It trains on the CIFAR-10 sample built into whvi (or on the full set when `CIFAR10_DIR` is
//! set), so it runs anywhere. The layer names follow the zoo's (`conv1`, `fc1`, `out`), and the
//! same architecture is written as a spec, so the saved file describes itself; the example
//! ends by loading it back and checking that the loaded network predicts what this one does.

use candle_core::{DType, Device, Result as CandleResult, Tensor};
use candle_nn::{Optimizer, VarBuilder};
use whvi::checkpoint::{Checkpoint, CheckpointMeta};
use whvi::data::{self, shuffled_order, Batches, DatasetKind, Normalization};
use whvi::layers::{
    whvi_conv2d, whvi_linear, BayesianModule, MaxPool2d, Parameter, Pass, WhviConv2d,
    WhviConv2dConfig, WhviLinear, WhviLinearConfig,
};
use whvi::loss::elbo_loss;
use whvi::optim::{AnyOptimizer, NamedOptimizer};
use whvi::params::Params;
use whvi::rng::seeded;
use whvi::train::{named_parameters, trainable, TrainConfig};
use whvi::zoo::{BayesPolicy, BuildOptions, Method, ModelSpec};

/// The same network as a spec, so that the checkpoint says what it holds.
const SPEC: &str = r#"
name = "tiny-whvi"
summary = "two 5x5 WHVI convolutions and a WHVI head"
input = [3, 32, 32]
classes = 10
batch_norm = false
features = [{ conv = 8, kernel = 5, padding = 2 }, "M", { conv = 16, kernel = 5, padding = 2 }, "M"]
head = [64]
"#;

/// conv 8@5x5 - pool - conv 16@5x5 - pool - 64 - 10, every weight matrix a WHVI posterior.
struct TinyWhviNet {
    conv1: WhviConv2d,
    conv2: WhviConv2d,
    pool: MaxPool2d,
    fc1: WhviLinear,
    out: WhviLinear,
}

impl TinyWhviNet {
    fn new(vb: VarBuilder) -> CandleResult<Self> {
        let conv = WhviConv2dConfig {
            padding: 2,
            ..WhviConv2dConfig::default()
        };
        Ok(TinyWhviNet {
            conv1: whvi_conv2d(3, 8, 5, conv, vb.pp("conv1"))?,
            conv2: whvi_conv2d(8, 16, 5, conv, vb.pp("conv2"))?,
            pool: MaxPool2d::new(2),
            fc1: whvi_linear(16 * 8 * 8, 64, WhviLinearConfig::default(), vb.pp("fc1"))?,
            out: whvi_linear(64, 10, WhviLinearConfig::default(), vb.pp("out"))?,
        })
    }

    fn layers(&self) -> [&dyn BayesianModule; 4] {
        [&self.conv1, &self.conv2, &self.fc1, &self.out]
    }

    /// Logits `[B, 10]`: one posterior sample in a training pass, the mean in `Pass::mean()`.
    fn forward(&self, x: &Tensor, pass: &mut Pass) -> CandleResult<Tensor> {
        let x = self.conv1.forward_pass(x, pass)?.relu()?;
        let x = self.pool.forward_pass(&x, pass)?;
        let x = self.conv2.forward_pass(&x, pass)?.relu()?;
        let x = self.pool.forward_pass(&x, pass)?.flatten_from(1)?;
        let x = self.fc1.forward_pass(&x, pass)?.relu()?;
        self.out.forward_pass(&x, pass)
    }

    fn kl(&self) -> CandleResult<Tensor> {
        whvi::layers::total_kl(self.layers(), self.out.bias().device())
    }

    fn parameters(&self) -> Vec<Parameter> {
        self.layers().iter().flat_map(|l| l.parameters()).collect()
    }
}

fn main() -> whvi::Result<()> {
    // Keeps freed tensor buffers in the process and lets idle candle workers sleep sooner.
    whvi::device::tune_cpu();
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("tiny-whvi.safetensors")
            .display()
            .to_string()
    });
    let device = Device::Cpu;
    let dir = std::env::var_os("CIFAR10_DIR").map(std::path::PathBuf::from);
    let train_set = data::load(DatasetKind::Cifar10, dir.as_deref())?.train;
    let normalization = Normalization::for_kind(DatasetKind::Cifar10);

    // Seeded parameters behind a VarBuilder: the same seed gives the same network.
    let params = Params::new(0);
    let net = TinyWhviNet::new(params.var_builder(DType::F32, &device))?;
    let parameters = named_parameters(&params, &net.parameters())?;
    // The training preset's optimiser: AdamW, no decay on variational parameters and biases,
    // the WHVI diagonals at their own learning-rate factor.
    let config = TrainConfig::default();
    let mut optimizer =
        AnyOptimizer::from_named(trainable(&parameters), config.optimizer_config(&parameters))?;

    let mut rng = seeded(1);
    let order = shuffled_order(train_set.len(), &mut rng);
    let batches = Batches::new(&train_set, order, 64, &normalization, &device)?.drop_last(true);
    // One epoch of the embedded sample (or 20 steps of the full set).
    for (step, batch) in batches.take(20).enumerate() {
        let (images, labels) = batch?;
        let logits = net.forward(&images, &mut Pass::train(&mut rng))?;
        let loss = elbo_loss(&logits, &labels, &net.kl()?, train_set.len(), 1.0)?;
        optimizer.backward_step(&loss)?;
        if step % 5 == 0 {
            println!(
                "step {step:2}: negative ELBO {:.4}",
                loss.to_scalar::<f32>()?
            );
        }
    }

    // The spec and build options say what the file holds; the tensor names are the zoo's.
    let spec = ModelSpec::from_toml(SPEC, "examples/candle_layers.rs")?;
    let options = BuildOptions {
        method: Method::Whvi,
        policy: BayesPolicy::All,
        ..BuildOptions::default()
    };
    let mut meta = CheckpointMeta::new(spec, options, train_set.classes().to_vec());
    meta.normalization = Some(normalization.clone());
    Checkpoint::save(&path, &meta, &params, &[])?;
    println!("saved {path}");

    // Anyone can load it as a zoo network: it predicts what this network predicts.
    let loaded = Checkpoint::load(&path, &device)?;
    let images = Batches::new(&train_set, (0..8).collect(), 8, &normalization, &device)?
        .next()
        .expect("eight images")?
        .0;
    let ours = net.forward(&images, &mut Pass::mean())?;
    let theirs = loaded.network.forward_pass(&images, &mut Pass::mean())?;
    let gap = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("loaded network vs this one, largest logit gap: {gap:e}");
    if gap > 1e-5 {
        return Err(whvi::Error::invalid(format!(
            "the loaded network predicts differently (gap {gap})"
        )));
    }
    Ok(())
}
