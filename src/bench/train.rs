//! `whvi bench train`: training images/s of zoo networks on 32x32x3 input.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::median;
use whvi::dist::Group;
use whvi::layers::standard_normal;
use whvi::optim::{AdamWConfig, AnyOptimizer, NamedOptimizer, OptimizerConfig};
use whvi::params::Params;
use whvi::rng::seeded;
use whvi::train::{named_parameters, train_step, trainable, StepSettings};
use whvi::zoo::{BayesPolicy, BuildOptions, Method, ModelSpec, Network};
use whvi::{Error, Result};

/// Which layers of the network are WHVI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// Every layer deterministic.
    Deterministic,
    /// The dense classifier layers WHVI, the convolutions deterministic.
    Whvi,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct TrainTiming {
    /// Zoo name.
    pub model: String,
    /// Deterministic or WHVI dense head.
    pub head: Head,
    /// Width multiplier.
    pub width: f64,
    /// Images per step.
    pub batch: usize,
    /// Median training images per second (forward, backward, AdamW step).
    pub images_per_s: f64,
    /// Median seconds per step.
    pub step_s: f64,
    /// Threads of the compute pool (of each rank).
    pub threads: usize,
    /// Processes the batch is split over (`mpirun -n`).
    pub ranks: usize,
    /// Median fraction of a step that rank 0 spent in all-reduces, waiting for the other ranks
    /// included (0 for one rank).
    pub allreduce_share: f64,
    /// Where the step ran, e.g. `"cpu"` or `"cuda:0"`.
    pub device: String,
    /// The instruction set of whvi's CPU kernels ([`whvi::simd::level`]).
    pub simd: &'static str,
}

/// Settings of the training benchmark.
#[derive(Debug, Clone)]
pub struct TrainBenchConfig {
    /// Zoo networks to time.
    pub models: Vec<String>,
    /// Heads to time for each network.
    pub heads: Vec<Head>,
    /// Width multiplier of the networks.
    pub width: f64,
    /// Images per step.
    pub batch: usize,
    /// Timed steps per configuration (after two warm-up steps); the median is reported.
    pub steps: usize,
    /// Where the networks train.
    pub device: Device,
    /// The ranks the batch is split over.
    pub group: Group,
}

impl Default for TrainBenchConfig {
    fn default() -> Self {
        TrainBenchConfig {
            models: vec!["vgg11".into(), "vgg16".into()],
            heads: vec![Head::Deterministic, Head::Whvi],
            width: 1.0,
            batch: 64,
            steps: 6,
            device: Device::Cpu,
            group: Group::solo(),
        }
    }
}

/// Times training steps of every model x head on random 32x32x3 images and 10 classes; calls
/// `report` with each line as it is measured.
pub fn bench_train(
    config: &TrainBenchConfig,
    mut report: impl FnMut(&TrainTiming),
) -> Result<Vec<TrainTiming>> {
    if config.steps == 0 || config.batch == 0 {
        return Err(Error::invalid(
            "bench train: the batch and the steps must be at least 1",
        ));
    }
    let image_bytes = (config.batch as u64).checked_mul(3 * 32 * 32 * 4);
    whvi::device::check_memory(
        image_bytes,
        "the benchmark's batch of images",
        "use a smaller --batch",
    )?;
    let device = &config.device;
    let mut rng = seeded(0);
    let images = standard_normal((config.batch, 3, 32, 32), DType::F32, device, &mut rng)?;
    let labels: Vec<u32> = (0..config.batch as u32).map(|i| i % 10).collect();
    let labels = Tensor::new(labels.as_slice(), device)?;
    let mut out = Vec::new();
    for model in &config.models {
        let spec = ModelSpec::lookup(model)?;
        for &head in &config.heads {
            let options = BuildOptions {
                method: Method::Whvi,
                policy: match head {
                    Head::Deterministic => BayesPolicy::None,
                    Head::Whvi => BayesPolicy::Head,
                },
                width: config.width,
                classes: Some(10),
                input: Some([3, 32, 32]),
                ..BuildOptions::default()
            };
            let params = Params::new(0);
            let network = Network::build(&spec, &options, params.var_builder(DType::F32, device))?;
            let mut optimizer = AnyOptimizer::from_named(
                trainable(&named_parameters(&params, &network.parameters())?),
                OptimizerConfig::AdamW(AdamWConfig::default()),
            )?;
            let settings = StepSettings {
                n_train: 50_000,
                beta: 1.0,
                mc_samples: 1,
                clip_grad: None,
            };
            let mut times = Vec::with_capacity(config.steps);
            let mut shares = Vec::with_capacity(config.steps);
            let group = &config.group;
            for step in 0..config.steps + 2 {
                let (start, waited) = (Instant::now(), group.collective_seconds());
                let batch = (&images, &labels);
                train_step(&network, &mut optimizer, batch, settings, &mut rng, group)?;
                // The optimiser's update is still queued on a GPU.
                device.synchronize()?;
                if step >= 2 {
                    let seconds = start.elapsed().as_secs_f64();
                    times.push(seconds);
                    shares.push((group.collective_seconds() - waited) / seconds);
                }
            }
            let step_s = median(&mut times);
            let timing = TrainTiming {
                model: spec.name.clone(),
                head,
                width: config.width,
                batch: config.batch,
                images_per_s: config.batch as f64 / step_s,
                step_s,
                threads: rayon::current_num_threads(),
                ranks: group.size(),
                allreduce_share: median(&mut shares),
                device: whvi::device::device_name(device),
                simd: whvi::simd::level().name(),
            };
            report(&timing);
            out.push(timing);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_the_asked_heads_of_each_network_and_reports_each_line() {
        let config = TrainBenchConfig {
            models: vec!["lenet5".into()],
            heads: vec![Head::Whvi],
            width: 0.5,
            batch: 2,
            steps: 1,
            device: Device::Cpu,
            group: Group::solo(),
        };
        let mut reported = Vec::new();
        let lines = bench_train(&config, |t| reported.push((t.model.clone(), t.head))).unwrap();
        assert_eq!(reported, vec![("lenet5".to_string(), Head::Whvi)]);
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert!(line.step_s > 0.0 && line.images_per_s.is_finite());
        assert!((line.images_per_s * line.step_s - 2.0).abs() < 1e-9);
        assert_eq!(line.device, "cpu");
    }
}
