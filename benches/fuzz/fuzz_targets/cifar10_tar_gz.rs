//! The CIFAR-10 archive reader on arbitrary bytes as the `.tar.gz` file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whvi::data::cifar10;

fuzz_target!(|data: &[u8]| {
    let path = whvi_fuzz::scratch_file("cifar-10-binary.tar.gz", data);
    let _ = cifar10::load(&path);
});
