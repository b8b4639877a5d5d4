//! [`ImageDataset`]: labelled images held in memory as bytes.

use rand::seq::SliceRandom;

use crate::rng::WhviRng;
use crate::{Error, Result};

/// Labelled images in memory, one byte per pixel and channel.
///
/// Image `i` occupies `images[i * C * H * W .. (i + 1) * C * H * W]` in CHW order (all of
/// channel 0 row by row, then channel 1, ...), which is also the CIFAR-10 binary record layout,
/// so a whole data set costs `N * C * H * W` bytes (150 MB for the 50,000 CIFAR-10 training
/// images). Conversion to `f32` happens one batch at a time in [`Batches`](super::Batches).
///
/// Labels are class indices below [`num_classes`](Self::num_classes) (at most 256 classes).
/// Every constructor checks that the pixel buffer, labels and class names agree, so the
/// accessors never fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDataset {
    images: Vec<u8>,
    labels: Vec<u8>,
    channels: usize,
    height: usize,
    width: usize,
    classes: Vec<String>,
}

/// How [`ImageDataset::convert`] changes the height and width of images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Keep every pixel and centre the image on a zero (black) canvas of the new size: a
    /// 28x28 image goes to 32x32 with a 2-pixel border. The new size must be at least the old.
    Pad,
    /// Bilinear interpolation to the new size, sampling at pixel centres (the "half-pixel",
    /// align-corners-off convention) and rounding to the nearest byte. No antialiasing, so it
    /// suits upscaling or mild downscaling.
    Bilinear,
}

impl ImageDataset {
    /// Builds a data set from a CHW pixel buffer, labels and class names.
    ///
    /// Fails unless `channels`, `height` and `width` are positive, `images` holds exactly
    /// `labels.len()` images of that shape, there are 1 to 256 class names, and every label is
    /// below the number of classes.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u8>,
        channels: usize,
        height: usize,
        width: usize,
        classes: Vec<String>,
    ) -> Result<Self> {
        if channels == 0 || height == 0 || width == 0 {
            return Err(Error::invalid(format!(
                "image shape {channels}x{height}x{width} (CxHxW) has a zero dimension"
            )));
        }
        let image_len = channels
            .checked_mul(height)
            .and_then(|n| n.checked_mul(width))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "image shape {channels}x{height}x{width} (CxHxW) has more pixels than 64 \
                     bits count"
                ))
            })?;
        if Some(images.len()) != labels.len().checked_mul(image_len) {
            return Err(Error::invalid(format!(
                "{} pixel bytes do not make {} images of {channels}x{height}x{width}",
                images.len(),
                labels.len()
            )));
        }
        if classes.is_empty() || classes.len() > 256 {
            return Err(Error::invalid(format!(
                "a data set needs 1 to 256 classes, not {}",
                classes.len()
            )));
        }
        if let Some((i, &label)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| usize::from(l) >= classes.len())
        {
            return Err(Error::invalid(format!(
                "label {label} of image {i} is out of range for {} classes",
                classes.len()
            )));
        }
        Ok(ImageDataset {
            images,
            labels,
            channels,
            height,
            width,
            classes,
        })
    }

    /// The number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the data set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Channels per image (3 for RGB, 1 for grey).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Image height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Image width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// `(channels, height, width)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }

    /// Bytes per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// All pixels, image after image, CHW within each image.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// All labels, in image order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The CHW pixels of image `index`.
    ///
    /// # Panics
    /// If `index >= self.len()`.
    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[index * n..(index + 1) * n]
    }

    /// The label of image `index`.
    ///
    /// # Panics
    /// If `index >= self.len()`.
    pub fn label(&self, index: usize) -> u8 {
        self.labels[index]
    }

    /// The class names, indexed by label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The number of classes (labels run from 0 to `num_classes() - 1`).
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// How many images each class has, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &label in &self.labels {
            counts[usize::from(label)] += 1;
        }
        counts
    }

    /// The first `n` images (all of them when there are fewer).
    pub fn first(&self, n: usize) -> Result<Self> {
        if n >= self.len() {
            return Ok(self.clone());
        }
        self.subset(&(0..n).collect::<Vec<_>>())
    }

    /// The images at `indices`, in that order (repeats allowed).
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::invalid(format!(
                "index {bad} is out of range for a data set of {} images",
                self.len()
            )));
        }
        let mut images = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Ok(ImageDataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            classes: self.classes.clone(),
        })
    }

    /// Carves a validation set out of this (training) set: returns `(train, validation)`.
    ///
    /// The validation images are a uniformly random subset drawn with `rng` (one shuffle of
    /// the indices), so the split depends only on the data, `requested` and the generator's
    /// state. Both parts keep the original image order, and they are disjoint and together
    /// hold every image exactly once.
    ///
    /// Size: exactly `requested` images, at most half of the set (`0` gives an empty
    /// validation set). A larger request is refused rather than quietly shrunk, since the run
    /// records what was asked for.
    pub fn split_validation(&self, requested: usize, rng: &mut WhviRng) -> Result<(Self, Self)> {
        let n = self.len();
        if requested > n / 2 {
            return Err(Error::invalid(format!(
                "{requested} validation images asked of a training set of {n}: at most half \
                 of it ({}) can be held out; ask for fewer (--validation N, 0 for none)",
                n / 2
            )));
        }
        let size = requested;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(rng);
        let (validation, train) = order.split_at_mut(size);
        validation.sort_unstable();
        train.sort_unstable();
        Ok((self.subset(train)?, self.subset(validation)?))
    }

    /// The same images with `channels` channels and `height` x `width` pixels, for example
    /// Fashion-MNIST (1x28x28) as 3x32x32 so it can serve as out-of-distribution data for a
    /// CIFAR-10 model: `convert(3, 32, 32, Resize::Pad)`.
    ///
    /// Channels: kept when equal; one grey channel is copied into every output channel;
    /// anything else is an error. Pixels: see [`Resize`]. Labels and class names are kept.
    pub fn convert(
        &self,
        channels: usize,
        height: usize,
        width: usize,
        resize: Resize,
    ) -> Result<Self> {
        if channels == 0 || height == 0 || width == 0 {
            return Err(Error::invalid(format!(
                "cannot convert images to {channels}x{height}x{width} (CxHxW)"
            )));
        }
        if channels != self.channels && self.channels != 1 {
            return Err(Error::invalid(format!(
                "cannot convert {}-channel images to {channels} channels \
                 (only grey images can be expanded)",
                self.channels
            )));
        }
        if resize == Resize::Pad && (height < self.height || width < self.width) {
            return Err(Error::invalid(format!(
                "cannot pad {}x{} images to the smaller size {height}x{width}",
                self.height, self.width
            )));
        }
        let image_len = channels
            .checked_mul(height)
            .and_then(|n| n.checked_mul(width));
        let bytes = image_len.and_then(|n| n.checked_mul(self.len()));
        crate::device::check_memory(
            bytes.map(|b| b as u64),
            format_args!(
                "converting {} images to {channels}x{height}x{width}",
                self.len()
            ),
            "convert to a smaller size",
        )?;
        let plane = height * width;
        let mut images = vec![0u8; self.len() * channels * plane];
        let mut resized = vec![0u8; plane];
        for (i, out) in images.chunks_exact_mut(channels * plane).enumerate() {
            let src = self.image(i);
            for c in 0..channels {
                let src_c = if self.channels == 1 { 0 } else { c };
                let src_plane =
                    &src[src_c * self.height * self.width..(src_c + 1) * self.height * self.width];
                match resize {
                    Resize::Pad => pad_plane(
                        src_plane,
                        (self.height, self.width),
                        (height, width),
                        &mut resized,
                    ),
                    Resize::Bilinear => bilinear_plane(
                        src_plane,
                        (self.height, self.width),
                        (height, width),
                        &mut resized,
                    ),
                }
                out[c * plane..(c + 1) * plane].copy_from_slice(&resized);
            }
        }
        Ok(ImageDataset {
            images,
            labels: self.labels.clone(),
            channels,
            height,
            width,
            classes: self.classes.clone(),
        })
    }
}

/// Centres `src` (`from` = (h, w)) on a zero canvas of size `to`, written to `out`.
fn pad_plane(src: &[u8], from: (usize, usize), to: (usize, usize), out: &mut [u8]) {
    out.fill(0);
    let top = (to.0 - from.0) / 2;
    let left = (to.1 - from.1) / 2;
    for (y, row) in src.chunks_exact(from.1).enumerate() {
        let start = (top + y) * to.1 + left;
        out[start..start + from.1].copy_from_slice(row);
    }
}

/// Bilinear resampling of `src` (`from` = (h, w)) to `to`, sampling at pixel centres.
fn bilinear_plane(src: &[u8], from: (usize, usize), to: (usize, usize), out: &mut [u8]) {
    // For each output coordinate: the two source indices and the weight of the second.
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|o| {
                let pos = ((o as f32 + 0.5) * scale - 0.5).clamp(0.0, (n_in - 1) as f32);
                let lo = pos.floor() as usize;
                let hi = (lo + 1).min(n_in - 1);
                (lo, hi, pos - lo as f32)
            })
            .collect()
    };
    let rows = taps(from.0, to.0);
    let cols = taps(from.1, to.1);
    let at = |y: usize, x: usize| f32::from(src[y * from.1 + x]);
    for (oy, &(y0, y1, wy)) in rows.iter().enumerate() {
        for (ox, &(x0, x1, wx)) in cols.iter().enumerate() {
            let top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx;
            let bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx;
            out[oy * to.1 + ox] = (top * (1.0 - wy) + bottom * wy).round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(n: usize) -> Vec<String> {
        (0..n).map(|i| i.to_string()).collect()
    }

    #[test]
    fn new_rejects_inconsistent_parts() {
        assert!(ImageDataset::new(vec![0; 5], vec![0, 1], 1, 1, 2, classes(2)).is_err());
        assert!(ImageDataset::new(vec![0; 4], vec![0, 2], 1, 1, 2, classes(2)).is_err());
        assert!(ImageDataset::new(vec![], vec![], 0, 1, 2, classes(2)).is_err());
        assert!(ImageDataset::new(vec![], vec![], 1, 1, 1, vec![]).is_err());
        // A shape whose pixel count wraps to 0 in 64 bits is not an image of no pixels.
        let err = ImageDataset::new(vec![], vec![0], 1, 1 << 32, 1 << 32, classes(1)).unwrap_err();
        assert!(
            err.to_string().contains("more pixels than 64 bits"),
            "{err}"
        );
        let ok = ImageDataset::new(vec![1, 2, 3, 4], vec![0, 1], 1, 1, 2, classes(2)).unwrap();
        assert_eq!(ok.image(1), &[3, 4]);
        assert_eq!(ok.class_counts(), vec![1, 1]);
    }

    #[test]
    fn converting_to_a_size_beyond_memory_is_refused_before_allocating() {
        let data = ImageDataset::new(vec![1, 2, 3, 4], vec![0, 1], 1, 1, 2, classes(2)).unwrap();
        let err = data
            .convert(3, 1 << 20, 1 << 20, Resize::Bilinear)
            .unwrap_err();
        assert!(
            err.to_string().contains("this machine has available"),
            "{err}"
        );
    }

    #[test]
    fn bilinear_keeps_constant_images_and_same_size_images() {
        let src: Vec<u8> = (0..12).map(|v| v * 20).collect();
        let mut out = vec![0; 12];
        bilinear_plane(&src, (3, 4), (3, 4), &mut out);
        assert_eq!(out, src);
        let flat = vec![77u8; 6];
        let mut big = vec![0; 35];
        bilinear_plane(&flat, (2, 3), (5, 7), &mut big);
        assert!(big.iter().all(|&v| v == 77));
    }

    #[test]
    fn bilinear_doubling_interpolates_between_neighbours() {
        // 1x2 -> 1x4: centres of the outputs fall at -0.25, 0.25, 0.75, 1.25 in source pixels.
        let mut out = vec![0; 4];
        bilinear_plane(&[0, 100], (1, 2), (1, 4), &mut out);
        assert_eq!(out, vec![0, 25, 75, 100]);
    }
}
