//! `whvi bench fwht`: the CPU FWHT kernel and op, each against a memcpy of the same bytes.
//!
//! For every row length `D = 2^6, 2^8, ..., 2^16`, batch (about 256 KiB, which stays in cache,
//! and 128 MiB, which does not) and thread count (1 and all), three variants are timed:
//!
//! * `inplace`: [`fwht_rows_f32`] on a reused buffer;
//! * `into`: [`fwht_rows_f32_into`] from a source into a reused destination;
//! * `op`: the tensor op [`whvi::fwht::fwht`], which allocates a fresh output every call.
//!
//! Each variant runs interleaved with a memcpy of the same bytes (between two reused buffers,
//! on the same thread pool), so their ratio survives the noise of a shared machine. The
//! transform is orthonormal (`H/sqrt(D)`), so repeating it in place keeps the data bounded;
//! the scale costs one multiply in the last pass. Each figure is the median of the timed
//! repetitions after two warm-ups; one repetition runs enough calls to move about 64 MiB.

use std::time::Instant;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use super::{median, round_significant as round};
use whvi::fwht::{auto_kernel, fwht_rows_f32, fwht_rows_f32_into};
use whvi::fwht::{fwht, Scaling};
use whvi::{Error, Result};

/// The default row lengths, as log2.
pub const LOG2_DS: [u32; 6] = [6, 8, 10, 12, 14, 16];

/// The batch sizes in bytes: one that fits in L2, one far larger than the last-level cache.
pub const BATCH_BYTES: [usize; 2] = [256 << 10, 128 << 20];

/// The variants timed for each configuration, in order.
pub const VARIANTS: [&str; 3] = ["inplace", "into", "op"];

/// Warm-up calls before the timed repetitions.
const WARMUPS: usize = 2;

/// Bytes each timed repetition should move at least, so that short calls are timed in bulk.
const BYTES_PER_REP: usize = 64 << 20;

/// What `whvi bench fwht` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwhtBenchConfig {
    /// Only this many threads; by default 1 and all available.
    pub threads: Option<usize>,
    /// Only rows of length `2^log2_d`; by default [`LOG2_DS`].
    pub log2_d: Option<u32>,
    /// Only batches of this many bytes (rounded to whole rows); by default [`BATCH_BYTES`].
    pub bytes: Option<usize>,
    /// Timed repetitions per configuration (the protocol asks for at least 9).
    pub reps: usize,
}

impl Default for FwhtBenchConfig {
    fn default() -> Self {
        Self {
            threads: None,
            log2_d: None,
            bytes: None,
            reps: 9,
        }
    }
}

/// One measured configuration; printed as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FwhtBenchLine {
    /// Always `"fwht"`, so lines of several benchmarks can share a file.
    pub bench: &'static str,
    /// `"inplace"`, `"into"` or `"op"` (see the module documentation).
    pub variant: &'static str,
    /// The element type, `"f32"`.
    pub dtype: &'static str,
    /// The kernel the CPU dispatch picked (see [`auto_kernel`]).
    pub kernel: &'static str,
    /// The row length.
    pub d: usize,
    /// The number of rows in the batch.
    pub rows: usize,
    /// The size of the batch in bytes.
    pub bytes: usize,
    /// The rayon threads the transform (and the memcpy) ran on.
    pub threads: usize,
    /// Median nanoseconds per row.
    pub ns_per_row: f64,
    /// Rows per second at that median.
    pub rows_per_s: f64,
    /// Bytes read plus bytes written per second, in GB/s (10^9).
    pub gb_per_s: f64,
    /// Median nanoseconds per row of a memcpy of the same bytes, timed in the same run.
    pub memcpy_ns_per_row: f64,
    /// `ns_per_row / memcpy_ns_per_row`.
    pub ratio_to_memcpy: f64,
}

/// Runs the benchmark and calls `emit` with each line as soon as it is measured (so a long run
/// shows progress); returns all lines.
pub fn run(
    config: &FwhtBenchConfig,
    emit: &mut dyn FnMut(&FwhtBenchLine),
) -> Result<Vec<FwhtBenchLine>> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<usize> = match config.threads {
        Some(0) => return Err(Error::invalid("bench fwht: --threads must be at least 1")),
        Some(n) => vec![n],
        None if all == 1 => vec![1],
        None => vec![1, all],
    };
    let log2_ds: Vec<u32> = match config.log2_d {
        Some(l) if l > 25 => {
            return Err(Error::invalid(format!(
                "bench fwht: --d {l} means rows of 2^{l} f32, larger than the 128 MiB batch; \
                 use at most 25"
            )))
        }
        Some(l) => vec![l],
        None => LOG2_DS.to_vec(),
    };
    let batches: Vec<usize> = config.bytes.map_or(BATCH_BYTES.to_vec(), |b| vec![b]);
    if let Some(bytes) = config.bytes {
        if bytes == 0 {
            return Err(Error::invalid("bench fwht: --bytes must be at least 1"));
        }
        // The batch, its pristine copy and the two buffers of the memcpy baseline.
        whvi::device::check_memory(
            (bytes as u64).checked_mul(4),
            format_args!("bench fwht with batches of {bytes} bytes"),
            "use a smaller --bytes",
        )?;
    }
    if config.reps == 0 {
        return Err(Error::invalid("bench fwht: --reps must be at least 1"));
    }
    let mut lines = Vec::new();
    for &n in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| Error::invalid(format!("bench fwht: cannot start {n} threads: {e}")))?;
        for &bytes in &batches {
            for &log2_d in &log2_ds {
                let d = 1usize << log2_d;
                let rows = (bytes / (4 * d)).max(1);
                let mut batch = Batch::new(rows, d);
                for variant in VARIANTS {
                    let line = pool.install(|| batch.measure(variant, n, config.reps))?;
                    emit(&line);
                    lines.push(line);
                }
            }
        }
    }
    Ok(lines)
}

/// The buffers of one configuration, reused by every variant.
struct Batch {
    rows: usize,
    d: usize,
    src: PageAligned,
    dst: PageAligned,
    /// The destination of the memcpy baseline.
    copy: PageAligned,
    tensor: Tensor,
}

impl Batch {
    fn new(rows: usize, d: usize) -> Self {
        let len = rows * d;
        // Distinct, non-zero values: every page is really backed, and no zero shortcut applies.
        let value =
            |i: usize| ((i as u32).wrapping_mul(0x9E37_79B9) >> 8) as f32 / (1 << 23) as f32 - 1.0;
        let src = PageAligned::from_fn(len, value);
        let tensor = Tensor::from_slice(src.as_slice(), (rows, d), &Device::Cpu)
            .expect("a (rows, d) tensor from rows * d values");
        Self {
            rows,
            d,
            dst: PageAligned::from_fn(len, value),
            copy: PageAligned::from_fn(len, value),
            src,
            tensor,
        }
    }

    fn bytes(&self) -> usize {
        self.src.len * std::mem::size_of::<f32>()
    }

    /// Times `variant` against memcpy on the current rayon pool (`threads` threads).
    fn measure(
        &mut self,
        variant: &'static str,
        threads: usize,
        reps: usize,
    ) -> Result<FwhtBenchLine> {
        let (d, bytes) = (self.d, self.bytes());
        let scale = Scaling::Orthonormal.scale(d) as f32;
        let calls = (BYTES_PER_REP / bytes).max(1);
        let (src, copy) = (self.src.as_slice(), self.copy.as_mut_slice());
        let mut baseline = || memcpy(src, copy);
        let (t, t_copy) = match variant {
            "inplace" => {
                let dst = self.dst.as_mut_slice();
                interleaved(reps, calls, || fwht_rows_f32(dst, d, scale), &mut baseline)
            }
            "into" => {
                let dst = self.dst.as_mut_slice();
                interleaved(
                    reps,
                    calls,
                    || fwht_rows_f32_into(src, dst, d, scale),
                    &mut baseline,
                )
            }
            _ => {
                let x = &self.tensor;
                let mut failed = None;
                let times = interleaved(
                    reps,
                    calls,
                    || match fwht(x, Scaling::Orthonormal) {
                        Ok(y) => drop(std::hint::black_box(y)),
                        Err(e) => failed = Some(e),
                    },
                    &mut baseline,
                );
                if let Some(e) = failed {
                    return Err(e.into());
                }
                times
            }
        };
        let rows = self.rows as f64;
        Ok(FwhtBenchLine {
            bench: "fwht",
            variant,
            dtype: "f32",
            kernel: auto_kernel(),
            d,
            rows: self.rows,
            bytes,
            threads,
            ns_per_row: round(t * 1e9 / rows),
            rows_per_s: round(rows / t),
            gb_per_s: round(2.0 * bytes as f64 / t / 1e9),
            memcpy_ns_per_row: round(t_copy * 1e9 / rows),
            ratio_to_memcpy: round(t / t_copy),
        })
    }
}

/// f32 values starting on a page boundary.
///
/// glibc's memcpy (`rep movsb`) runs 10-15 times slower on some CPUs (AMD Zen 3 here) when the
/// destination sits a few bytes above the source modulo 4 KiB; with every buffer page-aligned
/// the baseline does not depend on where the allocator happened to put them.
struct PageAligned {
    storage: Vec<f32>,
    offset: usize,
    len: usize,
}

impl PageAligned {
    const PAGE_ELEMS: usize = 4096 / std::mem::size_of::<f32>();

    fn from_fn(len: usize, f: impl Fn(usize) -> f32) -> Self {
        let mut storage = vec![0f32; len + Self::PAGE_ELEMS];
        let misalign = storage.as_ptr() as usize % 4096 / std::mem::size_of::<f32>();
        let offset = (Self::PAGE_ELEMS - misalign) % Self::PAGE_ELEMS;
        for (i, v) in storage[offset..offset + len].iter_mut().enumerate() {
            *v = f(i);
        }
        Self {
            storage,
            offset,
            len,
        }
    }

    fn as_slice(&self) -> &[f32] {
        &self.storage[self.offset..self.offset + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// A memcpy of `src` into `dst`, split over the current rayon pool like the transform is.
fn memcpy(src: &[f32], dst: &mut [f32]) {
    let threads = rayon::current_num_threads();
    if threads == 1 {
        dst.copy_from_slice(src);
    } else {
        let chunk = src.len().div_ceil(threads);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
    std::hint::black_box(dst);
}

/// Times `a` and `b` alternately: after [`WARMUPS`] calls of each, `reps` repetitions of
/// `calls` calls each. Returns the median seconds per call of `a` and of `b`.
fn interleaved(reps: usize, calls: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    for _ in 0..WARMUPS {
        a();
        b();
    }
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..calls {
            f();
        }
        start.elapsed().as_secs_f64() / calls as f64
    };
    let (mut ta, mut tb) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        ta.push(time(&mut a));
        tb.push(time(&mut b));
    }
    (median(&mut ta), median(&mut tb))
}
