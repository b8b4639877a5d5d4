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
/// every layer's KL), `beta` the KL weight (the run's `kl_weight` after the warm-up; 1 for
/// the ELBO).
pub fn elbo_loss(
    logits: &Tensor,
    targets: &Tensor,
    kl_total: &Tensor,
    n_train: usize,
    beta: f64,
) -> Result<Tensor> {
    elbo_loss_part(logits, targets, kl_total, n_train, beta, 1.0, 1)
}

/// One rank's part of [`elbo_loss`] when a global batch is split over `ranks` ranks:
/// `fraction` (this rank's share of the global batch's examples) of its own mean NLL plus
/// `1 / ranks` of the KL term. The parts sum over the ranks to the global batch's loss, and so
/// do their gradients. With `fraction` 1 and one rank it is [`elbo_loss`], bit for bit.
pub fn elbo_loss_part(
    logits: &Tensor,
    targets: &Tensor,
    kl_total: &Tensor,
    n_train: usize,
    beta: f64,
    fraction: f64,
    ranks: usize,
) -> Result<Tensor> {
    if n_train == 0 {
        candle_core::bail!("elbo_loss: n_train must be the (non-zero) size of the training set");
    }
    let nll = (candle_nn::loss::cross_entropy(logits, targets)? * fraction)?;
    let kl_term = (kl_total.to_dtype(nll.dtype())? * (beta / (n_train * ranks.max(1)) as f64))?;
    nll + kl_term
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The value pins the contract: the KL is divided by the training-set size (not the batch
    /// size, not the parameter count) and weighted by beta, on top of the mean NLL.
    #[test]
    fn the_kl_is_divided_by_the_training_set_size_and_weighted_by_beta() {
        let rows = [
            [2.0f64, 0.5, -1.0],
            [0.0, 0.0, 0.0],
            [-3.0, 1.0, 4.0],
            [1.5, -0.5, 0.25],
        ];
        let targets = [0u32, 2, 1, 1];
        let logits = Tensor::new(&rows, &Device::Cpu).unwrap();
        let y = Tensor::new(&targets, &Device::Cpu).unwrap();
        let kl = Tensor::new(50.0f64, &Device::Cpu).unwrap();
        let mean_nll = rows
            .iter()
            .zip(targets)
            .map(|(row, t)| row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[t as usize])
            .sum::<f64>()
            / 4.0;
        for (n_train, beta) in [(1000usize, 0.5f64), (37, 1.0), (60_000, 0.1)] {
            let loss = elbo_loss(&logits, &y, &kl, n_train, beta)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let expected = mean_nll + beta * 50.0 / n_train as f64;
            assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");
        }
        assert!(elbo_loss(&logits, &y, &kl, 0, 1.0).is_err());
    }

    /// The contract data-parallel training rests on: the parts of ranks with shares of the
    /// batch sum to the whole batch's loss.
    #[test]
    fn the_parts_of_a_split_batch_sum_to_its_loss() {
        let logits = Tensor::new(
            &[
                [2.0f64, 0.5, -1.0],
                [0.0, 0.0, 0.0],
                [-3.0, 1.0, 4.0],
                [1.5, -0.5, 0.25],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let targets = Tensor::new(&[0u32, 2, 1, 1], &Device::Cpu).unwrap();
        let kl = Tensor::new(50.0f64, &Device::Cpu).unwrap();
        let whole = elbo_loss(&logits, &targets, &kl, 1000, 0.5)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // Shards of 1 and 3 examples over 2 ranks.
        let part = |start: usize, len: usize| {
            let (l, t) = (
                logits.narrow(0, start, len).unwrap(),
                targets.narrow(0, start, len).unwrap(),
            );
            elbo_loss_part(&l, &t, &kl, 1000, 0.5, len as f64 / 4.0, 2)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let summed = part(0, 1) + part(1, 3);
        assert!(
            (summed - whole).abs() <= 1e-12 * whole.abs(),
            "{summed} vs {whole}"
        );
        // Each part alone is not the whole (the test can fail).
        assert!((part(1, 3) - whole).abs() > 1e-3);
    }
}
