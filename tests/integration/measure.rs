//! The measurements end to end on the built-in model: exact zeros for an identical model,
//! the reference cache (reuse, refusal on mismatch), another model as the reference,
//! per-layer SQNR, the batch-invariance probe and per-case peak memory.

use std::path::Path;

use crate::support::{bench, bench_with_env, fixture, shared_cache, write_small_suite};

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn run_suite(dir: &Path, suite: &Path) -> serde_json::Value {
    let out = dir.join("out");
    let run = bench(&["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()], dir, &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    read_json(&out.join("results.json"))
}

fn case<'a>(results: &'a serde_json::Value, label: &str) -> &'a serde_json::Value {
    results["cases"].as_array().unwrap().iter().find(|c| c["label"] == label).unwrap()
}

/// Every number under `value` (recursively), with its key path.
fn numbers(value: &serde_json::Value, path: String, out: &mut Vec<(String, f64)>) {
    match value {
        serde_json::Value::Number(n) => out.push((path, n.as_f64().unwrap())),
        serde_json::Value::Object(map) => {
            map.iter().for_each(|(k, v)| numbers(v, format!("{path}.{k}"), out))
        }
        _ => {}
    }
}

#[test]
fn an_identical_model_scores_exact_zeros_and_infinite_sqnr() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32, int8-dynamic]");
    let results = run_suite(dir.path(), &suite);
    let fp32 = case(&results, "fp32");
    let stats = &fp32["divergence"]["stats"];
    let mut all = Vec::new();
    numbers(stats, "stats".into(), &mut all);
    for (path, value) in &all {
        let expected = if path.ends_with("logits_cosine")
            || path.ends_with("nll_correlation")
            || path.ends_with("same_top1.value")
            || path == "stats.ppl_ratio.value"
        {
            1.0
        } else if path.contains("ppl.")
            || path.contains("ppl_reference.")
            || path.ends_with("truncation_bound")
        {
            // Perplexities are the model's own; the truncation bound is the uncertainty the
            // top-k reference leaves, not a divergence.
            continue;
        } else {
            0.0
        };
        assert_eq!(*value, expected, "{path}");
    }
    assert_eq!(stats["ppl"], stats["ppl_reference"]);
    let layers = fp32["layers"].as_array().unwrap();
    assert_eq!(layers.iter().filter(|l| l["kind"] == "block").count(), 4, "one per block");
    assert_eq!(
        layers.iter().filter(|l| l["kind"] == "linear").count(),
        4 * 7 + 1,
        "seven per block and the head"
    );
    for layer in layers {
        assert_eq!(layer["sqnr_db"], "inf", "{layer}");
        assert_eq!(layer["cosine"], 1.0, "{layer}");
    }
    // int8 layers (the head stays f32): finite SQNR of a sensible size.
    let int8 = case(&results, "int8-dynamic");
    for layer in int8["layers"].as_array().unwrap().iter().filter(|l| l["name"] != "lm_head") {
        let db = layer["sqnr_db"].as_f64().unwrap_or_else(|| panic!("{layer}"));
        assert!((10.0..60.0).contains(&db), "{layer}");
    }
    let s = &int8["divergence"]["stats"];
    let kld = &s["kld"];
    let p = &kld["percentiles"];
    let ordered = ["min", "p0_1", "p1", "p5", "p10", "median", "p90", "p95", "p99", "p99_9", "max"]
        .map(|k| p[k].as_f64().unwrap());
    assert!(ordered.windows(2).all(|w| w[0] <= w[1]), "{p}");
    assert!(kld["mean"].as_f64().unwrap() > 0.0 && kld["std_error"].as_f64().unwrap() > 0.0);
    let same = s["same_top1"]["value"].as_f64().unwrap();
    let n = int8["divergence"]["tokens_scored"].as_f64().unwrap();
    let binomial = (same * (1.0 - same) / (n - 1.0)).sqrt();
    assert!((s["same_top1"]["std_error"].as_f64().unwrap() - binomial).abs() < 1e-12);
    let bound = s["kld_truncation_bound"].as_f64().unwrap();
    assert!(bound >= 0.0, "{bound}");
    // The peak RSS was measured for both cases, above each case's starting size.
    for c in results["cases"].as_array().unwrap() {
        let m = &c["memory"];
        assert!(m["peak_rss_bytes"].as_u64().unwrap() >= m["rss_start_bytes"].as_u64().unwrap(), "{m}");
    }
}

#[test]
fn fewer_than_100_scored_tokens_withhold_the_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp16]");
    let text = std::fs::read_to_string(&suite).unwrap().replace("max_chunks: 7", "max_chunks: 3");
    std::fs::write(&suite, text).unwrap();
    let results = run_suite(dir.path(), &suite);
    let d = &case(&results, "fp16")["divergence"];
    assert_eq!(d["tokens_scored"], 45);
    assert!(d["stats"].is_null());
    assert!(d["withheld"].as_str().unwrap().contains("only 45 tokens"), "{d}");
}

#[test]
fn the_reference_is_stored_once_reused_and_refused_when_the_workload_changed() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp16]");
    let first = run_suite(dir.path(), &suite);
    let record = &first["models"][0]["reference_cache"];
    assert_eq!(record["reused"], false);
    assert_eq!(record["top_k"], 64);
    assert_eq!(record["tokens_scored"], 105);
    let stored = Path::new(record["path"].as_str().unwrap());
    assert_eq!(std::fs::metadata(stored).unwrap().len(), record["bytes"].as_u64().unwrap());

    let second = run_suite(dir.path(), &suite);
    assert_eq!(second["models"][0]["reference_cache"]["reused"], true);
    assert_eq!(case(&second, "fp16")["divergence"], case(&first, "fp16")["divergence"]);

    // Another evaluation text: the stored reference no longer fits, and the run says so.
    let eval = dir.path().join("eval.txt");
    let text = std::fs::read_to_string(&eval).unwrap();
    std::fs::write(&eval, text.replace("the", "a")).unwrap();
    let out = dir.path().join("out");
    let run =
        bench(&["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("tiny.qbref"), "{}", run.stderr);
    assert!(run.stderr.contains("evaluation text sha256"), "{}", run.stderr);
    assert!(run.stderr.contains("delete the file to recompute"), "{}", run.stderr);
}

#[test]
fn a_full_vocabulary_reference_matches_the_top_k_one_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[int4-block]");
    let text = std::fs::read_to_string(&suite).unwrap();
    let kld = |results: &serde_json::Value, key: &str| {
        case(results, "int4-block")["divergence"]["stats"][key].clone()
    };
    std::fs::write(&suite, text.replace("max_chunks: 7\n", "max_chunks: 7\n  reference_top_k: 8\n")).unwrap();
    let top_k = run_suite(dir.path(), &suite);
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();
    std::fs::write(&suite, text.replace("max_chunks: 7\n", "max_chunks: 7\n  reference_top_k: full\n"))
        .unwrap();
    let full = run_suite(dir.path(), &suite);
    assert_eq!(full["models"][0]["reference_cache"]["top_k"], serde_json::Value::Null);
    let exact = kld(&full, "kld")["mean"].as_f64().unwrap();
    let truncated = kld(&top_k, "kld")["mean"].as_f64().unwrap();
    let bound = kld(&top_k, "kld_truncation_bound").as_f64().unwrap();
    assert_eq!(kld(&full, "kld_truncation_bound"), 0.0);
    let se = kld(&top_k, "kld_sampling_std_error").as_f64().unwrap();
    // Exact whatever the tail holds: the estimate and the exact value share the interval.
    assert!((exact - truncated).abs() <= bound + 1e-12, "{truncated} vs {exact}: bound {bound}");
    // And in practice the sampled tail lands within a few of its standard errors.
    assert!((exact - truncated).abs() <= 4.0 * se + 1e-9, "{truncated} vs {exact}: standard error {se}");
    assert_eq!(kld(&full, "kld_sampling_std_error"), 0.0);
    // Everything that does not depend on the kept distributions is identical.
    for key in ["same_top1", "ppl_ratio", "delta_p"] {
        assert_eq!(kld(&full, key), kld(&top_k, key), "{key}");
    }
}

#[test]
fn another_model_can_be_the_reference_when_it_shares_the_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32]");
    let text = std::fs::read_to_string(&suite).unwrap().replace(
        "models:\n  - name: tiny\n    path: builtin:tiny-llama\n",
        "models:\n  - name: teacher\n    path: builtin:tiny-llama\n  \
         - name: student\n    path: builtin:tiny-llama\n    dtype: bf16\n    reference: teacher\n",
    );
    std::fs::write(&suite, &text).unwrap();
    let results = run_suite(dir.path(), &suite);
    assert_eq!(results["models"][1]["reference"], "teacher");
    let kld = |id: &str| {
        let c = results["cases"].as_array().unwrap().iter().find(|c| c["id"] == id).unwrap();
        c["divergence"]["stats"]["kld"]["mean"].as_f64().unwrap()
    };
    assert_eq!(kld("teacher/fp32"), 0.0);
    let student = kld("student/fp32");
    assert!(student > 0.0 && student < 1e-3, "a bf16 copy judged against the f32 teacher: {student}");

    // A model with another tokenizer cannot be judged against the teacher.
    let other = text.replace(
        "path: builtin:tiny-llama\n    dtype: bf16",
        &format!("path: {}", fixture("llama-tiny").display()),
    );
    std::fs::write(&suite, other).unwrap();
    let run = bench(&["validate", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("its tokenizer differs from reference teacher's"), "{}", run.stderr);
}

#[test]
fn the_batch_invariance_probe_compares_a_prompt_alone_and_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32, int8-dynamic]");
    let text = std::fs::read_to_string(&suite).unwrap();
    std::fs::write(&suite, text.replace("max_chunks: 7\n", "max_chunks: 7\n  batch_invariance: 3\n"))
        .unwrap();
    let results = run_suite(dir.path(), &suite);
    for label in ["fp32", "int8-dynamic"] {
        let probe = &case(&results, label)["batch_invariance"];
        assert_eq!(probe["batch_size"], 3, "{label}");
        let diff = probe["max_abs_diff"].as_f64().unwrap();
        // Rows are independent in every kernel here: at most f32 rounding of a different
        // blocking, if any.
        assert!(diff < 1e-4, "{label}: {diff}");
        assert!(probe["kld_mean"].as_f64().unwrap() < 1e-8, "{label}: {probe}");
    }
}

#[test]
fn a_small_case_after_a_large_one_reports_its_own_peak() {
    let dir = tempfile::tempdir().unwrap();
    // The large case keeps an f32 copy of the whole model; the small one 4-bit weights.
    let suite = write_small_suite(dir.path(), "[fp32, int4-block]");
    let out = dir.path().join("out");
    // One heap arena: glibc never trims the free top of a worker thread's arena, so with
    // several the small case may start with some megabytes of the large one's buffers still
    // resident, which would hide the difference this test looks for. With one,
    // `malloc_trim` hands everything back and both cases start at the same size.
    let run = bench_with_env(
        &["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()],
        dir.path(),
        &shared_cache(),
        &[("MALLOC_ARENA_MAX", "1")],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let results = read_json(&out.join("results.json"));
    let growth = |label: &str| {
        let m = &case(&results, label)["memory"];
        let (peak, start) = (m["peak_rss_bytes"].as_u64().unwrap(), m["rss_start_bytes"].as_u64().unwrap());
        (peak, peak - start, m["total_bytes"].as_u64().unwrap())
    };
    let (large_peak, large_growth, large_bytes) = growth("fp32");
    let (small_peak, small_growth, small_bytes) = growth("int4-block");
    assert!(large_bytes > 3 * small_bytes, "{large_bytes} vs {small_bytes}");
    assert!(large_growth >= large_bytes, "the f32 copy is resident: {large_growth} < {large_bytes}");
    // The two growths differ by at least half the difference of the bytes held (10 MB
    // here); the rest is the save-and-reload check's second copy and pages touched by
    // transients, which vary with the machine.
    assert!(
        small_growth + (large_bytes - small_bytes) / 2 < large_growth,
        "{small_growth} vs {large_growth}, holding {small_bytes} vs {large_bytes}"
    );
    // Had the high-water mark not been reset, the small case would report at least the
    // large one's peak.
    assert!(
        small_peak < large_peak,
        "the small case's own peak, not the large one's: {small_peak} vs {large_peak}"
    );
}

/// Where a second copy of the model would not fit (`QUANTBENCH_MEMORY_LIMIT`, as on a
/// machine too small for it), the reload check frees the original first and the case goes
/// on with the reloaded model: the same figures, the reload still checked bit for bit, and
/// a warning that says so.
#[test]
fn the_reload_check_frees_the_original_when_memory_is_short() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[int8-dynamic, nf4]");
    let text = std::fs::read_to_string(&suite).unwrap();
    std::fs::write(&suite, format!("{text}metrics: [memory, disk, divergence, generation]\n")).unwrap();
    let run = |name: &str, limit: Option<&str>| {
        let out = dir.path().join(name);
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_bench"));
        command.args(["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        command.current_dir(dir.path()).env("QUANTBENCH_CACHE", shared_cache()).env("HF_HUB_OFFLINE", "1");
        if let Some(limit) = limit {
            command.env("QUANTBENCH_MEMORY_LIMIT", limit);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        read_json(&out.join("results.json"))
    };
    let (roomy, short) = (run("roomy", None), run("short", Some("1")));
    for label in ["int8-dynamic", "nf4"] {
        let (a, b) = (case(&roomy, label), case(&short, label));
        assert_eq!(b["disk"]["reload_identical"], true);
        for key in ["divergence", "generation", "disk"] {
            assert_eq!(a[key], b[key], "{label}: {key}");
        }
        let warned = |c: &serde_json::Value| {
            c["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("would not fit"))
        };
        assert!(!warned(a) && warned(b), "{label}: {:?}", b["warnings"]);
    }
}

/// Peak memory grows with the bytes a case holds, not faster: on two built-in sizes
/// (tiny-llama, 13 MB of f32; SmolLM2-135M's shapes, 269 MB of bf16), every case's peak
/// RSS stays within 1.3 × (reference bytes + its quantized copy) + 512 MiB, and between
/// the two sizes RSS grows by at most 1.3 bytes per byte held.
#[test]
fn peak_memory_grows_with_the_model_bytes_at_most_1_3_times() {
    const OVERHEAD: f64 = 512.0 * 1024.0 * 1024.0;
    let dir = tempfile::tempdir().unwrap();
    let eval = std::fs::read_to_string(crate::support::root().join("suites/data/eval.txt")).unwrap();
    std::fs::write(dir.path().join("eval.txt"), eval).unwrap();
    let suite = dir.path().join("scale.yaml");
    std::fs::write(
        &suite,
        "name: scale-test\n\
         models:\n  - name: small\n    path: builtin:tiny-llama\n    dtype: bf16\n  \
         - name: large\n    path: builtin:smollm2-135m-shapes\n    dtype: bf16\n\
         schemes: [bf16, int8-dynamic]\n\
         workload:\n  prompts: [\"Hello\"]\n  eval_text: eval.txt\n  prompt_len: 8\n  gen_len: 2\n  context: 32\n\
         metrics: [memory]\nrepeats: 1\nwarmup: 0\n",
    )
    .unwrap();
    let results = run_suite(dir.path(), &suite);
    let cases = results["cases"].as_array().unwrap();
    let field = |model: &str, scheme: &str, key: &str| -> f64 {
        let c = cases.iter().find(|c| c["model"] == model && c["scheme"] == scheme).unwrap();
        c["memory"][key].as_f64().unwrap_or_else(|| panic!("{model}/{scheme}: no {key}"))
    };
    for scheme in ["bf16", "int8-dynamic"] {
        let mut held_and_peak = Vec::new();
        for model in ["small", "large"] {
            let (reference, copy) =
                (field(model, "bf16", "total_bytes"), field(model, scheme, "total_bytes"));
            let peak = field(model, scheme, "peak_rss_bytes");
            let bound = 1.3 * (reference + copy) + OVERHEAD;
            assert!(peak <= bound, "{model}/{scheme}: peak {peak} above {bound}");
            held_and_peak.push((reference + copy, peak));
        }
        let [(held_small, peak_small), (held_large, peak_large)] = held_and_peak[..] else { unreachable!() };
        let slope = (peak_large - peak_small) / (held_large - held_small);
        assert!(slope <= 1.3, "{scheme}: {slope:.3} bytes of RSS per byte held, expected at most 1.3");
    }
}

/// A clock that moves 2 ms between any two reads.
struct Steps(f64);

impl quantbench::measure::latency::Clock for Steps {
    fn now_ms(&mut self) -> f64 {
        self.0 += 2.0;
        self.0
    }
}

/// The run's clock reaches every timing: with a scripted clock the whole path from a
/// timed pass to results.json gives exactly the scripted intervals (each read 2 ms after
/// the last), quantizing and reloading included, and no noise warnings.
#[test]
fn a_scripted_clock_times_every_pass_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    quantbench::model::builtin::write_to("tiny-llama", &dir.path().join("model")).unwrap();
    let eval = std::fs::read_to_string(crate::support::root().join("suites/data/eval.txt")).unwrap();
    std::fs::write(dir.path().join("eval.txt"), eval).unwrap();
    let suite = dir.path().join("clock.yaml");
    std::fs::write(
        &suite,
        "name: clock\nmodels:\n  - name: m\n    path: model\nschemes: [fp32, int8-dynamic]\n\
         workload:\n  prompts: [\"Hello\"]\n  eval_text: eval.txt\n  prompt_len: 8\n  gen_len: 3\n\
         metrics: [latency, disk]\nrepeats: 4\nwarmup: 1\n",
    )
    .unwrap();
    let plan = quantbench::suite::Plan::load(&suite).unwrap();
    let options = quantbench::runner::RunOptions {
        out: Some(dir.path().join("out")),
        clock: Some(|| Box::new(Steps(0.0))),
        ..Default::default()
    };
    let (_, results) = quantbench::runner::run(&plan, &options).unwrap();
    assert_eq!(results.cases.len(), 2);
    for case in &results.cases {
        let latency = case.latency.as_ref().unwrap();
        assert_eq!(latency.prefill_ms, vec![2.0; 4], "{}", case.id);
        assert_eq!(latency.decode_ms, vec![2.0; 4 * 3], "{}: one sample per decode step", case.id);
        let load_s = latency.load_s.unwrap();
        assert!((latency.quantize_s - 0.002).abs() < 1e-12 && (load_s - 0.002).abs() < 1e-12, "{}", case.id);
        assert_eq!(latency.decode_tokens_per_s, Some(500.0), "{}", case.id);
        assert!(case.warnings.iter().all(|w| !w.contains("vary")), "{}: {:?}", case.id, case.warnings);
    }
}
