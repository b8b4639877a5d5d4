//! The forward sweep of the fused batch norm + ReLU + 2x2 max pool on f32, in AVX2 and
//! AVX-512 vectors (x86-64, chosen at run time by [`crate::simd::level`]).
//!
//! A block of windows takes two loads per input row, normalises them (a multiply and an add,
//! rounded apart as in the scalar code), splits each row into its even and odd columns (the
//! windows' left and right inputs) and runs the scalar code's comparison chain lane by lane, so
//! the outputs and the window entries equal the scalar path's bit for bit. Windows past the last
//! whole block are left to the caller's scalar loop.

use crate::simd::Level;

/// The normalisation of one channel: `z = x·scale + shift`, then `+0.0` for `z < 0` when `relu`
/// (a NaN or `-0.0` passes unchanged, as in the scalar code; an IEEE `max` would not do that).
#[derive(Debug, Clone, Copy)]
pub(super) struct Normalise {
    pub scale: f32,
    pub shift: f32,
    pub relu: bool,
}

/// Pools the leading windows of one output row at `level`: `upper` and `lower` are the two
/// input rows (two values per window), `out` and `codes` the row's outputs and window entries
/// (bits 0-1 the first maximum's position, `masked` when the ReLU zeroed it). Returns how many
/// windows it wrote: whole blocks of 16 at AVX-512, then of 8 (so that rows of 8 to 15 windows,
/// a 16- to 31-pixel plane, are vectorised too); none at the portable level.
pub(super) fn pool_row_f32(
    level: Level,
    (upper, lower): (&[f32], &[f32]),
    norm: Normalise,
    masked: u8,
    (out, codes): (&mut [f32], &mut [u8]),
) -> usize {
    let n = out
        .len()
        .min(codes.len())
        .min(upper.len() / 2)
        .min(lower.len() / 2);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if level >= Level::Avx512 && level.is_supported() {
            let rows = (upper.as_ptr(), lower.as_ptr());
            let dst = (out.as_mut_ptr(), codes.as_mut_ptr());
            // SAFETY: the CPU has AVX-512 F (checked above); the pointers cover `n` windows
            // (`2n` values per input row, `n` outputs and entries), as `n` is clamped to them.
            done = unsafe { x86::avx512(rows, n, norm, masked, dst) };
        }
        if level >= Level::Avx2 && Level::Avx2.is_supported() {
            let rows = (upper[2 * done..].as_ptr(), lower[2 * done..].as_ptr());
            let dst = (out[done..].as_mut_ptr(), codes[done..].as_mut_ptr());
            // SAFETY: the CPU has AVX2 and FMA (checked above); the pointers cover the `n - done`
            // windows from `done` on.
            done += unsafe { x86::avx2(rows, n - done, norm, masked, dst) };
        }
    }
    let _ = (level, upper, lower, norm, masked);
    done
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Normalise;

    // SAFETY (for every intrinsic call below): these functions run only inside `avx512` and
    // `avx2`, which are compiled with the features they use and called after run-time
    // detection confirmed them; the `#[inline(always)]` helpers are inlined into them.

    /// `normalise` of 16 values: the scalar code's `x·scale + shift`, clamped at zero.
    #[inline(always)]
    unsafe fn normalise16(x: __m512, scale: __m512, shift: __m512, relu: bool) -> __m512 {
        let z = _mm512_add_ps(_mm512_mul_ps(x, scale), shift);
        if relu {
            let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, _mm512_setzero_ps());
            _mm512_mask_blend_ps(negative, z, _mm512_setzero_ps())
        } else {
            z
        }
    }

    /// The scalar `challenge`: lanes where `v` beats `best` (larger, or the first NaN) take `v`
    /// and position `i`.
    #[inline(always)]
    unsafe fn challenge16(best: __m512, at: __m512i, v: __m512, i: i32) -> (__m512, __m512i) {
        let larger = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best);
        let first_nan =
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) & _mm512_cmp_ps_mask::<_CMP_ORD_Q>(best, best);
        let wins = larger | first_nan;
        (
            _mm512_mask_blend_ps(wins, best, v),
            _mm512_mask_blend_epi32(wins, at, _mm512_set1_epi32(i)),
        )
    }

    /// Sixteen windows per block.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F; `rows` readable for `2n` values each, `dst` writable for `n`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(
        (upper, lower): (*const f32, *const f32),
        n: usize,
        norm: Normalise,
        masked: u8,
        (out, codes): (*mut f32, *mut u8),
    ) -> usize {
        let blocks = n / 16;
        let scale = _mm512_set1_ps(norm.scale);
        let shift = _mm512_set1_ps(norm.shift);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        let mask_bit = _mm512_set1_epi32(i32::from(masked));
        for block in 0..blocks {
            // SAFETY: block < n / 16, so values 32·block..32·block + 32 of each row exist.
            let (u0, u1, l0, l1) = unsafe {
                (
                    _mm512_loadu_ps(upper.add(32 * block)),
                    _mm512_loadu_ps(upper.add(32 * block + 16)),
                    _mm512_loadu_ps(lower.add(32 * block)),
                    _mm512_loadu_ps(lower.add(32 * block + 16)),
                )
            };
            let (u0, u1) = (
                normalise16(u0, scale, shift, norm.relu),
                normalise16(u1, scale, shift, norm.relu),
            );
            let (l0, l1) = (
                normalise16(l0, scale, shift, norm.relu),
                normalise16(l1, scale, shift, norm.relu),
            );
            let a = _mm512_permutex2var_ps(u0, even, u1);
            let b = _mm512_permutex2var_ps(u0, odd, u1);
            let (best, at) = challenge16(a, _mm512_setzero_si512(), b, 1);
            let (best, at) = challenge16(best, at, _mm512_permutex2var_ps(l0, even, l1), 2);
            let (best, at) = challenge16(best, at, _mm512_permutex2var_ps(l0, odd, l1), 3);
            let code = if norm.relu {
                let zeroed = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(best, _mm512_setzero_ps());
                _mm512_mask_or_epi32(at, zeroed, at, mask_bit)
            } else {
                at
            };
            // SAFETY: block < n / 16, so outputs and entries 16·block..16·block + 16 exist.
            unsafe {
                _mm512_storeu_ps(out.add(16 * block), best);
                _mm_storeu_si128(codes.add(16 * block).cast(), _mm512_cvtepi32_epi8(code));
            }
        }
        16 * blocks
    }

    /// `normalise` of 8 values.
    #[inline(always)]
    unsafe fn normalise8(x: __m256, scale: __m256, shift: __m256, relu: bool) -> __m256 {
        let z = _mm256_add_ps(_mm256_mul_ps(x, scale), shift);
        if relu {
            let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(z, _mm256_setzero_ps());
            _mm256_blendv_ps(z, _mm256_setzero_ps(), negative)
        } else {
            z
        }
    }

    /// The even and the odd elements of the 16 values `lo`, `hi`, in order.
    #[inline(always)]
    unsafe fn split8(lo: __m256, hi: __m256) -> (__m256, __m256) {
        // Within 128-bit lanes, then the 64-bit pairs put in order (0, 2, 1, 3).
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(lo, hi);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(lo, hi);
        (pairs_in_order(even), pairs_in_order(odd))
    }

    /// The four 64-bit pairs of `v` in the order (0, 2, 1, 3).
    #[inline(always)]
    unsafe fn pairs_in_order(v: __m256) -> __m256 {
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
    }

    /// [`challenge16`] on 8 lanes.
    #[inline(always)]
    unsafe fn challenge8(best: __m256, at: __m256i, v: __m256, i: i32) -> (__m256, __m256i) {
        let larger = _mm256_cmp_ps::<_CMP_GT_OQ>(v, best);
        let first_nan = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v),
            _mm256_cmp_ps::<_CMP_ORD_Q>(best, best),
        );
        let wins = _mm256_or_ps(larger, first_nan);
        let at = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(at),
            _mm256_castsi256_ps(_mm256_set1_epi32(i)),
            wins,
        ));
        (_mm256_blendv_ps(best, v, wins), at)
    }

    /// Eight windows per block.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `rows` readable for `2n` values each, `dst` writable for
    /// `n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(
        (upper, lower): (*const f32, *const f32),
        n: usize,
        norm: Normalise,
        masked: u8,
        (out, codes): (*mut f32, *mut u8),
    ) -> usize {
        let blocks = n / 8;
        let scale = _mm256_set1_ps(norm.scale);
        let shift = _mm256_set1_ps(norm.shift);
        let mask_bit = _mm256_set1_epi32(i32::from(masked));
        for block in 0..blocks {
            // SAFETY: block < n / 8, so values 16·block..16·block + 16 of each row exist.
            let (u0, u1, l0, l1) = unsafe {
                (
                    _mm256_loadu_ps(upper.add(16 * block)),
                    _mm256_loadu_ps(upper.add(16 * block + 8)),
                    _mm256_loadu_ps(lower.add(16 * block)),
                    _mm256_loadu_ps(lower.add(16 * block + 8)),
                )
            };
            let (a, b) = split8(
                normalise8(u0, scale, shift, norm.relu),
                normalise8(u1, scale, shift, norm.relu),
            );
            let (c, d) = split8(
                normalise8(l0, scale, shift, norm.relu),
                normalise8(l1, scale, shift, norm.relu),
            );
            let (best, at) = challenge8(a, _mm256_setzero_si256(), b, 1);
            let (best, at) = challenge8(best, at, c, 2);
            let (best, at) = challenge8(best, at, d, 3);
            let code = if norm.relu {
                let zeroed = _mm256_cmp_ps::<_CMP_LE_OQ>(best, _mm256_setzero_ps());
                _mm256_or_si256(at, _mm256_and_si256(_mm256_castps_si256(zeroed), mask_bit))
            } else {
                at
            };
            let mut lanes = [0i32; 8];
            // SAFETY: block < n / 8, so outputs and entries 8·block..8·block + 8 exist;
            // `lanes` holds 8 i32.
            unsafe {
                _mm256_storeu_ps(out.add(8 * block), best);
                _mm256_storeu_si256(lanes.as_mut_ptr().cast(), code);
                for (k, &lane) in lanes.iter().enumerate() {
                    *codes.add(8 * block + k) = lane as u8;
                }
            }
        }
        8 * blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::pool::window_max;

    /// The scalar code's window: normalised, pooled, and its entry.
    fn reference(x: [f32; 4], norm: Normalise) -> (f32, u8) {
        let normalised = x.map(|v| {
            let z = v * norm.scale + norm.shift;
            if norm.relu && z < 0.0 {
                0.0
            } else {
                z
            }
        });
        let (best, at) = window_max(normalised);
        let zeroed = norm.relu && best <= 0.0;
        (best, at as u8 | if zeroed { 4 } else { 0 })
    }

    #[test]
    fn every_level_pools_like_the_scalar_code() {
        let n = 41;
        // Ties (a coarse grid), NaNs and signed zeros; the shifts below make whole windows
        // negative (masked by the ReLU) and, with `-0.0`, normalised values of -0.0.
        let values: Vec<f32> = (0..4 * n)
            .map(|k| match k % 23 {
                5 | 17 if k % 3 == 0 => f32::NAN,
                9 | 14 => -0.0,
                _ => ((k * 37) % 11) as f32 * 0.5 - 2.5,
            })
            .collect();
        let (upper, lower) = values.split_at(2 * n);
        let affines = [
            (1.5, -0.25),
            (-0.75, 0.1),
            (1.5, -6.0),
            (1.0, -0.0),
            (-1.0, -0.0),
        ];
        let mut seen = [0usize; 3];
        for level in crate::simd::supported() {
            let width = match level {
                Level::Avx512 | Level::Avx2 => 8,
                _ => n + 1,
            };
            for relu in [false, true] {
                for (scale, shift) in affines {
                    let norm = Normalise { scale, shift, relu };
                    let (mut out, mut codes) = (vec![0.0; n], vec![0; n]);
                    let done = pool_row_f32(level, (upper, lower), norm, 4, (&mut out, &mut codes));
                    assert_eq!(done, n / width * width, "{level:?}");
                    for i in 0..done {
                        let x = [
                            upper[2 * i],
                            upper[2 * i + 1],
                            lower[2 * i],
                            lower[2 * i + 1],
                        ];
                        let (best, code) = reference(x, norm);
                        let label = format!("{level:?} relu={relu} {scale}x+{shift} window {i}");
                        assert_eq!(codes[i], code, "{label}");
                        assert!(
                            out[i].to_bits() == best.to_bits() || out[i].is_nan() && best.is_nan(),
                            "{label}: {} against {best}",
                            out[i]
                        );
                        seen[0] += usize::from(code & 4 != 0);
                        seen[1] += usize::from(best.to_bits() == (-0.0f32).to_bits());
                        seen[2] += usize::from(code & 3 != 0);
                    }
                }
            }
        }
        // The data reach the ReLU's mask, a -0.0 maximum and maxima off the first position
        // (on a CPU with vector levels; the portable level pools nothing here).
        if crate::simd::supported().len() > 1 {
            assert!(seen.iter().all(|&count| count > 0), "{seen:?}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_kernel_takes_whole_blocks_of_16() {
        if !Level::Avx512.is_supported() {
            return;
        }
        let (rows, mut out, mut codes) = (vec![1.0f32; 82], vec![0.0f32; 41], vec![0u8; 41]);
        let norm = Normalise {
            scale: 1.0,
            shift: 0.0,
            relu: true,
        };
        let dst = (out.as_mut_ptr(), codes.as_mut_ptr());
        // SAFETY: AVX-512 F is supported (checked above); each row holds 2·41 values and the
        // outputs 41.
        let done = unsafe { x86::avx512((rows.as_ptr(), rows.as_ptr()), 41, norm, 4, dst) };
        assert_eq!(done, 32);
        assert!(out[..32].iter().all(|&v| v == 1.0) && out[32..].iter().all(|&v| v == 0.0));
    }
}
