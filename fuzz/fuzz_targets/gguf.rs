//! Fuzz target: the GGUF reader, then everything a model load asks of it (config,
//! tokenizer, every tensor dequantized, every metadata array decoded).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use quantbench::model::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec(), Path::new("fuzz.gguf")) else { return };
    for value in file.metadata().values() {
        if let Some(array) = value.as_array() {
            assert!(array.iter().count() == array.len());
            let _ = array.strs();
        }
    }
    let _ = file.hf_config();
    let _ = file.tokenizer_json();
    for tensor in file.tensors() {
        if let Ok(values) = file.dequantize(&tensor.name) {
            assert_eq!(values.len(), tensor.elements());
        }
    }
});
