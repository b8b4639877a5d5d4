//! The CPU convolution op: forward and both gradients as gemms over images' columns.
//!
//! The batch is split into one contiguous range of images per thread; each thread unfolds an
//! image (or a small group of images, for the late layers whose outputs have few pixels) into
//! a columns buffer that stays in its cache, and runs single-threaded products on it. Nothing
//! of the size of the whole batch's columns is ever built, and the threads only meet at the
//! end, where the weight gradient's per-thread parts are summed in a fixed order (so that a
//! run is reproducible for a given thread count).

use std::any::Any;
use std::ops::Range;
use std::sync::Mutex;

use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::matmul::{matmul, MatRef};
use super::unfold::ConvShape;
use super::winograd::{Filters, TransformedFilters, Winograd};
use super::ConvGeometry;
use crate::cpu::{slice, with_slices};

/// Below this many output pixels per image, images are grouped so that each product has at
/// least this many columns: a product a few columns wide leaves gemm's microkernel idle.
const MIN_GEMM_COLUMNS: usize = 128;

/// The largest columns buffer (f32) of one band of output lines: most of a core's L2.
const BAND_BYTES: usize = 384 << 10;

/// A convolution of a batch: `y = conv(x, W) (+ bias)`, applied through `apply_op2` (no bias)
/// or `apply_op3` (bias).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dOp {
    pub(crate) shape: ConvShape,
    pub(crate) batch: usize,
    pub(crate) out_channels: usize,
    /// One filter bank per image (`W` is `[B, C_out, C_in, k_h, k_w]`).
    pub(crate) per_example: bool,
}

/// How the batch is cut into per-thread tasks and per-product groups of images.
#[derive(Debug, Clone, Copy)]
struct Split {
    /// Images unfolded side by side into one product.
    group: usize,
    /// Images per task (a multiple of `group`).
    task_images: usize,
    /// Output lines per band when images are not grouped: a band's columns stay in the
    /// core's L2 cache between im2col and the product.
    band_lines: usize,
    /// Threads each product may use: all of them when there is a single task.
    product_threads: usize,
}

/// The output pixels of one product: lines `lines` of `images` consecutive images from `first`.
#[derive(Debug, Clone)]
struct Block {
    first: usize,
    images: usize,
    lines: Range<usize>,
}

impl Conv2dOp {
    fn split(&self) -> Split {
        let threads = rayon::current_num_threads().max(1);
        let batch = self.batch.max(1);
        let group = if self.per_example {
            1
        } else {
            MIN_GEMM_COLUMNS
                .div_ceil(self.shape.pixels().max(1))
                .min(batch)
        };
        let groups = batch.div_ceil(group);
        let groups_per_task = groups.div_ceil(threads.min(groups));
        let tasks = groups.div_ceil(groups_per_task);
        let line_bytes = self.shape.taps() * self.shape.out_w * std::mem::size_of::<f32>();
        Split {
            group,
            task_images: groups_per_task * group,
            band_lines: (BAND_BYTES / line_bytes.max(1)).clamp(1, self.shape.out_h.max(1)),
            product_threads: if tasks == 1 { threads } else { 1 },
        }
    }

    fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.shape.pixels()
    }

    fn weight_len(&self) -> usize {
        self.out_channels * self.shape.taps()
    }

    /// The filter bank of image `b`, `[C_out, K]`.
    fn weights_of<'a, T>(&self, w: &'a [T], b: usize) -> MatRef<'a, T> {
        let n = self.weight_len();
        let bank = if self.per_example {
            &w[b * n..][..n]
        } else {
            &w[..n]
        };
        MatRef::row_major(bank, self.out_channels, self.shape.taps())
    }

    /// The blocks of output pixels, one product each, of the images `images`: groups of whole
    /// images, or bands of output lines of one image.
    fn blocks(&self, split: Split, images: Range<usize>) -> impl Iterator<Item = Block> + '_ {
        let out_h = self.shape.out_h;
        let bands = if split.group > 1 {
            out_h
        } else {
            split.band_lines
        };
        images.clone().step_by(split.group).flat_map(move |first| {
            let count = split.group.min(images.end - first);
            (0..out_h).step_by(bands).map(move |top| Block {
                first,
                images: count,
                lines: top..(top + bands).min(out_h),
            })
        })
    }

    /// The `[K, block pixels]` columns of a block of `x`, written into `cols`.
    fn columns<'a, T: Copy + Default>(
        &self,
        cols: &'a mut [T],
        x: &[T],
        block: &Block,
    ) -> MatRef<'a, T> {
        let (image, k) = (self.shape.image_len(), self.shape.taps());
        let (ld, per_image) = (self.block_pixels(block), self.image_pixels(block));
        for j in 0..block.images {
            let src = &x[(block.first + j) * image..][..image];
            self.shape
                .im2col(src, block.lines.clone(), cols, ld, j * per_image);
        }
        MatRef::row_major(&cols[..k * ld], k, ld)
    }

    /// `dy` of a block as one `[C_out, block pixels]` matrix: a view into `dy` for a band of one
    /// image, else gathered side by side into `gathered`.
    fn output_block<'a, T: Copy>(
        &self,
        gathered: &'a mut [T],
        dy: &'a [T],
        block: &Block,
    ) -> MatRef<'a, T> {
        let (co, l, wo) = (self.out_channels, self.shape.pixels(), self.shape.out_w);
        let ld = self.block_pixels(block);
        if block.images == 1 {
            let image = &dy[block.first * co * l..][..co * l];
            return MatRef::strided(&image[block.lines.start * wo..], co, ld, l);
        }
        for j in 0..block.images {
            for c in 0..co {
                gathered[c * ld + j * l..][..l]
                    .copy_from_slice(&dy[((block.first + j) * co + c) * l..][..l]);
            }
        }
        MatRef::row_major(&gathered[..co * ld], co, ld)
    }

    /// Output pixels of one image of a block.
    fn image_pixels(&self, block: &Block) -> usize {
        block.lines.len() * self.shape.out_w
    }

    /// Output pixels of a block (the columns of its product).
    fn block_pixels(&self, block: &Block) -> usize {
        block.images * self.image_pixels(block)
    }

    /// `y = conv(x, W) (+ bias)`: by Winograd's transform where it applies, else by columns.
    /// With `keep`, a Winograd forward leaves its transformed filters there when the input
    /// gradient's convolution can read them.
    fn forward<T: WithDType + Default>(
        &self,
        x: &[T],
        w: &[T],
        bias: Option<&[T]>,
        keep: Option<&FilterCache>,
    ) -> Vec<T> {
        let Some(plan) = Winograd::plan(self) else {
            return self.forward_by_columns(x, w, bias);
        };
        let filters = plan.transform_filters(w);
        let y = plan.forward(x, Filters::Own(&filters), bias);
        if let Some(cache) = keep {
            let readable = self
                .transposed_winograd()
                .is_some_and(|t| t.takes(Filters::Flipped(&filters)));
            if readable {
                cache.put(filters);
            }
        }
        y
    }

    fn forward_by_columns<T: WithDType + Default>(
        &self,
        x: &[T],
        w: &[T],
        bias: Option<&[T]>,
    ) -> Vec<T> {
        let (co, l) = (self.out_channels, self.shape.pixels());
        let split = self.split();
        let mut y = vec![T::default(); self.output_len()];
        if y.is_empty() {
            return y;
        }
        y.par_chunks_mut(split.task_images * co * l)
            .enumerate()
            .for_each(|(task, y_task)| {
                let mut space = Workspace::new(self, split);
                let first = task * split.task_images;
                let images = first..first + y_task.len() / (co * l);
                for block in self.blocks(split, images) {
                    let cols = self.columns(&mut space.cols, x, &block);
                    let filters = self.weights_of(w, block.first);
                    let out =
                        &mut y_task[(block.first - first) * co * l..][..block.images * co * l];
                    let threads = split.product_threads;
                    if block.images == 1 {
                        // The product lands in the band's columns of the image's [C_out, L]
                        // block of the output.
                        let start = block.lines.start * self.shape.out_w;
                        let ld = self.block_pixels(&block);
                        if let Some(bias) = bias {
                            for (plane, &b) in out.chunks_exact_mut(l).zip(bias) {
                                plane[start..start + ld].fill(b);
                            }
                        }
                        matmul(&mut out[start..], l, filters, cols, bias.is_some(), threads);
                    } else {
                        let ld = self.block_pixels(&block);
                        let product = &mut space.gathered[..co * ld];
                        matmul(product, ld, filters, cols, false, threads);
                        for (j, image) in out.chunks_exact_mut(co * l).enumerate() {
                            for (c, plane) in image.chunks_exact_mut(l).enumerate() {
                                let src = &product[c * ld + j * l..][..l];
                                let b = bias.map_or(T::default(), |b| b[c]);
                                for (d, &s) in plane.iter_mut().zip(src) {
                                    *d = s + b;
                                }
                            }
                        }
                    }
                }
            });
        y
    }

    /// The weight gradient (`[C_out, K]`, or `[B, C_out, K]` per example) and, when asked, the
    /// bias gradient (`[C_out]`).
    fn weight_grad<T: WithDType + Default>(
        &self,
        x: &[T],
        dy: &[T],
        with_bias: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        match Winograd::plan(self) {
            Some(plan) => plan.weight_grad(x, dy, with_bias),
            None => self.weight_grad_by_columns(x, dy, with_bias),
        }
    }

    fn weight_grad_by_columns<T: WithDType + Default>(
        &self,
        x: &[T],
        dy: &[T],
        with_bias: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let (co, k) = (self.out_channels, self.shape.taps());
        let split = self.split();
        let tasks = self.batch.div_ceil(split.task_images);
        if tasks == 0 {
            // An empty batch: the gradients of shared weights and bias are zero.
            let banks = if self.per_example { 0 } else { co * k };
            return (
                vec![T::default(); banks],
                with_bias.then(|| vec![T::default(); co]),
            );
        }
        // Per example, each task writes its images' banks in place; with shared weights each
        // task sums into its own part, and the parts are added below in task order. Each task
        // also sums its part of the bias gradient.
        let part = if self.per_example {
            split.task_images * co * k
        } else {
            co * k
        };
        let banks = if self.per_example { self.batch } else { tasks };
        let mut dw = vec![T::default(); banks * co * k];
        let mut db_parts = vec![T::default(); tasks * co];
        dw.par_chunks_mut(part)
            .zip(db_parts.par_chunks_mut(co))
            .enumerate()
            .for_each(|(task, (dw, db))| {
                let mut space = Workspace::new(self, split);
                let first = task * split.task_images;
                let last = (first + split.task_images).min(self.batch);
                for block in self.blocks(split, first..last) {
                    let cols = self.columns(&mut space.cols, x, &block);
                    let grad = self.output_block(&mut space.gathered, dy, &block);
                    if with_bias {
                        for (c, sum) in db.iter_mut().enumerate() {
                            *sum += super::plane_sum(grad.row(c));
                        }
                    }
                    let dw = if self.per_example {
                        &mut dw[(block.first - first) * co * k..][..co * k]
                    } else {
                        &mut dw[..]
                    };
                    matmul(dw, k, grad, cols.t(), true, split.product_threads);
                }
            });
        if !self.per_example {
            let (total, rest) = dw.split_at_mut(co * k);
            for part in rest.chunks_exact(co * k) {
                for (d, &v) in total.iter_mut().zip(part) {
                    *d += v;
                }
            }
            dw.truncate(co * k);
        }
        let mut db = vec![T::default(); co];
        for part in db_parts.chunks_exact(co) {
            for (d, &v) in db.iter_mut().zip(part) {
                *d += v;
            }
        }
        (dw, with_bias.then_some(db))
    }

    /// The input gradient, `[B, C_in, H, W]`: as a forward convolution of `dy` when the
    /// convolution is its own kind of transpose, else by gemm and col2im. `kept` are the
    /// forward's transformed filters, if it kept them: a Winograd input gradient reads them
    /// flipped instead of flipping and transforming `W` again.
    fn input_grad<T: WithDType + Default>(
        &self,
        w: &[T],
        dy: &[T],
        kept: Option<&TransformedFilters<T>>,
    ) -> Vec<T> {
        let Some(transposed) = self.transposed() else {
            return self.input_grad_by_col2im(w, dy);
        };
        // The forward kept them only where this convolution's Winograd plan reads them.
        match (kept, Winograd::plan(&transposed)) {
            (Some(kept), Some(plan)) => plan.forward(dy, Filters::Flipped(kept), None),
            _ => transposed.forward(dy, &self.flipped_filters(w), None, None),
        }
    }

    /// The Winograd plan of the input gradient's convolution, if it takes that path.
    fn transposed_winograd(&self) -> Option<Winograd> {
        self.transposed().as_ref().and_then(Winograd::plan)
    }

    /// For a stride-1 convolution with a square `k x k` kernel and padding `p < k`, the input
    /// gradient is the convolution of `dy` with the filters flipped and their channels swapped,
    /// at padding `k - 1 - p`: a product shaped like the forward one (`C_in x C_out·k²` filters),
    /// whose output is the NCHW gradient itself, with no col2im and no zeroed accumulator.
    fn transposed(&self) -> Option<Conv2dOp> {
        let s = &self.shape;
        let k = s.kernel_h;
        if s.geo.stride != 1 || s.kernel_w != k || s.geo.padding >= k {
            return None;
        }
        let geo = ConvGeometry {
            stride: 1,
            padding: k - 1 - s.geo.padding,
        };
        let shape = ConvShape::new([self.out_channels, s.out_h, s.out_w], [k, k], geo).ok()?;
        // Stride 1 maps the output size back onto the input size exactly.
        debug_assert_eq!((shape.out_h, shape.out_w), (s.height, s.width));
        Some(Conv2dOp {
            shape,
            batch: self.batch,
            out_channels: s.channels,
            per_example: self.per_example,
        })
    }

    /// `W'[c, o, ky, kx] = W[o, c, k-1-ky, k-1-kx]` for every filter bank.
    fn flipped_filters<T: Copy>(&self, w: &[T]) -> Vec<T> {
        let (co, ci) = (self.out_channels, self.shape.channels);
        let (kh, kw) = (self.shape.kernel_h, self.shape.kernel_w);
        let bank = co * ci * kh * kw;
        let mut flipped = Vec::with_capacity(w.len());
        for filters in w.chunks_exact(bank) {
            for c in 0..ci {
                for o in 0..co {
                    for ky in (0..kh).rev() {
                        for kx in (0..kw).rev() {
                            flipped.push(filters[((o * ci + c) * kh + ky) * kw + kx]);
                        }
                    }
                }
            }
        }
        flipped
    }

    /// The input gradient as `col2im(Wᵀ · dy)`, for any stride and padding.
    fn input_grad_by_col2im<T: WithDType + Default>(&self, w: &[T], dy: &[T]) -> Vec<T> {
        let k = self.shape.taps();
        let image = self.shape.image_len();
        let split = self.split();
        let mut dx = vec![T::default(); self.batch * image];
        if dx.is_empty() {
            return dx;
        }
        dx.par_chunks_mut(split.task_images * image)
            .enumerate()
            .for_each(|(task, dx_task)| {
                let mut space = Workspace::new(self, split);
                let first = task * split.task_images;
                let images = first..first + dx_task.len() / image;
                for block in self.blocks(split, images) {
                    let (ld, per_image) = (self.block_pixels(&block), self.image_pixels(&block));
                    let grad = self.output_block(&mut space.gathered, dy, &block);
                    let filters = self.weights_of(w, block.first).t();
                    let cols = &mut space.cols[..k * ld];
                    matmul(cols, ld, filters, grad, false, split.product_threads);
                    let out = &mut dx_task[(block.first - first) * image..][..block.images * image];
                    for (j, dx_image) in out.chunks_exact_mut(image).enumerate() {
                        let lines = block.lines.clone();
                        self.shape
                            .col2im_add(cols, ld, j * per_image, lines, dx_image);
                    }
                }
            });
        dx
    }

    fn check_dims(&self, x: &Layout, w: &Layout, bias: Option<&Layout>) -> Result<()> {
        let s = &self.shape;
        let x_dims = [self.batch, s.channels, s.height, s.width];
        let mut w_dims = vec![self.out_channels, s.channels, s.kernel_h, s.kernel_w];
        if self.per_example {
            w_dims.insert(0, self.batch);
        }
        if x.dims() != x_dims || w.dims() != w_dims {
            bail!(
                "conv2d op: expected input {x_dims:?} and weight {w_dims:?}, got {:?} and {:?}",
                x.dims(),
                w.dims()
            );
        }
        if let Some(b) = bias {
            if b.dims() != [self.out_channels] {
                bail!(
                    "conv2d op: expected bias [{}], got {:?}",
                    self.out_channels,
                    b.dims()
                );
            }
        }
        Ok(())
    }

    fn cpu_forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
        keep: Option<&FilterCache>,
    ) -> Result<(CpuStorage, Shape)> {
        self.check_dims(x.1, w.1, bias.map(|b| b.1))?;
        fn run<T: WithDType + Default>(
            op: &Conv2dOp,
            x: (&CpuStorage, &Layout),
            w: (&CpuStorage, &Layout),
            bias: Option<(&CpuStorage, &Layout)>,
            keep: Option<&FilterCache>,
        ) -> Result<Vec<T>> {
            let bias = match bias {
                Some((s, l)) => Some(slice::<T>(s, l, "conv2d")?),
                None => None,
            };
            Ok(op.forward(
                slice::<T>(x.0, x.1, "conv2d")?,
                slice::<T>(w.0, w.1, "conv2d")?,
                bias,
                keep,
            ))
        }
        let y = match x.0 {
            CpuStorage::F32(_) => CpuStorage::F32(run::<f32>(self, x, w, bias, keep)?),
            CpuStorage::F64(_) => CpuStorage::F64(run::<f64>(self, x, w, bias, keep)?),
            other => bail!(
                "conv2d op: f32 or f64 expected, got {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        let s = &self.shape;
        Ok((
            y,
            Shape::from((self.batch, self.out_channels, s.out_h, s.out_w)),
        ))
    }

    /// Gradients of `x`, `W` and the bias, each only where that input takes part in backprop
    /// (the first layer's input is data: its gradient is never formed).
    fn gradients(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        dy: &Tensor,
        kept: Option<&FilterCache>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let wanted = Wanted {
            input: x.track_op(),
            weight: w.track_op(),
            bias: bias.is_some_and(|b| b.track_op()),
        };
        match x.dtype() {
            DType::F32 => {
                let kept = kept.and_then(FilterCache::take);
                self.typed_gradients::<f32>(x, w, &dy, wanted, kept)
            }
            DType::F64 => {
                let kept = kept.and_then(FilterCache::take);
                self.typed_gradients::<f64>(x, w, &dy, wanted, kept)
            }
            other => bail!("conv2d backward: f32 or f64 expected, got {other:?}"),
        }
    }

    fn typed_gradients<T: WithDType + Default>(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        wanted: Wanted,
        kept: Option<TransformedFilters<T>>,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = with_slices::<T, _>("conv2d backward", &[x, w, dy], |data| {
            let [x, w, dy] = [data[0], data[1], data[2]];
            let dx = wanted.input.then(|| self.input_grad(w, dy, kept.as_ref()));
            let (dw, db) = if wanted.weight || wanted.bias {
                let (dw, db) = self.weight_grad(x, dy, wanted.bias);
                (wanted.weight.then_some(dw), db)
            } else {
                (None, None)
            };
            (dx, dw, db)
        })?;
        let device = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), device))
                .transpose()?,
            dw.map(|v| Tensor::from_vec(v, w.shape(), device))
                .transpose()?,
            db.map(|v| Tensor::from_vec(v, self.out_channels, device))
                .transpose()?,
        ))
    }
}

/// Which gradients backprop needs.
#[derive(Debug, Clone, Copy)]
struct Wanted {
    input: bool,
    weight: bool,
    bias: bool,
}

/// Per-thread buffers: the columns of a block, and a `[C_out, block pixels]` matrix for the
/// products whose output (or input) is not a view of an NCHW tensor.
struct Workspace<T> {
    cols: Vec<T>,
    gathered: Vec<T>,
}

impl<T: WithDType + Default> Workspace<T> {
    fn new(op: &Conv2dOp, split: Split) -> Self {
        let (l, wo) = (op.shape.pixels(), op.shape.out_w);
        let pixels = if split.group > 1 {
            split.group * l
        } else {
            split.band_lines * wo
        };
        Workspace {
            cols: vec![T::default(); op.shape.taps() * pixels],
            gathered: if split.group > 1 {
                vec![T::default(); op.out_channels * pixels]
            } else {
                Vec::new()
            },
        }
    }
}

/// Room for the transformed filters of one forward call, kept for its backward pass. Typed at
/// run time: the op's element type is only known from the storage it is given.
#[derive(Default)]
pub(crate) struct FilterCache(Mutex<Option<Box<dyn Any + Send>>>);

impl FilterCache {
    fn put<T: WithDType>(&self, filters: TransformedFilters<T>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(filters));
    }

    /// The kept filters, if they are of element type `T`; the room is empty afterwards.
    fn take<T: WithDType>(&self) -> Option<TransformedFilters<T>> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        kept.downcast().ok().map(|filters| *filters)
    }
}

/// One application of [`Conv2dOp`] in a graph (what `apply_op2` / `apply_op3` hold until the
/// backward pass). When the input gradient will be wanted, a Winograd forward keeps its
/// transformed filters here, so the input gradient reads them instead of transforming the
/// flipped filters again: a third of the filter transforms of a step, and the flipped copy.
pub(crate) struct Conv2dNode {
    op: Conv2dOp,
    kept: Option<FilterCache>,
}

impl Conv2dNode {
    /// The node for `op`; `input_grad_wanted` when the input takes part in backprop.
    pub(crate) fn new(op: Conv2dOp, input_grad_wanted: bool) -> Self {
        Conv2dNode {
            op,
            kept: input_grad_wanted.then(FilterCache::default),
        }
    }
}

impl CustomOp2 for Conv2dNode {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.op
            .cpu_forward((x, x_layout), (w, w_layout), None, self.kept.as_ref())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self
            .op
            .gradients(x, w, None, grad_res, self.kept.as_ref())?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Conv2dNode {
    fn name(&self) -> &'static str {
        "conv2d-gemm-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.op.cpu_forward(
            (x, x_layout),
            (w, w_layout),
            Some((bias, bias_layout)),
            self.kept.as_ref(),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.op
            .gradients(x, w, Some(bias), grad_res, self.kept.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn winograd_equals_the_columns_path_in_f64() {
        for (batch, c, o, [h, w], padding) in [
            (3, 16, 20, [7, 9], 1),
            (2, 24, 16, [8, 5], 0),
            (1, 16, 16, [2, 3], 2),
            (2, 16, 16, [1, 1], 1),
        ] {
            let geo = ConvGeometry { stride: 1, padding };
            let op = Conv2dOp {
                shape: ConvShape::new([c, h, w], [3, 3], geo).unwrap(),
                batch,
                out_channels: o,
                per_example: false,
            };
            let plan =
                Winograd::plan_any_size(&op).expect("a 3x3 stride-1 convolution of 16+ channels");
            let x = values(batch * c * h * w, 1);
            let filters = values(o * c * 9, 2);
            let bias = values(o, 3);
            let dy = values(op.output_len(), 4);
            let label = format!("{batch}x{c}x{h}x{w} -> {o}, padding {padding}");
            let expected = op.forward_by_columns(&x, &filters, Some(&bias));
            let (dw_expected, db_expected) = op.weight_grad_by_columns(&x, &dy, true);
            let dx_expected = op.input_grad_by_col2im(&filters, &dy);
            let transposed = Winograd::plan_any_size(&op.transposed().unwrap()).unwrap();
            for by_components in [false, true] {
                let label = format!("{label}, by components {by_components}");
                let y = plan.forward_with(&x, &filters, Some(&bias), by_components);
                assert!(max_abs_diff(&y, &expected) < 1e-12, "forward, {label}");
                let (dw, db) = plan.weight_grad_with(&x, &dy, true, by_components);
                assert!(max_abs_diff(&dw, &dw_expected) < 1e-12, "dW, {label}");
                let db = db.unwrap();
                assert!(
                    max_abs_diff(&db, db_expected.as_ref().unwrap()) < 1e-12,
                    "db, {label}"
                );
                // The input gradient from the forward's transformed filters, read flipped.
                let kept = plan.transform_filters_for(&filters, by_components);
                let dx = transposed.forward(&dy, Filters::Flipped(&kept), None);
                assert!(max_abs_diff(&dx, &dx_expected) < 1e-12, "dx, {label}");
            }
        }
    }

    #[test]
    fn winograd_is_planned_only_where_it_applies() {
        let op = |c: usize, o: usize, kernel: usize, stride: usize, per_example: bool| Conv2dOp {
            shape: ConvShape::new(
                [c, 8, 8],
                [kernel, kernel],
                ConvGeometry { stride, padding: 1 },
            )
            .unwrap(),
            batch: 2,
            out_channels: o,
            per_example,
        };
        let plan = Winograd::plan_any_size;
        assert!(plan(&op(16, 16, 3, 1, false)).is_some());
        assert!(plan(&op(3, 64, 3, 1, false)).is_none(), "RGB input");
        assert!(plan(&op(64, 10, 3, 1, false)).is_none(), "few outputs");
        assert!(plan(&op(16, 16, 3, 2, false)).is_none(), "stride 2");
        assert!(plan(&op(16, 16, 5, 1, false)).is_none(), "5x5");
        assert!(
            plan(&op(16, 16, 3, 1, true)).is_none(),
            "per-example filters"
        );
        // 2 images of 4x4 tiles: too few to pay for the filters' transform.
        assert!(
            Winograd::plan(&op(16, 16, 3, 1, false)).is_none(),
            "small batch"
        );
        let large_batch = Conv2dOp {
            batch: 64,
            ..op(16, 16, 3, 1, false)
        };
        assert!(Winograd::plan(&large_batch).is_some(), "1024 tiles");
    }
}
