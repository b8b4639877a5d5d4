//! NEON vectors for the blocked kernel (aarch64, where NEON is always present).
//!
//! Same scheme as the AVX2 module: the partner of each lane comes from one permute, and
//! `t + x * sign` with `sign = ±1` rounds once, exactly like `a + b` or `a - b`.

use std::arch::aarch64::*;

use super::kernel::{self, Vector};

/// Four f32 lanes.
#[derive(Clone, Copy)]
pub(crate) struct F32x4(float32x4_t);

/// Two f64 lanes.
#[derive(Clone, Copy)]
pub(crate) struct F64x2(float64x2_t);

// SAFETY (for every intrinsic call below): NEON is part of the aarch64 baseline that Rust
// targets, so the instructions exist on every CPU this code runs on.

impl Vector for F32x4 {
    type Elem = f32;
    const LOG2_LANES: u32 = 2;

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 4 readable elements.
        Self(unsafe { vld1q_f32(p) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 4 writable elements.
        unsafe { vst1q_f32(p, self.0) }
    }

    #[inline(always)]
    fn add(self, other: Self) -> Self {
        // SAFETY: see the note above.
        Self(unsafe { vaddq_f32(self.0, other.0) })
    }

    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        // SAFETY: see the note above.
        Self(unsafe { vsubq_f32(self.0, other.0) })
    }

    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        // SAFETY: see the note above.
        Self(unsafe { vmulq_f32(self.0, other.0) })
    }

    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: see the note above.
        Self(unsafe { vdupq_n_f32(x) })
    }

    #[inline(always)]
    fn butterflies_in_lanes(self) -> Self {
        const SIGN0: [f32; 4] = [1., -1., 1., -1.];
        const SIGN1: [f32; 4] = [1., 1., -1., -1.];
        // SAFETY: see the note above; the sign arrays hold 4 elements each.
        unsafe {
            let x = self.0;
            // Level 0: [x1, x0, x3, x2] holds every lane's partner.
            let x = vfmaq_f32(vrev64q_f32(x), x, vld1q_f32(SIGN0.as_ptr()));
            // Level 1: [x2, x3, x0, x1].
            Self(vfmaq_f32(
                vextq_f32::<2>(x, x),
                x,
                vld1q_f32(SIGN1.as_ptr()),
            ))
        }
    }
}

impl Vector for F64x2 {
    type Elem = f64;
    const LOG2_LANES: u32 = 1;

    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: the caller guarantees 2 readable elements.
        Self(unsafe { vld1q_f64(p) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        // SAFETY: the caller guarantees 2 writable elements.
        unsafe { vst1q_f64(p, self.0) }
    }

    #[inline(always)]
    fn add(self, other: Self) -> Self {
        // SAFETY: see the note above.
        Self(unsafe { vaddq_f64(self.0, other.0) })
    }

    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        // SAFETY: see the note above.
        Self(unsafe { vsubq_f64(self.0, other.0) })
    }

    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        // SAFETY: see the note above.
        Self(unsafe { vmulq_f64(self.0, other.0) })
    }

    #[inline(always)]
    fn splat(x: f64) -> Self {
        // SAFETY: see the note above.
        Self(unsafe { vdupq_n_f64(x) })
    }

    #[inline(always)]
    fn butterflies_in_lanes(self) -> Self {
        const SIGN0: [f64; 2] = [1., -1.];
        // SAFETY: see the note above; the sign array holds 2 elements.
        unsafe {
            let x = self.0;
            // Level 0: [x1, x0].
            Self(vfmaq_f64(
                vextq_f64::<1>(x, x),
                x,
                vld1q_f64(SIGN0.as_ptr()),
            ))
        }
    }
}

/// The blocked kernel over `rows` rows of `2^log_d >= 4` f32.
///
/// # Safety
/// `src` readable and `dst` writable for `rows << log_d` elements, the same pointer or
/// disjoint; `log_d >= 2`.
pub(crate) unsafe fn rows_f32(src: *const f32, dst: *mut f32, log_d: u32, rows: usize, scale: f32) {
    // SAFETY: forwarded from the caller.
    unsafe { kernel::rows::<F32x4>(src, dst, log_d, rows, scale) }
}

/// The blocked kernel over `rows` rows of `2^log_d >= 2` f64.
///
/// # Safety
/// `src` readable and `dst` writable for `rows << log_d` elements, the same pointer or
/// disjoint; `log_d >= 1`.
pub(crate) unsafe fn rows_f64(src: *const f64, dst: *mut f64, log_d: u32, rows: usize, scale: f64) {
    // SAFETY: forwarded from the caller.
    unsafe { kernel::rows::<F64x2>(src, dst, log_d, rows, scale) }
}
