//! Fuzz target: the safetensors header reader; every range it accepts must lie inside the
//! input, and decoding the float tensors must not fail on it.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use quantbench::model::weights::{parse_safetensors, to_f32};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_safetensors(data, Path::new("fuzz.safetensors")) else { return };
    for (_, info) in &header.tensors {
        let (begin, end) = info.data_offsets;
        let bytes = &data[header.data_start + begin..header.data_start + end];
        if let Some(values) = to_f32(bytes, info.dtype) {
            assert_eq!(values.len(), info.shape.iter().product::<usize>());
        }
    }
});
