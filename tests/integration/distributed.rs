//! A suite over many machines: `bench run --shard I/N`, `bench merge`, the shared
//! reference folder, and the refusals that keep a merge honest.

use std::path::Path;

use serde_json::Value;

use crate::support::{bench, root, shared_cache, write_small_suite};

/// results.json without what differs between two runs of the same work: timings, resident
/// memory, timing warnings, where the reference was stored, the machine and shard records.
fn figures(path: &Path) -> Value {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let top = v.as_object_mut().unwrap();
    for key in ["provenance", "shards"] {
        top.remove(key);
    }
    for model in top["models"].as_array_mut().unwrap() {
        if let Some(cache) = model["reference_cache"].as_object_mut() {
            cache.remove("path");
            cache.remove("reused");
        }
    }
    for case in top["cases"].as_array_mut().unwrap() {
        let case = case.as_object_mut().unwrap();
        for key in ["latency", "elapsed_s"] {
            case.remove(key);
        }
        if let Some(memory) = case["memory"].as_object_mut() {
            for key in ["rss_start_bytes", "peak_rss_bytes", "built_rss_bytes"] {
                memory.remove(key);
            }
        }
        let warnings = case["warnings"].as_array_mut().unwrap();
        warnings.retain(|w| {
            let w = w.as_str().unwrap();
            !w.contains("timings") && !w.contains("outlier")
        });
    }
    v
}

/// The quick start run whole and as four shards merged: every figure but timings and
/// memory is the same, the shards share one reference (computed by the first, reused by
/// the rest), and the merged report names its shards.
#[test]
fn merged_shards_of_the_quick_start_equal_the_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let suite = root().join("suites/quickstart.yaml").display().to_string();
    let run = bench(&["run", &suite, "--out", &out("whole")], &root(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let references = out("references");
    let mut shards = Vec::new();
    for i in 1..=4 {
        let (shard, folder) = (format!("{i}/4"), out(&format!("shard-{i}")));
        let run = bench(
            &["run", &suite, "--shard", &shard, "--references", &references, "--out", &folder],
            &root(),
            &shared_cache(),
        );
        assert_eq!(run.code, 0, "shard {shard}: {}", run.stderr);
        let results: Value =
            serde_json::from_str(&std::fs::read_to_string(Path::new(&folder).join("results.json")).unwrap())
                .unwrap();
        assert_eq!(results["shards"][0]["index"], i);
        let reused = results["models"][0]["reference_cache"]["reused"].as_bool().unwrap();
        assert_eq!(reused, i > 1, "shard {shard}: the shared reference is computed once");
        shards.push(folder);
    }
    let mut args = vec!["merge".to_string()];
    args.extend(shards.iter().rev().cloned());
    args.extend(["--out".to_string(), out("merged")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = bench(&args, &root(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("merged 4 shards (18 cases, 1 machine)"), "{}", run.stderr);
    let merged = dir.path().join("merged");
    assert_eq!(figures(&dir.path().join("whole/results.json")), figures(&merged.join("results.json")));
    let summary = std::fs::read_to_string(merged.join("summary.md")).unwrap();
    assert!(summary.contains("4 shards on one machine"), "{summary}");
    let html = std::fs::read_to_string(merged.join("index.html")).unwrap();
    assert!(html.contains("shard 3/4") && html.contains("4 of 18 cases"), "the provenance lists the shards");
    // The merged run compares with the single one like any other run.
    let whole = out("whole");
    let merged = merged.display().to_string();
    let run = bench(&["compare", &whole, &merged, "--fail-on-regression"], &root(), &shared_cache());
    assert_ne!(run.code, 1, "{}", run.stderr);
}

/// Shards that did not measure the same thing are refused, each naming the field and the
/// files; missing cases are refused unless `--allow-partial`, which lists them.
#[test]
fn merge_refuses_shards_of_different_runs() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32, int8-dynamic, int4-block]");
    let suite = suite.to_str().unwrap();
    let cache = shared_cache();
    let run_shard = |shard: &str, folder: &str, extra: &[&str]| {
        let mut args = vec!["run", suite, "--shard", shard, "--out", folder];
        args.extend(extra);
        let run = bench(&args, dir.path(), &cache);
        assert_eq!(run.code, 0, "{}", run.stderr);
    };
    run_shard("1/2", "a", &[]);
    run_shard("2/2", "b", &[]);
    run_shard("2/2", "b-batch", &["--batch-size", "2"]);
    run_shard("2/3", "third", &[]);
    let merge = |args: &[&str]| {
        let mut all = vec!["merge"];
        all.extend(args);
        bench(&all, dir.path(), &cache)
    };
    let refused = |args: &[&str], needles: &[&str]| {
        let run = merge(args);
        assert_eq!(run.code, 1, "{args:?} must be refused: {}", run.stderr);
        for needle in needles {
            assert!(run.stderr.contains(needle), "{args:?}: `{needle}` missing from: {}", run.stderr);
        }
    };
    refused(&["a", "a", "--out", "m"], &["shard 1/2 is also in a/results.json"]);
    refused(&["a", "b-batch", "--out", "m"], &["b-batch/results.json", "workload", "batch_size"]);
    refused(&["a", "third", "--out", "m"], &["one of 3 shards", "one of 2"]);
    refused(&["a", "--out", "a"], &["merge into a folder of its own"]);
    refused(&["a", "--out", "m"], &["1 of the 3 planned cases are missing", "2/2", "tiny/int4-block"]);
    // Hand-edited shards: another suite, another build, another model file.
    let edited = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("b/results.json")).unwrap())
                .unwrap();
        edit(&mut v);
        std::fs::create_dir_all(dir.path().join(name)).unwrap();
        std::fs::write(dir.path().join(name).join("results.json"), v.to_string()).unwrap();
    };
    edited("suite", &|v| v["suite"]["sha256"] = "0".repeat(64).into());
    refused(&["a", "suite", "--out", "m"], &["suite/results.json", "suite is small (sha256 000"]);
    edited("build", &|v| v["shards"][0]["provenance"]["git_revision"] = "deadbeef".into());
    refused(&["a", "build", "--out", "m"], &["bench revision of shard 2/2", "deadbeef"]);
    edited("model", &|v| v["models"][0]["model_sha256"] = "f".repeat(64).into());
    refused(&["a", "model", "--out", "m"], &["model tiny has model_sha256 fff", "different files"]);
    edited("overlap", &|v| {
        let case = v["cases"][0].clone();
        let mut first = case.clone();
        first["id"] = "tiny/fp32".into();
        v["cases"] = vec![first, case].into();
    });
    refused(&["a", "overlap", "--out", "m"], &["case tiny/fp32 is also in", "must not overlap"]);
    // What there is, merged on request, with the missing case named.
    let run = merge(&["a", "--out", "partial", "--allow-partial"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("case tiny/int4-block is missing"), "{}", run.stderr);
    let run = merge(&["b", "a", "--out", "whole"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let ids: Vec<String> = {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("whole/results.json")).unwrap())
                .unwrap();
        v["cases"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ids, ["tiny/fp32", "tiny/int8-dynamic", "tiny/int4-block"], "suite order");
}

/// `validate --shards N` prints the partition `run --shard` uses: for every committed suite
/// that validates here, disjoint shards covering the suite's cases in order.
#[test]
fn every_committed_suite_partitions_into_disjoint_covering_shards() {
    let suites: Vec<_> = std::fs::read_dir(root().join("suites"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    let mut checked = 0;
    for suite in suites {
        let text = std::fs::read_to_string(&suite).unwrap();
        let suite = suite.display().to_string();
        if text.contains("-shapes") {
            println!("{suite}: a real-scale built-in, generated where the suite runs; skipped");
            continue;
        }
        let whole = bench(&["validate", &suite, "--shards", "1"], &root(), &shared_cache());
        if whole.code != 0 && whole.stderr.contains("not in the Hugging Face cache") {
            println!("{suite}: hub models not cached; skipped");
            continue;
        }
        assert_eq!(whole.code, 0, "{suite}: {}", whole.stderr);
        let shard_lines = |stdout: &str| -> Vec<Vec<String>> {
            stdout
                .lines()
                .filter_map(|l| l.split_once(": ").filter(|(h, _)| h.starts_with("shard ")))
                .map(|(_, cases)| cases.split(", ").filter(|c| !c.is_empty()).map(String::from).collect())
                .collect()
        };
        let cases = shard_lines(&whole.stdout).concat();
        assert!(!cases.is_empty(), "{suite}: {}", whole.stdout);
        for count in [2, 3, 4, 7, 16, 64] {
            let run = bench(&["validate", &suite, "--shards", &count.to_string()], &root(), &shared_cache());
            assert_eq!(run.code, 0, "{suite}: {}", run.stderr);
            let parts = shard_lines(&run.stdout);
            assert_eq!(parts.len(), count, "{suite}: {}", run.stdout);
            assert_eq!(
                parts.concat(),
                cases,
                "{suite} in {count} shards: disjoint and covering, in suite order"
            );
        }
        checked += 1;
    }
    assert!(checked >= 3, "too few suites checked: {checked}");
}

/// A run merged from shards on two machines is judged case by case: a timing measured on
/// another machine than the baseline's is shown but does not gate, while accuracy still
/// gates and cases measured on the baseline's machine gate on everything.
#[test]
fn compare_gates_timings_only_for_cases_measured_on_the_baselines_machine() {
    use crate::support::fixture;
    let dir = tempfile::tempdir().unwrap();
    let new: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("report/new/results.json")).unwrap()).unwrap();
    let baseline = fixture("report/baseline/results.json").display().to_string();
    let machine = |cpu: &str, threads: u64| {
        let mut p = new["provenance"].clone();
        p["cpu"] = cpu.into();
        p["threads"] = threads.into();
        p
    };
    let planned = ["tiny/fp32", "tiny/fp16", "tiny/int8-dynamic", "tiny/int4-block"];
    let compare_with = |second_machine: Value| {
        let mut merged = new.clone();
        merged["shards"] = serde_json::json!([
            {"index": 1, "count": 2, "planned": planned, "cases": &planned[..2], "provenance": machine("Fixture CPU @ 2.0GHz", 2)},
            {"index": 2, "count": 2, "planned": planned, "cases": &planned[2..], "provenance": second_machine},
        ]);
        let path = dir.path().join("merged.json");
        std::fs::write(&path, merged.to_string()).unwrap();
        let out = dir.path().join("cmp");
        let run = bench(
            &[
                "compare",
                &baseline,
                path.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--fail-on-regression",
            ],
            dir.path(),
            &shared_cache(),
        );
        (run.code, std::fs::read_to_string(out.join("compare.md")).unwrap())
    };
    let (code, md) = compare_with(machine("Other CPU", 8));
    assert_eq!(code, 2, "the accuracy regression still gates: {md}");
    assert!(md.contains("2 of the cases were measured on different machines"), "{md}");
    assert!(md.contains("2 machines: Fixture CPU @ 2.0GHz, 2 threads; Other CPU, 8 threads"), "{md}");
    assert!(
        md.contains("| tiny/int8-dynamic | prefill_ms | 2.5022 | 2.7524 | +10.00% | [+9.53%, +10.48%] | ±2.00% | regressed (not gating: other machine) |"),
        "{md}"
    );
    assert!(
        md.contains(
            "| tiny/int4-block | kld_mean | 0.136287 | 0.143101 | +5.00% | – | ±1.00% | **regressed** |"
        ),
        "{md}"
    );
    // The same shards on the baseline's machine: the timing gates again.
    let (_, md) = compare_with(machine("Fixture CPU @ 2.0GHz", 2));
    assert!(!md.contains("different machines"), "{md}");
    assert!(md.contains("| tiny/int8-dynamic | prefill_ms | 2.5022 | 2.7524 | +10.00% | [+9.53%, +10.48%] | ±2.00% | **regressed** |"), "{md}");
}
