//! The CIFAR-10 archive reader's tar layer: arbitrary bytes as the tar stream, gzip-compressed
//! here so that the input reaches the tar parser (cifar10_tar_gz fuzzes the compressed bytes).
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use whvi::data::cifar10;

fuzz_target!(|data: &[u8]| {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    let path = whvi_fuzz::scratch_file("cifar-10-binary.tar.gz", &gz.finish().unwrap());
    let _ = cifar10::load_tar_gz(&path);
});
