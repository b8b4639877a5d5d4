//! The `.npy` reader on arbitrary bytes, and the loaders of predictions and labels on top of
//! it. An array that parses must survive a write and a second read unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whvi::metrics::{load_labels, load_predictions, NpyArray};

fuzz_target!(|data: &[u8]| {
    if let Ok(array) = NpyArray::from_bytes(data) {
        let _ = array.to_f64();
        let _ = array.to_integers();
        let written = array.to_bytes();
        let again = NpyArray::from_bytes(&written).expect("an array whvi wrote reads back");
        assert_eq!(again.shape(), array.shape());
        assert_eq!(again.dtype(), array.dtype());
        assert_eq!(again.to_bytes(), written, "write, read, write is stable");
    }
    let path = whvi_fuzz::scratch_file("fuzz.npy", data);
    let _ = load_predictions(&path);
    let _ = load_labels(&path);
});
