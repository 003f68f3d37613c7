//! Seeded random mutations of valid inputs for each reader of untrusted files (suite YAML,
//! safetensors, GGUF, stored reference, results.json): bit flips, byte insertions and
//! deletions, truncations, and length fields bumped to huge values. No mutation may
//! panic, none may take long, and the binary readers may not allocate more than a small
//! multiple of their input. Its own test binary (not part of `integration`) because it
//! installs a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quantbench::measure::divergence::{Kept, Reference, TAIL_SAMPLES};
use quantbench::measure::reference_cache::{self, CacheKey};
use quantbench::measure::results::Results;
use quantbench::model::gguf::{GgufArray, GgufFile, GgufValue};
use quantbench::model::weights::{self, parse_safetensors, to_f32};
use quantbench::scheme::{StoredTensor, TensorRole};
use sha2::{Digest, Sha256};

// ---- a heap counter per thread ------------------------------------------------------------

/// The system allocator, counting the live bytes and their peak of the allocating thread.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// plain thread-local cells that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Run `f` and return its result with the most heap bytes it held at once (on this
/// thread) beyond what was live when it started.
fn peak_heap<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = f();
    let peak = PEAK.with(Cell::get);
    (result, (peak - start).max(0) as usize)
}

// ---- mutations --------------------------------------------------------------------------------

/// splitmix64: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values a length or count field is bumped to.
const HUGE: [u64; 8] = [u64::MAX, 1 << 63, 1 << 40, 1 << 32, u32::MAX as u64, 1 << 31, 1 << 24, 65536];

/// Mutate `input` one to three times.
fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(out.len());
        match rng.below(8) {
            0 | 1 if !out.is_empty() => out[at] ^= 1 << rng.below(8),
            2 if !out.is_empty() => out[at] = rng.next() as u8,
            3 => {
                let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
            4 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            5 => out.truncate(at),
            6 => {
                // A length field bumped: 8 or 4 little-endian bytes of a huge value.
                let value = HUGE[rng.below(HUGE.len())].to_le_bytes();
                let width = if rng.below(2) == 0 { 8 } else { 4 };
                let end = (at + width).min(out.len());
                out[at..end].copy_from_slice(&value[..end - at]);
            }
            _ => {
                // A decimal number bumped (text formats keep lengths as digits).
                if let Some(digit) = out.iter().skip(at).position(u8::is_ascii_digit) {
                    let value = HUGE[rng.below(HUGE.len())].to_string();
                    out.splice(at + digit..at + digit + 1, value.bytes());
                }
            }
        }
    }
    out
}

/// How one reader fared over its mutations.
struct Tally {
    accepted: usize,
    slowest: Duration,
    worst_ratio: f64,
}

/// Feed `mutations` mutations of `valid` to `read` (which returns whether it accepted the
/// input); fail on a panic, on a call slower than a second, or on a peak heap above
/// `max_ratio` × the input's size (plus 64 KiB of fixed cost), naming the seed and where
/// the input was saved.
fn fuzz(name: &str, valid: &[u8], mutations: usize, max_ratio: f64, read: impl Fn(&[u8]) -> bool) -> Tally {
    assert!(read(valid), "{name}: the valid input must be accepted");
    let seed = 0x5eed_0000 + name.len() as u64;
    let mut rng = Rng(seed);
    let mut tally = Tally { accepted: 0, slowest: Duration::ZERO, worst_ratio: 0.0 };
    let started = Instant::now();
    for i in 0..mutations {
        let input = mutate(valid, &mut rng);
        let clock = Instant::now();
        let (outcome, peak) = peak_heap(|| catch_unwind(AssertUnwindSafe(|| read(&input))));
        let elapsed = clock.elapsed();
        let keep = |why: &str| -> String {
            let path = std::env::temp_dir().join(format!("mutation-{name}-{i}.bin"));
            let _ = std::fs::write(&path, &input);
            format!("{name}: mutation {i} (seed {seed:#x}) {why}; input saved to {}", path.display())
        };
        match outcome {
            Ok(accepted) => tally.accepted += usize::from(accepted),
            Err(_) => panic!("{}", keep("panicked")),
        }
        assert!(elapsed < Duration::from_secs(1), "{}", keep(&format!("took {elapsed:?}")));
        // Tiny inputs have a fixed cost of their own; the ratio is what grows with size.
        let ratio = peak as f64 / input.len().max(4096) as f64;
        tally.worst_ratio = tally.worst_ratio.max(ratio);
        assert!(
            max_ratio.is_infinite() || peak as f64 <= max_ratio * input.len() as f64 + 65536.0,
            "{}",
            keep(&format!("held {peak} bytes of heap for {} bytes of input", input.len()))
        );
        tally.slowest = tally.slowest.max(elapsed);
    }
    eprintln!(
        "{name}: {mutations} mutations in {:?}, {} accepted, slowest {:?}, peak heap up to {:.1}× the input \
         (or 4 KiB)",
        started.elapsed(),
        tally.accepted,
        tally.slowest,
        tally.worst_ratio
    );
    tally
}

// ---- valid inputs ---------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A small safetensors file: an f32 matrix, an f16 vector, a bf16 scalar, an i8 tensor.
fn small_safetensors() -> Vec<u8> {
    let tensor = |name: &str, dtype, shape: Vec<usize>, bytes: Vec<u8>| StoredTensor {
        name: name.into(),
        role: TensorRole::Unquantized,
        dtype,
        shape,
        bytes,
        represents: 0,
    };
    use safetensors::tensor::Dtype;
    let tensors = [
        tensor("model.w", Dtype::F32, vec![2, 3], (0..24).collect()),
        tensor("model.b", Dtype::F16, vec![3], vec![0, 60, 0, 64, 0, 66]),
        tensor("model.s", Dtype::BF16, vec![], vec![128, 63]),
        tensor("model.q", Dtype::I8, vec![4], vec![1, 2, 3, 4]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    weights::save(&path, &tensors, metadata).unwrap();
    std::fs::read(&path).unwrap()
}

/// A GGUF file of `metadata` and f32 `tensors` (name, GGUF dims, values).
fn gguf_bytes(metadata: &[(&str, GgufValue)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let put_str = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        out.extend(value.type_id().to_le_bytes());
        value.write_to(&mut out);
    }
    let mut offset = 0u64;
    for (name, dims, type_id, data) in tensors {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(type_id.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset = (offset + data.len() as u64).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for (_, _, _, data) in tensors {
        out.extend(data);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    out
}

fn array(items: Vec<GgufValue>) -> GgufValue {
    GgufValue::Array(GgufArray::from_values(&items).unwrap())
}

/// A small Llama GGUF with a byte-level BPE tokenizer, one f32 and one Q8_0 tensor.
fn small_gguf() -> Vec<u8> {
    let s = |t: &str| GgufValue::String(t.into());
    let tokens = ["a", "b", "c", "ab", "abc", "<|endoftext|>"];
    let metadata = [
        ("general.architecture", s("llama")),
        ("llama.embedding_length", GgufValue::U32(4)),
        ("llama.feed_forward_length", GgufValue::U32(8)),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.attention.head_count", GgufValue::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5)),
        ("llama.context_length", GgufValue::U32(64)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.tokens", array(tokens.iter().map(|t| s(t)).collect())),
        (
            "tokenizer.ggml.token_type",
            array((0..6).map(|i| GgufValue::I32(if i == 5 { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges", array(vec![s("a b"), s("ab c")])),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(5)),
        ("t.bytes", array((0..16).map(GgufValue::U8).collect())),
        ("t.nested", array(vec![array(vec![GgufValue::I16(-1)]), array(vec![GgufValue::I16(2)])])),
    ];
    let f32s: Vec<u8> = (0..24).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let mut q8 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| i as u8));
    let tensors = [("token_embd.weight", vec![4, 6], 0, f32s), ("blk.0.attn_q.weight", vec![32, 1], 8, q8)];
    gguf_bytes(&metadata, &tensors)
}

fn reference_key() -> CacheKey {
    CacheKey {
        model_sha256: "m".into(),
        dtype: "f32".into(),
        tokenizer_sha256: "t".into(),
        eval_sha256: "e".into(),
        context: 8,
        max_chunks: Some(2),
        top_k: Some(2),
    }
}

/// A small top-k stored reference.
fn small_reference() -> Vec<u8> {
    let reference = Reference {
        vocab: 5,
        targets: vec![2, 0, 4],
        target_logprobs: vec![-0.5, -1.5, -2.0],
        top1: vec![2, 1, 3],
        kept: Kept::TopK {
            k: 2,
            ids: vec![2, 1, 1, 0, 3, 4],
            logprobs: vec![-0.5, -1.0, -0.2, -1.5, -0.1, -2.0],
            tail_ids: (0..3 * TAIL_SAMPLES as u32).map(|i| i % 5).collect(),
            tail_logprobs: (0..3 * TAIL_SAMPLES).map(|i| -(i as f32) / 8.0).collect(),
        },
        log_norms: vec![0.25, -1.5, 3.0],
    };
    reference_cache::encode(&reference_key(), &reference)
}

/// `bytes` with its trailing sha256 made to match, so mutations reach what the checksum
/// guards.
fn resealed(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if out.len() >= 32 {
        let body = out.len() - 32;
        let digest = Sha256::digest(&out[..body]);
        out[body..].copy_from_slice(&digest);
    }
    out
}

// ---- the readers --------------------------------------------------------------------------

const MUTATIONS: usize = 3000;

/// The suite parser; true when it accepts the text.
fn read_suite(bytes: &[u8]) -> bool {
    quantbench::suite::parse(&String::from_utf8_lossy(bytes), Path::new("suite.yaml")).is_ok()
}

/// The safetensors header reader, then every float tensor decoded from the ranges it gave.
fn read_safetensors(bytes: &[u8]) -> bool {
    let Ok(header) = parse_safetensors(bytes, Path::new("model.safetensors")) else { return false };
    for (name, info) in &header.tensors {
        let (begin, end) = info.data_offsets;
        let data = &bytes[header.data_start + begin..header.data_start + end];
        if let Some(values) = to_f32(data, info.dtype) {
            assert_eq!(values.len(), info.shape.iter().product::<usize>(), "{name}");
        }
    }
    true
}

/// The GGUF reader, then all a model load asks of it.
fn read_gguf(bytes: &[u8]) -> bool {
    let Ok(file) = GgufFile::from_bytes(bytes.to_vec(), Path::new("m.gguf")) else { return false };
    for value in file.metadata().values() {
        if let Some(array) = value.as_array() {
            assert_eq!(array.iter().count(), array.len());
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
    true
}

/// The stored-reference reader as is, and with the checksum resealed; what it accepts
/// must be consistent. True when the input as given is accepted.
fn read_reference(bytes: &[u8]) -> bool {
    let path = Path::new("references/m.qbref");
    if let Ok((_, parsed)) = reference_cache::parse(&resealed(bytes), path) {
        assert_eq!(parsed.check(), Ok(()));
    }
    reference_cache::parse(bytes, path).is_ok()
}

/// The results.json reader.
fn read_results(bytes: &[u8]) -> bool {
    Results::parse(bytes, Path::new("results.json")).is_ok()
}

#[test]
fn suite_parser_survives_mutations() {
    let valid = std::fs::read(repo().join("suites/quickstart.yaml")).unwrap();
    fuzz("suite", &valid, MUTATIONS, f64::INFINITY, read_suite);
}

#[test]
fn safetensors_reader_survives_mutations() {
    let tally = fuzz("safetensors", &small_safetensors(), MUTATIONS, 4.0, read_safetensors);
    assert!(tally.accepted < MUTATIONS, "some mutations must be refused");
}

#[test]
fn gguf_reader_survives_mutations() {
    let valid = small_gguf();
    let file = GgufFile::from_bytes(valid.clone(), Path::new("m.gguf")).unwrap();
    file.hf_config().unwrap();
    file.tokenizer_json().unwrap();
    // The tensors dequantize to f32: up to 4 bytes per element of a 1.06-byte Q8_0 weight.
    fuzz("gguf", &valid, MUTATIONS, 8.0, read_gguf);
}

#[test]
fn stored_reference_reader_survives_mutations() {
    let valid = small_reference();
    let path = Path::new("references/m.qbref");
    let (key, reference) = reference_cache::parse(&valid, path).unwrap();
    assert_eq!(key, reference_key());
    // As stored: the checksum refuses every mutation that changes a byte, so whatever is
    // accepted is the reference itself.
    fuzz("reference", &valid, MUTATIONS, 4.0, |bytes| match reference_cache::parse(bytes, path) {
        Ok((_, parsed)) => {
            assert_eq!(parsed, reference, "a changed file read back as another reference");
            true
        }
        Err(_) => false,
    });
    // Resealed: what passes the checksum must still be consistent.
    fuzz("reference-resealed", &valid, MUTATIONS, 4.0, |bytes| read_reference(&resealed(bytes)));
}

#[test]
fn results_reader_survives_mutations() {
    let valid = std::fs::read(repo().join("tests/fixtures/report/new/results.json")).unwrap();
    fuzz("results", &valid, MUTATIONS, f64::INFINITY, read_results);
}

/// Every input a fuzz target crashed on (fuzz/regressions/TARGET/, kept when the crash
/// was fixed) goes to its reader again: an error or a value, never a panic.
#[test]
fn fuzz_regressions_do_not_panic() {
    type Reader = fn(&[u8]) -> bool;
    let readers: [(&str, Reader); 5] = [
        ("suite", read_suite),
        ("safetensors", read_safetensors),
        ("gguf", read_gguf),
        ("reference", read_reference),
        ("results", read_results),
    ];
    let mut replayed = 0;
    for (target, read) in readers {
        let Ok(dir) = std::fs::read_dir(repo().join("fuzz/regressions").join(target)) else { continue };
        for entry in dir {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let outcome = catch_unwind(AssertUnwindSafe(|| read(&bytes)));
            assert!(outcome.is_ok(), "{target}: {} panics", path.display());
            replayed += 1;
        }
    }
    assert!(replayed > 0, "fuzz/regressions holds the crashes fuzzing found");
}

// ---- memory ---------------------------------------------------------------------------------

/// Regression: a GGUF file holding one big u8 metadata array cost 32× its size (one
/// 32-byte value per byte); 100 MB peaked at 3.2 GB. Now it costs about its size.
#[test]
fn a_gguf_of_one_big_u8_array_costs_a_small_multiple_of_its_size() {
    const MB: usize = 1 << 20;
    let blob = GgufValue::Array(GgufArray::from_values(&vec![GgufValue::U8(7); 8 * MB]).unwrap());
    let bytes = gguf_bytes(&[("blob", blob)], &[]);
    let size = bytes.len();
    let (file, peak) = peak_heap(|| GgufFile::from_bytes(bytes, Path::new("big.gguf")));
    let file = file.unwrap();
    assert_eq!(file.metadata()["blob"].as_array().unwrap().len(), 8 * MB);
    eprintln!("one u8 array: {size} bytes of file, {peak} bytes of heap");
    assert!(peak <= 4 * size, "{peak} bytes of heap for a {size}-byte file");

    // The same through open(): the mapped file plus the array's copy.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.gguf");
    std::fs::write(&path, gguf_bytes(&[("blob", file.metadata()["blob"].clone())], &[])).unwrap();
    drop(file);
    let (file, peak) = peak_heap(|| GgufFile::open(&path));
    file.unwrap();
    assert!(peak <= 4 * size, "open: {peak} bytes of heap for a {size}-byte file");
}

/// A results file whose bulk is raw timing samples (`[0,0,0,...]`, two bytes a number)
/// costs a small multiple of its size to read: the reader builds no JSON tree, which cost
/// tens of bytes a number.
#[test]
fn a_results_file_of_many_samples_costs_a_small_multiple_of_its_size() {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/report/baseline/results.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let samples = vec![serde_json::json!(0.0); 2_000_000];
    value["cases"][0]["latency"]["prefill_ms"] = serde_json::Value::Array(samples);
    let bytes = serde_json::to_vec(&value).unwrap();
    let size = bytes.len();
    let (results, peak) = peak_heap(|| Results::parse(&bytes, Path::new("results.json")));
    assert_eq!(results.unwrap().cases[0].latency.as_ref().unwrap().prefill_ms.len(), 2_000_000);
    eprintln!("results: {size} bytes of file, {peak} bytes of heap ({:.1}×)", peak as f64 / size as f64);
    assert!(peak <= 8 * size, "{peak} bytes of heap for a {size}-byte file");
}

/// Directory-heavy files (many tiny metadata pairs, many tiny tensor infos, arrays of
/// empty strings and of empty arrays) stay within a small multiple of their size too.
#[test]
fn directory_heavy_gguf_files_cost_a_small_multiple_of_their_size() {
    let n = 20_000;
    let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    let pairs: Vec<(&str, GgufValue)> = keys.iter().map(|k| (k.as_str(), GgufValue::U8(1))).collect();
    let empty_strings =
        GgufValue::Array(GgufArray::from_values(&vec![GgufValue::String(String::new()); n]).unwrap());
    let empty_arrays = GgufValue::Array(
        GgufArray::from_values(&vec![GgufValue::Array(GgufArray::from_values(&[]).unwrap()); n]).unwrap(),
    );
    let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    let tensors: Vec<(&str, Vec<u64>, u32, Vec<u8>)> =
        names.iter().map(|name| (name.as_str(), vec![0], 0, vec![])).collect();
    let cases = [
        ("metadata pairs", gguf_bytes(&pairs, &[])),
        ("empty strings", gguf_bytes(&[("s", empty_strings)], &[])),
        ("empty arrays", gguf_bytes(&[("a", empty_arrays)], &[])),
        ("tensor infos", gguf_bytes(&[], &tensors)),
    ];
    for (what, bytes) in cases {
        let size = bytes.len();
        let (file, peak) = peak_heap(|| GgufFile::from_bytes(bytes, Path::new("dir.gguf")));
        file.unwrap();
        eprintln!("{what}: {size} bytes of file, {peak} bytes of heap ({:.1}×)", peak as f64 / size as f64);
        // Measured: 6.4× for pairs of 19 bytes (a map entry per pair), 3.1× for infos of
        // 37 bytes, 1.0× for the arrays.
        assert!(peak <= 8 * size, "{what}: {peak} bytes of heap for a {size}-byte file");
    }
}

// ---- fuzz seeds -------------------------------------------------------------------------------

/// Writes the valid inputs above to fuzz/seeds/TARGET/ (the seeds scripts/fuzz.sh starts
/// from): `cargo test --release --test mutation -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes fuzz/seeds; run by hand when the formats change"]
fn write_fuzz_seeds() {
    let seeds = repo().join("fuzz/seeds");
    let files = [
        ("safetensors", "small.safetensors", small_safetensors()),
        ("gguf", "small.gguf", small_gguf()),
        ("reference", "small.qbref", small_reference()),
        ("reference", "full.qbref", full_reference()),
    ];
    for (target, name, bytes) in files {
        std::fs::create_dir_all(seeds.join(target)).unwrap();
        std::fs::write(seeds.join(target).join(name), bytes).unwrap();
    }
}

/// A small full-vocabulary stored reference.
fn full_reference() -> Vec<u8> {
    let reference = Reference {
        vocab: 3,
        targets: vec![2, 0],
        target_logprobs: vec![-0.5, -1.5],
        top1: vec![2, 1],
        kept: Kept::Full(vec![-2.0, -1.0, -0.5, -1.5, -0.2, -3.0]),
        log_norms: vec![0.25, -1.5],
    };
    reference_cache::encode(&CacheKey { top_k: None, ..reference_key() }, &reference)
}
