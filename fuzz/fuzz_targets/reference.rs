//! Fuzz target: the stored-reference reader. Inputs are tried as they are, and again with
//! their trailing sha256 made valid, so the fuzzer also reaches the header and array
//! checks behind the checksum. A reference that parses must pass its own consistency check.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use quantbench::measure::reference_cache::parse;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("references/fuzz.qbref");
    if let Ok((_, reference)) = parse(data, path) {
        assert!(reference.check().is_ok());
    }
    if data.len() >= 48 {
        let mut fixed = data.to_vec();
        let body = fixed.len() - 32;
        let digest = Sha256::digest(&fixed[..body]);
        fixed[body..].copy_from_slice(&digest);
        if let Ok((_, reference)) = parse(&fixed, path) {
            assert!(reference.check().is_ok());
        }
    }
});
