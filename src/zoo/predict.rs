//! Monte Carlo prediction: the predictive distribution `p(y|x) = mean_t softmax(f_t(x))`.

use candle_core::{DType, Tensor};

use super::Network;
use crate::data::{sequential_order, Batches, ImageDataset, Normalization};
use crate::layers::Pass;
use crate::metrics::{Predictions, SampleProbs};
use crate::rng::WhviRng;
use crate::{Error, Result};

/// How to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PredictOptions {
    /// Posterior samples T per image (1 pass through the mean for a deterministic network).
    pub samples: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Keep the per-sample probabilities `[T, N, K]` (needed for mutual information).
    pub keep_samples: bool,
}

impl Default for PredictOptions {
    fn default() -> Self {
        PredictOptions {
            samples: 32,
            batch_size: 256,
            keep_samples: true,
        }
    }
}

/// Predictive probabilities of `network` on every image of `data`, in order.
///
/// Each of the T samples is a full posterior draw (WHVI / mean-field noise, dropout masks) from
/// `rng`; the metrics of the method doc are computed on their average. `progress` is called
/// with the number of images done after each batch.
pub fn predict(
    network: &Network,
    data: &ImageDataset,
    normalization: &Normalization,
    options: PredictOptions,
    rng: &mut WhviRng,
    mut progress: impl FnMut(usize),
) -> Result<Predictions> {
    if options.samples == 0 {
        return Err(Error::invalid(
            "the number of posterior samples must be at least 1 (e.g. --samples 32)",
        ));
    }
    if data.is_empty() {
        return Err(Error::invalid("the data set to predict on holds no images"));
    }
    let [c, h, w] = network.input_shape();
    if data.shape() != (c, h, w) {
        let (dc, dh, dw) = data.shape();
        return Err(Error::invalid(format!(
            "the network expects {c}x{h}x{w} images (CxHxW) but the data holds {dc}x{dh}x{dw}; \
             use a checkpoint trained on this data set, or convert the images"
        )));
    }
    if data.num_classes() != network.num_classes() {
        return Err(Error::invalid(format!(
            "the network predicts {} classes but the data set has {}",
            network.num_classes(),
            data.num_classes()
        )));
    }
    let samples = if network.is_bayesian() {
        options.samples
    } else {
        1
    };
    let (n, k) = (data.len(), network.num_classes());
    let values = samples.checked_mul(n).and_then(|v| v.checked_mul(k));
    // The f32 block below and its f64 copy in SampleProbs.
    let bytes = values.and_then(|v| u64::try_from(v).ok()?.checked_mul(12));
    crate::device::check_memory(
        bytes,
        format_args!("keeping {samples} posterior samples of {n} images x {k} classes"),
        "ask for fewer samples (--samples) or predict on fewer images",
    )?;
    let mut per_sample = vec![0f32; samples * n * k];
    let batches = Batches::new(
        data,
        sequential_order(n),
        options.batch_size,
        normalization,
        network.device(),
    )?;
    let mut start = 0;
    for batch in batches {
        let (images, _) = batch?;
        let b = images.dim(0)?;
        // The layers before the first stochastic one give the same output for every sample.
        let features = network.prediction_features(&images)?;
        for t in 0..samples {
            let mut pass = if network.is_bayesian() {
                Pass::sample(rng)
            } else {
                Pass::mean()
            };
            let logits = network.forward_from_features(&features, &mut pass)?;
            let probs: Vec<f32> = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?
                .flatten_all()?
                .to_vec1()?;
            let offset = (t * n + start) * k;
            per_sample[offset..offset + b * k].copy_from_slice(&probs);
        }
        start += b;
        progress(start);
    }
    let sample_probs = SampleProbs::from_f32(&per_sample, samples, n, k)?;
    Ok(if options.keep_samples {
        Predictions::from_samples(sample_probs)
    } else {
        Predictions::from_mean(sample_probs.mean())
    })
}

/// The logits of one mean pass, for temperature scaling: `[N, K]`.
pub fn mean_logits(
    network: &Network,
    data: &ImageDataset,
    normalization: &Normalization,
    batch_size: usize,
) -> Result<Tensor> {
    let batches = Batches::new(
        data,
        sequential_order(data.len()),
        batch_size,
        normalization,
        network.device(),
    )?;
    let mut all = Vec::new();
    for batch in batches {
        let (images, _) = batch?;
        all.push(network.forward_pass(&images, &mut Pass::mean())?);
    }
    Ok(Tensor::cat(&all, 0)?)
}

/// The predictive distribution of a deep ensemble, `p(y|x) = (1/M) Σ_m p_m(y|x)`, from each
/// member's predictions on the same images.
///
/// The members' posterior samples are pooled, so mutual information measures disagreement
/// between members as well as within each one. A member with fewer samples (a deterministic
/// network's single pass) is repeated to the largest count, so that every member weighs the
/// same. One member comes back unchanged; several must all keep their per-sample
/// probabilities ([`PredictOptions::keep_samples`]).
pub fn ensemble_predictions(mut members: Vec<Predictions>) -> Result<Predictions> {
    if members.len() <= 1 {
        return members
            .pop()
            .ok_or_else(|| Error::invalid("an ensemble needs at least one member"));
    }
    let mut parts = Vec::with_capacity(members.len());
    for (i, member) in members.iter().enumerate() {
        let samples = member.samples().ok_or_else(|| {
            Error::invalid(format!(
                "ensemble member {i} kept no per-sample probabilities; predict its members \
                 with keep_samples"
            ))
        })?;
        parts.push(samples);
    }
    let (n, k) = (parts[0].n(), parts[0].k());
    let most = parts.iter().map(|p| p.t()).max().unwrap_or(1);
    let values = [parts.len(), most, n, k]
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b));
    crate::device::check_memory(
        values.and_then(|v| u64::try_from(v).ok()?.checked_mul(8)),
        format_args!(
            "pooling {} members x {most} samples of {n} images",
            parts.len()
        ),
        "evaluate fewer members or images, or ask for fewer samples (--samples)",
    )?;
    let mut data = Vec::with_capacity(values.unwrap_or(0));
    for (i, part) in parts.iter().enumerate() {
        if (part.n(), part.k()) != (n, k) {
            return Err(Error::invalid(format!(
                "ensemble member {i} predicted {} images x {} classes, member 0 {n} x {k}",
                part.n(),
                part.k()
            )));
        }
        if most % part.t() != 0 {
            return Err(Error::invalid(format!(
                "ensemble member {i} drew {} posterior samples, which does not divide the \
                 {most} of another member; give every Bayesian member the same --samples",
                part.t()
            )));
        }
        for _ in 0..most / part.t() {
            (0..part.t()).for_each(|s| data.extend_from_slice(part.sample(s)));
        }
    }
    let pooled = SampleProbs::new(data, parts.len() * most, n, k)?;
    Ok(Predictions::from_samples(pooled))
}
