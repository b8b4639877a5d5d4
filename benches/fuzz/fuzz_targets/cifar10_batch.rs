//! The CIFAR-10 directory reader with arbitrary bytes as the test batch and, after the split
//! (see `split_in_two`), as `batches.meta.txt`; the five training batches hold one valid record
//! each. Written gzip-compressed (`test_batch.bin.gz`) when the input's first byte is odd.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use whvi::data::cifar10;

/// One label byte and 3x32x32 pixels.
const RECORD_BYTES: usize = 3073;

fuzz_target!(|data: &[u8]| {
    let dir = whvi_fuzz::scratch_dir().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{i}.bin")), [7u8; RECORD_BYTES]).unwrap();
    }
    let (batch, meta) = whvi_fuzz::split_in_two(data);
    let gzipped = data.first().is_some_and(|b| b % 2 == 1);
    for stale in ["test_batch.bin", "test_batch.bin.gz", "batches.meta.txt"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    if gzipped {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(batch).unwrap();
        std::fs::write(dir.join("test_batch.bin.gz"), gz.finish().unwrap()).unwrap();
    } else {
        std::fs::write(dir.join("test_batch.bin"), batch).unwrap();
    }
    if !meta.is_empty() {
        std::fs::write(dir.join("batches.meta.txt"), meta).unwrap();
    }
    if let Ok(data) = cifar10::load(&dir) {
        assert_eq!(data.train.len(), 5, "five one-record training batches");
    }
});
