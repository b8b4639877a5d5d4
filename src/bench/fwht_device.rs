//! `whvi bench fwht --device cuda|metal`: the FWHT op on a GPU against a device-to-device copy
//! of the same bytes.
//!
//! Both read and write every element once, so the copy's time is the bandwidth bound of the
//! transform; the figure that matters is `fraction_of_copy` (copy time / transform time, 1.0 =
//! as fast as a copy). Both allocate their output, as a training step does. The two are timed
//! alternately, each repetition between device synchronisations; medians are reported.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::{median, round_significant as round};
use whvi::fwht::{fwht, Scaling};
use whvi::{Error, Result};

/// The default row lengths on a GPU, as log2 (the target covers D <= 8192).
pub const DEVICE_LOG2_DS: [u32; 8] = [6, 8, 10, 11, 12, 13, 14, 15];

/// The default batch: far larger than any GPU's last-level cache.
pub const DEVICE_BATCH_BYTES: usize = 256 << 20;

/// Untimed calls of each before the repetitions.
const WARMUPS: usize = 3;

/// What `whvi bench fwht --device ...` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceFwhtBenchConfig {
    /// Only rows of length `2^log2_d`; by default [`DEVICE_LOG2_DS`].
    pub log2_d: Option<u32>,
    /// Batch size in bytes (rounded to whole rows); by default [`DEVICE_BATCH_BYTES`].
    pub bytes: Option<usize>,
    /// Timed repetitions (the median is reported).
    pub reps: usize,
    /// Calls per repetition.
    pub calls: usize,
    /// Element types to time.
    pub dtypes: Vec<DType>,
}

impl Default for DeviceFwhtBenchConfig {
    fn default() -> Self {
        Self {
            log2_d: None,
            bytes: None,
            reps: 9,
            calls: 10,
            dtypes: vec![DType::F32, DType::BF16],
        }
    }
}

/// One measured configuration; printed as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceFwhtBenchLine {
    /// Always `"fwht"`.
    pub bench: &'static str,
    /// Always `"device_op"`: the tensor op, output allocated per call.
    pub variant: &'static str,
    /// The device, e.g. `"cuda:0"`.
    pub device: String,
    /// The element type.
    pub dtype: String,
    /// The row length.
    pub d: usize,
    /// The number of rows.
    pub rows: usize,
    /// Median microseconds per transform.
    pub fwht_us: f64,
    /// Median microseconds per device-to-device copy of the same tensor.
    pub copy_us: f64,
    /// Bytes read and written per second by the transform, in GB/s.
    pub fwht_gb_per_s: f64,
    /// The same for the copy.
    pub copy_gb_per_s: f64,
    /// `copy_us / fwht_us`: the fraction of the copy's bandwidth the transform reaches.
    pub fraction_of_copy: f64,
}

/// Runs the benchmark on `device`, calling `emit` with each line as it is measured.
pub fn run_on_device(
    device: &Device,
    config: &DeviceFwhtBenchConfig,
    emit: &mut dyn FnMut(&DeviceFwhtBenchLine),
) -> Result<Vec<DeviceFwhtBenchLine>> {
    if config.reps == 0 || config.calls == 0 {
        return Err(Error::invalid(
            "bench fwht: --reps and the calls per repetition must be at least 1",
        ));
    }
    let log2_ds: Vec<u32> = match config.log2_d {
        Some(l) if l > 30 => {
            return Err(Error::invalid(format!(
                "bench fwht: --d {l} is beyond the transform's limit of 2^30"
            )))
        }
        Some(l) => vec![l],
        None => DEVICE_LOG2_DS.to_vec(),
    };
    let bytes = config.bytes.unwrap_or(DEVICE_BATCH_BYTES);
    let device_name = whvi::device::device_name(device);
    let mut lines = Vec::new();
    for &dtype in &config.dtypes {
        for &log2_d in &log2_ds {
            let d = 1usize << log2_d;
            let rows = (bytes / (dtype.size_in_bytes() * d)).max(1);
            let x = Tensor::randn(0f32, 1f32, (rows, d), device)?.to_dtype(dtype)?;
            let (fwht_s, copy_s) = interleaved(
                device,
                config,
                || fwht(&x, Scaling::Orthonormal).map(drop),
                || x.copy().map(drop),
            )?;
            let moved = 2.0 * (rows * d * dtype.size_in_bytes()) as f64;
            let line = DeviceFwhtBenchLine {
                bench: "fwht",
                variant: "device_op",
                device: device_name.clone(),
                dtype: dtype.as_str().to_string(),
                d,
                rows,
                fwht_us: round(fwht_s * 1e6),
                copy_us: round(copy_s * 1e6),
                fwht_gb_per_s: round(moved / fwht_s / 1e9),
                copy_gb_per_s: round(moved / copy_s / 1e9),
                fraction_of_copy: round(copy_s / fwht_s),
            };
            emit(&line);
            lines.push(line);
        }
    }
    Ok(lines)
}

/// Median seconds per call of `a` and of `b`, timed alternately between synchronisations.
fn interleaved(
    device: &Device,
    config: &DeviceFwhtBenchConfig,
    mut a: impl FnMut() -> candle_core::Result<()>,
    mut b: impl FnMut() -> candle_core::Result<()>,
) -> Result<(f64, f64)> {
    for _ in 0..WARMUPS {
        a()?;
        b()?;
    }
    let time = |f: &mut dyn FnMut() -> candle_core::Result<()>| -> Result<f64> {
        device.synchronize()?;
        let start = Instant::now();
        for _ in 0..config.calls {
            f()?;
        }
        device.synchronize()?;
        Ok(start.elapsed().as_secs_f64() / config.calls as f64)
    };
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..config.reps {
        ta.push(time(&mut a)?);
        tb.push(time(&mut b)?);
    }
    Ok((median(&mut ta), median(&mut tb)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_dtype_and_length_on_the_cpu() {
        let config = DeviceFwhtBenchConfig {
            log2_d: Some(6),
            bytes: Some(64 << 10),
            reps: 1,
            calls: 1,
            dtypes: vec![DType::F32, DType::BF16],
        };
        let mut emitted = 0;
        let lines = run_on_device(&Device::Cpu, &config, &mut |_| emitted += 1).unwrap();
        assert_eq!(emitted, 2);
        assert_eq!(lines[0].dtype, "f32");
        assert_eq!(lines[1].dtype, "bf16");
        assert_eq!(lines[0].rows, (64 << 10) / (4 * 64));
        assert_eq!(lines[1].rows, (64 << 10) / (2 * 64));
        for line in &lines {
            assert_eq!(line.device, "cpu");
            assert!(line.fwht_us > 0.0 && line.copy_us > 0.0, "{line:?}");
            assert!(
                (line.fraction_of_copy - line.copy_us / line.fwht_us).abs()
                    < 0.01 * line.fraction_of_copy + 1e-3
            );
        }
    }

    #[test]
    fn rejects_zero_repetitions() {
        let config = DeviceFwhtBenchConfig {
            reps: 0,
            ..DeviceFwhtBenchConfig::default()
        };
        let err = run_on_device(&Device::Cpu, &config, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("--reps"), "{err}");
    }
}
