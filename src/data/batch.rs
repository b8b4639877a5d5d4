//! Epoch orders and the batch iterator that turns bytes into candle tensors.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;

use super::{Augment, ImageDataset, Normalization};
use crate::rng::WhviRng;
use crate::{Error, Result};

/// A uniformly random permutation of `0..len`, drawn from `rng`: one epoch's order.
///
/// Deterministic given the generator state, so an epoch can be replayed either by storing
/// the returned vector (it serialises as a plain list) or by storing the generator state
/// ([`RngState`](crate::rng::RngState)) before this call.
pub fn shuffled_order(len: usize, rng: &mut WhviRng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(rng);
    order
}

/// The identity order `0..len`, for evaluation.
pub fn sequential_order(len: usize) -> Vec<usize> {
    (0..len).collect()
}

/// An iterator over batches of an [`ImageDataset`], in a given order of image indices.
///
/// Each item is `(images, labels)`: `images` an `f32` tensor `[B, C, H, W]` normalised per
/// channel, `labels` a `u32` tensor `[B]`, both on the chosen device. Only one batch is
/// converted to `f32` at a time. The last batch is smaller than the batch size unless
/// [`drop_last`](Self::drop_last) is set, in which case it is skipped.
///
/// With [`augment`](Self::augment), the augmentation draws come from the caller's generator
/// as each batch is produced, image by image in batch order. To resume an epoch part-way,
/// restore the generator state saved after the last finished batch and pass the rest of the
/// epoch's order (`&order[done * batch_size..]`).
pub struct Batches<'a> {
    data: &'a ImageDataset,
    order: Vec<usize>,
    position: usize,
    batch_size: usize,
    drop_last: bool,
    table: Vec<[f32; 256]>,
    device: Device,
    augment: Option<(Augment, &'a mut WhviRng)>,
}

impl<'a> Batches<'a> {
    /// Batches of `batch_size` images of `data`, taken in `order`, normalised with
    /// `normalization`, on `device`.
    ///
    /// Fails if `batch_size` is 0, an index in `order` is out of range, or the normalisation
    /// has a different number of channels than the images.
    pub fn new(
        data: &'a ImageDataset,
        order: Vec<usize>,
        batch_size: usize,
        normalization: &Normalization,
        device: &Device,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::invalid("the batch size must be at least 1"));
        }
        if let Some(&bad) = order.iter().find(|&&i| i >= data.len()) {
            return Err(Error::invalid(format!(
                "epoch order holds index {bad}, out of range for a data set of {} images",
                data.len()
            )));
        }
        if normalization.channels() != data.channels() {
            return Err(Error::invalid(format!(
                "normalisation is for {} channel(s) but the images have {}",
                normalization.channels(),
                data.channels()
            )));
        }
        Ok(Batches {
            data,
            order,
            position: 0,
            batch_size,
            drop_last: false,
            table: normalization.lookup_table(),
            device: device.clone(),
            augment: None,
        })
    }

    /// Skips a final batch smaller than the batch size (when `drop_last` is true).
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Augments every image with `augment`, drawing from `rng` (see [`Augment`]).
    pub fn augment(mut self, augment: Augment, rng: &'a mut WhviRng) -> Self {
        self.augment = Some((augment, rng));
        self
    }

    /// The number of batches still to come.
    pub fn remaining_batches(&self) -> usize {
        let left = self.order.len() - self.position;
        if self.drop_last {
            left / self.batch_size
        } else {
            left.div_ceil(self.batch_size)
        }
    }

    /// Builds the batch of the images at `self.order[start..end]`.
    fn make_batch(&mut self, start: usize, end: usize) -> Result<(Tensor, Tensor)> {
        let indices = &self.order[start..end];
        let shape = self.data.shape();
        let (c, h, w) = shape;
        let plane = h * w;
        let mut pixels = Vec::with_capacity(indices.len() * c * plane);
        let mut scratch = vec![0u8; c * plane];
        for &i in indices {
            let src = self.data.image(i);
            let image = match &mut self.augment {
                Some((augment, rng)) => {
                    augment.apply(src, shape, &mut scratch, rng);
                    &scratch[..]
                }
                None => src,
            };
            for (channel, table) in image.chunks_exact(plane).zip(&self.table) {
                pixels.extend(channel.iter().map(|&v| table[usize::from(v)]));
            }
        }
        let labels: Vec<u32> = indices
            .iter()
            .map(|&i| u32::from(self.data.label(i)))
            .collect();
        let b = indices.len();
        Ok((
            Tensor::from_vec(pixels, (b, c, h, w), &self.device)?,
            Tensor::from_vec(labels, b, &self.device)?,
        ))
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining_batches() == 0 {
            return None;
        }
        let end = (self.position + self.batch_size).min(self.order.len());
        let batch = self.make_batch(self.position, end);
        self.position = end;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.remaining_batches();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Batches<'_> {}
