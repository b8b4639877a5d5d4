//! The GPU kernels executed on the CPU (tests only): `kernels/fwht.cu` and `kernels/fwht.metal`
//! are compiled unchanged as C++ against the shims in `kernels/emulation/` (the execution model
//! is described in `emulator.h` there), and run the launches [`launches`] plans, the same list
//! `cuda.rs` and `metal.rs` launch. Their results are compared with the CPU op.
//!
//! Inputs of small integers keep every partial sum exact in f32 (at most 8 · 2^17 < 2^24), so
//! the result does not depend on the order of the butterflies and the GPU kernels must match
//! the CPU op bit for bit, in every type; Gaussian inputs check the rounding, to 1e-6 of the
//! row's norm (f32, f64) or one unit in the last place (f16, bf16, rounded once on both sides).
//!
//! A C++17 compiler is needed: `$CXX`, else `clang++`, else `g++`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::gpu_plan::{launches, Buffer, Element, Launch, Limits};
use super::{fwht, Scaling};

const KERNELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/fwht/kernels");

/// A kernel source and the backend whose launch plan drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Cuda,
    Metal,
}

impl Source {
    fn file(self) -> &'static str {
        match self {
            Source::Cuda => "fwht.cu",
            Source::Metal => "fwht.metal",
        }
    }

    fn shim(self) -> &'static str {
        match self {
            Source::Cuda => "cuda",
            Source::Metal => "metal",
        }
    }

    fn limits(self, element: Element) -> Limits {
        match self {
            Source::Cuda => Limits::cuda(element),
            Source::Metal => Limits::metal(),
        }
    }

    /// The element types the backend takes (Metal has no f64).
    fn elements(self) -> &'static [Element] {
        match self {
            Source::Cuda => &[Element::F32, Element::F64, Element::F16, Element::Bf16],
            Source::Metal => &[Element::F32, Element::F16, Element::Bf16],
        }
    }
}

/// A folder next to the test binary (inside cargo's target folder) for the emulation binaries
/// and the buffers a run passes.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        let dir = exe.parent().unwrap_or(Path::new(".")).join("gpu-emulation");
        std::fs::create_dir_all(&dir).expect("a scratch folder next to the test binary");
        dir
    })
}

/// A file name no other run or test uses.
fn unique(stem: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    scratch().join(format!("{stem}-{}-{n}", std::process::id()))
}

/// The C++ compiler and the flags that silence what it does not know of the GPU dialects
/// (Metal's `[[buffer(0)]]` attributes, CUDA's `#pragma unroll` for g++).
fn compiler() -> (String, Vec<&'static str>) {
    let candidates = std::env::var("CXX")
        .into_iter()
        .chain(["clang++".to_string(), "g++".to_string()]);
    for cxx in candidates {
        let Ok(version) = Command::new(&cxx).arg("--version").output() else {
            continue;
        };
        let clang = String::from_utf8_lossy(&version.stdout).contains("clang");
        let quiet = if clang {
            vec!["-Wno-unknown-attributes"]
        } else {
            vec!["-Wno-attributes", "-Wno-unknown-pragmas"]
        };
        return (cxx, quiet);
    }
    panic!("the GPU emulation tests need a C++17 compiler: install clang++ or g++, or set CXX");
}

/// Compiles the emulation of `kernel_file` (a `source` kernel file, perhaps a mutated copy)
/// into `binary`.
fn build(source: Source, kernel_file: &Path, binary: &Path) -> Result<(), String> {
    let (cxx, quiet) = compiler();
    let emulation = Path::new(KERNELS).join("emulation");
    let output = Command::new(&cxx)
        .args(COMPILE_FLAGS)
        .args(quiet)
        .arg(format!("-DEMU_{}", source.shim().to_uppercase()))
        .arg(format!("-I{}", emulation.join(source.shim()).display()))
        .arg(format!("-DEMU_KERNEL_SOURCE=\"{}\"", kernel_file.display()))
        .arg(emulation.join("harness.cpp"))
        .arg("-o")
        .arg(binary)
        .arg("-ldl")
        .output()
        .map_err(|e| format!("could not run {cxx}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{cxx} failed on {}:\n{}",
            kernel_file.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

const COMPILE_FLAGS: [&str; 6] = [
    "-std=c++17",
    "-O1",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-rdynamic",
];

/// The emulation of the kernel source as it is in the repository, built once per process and
/// kept between runs under a name that hashes everything it is built from.
fn harness(source: Source) -> &'static Path {
    static CUDA: OnceLock<PathBuf> = OnceLock::new();
    static METAL: OnceLock<PathBuf> = OnceLock::new();
    let cell = match source {
        Source::Cuda => &CUDA,
        Source::Metal => &METAL,
    };
    cell.get_or_init(|| {
        let kernel_file = Path::new(KERNELS).join(source.file());
        let binary = scratch().join(format!(
            "harness-{}-{:016x}",
            source.shim(),
            inputs_hash(source)
        ));
        if !binary.exists() {
            // Built under a private name, then renamed: a concurrent run never sees half a file.
            let private = unique("harness");
            build(source, &kernel_file, &private).unwrap_or_else(|e| panic!("{e}"));
            std::fs::rename(&private, &binary).expect("the emulation binary renamed into place");
        }
        binary
    })
}

/// A hash of the kernel source, the emulation's files, the flags and the compiler's version.
fn inputs_hash(source: Source) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let emulation = Path::new(KERNELS).join("emulation");
    let files = [
        Path::new(KERNELS).join(source.file()),
        emulation.join("emulator.h"),
        emulation.join("harness.cpp"),
        emulation.join("cuda/cuda_fp16.h"),
        emulation.join("cuda/cuda_bf16.h"),
        emulation.join("metal/metal_stdlib"),
        emulation.join("metal/metal_types.h"),
    ];
    for file in files {
        std::fs::read(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .hash(&mut hasher);
    }
    let (cxx, quiet) = compiler();
    let version = Command::new(&cxx)
        .arg("--version")
        .output()
        .map(|o| o.stdout);
    (cxx, quiet, COMPILE_FLAGS, version.ok()).hash(&mut hasher);
    hasher.finish()
}

/// A mutated kernel source's emulation, deleted when dropped.
struct Mutant(PathBuf);

impl Mutant {
    /// The emulation of `source` with `from` replaced by `to` in its kernel file.
    fn new(source: Source, from: &str, to: &str) -> Self {
        let original = std::fs::read_to_string(Path::new(KERNELS).join(source.file())).unwrap();
        assert!(original.contains(from), "{} has no {from:?}", source.file());
        let file = unique("mutant").with_extension(source.file().rsplit('.').next().unwrap());
        std::fs::write(&file, original.replace(from, to)).unwrap();
        let binary = unique("mutant-harness");
        let built = build(source, &file, &binary);
        let _ = std::fs::remove_file(&file);
        built.unwrap_or_else(|e| panic!("{e}"));
        Mutant(binary)
    }
}

impl Drop for Mutant {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The order in which the emulation resumes the threads of a block.
#[derive(Debug, Clone, Copy)]
enum Schedule {
    Forward,
    Reverse,
}

/// Runs `plan` on `input` (rows of `2^log_d` elements of `element`) and returns the output's
/// bytes, or the emulation's message.
fn emulate(
    harness: &Path,
    element: Element,
    input: &[u8],
    plan: &[Launch],
    schedule: Schedule,
) -> Result<Vec<u8>, String> {
    let count = input.len() / element_bytes(element);
    let (input_file, output_file, plan_file) = (unique("x"), unique("y"), unique("plan"));
    std::fs::write(&input_file, input).map_err(|e| e.to_string())?;
    let name = element.name();
    let mut script = format!(
        "schedule {}\nbuffer input {name} {count} {}\nbuffer output {name} {count}\n\
         buffer workspace f32 {count}\n",
        match schedule {
            Schedule::Forward => "forward",
            Schedule::Reverse => "reverse",
        },
        input_file.display()
    );
    for step in plan {
        script += &format!(
            "launch {} {} {} {} {} {} {} {} {} {:e}\n",
            step.kernel,
            step.grid,
            step.block,
            step.shared_bytes,
            buffer_name(step.x),
            buffer_name(step.y),
            step.rows,
            step.log_d,
            step.fourth,
            step.scale
        );
    }
    script += &format!("save output {}\n", output_file.display());
    std::fs::write(&plan_file, script).map_err(|e| e.to_string())?;
    let run = Command::new(harness)
        .arg(&plan_file)
        .output()
        .map_err(|e| e.to_string())?;
    let result = if run.status.success() {
        std::fs::read(&output_file).map_err(|e| e.to_string())
    } else {
        Err(String::from_utf8_lossy(&run.stderr).trim().to_string())
    };
    for file in [input_file, output_file, plan_file] {
        let _ = std::fs::remove_file(file);
    }
    result
}

fn buffer_name(buffer: Buffer) -> &'static str {
    match buffer {
        Buffer::Input => "input",
        Buffer::Workspace => "workspace",
        Buffer::Output => "output",
    }
}

fn element_bytes(element: Element) -> usize {
    match element {
        Element::F64 => 8,
        Element::F32 => 4,
        Element::F16 | Element::Bf16 => 2,
    }
}

fn dtype(element: Element) -> DType {
    match element {
        Element::F32 => DType::F32,
        Element::F64 => DType::F64,
        Element::F16 => DType::F16,
        Element::Bf16 => DType::BF16,
    }
}

/// The little-endian bytes of a tensor's elements.
fn bytes(tensor: &Tensor) -> Vec<u8> {
    let flat = tensor.flatten_all().expect("flatten");
    match tensor.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => panic!("no kernel takes {other:?}"),
    }
}

/// How the input's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Values {
    /// Integers in [-8, 8]: every partial sum is exact.
    SmallIntegers,
    Gaussian,
}

fn input(element: Element, rows: usize, d: usize, values: Values, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f64> = (0..rows * d)
        .map(|_| match values {
            Values::SmallIntegers => f64::from(rng.random_range(-8i32..=8)),
            Values::Gaussian => rng.sample(StandardNormal),
        })
        .collect();
    Tensor::from_vec(data, (rows, d), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype(element)))
        .expect("an input tensor")
}

/// One emulated transform compared with the CPU op; the message says what differs.
struct Case {
    source: Source,
    element: Element,
    rows: usize,
    log_d: u32,
    values: Values,
    schedule: Schedule,
}

impl Case {
    fn check(&self, harness: &Path, limits: Limits) -> Result<(), String> {
        let d = 1usize << self.log_d;
        let x = input(
            self.element,
            self.rows,
            d,
            self.values,
            u64::from(self.log_d),
        );
        let normalization = Scaling::Orthonormal;
        let expected = bytes(&fwht(&x, normalization).map_err(|e| e.to_string())?);
        let plan = launches(
            self.element,
            self.rows,
            self.log_d,
            normalization.scale(d),
            limits,
        );
        let got = emulate(harness, self.element, &bytes(&x), &plan, self.schedule)
            .map_err(|e| format!("{self:?}: {e}"))?;
        compare(self.element, self.values, d, &expected, &got).map_err(|e| format!("{self:?}: {e}"))
    }
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {} rows of 2^{} {:?} {:?}, {:?} schedule",
            self.source, self.rows, self.log_d, self.element, self.values, self.schedule
        )
    }
}

/// Elements as f64 values and as integer bit patterns.
fn decode(element: Element, bytes: &[u8]) -> Vec<(f64, i64)> {
    bytes
        .chunks_exact(element_bytes(element))
        .map(|b| match element {
            Element::F64 => {
                let v = f64::from_le_bytes(b.try_into().unwrap());
                (v, v.to_bits() as i64)
            }
            Element::F32 => {
                let v = f32::from_le_bytes(b.try_into().unwrap());
                (f64::from(v), i64::from(v.to_bits()))
            }
            Element::F16 => {
                let v = half::f16::from_le_bytes(b.try_into().unwrap());
                (v.to_f64(), i64::from(v.to_bits()))
            }
            Element::Bf16 => {
                let v = half::bf16::from_le_bytes(b.try_into().unwrap());
                (v.to_f64(), i64::from(v.to_bits()))
            }
        })
        .collect()
}

fn compare(
    element: Element,
    values: Values,
    d: usize,
    expected: &[u8],
    got: &[u8],
) -> Result<(), String> {
    if expected.len() != got.len() {
        return Err(format!("{} bytes, expected {}", got.len(), expected.len()));
    }
    let (expected, got) = (decode(element, expected), decode(element, got));
    for (row, (want, have)) in expected.chunks(d).zip(got.chunks(d)).enumerate() {
        let norm = want.iter().map(|w| w.0 * w.0).sum::<f64>().sqrt();
        let half = matches!(element, Element::F16 | Element::Bf16);
        match values {
            Values::SmallIntegers => {
                if let Some(i) = (0..d).find(|&i| want[i].1 != have[i].1) {
                    return Err(format!(
                        "row {row}, element {i}: {} where the CPU op gives {}",
                        have[i].0, want[i].0
                    ));
                }
            }
            // Both sides round an f32 result once: they may differ by the f32 error plus one
            // step of the half type.
            Values::Gaussian if half => {
                if let Some(i) = (0..d).find(|&i| {
                    let step = (next_up(element, want[i].1 & 0x7fff) - want[i].0.abs()).abs();
                    let gap = (want[i].0 - have[i].0).abs();
                    gap.is_nan() || gap > step + 1e-6 * norm
                }) {
                    return Err(format!(
                        "row {row}, element {i}: {} where the CPU op gives {}",
                        have[i].0, want[i].0
                    ));
                }
            }
            Values::Gaussian => {
                let error = want
                    .iter()
                    .zip(have)
                    .map(|(w, h)| (w.0 - h.0).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if error.is_nan() || error > 1e-6 * norm {
                    return Err(format!("row {row}: relative error {:e}", error / norm));
                }
            }
        }
    }
    Ok(())
}

/// The value of the half-precision bit pattern after `bits` (of a non-negative value).
fn next_up(element: Element, bits: i64) -> f64 {
    let next = (bits + 1) as u16;
    match element {
        Element::F16 => half::f16::from_bits(next).to_f64(),
        _ => half::bf16::from_bits(next).to_f64(),
    }
}

/// An odd number of rows of `2^log_d`, about 2^12 elements, that leaves the last block of short
/// rows part empty and takes several blocks per row of long ones.
fn many_rows(log_d: u32) -> usize {
    ((1usize << 12) >> log_d).max(2) + 1
}

/// Every planned launch of `source`, for every D from 2^1 to 2^17 and every element type: many
/// rows of integers, one row of integers with the threads resumed in reverse, one Gaussian row.
fn check_every_planned_launch(source: Source) {
    let harness = harness(source);
    let mut failures = Vec::new();
    for &element in source.elements() {
        for log_d in 1..=17 {
            let cases = [
                (many_rows(log_d), Values::SmallIntegers, Schedule::Forward),
                (1, Values::SmallIntegers, Schedule::Reverse),
                (1, Values::Gaussian, Schedule::Forward),
            ];
            for (rows, values, schedule) in cases {
                let case = Case {
                    source,
                    element,
                    rows,
                    log_d,
                    values,
                    schedule,
                };
                if let Err(e) = case.check(harness, source.limits(element)) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_cuda_kernels_match_the_cpu_op_on_every_planned_launch() {
    check_every_planned_launch(Source::Cuda);
}

#[test]
fn the_metal_kernels_match_the_cpu_op_on_every_planned_launch() {
    check_every_planned_launch(Source::Metal);
}

/// Rows longer than one launch with a small row limit: several strided passes (5, 5 and 2
/// bits past 2^5), and on CUDA a pass grid cut to 3 blocks, so that the kernel's grid-stride
/// loop takes many columns per thread.
#[test]
fn several_passes_and_the_grid_stride_loop_match_the_cpu_op() {
    for source in [Source::Cuda, Source::Metal] {
        let limits = Limits {
            max_row_log2: 5,
            max_pass_blocks: (source == Source::Cuda).then_some(3),
        };
        for element in [Element::F32, Element::Bf16] {
            let case = Case {
                source,
                element,
                rows: 3,
                log_d: 17,
                values: Values::SmallIntegers,
                schedule: Schedule::Forward,
            };
            let plan = launches(element, 3, 17, 1.0, limits);
            assert_eq!(plan.len(), 4, "{plan:?}");
            case.check(harness(source), limits)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// The cases of `source` (one row of integers, forward and reverse) that `harness` gets wrong.
fn failures(harness: &Path, source: Source, log_ds: &[u32]) -> Vec<String> {
    let mut failures = Vec::new();
    for &log_d in log_ds {
        for schedule in [Schedule::Forward, Schedule::Reverse] {
            let case = Case {
                source,
                element: Element::F32,
                rows: 1,
                log_d,
                values: Values::SmallIntegers,
                schedule,
            };
            if let Err(e) = case.check(harness, source.limits(Element::F32)) {
                failures.push(e);
            }
        }
    }
    failures
}

#[test]
fn the_emulation_catches_a_missing_barrier() {
    for (source, barrier) in [
        (Source::Cuda, "__syncthreads();"),
        (
            Source::Metal,
            "threadgroup_barrier(mem_flags::mem_threadgroup);",
        ),
    ] {
        let mutant = Mutant::new(source, barrier, "");
        // Both schedules see it: each reads a slot the other side has not written yet.
        let wrong = failures(&mutant.0, source, &[11, 13]);
        assert_eq!(wrong.len(), 4, "{source:?} without its barrier: {wrong:?}");
    }
}

#[test]
fn the_emulation_catches_a_wrong_shuffle_mask() {
    for (source, from, to) in [
        (Source::Cuda, "v[r], m);", "v[r], m >> 1);"),
        (Source::Cuda, "0xffffffffu, v[r]", "0x0000ffffu, v[r]"),
        (Source::Metal, "(ushort)m)", "(ushort)(m >> 1))"),
    ] {
        let mutant = Mutant::new(source, from, to);
        let wrong = failures(&mutant.0, source, &[5, 10]);
        assert_eq!(wrong.len(), 4, "{source:?} with {to:?}: {wrong:?}");
    }
}

#[test]
fn the_emulation_catches_an_off_by_one_in_the_launch_plan() {
    for source in [Source::Cuda, Source::Metal] {
        let log_d = 17;
        let limits = source.limits(Element::F32);
        let x = input(Element::F32, 2, 1 << log_d, Values::SmallIntegers, 1);
        let expected = bytes(&fwht(&x, Scaling::None).unwrap());
        let plan = launches(Element::F32, 2, log_d, 1.0, limits);
        let last = plan.len() - 1;
        let run = |plan: &[Launch]| {
            emulate(
                harness(source),
                Element::F32,
                &bytes(&x),
                plan,
                Schedule::Forward,
            )
            .and_then(|got| {
                compare(
                    Element::F32,
                    Values::SmallIntegers,
                    1 << log_d,
                    &expected,
                    &got,
                )
            })
        };
        run(&plan).unwrap_or_else(|e| panic!("{source:?}, the plan as it is: {e}"));
        let mut low_bit = plan.clone();
        low_bit[last].fourth -= 1;
        let mut grid = plan.clone();
        grid[0].grid -= 1;
        let mut rows = plan.clone();
        rows[0].rows -= 1;
        for (what, mutant) in [
            ("pass low bit", low_bit),
            ("row grid", grid),
            ("rows", rows),
        ] {
            assert!(
                run(&mutant).is_err(),
                "{source:?}: the emulation misses a wrong {what}"
            );
        }
    }
}
