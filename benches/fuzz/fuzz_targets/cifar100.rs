//! The CIFAR-100 directory reader with arbitrary bytes as `test.bin` and, after the split (see
//! `split_in_two`), as `fine_label_names.txt`; `train.bin` holds one valid record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whvi::data::cifar100;

fuzz_target!(|data: &[u8]| {
    let dir = whvi_fuzz::scratch_dir().join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let mut record = vec![3u8, 17];
    record.resize(cifar100::RECORD_BYTES, 9);
    std::fs::write(dir.join("train.bin"), record).unwrap();
    let (test, names) = whvi_fuzz::split_in_two(data);
    std::fs::write(dir.join("test.bin"), test).unwrap();
    let names_path = dir.join("fine_label_names.txt");
    let _ = std::fs::remove_file(&names_path);
    if !names.is_empty() {
        std::fs::write(&names_path, names).unwrap();
    }
    if let Ok(data) = cifar100::load(&dir) {
        assert_eq!((data.train.len(), data.train.num_classes()), (1, 100));
        assert_eq!(data.test.len() * cifar100::RECORD_BYTES, test.len());
    }
});
