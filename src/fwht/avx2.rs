//! AVX2 + FMA vectors for the blocked kernel (x86-64, chosen at run time).
//!
//! The levels inside a register use one in-lane or cross-lane permute each: the permuted
//! vector `t` holds every element's partner, and `x * sign + t` with `sign = ±1` gives the sum
//! in the lower and the difference in the upper element of each pair. Multiplying by ±1 is
//! exact, so the fused multiply-add rounds once, exactly like `a + b` or `a - b`.

use std::arch::x86_64::*;

use super::kernel::{self, Vector};

/// Eight f32 lanes.
#[derive(Clone, Copy)]
pub(crate) struct F32x8(__m256);

/// Four f64 lanes.
#[derive(Clone, Copy)]
pub(crate) struct F64x4(__m256d);

// SAFETY (for every intrinsic call below): values of `F32x8` and `F64x4` are only created
// inside `rows_f32` / `rows_f64`, which are compiled with AVX2 and FMA and only called after
// run-time detection confirmed both, so the instructions exist wherever these run.

impl Vector for F32x8 {
    type Elem = f32;
    const LOG2_LANES: u32 = 3;

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable elements; see the note above on features.
        Self(unsafe { _mm256_loadu_ps(p) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable elements; see the note above on features.
        unsafe { _mm256_storeu_ps(p, self.0) }
    }

    #[inline(always)]
    fn add(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm256_add_ps(self.0, other.0) })
    }

    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm256_sub_ps(self.0, other.0) })
    }

    #[inline(always)]
    fn butterfly(self, other: Self) -> (Self, Self) {
        // Zen and recent Intel cores run additions on two ports and FMAs on two others: the
        // difference as `self - other * 1` (exact product, one rounding) uses the idle pair.
        // SAFETY: see the note above on features.
        unsafe {
            let one = _mm256_set1_ps(1.0);
            (
                Self(_mm256_add_ps(self.0, other.0)),
                Self(_mm256_fnmadd_ps(other.0, one, self.0)),
            )
        }
    }

    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm256_mul_ps(self.0, other.0) })
    }

    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm256_set1_ps(x) })
    }

    #[inline(always)]
    fn prefetch(p: *const f32) {
        // SAFETY: SSE is part of x86-64; a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }

    #[inline(always)]
    fn butterflies_in_lanes(self) -> Self {
        // SAFETY: see the note above on features.
        unsafe {
            let x = self.0;
            // Level 0: partners are neighbours.
            let t = _mm256_permute_ps(x, 0b10_11_00_01);
            let x = _mm256_fmadd_ps(x, _mm256_setr_ps(1., -1., 1., -1., 1., -1., 1., -1.), t);
            // Level 1: partners are two apart within each 128-bit half.
            let t = _mm256_permute_ps(x, 0b01_00_11_10);
            let x = _mm256_fmadd_ps(x, _mm256_setr_ps(1., 1., -1., -1., 1., 1., -1., -1.), t);
            // Level 2: partners are in the other 128-bit half.
            let t = _mm256_permute2f128_ps(x, x, 0x01);
            Self(_mm256_fmadd_ps(
                x,
                _mm256_setr_ps(1., 1., 1., 1., -1., -1., -1., -1.),
                t,
            ))
        }
    }
}

impl Vector for F64x4 {
    type Elem = f64;
    const LOG2_LANES: u32 = 2;

    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: the caller guarantees 4 readable elements; see the note above on features.
        Self(unsafe { _mm256_loadu_pd(p) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        // SAFETY: the caller guarantees 4 writable elements; see the note above on features.
        unsafe { _mm256_storeu_pd(p, self.0) }
    }

    #[inline(always)]
    fn add(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm256_add_pd(self.0, other.0) })
    }

    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm256_sub_pd(self.0, other.0) })
    }

    #[inline(always)]
    fn butterfly(self, other: Self) -> (Self, Self) {
        // As for f32: the difference goes to the FMA ports.
        // SAFETY: see the note above on features.
        unsafe {
            let one = _mm256_set1_pd(1.0);
            (
                Self(_mm256_add_pd(self.0, other.0)),
                Self(_mm256_fnmadd_pd(other.0, one, self.0)),
            )
        }
    }

    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm256_mul_pd(self.0, other.0) })
    }

    #[inline(always)]
    fn prefetch(p: *const f64) {
        // SAFETY: SSE is part of x86-64; a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }

    #[inline(always)]
    fn splat(x: f64) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm256_set1_pd(x) })
    }

    #[inline(always)]
    fn butterflies_in_lanes(self) -> Self {
        // SAFETY: see the note above on features.
        unsafe {
            let x = self.0;
            // Level 0: partners are neighbours.
            let t = _mm256_permute_pd(x, 0b0101);
            let x = _mm256_fmadd_pd(x, _mm256_setr_pd(1., -1., 1., -1.), t);
            // Level 1: partners are in the other 128-bit half.
            let t = _mm256_permute2f128_pd(x, x, 0x01);
            Self(_mm256_fmadd_pd(x, _mm256_setr_pd(1., 1., -1., -1.), t))
        }
    }
}

/// The blocked kernel over `rows` rows of `2^log_d >= 8` f32.
///
/// # Safety
/// The CPU supports AVX2 and FMA ([`crate::simd::Level::Avx2`]); `src` readable and `dst` writable for
/// `rows << log_d` elements, the same pointer or disjoint; `log_d >= 3`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn rows_f32(src: *const f32, dst: *mut f32, log_d: u32, rows: usize, scale: f32) {
    // SAFETY: forwarded from the caller.
    unsafe { kernel::rows::<F32x8>(src, dst, log_d, rows, scale) }
}

/// The blocked kernel over `rows` rows of `2^log_d >= 4` f64.
///
/// # Safety
/// The CPU supports AVX2 and FMA ([`crate::simd::Level::Avx2`]); `src` readable and `dst` writable for
/// `rows << log_d` elements, the same pointer or disjoint; `log_d >= 2`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn rows_f64(src: *const f64, dst: *mut f64, log_d: u32, rows: usize, scale: f64) {
    // SAFETY: forwarded from the caller.
    unsafe { kernel::rows::<F64x4>(src, dst, log_d, rows, scale) }
}
