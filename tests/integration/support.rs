//! Helpers shared by the integration tests: running the `bench` binary, fixture paths,
//! small suites.

use std::path::{Path, PathBuf};
use std::process::Output;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A committed fixture folder.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests").join("fixtures").join(name)
}

/// What a `bench` invocation printed and returned.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run `bench` with `args` in `cwd`, with built-in models cached under `cache`.
pub fn bench(args: &[&str], cwd: &Path, cache: &Path) -> Run {
    bench_with_env(args, cwd, cache, &[])
}

/// [`bench`] with extra environment variables.
pub fn bench_with_env(args: &[&str], cwd: &Path, cache: &Path, env: &[(&str, &str)]) -> Run {
    let Output { status, stdout, stderr } = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .current_dir(cwd)
        .env("QUANTBENCH_CACHE", cache)
        // Tests never reach the network: hub models must come from the cache.
        .env("HF_HUB_OFFLINE", "1")
        .envs(env.iter().copied())
        .output()
        .expect("bench starts");
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    assert!(!run.stderr.contains("panicked"), "bench panicked:\n{}", run.stderr);
    run
}

/// A cache folder shared by the tests of this binary, so the built-in model is generated
/// once (generation is atomic, so concurrent tests are safe).
pub fn shared_cache() -> PathBuf {
    let dir = root().join("target").join("test-cache");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small, fast suite over the built-in model, written into `dir`.
pub fn write_small_suite(dir: &Path, schemes: &str) -> PathBuf {
    let eval = std::fs::read_to_string(root().join("suites/data/eval.txt")).unwrap();
    std::fs::write(dir.join("eval.txt"), eval).unwrap();
    let suite = format!(
        "name: small\n\
         models:\n  - name: tiny\n    path: builtin:tiny-llama\n\
         schemes: {schemes}\n\
         workload:\n  prompts: [\"Hello, how are you?\", \"1.1+2.3=?\"]\n  eval_text: eval.txt\n  \
         prompt_len: 8\n  gen_len: 4\n  context: 32\n  max_chunks: 7\n\
         repeats: 2\nwarmup: 1\n"
    );
    let path = dir.join("small.yaml");
    std::fs::write(&path, suite).unwrap();
    path
}

/// The folder of fetched real models (`scripts/fetch_models.sh`), or `None` with a printed
/// reason when the download is impossible here. Any other failure (a hash mismatch) fails.
pub fn real_models(names: &[&str]) -> Option<PathBuf> {
    let out = std::process::Command::new(root().join("scripts/fetch_models.sh"))
        .args(names)
        .output()
        .expect("scripts/fetch_models.sh starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())),
        Some(3) => {
            println!("skipped: real models {names:?} cannot be downloaded here: {}", stderr.trim());
            None
        }
        _ => panic!("scripts/fetch_models.sh {names:?} failed:\n{stderr}"),
    }
}

/// A copy of the small tied fixture model in `dir/model`, to break.
pub fn model_copy(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("llama-tiny-tied").join(file), model.join(file)).unwrap();
    }
    model
}

/// Assert that the run's error output mentions every needle.
pub fn assert_mentions(run: &Run, needles: &[&str]) {
    for n in needles {
        assert!(run.stderr.contains(n), "error should mention {n:?}:\n{}", run.stderr);
    }
}
