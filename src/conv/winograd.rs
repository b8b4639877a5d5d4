//! Winograd's minimal filtering F(2x2, 3x3) for 3x3 convolutions at stride 1 on the CPU.
//!
//! Two by two outputs of a 3x3 filter need a 4x4 tile of input. In Winograd's transformed
//! domain one tile costs 16 multiplies instead of 36, and summed over channels those multiplies
//! become 16 matrix products, one per transform component `ξ` (Lavin & Gray, 2016):
//!
//! - forward: `Y = Aᵀ [U_ξ · V_ξ] A` per tile, with `U = G g Gᵀ` the transformed filters
//!   (`[C_out, C_in]` per component) and `V = Bᵀ d B` the transformed input tiles
//!   (`[C_in, tiles]`);
//! - weight gradient: `dW = Gᵀ [Σ_tiles (A dy Aᵀ) ⊙ (Bᵀ d B)] G`, the same trilinear identity read
//!   with the output tile as the known factor; the sum over tiles is again one product per
//!   component, `[C_out, tiles] · [tiles, C_in]`;
//! - input gradient: a forward convolution of `dy` with flipped filters (see
//!   `Conv2dOp::transposed`), so it comes here too; it reads the forward's transformed filters
//!   (kept by `Conv2dNode`) with their components permuted and channels swapped, as flipping a
//!   filter only permutes its transform (`Filters::Flipped`).
//!
//! That is 2.25x fewer multiplies than im2col + gemm, and the transformed input is 4x the
//! input where im2col's columns are 9x. F(2x2, 3x3) rather than a larger tile: its transforms
//! only add, subtract and halve, so f32 results stay at the rounding of the direct sum; larger
//! tiles use larger interpolation points and lose digits in f32.
//!
//! Two schedules: from `MIN_CHUNKED_TILES` tiles on, each thread takes a range of images and
//! works through them in chunks of tiles sized for its L2 cache; below, the batch is transformed
//! whole (in parallel over channels) and the 16 products are shared out among the threads, as
//! per-thread chunks would each multiply with all of the transformed filters and keep their own
//! weight-gradient sums of that size.

use std::ops::Range;

use candle_core::WithDType;
use rayon::prelude::*;

use super::matmul::{matmul, MatRef};
use super::op::Conv2dOp;

/// Transform components per tile (4x4).
const COMPONENTS: usize = 16;

/// Below this many input or output channels the 16 products are too thin to keep gemm busy (an
/// RGB input would give them an inner dimension of 3, where im2col's one product has 27).
const MIN_CHANNELS: usize = 16;

/// Below this many tiles in the batch the filters' transform (16 values per filter, each call)
/// is not amortised. At 64 (batch 64 of 2x2 outputs, VGG-16's last three layers) it still won:
/// forward 10-13 ms against im2col's 13-17.
const MIN_BATCH_TILES: usize = 64;

/// From this many tiles in the batch on, each thread takes a range of images and transforms
/// them chunk by chunk (below, the batch is transformed whole and the 16 products are shared
/// out): at batch 64, 512-channel layers with 4x4 outputs (256 tiles) ran slower than im2col in
/// per-thread chunks, 8x8 (1024) faster.
const MIN_CHUNKED_TILES: usize = 1024;

/// The transformed tiles of one chunk (input and output side together, f32) are sized to stay
/// in a core's L2 cache between the transforms and the products...
const CHUNK_BYTES: usize = 384 << 10;

/// ...but a chunk has at least this many tiles: each product repacks its `C_out x C_in`
/// component of the filters, which only pays off over enough columns.
const MIN_CHUNK_TILES: usize = 64;

/// A 3x3, stride-1 convolution of a batch, computed tile by tile.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Winograd {
    batch: usize,
    channels: usize,
    out_channels: usize,
    height: usize,
    width: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
    tiles_w: usize,
    tiles_per_image: usize,
}

/// Filters in Winograd's domain, laid out for the schedule of the convolution that made them:
/// `U[ξ][o][c]` for per-thread chunks, `U[o][ξ][c]` for the whole batch.
#[derive(Debug)]
pub(crate) struct TransformedFilters<T> {
    values: Vec<T>,
    by_components: bool,
    out_channels: usize,
    channels: usize,
}

impl<T> TransformedFilters<T> {
    /// Component `ξ`, `[C_out, C_in]`.
    fn component(&self, xi: usize) -> MatRef<'_, T> {
        let (co, ci) = (self.out_channels, self.channels);
        if self.by_components {
            MatRef::strided(&self.values[xi * ci..], co, ci, COMPONENTS * ci)
        } else {
            MatRef::row_major(&self.values[xi * co * ci..][..co * ci], co, ci)
        }
    }
}

/// The transformed filters a convolution multiplies with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Filters<'a, T> {
    /// Its own.
    Own(&'a TransformedFilters<T>),
    /// Those of the convolution whose input gradient it computes (`Conv2dOp::transposed`):
    /// its filters are those filters flipped, with input and output channels swapped. Flipping
    /// a filter reverses `g` in `G g`, which permutes the components (`FLIPPED`), so component
    /// `ξ` here is the transpose of component `FLIPPED[ξ]` there, with nothing recomputed.
    Flipped(&'a TransformedFilters<T>),
}

/// `G rev(g) = P (G g)` with `P` swapping components 0 and 3 of each 1-D transform; in 2-D,
/// component `4i + j` of a flipped filter is component `4p(i) + p(j)` of the filter.
const FLIPPED: [usize; COMPONENTS] = {
    let p = [3, 1, 2, 0];
    let mut flipped = [0; COMPONENTS];
    let mut xi = 0;
    while xi < COMPONENTS {
        flipped[xi] = 4 * p[xi / 4] + p[xi % 4];
        xi += 1;
    }
    flipped
};

impl<'a, T> Filters<'a, T> {
    /// Component `ξ` as this convolution's `[C_out, C_in]` matrix.
    fn component(self, xi: usize) -> MatRef<'a, T> {
        match self {
            Filters::Own(u) => u.component(xi),
            Filters::Flipped(u) => u.component(FLIPPED[xi]).t(),
        }
    }

    /// The layout and channel counts of the filters as this convolution reads them.
    fn shape(self) -> (bool, usize, usize) {
        match self {
            Filters::Own(u) => (u.by_components, u.out_channels, u.channels),
            Filters::Flipped(u) => (u.by_components, u.channels, u.out_channels),
        }
    }
}

/// Applies the 1-D transform `f` to the columns, then to the rows, of a square tile: the
/// transforms here are all of the form `M X Mᵀ`.
fn separable<T: Copy + Default, const N: usize, const M: usize>(
    x: &[[T; N]; N],
    f: impl Fn([T; N]) -> [T; M],
) -> [[T; M]; M] {
    let mut columns = [[T::default(); N]; M];
    for j in 0..N {
        let column = f(std::array::from_fn(|i| x[i][j]));
        for (row, v) in columns.iter_mut().zip(column) {
            row[j] = v;
        }
    }
    columns.map(f)
}

/// `dst[i] = f(a[i], b[i])`.
fn zip_with<T: Copy>(dst: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    for (d, (&a, &b)) in dst.iter_mut().zip(a.iter().zip(b)) {
        *d = f(a, b);
    }
}

/// `dst[i] = f(a[i], b[i], c[i])`.
fn zip3_with<T: Copy>(dst: &mut [T], a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) {
    for (d, ((&a, &b), &c)) in dst.iter_mut().zip(a.iter().zip(b).zip(c)) {
        *d = f(a, b, c);
    }
}

/// Splits `line`, shifted right by `shift` zeros, into its even and odd elements (`even[m]` is
/// shifted element `2m`); elements past the line are zero.
fn deinterleave<T: Copy + Default>(line: &[T], shift: usize, even: &mut [T], odd: &mut [T]) {
    even.fill(T::default());
    odd.fill(T::default());
    let mut line = line;
    if shift % 2 == 1 {
        if let (Some(&first), Some(o)) = (line.first(), odd.get_mut(shift / 2)) {
            *o = first;
        }
        line = line.get(1..).unwrap_or_default();
    }
    let start = shift.div_ceil(2);
    let even = even.get_mut(start..).unwrap_or_default();
    let odd = odd.get_mut(start..).unwrap_or_default();
    let pairs = line.chunks_exact(2);
    let last = pairs.remainder().first().copied();
    let full = pairs.len().min(even.len()).min(odd.len());
    for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(pairs) {
        *e = pair[0];
        *o = pair[1];
    }
    if let (Some(v), Some(e)) = (last, even.get_mut(full)) {
        *e = v;
    }
}

/// `G g`: a filter's 3 taps to 4 components.
fn filter_1d<T: WithDType>([g0, g1, g2]: [T; 3]) -> [T; 4] {
    let half = T::from_f64(0.5);
    let even = (g0 + g2) * half;
    [g0, even + g1 * half, even - g1 * half, g2]
}

/// `Bᵀ d`: 4 inputs to 4 components.
fn input_1d<T: WithDType>([d0, d1, d2, d3]: [T; 4]) -> [T; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// `Aᵀ m`: 4 components to 2 outputs.
fn output_1d<T: WithDType>([m0, m1, m2, m3]: [T; 4]) -> [T; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

/// `A y`: 2 output gradients to 4 components.
fn output_grad_1d<T: WithDType>([y0, y1]: [T; 2]) -> [T; 4] {
    [y0, y0 + y1, y0 - y1, T::from_f64(0.0) - y1]
}

/// `Gᵀ p`: 4 components to the gradients of the 3 taps.
fn filter_grad_1d<T: WithDType>([p0, p1, p2, p3]: [T; 4]) -> [T; 3] {
    let half = T::from_f64(0.5);
    let (sum, diff) = ((p1 + p2) * half, (p1 - p2) * half);
    [p0 + sum, diff, sum + p3]
}

impl Winograd {
    /// The plan for `op` when the transform is faster than im2col for it: a 3x3 stride-1
    /// convolution with one filter bank for the batch, enough channels on both sides to keep the
    /// products busy, and enough tiles in the batch to pay for transforming the filters.
    pub(crate) fn plan(op: &Conv2dOp) -> Option<Winograd> {
        Self::plan_any_size(op).filter(|plan| plan.batch * plan.tiles_per_image >= MIN_BATCH_TILES)
    }

    /// The plan for `op` if it is a convolution the transform computes, whatever its size.
    pub(crate) fn plan_any_size(op: &Conv2dOp) -> Option<Winograd> {
        let s = &op.shape;
        let applies = !op.per_example
            && (s.kernel_h, s.kernel_w) == (3, 3)
            && s.geo.stride == 1
            && s.channels.min(op.out_channels) >= MIN_CHANNELS
            && s.height.min(s.width) > 0;
        applies.then(|| {
            let tiles_w = s.out_w.div_ceil(2);
            Winograd {
                batch: op.batch,
                channels: s.channels,
                out_channels: op.out_channels,
                height: s.height,
                width: s.width,
                padding: s.geo.padding,
                out_h: s.out_h,
                out_w: s.out_w,
                tiles_w,
                tiles_per_image: tiles_w * s.out_h.div_ceil(2),
            }
        })
    }

    /// Images per thread task (whole images, so that tasks write disjoint outputs).
    fn task_images(&self) -> usize {
        let threads = rayon::current_num_threads().max(1);
        self.batch.div_ceil(threads.min(self.batch).max(1)).max(1)
    }

    /// Threads each product may use: all of them when the batch is a single task.
    fn product_threads(&self) -> usize {
        if self.task_images() >= self.batch {
            rayon::current_num_threads().max(1)
        } else {
            1
        }
    }

    /// Tiles per chunk for a task of `tiles` tiles.
    fn chunk_tiles(&self, tiles: usize) -> usize {
        let per_tile = COMPONENTS * (self.channels + self.out_channels) * size_of::<f32>();
        (CHUNK_BYTES / per_tile)
            .max(MIN_CHUNK_TILES)
            .min(tiles)
            .max(1)
    }

    /// A task's tiles `tiles` cut into chunks.
    fn chunks(&self, tiles: Range<usize>) -> impl Iterator<Item = Range<usize>> {
        let chunk = self.chunk_tiles(tiles.len());
        let end = tiles.end;
        tiles
            .step_by(chunk)
            .map(move |start| start..(start + chunk).min(end))
    }

    /// The tiles `tiles` of the batch as runs along tile rows: `(position of the run's first
    /// tile in tiles, image, tile row, tile columns)`.
    fn runs(
        &self,
        tiles: Range<usize>,
    ) -> impl Iterator<Item = (usize, usize, usize, Range<usize>)> {
        let (per_image, tiles_w) = (self.tiles_per_image, self.tiles_w);
        let rows = tiles.start / tiles_w..tiles.end.div_ceil(tiles_w);
        rows.map(move |row| {
            let row_start = row * tiles_w;
            let lo = row_start.max(tiles.start);
            let hi = (row_start + tiles_w).min(tiles.end);
            let (image, ty) = (row_start / per_image, row_start % per_image / tiles_w);
            (lo - tiles.start, image, ty, lo - row_start..hi - row_start)
        })
    }

    /// The filters in the transformed domain, `U[ξ][o][c]`, the threads each taking a range of
    /// filters (and its part of each of the 16 components).
    fn filters_by_component<T: WithDType + Default>(&self, w: &[T]) -> Vec<T> {
        let filters = self.out_channels * self.channels;
        let mut u = vec![T::default(); COMPONENTS * filters];
        let per_task = filters.div_ceil(rayon::current_num_threads().max(1)).max(1);
        let mut tasks: Vec<Vec<&mut [T]>> = Vec::new();
        for component in u.chunks_mut(filters) {
            for (task, part) in component.chunks_mut(per_task).enumerate() {
                if task == tasks.len() {
                    tasks.push(Vec::with_capacity(COMPONENTS));
                }
                tasks[task].push(part);
            }
        }
        tasks
            .into_par_iter()
            .enumerate()
            .for_each(|(task, mut parts)| {
                let taps = w[task * per_task * 9..].chunks_exact(9);
                for (f, taps) in taps.take(parts[0].len()).enumerate() {
                    let g: [[T; 3]; 3] =
                        std::array::from_fn(|i| std::array::from_fn(|j| taps[3 * i + j]));
                    for (part, &value) in parts
                        .iter_mut()
                        .zip(separable(&g, filter_1d).iter().flatten())
                    {
                        part[f] = value;
                    }
                }
            });
        u
    }

    /// `w` (`[C_out, C_in, 3, 3]`) in the transformed domain, laid out for this convolution's
    /// schedule.
    pub(crate) fn transform_filters<T: WithDType + Default>(
        &self,
        w: &[T],
    ) -> TransformedFilters<T> {
        self.transform_filters_for(w, self.by_components())
    }

    /// [`Winograd::transform_filters`] laid out for the whole batch (`by_components`) or for
    /// per-thread chunks.
    pub(super) fn transform_filters_for<T: WithDType + Default>(
        &self,
        w: &[T],
        by_components: bool,
    ) -> TransformedFilters<T> {
        TransformedFilters {
            values: if by_components {
                self.filters_by_channel(w)
            } else {
                self.filters_by_component(w)
            },
            by_components,
            out_channels: self.out_channels,
            channels: self.channels,
        }
    }

    /// Whether `filters` are laid out for this convolution's schedule and shaped for it.
    pub(crate) fn takes<T>(&self, filters: Filters<'_, T>) -> bool {
        filters.shape() == (self.by_components(), self.out_channels, self.channels)
    }

    /// `V[ξ][c][t] = (Bᵀ d B)[ξ]` for the tiles `tiles` (of the batch) of `x`.
    ///
    /// Per tile row and channel, the four input lines under the row are split into their even
    /// and odd columns (zero outside the image): tile `tx` covers even and odd columns `tx` and
    /// `tx + 1`, so both 1-D transforms run along contiguous lines.
    fn transform_input<T: WithDType + Default>(&self, x: &[T], tiles: Range<usize>, v: &mut [T]) {
        let (ci, n) = (self.channels, tiles.len());
        let (h, w, p) = (self.height, self.width, self.padding);
        let plane_len = h * w;
        let len = self.tiles_w + 1;
        // Input line i of the tile row, then (in place) component i of `Bᵀ d`.
        let mut even = vec![T::default(); 4 * len];
        let mut odd = vec![T::default(); 4 * len];
        for (offset, image, ty, cols) in self.runs(tiles) {
            let count = cols.len();
            for c in 0..ci {
                let plane = &x[(image * ci + c) * plane_len..][..plane_len];
                for i in 0..4 {
                    let e = &mut even[i * len..][..len];
                    let o = &mut odd[i * len..][..len];
                    let y = (2 * ty + i).wrapping_sub(p);
                    if y >= h {
                        e.fill(T::default());
                        o.fill(T::default());
                        continue;
                    }
                    deinterleave(&plane[y * w..][..w], p, e, o);
                }
                for lines in [&mut even, &mut odd] {
                    let (l0, rest) = lines.split_at_mut(len);
                    let (l1, rest) = rest.split_at_mut(len);
                    let (l2, l3) = rest.split_at_mut(len);
                    for (((a, b), c), d) in l0.iter_mut().zip(l1).zip(l2).zip(l3) {
                        [*a, *b, *c, *d] = input_1d([*a, *b, *c, *d]);
                    }
                }
                for k in 0..4 {
                    let e0 = &even[k * len + cols.start..][..count];
                    let e1 = &even[k * len + cols.start + 1..][..count];
                    let o0 = &odd[k * len + cols.start..][..count];
                    let o1 = &odd[k * len + cols.start + 1..][..count];
                    let at = |l: usize| ((4 * k + l) * ci + c) * n + offset;
                    // `Bᵀ` along the row: columns (d0, d1, d2, d3) = (e0, o0, e1, o1).
                    zip_with(&mut v[at(0)..][..count], e0, e1, |a, b| a - b);
                    zip_with(&mut v[at(1)..][..count], o0, e1, |a, b| a + b);
                    zip_with(&mut v[at(2)..][..count], e1, o0, |a, b| a - b);
                    zip_with(&mut v[at(3)..][..count], o0, o1, |a, b| a - b);
                }
            }
        }
    }

    /// `D[ξ][o][t] = (A dy Aᵀ)[ξ]` for the tiles `tiles` of `dy` (zero past the output's edge).
    fn transform_output_grad<T: WithDType + Default>(
        &self,
        dy: &[T],
        tiles: Range<usize>,
        d: &mut [T],
    ) {
        let (co, n) = (self.out_channels, tiles.len());
        let (oh, ow) = (self.out_h, self.out_w);
        let plane_len = oh * ow;
        let tw = self.tiles_w;
        // The even and odd columns of the run's two output lines, then of one row of `A dy`.
        let mut lines = vec![T::default(); 6 * tw];
        for (offset, image, ty, cols) in self.runs(tiles) {
            let count = cols.len();
            for o in 0..co {
                let plane = &dy[(image * co + o) * plane_len..][..plane_len];
                let (lines, row) = lines.split_at_mut(4 * tw);
                for (i, pair) in lines.chunks_exact_mut(2 * tw).enumerate() {
                    let (e, od) = pair.split_at_mut(tw);
                    let (e, od) = (&mut e[..count], &mut od[..count]);
                    match 2 * ty + i {
                        y if y < oh => deinterleave(
                            &plane[y * ow + 2 * cols.start..][..ow - 2 * cols.start],
                            0,
                            e,
                            od,
                        ),
                        _ => {
                            e.fill(T::default());
                            od.fill(T::default());
                        }
                    }
                }
                let [e0, o0, e1, o1] = std::array::from_fn(|i| &lines[i * tw..][..count]);
                let (ek, ok) = row.split_at_mut(tw);
                let (ek, ok) = (&mut ek[..count], &mut ok[..count]);
                for k in 0..4 {
                    // Row k of `A` along the tile's rows: (1, 0), (1, 1), (1, -1), (0, -1).
                    match k {
                        0 => {
                            ek.copy_from_slice(e0);
                            ok.copy_from_slice(o0);
                        }
                        1 => {
                            zip_with(ek, e0, e1, |a, b| a + b);
                            zip_with(ok, o0, o1, |a, b| a + b);
                        }
                        2 => {
                            zip_with(ek, e0, e1, |a, b| a - b);
                            zip_with(ok, o0, o1, |a, b| a - b);
                        }
                        _ => {
                            zip_with(ek, e1, e1, |_, b| T::default() - b);
                            zip_with(ok, o1, o1, |_, b| T::default() - b);
                        }
                    }
                    let at = |l: usize| ((4 * k + l) * co + o) * n + offset;
                    // ...and along its columns.
                    d[at(0)..][..count].copy_from_slice(ek);
                    zip_with(&mut d[at(1)..][..count], ek, ok, |a, b| a + b);
                    zip_with(&mut d[at(2)..][..count], ek, ok, |a, b| a - b);
                    zip_with(&mut d[at(3)..][..count], ok, ok, |_, b| T::default() - b);
                }
            }
        }
    }

    /// Writes `Aᵀ M A (+ bias)` of the tiles `tiles` into `y`, which holds the images from
    /// `first_image` on.
    fn transform_output<T: WithDType + Default>(
        &self,
        m: &[T],
        tiles: Range<usize>,
        first_image: usize,
        bias: Option<&[T]>,
        y: &mut [T],
    ) {
        let (co, n) = (self.out_channels, tiles.len());
        let (oh, ow, tw) = (self.out_h, self.out_w, self.tiles_w);
        let plane_len = oh * ow;
        // `Aᵀ` along the tiles' rows, `[k][j][tile]`, then output `(i, j)`, `[i][j][tile]`.
        let mut rows = vec![T::default(); 8 * tw];
        let mut outputs = vec![T::default(); 4 * tw];
        for (offset, image, ty, cols) in self.runs(tiles) {
            let count = cols.len();
            for o in 0..co {
                let component = |xi: usize| &m[(xi * co + o) * n + offset..][..count];
                for (k, pair) in rows.chunks_exact_mut(2 * tw).enumerate() {
                    let (s0, s1) = pair.split_at_mut(tw);
                    let [m0, m1, m2, m3] = std::array::from_fn(|l| component(4 * k + l));
                    zip3_with(&mut s0[..count], m0, m1, m2, |a, b, c| a + b + c);
                    zip3_with(&mut s1[..count], m1, m2, m3, |a, b, c| a - b - c);
                }
                let b = bias.map_or(T::default(), |b| b[o]);
                let s: [&[T]; 8] = std::array::from_fn(|r| &rows[r * tw..][..count]);
                let (top, bottom) = outputs.split_at_mut(2 * tw);
                for (j, (top, bottom)) in top
                    .chunks_exact_mut(tw)
                    .zip(bottom.chunks_exact_mut(tw))
                    .enumerate()
                {
                    let (s0, s1, s2, s3) = (s[j], s[2 + j], s[4 + j], s[6 + j]);
                    zip3_with(&mut top[..count], s0, s1, s2, |a, b2, c| a + b2 + c + b);
                    zip3_with(&mut bottom[..count], s1, s2, s3, |a, b2, c| a - b2 - c + b);
                }
                let plane = &mut y[((image - first_image) * co + o) * plane_len..][..plane_len];
                let x0 = 2 * cols.start;
                // Tiles whose two columns are both inside the output; the last may have one.
                let pairs = count.min((ow - x0) / 2);
                for i in 0..2 {
                    let oy = 2 * ty + i;
                    if oy >= oh {
                        break;
                    }
                    let line = &mut plane[oy * ow..][..ow];
                    let left = &outputs[2 * i * tw..][..count];
                    let right = &outputs[(2 * i + 1) * tw..][..count];
                    for (pixels, (&l, &r)) in line[x0..x0 + 2 * pairs]
                        .chunks_exact_mut(2)
                        .zip(left.iter().zip(right))
                    {
                        pixels[0] = l;
                        pixels[1] = r;
                    }
                    if pairs < count {
                        line[x0 + 2 * pairs] = left[pairs];
                    }
                }
            }
        }
    }

    /// Whether the batch is transformed whole and its 16 products shared out among the
    /// threads, rather than cut into per-thread chunks of tiles: with few tiles, per-thread
    /// chunks would each multiply (and sum gradients over) all of the transformed filters.
    fn by_components(&self) -> bool {
        self.batch * self.tiles_per_image < MIN_CHUNKED_TILES
    }

    /// `y = conv(x, w) (+ bias)`, `[B, C_out, H_out, W_out]`, with `filters` the transformed `w`
    /// (their layout picks the schedule).
    ///
    /// Panics if the filters are shaped for another convolution: callers check with
    /// [`Winograd::takes`] or make them with this plan.
    pub(crate) fn forward<T: WithDType + Default>(
        &self,
        x: &[T],
        filters: Filters<'_, T>,
        bias: Option<&[T]>,
    ) -> Vec<T> {
        let (by_components, co, ci) = filters.shape();
        assert_eq!(
            (co, ci),
            (self.out_channels, self.channels),
            "transformed filters of another convolution"
        );
        let out_image = co * self.out_h * self.out_w;
        let mut y = vec![T::default(); self.batch * out_image];
        if y.is_empty() {
            return y;
        }
        if by_components {
            self.forward_whole(x, filters, bias, &mut y);
            return y;
        }
        let task_images = self.task_images();
        let threads = self.product_threads();
        y.par_chunks_mut(task_images * out_image)
            .enumerate()
            .for_each(|(task, y_task)| {
                let first = task * task_images;
                let images = y_task.len() / out_image;
                let tiles = first * self.tiles_per_image..(first + images) * self.tiles_per_image;
                let chunk = self.chunk_tiles(tiles.len());
                let mut v = vec![T::default(); COMPONENTS * ci * chunk];
                let mut m = vec![T::default(); COMPONENTS * co * chunk];
                for part in self.chunks(tiles) {
                    let n = part.len();
                    self.transform_input(x, part.clone(), &mut v);
                    for xi in 0..COMPONENTS {
                        let inputs = MatRef::row_major(&v[xi * ci * n..][..ci * n], ci, n);
                        let m = &mut m[xi * co * n..];
                        matmul(m, n, filters.component(xi), inputs, false, threads);
                    }
                    self.transform_output(&m, part, first, bias, y_task);
                }
            });
        y
    }

    /// [`Winograd::forward`] of untransformed filters, with the batch whole (`by_components`) or
    /// in per-thread chunks.
    #[cfg(test)]
    pub(super) fn forward_with<T: WithDType + Default>(
        &self,
        x: &[T],
        w: &[T],
        bias: Option<&[T]>,
        by_components: bool,
    ) -> Vec<T> {
        let u = self.transform_filters_for(w, by_components);
        self.forward(x, Filters::Own(&u), bias)
    }

    /// The weight gradient `[C_out, C_in, 3, 3]` and, when asked, the bias gradient `[C_out]`.
    pub(crate) fn weight_grad<T: WithDType + Default>(
        &self,
        x: &[T],
        dy: &[T],
        with_bias: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        self.weight_grad_with(x, dy, with_bias, self.by_components())
    }

    /// [`Winograd::weight_grad`] with the batch whole (`by_components`) or in per-thread chunks.
    pub(super) fn weight_grad_with<T: WithDType + Default>(
        &self,
        x: &[T],
        dy: &[T],
        with_bias: bool,
        by_components: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        if by_components {
            return self.weight_grad_whole(x, dy, with_bias);
        }
        let (ci, co) = (self.channels, self.out_channels);
        let part_len = COMPONENTS * co * ci;
        let task_images = self.task_images();
        let tasks = self.batch.div_ceil(task_images);
        let threads = self.product_threads();
        // Each task sums its images into its own part; the parts are added in task order below,
        // so that a run is reproducible for a given thread count.
        let mut parts = vec![T::default(); tasks * part_len];
        let mut db_parts = vec![T::default(); tasks * co];
        parts
            .par_chunks_mut(part_len)
            .zip(db_parts.par_chunks_mut(co))
            .enumerate()
            .for_each(|(task, (p, db))| {
                let first = task * task_images;
                let last = (first + task_images).min(self.batch);
                let tiles = first * self.tiles_per_image..last * self.tiles_per_image;
                let chunk = self.chunk_tiles(tiles.len());
                let mut v = vec![T::default(); COMPONENTS * ci * chunk];
                let mut d = vec![T::default(); COMPONENTS * co * chunk];
                for part in self.chunks(tiles) {
                    let n = part.len();
                    self.transform_input(x, part.clone(), &mut v);
                    self.transform_output_grad(dy, part, &mut d);
                    for xi in 0..COMPONENTS {
                        // `P_ξ += D_ξ · V_ξᵀ` over the chunk's tiles.
                        let grads = MatRef::row_major(&d[xi * co * n..][..co * n], co, n);
                        let inputs = MatRef::row_major(&v[xi * ci * n..][..ci * n], ci, n);
                        let p = &mut p[xi * co * ci..];
                        matmul(p, ci, grads, inputs.t(), true, threads);
                    }
                }
                if with_bias {
                    self.add_bias_grad(dy, first..last, db);
                }
            });
        let mut total = vec![T::default(); part_len];
        let mut db = vec![T::default(); co];
        for (part, db_part) in parts.chunks_exact(part_len).zip(db_parts.chunks_exact(co)) {
            add_to(&mut total, part);
            add_to(&mut db, db_part);
        }
        (self.filter_grads(&total), with_bias.then_some(db))
    }

    /// The forward of the whole batch at once, each thread taking whole components.
    ///
    /// Layouts keep each parallel sweep's writes contiguous: the filters `U[o][ξ][c]` (one
    /// output channel per task, made by `filters_by_channel`), the inputs `V[c][ξ][t]` (one channel per task), the products
    /// `M[ξ][o][t]` (one component per task), the output by image.
    fn forward_whole<T: WithDType + Default>(
        &self,
        x: &[T],
        filters: Filters<'_, T>,
        bias: Option<&[T]>,
        y: &mut [T],
    ) {
        let (ci, co, n) = (
            self.channels,
            self.out_channels,
            self.batch * self.tiles_per_image,
        );
        let v = self.inputs_by_channel(x);
        let mut m = vec![T::default(); COMPONENTS * co * n];
        m.par_chunks_mut(co * n).enumerate().for_each(|(xi, m)| {
            let inputs = MatRef::strided(&v[xi * n..], ci, n, COMPONENTS * n);
            matmul(m, n, filters.component(xi), inputs, false, 1);
        });
        let plane_len = self.out_h * self.out_w;
        y.par_chunks_mut(co * plane_len)
            .enumerate()
            .for_each(|(image, y)| {
                for (o, plane) in y.chunks_exact_mut(plane_len).enumerate() {
                    let b = bias.map_or(T::default(), |b| b[o]);
                    self.for_each_tile(image, |t, ty, tx| {
                        let tile: [[T; 4]; 4] = std::array::from_fn(|i| {
                            std::array::from_fn(|j| m[((4 * i + j) * co + o) * n + t])
                        });
                        let out = separable(&tile, output_1d);
                        for (i, row) in out.iter().enumerate() {
                            for (j, &value) in row.iter().enumerate() {
                                let (oy, ox) = (2 * ty + i, 2 * tx + j);
                                if oy < self.out_h && ox < self.out_w {
                                    plane[oy * self.out_w + ox] = value + b;
                                }
                            }
                        }
                    });
                }
            });
    }

    /// The weight (and bias) gradient of the whole batch at once, each thread taking whole
    /// components; `D[o][ξ][t]` holds the transformed output gradients.
    fn weight_grad_whole<T: WithDType + Default>(
        &self,
        x: &[T],
        dy: &[T],
        with_bias: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let (ci, co, n) = (
            self.channels,
            self.out_channels,
            self.batch * self.tiles_per_image,
        );
        let v = self.inputs_by_channel(x);
        let plane_len = self.out_h * self.out_w;
        let mut d = vec![T::default(); co * COMPONENTS * n];
        d.par_chunks_mut(COMPONENTS * n)
            .enumerate()
            .for_each(|(o, d)| {
                for image in 0..self.batch {
                    let plane = &dy[(image * co + o) * plane_len..][..plane_len];
                    self.for_each_tile(image, |t, ty, tx| {
                        let g: [[T; 2]; 2] = std::array::from_fn(|i| {
                            std::array::from_fn(|j| {
                                let (oy, ox) = (2 * ty + i, 2 * tx + j);
                                if oy < self.out_h && ox < self.out_w {
                                    plane[oy * self.out_w + ox]
                                } else {
                                    T::default()
                                }
                            })
                        });
                        for (xi, &value) in
                            separable(&g, output_grad_1d).iter().flatten().enumerate()
                        {
                            d[xi * n + t] = value;
                        }
                    });
                }
            });
        let mut p = vec![T::default(); COMPONENTS * co * ci];
        p.par_chunks_mut(co * ci).enumerate().for_each(|(xi, p)| {
            let grads = MatRef::strided(&d[xi * n..], co, n, COMPONENTS * n);
            let inputs = MatRef::strided(&v[xi * n..], ci, n, COMPONENTS * n);
            matmul(p, ci, grads, inputs.t(), false, 1);
        });
        let db = with_bias.then(|| {
            let mut db = vec![T::default(); co];
            self.add_bias_grad(dy, 0..self.batch, &mut db);
            db
        });
        (self.filter_grads(&p), db)
    }

    /// Calls `f(tile index in the batch, tile row, tile column)` for each tile of `image`.
    fn for_each_tile(&self, image: usize, mut f: impl FnMut(usize, usize, usize)) {
        let mut t = image * self.tiles_per_image;
        for ty in 0..self.tiles_per_image / self.tiles_w {
            for tx in 0..self.tiles_w {
                f(t, ty, tx);
                t += 1;
            }
        }
    }

    /// `U[o][ξ][c]`: the filters in the transformed domain, one output channel per task.
    fn filters_by_channel<T: WithDType + Default>(&self, w: &[T]) -> Vec<T> {
        let ci = self.channels;
        let mut u = vec![T::default(); self.out_channels * COMPONENTS * ci];
        u.par_chunks_mut(COMPONENTS * ci)
            .zip(w.par_chunks(ci * 9))
            .for_each(|(u, filters)| {
                for (c, taps) in filters.chunks_exact(9).enumerate() {
                    let g: [[T; 3]; 3] =
                        std::array::from_fn(|i| std::array::from_fn(|j| taps[3 * i + j]));
                    for (xi, &value) in separable(&g, filter_1d).iter().flatten().enumerate() {
                        u[xi * ci + c] = value;
                    }
                }
            });
        u
    }

    /// `V[c][ξ][t]`: every input tile of the batch transformed, one input channel per task. Each
    /// plane is first copied into a zero-bordered buffer covering all its tiles, so that the
    /// tiles read it without bounds tests.
    fn inputs_by_channel<T: WithDType + Default>(&self, x: &[T]) -> Vec<T> {
        let (ci, n) = (self.channels, self.batch * self.tiles_per_image);
        let (h, w, p) = (self.height, self.width, self.padding);
        let tiles_h = self.tiles_per_image / self.tiles_w;
        let (ph, pw) = (2 * tiles_h + 2, 2 * self.tiles_w + 2);
        let mut v = vec![T::default(); ci * COMPONENTS * n];
        v.par_chunks_mut(COMPONENTS * n)
            .enumerate()
            .for_each(|(c, v)| {
                let mut padded = vec![T::default(); ph * pw];
                for image in 0..self.batch {
                    let plane = &x[(image * ci + c) * h * w..][..h * w];
                    // The tiles cover `2·tiles + 2 >= size + 2p` lines and columns.
                    for (y, line) in plane.chunks_exact(w).enumerate() {
                        padded[(y + p) * pw + p..][..w].copy_from_slice(line);
                    }
                    self.for_each_tile(image, |t, ty, tx| {
                        let d: [[T; 4]; 4] = std::array::from_fn(|i| {
                            std::array::from_fn(|j| padded[(2 * ty + i) * pw + 2 * tx + j])
                        });
                        for (xi, &value) in separable(&d, input_1d).iter().flatten().enumerate() {
                            v[xi * n + t] = value;
                        }
                    });
                }
            });
        v
    }

    /// Adds the sums of `dy` over the images `images`, per output channel, to `db`.
    fn add_bias_grad<T: WithDType + Default>(&self, dy: &[T], images: Range<usize>, db: &mut [T]) {
        let (co, plane_len) = (self.out_channels, self.out_h * self.out_w);
        for image in images {
            for (o, sum) in db.iter_mut().enumerate() {
                let plane = &dy[(image * co + o) * plane_len..][..plane_len];
                *sum += super::plane_sum(plane);
            }
        }
    }

    /// `dW = Gᵀ P G` per filter, from the summed products `P[ξ][o][c]`.
    fn filter_grads<T: WithDType + Default>(&self, p: &[T]) -> Vec<T> {
        let (ci, filters) = (self.channels, self.out_channels * self.channels);
        let mut dw = vec![T::default(); filters * 9];
        dw.par_chunks_mut(ci * 9).enumerate().for_each(|(o, dw)| {
            for (c, taps) in dw.chunks_exact_mut(9).enumerate() {
                let f = o * ci + c;
                let tile: [[T; 4]; 4] =
                    std::array::from_fn(|i| std::array::from_fn(|j| p[(4 * i + j) * filters + f]));
                let g = separable(&tile, filter_grad_1d);
                for (d, &v) in taps.iter_mut().zip(g.iter().flatten()) {
                    *d = v;
                }
            }
        });
        dw
    }
}

/// `total += part`, element by element.
fn add_to<T: WithDType>(total: &mut [T], part: &[T]) {
    for (t, &v) in total.iter_mut().zip(part) {
        *t += v;
    }
}
