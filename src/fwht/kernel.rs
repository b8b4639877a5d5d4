//! The blocked FWHT algorithm, written once over a SIMD vector type ([`Vector`]).
//!
//! A row of `2^L` elements goes through `L` levels of butterflies; level `h` pairs elements
//! `2^h` apart. The algorithm keeps the radix-2 order of levels for every element (so results
//! match the plain reference kernel bit for bit) but touches memory far less often:
//!
//! * the *base pass* loads up to 8 consecutive vectors, runs the levels inside each vector
//!   ([`Vector::butterflies_in_lanes`]) and then the levels between those vectors, all in
//!   registers, and stores once;
//! * *radix passes* then run 2-3 further levels per load/store of the data (`2^r` vectors `2^h`
//!   elements apart);
//! * a row larger than an L1 block is split into blocks of [`L1_BLOCK_BYTES`]; each block is
//!   finished while it sits in L1, and the levels across blocks run as soon as a group of
//!   blocks is complete (depth first), so each group is still in L2 when it is combined;
//! * the out-of-place transform reads `src` only in the base pass and `dst` afterwards, which
//!   fuses the copy into the first pass; the scale is applied in the last pass.
//!
//! Everything here is `#[inline(always)]`: each ISA module instantiates [`rows`] inside a
//! function compiled for its target features, so the vector wrappers inline down to single
//! instructions. For that to hold whatever the compiler's inlining heuristics, no vector
//! operation may sit inside a closure or a generic std helper (`array::from_fn`,
//! `Option::map`, iterator adapters): those are separate functions compiled *without* the
//! target features, where each intrinsic becomes an out-of-line call. Loops here are plain
//! loops over indices; `.ci/check_intrinsics.py` fails CI if a call slips back in.

use std::ops::{Add, Mul, Sub};

/// Rows longer than this many bytes are processed in blocks of this size, small enough to stay
/// in a 32 KiB L1 data cache together with the other streams in flight.
pub(crate) const L1_BLOCK_BYTES: usize = 16 << 10;

/// How far ahead of the base pass the source is prefetched when it comes from DRAM.
const PREFETCH_BYTES: usize = 16 << 10;

/// Batches larger than this come from beyond L2, so prefetching them pays.
const PREFETCH_MIN_BYTES: usize = 1 << 20;

/// The most levels a radix pass runs per load/store: 8 vectors plus the scale fit in the 16
/// registers of AVX2, and 8 strided streams stay within an 8-way L1 set.
const MAX_RADIX_LOG2: u32 = 3;

/// A real scalar type the transform works on (f32 or f64).
pub(crate) trait Real:
    Copy + Send + Sync + PartialEq + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self>
{
    /// The multiplicative identity, to recognise an unscaled transform.
    const ONE: Self;
}

impl Real for f32 {
    const ONE: Self = 1.0;
}

impl Real for f64 {
    const ONE: Self = 1.0;
}

/// A SIMD register holding `2^LOG2_LANES` elements, with the operations the algorithm needs.
///
/// Implementations are zero-cost wrappers; values of a vector type may only exist where its
/// instructions are known to be available (the ISA modules guarantee this by constructing them
/// only inside functions compiled for, and called after detecting, the needed features).
pub(crate) trait Vector: Copy {
    /// The element type.
    type Elem: Real;
    /// log2 of the number of lanes.
    const LOG2_LANES: u32;
    /// Loads `2^LOG2_LANES` elements (no alignment needed).
    ///
    /// # Safety
    /// `p` must be valid for reading that many elements.
    unsafe fn load(p: *const Self::Elem) -> Self;
    /// Stores `2^LOG2_LANES` elements (no alignment needed).
    ///
    /// # Safety
    /// `p` must be valid for writing that many elements.
    unsafe fn store(self, p: *mut Self::Elem);
    /// Lane-wise sum.
    fn add(self, other: Self) -> Self;
    /// Lane-wise difference.
    fn sub(self, other: Self) -> Self;
    /// The butterfly `(self + other, self - other)`; an ISA may override it to spread the two
    /// over different execution ports.
    #[inline(always)]
    fn butterfly(self, other: Self) -> (Self, Self) {
        (self.add(other), self.sub(other))
    }
    /// Lane-wise product.
    fn mul(self, other: Self) -> Self;
    /// All lanes set to `x`.
    fn splat(x: Self::Elem) -> Self;
    /// Hints that the cache line holding `p` will be read soon (no-op where unsupported).
    /// `p` need not be valid: prefetches never fault.
    #[inline(always)]
    fn prefetch(p: *const Self::Elem) {
        let _ = p;
    }
    /// The FWHT of the lanes themselves: levels `0..LOG2_LANES`, in that order, each butterfly
    /// computed as `a + b` and `a - b` with one rounding.
    fn butterflies_in_lanes(self) -> Self;
}

/// The scalar "vector" of one lane: the portable path, and the reference for layouts.
impl<T: Real> Vector for T {
    type Elem = T;
    const LOG2_LANES: u32 = 0;

    #[inline(always)]
    unsafe fn load(p: *const T) -> T {
        // SAFETY: the caller guarantees `p` is readable.
        unsafe { p.read() }
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut T) {
        // SAFETY: the caller guarantees `p` is writable.
        unsafe { p.write(self) }
    }

    #[inline(always)]
    fn add(self, other: T) -> T {
        self + other
    }

    #[inline(always)]
    fn sub(self, other: T) -> T {
        self - other
    }

    #[inline(always)]
    fn mul(self, other: T) -> T {
        self * other
    }

    #[inline(always)]
    fn splat(x: T) -> T {
        x
    }

    #[inline(always)]
    fn butterflies_in_lanes(self) -> T {
        self
    }
}

/// Runs the levels between the `N` vectors of `a` (vector `i` belongs `i` strides away), lowest
/// level first.
#[inline(always)]
fn butterflies<V: Vector, const N: usize>(a: &mut [V; N]) {
    let mut half = 1;
    while half < N {
        let mut i = 0;
        while i < N {
            if i & half == 0 {
                (a[i], a[i + half]) = a[i].butterfly(a[i + half]);
            }
            i += 1;
        }
        half *= 2;
    }
}

#[inline(always)]
fn apply_scale<V: Vector, const N: usize>(a: &mut [V; N], scale: Option<V>) {
    if let Some(s) = scale {
        let mut i = 0;
        while i < N {
            a[i] = a[i].mul(s);
            i += 1;
        }
    }
}

/// Stores vector `i` of `a` at `p + i * stride`.
///
/// # Safety
/// Each of those `N` places must be valid for writing one vector.
#[inline(always)]
unsafe fn store_all<V: Vector, const N: usize>(a: &[V; N], p: *mut V::Elem, stride: usize) {
    let mut i = 0;
    while i < N {
        // SAFETY: forwarded from the caller.
        unsafe { a[i].store(p.add(i * stride)) };
        i += 1;
    }
}

/// Prefetches elements `c..c + chunk` of `src` [`PREFETCH_BYTES`] ahead, unless that is past
/// `end`, and the same elements of `dst` when it is another buffer (a store to a line that is
/// not in cache has to read it first).
#[inline(always)]
fn prefetch_ahead<V: Vector>(
    src: *const V::Elem,
    dst: *mut V::Elem,
    c: usize,
    chunk: usize,
    end: *const V::Elem,
) {
    let size = std::mem::size_of::<V::Elem>();
    let at = c + PREFETCH_BYTES / size;
    if src.wrapping_add(at) >= end {
        return;
    }
    let mut k = 0;
    while k < chunk {
        V::prefetch(src.wrapping_add(at + k));
        if !std::ptr::eq(src, dst) {
            V::prefetch(dst.wrapping_add(at + k));
        }
        k += 64 / size;
    }
}

/// The base pass over `len` elements: chunks of `N` consecutive vectors, each transformed
/// completely (levels `0..LOG2_LANES + log2 N`) in registers, read from `src`, written to `dst`.
///
/// With `prefetch_end` (the end of the source batch), the data of a later pass is prefetched.
///
/// # Safety
/// `src` readable and `dst` writable for `len` elements, `len` a multiple of `N` vectors;
/// `src` and `dst` are the same pointer or do not overlap.
#[inline(always)]
unsafe fn base_pass<V: Vector, const N: usize>(
    src: *const V::Elem,
    dst: *mut V::Elem,
    len: usize,
    scale: Option<V>,
    prefetch_end: Option<*const V::Elem>,
) {
    let lanes = 1usize << V::LOG2_LANES;
    let chunk = N * lanes;
    let mut c = 0;
    while c < len {
        if let Some(end) = prefetch_end {
            prefetch_ahead::<V>(src, dst, c, chunk, end);
        }
        // SAFETY: `c + N * lanes <= len`, so every vector read and written is inside the row.
        unsafe {
            let mut a = [V::load(src.add(c)); N];
            let mut i = 1;
            while i < N {
                a[i] = V::load(src.add(c + i * lanes));
                i += 1;
            }
            let mut i = 0;
            while i < N {
                a[i] = a[i].butterflies_in_lanes();
                i += 1;
            }
            butterflies(&mut a);
            apply_scale(&mut a, scale);
            store_all(&a, dst.add(c), lanes);
        }
        c += chunk;
    }
}

/// A radix-`N` pass in place over `len` elements: the `log2 N` levels starting at level `h`,
/// between vectors `2^h` elements apart.
///
/// # Safety
/// `p` valid for reading and writing `len` elements; `len` a multiple of `N << h`; `2^h` a
/// multiple of the lanes.
#[inline(always)]
unsafe fn radix_pass<V: Vector, const N: usize>(
    p: *mut V::Elem,
    len: usize,
    h: u32,
    scale: Option<V>,
) {
    let lanes = 1usize << V::LOG2_LANES;
    let stride = 1usize << h;
    let mut g = 0;
    while g < len {
        let mut j = 0;
        while j < stride {
            // SAFETY: `g + j + (N - 1) * stride + lanes <= g + N * stride <= len`.
            unsafe {
                let q = p.add(g + j);
                let mut a = [V::load(q); N];
                let mut i = 1;
                while i < N {
                    a[i] = V::load(q.add(i * stride));
                    i += 1;
                }
                butterflies(&mut a);
                apply_scale(&mut a, scale);
                store_all(&a, q, stride);
            }
            j += lanes;
        }
        g += N * stride;
    }
}

/// Runs levels `h..h + r` in place (`1 <= r <= 4`).
///
/// # Safety
/// As [`radix_pass`] with `N = 2^r`.
#[inline(always)]
unsafe fn radix<V: Vector>(p: *mut V::Elem, len: usize, h: u32, r: u32, scale: Option<V>) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match r {
            1 => radix_pass::<V, 2>(p, len, h, scale),
            2 => radix_pass::<V, 4>(p, len, h, scale),
            3 => radix_pass::<V, 8>(p, len, h, scale),
            _ => radix_pass::<V, 16>(p, len, h, scale),
        }
    }
}

/// How `levels` are split into radix passes of at most [`MAX_RADIX_LOG2`] levels, as even as
/// possible (two radix-4 passes cost less than a radix-8 plus a radix-2): the number of passes.
#[inline(always)]
fn radix_passes(levels: u32) -> u32 {
    levels.div_ceil(MAX_RADIX_LOG2)
}

/// The levels pass `i` of [`radix_passes`]`(levels)` runs.
#[inline(always)]
fn radix_levels(levels: u32, i: u32) -> u32 {
    let passes = radix_passes(levels);
    levels / passes + u32::from(i < levels % passes)
}

/// Transforms one block of `2^log_len` elements (at most an L1 block) from `src` to `dst`.
///
/// # Safety
/// `src` readable and `dst` writable for `2^log_len` elements, the same pointer or disjoint;
/// `log_len >= V::LOG2_LANES`.
#[inline(always)]
unsafe fn block<V: Vector>(
    src: *const V::Elem,
    dst: *mut V::Elem,
    log_len: u32,
    scale: Option<V>,
    prefetch_end: Option<*const V::Elem>,
) {
    let len = 1usize << log_len;
    let base = log_len.min(V::LOG2_LANES + 3);
    let base_scale = if base == log_len { scale } else { None };
    // SAFETY: `len` is a multiple of the base chunk (2^base elements); pointers from the caller.
    unsafe {
        match base - V::LOG2_LANES {
            0 => base_pass::<V, 1>(src, dst, len, base_scale, prefetch_end),
            1 => base_pass::<V, 2>(src, dst, len, base_scale, prefetch_end),
            2 => base_pass::<V, 4>(src, dst, len, base_scale, prefetch_end),
            _ => base_pass::<V, 8>(src, dst, len, base_scale, prefetch_end),
        }
    }
    let mut h = base;
    for i in 0..radix_passes(log_len - base) {
        let r = radix_levels(log_len - base, i);
        let last = h + r == log_len;
        // SAFETY: `len` is a multiple of 2^(h + r) and 2^h of the lanes since h >= base.
        unsafe { radix(dst, len, h, r, if last { scale } else { None }) };
        h += r;
    }
}

/// Transforms one row of `2^log_d` elements from `src` into `dst` and multiplies by `scale`.
///
/// # Safety
/// `src` readable and `dst` writable for `2^log_d` elements, the same pointer or disjoint;
/// `log_d >= V::LOG2_LANES`.
#[inline(always)]
pub(crate) unsafe fn row<V: Vector>(
    src: *const V::Elem,
    dst: *mut V::Elem,
    log_d: u32,
    scale: Option<V>,
    prefetch_end: Option<*const V::Elem>,
) {
    let log_block = (L1_BLOCK_BYTES / std::mem::size_of::<V::Elem>()).trailing_zeros();
    if log_d <= log_block {
        // SAFETY: forwarded from the caller.
        unsafe { block(src, dst, log_d, scale, prefetch_end) };
        return;
    }
    let block_len = 1usize << log_block;
    let across = log_d - log_block;
    let passes = radix_passes(across);
    for b in 0..1usize << across {
        let start = b * block_len;
        // SAFETY: block `b` lies inside the row.
        unsafe {
            block::<V>(
                src.add(start),
                dst.add(start),
                log_block,
                None,
                prefetch_end,
            )
        };
        // After block `b`, every group of blocks that ends here is complete: combine it.
        let end = start + block_len;
        let mut span_log = log_block;
        for i in 0..passes {
            let r = radix_levels(across, i);
            span_log += r;
            if end & ((1usize << span_log) - 1) != 0 {
                break;
            }
            let span = 1usize << span_log;
            let last = i + 1 == passes;
            // SAFETY: the span `end - span..end` lies inside the row and has been written.
            unsafe {
                radix(
                    dst.add(end - span),
                    span,
                    span_log - r,
                    r,
                    if last { scale } else { None },
                )
            };
        }
    }
}

/// Transforms `rows` consecutive rows of `2^log_d` elements from `src` into `dst`.
///
/// # Safety
/// `src` readable and `dst` writable for `rows << log_d` elements, the same pointer or disjoint;
/// `log_d >= V::LOG2_LANES`.
#[inline(always)]
pub(crate) unsafe fn rows<V: Vector>(
    src: *const V::Elem,
    dst: *mut V::Elem,
    log_d: u32,
    rows: usize,
    scale: V::Elem,
) {
    let scale = if scale == V::Elem::ONE {
        None
    } else {
        Some(V::splat(scale))
    };
    let d = 1usize << log_d;
    let len = rows * d;
    let prefetch_end = if len * std::mem::size_of::<V::Elem>() > PREFETCH_MIN_BYTES {
        Some(src.wrapping_add(len))
    } else {
        None
    };
    for r in 0..rows {
        // SAFETY: row `r` lies inside both buffers.
        unsafe { row(src.add(r * d), dst.add(r * d), log_d, scale, prefetch_end) };
    }
}
