//! The seeded random generator that every source of randomness in `whvi` draws from.
//!
//! Candle's CPU generator cannot be seeded, so layers, data augmentation and shuffling take a
//! `&mut WhviRng` owned by the caller: the same seed reproduces a run bit for bit on the CPU,
//! and [`RngState`] lets a checkpoint resume the stream exactly where it stopped.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The generator used throughout the crate.
pub type WhviRng = ChaCha8Rng;

/// A generator seeded from a `u64`.
pub fn seeded(seed: u64) -> WhviRng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A generator for one named part of a job (`"shift/fog/3"`), seeded from `seed` on a stream
/// of its own: each part draws the same numbers whichever other parts run before it, so a
/// corrupted set evaluated alone repeats its numbers in a full evaluation.
pub fn seeded_stream(seed: u64, name: &str) -> WhviRng {
    // FNV-1a: a fixed, documented hash (std's hashers may change between releases).
    let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut rng = seeded(seed);
    rng.set_stream(stream);
    rng
}

/// The full state of a [`WhviRng`], small enough to store in checkpoint metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 256-bit key.
    pub seed: [u8; 32],
    /// The stream number.
    pub stream: u64,
    /// The position in the stream, in 32-bit words (stored as a string: JSON has no u128).
    #[serde(with = "u128_as_string")]
    pub word_pos: u128,
}

impl RngState {
    /// Captures the state of `rng`.
    pub fn capture(rng: &WhviRng) -> Self {
        RngState {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    /// Rebuilds a generator that continues exactly where the captured one stood.
    pub fn restore(&self) -> WhviRng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

mod u128_as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn named_streams_differ_from_each_other_and_repeat() {
        let draw = |seed, name| seeded_stream(seed, name).random::<u64>();
        assert_eq!(draw(3, "shift/fog/1"), draw(3, "shift/fog/1"));
        assert_ne!(draw(3, "shift/fog/1"), draw(3, "shift/fog/2"));
        assert_ne!(draw(3, "shift/fog/1"), draw(4, "shift/fog/1"));
        assert_ne!(draw(3, "ood"), seeded(3).random::<u64>());
    }

    #[test]
    fn captured_state_continues_the_same_stream() {
        let mut rng = seeded(7);
        for _ in 0..13 {
            rng.random::<u32>();
        }
        let state = RngState::capture(&rng);
        let json = serde_json::to_string(&state).unwrap();
        let mut restored = serde_json::from_str::<RngState>(&json).unwrap().restore();
        let expected: Vec<u64> = (0..5).map(|_| rng.random()).collect();
        let got: Vec<u64> = (0..5).map(|_| restored.random()).collect();
        assert_eq!(expected, got);
    }
}
