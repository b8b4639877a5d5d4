//! One optimisation step on the negative ELBO, shared by the training loop and `whvi bench train`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::Optimizer;

use crate::dist::Group;
use crate::layers::Pass;
use crate::loss::elbo_loss_part;
use crate::optim::{clip_grad_norm, gradients_are_finite, AnyOptimizer, NamedOptimizer};
use crate::rng::WhviRng;
use crate::zoo::Network;
use crate::{Error, Result};

/// The settings of a step that do not change from batch to batch (besides `beta`).
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    /// Training-set size N: the KL term is divided by it.
    pub n_train: usize,
    /// KL weight (KL warm-up).
    pub beta: f64,
    /// Posterior samples averaged in the loss.
    pub mc_samples: usize,
    /// Clip the global gradient norm to this.
    pub clip_grad: Option<f64>,
}

/// What a step measured on its batch, averaged over the MC samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Negative ELBO per example.
    pub loss: f64,
    /// Mean negative log-likelihood.
    pub nll: f64,
    /// Correct predictions (averaged over samples, so possibly fractional).
    pub correct: f64,
}

/// Samples the posterior `settings.mc_samples` times, back-propagates the mean negative ELBO and
/// applies the optimiser. A non-finite loss or gradient norm is [`Error::Diverged`] and leaves
/// the parameters untouched.
///
/// `images` and `labels` are the global batch. In a `group` of several ranks each computes its
/// shard of it and the gradients are summed before the update, so every rank makes the update
/// one process would make on the whole batch (see [`crate::dist`]); the outcome is the global
/// batch's.
pub fn train_step(
    network: &Network,
    optimizer: &mut AnyOptimizer,
    (images, labels): (&Tensor, &Tensor),
    settings: StepSettings,
    rng: &mut WhviRng,
    group: &Group,
) -> Result<StepOutcome> {
    let shard = group.shard(labels.dim(0)?)?;
    let sharded = group.size() > 1;
    let (images, labels) = match sharded {
        true => (&shard.take(images)?, &shard.take(labels)?),
        false => (images, labels),
    };
    let samples = settings.mc_samples.max(1);
    let mut loss_sum: Option<Tensor> = None;
    // Summed as tensors and read once, after the backward pass is queued: on a GPU every read
    // is a host round trip that idles the device.
    let mut nll_sum: Option<Tensor> = None;
    let mut correct_sum: Option<Tensor> = None;
    let add = |sum: Option<Tensor>, term: Tensor| match sum {
        Some(s) => s + term,
        None => Ok(term),
    };
    for sample in 0..samples {
        // One update of BatchNorm's running statistics per step, not one per sample.
        let pass = match sharded {
            true => Pass::train(rng).on_shard(shard.clone()),
            false => Pass::train(rng),
        };
        let mut pass = if sample == 0 {
            pass
        } else {
            pass.without_statistics()
        };
        let logits = network.forward_pass(images, &mut pass)?;
        let kl = network.kl()?;
        let loss = elbo_loss_part(
            &logits,
            labels,
            &kl,
            settings.n_train,
            settings.beta,
            shard.fraction(),
            group.size(),
        )?;
        let nll = candle_nn::loss::cross_entropy(&logits, labels)?.detach();
        let correct = logits
            .argmax(1)?
            .eq(labels)?
            .to_dtype(DType::F32)?
            .sum_all()?;
        nll_sum = Some(add(nll_sum, nll)?);
        correct_sum = Some(add(correct_sum, correct)?);
        loss_sum = Some(add(loss_sum, loss)?);
    }
    let loss = (loss_sum.expect("at least one sample") / samples as f64)?;
    let mut grads = loss.backward()?;
    let measured = Tensor::stack(
        &[
            loss.detach().to_dtype(DType::F32)?,
            nll_sum.expect("at least one sample").to_dtype(DType::F32)?,
            correct_sum.expect("at least one sample"),
        ],
        0,
    )?
    .to_vec1::<f32>()?;
    // This shard's parts of the global batch's loss, mean NLL and count of correct predictions.
    let mut measured = [
        measured[0] as f64,
        measured[1] as f64 * shard.fraction(),
        measured[2] as f64,
    ];
    group.sum_f64(&mut measured);
    let [loss_value, nll, correct] = measured;
    if !loss_value.is_finite() {
        return Err(Error::Diverged(format!(
            "the training loss became {loss_value}"
        )));
    }
    group.sum_gradients(&mut grads, optimizer.vars())?;
    apply_gradients(optimizer, &mut grads, settings.clip_grad)?;
    Ok(StepOutcome {
        loss: loss_value,
        nll: nll / samples as f64,
        correct: correct / samples as f64,
    })
}

/// Clips `grads` to `clip_grad` if set and applies them with `optimizer`, unless a gradient is
/// non-finite: then the step is [`Error::Diverged`] and no parameter changes, clipping or not.
pub fn apply_gradients(
    optimizer: &mut AnyOptimizer,
    grads: &mut GradStore,
    clip_grad: Option<f64>,
) -> Result<()> {
    match clip_grad {
        // A non-finite norm is reported as divergence by the clipping itself.
        Some(max_norm) => {
            clip_grad_norm(grads, optimizer.vars(), max_norm)?;
        }
        None => {
            if !gradients_are_finite(grads, optimizer.vars())? {
                return Err(Error::Diverged(
                    "a gradient holds NaN or infinity (the loss was finite); the parameters \
                     were left as they were"
                        .into(),
                ));
            }
        }
    }
    optimizer.step(grads)?;
    Ok(())
}
