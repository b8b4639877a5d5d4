//! Helpers shared by the integration tests that train.

use std::path::{Path, PathBuf};

use rand::Rng;
use whvi::rng::seeded;

const RECORD: usize = 3073;

/// Writes `cifar-10-batches-bin` with `per_file` images per training file: each class has its
/// own colour, plus noise, so a small network can learn it in two epochs.
pub fn write_dataset(root: &Path, per_file: usize) -> PathBuf {
    let dir = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = seeded(1);
    let mut batch = |n: usize| -> Vec<u8> {
        let mut bytes = Vec::with_capacity(n * RECORD);
        for i in 0..n {
            let label = (i % 10) as u8;
            bytes.push(label);
            for channel in 0..3u32 {
                let base = ((u32::from(label) * (channel + 3) * 37) % 200) as i32 + 20;
                for _ in 0..1024 {
                    let noise: i32 = rng.random_range(-30..=30);
                    bytes.push((base + noise).clamp(0, 255) as u8);
                }
            }
        }
        bytes
    };
    for k in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{k}.bin")), batch(per_file)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), batch(100)).unwrap();
    root.to_path_buf()
}
