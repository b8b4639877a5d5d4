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
/// Threads per block of the strided passes (the CUDA kernels' launch bound).
pub(crate) const PASS_BLOCK_THREADS: usize = 256;

/// An element type the kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Element {
    F32,
    F64,
    F16,
    Bf16,
}

impl Element {
    /// The type's name in the kernel names.
    pub fn name(self) -> &'static str {
        match self {
            Element::F32 => "f32",
            Element::F64 => "f64",
            Element::F16 => "f16",
            Element::Bf16 => "bf16",
        }
    }

    /// Bytes of the kernels' accumulator (f64 for f64, f32 otherwise).
    pub fn accumulator_bytes(self) -> usize {
        if self == Element::F64 {
            8
        } else {
            4
        }
    }

    fn is_half(self) -> bool {
        matches!(self, Element::F16 | Element::Bf16)
    }
}

/// What a GPU backend's launches may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The longest row (log2) one row launch transforms: its accumulators must fit in one
    /// block's shared memory.
    pub max_row_log2: u32,
    /// The most blocks one strided pass launches (its threads then loop over further
    /// columns); `None`: one thread per column.
    pub max_pass_blocks: Option<usize>,
}

impl Limits {
    #[cfg(any(feature = "cuda", test))]
    /// CUDA: 128 KiB of shared memory per row (2^15 f32 or 2^14 f64 accumulators), and a
    /// grid-stride loop past 2^16 pass blocks.
    pub fn cuda(element: Element) -> Self {
        Limits {
            max_row_log2: if element.accumulator_bytes() == 8 {
                14
            } else {
                15
            },
            max_pass_blocks: Some(1 << 16),
        }
    }

    #[cfg(any(feature = "metal", test))]
    /// Metal: the 32 KiB of threadgroup memory every Apple GPU offers (2^13 f32).
    pub fn metal() -> Self {
        Limits {
            max_row_log2: 13,
            max_pass_blocks: None,
        }
    }
}

/// A buffer a launch reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Buffer {
    /// The op's input, of the op's element type.
    Input,
    /// f32 scratch the size of the output: long half-precision rows are accumulated there so
    /// that they are rounded once.
    Workspace,
    /// The op's output, of the op's element type.
    Output,
}

/// One kernel launch, with the arguments every kernel takes:
/// `(x, y, rows, log_d, fourth, scale)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Launch {
    /// The kernel's exported name.
    pub kernel: String,
    /// What the kernel reads.
    pub x: Buffer,
    /// What the kernel writes (the same as `x` for an in-place pass).
    pub y: Buffer,
    /// Blocks (threadgroups) in the grid.
    pub grid: usize,
    /// Threads per block.
    pub block: usize,
    /// Bytes of shared (threadgroup) memory per block.
    pub shared_bytes: usize,
    /// The kernel's `rows` argument: rows of `2^log_d` elements.
    pub rows: usize,
    /// Row length, log2.
    pub log_d: u32,
    /// Rows per block for a row kernel; the lowest bit transformed for a strided pass.
    pub fourth: u32,
    /// Multiplies the result (1 except in the last launch).
    pub scale: f64,
}

/// The launches that transform `rows` rows of `2^log_d` elements of `element` into the
/// output, times `scale`: one row launch when a row fits `limits`, else row launches over
/// blocks of the longest length that fits, then strided passes over the remaining bits, in
/// place (half-precision rows through the f32 workspace).
pub(crate) fn launches(
    element: Element,
    rows: usize,
    log_d: u32,
    scale: f64,
    limits: Limits,
) -> Vec<Launch> {
    if rows == 0 {
        return Vec::new();
    }
    if log_d <= limits.max_row_log2 {
        return vec![row_launch(
            element,
            Buffer::Input,
            Buffer::Output,
            rows,
            log_d,
            scale,
        )];
    }
    let middle = if element.is_half() {
        Buffer::Workspace
    } else {
        Buffer::Output
    };
    let blocks = rows << (log_d - limits.max_row_log2);
    let mut all = vec![row_launch(
        element,
        Buffer::Input,
        middle,
        blocks,
        limits.max_row_log2,
        1.0,
    )];
    let middle_type = buffer_type(element, middle);
    for pass in strided_passes(limits.max_row_log2, log_d) {
        let y = if pass.last { Buffer::Output } else { middle };
        let columns = pass.columns(rows, log_d);
        let grid = columns.div_ceil(PASS_BLOCK_THREADS);
        all.push(Launch {
            kernel: pass.kernel_name(middle_type, buffer_type(element, y)),
            x: middle,
            y,
            grid: limits.max_pass_blocks.map_or(grid, |most| grid.min(most)),
            block: PASS_BLOCK_THREADS,
            shared_bytes: 0,
            rows,
            log_d,
            fourth: pass.low_bit,
            scale: if pass.last { scale } else { 1.0 },
        });
    }
    all
}

/// The element type's name of `buffer`.
fn buffer_type(element: Element, buffer: Buffer) -> &'static str {
    match buffer {
        Buffer::Workspace => Element::F32.name(),
        Buffer::Input | Buffer::Output => element.name(),
    }
}

fn row_launch(
    element: Element,
    x: Buffer,
    y: Buffer,
    rows: usize,
    log_d: u32,
    scale: f64,
) -> Launch {
    let plan = RowPlan::new(log_d);
    Launch {
        kernel: plan.kernel_name(buffer_type(element, x), buffer_type(element, y)),
        x,
        y,
        grid: plan.blocks(rows),
        block: plan.block_threads(),
        shared_bytes: plan.shared_values() * element.accumulator_bytes(),
        rows,
        log_d,
        fourth: plan.rows_per_block as u32,
        scale,
    }
}

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

    #[test]
    fn launches_write_the_output_once_and_round_half_types_once() {
        assert!(launches(Element::F32, 0, 10, 1.0, Limits::cuda(Element::F32)).is_empty());
        let one = launches(Element::F16, 7, 15, 0.5, Limits::cuda(Element::F16));
        assert_eq!(one.len(), 1);
        assert_eq!(
            (one[0].x, one[0].y, one[0].scale),
            (Buffer::Input, Buffer::Output, 0.5)
        );
        assert_eq!(one[0].kernel, "whvi_fwht_rows_f16_f16_e5_w5");
        assert_eq!(one[0].shared_bytes, 4 << 15);

        // f64 rows past 2^14 on CUDA: blocks of 2^14 into the output, then passes in place.
        let long = launches(Element::F64, 3, 17, 0.25, Limits::cuda(Element::F64));
        let kernels: Vec<&str> = long.iter().map(|l| l.kernel.as_str()).collect();
        assert_eq!(
            kernels,
            ["whvi_fwht_rows_f64_f64_e5_w4", "whvi_fwht_pass_f64_f64_r3"]
        );
        assert_eq!(
            (long[0].rows, long[0].log_d, long[0].scale),
            (3 << 3, 14, 1.0)
        );
        assert_eq!(long[0].shared_bytes, 8 << 14);
        assert_eq!(
            (long[1].x, long[1].y, long[1].scale),
            (Buffer::Output, Buffer::Output, 0.25)
        );
        assert_eq!(
            (long[1].fourth, long[1].grid),
            (14, (3usize << 14).div_ceil(256))
        );

        // bf16 past 2^13 on Metal: through the f32 workspace; only the last pass rounds.
        let half = launches(Element::Bf16, 1, 19, 2.0, Limits::metal());
        let route: Vec<(Buffer, Buffer, &str)> =
            half.iter().map(|l| (l.x, l.y, l.kernel.as_str())).collect();
        assert_eq!(
            route,
            [
                (
                    Buffer::Input,
                    Buffer::Workspace,
                    "whvi_fwht_rows_bf16_f32_e5_w3"
                ),
                (
                    Buffer::Workspace,
                    Buffer::Workspace,
                    "whvi_fwht_pass_f32_f32_r5"
                ),
                (
                    Buffer::Workspace,
                    Buffer::Output,
                    "whvi_fwht_pass_f32_bf16_r1"
                ),
            ]
        );
        assert_eq!(
            half.iter().map(|l| l.scale).collect::<Vec<_>>(),
            [1.0, 1.0, 2.0]
        );

        // CUDA caps a pass's grid; its threads loop over the columns past it.
        let capped = launches(Element::F32, 1 << 10, 20, 1.0, Limits::cuda(Element::F32));
        assert_eq!(capped[1].grid, 1 << 16);
        let uncapped = launches(Element::F32, 1 << 10, 20, 1.0, Limits::metal());
        // Its last pass takes bits 18 and 19: 2^10 rows of 2^18 columns, 256 threads a group.
        assert_eq!(uncapped.last().unwrap().grid, 1 << 20);
    }
}
