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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_unknown_names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("use cpu, cuda, cuda:N or metal"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("unknown device"), "{err}");
    }
}
