//! The SVHN reader: arbitrary bytes as a MATLAB 5 `.mat` file (header, plain and
//! zlib-compressed variables, small data elements).
#![no_main]

use libfuzzer_sys::fuzz_target;
use whvi::data::svhn;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = svhn::parse(data) {
        assert_eq!(set.images().len(), set.len() * 3 * 32 * 32);
        assert!(set.labels().iter().all(|&l| l < 10));
    }
});
