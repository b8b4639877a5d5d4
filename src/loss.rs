//! The training objective: the negative ELBO per training example.

use candle_core::{Result, Tensor};

/// `mean NLL + beta · KL / n_train`: the negative evidence lower bound divided by the number
/// of training examples, which is what an optimiser of a per-example loss should minimise.
///
/// Why `KL / n_train` and nothing else: the ELBO of the whole training set is
/// `sum_n E[log p(y_n | x_n, w)] - KL`. A minibatch of `B` examples estimates the first term
/// as `(n_train / B) · sum_batch`, so dividing the whole ELBO by `n_train` gives
/// `mean_batch NLL + KL / n_train`. Dividing the KL by the batch size (or averaging it over
/// parameters or layers) instead weights the prior `n_train / B` times too much (or far too
/// little), which makes models underfit (or ignore the prior).
///
/// `logits` `[B, K]`, `targets` `[B]` (u32 class indices), `kl_total` a scalar (the sum of
/// every layer's KL), `beta` the KL weight (1 after warm-up).
pub fn elbo_loss(
    logits: &Tensor,
    targets: &Tensor,
    kl_total: &Tensor,
    n_train: usize,
    beta: f64,
) -> Result<Tensor> {
    if n_train == 0 {
        candle_core::bail!("elbo_loss: n_train must be the (non-zero) size of the training set");
    }
    let nll = candle_nn::loss::cross_entropy(logits, targets)?;
    let kl_term = (kl_total.to_dtype(nll.dtype())? * (beta / n_train as f64))?;
    nll + kl_term
}
