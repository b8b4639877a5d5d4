//! `whvi`: Walsh-Hadamard Variational Inference for Bayesian convolutional networks on Candle.
//!
//! A D x D weight matrix is `W = S1 · H · diag(g) · H · S2` with `H` the Walsh-Hadamard matrix,
//! `S1`, `S2` learned diagonals and `g ~ N(mu, diag(sigma^2))`: `4·D` parameters instead of `D^2`,
//! and `O(D log D)` compute through the fast Walsh-Hadamard transform ([`fwht`]).

#![warn(missing_docs)]

pub mod checkpoint;
pub mod conv;
mod cpu;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod fwht;
pub mod layers;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod output;
pub mod params;
pub mod rng;
pub mod simd;
pub mod train;
pub mod zoo;

pub use error::{Error, Result};
