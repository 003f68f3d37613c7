//! Reports and the regression gate: summary.md and compare.md against golden files from
//! a fixed results.json fixture, charts that decode and are not blank, an index.html that
//! needs no network, baselines end to end, and the nightly workflow's schema.

use std::path::{Path, PathBuf};

use quantbench::report::charts::{self, CHARTS};
use quantbench::report::Results;

use crate::support::{bench, fixture, root, shared_cache, write_small_suite};

/// Compare `actual` with the golden file `name` under tests/fixtures/report/; with
/// `UPDATE_GOLDEN=1` rewrite it instead.
fn assert_golden(name: &str, actual: &str) {
    let path = fixture("report").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs from the output (rerun with UPDATE_GOLDEN=1 to accept):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

/// A copy of the baseline fixture in a temporary run folder.
fn fixture_run() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::copy(fixture("report/baseline/results.json"), run.join("results.json")).unwrap();
    (dir, run)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn report_renders_golden_summary_and_every_file() {
    let (dir, run) = fixture_run();
    let out = bench(&["report", "run"], dir.path(), &shared_cache());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_golden("summary.md", &read(&run.join("summary.md")));
    for file in ["results.md", "results.csv", "index.html"] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    // A results.json path works as well as its folder, and rendering is deterministic.
    let again = bench(&["report", "run/results.json"], dir.path(), &shared_cache());
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_golden("summary.md", &read(&run.join("summary.md")));
}

#[test]
fn charts_decode_at_their_size_and_are_not_blank() {
    let (dir, run) = fixture_run();
    assert_eq!(bench(&["report", "run"], dir.path(), &shared_cache()).code, 0);
    let results = Results::read(&run.join("results.json")).unwrap();
    for chart in CHARTS {
        let png_path = run.join("charts").join(format!("{}.png", chart.file));
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), charts::size(chart.kind, &results), "{}", chart.file);
        let rgb = &pixels[..info.buffer_size()];
        let mut colours: Vec<[u8; 3]> = rgb.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        let non_white = colours.iter().filter(|p| **p != [255, 255, 255]).count();
        colours.sort();
        colours.dedup();
        assert!(colours.len() > 20, "{}: only {} colours", chart.file, colours.len());
        assert!(non_white * 50 > rgb.len() / 3, "{}: {non_white} non-white pixels", chart.file);

        let svg = read(&run.join("charts").join(format!("{}.svg", chart.file)));
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{}.svg: {e}", chart.file));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts = doc.descendants().filter(|n| n.has_tag_name("text")).count();
        assert!(texts > 5, "{}.svg has {texts} text elements", chart.file);
    }
    // The heat map names the worst layer of every scheme.
    let heat = read(&run.join("charts/layer_sqnr.svg"));
    assert!(heat.contains("min 13.0 dB (1.down_proj)"), "worst int4 layer missing");
}

#[test]
fn charts_of_results_without_layers_or_divergence_still_render() {
    let mut results = Results::read(&fixture("report/baseline/results.json")).unwrap();
    for case in &mut results.cases {
        case.layers.clear();
        case.divergence = None;
        case.latency = None;
    }
    for chart in CHARTS {
        let svg = charts::svg(chart, &results).unwrap();
        roxmltree::Document::parse(&svg).unwrap();
        assert!(!charts::png(chart, &results).unwrap().is_empty());
    }
    results.cases.clear();
    for chart in CHARTS {
        assert!(charts::svg(chart, &results).unwrap().contains("no "), "{}", chart.file);
    }
}

#[test]
fn index_html_is_self_contained() {
    let (dir, run) = fixture_run();
    assert_eq!(bench(&["report", "run"], dir.path(), &shared_cache()).code, 0);
    let html = read(&run.join("index.html"));
    assert!(html.starts_with("<!DOCTYPE html>"));
    for forbidden in
        ["src=\"http", "href=\"http", "url(http", "@import", "<link", "<script src", "<img src=\"http"]
    {
        assert!(!html.contains(forbidden), "index.html refers outside itself: {forbidden}");
    }
    assert_eq!(html.matches("<svg").count(), CHARTS.len(), "every chart inline");
    assert_eq!(html.matches("class=\"card\"").count(), 4, "one card per scheme");
    assert!(html.contains("class=\"sortable\"") && html.contains("addEventListener('click'"));
    assert!(html.contains("Fixture CPU @ 2.0GHz") && html.contains("Provenance"));
    assert!(html.contains("data-sort=\"0.1362865"), "KLD sorts by its full value");
}

#[test]
fn compare_gives_regressed_within_noise_and_exit_2() {
    let dir = fixture("report");
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_str().unwrap();
    let run =
        bench(&["compare", "baseline", "new", "--out", out, "--fail-on-regression"], &dir, &shared_cache());
    assert_eq!(run.code, 2, "a regression with --fail-on-regression exits 2:\n{}", run.stderr);
    let md = read(&out_dir.path().join("compare.md"));
    assert_golden("compare.md", &md);
    let row = |case: &str, metric: &str| -> String {
        md.lines()
            .find(|l| l.starts_with(&format!("| tiny/{case} | {metric} |")))
            .unwrap_or_else(|| panic!("no row for {case} {metric}"))
            .to_string()
    };
    assert!(row("int8-dynamic", "prefill_ms").ends_with("| **regressed** |"), "10% slower prefill");
    assert!(row("fp16", "prefill_ms").ends_with("| within noise |"), "1% wobble in wide intervals");
    assert!(row("int4-block", "kld_mean").ends_with("| **regressed** |"), "KLD beyond tolerance");
    assert!(row("int4-block", "decode_ms_per_token").ends_with("| improved |"));
    assert!(row("fp32", "weight_bytes").ends_with("| within noise |"));
    assert!(md.contains("**Verdict: 2 regressed"), "{md}");
    let html = read(&out_dir.path().join("compare.html"));
    assert!(html.contains("class=\"regressed\"") && html.contains("class=\"improved\""));

    let plain = bench(&["compare", "baseline", "new", "--out", out], &dir, &shared_cache());
    assert_eq!(plain.code, 0, "without the flag a regression is reported, not an error");
    let same = bench(
        &["compare", "baseline", "baseline", "--out", out, "--fail-on-regression"],
        &dir,
        &shared_cache(),
    );
    assert_eq!(same.code, 0, "{}", same.stderr);
    assert!(read(&out_dir.path().join("compare.md")).contains("**Verdict: no regression"));
}

#[test]
fn a_noise_threshold_above_the_change_hides_it() {
    let dir = fixture("report");
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().to_str().unwrap();
    let args = ["compare", "baseline", "new", "--out", out, "--noise-threshold", "0.2"];
    let run = bench(&args, &dir, &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let md = read(&out_dir.path().join("compare.md"));
    assert!(md.contains("±20.00% (--noise-threshold)"), "{md}");
    assert!(
        md.contains("| tiny/int8-dynamic | prefill_ms |") && md.contains("**Verdict: 1 regressed"),
        "{md}"
    );
    let bad = bench(&["compare", "baseline", "new", "--noise-threshold", "2"], &dir, &shared_cache());
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.contains("--noise-threshold is 2, expected a fraction between 0 and 1"),
        "{}",
        bad.stderr
    );
}

#[test]
fn wrong_schema_version_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = read(&fixture("report/baseline/results.json")).replacen(
        "\"schema_version\": 2",
        "\"schema_version\": 1",
        1,
    );
    std::fs::write(dir.path().join("results.json"), text).unwrap();
    for args in [vec!["report", "."], vec!["compare", "results.json", "results.json"]] {
        let run = bench(&args, dir.path(), &shared_cache());
        assert_eq!(run.code, 1, "{args:?}");
        assert!(run.stderr.contains("results.json: schema_version is 1, expected 2"), "{}", run.stderr);
    }
    let missing = bench(&["report", "nowhere"], dir.path(), &shared_cache());
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("nowhere"), "{}", missing.stderr);
}

#[test]
fn run_saves_a_baseline_and_compares_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32, int8-dynamic]");
    let suite = suite.to_str().unwrap();
    let first = bench(&["run", suite, "--out", "out1", "--save-baseline", "b1"], dir.path(), &shared_cache());
    assert_eq!(first.code, 0, "{}", first.stderr);
    let saved = dir.path().join("reports/baselines/b1");
    assert!(saved.join("results.json").is_file() && saved.join("summary.md").is_file());
    let out1 = dir.path().join("out1");
    for file in ["summary.md", "index.html", "charts/tradeoff.png", "charts/layer_sqnr.svg"] {
        assert!(out1.join(file).is_file(), "run must render {file}");
    }
    let second = bench(&["run", suite, "--out", "out2", "--baseline", "b1"], dir.path(), &shared_cache());
    assert_eq!(second.code, 0, "{}", second.stderr);
    let md = read(&dir.path().join("out2/compare.md"));
    assert!(md.contains("| tiny/int8-dynamic | kld_mean |"), "{md}");
    // Divergence is deterministic: the same build on the same machine changes nothing.
    for line in md.lines().filter(|l| l.contains("| kld_mean |") || l.contains("| weight_bytes |")) {
        assert!(line.ends_with("| within noise |"), "{line}");
    }

    let missing = bench(&["run", suite, "--baseline", "nope"], dir.path(), &shared_cache());
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("baseline `nope` not found")
            && missing.stderr.contains("--save-baseline nope")
    );
    assert!(!missing.stderr.contains("reference pass"), "a missing baseline is found before any work");
    let bad = bench(&["run", suite, "--save-baseline", "../x"], dir.path(), &shared_cache());
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("baseline name `../x` is not allowed"), "{}", bad.stderr);
}

#[test]
fn suite_noise_threshold_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let suite = write_small_suite(dir.path(), "[fp32]");
    let text = read(&suite) + "noise_threshold: 5\n";
    std::fs::write(&suite, text).unwrap();
    let run = bench(&["validate", suite.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("noise_threshold is 5, expected a fraction between 0 and 1"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("line 15"), "{}", run.stderr);
}

#[test]
fn nightly_suite_validates_and_its_baseline_reads() {
    let run = bench(&["validate", "suites/nightly.yaml"], &root(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let baseline = Results::read(&root().join("reports/baselines/nightly/results.json")).unwrap();
    assert_eq!(baseline.suite.name, "nightly");
    let text = read(&root().join("suites/nightly.yaml"));
    let ids: Vec<String> = baseline.cases.iter().map(|c| c.id.clone()).collect();
    for id in &ids {
        let label = id.split('/').nth(1).unwrap();
        assert!(text.contains(&format!("- {label}")), "baseline case {id} is not in suites/nightly.yaml");
    }
}

#[test]
fn nightly_workflow_has_the_github_actions_schema() {
    let text = read(&root().join(".github/workflows/nightly.yml"));
    let doc: serde_json::Value = serde_saphyr::from_str(&text).expect("nightly.yml is valid YAML");
    let top = doc.as_object().expect("a mapping at the top");
    for key in ["name", "on", "jobs"] {
        assert!(top.contains_key(key), "top-level key `{key}` missing; found {:?}", top.keys());
    }
    let on = top["on"].as_object().expect("`on` is a mapping");
    let cron = on["schedule"][0]["cron"].as_str().expect("on.schedule[0].cron");
    assert_eq!(cron.split_whitespace().count(), 5, "cron has five fields: {cron}");
    assert!(on.contains_key("workflow_dispatch"));
    let jobs = top["jobs"].as_object().expect("`jobs` is a mapping");
    assert!(!jobs.is_empty());
    let mut runs = Vec::new();
    let mut uses = Vec::new();
    for (name, job) in jobs {
        assert!(job["runs-on"].is_string(), "job {name} has no runs-on");
        let steps = job["steps"].as_array().unwrap_or_else(|| panic!("job {name} has no steps"));
        for step in steps {
            let step = step.as_object().expect("a step is a mapping");
            let allowed = ["name", "id", "if", "uses", "run", "with", "env", "continue-on-error", "shell"];
            for key in step.keys() {
                assert!(allowed.contains(&key.as_str()), "job {name}: unknown step key `{key}`");
            }
            match (step.get("uses"), step.get("run")) {
                (Some(u), None) => {
                    let u = u.as_str().unwrap();
                    assert!(u.contains('/') && u.contains('@'), "`uses: {u}` is not owner/repo@ref");
                    uses.push((u.to_string(), step.get("with").cloned()));
                }
                (None, Some(r)) => runs.push(r.as_str().expect("run is text").to_string()),
                _ => panic!("job {name}: a step needs exactly one of `uses` and `run`: {step:?}"),
            }
        }
    }
    assert!(uses.iter().any(|(u, _)| u.starts_with("actions/checkout@")));
    // The suite runs as a matrix of shards, each uploaded; one job merges them against the
    // baseline.
    let shard_job =
        jobs.values().find(|j| j["strategy"]["matrix"]["shard"].is_array()).expect("a shard matrix");
    let shards = shard_job["strategy"]["matrix"]["shard"].as_array().unwrap();
    let indices: Vec<u64> = shards.iter().map(|s| s.as_u64().expect("shard indices are numbers")).collect();
    assert_eq!(indices, (1..=indices.len() as u64).collect::<Vec<_>>(), "1-based shard indices");
    assert!(
        runs.iter().any(|r| r.contains("run suites/nightly.yaml")
            && r.contains("--shard \"${{ matrix.shard }}/${{ strategy.job-total }}\"")),
        "no step runs a shard of the nightly suite: {runs:?}"
    );
    assert!(
        runs.iter().any(|r| r.contains("merge shards/")
            && r.contains("--baseline nightly")
            && r.contains("--fail-on-regression")),
        "no step merges the shards against the baseline: {runs:?}"
    );
    assert!(runs.iter().any(|r| r.contains("summary.md") && r.contains("$GITHUB_STEP_SUMMARY")));
    let uploads: Vec<&str> = uses
        .iter()
        .filter(|(u, _)| u.starts_with("actions/upload-artifact@"))
        .map(|(_, with)| with.as_ref().and_then(|w| w["path"].as_str()).expect("upload-artifact with.path"))
        .collect();
    assert!(uploads.contains(&"shards/shard-${{ matrix.shard }}/"), "each shard is uploaded: {uploads:?}");
    let output = read(&root().join("suites/nightly.yaml"));
    assert!(
        uploads.iter().any(|path| output.contains(&format!("output: {}", path.trim_end_matches('/')))),
        "no upload of the suite output: {uploads:?}"
    );
}

/// `bench compare` takes the suite's `noise_threshold` from the new run's results.json
/// (recorded by the runner; the reports never re-read suite text) when none is given.
#[test]
fn the_suite_noise_threshold_recorded_in_results_applies() {
    let dir = tempfile::tempdir().unwrap();
    for side in ["baseline", "new"] {
        std::fs::create_dir_all(dir.path().join(side)).unwrap();
        let mut text = read(&fixture(&format!("report/{side}/results.json")));
        if side == "new" {
            text = text.replacen("\"description\": ", "\"noise_threshold\": 0.2,\n    \"description\": ", 1);
        }
        std::fs::write(dir.path().join(side).join("results.json"), text).unwrap();
    }
    let out = dir.path().join("cmp");
    let run =
        bench(&["compare", "baseline", "new", "--out", out.to_str().unwrap()], dir.path(), &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let md = read(&out.join("compare.md"));
    assert!(md.contains("±20.00% (noise_threshold of suite small)"), "{md}");
}

/// Every committed report re-renders from its results.json to the same bytes: tables,
/// summary and HTML page (results written before the suite's description was recorded
/// get it from the stored suite text). A change of any renderer shows here as a diff of a
/// committed report, to be made on purpose with `bench report reports/NAME`.
#[test]
fn committed_reports_re_render_byte_identical() {
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("reports")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(results) = Results::read(&dir.join("results.json")) else { continue };
        let out = tempfile::tempdir().unwrap();
        quantbench::report::render(&results, out.path()).unwrap();
        for name in ["results.md", "results.csv", "summary.md", "index.html"] {
            let Ok(committed) = std::fs::read_to_string(dir.join(name)) else { continue };
            let rendered = std::fs::read_to_string(out.path().join(name)).unwrap();
            assert!(
                committed == rendered,
                "{} re-renders differently: run `bench report {}`",
                dir.join(name).display(),
                dir.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} committed report files were checked");
}
