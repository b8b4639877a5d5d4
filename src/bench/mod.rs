//! Benchmarks behind `whvi bench ...`: each prints one JSON line per configuration, with the
//! figure that matters given as a ratio to a baseline timed in the same run.

pub mod fwht;
pub mod layers;
pub mod train;
