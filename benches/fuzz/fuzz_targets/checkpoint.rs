//! The checkpoint reader on arbitrary bytes: metadata, checksum, tensors and the network they
//! describe. Any outcome but a panic is fine; what is checked is that a file the verifying read
//! accepts is accepted without verification too.
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use whvi::checkpoint::{describe, Checkpoint, Checksum};

fuzz_target!(|data: &[u8]| {
    let path = whvi_fuzz::scratch_file("fuzz.safetensors", data);
    let _ = Checkpoint::read_meta(&path);
    let _ = describe(&path);
    let verified = Checkpoint::read_with(&path, &Device::Cpu, Checksum::Verify).is_ok();
    let unverified = Checkpoint::read_with(&path, &Device::Cpu, Checksum::Skip).is_ok();
    assert!(
        unverified || !verified,
        "a verified read passed where the unverified one failed"
    );
    let _ = Checkpoint::load_with(&path, &Device::Cpu, DType::F32, Checksum::Skip);
});
