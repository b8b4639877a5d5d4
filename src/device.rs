//! Choosing where tensors live from a command-line style name.

use candle_core::Device;

use crate::{Error, Result};

/// Parses `cpu`, `cuda`, `cuda:N` or `metal` into a candle [`Device`].
///
/// A GPU name in a build without the matching feature (`--features cuda` / `metal`) is an error
/// that says so.
pub fn parse_device(name: &str) -> Result<Device> {
    let gpu = |result: candle_core::Result<Device>, feature: &str| {
        result.map_err(|e| {
            Error::invalid(format!(
                "cannot open device '{name}': {e}. Is this build made with `--features {feature}` \
                 and is the GPU visible?"
            ))
        })
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => gpu(Device::new_cuda(0), "cuda"),
        "metal" => gpu(Device::new_metal(0), "metal"),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => gpu(Device::new_cuda(n), "cuda"),
            _ => Err(Error::invalid(format!(
                "unknown device '{other}': use cpu, cuda, cuda:N or metal"
            ))),
        },
    }
}

/// [`parse_device`] for one rank of a job started by an MPI launcher: a bare `cuda` is the GPU
/// of the rank's place on its machine (`local_rank`, as `Group::local_rank` reads it from the
/// launcher), or the only GPU when the process sees one (a launcher that shows each rank its own GPU, as
/// Slurm's `--gpus-per-task=1` does). More ranks on a machine than it shows GPUs is an error.
/// Other names are taken as given.
pub fn parse_device_for_rank(name: &str, local_rank: usize) -> Result<Device> {
    match (name, visible_gpus()) {
        ("cuda", 0 | 1) => parse_device("cuda:0"),
        ("cuda", n) if local_rank < n => parse_device(&format!("cuda:{local_rank}")),
        ("cuda", n) => Err(Error::invalid(format!(
            "--device cuda: this is rank {local_rank} on its machine, which shows {n} GPUs; \
             start at most {n} ranks per machine, or name each rank's GPU (cuda:N)"
        ))),
        _ => parse_device(name),
    }
}

/// How many CUDA GPUs this process sees (0 without the `cuda` feature or a driver).
fn visible_gpus() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// The name [`parse_device`] reads back: `cpu`, `cuda:N` or `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The variable candle 0.11 reads, once, for how long its idle CPU workers spin before they sleep.
const CANDLE_SPIN_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The spin limit [`tune_cpu`] sets unless the environment sets one (candle's default is 25,000).
const CANDLE_SPIN_LIMIT: &str = "2000";

/// Tunes the process for CPU training; call it once at the start of a program, before any
/// thread is spawned (it sets an environment variable). It keeps freed memory in the process
/// ([`tune_allocator`]) and makes candle's idle CPU workers sleep sooner: after every op,
/// candle's thread pool spins for up to 25,000 rounds waiting for the next one, on a core
/// whvi's own kernels (rayon's threads) need. On 2 cores, a VGG-11 training step ran 6-12%
/// faster with 200 or 2,000 spins than with 25,000 (AVX-512 EPYC, runs alternated). A value in
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is kept.
pub fn tune_cpu() {
    tune_allocator();
    if std::env::var_os(CANDLE_SPIN_VAR).is_none() {
        std::env::set_var(CANDLE_SPIN_VAR, CANDLE_SPIN_LIMIT);
    }
}

/// Keeps freed memory in the process instead of returning it to the kernel at once.
///
/// Candle allocates a fresh buffer for every tensor. With glibc's defaults, buffers of more
/// than a few MiB are mmapped and unmapped each time, so every training step pays page faults
/// and page clearing for all of its activations (a quarter of the CPU time of a WHVI layer's
/// forward+backward at D = 4096, measured). Raising the mmap and trim thresholds lets those
/// buffers be reused. Call it once at the start of a program, before spawning threads (or call
/// [`tune_cpu`], which does this and more); it does nothing on other C libraries and platforms.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit targets.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only changes allocator tuning parameters; it is safe to call at any
        // time, and both parameters accept these values.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// The memory this machine can give a new allocation now, in bytes (`MemAvailable` of
/// `/proc/meminfo`), where the system says; `None` elsewhere.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses to go on when an allocation of `bytes` (`None`: more than 64 bits can count) would
/// not fit in the memory available, so that the process reports it instead of aborting on a
/// failed allocation. `what` names the allocation, `remedy` says what to change.
pub fn check_memory(bytes: Option<u64>, what: impl std::fmt::Display, remedy: &str) -> Result<()> {
    let available = available_memory().unwrap_or(u64::MAX);
    if bytes.is_some_and(|b| b <= available) {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let size = bytes.map_or("more than 2^34".to_string(), |b| format!("{:.1}", gib(b)));
    Err(Error::invalid(format!(
        "{what} needs {size} GiB, more than the {:.1} GiB this machine has available; {remedy}",
        gib(available)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the cuda feature a GPU cannot open, and the error names the one asked for.
    #[test]
    fn a_rank_takes_its_own_gpu_for_a_bare_cuda_and_any_other_name_as_given() {
        assert!(parse_device_for_rank("cpu", 3).unwrap().is_cpu());
        if cfg!(feature = "cuda") {
            return;
        }
        let err = parse_device_for_rank("cuda:5", 2).unwrap_err().to_string();
        assert!(err.contains("'cuda:5'"), "{err}");
        // No GPU visible: every rank is sent to the first (which then cannot open).
        for rank in [0, 3] {
            let err = parse_device_for_rank("cuda", rank).unwrap_err().to_string();
            assert!(err.contains("'cuda:0'"), "{err}");
        }
    }

    #[test]
    fn parses_cpu_and_rejects_unknown_names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("use cpu, cuda, cuda:N or metal"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("unknown device"), "{err}");
    }

    #[test]
    fn names_the_cpu_as_parse_device_reads_it() {
        assert_eq!(device_name(&parse_device("cpu").unwrap()), "cpu");
    }
}
