//! The CIFAR-10-C directory reader with arbitrary bytes as `labels.npy` and, after the split
//! (see `split_in_two`), as `fog.npy`; every severity of every file found is then loaded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whvi::eval::Cifar10C;

fuzz_target!(|data: &[u8]| {
    let dir = whvi_fuzz::scratch_dir().join("CIFAR-10-C");
    std::fs::create_dir_all(&dir).unwrap();
    let (labels, fog) = whvi_fuzz::split_in_two(data);
    std::fs::write(dir.join("labels.npy"), labels).unwrap();
    std::fs::write(dir.join("fog.npy"), fog).unwrap();
    let classes: Vec<String> = (0..256).map(|i| i.to_string()).collect();
    if let Ok(opened) = Cifar10C::open(&dir) {
        for corruption in opened.corruptions() {
            if let Ok(sets) = opened.load(corruption, 4, &classes) {
                assert_eq!(sets.len(), 5, "five severities");
            }
        }
    }
});
