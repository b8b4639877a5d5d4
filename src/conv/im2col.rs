//! The im2col / col2im pair as candle custom ops on the CPU.

use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Unfolds `[B, C, H, W]` into one row per output pixel: `[B, H_out·W_out, C·k_h·k_w]`, row
/// entries in `(c, ky, kx)` order (the order of a `[C_out, C, k_h, k_w]` weight flattened), zero
/// where the kernel overlaps the padding. Its gradient is [`Col2Im`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Im2Col {
    /// Kernel height.
    pub kernel_h: usize,
    /// Kernel width.
    pub kernel_w: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (all four sides).
    pub padding: usize,
}

/// Folds `[B, H_out·W_out, C·k_h·k_w]` columns back onto `[B, C, H, W]`, adding the entries that
/// came from the same input pixel: the adjoint of [`Im2Col`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Col2Im {
    /// The unfolding this op reverses.
    pub unfold: Im2Col,
    /// Channels of the image.
    pub channels: usize,
    /// Height of the image.
    pub height: usize,
    /// Width of the image.
    pub width: usize,
}

/// Sizes shared by both directions, for one image.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    op: Im2Col,
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
}

impl Im2Col {
    /// Output height and width for an `h x w` image, or an error naming the sizes when the
    /// stride is 0 or the kernel does not fit.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (kh, kw) = (self.kernel_h, self.kernel_w);
        if self.stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        let (hp, wp) = (h + 2 * self.padding, w + 2 * self.padding);
        if kh == 0 || kw == 0 || kh > hp || kw > wp {
            bail!(
                "conv2d: a {kh}x{kw} kernel does not fit an input of {h}x{w} with padding {}; \
                 use a larger input or more padding",
                self.padding
            );
        }
        Ok(((hp - kh) / self.stride + 1, (wp - kw) / self.stride + 1))
    }
}

impl Geometry {
    fn new(op: Im2Col, c: usize, h: usize, w: usize) -> Result<Self> {
        let (ho, wo) = op.output_size(h, w)?;
        Ok(Geometry {
            op,
            c,
            h,
            w,
            ho,
            wo,
        })
    }

    fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    fn row_len(&self) -> usize {
        self.c * self.op.kernel_h * self.op.kernel_w
    }

    fn cols_len(&self) -> usize {
        self.ho * self.wo * self.row_len()
    }

    /// The input coordinate of kernel offset `k` at output coordinate `o`, if inside the image.
    #[inline]
    fn source(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.op.stride + k)
            .checked_sub(self.op.padding)
            .filter(|&i| i < len)
    }

    fn unfold<T: Copy + Default>(&self, image: &[T], cols: &mut [T]) {
        let (kh, kw) = (self.op.kernel_h, self.op.kernel_w);
        let mut rows = cols.chunks_exact_mut(self.row_len());
        for oy in 0..self.ho {
            for ox in 0..self.wo {
                let row = rows.next().expect("cols holds ho·wo rows");
                let mut entries = row.iter_mut();
                for c in 0..self.c {
                    let plane = &image[c * self.h * self.w..(c + 1) * self.h * self.w];
                    for ky in 0..kh {
                        let line = self
                            .source(oy, ky, self.h)
                            .map(|iy| &plane[iy * self.w..][..self.w]);
                        for kx in 0..kw {
                            let value = match (line, self.source(ox, kx, self.w)) {
                                (Some(line), Some(ix)) => line[ix],
                                _ => T::default(),
                            };
                            *entries.next().expect("row holds c·kh·kw entries") = value;
                        }
                    }
                }
            }
        }
    }

    fn fold<T: Copy + Default + std::ops::AddAssign>(&self, cols: &[T], image: &mut [T]) {
        let (kh, kw) = (self.op.kernel_h, self.op.kernel_w);
        image.fill(T::default());
        let mut rows = cols.chunks_exact(self.row_len());
        for oy in 0..self.ho {
            for ox in 0..self.wo {
                let row = rows.next().expect("cols holds ho·wo rows");
                let mut entries = row.iter();
                for c in 0..self.c {
                    let plane = &mut image[c * self.h * self.w..(c + 1) * self.h * self.w];
                    for ky in 0..kh {
                        let iy = self.source(oy, ky, self.h);
                        for kx in 0..kw {
                            let value = *entries.next().expect("row holds c·kh·kw entries");
                            if let (Some(iy), Some(ix)) = (iy, self.source(ox, kx, self.w)) {
                                plane[iy * self.w + ix] += value;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The contiguous slice a layout describes, or an error asking for a contiguous tensor.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous; call .contiguous() first"),
    }
}

/// Runs `f(one input item, one output item)` over the batch in parallel.
fn per_item<T: Copy + Default + Send + Sync>(
    src: &[T],
    src_item: usize,
    dst_item: usize,
    batch: usize,
    f: impl Fn(&[T], &mut [T]) + Sync,
) -> Vec<T> {
    let mut dst = vec![T::default(); batch * dst_item];
    if dst_item == 0 {
        return dst;
    }
    dst.par_chunks_mut(dst_item)
        .zip(src.par_chunks(src_item.max(1)))
        .for_each(|(d, s)| f(s, d));
    dst
}

macro_rules! dispatch {
    ($storage:expr, $layout:expr, $name:expr, |$data:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(d) => {
                let $data = contiguous(d, $layout, $name)?;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(d) => {
                let $data = contiguous(d, $layout, $name)?;
                CpuStorage::F64($body)
            }
            CpuStorage::F16(d) => {
                let $data = contiguous(d, $layout, $name)?;
                CpuStorage::F16($body)
            }
            CpuStorage::BF16(d) => {
                let $data = contiguous(d, $layout, $name)?;
                CpuStorage::BF16($body)
            }
            other => bail!(
                "{}: floating-point input expected, got {:?}",
                $name,
                other.dtype()
            ),
        }
    };
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = match *layout.dims() {
            [b, c, h, w] => (b, c, h, w),
            ref dims => bail!("im2col: expected [batch, channels, height, width], got {dims:?}"),
        };
        let geo = Geometry::new(*self, c, h, w)?;
        let out = dispatch!(storage, layout, "im2col", |data| per_item(
            data,
            geo.image_len(),
            geo.cols_len(),
            b,
            |s, d| geo.unfold(s, d)
        ));
        Ok((out, Shape::from((b, geo.ho * geo.wo, geo.row_len()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, c, h, w) = arg.dims4()?;
        let fold = Col2Im {
            unfold: *self,
            channels: c,
            height: h,
            width: w,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&fold)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let geo = Geometry::new(self.unfold, self.channels, self.height, self.width)?;
        let b = match *layout.dims() {
            [b, l, k] if l == geo.ho * geo.wo && k == geo.row_len() => b,
            ref dims => bail!(
                "col2im: expected [batch, {}, {}] columns, got {dims:?}",
                geo.ho * geo.wo,
                geo.row_len()
            ),
        };
        let out = dispatch!(storage, layout, "col2im", |data| per_item(
            data,
            geo.cols_len(),
            geo.image_len(),
            b,
            |s, d| geo.fold(s, d)
        ));
        Ok((out, Shape::from((b, geo.c, geo.h, geo.w))))
    }
}
