//! The idx reader (MNIST, Fashion-MNIST): the input, split in two (see `split_in_two`), is the
//! images file and the labels file of both the training and the test set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whvi::data::idx;

fuzz_target!(|data: &[u8]| {
    let dir = whvi_fuzz::scratch_dir().join("idx");
    std::fs::create_dir_all(&dir).unwrap();
    let (images, labels) = whvi_fuzz::split_in_two(data);
    for set in ["train", "t10k"] {
        std::fs::write(dir.join(format!("{set}-images-idx3-ubyte")), images).unwrap();
        std::fs::write(dir.join(format!("{set}-labels-idx1-ubyte")), labels).unwrap();
    }
    if let Ok(data) = idx::load_fashion_mnist(&dir) {
        assert_eq!(
            data.train.len(),
            data.test.len(),
            "the same files for both sets"
        );
    }
});
