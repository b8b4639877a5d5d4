//! Benchmarks behind `whvi bench ...`: each prints one JSON line per configuration, with the
//! figure that matters given as a ratio to a baseline timed in the same run.

pub mod conv;
pub mod fwht;
pub mod fwht_device;
pub mod layers;
pub mod train;

/// The median of timed repetitions (the upper one of the two middle values for an even count).
///
/// # Panics
/// On an empty slice: every benchmark times at least one repetition.
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Rounds to four significant digits: more than the noise of a timing allows, and lines stay
/// readable.
pub(crate) fn round_significant(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let digits = 4 - x.abs().log10().ceil() as i32;
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
