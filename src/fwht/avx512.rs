//! AVX-512 F vectors for the blocked kernel (x86-64, chosen at run time).
//!
//! The same scheme as the AVX2 module, twice as wide: the levels inside a register use one
//! permute each (within 128-bit lanes for the first two f32 levels, then whole 128-bit or
//! 256-bit lanes swapped by `shuffle_f32x4` / `shuffle_f64x2`), and `x * sign + t` with
//! `sign = ±1` gives the sum in the lower and the difference in the upper element of each pair
//! with one rounding, so the results equal the other paths' bit for bit.

use std::arch::x86_64::*;

use super::kernel::{self, Vector};

/// Sixteen f32 lanes.
#[derive(Clone, Copy)]
pub(crate) struct F32x16(__m512);

/// Eight f64 lanes.
#[derive(Clone, Copy)]
pub(crate) struct F64x8(__m512d);

/// `shuffle_f32x4` / `shuffle_f64x2` selector that swaps the two 128-bit lanes of each 256-bit
/// half: lanes (1, 0, 3, 2).
const SWAP_128: i32 = 0b10_11_00_01;

/// Selector that swaps the two 256-bit halves: 128-bit lanes (2, 3, 0, 1).
const SWAP_256: i32 = 0b01_00_11_10;

// SAFETY (for every intrinsic call below): values of `F32x16` and `F64x8` are only created
// inside `rows_f32` / `rows_f64`, which are compiled with AVX-512 F (and AVX2 + FMA, which
// every AVX-512 CPU has) and only called after run-time detection confirmed them.

impl Vector for F32x16 {
    type Elem = f32;
    const LOG2_LANES: u32 = 4;

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 16 readable elements; see the note above on features.
        Self(unsafe { _mm512_loadu_ps(p) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 16 writable elements; see the note above on features.
        unsafe { _mm512_storeu_ps(p, self.0) }
    }

    #[inline(always)]
    fn add(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm512_add_ps(self.0, other.0) })
    }

    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm512_sub_ps(self.0, other.0) })
    }

    #[inline(always)]
    fn butterfly(self, other: Self) -> (Self, Self) {
        // As for AVX2: the difference as `self - other * 1` goes to the FMA ports.
        // SAFETY: see the note above on features.
        unsafe {
            let one = _mm512_set1_ps(1.0);
            (
                Self(_mm512_add_ps(self.0, other.0)),
                Self(_mm512_fnmadd_ps(other.0, one, self.0)),
            )
        }
    }

    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm512_mul_ps(self.0, other.0) })
    }

    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm512_set1_ps(x) })
    }

    #[inline(always)]
    fn prefetch(p: *const f32) {
        // SAFETY: SSE is part of x86-64; a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }

    #[inline(always)]
    fn butterflies_in_lanes(self) -> Self {
        let (p, m) = (1.0f32, -1.0f32);
        // SAFETY: see the note above on features.
        unsafe {
            let x = self.0;
            // Level 0: partners are neighbours.
            let t = _mm512_permute_ps::<0b10_11_00_01>(x);
            let s = _mm512_setr_ps(p, m, p, m, p, m, p, m, p, m, p, m, p, m, p, m);
            let x = _mm512_fmadd_ps(x, s, t);
            // Level 1: partners are two apart within each 128-bit lane.
            let t = _mm512_permute_ps::<0b01_00_11_10>(x);
            let s = _mm512_setr_ps(p, p, m, m, p, p, m, m, p, p, m, m, p, p, m, m);
            let x = _mm512_fmadd_ps(x, s, t);
            // Level 2: partners are in the other 128-bit lane of the same 256-bit half.
            let t = _mm512_shuffle_f32x4::<SWAP_128>(x, x);
            let s = _mm512_setr_ps(p, p, p, p, m, m, m, m, p, p, p, p, m, m, m, m);
            let x = _mm512_fmadd_ps(x, s, t);
            // Level 3: partners are in the other 256-bit half.
            let t = _mm512_shuffle_f32x4::<SWAP_256>(x, x);
            let s = _mm512_setr_ps(p, p, p, p, p, p, p, p, m, m, m, m, m, m, m, m);
            Self(_mm512_fmadd_ps(x, s, t))
        }
    }
}

impl Vector for F64x8 {
    type Elem = f64;
    const LOG2_LANES: u32 = 3;

    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: the caller guarantees 8 readable elements; see the note above on features.
        Self(unsafe { _mm512_loadu_pd(p) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        // SAFETY: the caller guarantees 8 writable elements; see the note above on features.
        unsafe { _mm512_storeu_pd(p, self.0) }
    }

    #[inline(always)]
    fn add(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm512_add_pd(self.0, other.0) })
    }

    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm512_sub_pd(self.0, other.0) })
    }

    #[inline(always)]
    fn butterfly(self, other: Self) -> (Self, Self) {
        // SAFETY: see the note above on features.
        unsafe {
            let one = _mm512_set1_pd(1.0);
            (
                Self(_mm512_add_pd(self.0, other.0)),
                Self(_mm512_fnmadd_pd(other.0, one, self.0)),
            )
        }
    }

    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm512_mul_pd(self.0, other.0) })
    }

    #[inline(always)]
    fn splat(x: f64) -> Self {
        // SAFETY: see the note above on features.
        Self(unsafe { _mm512_set1_pd(x) })
    }

    #[inline(always)]
    fn prefetch(p: *const f64) {
        // SAFETY: SSE is part of x86-64; a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
    }

    #[inline(always)]
    fn butterflies_in_lanes(self) -> Self {
        let (p, m) = (1.0f64, -1.0f64);
        // SAFETY: see the note above on features.
        unsafe {
            let x = self.0;
            // Level 0: partners are neighbours (each element takes the other half of its
            // 128-bit lane: selector bit set for the even, clear for the odd elements).
            let t = _mm512_permute_pd::<0b0101_0101>(x);
            let x = _mm512_fmadd_pd(x, _mm512_setr_pd(p, m, p, m, p, m, p, m), t);
            // Level 1: partners are in the other 128-bit lane of the same 256-bit half.
            let t = _mm512_shuffle_f64x2::<SWAP_128>(x, x);
            let x = _mm512_fmadd_pd(x, _mm512_setr_pd(p, p, m, m, p, p, m, m), t);
            // Level 2: partners are in the other 256-bit half.
            let t = _mm512_shuffle_f64x2::<SWAP_256>(x, x);
            Self(_mm512_fmadd_pd(
                x,
                _mm512_setr_pd(p, p, p, p, m, m, m, m),
                t,
            ))
        }
    }
}

/// The blocked kernel over `rows` rows of `2^log_d >= 16` f32.
///
/// # Safety
/// The CPU supports AVX-512 F, AVX2 and FMA ([`crate::simd::Level::Avx512`]); `src` readable
/// and `dst` writable for `rows << log_d` elements, the same pointer or disjoint; `log_d >= 4`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn rows_f32(src: *const f32, dst: *mut f32, log_d: u32, rows: usize, scale: f32) {
    // SAFETY: forwarded from the caller.
    unsafe { kernel::rows::<F32x16>(src, dst, log_d, rows, scale) }
}

/// The blocked kernel over `rows` rows of `2^log_d >= 8` f64.
///
/// # Safety
/// The CPU supports AVX-512 F, AVX2 and FMA ([`crate::simd::Level::Avx512`]); `src` readable
/// and `dst` writable for `rows << log_d` elements, the same pointer or disjoint; `log_d >= 3`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn rows_f64(src: *const f64, dst: *mut f64, log_d: u32, rows: usize, scale: f64) {
    // SAFETY: forwarded from the caller.
    unsafe { kernel::rows::<F64x8>(src, dst, log_d, rows, scale) }
}
