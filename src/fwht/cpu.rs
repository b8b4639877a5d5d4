//! CPU kernels of the fast Walsh-Hadamard transform.
//!
//! Every entry point transforms contiguous rows of length `d` (a power of two), in natural
//! (Sylvester) order, and multiplies the result by `scale`.
//!
//! The work is done by one blocked algorithm (in-register butterflies for the first levels,
//! radix-4/8 passes, L1-sized blocks for long rows; see the `kernel` module) instantiated for
//! AVX-512 F and for AVX2 + FMA on x86-64, NEON on aarch64, and plain scalars everywhere else;
//! [`Path::Auto`] runs the widest that [`crate::simd::level`] allows. Batches of at least
//! [`PAR_MIN_BYTES`] are split by rows over the current rayon pool. The out-of-place functions
//! read the source only in the first pass, so the copy costs no extra sweep over memory.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::kernel::{self, Real};
use crate::simd::{self, Level};

/// Batches of at least this many bytes are split by rows over the current rayon thread pool;
/// below it the hand-off costs about as much as the transform itself.
const PAR_MIN_BYTES: usize = 256 << 10;

/// The fewest bytes of rows a parallel task gets, so tasks stay long next to rayon's overhead.
const TASK_MIN_BYTES: usize = 64 << 10;

/// Which implementation of the CPU kernel runs.
///
/// All of them compute the same transform with the same operations in the same order, so they
/// agree to the last bit; [`Path::Auto`] is what the public functions run. The others are chosen
/// only by the tests, which run every path side by side (`WHVI_SIMD` picks the level of `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Path {
    /// The fastest kernel for this CPU: see [`auto_kernel`].
    #[default]
    Auto,
    /// The blocked algorithm on the vectors of one instruction set. Asking for one this CPU
    /// lacks ([`Level::is_supported`]) panics rather than executing unknown instructions.
    Simd(Level),
    /// The blocked algorithm on scalars, without `core::arch`: runs on every platform.
    Portable,
    /// The plain radix-2 loop, the reference the others are tested against.
    Reference,
}

impl Path {
    /// Every concrete path this CPU can run: the reference, the portable kernel, and one per
    /// supported vector instruction set.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Path> {
        let mut paths = vec![Path::Reference, Path::Portable];
        for level in simd::supported() {
            if level != Level::Portable {
                paths.push(Path::Simd(level));
            }
        }
        paths
    }
}

/// The name of the kernel the transform runs on this machine: `"avx512"`, `"avx2"`, `"neon"`
/// or `"portable"` (see [`crate::simd::level`]).
pub fn auto_kernel() -> &'static str {
    simd::level().name()
}

/// A kernel over `rows` rows of `2^log_d` elements from `src` to `dst` (the same pointer or
/// disjoint), times `scale`.
type RowsFn<T> = unsafe fn(*const T, *mut T, u32, usize, T);

/// The element types the kernels are instantiated for.
pub(crate) trait Elem: Real + 'static {
    /// The kernel that `path` selects for rows of `2^log_d` elements.
    fn rows_fn(path: Path, log_d: u32) -> RowsFn<Self>;
}

impl Elem for f32 {
    fn rows_fn(path: Path, log_d: u32) -> RowsFn<f32> {
        match path {
            Path::Reference => reference_rows::<f32>,
            Path::Portable => portable_rows::<f32>,
            Path::Auto => simd_rows_f32(simd::level(), log_d),
            Path::Simd(level) => simd_rows_f32(checked(level), log_d),
        }
    }
}

impl Elem for f64 {
    fn rows_fn(path: Path, log_d: u32) -> RowsFn<f64> {
        match path {
            Path::Reference => reference_rows::<f64>,
            Path::Portable => portable_rows::<f64>,
            Path::Auto => simd_rows_f64(simd::level(), log_d),
            Path::Simd(level) => simd_rows_f64(checked(level), log_d),
        }
    }
}

/// `level`, after checking that this CPU can run it: executing instructions it lacks would
/// crash the process, so a request for one is a programming error.
fn checked(level: Level) -> Level {
    assert!(
        level.is_supported(),
        "fwht: this CPU cannot run the {} kernel",
        level.name()
    );
    level
}

/// The widest f32 kernel at or below `level` (which the CPU supports) for rows of `2^log_d`:
/// rows shorter than a vector go to a narrower one.
fn simd_rows_f32(level: Level, log_d: u32) -> RowsFn<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if level >= Level::Avx512 && log_d >= 4 {
            return super::avx512::rows_f32;
        }
        if level >= Level::Avx2 && log_d >= 3 {
            return super::avx2::rows_f32;
        }
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::Neon && log_d >= 2 {
        return super::neon::rows_f32;
    }
    let _ = (level, log_d);
    portable_rows::<f32>
}

/// As [`simd_rows_f32`], for f64.
fn simd_rows_f64(level: Level, log_d: u32) -> RowsFn<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if level >= Level::Avx512 && log_d >= 3 {
            return super::avx512::rows_f64;
        }
        if level >= Level::Avx2 && log_d >= 2 {
            return super::avx2::rows_f64;
        }
    }
    #[cfg(target_arch = "aarch64")]
    if level == Level::Neon && log_d >= 1 {
        return super::neon::rows_f64;
    }
    let _ = (level, log_d);
    portable_rows::<f64>
}

/// The blocked algorithm with one-element "vectors".
///
/// # Safety
/// `src` readable and `dst` writable for `rows << log_d` elements, the same pointer or disjoint.
unsafe fn portable_rows<T: Real>(src: *const T, dst: *mut T, log_d: u32, rows: usize, scale: T) {
    // SAFETY: forwarded from the caller; one-element vectors need `log_d >= 0`.
    unsafe { kernel::rows::<T>(src, dst, log_d, rows, scale) }
}

/// The plain radix-2 transform: copy, then every level over the whole row, then the scale.
///
/// # Safety
/// `src` readable and `dst` writable for `rows << log_d` elements, the same pointer or disjoint.
unsafe fn reference_rows<T: Real>(src: *const T, dst: *mut T, log_d: u32, rows: usize, scale: T) {
    let len = rows << log_d;
    if !std::ptr::eq(src, dst) {
        // SAFETY: both ranges are valid and, being different pointers, disjoint (caller).
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    }
    // SAFETY: `dst` is valid for `len` elements, all initialised now, and nothing else
    // accesses them while this slice lives.
    let data = unsafe { std::slice::from_raw_parts_mut(dst, len) };
    for row in data.chunks_exact_mut(1 << log_d) {
        let mut h = 1;
        while h < row.len() {
            for block in row.chunks_exact_mut(2 * h) {
                let (lo, hi) = block.split_at_mut(h);
                for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                    let (x, y) = (*a, *b);
                    *a = x + y;
                    *b = x - y;
                }
            }
            h *= 2;
        }
        for v in row.iter_mut() {
            *v = *v * scale;
        }
    }
}

/// A raw pointer that rayon tasks may share: each task touches only its own rows.
#[derive(Clone, Copy)]
struct SharedPtr<T>(*mut T);

// SAFETY: the tasks that receive a `SharedPtr` access disjoint row ranges of a buffer that
// outlives them (see `run`).
unsafe impl<T: Send> Send for SharedPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    /// Takes the pointer through a method so closures capture the whole (`Sync`) wrapper.
    fn get(self) -> *mut T {
        self.0
    }
}

/// Checks the row layout and returns `log2 d`.
fn log2_row(len: usize, d: usize) -> u32 {
    assert!(
        d.is_power_of_two(),
        "fwht: row length {d} is not a power of two"
    );
    assert!(
        len.is_multiple_of(d),
        "fwht: buffer length {len} is not a whole number of rows of length {d}"
    );
    d.trailing_zeros()
}

/// Transforms `len / d` rows from `src` to `dst`, over the rayon pool when the batch is large.
///
/// # Safety
/// `src` readable and `dst` writable for `len` elements, the same pointer or disjoint, and not
/// accessed by anything else meanwhile; `d` a power of two dividing `len`.
unsafe fn run<T: Elem>(path: Path, src: *const T, dst: *mut T, len: usize, d: usize, scale: T) {
    let log_d = d.trailing_zeros();
    let rows = len / d;
    let f = T::rows_fn(path, log_d);
    let size = std::mem::size_of::<T>();
    let threads = rayon::current_num_threads();
    if threads == 1 || rows < 2 || len * size < PAR_MIN_BYTES {
        // SAFETY: forwarded from the caller.
        unsafe { f(src, dst, log_d, rows, scale) };
        return;
    }
    // A few tasks per thread even out rows that take longer (page faults, a busy core).
    let per_task = rows
        .div_ceil(4 * threads)
        .max(TASK_MIN_BYTES.div_ceil(d * size));
    let (src, dst) = (SharedPtr(src.cast_mut()), SharedPtr(dst));
    (0..rows.div_ceil(per_task)).into_par_iter().for_each(|t| {
        let first = t * per_task;
        let n = per_task.min(rows - first);
        // SAFETY: rows `first..first + n` are inside both buffers and no other task touches
        // them; the caller keeps the buffers alive until `for_each` returns.
        unsafe {
            f(
                src.get().add(first * d),
                dst.get().add(first * d),
                log_d,
                n,
                scale,
            )
        };
    });
}

/// Transforms `data` in place with the fastest kernel (for the tensor op).
pub(crate) fn transform_in_place<T: Elem>(data: &mut [T], d: usize, scale: T) {
    in_place(Path::Auto, data, d, scale);
}

fn in_place<T: Elem>(path: Path, data: &mut [T], d: usize, scale: T) {
    log2_row(data.len(), d);
    let p = data.as_mut_ptr();
    // SAFETY: `data` is exclusively borrowed, valid for its length, and made of whole rows.
    unsafe { run(path, p, p, data.len(), d, scale) };
}

fn into<T: Elem>(path: Path, src: &[T], dst: &mut [MaybeUninit<T>], d: usize, scale: T) {
    assert_eq!(
        src.len(),
        dst.len(),
        "fwht: source and destination lengths differ"
    );
    log2_row(src.len(), d);
    // SAFETY: `dst` is exclusively borrowed, so disjoint from `src`; every element of `dst` is
    // written before it is read; both hold the same whole number of rows.
    unsafe {
        run(
            path,
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            src.len(),
            d,
            scale,
        )
    };
}

/// Views an initialised slice as possibly-uninitialised memory, for the `_into` functions.
fn as_uninit<T>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and the kernels only write initialised
    // values, so the slice stays initialised.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

/// Transforms every row of `data` (rows of length `d`) in place and multiplies by `scale`.
///
/// # Panics
/// If `d` is not a power of two or `data.len()` is not a multiple of `d`.
pub fn fwht_rows_f32(data: &mut [f32], d: usize, scale: f32) {
    in_place(Path::Auto, data, d, scale);
}

/// Transforms every row of `data` (rows of length `d`) in place and multiplies by `scale`.
///
/// # Panics
/// If `d` is not a power of two or `data.len()` is not a multiple of `d`.
pub fn fwht_rows_f64(data: &mut [f64], d: usize, scale: f64) {
    in_place(Path::Auto, data, d, scale);
}

/// Writes the transform of every row of `src` into `dst` (same length), times `scale`.
///
/// # Panics
/// If the lengths differ, `d` is not a power of two or the length is not a multiple of `d`.
pub fn fwht_rows_f32_into(src: &[f32], dst: &mut [f32], d: usize, scale: f32) {
    into(Path::Auto, src, as_uninit(dst), d, scale);
}

/// Writes the transform of every row of `src` into `dst` (same length), times `scale`.
///
/// # Panics
/// If the lengths differ, `d` is not a power of two or the length is not a multiple of `d`.
pub fn fwht_rows_f64_into(src: &[f64], dst: &mut [f64], d: usize, scale: f64) {
    into(Path::Auto, src, as_uninit(dst), d, scale);
}

/// [`fwht_rows_f32`] through the chosen [`Path`] (to test or time one kernel).
#[cfg(test)]
pub(crate) fn fwht_rows_f32_using(path: Path, data: &mut [f32], d: usize, scale: f32) {
    in_place(path, data, d, scale);
}

/// [`fwht_rows_f64`] through the chosen [`Path`] (to test or time one kernel).
#[cfg(test)]
pub(crate) fn fwht_rows_f64_using(path: Path, data: &mut [f64], d: usize, scale: f64) {
    in_place(path, data, d, scale);
}

/// [`fwht_rows_f32_into`] through the chosen [`Path`] (to test or time one kernel).
#[cfg(test)]
pub(crate) fn fwht_rows_f32_into_using(
    path: Path,
    src: &[f32],
    dst: &mut [f32],
    d: usize,
    scale: f32,
) {
    into(path, src, as_uninit(dst), d, scale);
}

/// [`fwht_rows_f64_into`] through the chosen [`Path`] (to test or time one kernel).
#[cfg(test)]
pub(crate) fn fwht_rows_f64_into_using(
    path: Path,
    src: &[f64],
    dst: &mut [f64],
    d: usize,
    scale: f64,
) {
    into(path, src, as_uninit(dst), d, scale);
}

/// Transforms `src` into a new vector, without first zeroing it (for the tensor op).
pub(crate) fn fwht_rows_to_vec<T: Elem>(src: &[T], d: usize, scale: T) -> Vec<T> {
    let mut out = Vec::with_capacity(src.len());
    prefer_huge_pages(out.spare_capacity_mut());
    into(
        Path::Auto,
        src,
        &mut out.spare_capacity_mut()[..src.len()],
        d,
        scale,
    );
    // SAFETY: `into` wrote all `src.len()` elements.
    unsafe { out.set_len(src.len()) };
    out
}

/// Outputs at least this large are fresh pages from the kernel, and faulting them in 4 KiB at
/// a time costs several times the transform itself.
const HUGE_PAGES_MIN_BYTES: usize = 4 << 20;

/// Asks Linux to back `buf` with transparent huge pages when it is large: 512 times fewer page
/// faults on first touch. The kernel still zeroes the pages, which is what remains of the cost.
#[cfg(target_os = "linux")]
fn prefer_huge_pages<T>(buf: &mut [MaybeUninit<T>]) {
    const PAGE: usize = 4096;
    let bytes = std::mem::size_of_val(buf);
    if bytes < HUGE_PAGES_MIN_BYTES {
        return;
    }
    let start = (buf.as_mut_ptr() as usize).next_multiple_of(PAGE);
    let end = (buf.as_mut_ptr() as usize + bytes) / PAGE * PAGE;
    // SAFETY: `start..end` lies inside the allocation behind `buf`, which we own exclusively;
    // MADV_HUGEPAGE only changes how future page faults are served, never the contents. A
    // failure (THP disabled, old kernel) leaves the default behaviour, so the result is ignored.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn prefer_huge_pages<T>(_buf: &mut [MaybeUninit<T>]) {}
