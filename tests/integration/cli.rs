//! The command line end to end on the built-in model: run, resume, filter, generate,
//! inspect, list, validate.

use crate::support::{bench, fixture, root, shared_cache, write_small_suite};

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn run_writes_results_and_resume_does_no_work() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32, fp16, bf16]");
    let out = dir.path().join("out");
    let args = ["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let first = bench(&args, dir.path(), &shared_cache());
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        first.stdout.contains("## tiny") && first.stdout.contains("| fp16 |"),
        "table missing:\n{}",
        first.stdout
    );
    assert!(!first.stdout.contains("GPU tok/s"), "a CPU run prints no GPU column:\n{}", first.stdout);
    for file in ["results.json", "results.md", "results.csv"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let results = read_json(&out.join("results.json"));
    assert_eq!(results["schema_version"], 2);
    assert!(results["suite"]["text"].as_str().unwrap().contains("name: small"));
    assert_eq!(results["models"][0]["arch"], "llama");
    let cases = results["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);

    let case = |label: &str| cases.iter().find(|c| c["label"] == label).unwrap();
    let fp32 = case("fp32");
    assert_eq!(fp32["divergence"]["stats"]["kld"]["mean"], 0.0, "fp32 is the reference itself");
    assert_eq!(fp32["divergence"]["stats"]["same_top1"]["value"], 1.0);
    assert_eq!(fp32["memory"]["bits_per_weight"], 32.0);
    let fp16 = case("fp16");
    let kld = fp16["divergence"]["stats"]["kld"]["mean"].as_f64().unwrap();
    assert!(kld > 0.0 && kld < 1e-3, "fp16 KLD {kld}");
    assert_eq!(fp16["memory"]["bits_per_weight"], 16.0);
    // 7 chunks of 32 tokens, positions 16..31 scored in each.
    assert_eq!(fp16["divergence"]["tokens_scored"], 105);
    for c in cases {
        let disk = c["disk"]["bytes_over_memory"].as_f64().unwrap();
        assert!((1.0..1.005).contains(&disk), "{}: disk/memory {disk} beyond 0.5%", c["id"]);
        assert_eq!(c["disk"]["reload_identical"], true);
        assert_eq!(c["latency"]["prefill_ms"].as_array().unwrap().len(), 2, "repeats");
        assert_eq!(c["latency"]["decode_ms"].as_array().unwrap().len(), 2 * 4, "repeats × gen_len");
        assert_eq!(c["generation"].as_array().unwrap().len(), 2);
    }
    let fp16_bytes = fp16["memory"]["bytes_by_role"]["packed_weights"].as_u64().unwrap();
    let fp32_bytes = fp32["memory"]["bytes_by_role"]["packed_weights"].as_u64().unwrap();
    assert_eq!(fp32_bytes, 2 * fp16_bytes);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header + 3 cases:\n{csv}");

    let resumed = bench(&[&args[..], &["--resume"]].concat(), dir.path(), &shared_cache());
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(resumed.stderr.matches("skipped").count(), 3, "{}", resumed.stderr);
    assert!(!resumed.stderr.contains("reference pass"), "resume must not recompute the reference");
    let again = read_json(&out.join("results.json"));
    assert_eq!(again["cases"], results["cases"], "resumed cases must be the earlier ones, unchanged");

    // A filtered resume keeps the cases it does not select.
    let filtered =
        bench(&[&args[..], &["--resume", "--filter", "fp16"]].concat(), dir.path(), &shared_cache());
    assert_eq!(filtered.code, 0, "{}", filtered.stderr);
    assert_eq!(filtered.stderr.matches("skipped").count(), 1, "{}", filtered.stderr);
    assert_eq!(read_json(&out.join("results.json"))["cases"], results["cases"]);
}

/// The quick start covers every scheme in the registry, and every case of it runs end to
/// end: measured, saved, reloaded bit-identically.
#[test]
fn quickstart_runs_every_registered_scheme() {
    let text = std::fs::read_to_string(root().join("suites/quickstart.yaml")).unwrap();
    let suite = quantbench::suite::parse(&text, std::path::Path::new("quickstart.yaml")).unwrap();
    let in_suite: Vec<&str> = suite.schemes.iter().map(|s| s.value.name.as_str()).collect();
    for scheme in quantbench::scheme::SCHEMES {
        assert!(in_suite.contains(&scheme.name), "suites/quickstart.yaml lacks scheme {}", scheme.name);
    }
    let out = tempfile::tempdir().unwrap();
    let run = bench(
        &["run", "suites/quickstart.yaml", "--out", out.path().to_str().unwrap()],
        &root(),
        &shared_cache(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let results = read_json(&out.path().join("results.json"));
    let cases = results["cases"].as_array().unwrap();
    assert_eq!(cases.len(), in_suite.len());
    for case in cases {
        assert_eq!(case["disk"]["reload_identical"], true, "{}", case["id"]);
        let kld = case["divergence"]["stats"]["kld"]["mean"].as_f64().unwrap();
        assert!(kld.is_finite() && kld >= 0.0, "{}: KLD {kld}", case["id"]);
    }
}

/// A run without `--out` writes under runs/ (ignored by git), never into the suite's
/// published report folder; `--publish` writes there.
#[test]
fn runs_go_to_the_runs_folder_unless_published() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32]");
    let run = bench(&["run", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(dir.path().join("runs/small/results.json").is_file());
    assert!(!dir.path().join("reports").exists(), "a plain run wrote into reports/");
    let publish = bench(&["run", suite.to_str().unwrap(), "--publish"], dir.path(), &shared_cache());
    assert_eq!(publish.code, 0, "{}", publish.stderr);
    assert!(dir.path().join("reports/small/results.json").is_file());
}

#[test]
fn filter_runs_only_matching_cases_and_quantize_head_moves_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let schemes = "[fp32, bf16, {name: bf16, label: bf16-head, quantize_head: true}]";
    let suite = write_small_suite(dir.path(), schemes);
    let out = dir.path().join("out");
    let args = ["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap(), "--filter", "*/bf16*"];
    let run = bench(&args, dir.path(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let results = read_json(&out.join("results.json"));
    let cases = results["cases"].as_array().unwrap();
    let ids: Vec<&str> = cases.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny/bf16", "tiny/bf16-head"]);
    let (plain, head) = (&cases[0]["memory"], &cases[1]["memory"]);
    let head_weights = 512 * 256; // vocab × hidden of the built-in model
    let count = |m: &serde_json::Value, k: &str| m[k].as_u64().unwrap();
    let role = |m: &serde_json::Value, r: &str| m["bytes_by_role"][r].as_u64().unwrap();
    assert_eq!(count(head, "quantized_weights"), count(plain, "quantized_weights") + head_weights);
    assert_eq!(role(plain, "unquantized") - role(head, "unquantized"), 4 * head_weights);
    assert_eq!(role(head, "packed_weights") - role(plain, "packed_weights"), 2 * head_weights);
    assert_eq!(head["bits_per_weight"], 16.0);
    assert_eq!(
        results["models"][0]["parameters"],
        count(plain, "quantized_weights") + 2 * head_weights + 9 * 256
    );
}

/// Every architecture of the zoo runs through the runner: decoders with next-token
/// divergence, the encoder with embedding divergence and no decode timings.
#[test]
fn run_covers_every_architecture() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(root().join("suites/data/eval.txt"), dir.path().join("eval.txt")).unwrap();
    let models: String = ["bloom-tiny", "gpt2-tiny", "qwen2-tiny", "bert-tiny"]
        .iter()
        .map(|m| format!("  - name: {m}\n    path: {}\n", fixture(m).display()))
        .collect();
    let suite = format!(
        "name: zoo\nmodels:\n{models}schemes: [fp32, bf16]\n\
         workload:\n  prompts: [\"The cat sat.\"]\n  eval_text: eval.txt\n  prompt_len: 8\n  gen_len: 3\n  \
         context: 32\n  max_chunks: 7\nrepeats: 1\nwarmup: 0\n"
    );
    std::fs::write(dir.path().join("zoo.yaml"), suite).unwrap();
    let out = dir.path().join("out");
    let run = bench(&["run", "zoo.yaml", "--out", out.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let results = read_json(&out.join("results.json"));
    let archs: Vec<&str> =
        results["models"].as_array().unwrap().iter().map(|m| m["arch"].as_str().unwrap()).collect();
    assert_eq!(archs, ["bloom", "gpt2", "qwen2", "bert"]);
    for case in results["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        assert_eq!(case["disk"]["reload_identical"], true, "{id}");
        let exact = case["label"] == "fp32";
        if id.starts_with("bert") {
            let e = &case["embedding"];
            assert!(case["divergence"].is_null() && case["generation"].is_null(), "{id}");
            assert!(case["latency"]["decode"].is_null(), "{id}: an encoder has no decode steps");
            let cos = e["cosine_min"].as_f64().unwrap();
            if exact {
                assert_eq!((cos, e["hidden_nmse"].as_f64().unwrap()), (1.0, 0.0), "{id}");
            } else {
                assert!(cos < 1.0 && cos > 0.999, "{id}: cosine {cos}");
            }
            // One prompt, then evaluation sentences up to max_chunks.
            assert_eq!(e["sentences"], 8, "{id}");
        } else {
            let kld = case["divergence"]["stats"]["kld"]["mean"].as_f64().unwrap();
            assert!(if exact { kld == 0.0 } else { kld > 0.0 && kld < 1e-3 }, "{id}: KLD {kld}");
            assert_eq!(case["generation"].as_array().unwrap().len(), 1, "{id}");
            assert_eq!(case["latency"]["decode_ms"].as_array().unwrap().len(), 3, "{id}");
        }
    }
}

#[test]
fn generate_json_lists_ids_text_and_top_k_per_position() {
    let dir = tempfile::tempdir().unwrap();
    let run = bench(
        &[
            "generate",
            "builtin:tiny-llama",
            "--prompt",
            "Hello, how are you?",
            "--max-new-tokens",
            "4",
            "--top-k",
            "3",
            "--json",
        ],
        dir.path(),
        &shared_cache(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let p = &doc["prompts"][0];
    let inputs = p["input_ids"].as_array().unwrap().len();
    assert!(inputs > 3);
    assert_eq!(p["generated_ids"].as_array().unwrap().len(), 4);
    let prompt_top = p["prompt_top_k"].as_array().unwrap();
    assert_eq!(prompt_top.len(), inputs);
    for position in prompt_top.iter().chain(p["generated_top_k"].as_array().unwrap()) {
        let lp: Vec<f64> =
            position.as_array().unwrap().iter().map(|e| e["logprob"].as_f64().unwrap()).collect();
        assert_eq!(lp.len(), 3);
        assert!(lp.windows(2).all(|w| w[0] >= w[1]) && lp[0] <= 0.0, "{lp:?}");
    }
    // The greedy token of each step is the first of that step's top-k.
    for (id, top) in
        p["generated_ids"].as_array().unwrap().iter().zip(p["generated_top_k"].as_array().unwrap())
    {
        assert_eq!(&top[0]["id"], id);
    }
    // The whole vocabulary as top-k: the streamed document still parses, every position
    // lists every token once.
    let full = bench(
        &[
            "generate",
            "builtin:tiny-llama",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
            "--top-k",
            "512",
            "--json",
        ],
        dir.path(),
        &shared_cache(),
    );
    assert_eq!(full.code, 0, "{}", full.stderr);
    let doc: serde_json::Value = serde_json::from_str(&full.stdout).unwrap();
    for position in doc["prompts"][0]["generated_top_k"].as_array().unwrap() {
        let mut ids: Vec<u64> =
            position.as_array().unwrap().iter().map(|e| e["id"].as_u64().unwrap()).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..512).collect::<Vec<u64>>());
    }
    std::fs::write(dir.path().join("prompts.txt"), "Hello\n\n1.1+2.3=?\n").unwrap();
    let text = bench(
        &[
            "generate",
            "builtin:tiny-llama",
            "--prompts",
            "prompts.txt",
            "--scheme",
            "bf16",
            "--max-new-tokens",
            "3",
        ],
        dir.path(),
        &shared_cache(),
    );
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.starts_with("Hello"), "{}", text.stdout);
    assert_eq!(text.stdout.matches("prefill").count(), 2, "one line per non-empty prompt:\n{}", text.stdout);
    assert!(text.stdout.contains("over 2 steps, scheme bf16"), "{}", text.stdout);
}

/// `--param` sets a scheme parameter in `generate` and `embed`, checked by the suite's own
/// rules and messages.
#[test]
fn scheme_parameters_reach_generate_and_embed_with_the_suite_errors() {
    let dir = tempfile::tempdir().unwrap();
    let gen = |params: &[&str]| {
        let mut args = vec!["generate", "builtin:tiny-llama", "--prompt", "Hi", "--max-new-tokens", "2"];
        args.extend(["--scheme", "int4-block"]);
        for p in params {
            args.extend(["--param", p]);
        }
        bench(&args, dir.path(), &shared_cache())
    };
    let ok = gen(&["exact_gemv=true", "block_size=64"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let typed = gen(&["exact_gemv=yes"]);
    assert!(
        typed.stderr.contains("parameter `exact_gemv` is \"yes\", expected a boolean"),
        "{}",
        typed.stderr
    );
    let unknown = gen(&["blok=3"]);
    assert!(
        unknown.stderr.contains("unknown parameter `blok`, expected one of: block_size"),
        "{}",
        unknown.stderr
    );
    let keyless = gen(&["=3"]);
    assert!(keyless.stderr.contains("expected KEY=VALUE"), "{}", keyless.stderr);
    let model = fixture("bert-tiny");
    let embed = bench(
        &[
            "embed",
            model.to_str().unwrap(),
            "--sentence",
            "The cat sat.",
            "--scheme",
            "nf4",
            "--param",
            "block_size=0",
        ],
        &root(),
        &shared_cache(),
    );
    assert_ne!(embed.code, 0);
    assert!(embed.stderr.contains("scheme nf4: parameter `block_size` is 0"), "{}", embed.stderr);
}

#[test]
fn embed_prints_the_reference_embedding_and_generate_refuses_an_encoder() {
    let model = fixture("bert-tiny");
    let run = bench(
        &["embed", model.to_str().unwrap(), "--sentence", "The cat sat.", "--json"],
        &root(),
        &shared_cache(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let got: Vec<f64> =
        doc["sentences"][0]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let golden = std::fs::read(model.join("golden.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&golden).unwrap();
    let expect: Vec<f64> = golden.tensor("batch.sentence_embedding").unwrap().data()[..64 * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    let cos: f64 = got.iter().zip(&expect).map(|(a, b)| a * b).sum();
    assert!(cos > 0.99999, "cosine with transformers' embedding {cos}");

    let refused = bench(&["generate", model.to_str().unwrap(), "--prompt", "hi"], &root(), &shared_cache());
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("needs a causal language model") && refused.stderr.contains("bench embed"),
        "{}",
        refused.stderr
    );
}

#[test]
fn inspect_reports_architecture_parameters_and_dtypes() {
    let run = bench(&["inspect", fixture("llama-tiny-tied").to_str().unwrap()], &root(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("architecture llama"), "{}", run.stdout);
    assert!(run.stdout.contains("BF16 ×"), "{}", run.stdout);
}

/// Every committed suite validates, except that hub models absent from the cache give the
/// offline error naming the cache (tests never reach the hub).
#[test]
fn validate_accepts_the_committed_suites() {
    crate::support::real_models(&[]);
    let suites: Vec<_> = std::fs::read_dir(root().join("suites"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(suites.len() >= 4);
    // Built-ins at real models' shapes are generated on first use (13.5 GB for the 7B
    // one): their suites are for the machines that run them, not for every test run.
    const GENERATED_AT_RUN: [&str; 2] = ["builtin:llama-2-7b-shapes", "builtin:bloom-1b7-shapes"];
    for suite in suites {
        let text = std::fs::read_to_string(&suite).unwrap();
        let suite = suite.display().to_string();
        if let Some(big) = GENERATED_AT_RUN.iter().find(|b| text.contains(*b)) {
            println!("{suite}: names {big}, generated where the suite runs; not validated here");
            continue;
        }
        let run = bench(&["validate", &suite], &root(), &shared_cache());
        if run.code != 0 && run.stderr.contains("not in the Hugging Face cache") {
            println!("{suite}: hub models not cached, validation stopped as expected");
            continue;
        }
        assert_eq!(run.code, 0, "{suite}: {}", run.stderr);
        assert!(run.stdout.contains("ok"), "{}", run.stdout);
    }
}

/// The README's registry tables are the output of `bench list … --markdown`.
#[test]
fn readme_tables_come_from_the_registries() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for what in ["schemes", "metrics", "archs", "builtins"] {
        let run = bench(&["list", what, "--markdown"], &root(), &shared_cache());
        assert_eq!(run.code, 0);
        assert!(
            readme.contains(&run.stdout),
            "README.md is missing the current `bench list {what} --markdown` table:\n{}",
            run.stdout
        );
    }
}

/// `bench profile` names the op kinds of a decoder's prefill, its decode steps and an
/// encoder's pass, with shares that leave the rest as "other"; bad sizes are refused.
#[test]
fn profile_reports_time_per_op_kind() {
    let dir = tempfile::tempdir().unwrap();
    let llama = fixture("llama-tiny").display().to_string();
    let run = bench(&["profile", &llama, "--tokens", "8", "--repeats", "2"], dir.path(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    for kind in
        ["prefill of 1 × 8 tokens", "peaks measured here", "linear", "attention", "rms norm", "silu", "other"]
    {
        assert!(run.stdout.contains(kind), "{kind} missing from:\n{}", run.stdout);
    }
    let run = bench(
        &[
            "profile",
            &llama,
            "--scheme",
            "int8-dynamic",
            "--decode",
            "--batch",
            "2",
            "--tokens",
            "4",
            "--repeats",
            "3",
        ],
        dir.path(),
        &shared_cache(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    for kind in ["decode steps of 2 sequence(s) after 4 tokens", "activation quantization", "attention"] {
        assert!(run.stdout.contains(kind), "{kind} missing from:\n{}", run.stdout);
    }
    let bert = fixture("bert-tiny").display().to_string();
    let run = bench(&["profile", &bert, "--batch", "2", "--tokens", "6"], dir.path(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("encoder pass of 2 × 6 tokens") && run.stdout.contains("gelu"),
        "{}",
        run.stdout
    );
    let run = bench(&["profile", &bert, "--decode"], dir.path(), &shared_cache());
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("an encoder has no decode steps"), "{}", run.stderr);
    let run = bench(&["profile", &llama, "--tokens", "100000"], dir.path(), &shared_cache());
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("expected at most the model's"), "{}", run.stderr);
}
