//! Numbers that cannot lie: a non-finite weight, norm epsilon or output is an error naming
//! it, never a good-looking score; exit codes, the output-folder lock, the regression gate
//! and the lengths a model can take.

use std::path::{Path, PathBuf};

use crate::support::{
    assert_mentions, bench, fixture, model_copy, root, shared_cache, write_small_suite, Run,
};

/// Overwrite element `index` of the f32 or bf16 tensor `name` in `file` with `value`.
fn poison(file: &Path, name: &str, index: usize, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let entry = &header[name];
    let encoded = match entry["dtype"].as_str().unwrap() {
        "F32" => value.to_le_bytes().to_vec(),
        "BF16" => value.to_le_bytes()[2..].to_vec(),
        other => panic!("{name} is {other} in the fixture, expected F32 or BF16"),
    };
    let start = 8 + header_len + entry["data_offsets"][0].as_u64().unwrap() as usize + encoded.len() * index;
    bytes[start..start + encoded.len()].copy_from_slice(&encoded);
    std::fs::write(file, bytes).unwrap();
}

/// A small suite over the model folder `model` (relative to `dir`), written into `dir`.
fn suite(dir: &Path, model: &str, schemes: &str, extra: &str) -> PathBuf {
    std::fs::copy(root().join("suites/data/eval.txt"), dir.join("eval.txt")).unwrap();
    let text = format!(
        "name: trust\nmodels:\n  - name: m\n    path: {model}\nschemes: {schemes}\n\
         workload:\n  prompts: [\"Hello\"]\n  eval_text: eval.txt\n  prompt_len: 8\n  gen_len: 2\n  \
         context: 16\n  max_chunks: 30\n{extra}repeats: 1\nwarmup: 0\n"
    );
    let path = dir.join("s.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `bench validate` of the small suite over a model copy in `dir`, with `from` replaced by
/// `to` in the suite text; the run must fail (exit 1), and is returned for its message.
fn validate_edited(dir: &Path, from: &str, to: &str) -> Run {
    let suite = suite(dir, "model", "[fp32]", "");
    let text = std::fs::read_to_string(&suite).unwrap();
    assert!(text.contains(from), "the suite lacks {from:?}");
    std::fs::write(&suite, text.replacen(from, to, 1)).unwrap();
    let run = bench(&["validate", suite.to_str().unwrap()], dir, &shared_cache());
    assert_eq!(run.code, 1, "{from:?} -> {to:?}: {}{}", run.stdout, run.stderr);
    run
}

fn run_suite(dir: &Path, suite: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    bench(&args, dir, &shared_cache())
}

#[test]
fn a_nan_weight_is_named_and_never_scores() {
    for (tensor, index, value, shown) in
        [("model.norm.weight", 5, f32::NAN, "NaN"), ("model.embed_tokens.weight", 70, f32::INFINITY, "inf")]
    {
        let dir = tempfile::tempdir().unwrap();
        let model = model_copy(dir.path());
        poison(&model.join("model.safetensors"), tensor, index, value);
        let suite = suite(dir.path(), "model", "[fp32, int8-dynamic]", "");
        let out = dir.path().join("out");
        let run = run_suite(dir.path(), &suite, &out, &[]);
        assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
        assert_mentions(&run, &[tensor, &format!("element {index} is {shown}"), "expected finite weights"]);
        assert!(!out.join("results.json").exists(), "no results from a model that cannot be trusted");
    }
}

#[test]
fn a_weight_beyond_f16_range_is_named_when_the_model_runs_at_f16() {
    // A norm, and the embedding table (held at f16, rounded chunk by chunk).
    for (tensor, index) in [("model.norm.weight", 3), ("model.embed_tokens.weight", 70)] {
        let dir = tempfile::tempdir().unwrap();
        let model = model_copy(dir.path());
        poison(&model.join("model.safetensors"), tensor, index, 3e38);
        let suite = suite(dir.path(), "model", "[fp32]", "");
        let text = std::fs::read_to_string(&suite)
            .unwrap()
            .replace("    path: model\n", "    path: model\n    dtype: f16\n");
        std::fs::write(&suite, text).unwrap();
        let run = run_suite(dir.path(), &suite, &dir.path().join("out"), &[]);
        assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
        assert_mentions(&run, &[tensor, &format!("element {index} is inf once rounded to f16")]);
    }
}

#[test]
fn a_zero_norm_epsilon_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let config = model.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let broken = text.replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 0");
    assert_ne!(text, broken, "the fixture's epsilon moved");
    std::fs::write(&config, broken).unwrap();
    let suite = suite(dir.path(), "model", "[fp32]", "");
    let run = bench(&["validate", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_mentions(&run, &["config.json", "`rms_norm_eps` is 0, expected a positive number"]);
}

/// The committed baseline results, as JSON to edit.
fn baseline_results() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("report").join("baseline/results.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `bench compare BASELINE NEW --fail-on-regression` with NEW edited by `edit`.
fn gate(edit: impl FnOnce(&mut serde_json::Value)) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("report").join("baseline/results.json");
    let mut new = baseline_results();
    edit(&mut new);
    let new_path = dir.path().join("new.json");
    std::fs::write(&new_path, serde_json::to_string(&new).unwrap()).unwrap();
    let out = dir.path().join("cmp");
    let args = [
        "compare",
        base.to_str().unwrap(),
        new_path.to_str().unwrap(),
        "--fail-on-regression",
        "--out",
        out.to_str().unwrap(),
    ];
    bench(&args, dir.path(), &shared_cache())
}

#[test]
fn the_gate_passes_an_identical_run() {
    let run = gate(|_| {});
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

#[test]
fn the_gate_fails_when_cases_vanish() {
    let run = gate(|new| {
        new["cases"].as_array_mut().unwrap().remove(0);
    });
    assert_eq!(run.code, 2, "a missing case must fail the gate:\n{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("1 baseline cases missing from the new run"), "{}", run.stderr);
    let run = gate(|new| new["cases"] = serde_json::json!([]));
    assert_eq!(run.code, 2, "an empty run must fail the gate:\n{}{}", run.stdout, run.stderr);
}

#[test]
fn the_gate_fails_when_a_metric_vanishes() {
    let run = gate(|new| new["cases"][0]["divergence"] = serde_json::Value::Null);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("measured in the baseline only:"), "{}", run.stdout);
}

#[test]
fn the_gate_refuses_to_judge_different_workloads() {
    let run = gate(|new| {
        new["workload"]["prompt_len"] = serde_json::json!(7);
        new["workload"]["sha256"] = serde_json::json!("other");
    });
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("cannot gate: the workloads differ in prompt_len"), "{}", run.stderr);
}

#[test]
fn usage_errors_exit_64_not_the_regression_code() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["run"][..], &["--no-such-flag"], &["compare", "a"], &["list", "nothing"]] {
        let run = bench(args, dir.path(), &shared_cache());
        assert_eq!(run.code, 64, "bench {args:?}:\n{}", run.stderr);
    }
    assert_eq!(bench(&["--help"], dir.path(), &shared_cache()).code, 0);
    assert_eq!(bench(&["--version"], dir.path(), &shared_cache()).code, 0);
}

/// `bench run` started in the background on a small suite of many cases, with `--keep-models`
/// off, so that it saves and removes a model file per case.
fn start_run(dir: &Path, out: &Path) -> std::process::Child {
    let suite = crate::support::write_small_suite(
        dir,
        "[fp32, fp16, bf16, int8-dynamic, int4-block, nf4, fp4, kmeans, int8-outlier, prune]",
    );
    std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .current_dir(dir)
        .env("QUANTBENCH_CACHE", shared_cache())
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bench starts")
}

/// Wait until `path` exists (or panic after a minute).
fn wait_for(path: &Path) {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(start.elapsed().as_secs() < 60, "{} never appeared", path.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Files in `dir` and below whose names contain `needle`.
fn files_named(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_named(&path, needle));
        } else if path.file_name().unwrap().to_string_lossy().contains(needle) {
            found.push(path);
        }
    }
    found
}

#[test]
fn a_second_run_into_the_same_folder_fails_at_once_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut first = start_run(dir.path(), &out);
    wait_for(&out.join(".bench.lock"));
    let suite = dir.path().join("small.yaml");
    let second = run_suite(dir.path(), &suite, &out, &[]);
    let first_pid = first.id();
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(first_pid as i32, libc::SIGTERM) };
    let status = first.wait().unwrap();
    assert_eq!(second.code, 1, "{}{}", second.stdout, second.stderr);
    assert!(second.stderr.contains(&format!("in use by bench pid {first_pid}")), "{}", second.stderr);
    assert_eq!(status.code(), Some(143), "SIGTERM exits 143");
}

#[test]
fn an_interrupted_run_keeps_whole_results_and_removes_its_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = start_run(dir.path(), &out);
    // Interrupt once a case has finished and while the next ones are running.
    wait_for(&out.join("results.json"));
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(run.id() as i32, libc::SIGINT) };
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "SIGINT exits 130:\n{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    let results =
        quantbench::report::Results::read(&out.join("results.json")).expect("results stay readable");
    assert!(stderr.contains(&format!("kept {} finished cases", results.cases.len())), "{stderr}");
    assert_eq!(files_named(&out, ".tmp-"), Vec::<PathBuf>::new(), "no temporary files may stay");
    assert_eq!(files_named(&out, ".safetensors"), Vec::<PathBuf>::new(), "no model files may stay");
    assert!(!out.join(".bench.lock").exists(), "the lock goes with the run");
}

#[test]
fn resume_over_another_workloads_results_is_refused_and_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let suite = crate::support::write_small_suite(dir.path(), "[fp32]");
    let first = run_suite(dir.path(), &suite, &out, &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let before = std::fs::read(out.join("results.json")).unwrap();
    let text = std::fs::read_to_string(&suite).unwrap().replace("prompt_len: 8", "prompt_len: 6");
    std::fs::write(&suite, text).unwrap();
    let resumed = run_suite(dir.path(), &suite, &out, &["--resume"]);
    assert_eq!(resumed.code, 1, "{}{}", resumed.stdout, resumed.stderr);
    assert!(resumed.stderr.contains("another workload (it differs in prompt_len)"), "{}", resumed.stderr);
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), before, "the earlier results stay");
}

#[test]
fn lengths_beyond_the_models_positions_are_refused_before_any_work() {
    let long_prompt = format!("prompts: [\"{}\"]", "Hello ".repeat(130));
    for (edit, named) in [
        (("prompt_len: 8", "prompt_len: 1000000"), "workload.prompt_len + gen_len is 1000002 positions"),
        (("context: 16", "context: 129"), "workload.context is 129 positions"),
        (("prompts: [\"Hello\"]", long_prompt.as_str()), "workload.prompts[0] ("),
    ] {
        let dir = tempfile::tempdir().unwrap();
        model_copy(dir.path());
        let run = validate_edited(dir.path(), edit.0, edit.1);
        assert_mentions(&run, &[named, "max_position_embeddings (128)", "config.json"]);
    }
}

#[test]
fn generate_refuses_more_tokens_than_the_model_has_positions() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    let args = ["generate", model.to_str().unwrap(), "--prompt", "Hello", "--max-new-tokens", "500"];
    let run = bench(&args, dir.path(), &shared_cache());
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_mentions(&run, &["--max-new-tokens is", "max_position_embeddings (128)"]);
}

#[test]
fn a_filter_matching_nothing_is_an_error_listing_the_cases() {
    let dir = tempfile::tempdir().unwrap();
    let suite = crate::support::write_small_suite(dir.path(), "[fp32, bf16]");
    let out = dir.path().join("out");
    let run = run_suite(dir.path(), &suite, &out, &["--filter", "int4"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_mentions(&run, &["--filter \"int4\" matches none", "tiny/fp32, tiny/bf16"]);
    assert!(!out.join("results.json").exists());
}

#[test]
fn an_empty_prompt_list_is_an_error_not_the_default_prompts() {
    let dir = tempfile::tempdir().unwrap();
    model_copy(dir.path());
    let run = validate_edited(dir.path(), "prompts: [\"Hello\"]", "prompts: []");
    assert_mentions(&run, &["line 7: workload.prompts is empty"]);
}

#[test]
fn an_eval_text_that_is_not_a_regular_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    model_copy(dir.path());
    let run = validate_edited(dir.path(), "eval_text: eval.txt", "eval_text: /dev/zero");
    assert_mentions(&run, &["workload.eval_text /dev/zero", "not a regular file"]);
}

#[test]
fn suite_level_errors_name_no_line_zero() {
    let dir = tempfile::tempdir().unwrap();
    model_copy(dir.path());
    let suite = suite(dir.path(), "model", "[]", "");
    let run = bench(&["validate", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_mentions(&run, &["`schemes` is empty"]);
    assert!(!run.stderr.contains("line 0"), "{}", run.stderr);
}

#[test]
fn an_empty_cache_variable_never_means_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["inspect", "builtin:tiny-llama"])
        .current_dir(&work)
        .env("QUANTBENCH_CACHE", "")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "nothing may be written into the working directory"
    );
    assert!(home.join(".cache/quantbench").is_dir());
}

#[test]
fn validate_finds_non_finite_weights_as_run_does() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_copy(dir.path());
    poison(&model.join("model.safetensors"), "model.layers.1.mlp.up_proj.weight", 17, f32::NAN);
    let suite = suite(dir.path(), "model", "[fp32]", "");
    let validate = bench(&["validate", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(validate.code, 1, "{}{}", validate.stdout, validate.stderr);
    assert_mentions(&validate, &["model m", "model.layers.1.mlp.up_proj.weight", "element 17 is NaN"]);
}

#[test]
fn calibration_text_without_tokens_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    model_copy(dir.path());
    std::fs::write(dir.path().join("calib.txt"), "").unwrap();
    let suite =
        suite(dir.path(), "model", "[int8-static]", "calibration:\n  text: calib.txt\n  samples: 16\n");
    let run = bench(&["validate", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_mentions(&run, &["calib.txt gives model m no tokens to calibrate on"]);
}

/// A second copy of the fixture model whose vocabulary is `extra` rows larger (same
/// tokenizer; the new embedding rows are zero).
fn model_with_larger_vocab(dir: &Path, extra: usize) -> PathBuf {
    let source = fixture("llama-tiny-tied");
    let model = dir.join("wide");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(source.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    config["vocab_size"] = serde_json::json!(vocab + extra);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in tensors.tensors() {
        let (mut shape, mut data) = (view.shape().to_vec(), view.data().to_vec());
        if name == "model.embed_tokens.weight" {
            data.extend(vec![0u8; extra * shape[1] * view.dtype().bitsize() / 8]);
            shape[0] += extra;
        }
        owned.push((name, view.dtype(), shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(model.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    model
}

#[test]
fn a_reference_with_another_vocabulary_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    model_copy(dir.path());
    model_with_larger_vocab(dir.path(), 8);
    let run = validate_edited(
        dir.path(),
        "    path: model\n",
        "    path: model\n    reference: wide\n  - name: wide\n    path: wide\n",
    );
    assert_mentions(&run, &["model m: its vocabulary is 320 tokens, reference wide's is 328"]);
}

#[test]
fn a_duplicated_yaml_key_is_named_without_parser_jargon() {
    let dir = tempfile::tempdir().unwrap();
    model_copy(dir.path());
    let run = validate_edited(dir.path(), "name: trust\n", "name: trust\nname: again\n");
    assert_mentions(&run, &["line 2", "duplicate mapping key: name, expected each key once"]);
    assert!(!run.stderr.contains("DuplicateKeyPolicy") && !run.stderr.contains("key `?`"), "{}", run.stderr);
}

#[test]
fn a_missing_relative_folder_is_named_as_a_folder_too() {
    let dir = tempfile::tempdir().unwrap();
    let suite = suite(dir.path(), "models/x", "[fp32]", "");
    let run = bench(&["validate", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_mentions(&run, &["no folder", "models/x exists, so `models/x` was read as a hub id"]);
}

#[test]
fn a_stale_incomplete_builtin_cache_folder_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let inspect = |cache: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
            .args(["inspect", "builtin:tiny-llama"])
            .current_dir(dir.path())
            .env("QUANTBENCH_CACHE", cache)
            .output()
            .unwrap()
    };
    assert!(inspect(&cache).status.success());
    let generated = std::fs::read_dir(cache.join("builtin")).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(generated.join(".complete")).unwrap();
    std::fs::write(generated.join("junk"), b"left over").unwrap();
    let again = inspect(&cache);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(generated.join(".complete").is_file() && !generated.join("junk").exists());
}

/// A hub model that cannot be had runs its `fallback:`, and the warning, results.json and
/// both reports say which model ran in place of which, and why.
#[test]
fn an_unreachable_model_runs_its_labelled_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32]");
    let text = std::fs::read_to_string(&suite).unwrap().replace(
        "path: builtin:tiny-llama\n",
        "path: absent-org/absent-model\n    fallback: builtin:tiny-llama\n",
    );
    std::fs::write(&suite, text).unwrap();
    let out = dir.path().join("out");
    let run =
        bench(&["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("absent-org/absent-model") && run.stderr.contains("fallback"),
        "{}",
        run.stderr
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let model = &results["models"][0];
    assert_eq!(model["path"], "builtin:tiny-llama");
    assert_eq!(model["fallback_for"]["requested"], "absent-org/absent-model");
    assert!(model["fallback_for"]["reason"].as_str().unwrap().contains("HF_HUB_OFFLINE"), "{model}");
    for report in ["summary.md", "index.html"] {
        let text = std::fs::read_to_string(out.join(report)).unwrap();
        assert!(text.contains("in place of `absent-org/absent-model`"), "{report}");
    }
    // Without a fallback the same suite is refused, naming the model.
    let strict = std::fs::read_to_string(&suite).unwrap().replace("    fallback: builtin:tiny-llama\n", "");
    std::fs::write(&suite, strict).unwrap();
    let refused = bench(&["validate", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("absent-org/absent-model"), "{}", refused.stderr);
}
