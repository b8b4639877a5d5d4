//! Convolution geometry and the im2col / col2im pair for one image.
//!
//! The columns of an image are a `K x L` matrix (`K = C·k_h·k_w` kernel taps, `L = H_out·W_out`
//! output pixels), row `(c, ky, kx)` holding the input pixel each output pixel sees through that
//! tap. In this orientation the forward product `W · cols` lands directly in the image's
//! `[C_out, H_out·W_out]` block of an NCHW output, and each row is filled by whole-line copies
//! (stride 1) rather than element by element.

use std::ops::Range;

use candle_core::{bail, Result};

use super::ConvGeometry;

/// The sizes of one convolution: input image, kernel, stride, padding and output image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvShape {
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) kernel_h: usize,
    pub(crate) kernel_w: usize,
    pub(crate) geo: ConvGeometry,
    pub(crate) out_h: usize,
    pub(crate) out_w: usize,
}

impl ConvShape {
    /// The shape for a `channels x height x width` image and a `kernel_h x kernel_w` kernel, or
    /// an error naming the sizes when the stride is 0 or the kernel does not fit.
    pub(crate) fn new(
        [channels, height, width]: [usize; 3],
        [kernel_h, kernel_w]: [usize; 2],
        geo: ConvGeometry,
    ) -> Result<Self> {
        if geo.stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        let (hp, wp) = (height + 2 * geo.padding, width + 2 * geo.padding);
        if kernel_h == 0 || kernel_w == 0 || kernel_h > hp || kernel_w > wp {
            bail!(
                "conv2d: a {kernel_h}x{kernel_w} kernel does not fit an input of {height}x{width} \
                 with padding {}; use a larger input or more padding",
                geo.padding
            );
        }
        Ok(ConvShape {
            channels,
            height,
            width,
            kernel_h,
            kernel_w,
            geo,
            out_h: (hp - kernel_h) / geo.stride + 1,
            out_w: (wp - kernel_w) / geo.stride + 1,
        })
    }

    /// Elements of one input image.
    pub(crate) fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Kernel taps per output pixel, `K = C·k_h·k_w`.
    pub(crate) fn taps(&self) -> usize {
        self.channels * self.kernel_h * self.kernel_w
    }

    /// Output pixels per image, `L = H_out·W_out`.
    pub(crate) fn pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// The output coordinates `lo..hi` (of `outputs`) whose input coordinate `o·stride + tap -
    /// padding` lies inside `0..len`.
    fn valid_outputs(&self, tap: usize, len: usize, outputs: usize) -> (usize, usize) {
        let (s, p) = (self.geo.stride, self.geo.padding);
        let lo = p.saturating_sub(tap).div_ceil(s).min(outputs);
        let hi = (len + p).saturating_sub(tap).div_ceil(s).clamp(lo, outputs);
        (lo, hi)
    }

    /// Calls `f(row, output line oy, input line iy or None, ox range inside the image)` for
    /// the output lines `lines` of every kernel tap.
    fn for_each_line(
        &self,
        lines: Range<usize>,
        mut f: impl FnMut(usize, usize, Option<usize>, usize, usize, usize),
    ) {
        let (s, p) = (self.geo.stride, self.geo.padding);
        for c in 0..self.channels {
            for ky in 0..self.kernel_h {
                let (y_lo, y_hi) = self.valid_outputs(ky, self.height, self.out_h);
                for kx in 0..self.kernel_w {
                    let row = (c * self.kernel_h + ky) * self.kernel_w + kx;
                    let (x_lo, x_hi) = self.valid_outputs(kx, self.width, self.out_w);
                    for oy in lines.clone() {
                        let iy = (y_lo..y_hi)
                            .contains(&oy)
                            .then(|| c * self.height + oy * s + ky - p);
                        f(row, oy, iy, kx, x_lo, x_hi);
                    }
                }
            }
        }
    }

    /// Writes the columns of output lines `lines` of `image` into `cols`, a `K x ld` row-major
    /// buffer, from column `offset` (so that several images or bands can sit side by side).
    pub(crate) fn im2col<T: Copy + Default>(
        &self,
        image: &[T],
        lines: Range<usize>,
        cols: &mut [T],
        ld: usize,
        offset: usize,
    ) {
        let (s, p, w, wo) = (self.geo.stride, self.geo.padding, self.width, self.out_w);
        let first = lines.start;
        self.for_each_line(lines, |row, oy, iy, kx, lo, hi| {
            let out = &mut cols[row * ld + offset + (oy - first) * wo..][..wo];
            let Some(iy) = iy else {
                out.fill(T::default());
                return;
            };
            let line = &image[iy * w..][..w];
            out[..lo].fill(T::default());
            out[hi..].fill(T::default());
            if s == 1 {
                out[lo..hi].copy_from_slice(&line[lo + kx - p..hi + kx - p]);
            } else {
                for (ox, v) in out.iter_mut().enumerate().take(hi).skip(lo) {
                    *v = line[ox * s + kx - p];
                }
            }
        });
    }

    /// Adds the columns of output lines `lines` in `cols` (`K x ld`, from column `offset`) onto
    /// `image`: the adjoint of [`ConvShape::im2col`].
    pub(crate) fn col2im_add<T: Copy + std::ops::AddAssign>(
        &self,
        cols: &[T],
        ld: usize,
        offset: usize,
        lines: Range<usize>,
        image: &mut [T],
    ) {
        let (s, p, w, wo) = (self.geo.stride, self.geo.padding, self.width, self.out_w);
        let first = lines.start;
        self.for_each_line(lines, |row, oy, iy, kx, lo, hi| {
            let Some(iy) = iy else { return };
            let src = &cols[row * ld + offset + (oy - first) * wo..][..wo];
            let line = &mut image[iy * w..][..w];
            if s == 1 {
                for (d, &v) in line[lo + kx - p..hi + kx - p].iter_mut().zip(&src[lo..hi]) {
                    *d += v;
                }
            } else {
                for (ox, &v) in src.iter().enumerate().take(hi).skip(lo) {
                    line[ox * s + kx - p] += v;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// im2col by the definition, one element at a time.
    fn reference(shape: &ConvShape, image: &[f32]) -> Vec<f32> {
        let (s, p) = (shape.geo.stride as isize, shape.geo.padding as isize);
        let mut cols = vec![0.0; shape.taps() * shape.pixels()];
        for c in 0..shape.channels {
            for ky in 0..shape.kernel_h {
                for kx in 0..shape.kernel_w {
                    let row = (c * shape.kernel_h + ky) * shape.kernel_w + kx;
                    for oy in 0..shape.out_h {
                        for ox in 0..shape.out_w {
                            let iy = oy as isize * s + ky as isize - p;
                            let ix = ox as isize * s + kx as isize - p;
                            let inside = (0..shape.height as isize).contains(&iy)
                                && (0..shape.width as isize).contains(&ix);
                            if inside {
                                cols[row * shape.pixels() + oy * shape.out_w + ox] = image
                                    [(c * shape.height + iy as usize) * shape.width + ix as usize];
                            }
                        }
                    }
                }
            }
        }
        cols
    }

    #[test]
    fn columns_match_the_definition_and_col2im_is_their_adjoint() {
        for (kernel, stride, padding) in [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 2, 2), (2, 3, 0)] {
            for [h, w] in [[7, 5], [4, 9], [5, 5]] {
                let geo = ConvGeometry { stride, padding };
                let Ok(shape) = ConvShape::new([2, h, w], [kernel, kernel], geo) else {
                    continue;
                };
                let image: Vec<f32> = (0..shape.image_len()).map(|i| i as f32 + 1.0).collect();
                let l = shape.pixels();
                // Two images side by side, this one second.
                let ld = 2 * l;
                let mut cols = vec![f32::NAN; shape.taps() * ld];
                shape.im2col(&image, 0..shape.out_h, &mut cols, ld, l);
                let expected = reference(&shape, &image);
                for row in 0..shape.taps() {
                    assert_eq!(
                        &cols[row * ld + l..][..l],
                        &expected[row * l..][..l],
                        "k={kernel} s={stride} p={padding} {h}x{w} row {row}"
                    );
                }
                // Bands of output lines give the same columns as the whole image.
                let wo = shape.out_w;
                for band in [0..1, 1..shape.out_h, 0..shape.out_h] {
                    let n = band.len() * wo;
                    let mut part = vec![f32::NAN; shape.taps() * n];
                    shape.im2col(&image, band.clone(), &mut part, n, 0);
                    for row in 0..shape.taps() {
                        assert_eq!(
                            &part[row * n..][..n],
                            &expected[row * l + band.start * wo..][..n],
                            "band {band:?}"
                        );
                    }
                    // col2im of a band adds only that band's columns.
                    let mut from_band = vec![0.0f32; shape.image_len()];
                    shape.col2im_add(&part, n, 0, band.clone(), &mut from_band);
                    let mut from_whole = vec![0.0f32; shape.image_len()];
                    let mut masked = vec![0.0f32; shape.taps() * l];
                    for row in 0..shape.taps() {
                        masked[row * l + band.start * wo..][..n]
                            .copy_from_slice(&part[row * n..][..n]);
                    }
                    shape.col2im_add(&masked, l, 0, 0..shape.out_h, &mut from_whole);
                    assert_eq!(from_band, from_whole, "col2im of band {band:?}");
                }
                // <im2col(x), c> == <x, col2im(c)> for an arbitrary c.
                let c: Vec<f32> = (0..shape.taps() * ld)
                    .map(|i| (i % 7) as f32 - 3.0)
                    .collect();
                let mut back = vec![0.0f32; shape.image_len()];
                shape.col2im_add(&c, ld, l, 0..shape.out_h, &mut back);
                let lhs: f32 = (0..shape.taps())
                    .flat_map(|r| (0..l).map(move |j| (r, j)))
                    .map(|(r, j)| cols[r * ld + l + j] * c[r * ld + l + j])
                    .sum();
                let rhs: f32 = image.iter().zip(&back).map(|(a, b)| a * b).sum();
                assert_eq!(
                    lhs, rhs,
                    "adjoint, k={kernel} s={stride} p={padding} {h}x{w}"
                );
            }
        }
    }
}
