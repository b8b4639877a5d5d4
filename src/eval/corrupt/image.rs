//! Image operations the corruptions are built from, on one `h x w` plane of `f32` values or on
//! a channel-major image: border rules, Gaussian filtering, bilinear sampling, the one-sided
//! motion-blur kernel, a diamond-square fractal and the HSV value and saturation channels.

use rand::Rng;

use crate::rng::WhviRng;

/// What a filter reads outside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Border {
    /// The edge pixel repeated: `a a | a b c | c c`.
    Nearest,
    /// Mirrored about the edge, the edge pixel doubled: `b a | a b c | c b`.
    Reflect,
    /// Mirrored about the edge pixel: `c b | a b c | b a`.
    Reflect101,
}

impl Border {
    /// The index inside `0..n` that position `i` reads.
    pub(super) fn index(self, i: isize, n: usize) -> usize {
        let n = n as isize;
        if n == 1 {
            return 0;
        }
        let period = match self {
            Border::Nearest => return i.clamp(0, n - 1) as usize,
            Border::Reflect => 2 * n,
            Border::Reflect101 => 2 * n - 2,
        };
        let m = i.rem_euclid(period);
        let folded = match self {
            Border::Reflect if m >= n => period - 1 - m,
            Border::Reflect101 if m >= n => period - m,
            _ => m,
        };
        folded as usize
    }
}

/// The weights of a sampled Gaussian of standard deviation `sigma`, out to `truncate` standard
/// deviations, summing to 1 (a single 1 for `sigma` 0).
pub(super) fn gaussian_weights(sigma: f64, truncate: f64) -> Vec<f32> {
    let radius = (truncate * sigma + 0.5) as isize;
    if sigma <= 0.0 || radius == 0 {
        return vec![1.0];
    }
    let raw: Vec<f64> = (-radius..=radius)
        .map(|i| (-((i * i) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = raw.iter().sum();
    raw.iter().map(|v| (v / sum) as f32).collect()
}

/// Correlates every `h x w` plane of `image` with the separable kernel `weights` (odd length)
/// along rows and columns.
pub(super) fn separable_filter(
    image: &mut [f32],
    (h, w): (usize, usize),
    weights: &[f32],
    border: Border,
) {
    let r = (weights.len() / 2) as isize;
    let mut line = Vec::new();
    for plane in image.chunks_exact_mut(h * w) {
        for y in 0..h {
            line.clear();
            line.extend_from_slice(&plane[y * w..(y + 1) * w]);
            for x in 0..w {
                plane[y * w + x] = weights
                    .iter()
                    .zip(-r..=r)
                    .map(|(k, d)| k * line[border.index(x as isize + d, w)])
                    .sum();
            }
        }
        for x in 0..w {
            line.clear();
            line.extend((0..h).map(|y| plane[y * w + x]));
            for y in 0..h {
                plane[y * w + x] = weights
                    .iter()
                    .zip(-r..=r)
                    .map(|(k, d)| k * line[border.index(y as isize + d, h)])
                    .sum();
            }
        }
    }
}

/// Gaussian blur of every plane: standard deviation `sigma`, truncated at 4 standard deviations.
pub(super) fn gaussian_blur(image: &mut [f32], (h, w): (usize, usize), sigma: f64, border: Border) {
    separable_filter(image, (h, w), &gaussian_weights(sigma, 4.0), border);
}

/// Correlates every plane with the square kernel `kernel` (`size x size`, `size` odd).
pub(super) fn filter_2d(
    image: &mut [f32],
    (h, w): (usize, usize),
    kernel: &[f32],
    size: usize,
    border: Border,
) {
    let r = (size / 2) as isize;
    for plane in image.chunks_exact_mut(h * w) {
        let source = plane.to_vec();
        for y in 0..h {
            for x in 0..w {
                let mut sum = 0.0;
                for (ky, row) in kernel.chunks_exact(size).enumerate() {
                    let yy = border.index(y as isize + ky as isize - r, h);
                    for (kx, k) in row.iter().enumerate() {
                        sum += k * source[yy * w + border.index(x as isize + kx as isize - r, w)];
                    }
                }
                plane[y * w + x] = sum;
            }
        }
    }
}

/// The value of `plane` at the real position (`y`, `x`), bilinearly interpolated.
pub(super) fn bilinear(
    plane: &[f32],
    (h, w): (usize, usize),
    y: f32,
    x: f32,
    border: Border,
) -> f32 {
    let (y0, x0) = (y.floor(), x.floor());
    let (fy, fx) = (y - y0, x - x0);
    let at = |dy: isize, dx: isize| {
        let yy = border.index(y0 as isize + dy, h);
        let xx = border.index(x0 as isize + dx, w);
        plane[yy * w + xx]
    };
    let top = at(0, 0) * (1.0 - fx) + at(0, 1) * fx;
    let bottom = at(1, 0) * (1.0 - fx) + at(1, 1) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// Every plane magnified by `factor` about its centre, keeping its size (bilinear).
pub(super) fn zoom_about_centre(image: &[f32], (h, w): (usize, usize), factor: f32) -> Vec<f32> {
    let (cy, cx) = ((h as f32 - 1.0) / 2.0, (w as f32 - 1.0) / 2.0);
    let mut out = Vec::with_capacity(image.len());
    for plane in image.chunks_exact(h * w) {
        for y in 0..h {
            for x in 0..w {
                let sy = cy + (y as f32 - cy) / factor;
                let sx = cx + (x as f32 - cx) / factor;
                out.push(bilinear(plane, (h, w), sy, sx, Border::Nearest));
            }
        }
    }
    out
}

/// Motion blur of every plane: a one-sided Gaussian (standard deviation `sigma`) over the
/// `2·ceil(radius) + 1` pixels from each pixel along `angle_degrees` (ImageMagick's
/// direction), edge pixels repeated.
pub(super) fn motion_blur(
    image: &mut [f32],
    (h, w): (usize, usize),
    radius: f64,
    sigma: f64,
    angle_degrees: f64,
) {
    let taps = 2 * radius.ceil() as usize + 1;
    let raw: Vec<f64> = (0..taps)
        .map(|i| (-((i * i) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = raw.iter().sum();
    let (sin, cos) = angle_degrees.to_radians().sin_cos();
    let taps: Vec<(f32, isize, isize)> = raw
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let dy = (i as f64 * sin).round() as isize;
            let dx = (i as f64 * cos).round() as isize;
            ((v / sum) as f32, dy, dx)
        })
        .collect();
    for plane in image.chunks_exact_mut(h * w) {
        let source = plane.to_vec();
        for y in 0..h {
            for x in 0..w {
                plane[y * w + x] = taps
                    .iter()
                    .map(|&(k, dy, dx)| {
                        let yy = Border::Nearest.index(y as isize + dy, h);
                        let xx = Border::Nearest.index(x as isize + dx, w);
                        k * source[yy * w + xx]
                    })
                    .sum();
            }
        }
    }
}

/// A fractal haze by the diamond-square method on an `n x n` torus (`n` a power of two):
/// each midpoint is the mean of its four neighbours plus a uniform draw in `±a²`, where `a`
/// starts at 100 and is divided by `decay` after each halving of the step. Scaled to [0, 1].
pub(super) fn plasma_fractal(n: usize, decay: f64, rng: &mut WhviRng) -> Vec<f32> {
    let mut map = vec![0f64; n * n];
    let mut amplitude = 100.0f64;
    let mut step = n;
    let at = |y: usize, x: usize| (y % n) * n + (x % n);
    while step >= 2 {
        let half = step / 2;
        let mut noise = || amplitude * rng.random_range(-amplitude..amplitude);
        for y in (half..n).step_by(step) {
            for x in (half..n).step_by(step) {
                let corners = map[at(y - half, x - half)]
                    + map[at(y - half, x + half)]
                    + map[at(y + half, x - half)]
                    + map[at(y + half, x + half)];
                map[at(y, x)] = corners / 4.0 + noise();
            }
        }
        for y in (0..n).step_by(half) {
            let first = if (y / half).is_multiple_of(2) {
                half
            } else {
                0
            };
            for x in (first..n).step_by(step) {
                let sides = map[at(y + n - half, x)]
                    + map[at(y + half, x)]
                    + map[at(y, x + n - half)]
                    + map[at(y, x + half)];
                map[at(y, x)] = sides / 4.0 + noise();
            }
        }
        step = half;
        amplitude /= decay;
    }
    let min = map.iter().copied().fold(f64::INFINITY, f64::min);
    let max = map.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = if max > min { max - min } else { 1.0 };
    map.iter().map(|v| ((v - min) / range) as f32).collect()
}

/// Replaces the HSV value (the largest channel) of each pixel of a 3-channel image by
/// `new_value(v)`, keeping hue and saturation; a black pixel becomes grey.
pub(super) fn map_hsv_value(image: &mut [f32], pixels: usize, new_value: impl Fn(f32) -> f32) {
    let (r, rest) = image.split_at_mut(pixels);
    let (g, b) = rest.split_at_mut(pixels);
    for i in 0..pixels {
        let v = r[i].max(g[i]).max(b[i]);
        let v2 = new_value(v);
        if v > 0.0 {
            let scale = v2 / v;
            r[i] *= scale;
            g[i] *= scale;
            b[i] *= scale;
        } else {
            (r[i], g[i], b[i]) = (v2, v2, v2);
        }
    }
}

/// Replaces the HSV saturation of each pixel of a 3-channel image by `new_saturation(s)`,
/// keeping hue and value; a grey pixel (no hue) takes hue 0, red, as HSV conversions do.
pub(super) fn map_hsv_saturation(
    image: &mut [f32],
    pixels: usize,
    new_saturation: impl Fn(f32) -> f32,
) {
    let (r, rest) = image.split_at_mut(pixels);
    let (g, b) = rest.split_at_mut(pixels);
    for i in 0..pixels {
        let v = r[i].max(g[i]).max(b[i]);
        if v <= 0.0 {
            continue;
        }
        let min = r[i].min(g[i]).min(b[i]);
        let s = (v - min) / v;
        let s2 = new_saturation(s);
        if s > 0.0 {
            // Each channel is v·(1 - s·t) for a hue-dependent t: keep t, change s.
            for c in [&mut r[i], &mut g[i], &mut b[i]] {
                *c = v - (v - *c) * s2 / s;
            }
        } else {
            (g[i], b[i]) = (v * (1.0 - s2), v * (1.0 - s2));
        }
    }
}

/// The luma of a 3-channel image (ITU-R BT.601 weights), one plane.
pub(super) fn luma(image: &[f32], pixels: usize) -> Vec<f32> {
    (0..pixels)
        .map(|i| 0.299 * image[i] + 0.587 * image[pixels + i] + 0.114 * image[2 * pixels + i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::seeded;

    #[test]
    fn borders_read_the_documented_pixels() {
        let read = |b: Border| -> Vec<usize> { (-2..5).map(|i| b.index(i, 3)).collect() };
        assert_eq!(read(Border::Nearest), [0, 0, 0, 1, 2, 2, 2]);
        assert_eq!(read(Border::Reflect), [1, 0, 0, 1, 2, 2, 1]);
        assert_eq!(read(Border::Reflect101), [2, 1, 0, 1, 2, 1, 0]);
    }

    #[test]
    fn filters_keep_a_constant_image_and_blur_a_spike() {
        let mut flat = vec![0.5f32; 2 * 8 * 8];
        gaussian_blur(&mut flat, (8, 8), 1.0, Border::Reflect);
        motion_blur(&mut flat, (8, 8), 3.0, 1.5, 30.0);
        assert!(flat.iter().all(|v| (v - 0.5).abs() < 1e-6));
        let mut spike = vec![0f32; 9 * 9];
        spike[4 * 9 + 4] = 1.0;
        gaussian_blur(&mut spike, (9, 9), 1.0, Border::Nearest);
        let total: f32 = spike.iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "mass kept: {total}");
        assert!(spike[4 * 9 + 4] < 0.2 && spike[4 * 9 + 5] == spike[4 * 9 + 3]);
        // Motion blur along 0 degrees spreads only along the row, to one side.
        let mut spike = vec![0f32; 9 * 9];
        spike[4 * 9 + 4] = 1.0;
        motion_blur(&mut spike, (9, 9), 2.0, 1.0, 0.0);
        // Each pixel reads the ones ahead of it, so the spike spreads to the pixels behind.
        assert!(spike[4 * 9 + 3] > 0.0 && spike[4 * 9 + 5] == 0.0 && spike[5 * 9 + 4] == 0.0);
    }

    #[test]
    fn zoom_by_one_is_the_identity_and_plasma_spans_zero_to_one() {
        let image: Vec<f32> = (0..3 * 6 * 6).map(|i| i as f32 / 108.0).collect();
        assert_eq!(zoom_about_centre(&image, (6, 6), 1.0), image);
        let map = plasma_fractal(32, 2.0, &mut seeded(1));
        let (min, max) = map
            .iter()
            .fold((1f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        assert_eq!((min, max), (0.0, 1.0));
        assert_eq!(map, plasma_fractal(32, 2.0, &mut seeded(1)), "seeded");
    }

    #[test]
    fn hsv_maps_keep_hue() {
        // (0.8, 0.4, 0.2): value 0.8, saturation 0.75.
        let mut image = vec![0.8, 0.4, 0.2];
        map_hsv_value(&mut image, 1, |v| v / 2.0);
        assert_eq!(image, [0.4, 0.2, 0.1]);
        let mut image = vec![0.8, 0.4, 0.2];
        map_hsv_saturation(&mut image, 1, |_| 0.0);
        assert_eq!(image, [0.8, 0.8, 0.8]);
        let mut image = vec![0.8f32, 0.4, 0.2];
        map_hsv_saturation(&mut image, 1, |s| s / 1.5);
        // saturation 0.5 at value 0.8: the smallest channel is 0.4.
        assert!(
            (image[2] - 0.4).abs() < 1e-6 && (image[0] - 0.8).abs() < 1e-6,
            "{image:?}"
        );
    }
}
