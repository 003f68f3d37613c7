//! Fuzz target: the results.json reader.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = quantbench::measure::results::Results::parse(data, Path::new("results.json"));
});
