//! `whvi bench layers`: forward+backward time of square WHVI, dense and mean-field layers.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::median;
use whvi::layers::{
    standard_normal, BayesianModule, DeterministicLinear, MeanFieldLinear, Pass, PosteriorConfig,
    WhviLinear, WhviLinearConfig,
};
use whvi::params::Params;
use whvi::rng::seeded;
use whvi::{Error, Result};

/// One measured layer and size.
#[derive(Debug, Clone, Serialize)]
pub struct LayerTiming {
    /// `whvi`, `dense` or `meanfield`.
    pub layer: &'static str,
    /// Input and output size.
    pub d: usize,
    /// Batch size.
    pub batch: usize,
    /// Median milliseconds of one forward + backward pass.
    pub ms: f64,
    /// Trainable parameters.
    pub params: usize,
    /// `ms` divided by the dense layer's `ms` measured in the same run.
    pub ratio_to_dense: f64,
    /// Threads used by the process.
    pub threads: usize,
    /// The instruction set of whvi's CPU kernels ([`whvi::simd::level`]).
    pub simd: &'static str,
}

/// Settings of the layer benchmark.
#[derive(Debug, Clone)]
pub struct LayerBenchConfig {
    /// Layer sizes D (square layers).
    pub sizes: Vec<usize>,
    /// Batch size.
    pub batch: usize,
    /// Timed repetitions per layer (the median is reported), after two warm-ups.
    pub reps: usize,
}

impl Default for LayerBenchConfig {
    fn default() -> Self {
        LayerBenchConfig {
            sizes: vec![512, 1024, 2048, 4096, 8192],
            batch: 128,
            reps: 9,
        }
    }
}

/// Runs the benchmark; calls `report` with each line as soon as it is measured.
///
/// The three layers of one size are interleaved repetition by repetition, so that load from
/// other processes hits them alike and the ratios stay meaningful on a shared machine.
pub fn bench_layers(
    config: &LayerBenchConfig,
    mut report: impl FnMut(&LayerTiming),
) -> Result<Vec<LayerTiming>> {
    if config.reps == 0 || config.batch == 0 {
        return Err(Error::invalid(
            "bench layers: the batch and the repetitions must be at least 1",
        ));
    }
    let device = Device::Cpu;
    let threads = rayon::current_num_threads();
    let mut out = Vec::new();
    for &d in &config.sizes {
        let params = Params::new(0);
        let vb = params.var_builder(DType::F32, &device);
        let layers: Vec<(&'static str, Box<dyn BayesianModule>)> = vec![
            (
                "dense",
                Box::new(DeterministicLinear::new(d, d, vb.pp("dense"))?),
            ),
            (
                "whvi",
                Box::new(WhviLinear::new(
                    d,
                    d,
                    WhviLinearConfig::default(),
                    vb.pp("whvi"),
                )?),
            ),
            (
                "meanfield",
                Box::new(MeanFieldLinear::new(
                    d,
                    d,
                    PosteriorConfig::default(),
                    vb.pp("mf"),
                )?),
            ),
        ];
        let mut rng = seeded(1);
        let x = Var::from_tensor(&standard_normal(
            (config.batch, d),
            DType::F32,
            &device,
            &mut rng,
        )?)?;
        let mut step = |layer: &dyn BayesianModule| -> Result<f64> {
            let start = Instant::now();
            let y = layer.forward_pass(x.as_tensor(), &mut Pass::train(&mut rng))?;
            let loss: Tensor = y.sum_all()?;
            let grads = loss.backward()?;
            // Touch the result so the work cannot be skipped.
            std::hint::black_box(grads.get(x.as_tensor()).is_some());
            Ok(start.elapsed().as_secs_f64() * 1e3)
        };
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); layers.len()];
        for rep in 0..config.reps + 2 {
            for (i, (_, layer)) in layers.iter().enumerate() {
                let t = step(layer.as_ref())?;
                if rep >= 2 {
                    times[i].push(t);
                }
            }
        }
        let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        for (i, (name, layer)) in layers.iter().enumerate() {
            let line = LayerTiming {
                layer: name,
                d,
                batch: config.batch,
                ms: medians[i],
                params: layer.num_params(),
                ratio_to_dense: medians[i] / medians[0],
                threads,
                simd: whvi::simd::level().name(),
            };
            report(&line);
            out.push(line);
        }
    }
    Ok(out)
}
