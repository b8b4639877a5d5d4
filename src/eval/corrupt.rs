//! Corrupted copies of a test set, made on the fly, in the style of CIFAR-10-C (Hendrycks and
//! Dietterich, 2019): eight corruptions at severities 1-5.
//!
//! Every corruption works on pixel values `x` in [0, 1] (channel-major images) and rounds back
//! to u8 at the end. The formulas, per severity `s = 1..5`:
//!
//! | corruption | formula | parameter by severity |
//! |---|---|---|
//! | gaussian-noise | `x + N(0, c^2)` | c = 0.04, 0.06, 0.08, 0.09, 0.10 |
//! | shot-noise | `Poisson(x · c) / c` | c = 500, 250, 100, 75, 50 |
//! | impulse-noise | salt-and-pepper: a fraction c of values set to 0 or 1 (even odds) | c = 0.01, 0.02, 0.03, 0.05, 0.07 |
//! | defocus-blur | mean over a disk of radius r pixels (edge pixels repeated) | r = 1.0, 1.5, 2.0, 2.5, 3.0 |
//! | contrast | `(x - m) · c + m`, m the image's mean | c = 0.75, 0.5, 0.4, 0.3, 0.15 |
//! | brightness | `x + c` (a lift of every channel, the RGB analogue of raising HSV value) | c = 0.1, 0.2, 0.3, 0.4, 0.5 |
//! | pixelate | box-average down to `round(size · c)` pixels, nearest-neighbour back up | c = 0.95, 0.9, 0.85, 0.75, 0.65 |
//! | jpeg | 8x8 DCT per channel, quantised with the JPEG luminance table at quality q | q = 80, 65, 58, 50, 40 |
//!
//! Results are clipped to [0, 1]. Noise draws come from the caller's seeded generator.

use rand::Rng;
use rand_distr::{Distribution, Normal, Poisson};
use serde::{Deserialize, Serialize};

use crate::data::ImageDataset;
use crate::rng::WhviRng;
use crate::{Error, Result};

/// A corruption of CIFAR-10-C style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Corruption {
    /// Additive Gaussian noise.
    GaussianNoise,
    /// Poisson (photon) noise.
    ShotNoise,
    /// Salt-and-pepper noise.
    ImpulseNoise,
    /// Disk blur.
    DefocusBlur,
    /// Reduced contrast.
    Contrast,
    /// Increased brightness.
    Brightness,
    /// Lower resolution.
    Pixelate,
    /// JPEG-style DCT quantisation.
    Jpeg,
}

impl Corruption {
    /// All corruptions, in report order.
    pub const ALL: [Corruption; 8] = [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::DefocusBlur,
        Corruption::Contrast,
        Corruption::Brightness,
        Corruption::Pixelate,
        Corruption::Jpeg,
    ];

    /// The name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Corruption::GaussianNoise => "gaussian-noise",
            Corruption::ShotNoise => "shot-noise",
            Corruption::ImpulseNoise => "impulse-noise",
            Corruption::DefocusBlur => "defocus-blur",
            Corruption::Contrast => "contrast",
            Corruption::Brightness => "brightness",
            Corruption::Pixelate => "pixelate",
            Corruption::Jpeg => "jpeg",
        }
    }

    /// Parses a corruption name.
    pub fn parse(text: &str) -> Result<Self> {
        Corruption::ALL
            .into_iter()
            .find(|c| c.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Corruption::ALL.iter().map(|c| c.name()).collect();
                Error::invalid(format!(
                    "unknown corruption '{text}': use one of {}",
                    names.join(", ")
                ))
            })
    }

    /// The parameter of `severity` (1-5); the caller has checked the range.
    fn parameter(self, severity: usize) -> f64 {
        let table: [f64; 5] = match self {
            Corruption::GaussianNoise => [0.04, 0.06, 0.08, 0.09, 0.10],
            Corruption::ShotNoise => [500.0, 250.0, 100.0, 75.0, 50.0],
            Corruption::ImpulseNoise => [0.01, 0.02, 0.03, 0.05, 0.07],
            Corruption::DefocusBlur => [1.0, 1.5, 2.0, 2.5, 3.0],
            Corruption::Contrast => [0.75, 0.5, 0.4, 0.3, 0.15],
            Corruption::Brightness => [0.1, 0.2, 0.3, 0.4, 0.5],
            Corruption::Pixelate => [0.95, 0.9, 0.85, 0.75, 0.65],
            Corruption::Jpeg => [80.0, 65.0, 58.0, 50.0, 40.0],
        };
        table[severity - 1]
    }

    /// Corrupts one image (`c` planes of `h x w`, values in [0, 1]) in place. Refuses a
    /// severity outside 1-5 and an image whose length is not `c · h · w`.
    pub fn apply(
        self,
        image: &mut [f32],
        (c, h, w): (usize, usize, usize),
        severity: usize,
        rng: &mut WhviRng,
    ) -> Result<()> {
        check_severity(severity)?;
        if image.len() != c * h * w || image.is_empty() {
            return Err(Error::invalid(format!(
                "{}: an image of {} values is not {c}x{h}x{w}",
                self.name(),
                image.len()
            )));
        }
        let p = self.parameter(severity);
        match self {
            Corruption::GaussianNoise => {
                let normal = Normal::new(0.0, p).map_err(|e| Error::invalid(e.to_string()))?;
                for v in image.iter_mut() {
                    *v += normal.sample(rng) as f32;
                }
            }
            Corruption::ShotNoise => {
                for v in image.iter_mut() {
                    let lambda = (*v as f64 * p).max(0.0);
                    *v = if lambda > 0.0 {
                        let poisson = Poisson::new(lambda).map_err(|e| {
                            Error::invalid(format!("shot noise on a pixel of {v}: {e}"))
                        })?;
                        (poisson.sample(rng) / p) as f32
                    } else {
                        0.0
                    };
                }
            }
            Corruption::ImpulseNoise => {
                for v in image.iter_mut() {
                    if rng.random::<f64>() < p {
                        *v = if rng.random::<bool>() { 1.0 } else { 0.0 };
                    }
                }
            }
            Corruption::DefocusBlur => disk_blur(image, (c, h, w), p),
            Corruption::Contrast => {
                let mean = image.iter().sum::<f32>() / image.len() as f32;
                for v in image.iter_mut() {
                    *v = (*v - mean) * p as f32 + mean;
                }
            }
            Corruption::Brightness => {
                for v in image.iter_mut() {
                    *v += p as f32;
                }
            }
            Corruption::Pixelate => pixelate(image, (c, h, w), p),
            Corruption::Jpeg => jpeg_quantise(image, (c, h, w), p),
        }
        for v in image.iter_mut() {
            *v = v.clamp(0.0, 1.0);
        }
        Ok(())
    }
}

fn check_severity(severity: usize) -> Result<()> {
    if (1..=5).contains(&severity) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "corruption severity must be 1 to 5, got {severity}"
        )))
    }
}

fn disk_blur(image: &mut [f32], (c, h, w): (usize, usize, usize), radius: f64) {
    let r = radius.ceil() as isize;
    let offsets: Vec<(isize, isize)> = (-r..=r)
        .flat_map(|dy| (-r..=r).map(move |dx| (dy, dx)))
        .filter(|&(dy, dx)| ((dy * dy + dx * dx) as f64) <= radius * radius)
        .collect();
    let source = image.to_vec();
    for ch in 0..c {
        let plane = &source[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let mut sum = 0.0;
                for &(dy, dx) in &offsets {
                    let yy = (y as isize + dy).clamp(0, h as isize - 1) as usize;
                    let xx = (x as isize + dx).clamp(0, w as isize - 1) as usize;
                    sum += plane[yy * w + xx];
                }
                image[ch * h * w + y * w + x] = sum / offsets.len() as f32;
            }
        }
    }
}

fn pixelate(image: &mut [f32], (c, h, w): (usize, usize, usize), factor: f64) {
    let small_h = ((h as f64 * factor).round() as usize).max(1);
    let small_w = ((w as f64 * factor).round() as usize).max(1);
    let source = image.to_vec();
    for ch in 0..c {
        let plane = &source[ch * h * w..(ch + 1) * h * w];
        // Box-average each low-resolution cell, then paint it back at full size.
        let cell = |i: usize, n: usize, big: usize| {
            (i * big / n, ((i + 1) * big / n).max(i * big / n + 1))
        };
        for sy in 0..small_h {
            let (y0, y1) = cell(sy, small_h, h);
            for sx in 0..small_w {
                let (x0, x1) = cell(sx, small_w, w);
                let mut sum = 0.0;
                for y in y0..y1 {
                    for x in x0..x1 {
                        sum += plane[y * w + x];
                    }
                }
                let mean = sum / ((y1 - y0) * (x1 - x0)) as f32;
                for y in y0..y1 {
                    for x in x0..x1 {
                        image[ch * h * w + y * w + x] = mean;
                    }
                }
            }
        }
    }
}

/// The JPEG standard's luminance quantisation table (ITU-T T.81, Annex K).
const LUMINANCE_TABLE: [f32; 64] = [
    16.0, 11.0, 10.0, 16.0, 24.0, 40.0, 51.0, 61.0, 12.0, 12.0, 14.0, 19.0, 26.0, 58.0, 60.0, 55.0,
    14.0, 13.0, 16.0, 24.0, 40.0, 57.0, 69.0, 56.0, 14.0, 17.0, 22.0, 29.0, 51.0, 87.0, 80.0, 62.0,
    18.0, 22.0, 37.0, 56.0, 68.0, 109.0, 103.0, 77.0, 24.0, 35.0, 55.0, 64.0, 81.0, 104.0, 113.0,
    92.0, 49.0, 64.0, 78.0, 87.0, 103.0, 121.0, 120.0, 101.0, 72.0, 92.0, 95.0, 98.0, 112.0, 100.0,
    103.0, 99.0,
];

fn jpeg_quantise(image: &mut [f32], (c, h, w): (usize, usize, usize), quality: f64) {
    // The IJG quality scaling of the quantisation table.
    let scale = if quality < 50.0 {
        5000.0 / quality
    } else {
        200.0 - 2.0 * quality
    };
    let table: Vec<f32> = LUMINANCE_TABLE
        .iter()
        .map(|&q| {
            ((q as f64 * scale + 50.0) / 100.0)
                .floor()
                .clamp(1.0, 255.0) as f32
        })
        .collect();
    let basis: Vec<f32> = (0..64)
        .map(|i| {
            let (u, x) = (i / 8, i % 8);
            let alpha = if u == 0 {
                (1.0f32 / 8.0).sqrt()
            } else {
                (2.0f32 / 8.0).sqrt()
            };
            alpha * (((2 * x + 1) as f32 * u as f32 * std::f32::consts::PI) / 16.0).cos()
        })
        .collect();
    let mut block = [0f32; 64];
    let mut tmp = [0f32; 64];
    for ch in 0..c {
        let plane = &mut image[ch * h * w..(ch + 1) * h * w];
        for by in (0..h).step_by(8) {
            for bx in (0..w).step_by(8) {
                // Gather (edge-replicated) and centre on 0 in the 0..255 range.
                for y in 0..8 {
                    for x in 0..8 {
                        let yy = (by + y).min(h - 1);
                        let xx = (bx + x).min(w - 1);
                        block[y * 8 + x] = plane[yy * w + xx] * 255.0 - 128.0;
                    }
                }
                // Separable 2-D DCT-II: rows then columns.
                dct_1d(&block, &mut tmp, &basis, false, Direction::Forward);
                dct_1d(&tmp, &mut block, &basis, true, Direction::Forward);
                for (v, q) in block.iter_mut().zip(&table) {
                    *v = (*v / q).round() * q;
                }
                // Inverse: the transpose of the orthonormal basis.
                dct_1d(&block, &mut tmp, &basis, true, Direction::Inverse);
                dct_1d(&tmp, &mut block, &basis, false, Direction::Inverse);
                for y in 0..8 {
                    for x in 0..8 {
                        if by + y < h && bx + x < w {
                            plane[(by + y) * w + bx + x] = (block[y * 8 + x] + 128.0) / 255.0;
                        }
                    }
                }
            }
        }
    }
}

/// Which way [`dct_1d`] goes.
#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Inverse,
}

/// Applies the 1-D DCT (or its inverse, with the transposed orthonormal basis) along the rows
/// (`columns == false`) or the columns of an 8x8 block.
fn dct_1d(src: &[f32; 64], dst: &mut [f32; 64], basis: &[f32], columns: bool, dir: Direction) {
    let at = |line: usize, k: usize| if columns { k * 8 + line } else { line * 8 + k };
    for line in 0..8 {
        for out in 0..8 {
            let mut s = 0.0;
            for k in 0..8 {
                let coefficient = match dir {
                    Direction::Forward => basis[out * 8 + k],
                    Direction::Inverse => basis[k * 8 + out],
                };
                s += coefficient * src[at(line, k)];
            }
            dst[at(line, out)] = s;
        }
    }
}

/// A corrupted copy of `data` at `severity` (1-5), drawing noise from `rng`.
pub fn corrupt_dataset(
    data: &ImageDataset,
    corruption: Corruption,
    severity: usize,
    rng: &mut WhviRng,
) -> Result<ImageDataset> {
    check_severity(severity)?;
    let shape = data.shape();
    let mut pixels = vec![0f32; data.image_len()];
    let mut images = Vec::with_capacity(data.images().len());
    for i in 0..data.len() {
        for (p, &v) in pixels.iter_mut().zip(data.image(i)) {
            *p = f32::from(v) / 255.0;
        }
        corruption.apply(&mut pixels, shape, severity, rng)?;
        images.extend(pixels.iter().map(|&v| (v * 255.0).round() as u8));
    }
    let (c, h, w) = shape;
    ImageDataset::new(
        images,
        data.labels().to_vec(),
        c,
        h,
        w,
        data.classes().to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    fn gradient_image() -> Vec<f32> {
        (0..3 * 16 * 16)
            .map(|i| ((i * 7919) % 256) as f32 / 255.0)
            .collect()
    }

    fn mean_abs_change(corruption: Corruption, severity: usize) -> f32 {
        let original = gradient_image();
        let mut image = original.clone();
        corruption
            .apply(&mut image, (3, 16, 16), severity, &mut seeded(1))
            .unwrap();
        image
            .iter()
            .zip(&original)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / image.len() as f32
    }

    #[test]
    fn every_corruption_changes_the_image_more_at_higher_severity() {
        for corruption in Corruption::ALL {
            let low = mean_abs_change(corruption, 1);
            let high = mean_abs_change(corruption, 5);
            assert!(low > 0.0, "{corruption:?} severity 1 changes nothing");
            assert!(
                high > low,
                "{corruption:?}: severity 5 ({high}) <= severity 1 ({low})"
            );
        }
    }

    #[test]
    fn jpeg_at_quality_100_is_nearly_lossless_and_contrast_keeps_the_mean() {
        let original = gradient_image();
        let mut image = original.clone();
        jpeg_quantise(&mut image, (3, 16, 16), 100.0);
        let err = image
            .iter()
            .zip(&original)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 2.0 / 255.0, "{err}");

        let mut image = original.clone();
        Corruption::Contrast
            .apply(&mut image, (3, 16, 16), 3, &mut seeded(0))
            .unwrap();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&image) - mean(&original)).abs() < 1e-4);
    }

    #[test]
    fn names_round_trip_and_bad_severity_is_an_error() {
        for c in Corruption::ALL {
            assert_eq!(Corruption::parse(c.name()).unwrap(), c);
        }
        assert!(Corruption::parse("fog")
            .unwrap_err()
            .to_string()
            .contains("unknown corruption"));
        let mut image = gradient_image();
        for severity in [0, 6, usize::MAX] {
            let err = Corruption::Jpeg
                .apply(&mut image, (3, 16, 16), severity, &mut seeded(0))
                .unwrap_err();
            assert!(err.to_string().contains("1 to 5"), "{err}");
        }
        let err = Corruption::Pixelate
            .apply(&mut image, (3, 16, 15), 2, &mut seeded(0))
            .unwrap_err();
        assert!(err.to_string().contains("not 3x16x15"), "{err}");
        assert_eq!(
            image,
            gradient_image(),
            "a refused corruption changes nothing"
        );
    }
}
