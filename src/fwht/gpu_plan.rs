//! Launch geometry shared by the GPU kernels (`kernels/fwht.cu` and `kernels/fwht.metal`).
//!
//! A row of `D = 2^log_d` is held by `T = D / E` threads with `E = 2^log_e` values each. Rows up
//! to 2^10 fit one warp / simdgroup (`T <= 32`); longer rows span `2^log_w` warps of 32 threads
//! holding 32 values each, and exchange the warp bits through shared memory. Rows longer than
//! one block takes are transformed in blocks first, then by strided passes over the remaining
//! bits.

/// Threads per block when rows are short enough to share one.
pub(crate) const SHARED_BLOCK_THREADS: usize = 256;
/// Bits transformed by one strided pass (radix 32: one thread holds 32 values).
pub(crate) const PASS_MAX_BITS: u32 = 5;

/// How the row kernel lays out rows of `2^log_d` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowPlan {
    /// Row length, log2.
    pub log_d: u32,
    /// Values per thread, log2.
    pub log_e: u32,
    /// Warps per row, log2 (0: a row fits one warp and needs no shared memory).
    pub log_w: u32,
    /// Threads per row.
    pub threads_per_row: usize,
    /// Rows per block.
    pub rows_per_block: usize,
}

impl RowPlan {
    /// The layout for rows of `2^log_d`.
    pub fn new(log_d: u32) -> Self {
        let (log_e, log_w) = if log_d <= 10 {
            (log_d.saturating_sub(5), 0)
        } else {
            (5, log_d - 10)
        };
        let threads_per_row = 1usize << (log_d - log_e);
        RowPlan {
            log_d,
            log_e,
            log_w,
            threads_per_row,
            rows_per_block: (SHARED_BLOCK_THREADS / threads_per_row).max(1),
        }
    }

    /// Threads per block.
    pub fn block_threads(&self) -> usize {
        self.rows_per_block * self.threads_per_row
    }

    /// Blocks for `rows` rows.
    pub fn blocks(&self, rows: usize) -> usize {
        rows.div_ceil(self.rows_per_block)
    }

    /// Accumulator values of shared memory per block (0 when rows fit one warp).
    pub fn shared_values(&self) -> usize {
        if self.log_w > 0 {
            self.rows_per_block << self.log_d
        } else {
            0
        }
    }

    /// The kernel's name for input and output element types named `input`, `output`.
    pub fn kernel_name(&self, input: &str, output: &str) -> String {
        format!(
            "whvi_fwht_rows_{input}_{output}_e{}_w{}",
            self.log_e, self.log_w
        )
    }
}

/// One strided pass over index bits `[low_bit, low_bit + bits)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StridedPass {
    /// The lowest bit the pass transforms.
    pub low_bit: u32,
    /// How many bits (at most [`PASS_MAX_BITS`]).
    pub bits: u32,
    /// Whether it is the last pass (which applies the scale and writes the output type).
    pub last: bool,
}

impl StridedPass {
    /// The kernel's name for element types named `input`, `output`.
    pub fn kernel_name(&self, input: &str, output: &str) -> String {
        format!("whvi_fwht_pass_{input}_{output}_r{}", self.bits)
    }

    /// Threads the pass needs: one per column (an index with the pass's bits zero).
    pub fn columns(&self, rows: usize, log_d: u32) -> usize {
        rows << (log_d - self.bits)
    }
}

/// The strided passes over bits `[first_bit, log_d)`.
pub(crate) fn strided_passes(first_bit: u32, log_d: u32) -> Vec<StridedPass> {
    let mut passes = Vec::new();
    let mut low_bit = first_bit;
    while low_bit < log_d {
        let bits = PASS_MAX_BITS.min(log_d - low_bit);
        passes.push(StridedPass {
            low_bit,
            bits,
            last: low_bit + bits == log_d,
        });
        low_bit += bits;
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `(log_e, log_w)` pairs a kernel source instantiates with its row-kernel macros.
    fn instantiated(source: &str) -> Vec<(u32, u32)> {
        source
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("ROWS_KERNEL(TI") || l.starts_with("ROWS_KERNEL_SHARED(TI"))
            .filter_map(|l| {
                let args: Vec<&str> = l.split(['(', ',', ')']).map(str::trim).collect();
                Some((args.get(5)?.parse().ok()?, args.get(6)?.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn every_row_length_is_covered_exactly() {
        for log_d in 0..=15 {
            let plan = RowPlan::new(log_d);
            assert_eq!(plan.threads_per_row << plan.log_e, 1 << log_d, "{plan:?}");
            assert!(plan.log_e <= 5, "at most 32 values in registers: {plan:?}");
            // The shared-memory stage gives each thread W values for E / W register indices.
            assert!(plan.log_w <= plan.log_e, "{plan:?}");
            if plan.log_w > 0 {
                assert_eq!(plan.threads_per_row, 32 << plan.log_w, "{plan:?}");
            } else {
                assert!(plan.threads_per_row <= 32, "{plan:?}");
            }
            // Whole warps, at most 1024 threads, as the kernels' launch bounds assume.
            assert!(plan.block_threads() <= 1024, "{plan:?}");
            assert_eq!(plan.block_threads() % 32, 0, "{plan:?}");
            assert_eq!(
                plan.block_threads(),
                SHARED_BLOCK_THREADS.max(plan.threads_per_row)
            );
        }
        assert_eq!(RowPlan::new(12).blocks(5), 3);
        assert_eq!(RowPlan::new(10).shared_values(), 0);
        assert_eq!(RowPlan::new(13).shared_values(), 1 << 13);
        assert_eq!(RowPlan::new(11).shared_values(), 4 << 11);
    }

    #[test]
    fn passes_cover_the_remaining_bits_once() {
        for first in [13, 14, 15] {
            for log_d in first..=30 {
                let passes = strided_passes(first, log_d);
                let mut next = first;
                for pass in &passes {
                    assert_eq!(pass.low_bit, next);
                    assert!((1..=PASS_MAX_BITS).contains(&pass.bits));
                    next += pass.bits;
                    assert_eq!(pass.last, next == log_d);
                }
                assert_eq!(next, log_d);
                assert_eq!(
                    passes.iter().filter(|p| p.last).count(),
                    usize::from(log_d > first)
                );
            }
        }
        assert_eq!(strided_passes(15, 17)[0].columns(3, 17), 3 << 15);
    }

    #[test]
    fn the_kernel_sources_instantiate_every_planned_row_kernel() {
        let cuda = instantiated(include_str!("kernels/fwht.cu"));
        let metal = instantiated(include_str!("kernels/fwht.metal"));
        for (source, kernels, max_log_d) in [("fwht.cu", &cuda, 15), ("fwht.metal", &metal, 13)] {
            for log_d in 0..=max_log_d {
                let plan = RowPlan::new(log_d);
                assert!(
                    kernels.contains(&(plan.log_e, plan.log_w)),
                    "{source} lacks the row kernel e{} w{} for D = 2^{log_d}",
                    plan.log_e,
                    plan.log_w
                );
            }
        }
        assert_eq!(
            RowPlan::new(15).kernel_name("bf16", "f32"),
            "whvi_fwht_rows_bf16_f32_e5_w5"
        );
        assert_eq!(
            strided_passes(15, 17)[0].kernel_name("f32", "f16"),
            "whvi_fwht_pass_f32_f16_r2"
        );
    }
}
