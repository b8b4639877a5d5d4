//! Which SIMD instruction set the CPU kernels use: detected once at run time, and capped by the
//! `WHVI_SIMD` environment variable.
//!
//! The kernels written with `core::arch` (the FWHT, and the forward of the fused batch norm +
//! ReLU + max pool) pick their vector width from [`level`].
//! Setting `WHVI_SIMD=avx2` on an AVX-512 machine, or `WHVI_SIMD=portable` anywhere, runs the
//! narrower code paths, so that both can be measured and compared on one machine; every path
//! gives the same results bit for bit.

use std::sync::OnceLock;

/// The name of the environment variable that caps the instruction set.
pub const ENV_VAR: &str = "WHVI_SIMD";

/// An instruction set the CPU kernels can be compiled for, from the narrowest up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust on scalars (vectorised only by the compiler for the build's baseline).
    Portable,
    /// NEON, 128-bit vectors (aarch64, where it is always present).
    Neon,
    /// AVX2 with FMA, 256-bit vectors (x86-64).
    Avx2,
    /// AVX-512 F, 512-bit vectors (x86-64).
    Avx512,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 4] = [Level::Portable, Level::Neon, Level::Avx2, Level::Avx512];

    /// The name used by `WHVI_SIMD` and in benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Neon => "neon",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// The level called `name` (as [`Level::name`] writes it), if any.
    pub fn from_name(name: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|level| level.name() == name.trim().to_ascii_lowercase())
    }

    /// Whether this CPU can execute code compiled for the level.
    pub fn is_supported(self) -> bool {
        match self {
            Level::Portable => true,
            Level::Neon => cfg!(target_arch = "aarch64"),
            Level::Avx2 => avx2_supported(),
            Level::Avx512 => avx512_supported(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_supported() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_supported() -> bool {
    avx2_supported() && is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_supported() -> bool {
    false
}

/// The levels this CPU supports, narrowest first (always starting with [`Level::Portable`]).
pub fn supported() -> Vec<Level> {
    Level::ALL
        .into_iter()
        .filter(|level| level.is_supported())
        .collect()
}

/// The widest level this CPU supports.
pub fn detected() -> Level {
    widest(&supported(), Level::Avx512)
}

/// The level the kernels run at: [`detected`], capped by `WHVI_SIMD` when it is set. Read once
/// per process.
///
/// A value that names no level, or one this CPU lacks, is reported on stderr once; then the
/// widest supported level below it runs (the detected one for a value that names no level).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let requested = std::env::var(ENV_VAR).ok();
        let (level, warning) = resolve(requested.as_deref(), &supported());
        if let Some(warning) = warning {
            eprintln!("whvi: {warning}");
        }
        level
    })
}

/// The widest of `supported` at or below `cap` (`Portable` if none is).
fn widest(supported: &[Level], cap: Level) -> Level {
    supported
        .iter()
        .copied()
        .filter(|&level| level <= cap)
        .max()
        .unwrap_or(Level::Portable)
}

/// The level for a `WHVI_SIMD` value on a CPU that supports `supported`, and what to tell the
/// user when the value cannot be followed as given.
pub fn resolve(requested: Option<&str>, supported: &[Level]) -> (Level, Option<String>) {
    let detected = widest(supported, Level::Avx512);
    let Some(requested) = requested.filter(|value| !value.trim().is_empty()) else {
        return (detected, None);
    };
    let Some(wanted) = Level::from_name(requested) else {
        let names: Vec<_> = Level::ALL.iter().map(|level| level.name()).collect();
        let warning = format!(
            "{ENV_VAR}={requested:?} names no instruction set; use one of {}. Using {}.",
            names.join(", "),
            detected.name()
        );
        return (detected, Some(warning));
    };
    if supported.contains(&wanted) {
        return (wanted, None);
    }
    let fallback = widest(supported, wanted);
    let warning = format!(
        "{ENV_VAR}={} asks for an instruction set this CPU lacks (it has {}). Using {}.",
        wanted.name(),
        detected.name(),
        fallback.name()
    );
    (fallback, Some(warning))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVX2_CPU: [Level; 2] = [Level::Portable, Level::Avx2];

    #[test]
    fn unset_or_empty_runs_the_widest_supported_level() {
        assert_eq!(resolve(None, &AVX2_CPU), (Level::Avx2, None));
        assert_eq!(resolve(Some(" "), &AVX2_CPU), (Level::Avx2, None));
    }

    #[test]
    fn a_supported_level_is_followed_in_any_case() {
        assert_eq!(
            resolve(Some("Portable"), &AVX2_CPU),
            (Level::Portable, None)
        );
        assert_eq!(resolve(Some("avx2"), &AVX2_CPU), (Level::Avx2, None));
    }

    #[test]
    fn a_missing_level_falls_back_below_it_and_says_so() {
        let (level, warning) = resolve(Some("avx512"), &AVX2_CPU);
        assert_eq!(level, Level::Avx2);
        assert!(warning.unwrap().contains("lacks (it has avx2)"));
        let (level, warning) = resolve(Some("neon"), &AVX2_CPU);
        assert_eq!(level, Level::Portable);
        assert!(warning.is_some());
    }

    #[test]
    fn an_unknown_name_lists_the_valid_ones() {
        let (level, warning) = resolve(Some("sse9"), &AVX2_CPU);
        assert_eq!(level, Level::Avx2);
        assert!(warning.unwrap().contains("portable, neon, avx2, avx512"));
    }

    #[test]
    fn this_cpu_supports_portable_and_what_it_detects() {
        let levels = supported();
        assert_eq!(levels[0], Level::Portable);
        assert!(levels.contains(&detected()));
    }
}
