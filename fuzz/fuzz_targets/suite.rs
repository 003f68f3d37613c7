//! Fuzz target: the suite parser on arbitrary text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = quantbench::suite::parse(text, Path::new("fuzz.yaml"));
    }
});
