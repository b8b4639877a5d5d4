//! Load a saved Bayesian checkpoint and predict with uncertainty for a few test images:
//! mean class probabilities, predictive entropy and mutual information per image.
//!
//! ```sh
//! cargo run --release -- train --epochs 1 --out runs/quick   # make a checkpoint first
//! cargo run --release --example load_checkpoint -- runs/quick/best.safetensors
//! ```

use candle_core::Device;
use whvi::checkpoint::Checkpoint;
use whvi::data::{self, DatasetKind};
use whvi::metrics::{entropy, mutual_information};
use whvi::rng::seeded;
use whvi::zoo::{predict, PredictOptions};

fn main() -> whvi::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "runs/quickstart/best.safetensors".into());
    let model = Checkpoint::load(&path, &Device::Cpu)?;
    let normalization = model
        .meta
        .normalization
        .clone()
        .unwrap_or_else(|| data::Normalization::for_kind(DatasetKind::Cifar10));
    let test = data::load(DatasetKind::Cifar10, None)?.test;
    let few = test.subset(&[0, 1, 2, 3, 4, 5])?;
    let options = PredictOptions {
        samples: 32,
        batch_size: 16,
        keep_samples: true,
    };
    let preds = predict(
        &model.network,
        &few,
        &normalization,
        options,
        &mut seeded(0),
        |_| {},
    )?;
    let entropies = entropy(preds.mean());
    let mi = preds.samples().map(mutual_information);
    println!(
        "{} ({}), T = {} samples",
        model.meta.spec.name,
        model.meta.options.method.name(),
        options.samples
    );
    for (i, row) in preds.mean().rows().enumerate() {
        let (best, p) = row.iter().enumerate().fold(
            (0, 0.0),
            |acc, (k, &p)| if p > acc.1 { (k, p) } else { acc },
        );
        println!(
            "image {i}: true {:<10} predicted {:<10} p = {p:.3}  entropy {:.3}  MI {}",
            model.meta.class_names[usize::from(few.label(i))],
            model.meta.class_names[best],
            entropies[i],
            mi.as_ref().map_or("-".into(), |m| format!("{:.4}", m[i]))
        );
    }
    Ok(())
}
