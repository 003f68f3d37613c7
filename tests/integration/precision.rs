//! Weights at their stored precision: a 16-bit checkpoint's reference stays 16-bit
//! (`dtype: auto`, the default), and `dtype: f32` still means f32.

use std::path::Path;

use serde_json::Value;

use crate::support::{bench, model_copy, root, shared_cache};

fn run(dir: &Path, dtype: &str) -> Value {
    std::fs::copy(root().join("suites/data/eval.txt"), dir.join("eval.txt")).unwrap();
    let suite = format!(
        "name: precision\nmodels:\n  - name: m\n    path: model\n{dtype}schemes: [fp32, bf16, int8-dynamic]\n\
         workload:\n  prompts: [\"Hello\"]\n  eval_text: eval.txt\n  prompt_len: 8\n  gen_len: 2\n  \
         context: 16\n  max_chunks: 30\nmetrics: [memory, divergence]\nrepeats: 1\nwarmup: 0\n"
    );
    std::fs::write(dir.join("s.yaml"), suite).unwrap();
    let out = dir.join(if dtype.is_empty() { "auto" } else { "f32" });
    let run = bench(&["run", "s.yaml", "--out", out.to_str().unwrap()], dir, &shared_cache());
    assert_eq!(run.code, 0, "{}", run.stderr);
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

fn kld_mean(results: &Value, label: &str) -> f64 {
    let case = results["cases"].as_array().unwrap().iter().find(|c| c["label"] == label).unwrap();
    case["divergence"]["stats"]["kld"]["mean"].as_f64().unwrap()
}

/// The tied fixture stores bf16: by default its reference is bf16, which the `bf16` scheme
/// reproduces exactly (same weights, same kernel) and `fp32` does not; with `dtype: f32`
/// the roles swap.
#[test]
fn a_bf16_checkpoint_is_judged_at_bf16_unless_the_suite_says_f32() {
    let dir = tempfile::tempdir().unwrap();
    model_copy(dir.path());
    let auto = run(dir.path(), "");
    assert_eq!(auto["models"][0]["dtype"], "bf16");
    assert_eq!(kld_mean(&auto, "bf16"), 0.0, "bf16 weights in a bf16 reference's own kernel");
    assert!(kld_mean(&auto, "int8-dynamic") > 0.0);
    let f32 = run(dir.path(), "    dtype: f32\n");
    assert_eq!(f32["models"][0]["dtype"], "f32");
    assert_eq!(kld_mean(&f32, "fp32"), 0.0);
    // The checkpoint's values are the same; only the order of the additions differs.
    assert!(kld_mean(&f32, "bf16") < 1e-9, "{}", kld_mean(&f32, "bf16"));
    // The byte account counts what each scheme holds, whatever the reference.
    for results in [&auto, &f32] {
        let case = results["cases"].as_array().unwrap().iter().find(|c| c["label"] == "bf16").unwrap();
        let linear = results["models"][0]["linear_parameters"].as_u64().unwrap();
        assert_eq!(case["memory"]["bytes_by_role"]["packed_weights"].as_u64().unwrap(), 2 * linear);
    }
}
