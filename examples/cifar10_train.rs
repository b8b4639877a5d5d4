//! Train a Bayesian VGG with a WHVI head on CIFAR-10 through the library API.
//!
//! ```sh
//! cargo run --release --example cifar10_train -- [CIFAR10_DIR_OR_TAR_GZ]
//! ```
//! Without an argument it trains briefly on the sample embedded in whvi.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use whvi::train::{train, BarProgress, Start, TrainConfig};
use whvi::zoo::{BayesPolicy, BuildOptions, Method};

fn main() -> whvi::Result<()> {
    // Keeps freed tensor buffers in the process and lets idle candle workers sleep sooner.
    whvi::device::tune_cpu();
    let data = std::env::args().nth(1).map(Into::into);
    let full = data.is_some();
    let config = TrainConfig {
        data,
        model: "vgg11".into(),
        build: BuildOptions {
            method: Method::Whvi,
            policy: BayesPolicy::Head,
            width: 0.25,
            ..BuildOptions::default()
        },
        epochs: if full { 15 } else { 3 },
        batch_size: 64,
        validation: if full { 5000 } else { 200 },
        out: "runs/example".into(),
        ..TrainConfig::default()
    }
    // On the full data set: the tempered head that `whvi train` uses (README, "Recipe study").
    .with_posterior_recipe();
    let outcome = train(
        &config,
        Start::Replace,
        &Device::Cpu,
        &mut BarProgress::new(config.batch_size),
        Arc::new(AtomicBool::new(false)),
    )?;
    println!("best checkpoint: {}", outcome.best_checkpoint.display());
    if let Some(report) = outcome.test_report {
        println!("{report}");
    }
    Ok(())
}
