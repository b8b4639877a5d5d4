use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::rng::WhviRng;

/// Draws of at least this many values are generated in parallel chunks of this size.
const NOISE_CHUNK: usize = 1 << 14;

/// Standard normal noise of the given shape, drawn from `rng`.
///
/// On the CPU every value comes from `rng`, so runs are reproducible. On a GPU the values are
/// generated on the device (no host round trip in the hot path) from a seed drawn from `rng`,
/// which keeps runs reproducible for a given device and seed.
pub fn standard_normal(
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
    rng: &mut WhviRng,
) -> Result<Tensor> {
    let shape = shape.into();
    if device.is_cpu() {
        let n = shape.elem_count();
        let values: Vec<f32> = if n <= NOISE_CHUNK {
            (0..n).map(|_| rng.sample(StandardNormal)).collect()
        } else {
            // Large draws (a WHVI layer draws batch x D values per step) run in parallel:
            // chunk i comes from stream i of a generator seeded from `rng`, so the values do
            // not depend on the number of threads.
            let seed: u64 = rng.random();
            let mut values = vec![0f32; n];
            values
                .par_chunks_mut(NOISE_CHUNK)
                .enumerate()
                .for_each(|(i, chunk)| {
                    let mut stream = WhviRng::seed_from_u64(seed);
                    stream.set_stream(i as u64);
                    for v in chunk {
                        *v = stream.sample(StandardNormal);
                    }
                });
            values
        };
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    } else {
        device.set_seed(rng.random())?;
        Tensor::randn(0f32, 1f32, shape, device)?.to_dtype(dtype)
    }
}

/// A dropout mask with entries `1/(1-p)` (kept) or 0 (dropped, with probability `p`).
pub(crate) fn dropout_mask(
    shape: impl Into<Shape>,
    p: f64,
    dtype: DType,
    device: &Device,
    rng: &mut WhviRng,
) -> Result<Tensor> {
    let shape = shape.into();
    let keep_scale = (1.0 / (1.0 - p)) as f32;
    if device.is_cpu() {
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                if rng.random::<f64>() < p {
                    0.0
                } else {
                    keep_scale
                }
            })
            .collect();
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    } else {
        device.set_seed(rng.random())?;
        let uniform = Tensor::rand(0f32, 1f32, shape, device)?;
        (uniform.ge(p)?.to_dtype(DType::F32)? * keep_scale as f64)?.to_dtype(dtype)
    }
}
