//! The schema of results.json: provenance, models, and one record per case.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::divergence::{Divergence, DivergenceStats};
use super::embedding::EmbeddingDivergence;
use super::latency::Stats;
use crate::error::{Error, Result};

/// Bumped on any incompatible change of this schema.
pub const SCHEMA_VERSION: u32 = 2;

/// The whole results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// The suite that produced it.
    pub suite: SuiteRecord,
    /// Where and how it ran.
    pub provenance: Provenance,
    /// What every case ran.
    pub workload: WorkloadRecord,
    /// The models.
    pub models: Vec<ModelRecord>,
    /// One record per finished case, in run order.
    pub cases: Vec<CaseResult>,
    /// The shards this run was cut into (`bench run --shard`), each with the machine it ran
    /// on: one for a shard's own run, all of them after `bench merge`; empty for a run of
    /// the whole suite on one machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardRecord>,
}

/// One part of a suite run on its own machine (`bench run --shard I/N`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardRecord {
    /// Which part, 1-based.
    pub index: usize,
    /// How many parts.
    pub count: usize,
    /// Every case the parts share out, in suite order (the suite's, or those `--filter`
    /// selected): `bench merge` finds missing cases against it.
    pub planned: Vec<String>,
    /// The cases this part was given.
    pub cases: Vec<String>,
    /// The build and machine that ran them.
    pub provenance: Provenance,
}

/// The suite, verbatim and hashed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteRecord {
    /// Suite name.
    pub name: String,
    /// Path as given.
    pub path: String,
    /// sha256 of the text.
    pub sha256: String,
    /// The text.
    pub text: String,
    /// The suite's `description` (the reports' header shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The suite's `noise_threshold` (`bench compare` uses it when no threshold is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_threshold: Option<f64>,
}

impl SuiteRecord {
    /// Results written before `description` and `noise_threshold` were recorded hold them
    /// only in the stored suite text: read them from there, once, when the file is read,
    /// so every report of an old run shows what it showed when it was written. A text that
    /// does not parse leaves both empty.
    fn fill_from_text(&mut self) {
        if self.description.is_some() || self.noise_threshold.is_some() {
            return;
        }
        #[derive(Deserialize)]
        struct Recorded {
            description: Option<String>,
            noise_threshold: Option<f64>,
        }
        if let Ok(recorded) = serde_saphyr::from_str::<Recorded>(&self.text) {
            self.description = recorded.description;
            self.noise_threshold = recorded.noise_threshold;
        }
    }
}

/// The machine and build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    /// Crate version.
    pub bench_version: String,
    /// Git revision of the build (with `-dirty` for uncommitted changes), or `unknown`.
    pub git_revision: String,
    /// `release` or `debug`.
    pub build_profile: String,
    /// Cargo features compiled in.
    pub build_features: Vec<String>,
    /// Target triple pieces: arch and OS.
    pub target: String,
    /// CPU model name.
    pub cpu: String,
    /// SIMD features the kernels may dispatch on.
    pub cpu_features: Vec<String>,
    /// Threads used by the matrix products.
    pub threads: usize,
    /// GPU names (empty: none used).
    pub gpus: Vec<String>,
    /// GPU driver version, when a GPU was used.
    pub gpu_driver: Option<String>,
    /// The GPU's measured device-to-device copy bandwidth, GB/s (read and write counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_copy_gb_s: Option<f64>,
    /// Start of the run, UTC, RFC 3339.
    pub started_at: String,
}

/// The workload and the hash of its text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadRecord {
    /// Prompts.
    pub prompts: Vec<String>,
    /// Evaluation text source.
    pub eval_source: String,
    /// sha256 of the evaluation text.
    pub eval_sha256: String,
    /// Latency prompt length.
    pub prompt_len: usize,
    /// Generated tokens per run.
    pub gen_len: usize,
    /// Sequences per latency run.
    pub batch_size: usize,
    /// Evaluation chunk length.
    pub context: usize,
    /// Cap on chunks.
    pub max_chunks: Option<usize>,
    /// Timed repetitions.
    pub repeats: usize,
    /// Warm-up runs.
    pub warmup: usize,
    /// Seed.
    pub seed: u64,
    /// Tokens the reference keeps per scored position (`None`: the whole vocabulary).
    pub reference_top_k: Option<usize>,
    /// Rows of the batch-invariance probe (`None`: not run).
    pub batch_invariance: Option<usize>,
    /// Calibration data, when a scheme needed it.
    pub calibration: Option<CalibrationRecord>,
    /// sha256 over all of the above (keys the reference).
    pub sha256: String,
}

/// The calibration data of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibrationRecord {
    /// Text file as named in the suite.
    pub source: String,
    /// Token rows recorded per layer (at most).
    pub samples: usize,
    /// sha256 of the sample count and the text.
    pub sha256: String,
}

/// One model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRecord {
    /// Name in reports.
    pub name: String,
    /// Path as written in the suite.
    pub path: String,
    /// Architecture.
    pub arch: String,
    /// Reference precision.
    pub dtype: String,
    /// Parameters.
    pub parameters: usize,
    /// Parameters in quantizable linear layers.
    pub linear_parameters: usize,
    /// sha256 over config.json and the weight files.
    pub model_sha256: String,
    /// sha256 of tokenizer.json.
    pub tokenizer_sha256: String,
    /// Evaluation text length in this model's tokens.
    pub eval_tokens: usize,
    /// The model whose outputs this model's cases are judged against (itself unless the
    /// suite names another with `reference:`).
    pub reference: String,
    /// The stored reference outputs, when divergence is measured.
    pub reference_cache: Option<ReferenceCacheRecord>,
    /// An encoder's input length limit and how many inputs it cut (absent for decoders
    /// and in results written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_limit: Option<InputLimit>,
    /// Set when the suite's model could not be had and its `fallback` (`path`) ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_for: Option<FallbackRecord>,
}

/// The model a suite asked for when its fallback ran instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackRecord {
    /// The suite's `path`.
    pub requested: String,
    /// Why it could not be had.
    pub reason: String,
}

impl ModelRecord {
    /// "ran X in place of Y (reason)" for a fallback, for reports.
    pub fn fallback_note(&self) -> Option<String> {
        self.fallback_for.as_ref().map(|f| {
            format!(
                "Fallback: this is `{}`, run in place of `{}`, which was unavailable ({}).",
                self.path, f.requested, f.reason
            )
        })
    }
}

/// The most tokens an encoder input keeps, and how many of a run's inputs were cut to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputLimit {
    /// Tokens kept, special tokens included.
    pub tokens: usize,
    /// Why: `max_seq_length in …/sentence_bert_config.json` (what sentence-transformers
    /// cuts to) or `max_position_embeddings`.
    pub source: String,
    /// Inputs (prompts and evaluation sentences) longer than the limit, cut to it.
    pub truncated: usize,
}

/// The stored reference pass of one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReferenceCacheRecord {
    /// File, under the run's output folder.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// Tokens kept per scored position (`None`: the whole vocabulary).
    pub top_k: Option<usize>,
    /// Scored positions.
    pub tokens_scored: usize,
    /// Whether this run read it from an earlier run instead of computing it.
    pub reused: bool,
    /// What llama.cpp's `--kl-divergence-base` file would take for the same tokens.
    pub llama_cpp_bytes: u64,
}

/// Everything measured for one model × scheme.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseResult {
    /// `model/label`.
    pub id: String,
    /// Model name.
    pub model: String,
    /// Scheme registry name.
    pub scheme: String,
    /// Case label.
    pub label: String,
    /// Scheme parameters.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Device.
    pub device: String,
    /// Kernel paths the quantized model ran.
    pub kernels: Vec<String>,
    /// Hash of everything that determines this case's numbers (resume key).
    pub spec_sha256: String,
    /// Git revision of the build that measured it.
    pub git_revision: String,
    /// Wall time of the whole case, seconds.
    pub elapsed_s: f64,
    /// Byte account.
    pub memory: Option<Memory>,
    /// Saved file.
    pub disk: Option<Disk>,
    /// Timings.
    pub latency: Option<Latency>,
    /// Divergence of next-token distributions from the reference (decoders).
    pub divergence: Option<Divergence>,
    /// Divergence of embeddings and hidden states from the reference (encoders).
    pub embedding: Option<EmbeddingDivergence>,
    /// Greedy continuations.
    pub generation: Option<Vec<Generation>>,
    /// SQNR and cosine of every quantized linear layer's output and every block's hidden
    /// state against the reference's.
    pub layers: Vec<LayerDivergence>,
    /// The same prompt alone and inside a batch (when the suite asks).
    pub batch_invariance: Option<BatchInvariance>,
    /// What layers observed while running (LLM.int8()'s outlier column fraction, a
    /// pruned layer's sparsity, QAT tuning errors), by layer, for layers that report any.
    pub layer_stats: BTreeMap<String, BTreeMap<String, f64>>,
    /// Each of those statistics averaged over the layers that report it.
    pub stats_mean: BTreeMap<String, f64>,
    /// Calibration token rows each layer saw (calibrated schemes).
    pub calibration_rows: Option<usize>,
    /// Things the reader should know (noisy timings, ...).
    pub warnings: Vec<String>,
}

/// Bytes by tensor role.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    /// Bytes per role name.
    pub bytes_by_role: BTreeMap<String, u64>,
    /// All bytes.
    pub total_bytes: u64,
    /// Weights inside quantized linear layers.
    pub quantized_weights: u64,
    /// Bits per quantized weight, scales, zero points and outlier columns included.
    pub bits_per_weight: f64,
    /// Bytes per model parameter, everything included.
    pub bytes_per_parameter: f64,
    /// Resident set size when the case started (the reference model and the process
    /// itself), bytes.
    pub rss_start_bytes: Option<u64>,
    /// Peak resident set size while the case built (quantized) and ran the model for the
    /// latency runs, bytes: the kernel's high-water mark, reset when the case starts and
    /// read before the save-and-reload check and the evaluation passes.
    pub peak_rss_bytes: Option<u64>,
    /// Resident set size once the model is built and its staging copies are freed (what
    /// the quantized model keeps resident, on top of `rss_start_bytes`), bytes.
    pub built_rss_bytes: Option<u64>,
    /// Peak device memory during the case, bytes (GPU cases).
    pub peak_device_bytes: Option<u64>,
}

/// One layer's output against the reference's on the same input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerDivergence {
    /// Layer name (`layers.3.mlp.down_proj`) or block (`block.3`).
    pub name: String,
    /// `linear` (the layer fed the reference's own input) or `block` (the hidden state
    /// after the block, errors of earlier blocks included).
    pub kind: String,
    /// 20·log10(‖y‖ / ‖y − y_q‖), dB; infinite (written `"inf"`) for identical outputs.
    #[serde(with = "f64_or_inf")]
    pub sqnr_db: f64,
    /// Cosine of the two outputs.
    pub cosine: f64,
}

/// The same prompt run alone and as one row of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchInvariance {
    /// Rows in the batch.
    pub batch_size: usize,
    /// Positions compared.
    pub positions: usize,
    /// Largest |Δ| of the outputs (logits; an encoder's hidden states).
    pub max_abs_diff: f64,
    /// Mean KL(alone ‖ batched) of the next-token distributions (decoders).
    pub kld_mean: Option<f64>,
}

/// Serde for an `f64` that may be infinite: JSON has no infinity, so it is written as the
/// string `"inf"` (or `"-inf"`).
pub mod f64_or_inf {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Write `value`, infinities as strings.
    pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *value {
            v if v == f64::INFINITY => s.serialize_str("inf"),
            v if v == f64::NEG_INFINITY => s.serialize_str("-inf"),
            v => s.serialize_f64(v),
        }
    }

    /// Read a number or `"inf"`/`"-inf"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(f64),
            Text(String),
        }
        match Repr::deserialize(d)? {
            Repr::Number(v) => Ok(v),
            Repr::Text(t) if t == "inf" => Ok(f64::INFINITY),
            Repr::Text(t) if t == "-inf" => Ok(f64::NEG_INFINITY),
            Repr::Text(t) => {
                Err(serde::de::Error::custom(format!("expected a number or \"inf\", found {t:?}")))
            }
        }
    }
}

/// The saved quantized model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disk {
    /// File size.
    pub bytes: u64,
    /// File size over the in-memory byte account (header overhead).
    pub bytes_over_memory: f64,
    /// The reloaded model's logits equal the original's bit for bit.
    pub reload_identical: bool,
}

/// Timings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// Build from the full-precision checkpoint, seconds.
    pub quantize_s: f64,
    /// Load of the saved file, seconds.
    pub load_s: Option<f64>,
    /// Prefill samples (for encoders: one encoder pass), milliseconds.
    pub prefill_ms: Vec<f64>,
    /// Prefill statistics.
    pub prefill: Stats,
    /// Decode step samples (all steps of all repeats), milliseconds; empty for encoders.
    pub decode_ms: Vec<f64>,
    /// Decode step statistics (decoders).
    pub decode: Option<Stats>,
    /// Tokens per second across the batch, from the median step (decoders).
    pub decode_tokens_per_s: Option<f64>,
    /// Sequences per run.
    pub batch_size: usize,
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// Decode steps per run.
    pub gen_len: usize,
    /// The same runs timed by the device itself (GPU cases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceLatency>,
}

/// A GPU case's timings from CUDA events around each forward pass (the host timings
/// also hold the launch overhead and the download of the logits), and the decode step's
/// weight-bytes floor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceLatency {
    /// Prefill samples, device milliseconds.
    pub prefill_ms: Vec<f64>,
    /// Prefill statistics.
    pub prefill: Stats,
    /// Decode step samples, device milliseconds.
    pub decode_ms: Vec<f64>,
    /// Decode step statistics.
    pub decode: Option<Stats>,
    /// Bytes of weights a decode step reads (linear layers as stored on the device, and
    /// the output head).
    pub weight_bytes_per_token: u64,
    /// The device's measured copy bandwidth, GB/s.
    pub copy_gb_s: f64,
    /// The weight-bytes floor of a decode step: `weight_bytes_per_token` read at the
    /// copy bandwidth, milliseconds.
    pub floor_ms: f64,
    /// Tokens per second at that floor, across the batch.
    pub floor_tokens_per_s: f64,
    /// Tokens per second from the median device decode step, across the batch.
    pub decode_tokens_per_s: Option<f64>,
    /// Decode step samples with the decode graph off (every kernel launched from the host),
    /// device milliseconds: the timings above replay a CUDA graph. Empty when not measured
    /// (results from before, or a model whose graph was off anyway).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eager_decode_ms: Vec<f64>,
    /// Their statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eager_decode: Option<Stats>,
    /// Tokens per second from the median eager decode step, across the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eager_decode_tokens_per_s: Option<f64>,
}

/// One greedy continuation against the reference's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    /// The prompt.
    pub prompt: String,
    /// Token ids generated.
    pub ids: Vec<u32>,
    /// Their text.
    pub text: String,
    /// The reference's ids.
    pub reference_ids: Vec<u32>,
    /// The reference's text.
    pub reference_text: String,
    /// First position that differs (`None`: identical).
    pub first_divergent_token: Option<usize>,
}

impl WorkloadRecord {
    /// The fields (as results.json names them) whose values differ from `other`'s; empty
    /// when the two hash alike.
    pub fn differences(&self, other: &WorkloadRecord) -> Vec<String> {
        if self.sha256 == other.sha256 {
            return Vec::new();
        }
        let fields = |r: &WorkloadRecord| match serde_json::to_value(r) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let (a, b) = (fields(self), fields(other));
        let differing: Vec<String> = a
            .iter()
            .filter(|(k, v)| *k != "sha256" && b.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        if differing.is_empty() {
            vec!["sha256".to_string()]
        } else {
            differing
        }
    }
}

impl CaseResult {
    /// The divergence statistics, when measured and not withheld.
    pub fn divergence_stats(&self) -> Option<&DivergenceStats> {
        self.divergence.as_ref().and_then(|d| d.stats.as_ref())
    }

    /// A GPU case's device timings.
    pub fn device_latency(&self) -> Option<&DeviceLatency> {
        self.latency.as_ref().and_then(|l| l.device.as_ref())
    }

    /// The quantized linear layer with the lowest SQNR.
    pub fn worst_layer(&self) -> Option<&LayerDivergence> {
        self.layers.iter().filter(|l| l.kind == "linear").min_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db))
    }

    /// An error naming this case and the first metric that is NaN or infinite.
    pub fn check_finite(&self) -> Result<()> {
        match super::finite::first_non_finite(self) {
            None => Ok(()),
            Some((key, value)) => Err(Error::Case {
                case: self.id.clone(),
                message: format!(
                    "metric {key} is {value}, expected a finite number; the case is not recorded"
                ),
            }),
        }
    }
}

impl Results {
    /// The build and machine that measured case `id`: its shard's, else the run's.
    pub fn provenance_of(&self, id: &str) -> &Provenance {
        self.shards
            .iter()
            .find(|s| s.cases.iter().any(|c| c == id))
            .map_or(&self.provenance, |s| &s.provenance)
    }

    /// Read a results file, refusing other schema versions.
    pub fn read(path: &Path) -> Result<Results> {
        let text = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
        Results::parse(&text, path)
    }

    /// Parse the bytes of a results file (`path` names it in errors). A value of the wrong
    /// type is reported with its key path (`cases[2].latency.prefill.median`).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Results> {
        let results_error = |message: String| Error::Results { path: path.to_path_buf(), message };
        let json_error = |e| Error::Json { path: path.to_path_buf(), source: e };
        // Two streaming passes, no JSON tree: memory stays a small multiple of the file
        // (a tree costs tens of bytes per number).
        #[derive(Deserialize)]
        struct Version {
            #[serde(default)]
            schema_version: Option<serde_json::Value>,
        }
        let version = match serde_json::from_slice::<Version>(bytes) {
            Ok(v) => v.schema_version,
            Err(e) if e.is_data() => None,
            Err(e) => return Err(json_error(e)),
        };
        if version.as_ref().and_then(|v| v.as_u64()) != Some(SCHEMA_VERSION as u64) {
            return Err(results_error(format!(
                "schema_version is {}, expected {SCHEMA_VERSION}",
                version.map_or("missing".to_string(), |v| v.to_string())
            )));
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut results: Results = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| results_error(format!("key {}: {}", e.path(), e.inner())))?;
        de.end().map_err(json_error)?;
        results.suite.fill_from_text();
        Ok(results)
    }

    /// Write atomically as pretty JSON. Refused, leaving the file as it was, when a number
    /// is NaN or infinite: JSON would hold `null` there, which no reader takes for a number.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some((key, value)) = super::finite::first_non_finite(self) {
            return Err(Error::Results {
                path: path.to_path_buf(),
                message: format!("key {key} is {value}, expected a finite number; the file was not written"),
            });
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Json { path: path.to_path_buf(), source: e })?;
        crate::files::write_atomic(path, text.as_bytes())
    }
}

/// The git revision this binary was built from (set by build.rs), or `unknown`.
pub fn git_revision() -> &'static str {
    option_env!("QUANTBENCH_GIT_REVISION").unwrap_or("unknown")
}

impl Provenance {
    /// The machine in words, as reports tell machines apart: CPU, threads and GPUs.
    pub fn machine(&self) -> String {
        let gpus =
            if self.gpus.is_empty() { String::new() } else { format!(", GPU {}", self.gpus.join(", ")) };
        format!("{}, {} threads{gpus}", self.cpu, self.threads)
    }

    /// Describe this build and machine.
    pub fn collect() -> Provenance {
        Provenance {
            bench_version: env!("CARGO_PKG_VERSION").to_string(),
            git_revision: git_revision().to_string(),
            build_profile: if cfg!(debug_assertions) { "debug" } else { "release" }.to_string(),
            build_features: if cfg!(feature = "cuda") { vec!["cuda".to_string()] } else { Vec::new() },
            target: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            cpu: cpu_name(),
            cpu_features: cpu_features(),
            threads: rayon::current_num_threads(),
            gpus: Vec::new(),
            gpu_driver: None,
            gpu_copy_gb_s: None,
            started_at: rfc3339_now(),
        }
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn cpu_features() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut found = Vec::new();
        macro_rules! probe {
            ($($f:tt),*) => {$( if std::arch::is_x86_feature_detected!($f) { found.push($f.to_string()); } )*};
        }
        probe!("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avx512bf16", "avxvnni", "f16c");
        found
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// Now, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_now() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the Unix epoch as an RFC 3339 UTC timestamp (civil-from-days).
pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/report/baseline/results.json");

    fn fixture() -> Results {
        Results::parse(FIXTURE.as_bytes(), Path::new("results.json")).unwrap()
    }

    #[test]
    fn a_nan_metric_is_refused_by_name_and_the_file_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.json");
        let mut results = fixture();
        results.cases[1].divergence.as_mut().unwrap().stats.as_mut().unwrap().ppl_ratio.value = f64::NAN;
        let err = results.cases[1].check_finite().unwrap_err().to_string();
        assert!(err.contains("metric divergence.stats.ppl_ratio.value is NaN"), "{err}");
        assert!(err.contains(&results.cases[1].id), "{err}");
        let err = results.write(&path).unwrap_err().to_string();
        assert!(err.contains("key cases[1].divergence.stats.ppl_ratio.value is NaN"), "{err}");
        assert!(!path.exists(), "nothing may be written");
        results.cases[1].divergence.as_mut().unwrap().stats.as_mut().unwrap().ppl_ratio.value = f64::INFINITY;
        assert!(results.write(&path).unwrap_err().to_string().contains("is inf"));
    }

    #[test]
    fn what_write_writes_parse_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.json");
        let results = fixture();
        results.write(&path).unwrap();
        let back = Results::read(&path).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&results).unwrap());
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_key_path() {
        let mut value: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        value["cases"][0]["divergence"]["stats"]["kld"]["mean"] = serde_json::Value::Null;
        let text = serde_json::to_vec(&value).unwrap();
        let err = Results::parse(&text, Path::new("r.json")).unwrap_err().to_string();
        assert!(err.starts_with("results file r.json: key cases[0].divergence.stats.kld.mean:"), "{err}");
        assert!(err.contains("invalid type: null, expected f64"), "{err}");
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_523_696), "2026-11-24T12:34:56Z");
    }

    #[test]
    fn infinite_sqnr_round_trips_as_a_string() {
        let layer =
            LayerDivergence { name: "a".into(), kind: "linear".into(), sqnr_db: f64::INFINITY, cosine: 1.0 };
        let text = serde_json::to_string(&layer).unwrap();
        assert!(text.contains("\"sqnr_db\":\"inf\""), "{text}");
        assert_eq!(serde_json::from_str::<LayerDivergence>(&text).unwrap(), layer);
        let finite = LayerDivergence { sqnr_db: 31.5, ..layer };
        assert_eq!(
            serde_json::from_str::<LayerDivergence>(&serde_json::to_string(&finite).unwrap()).unwrap(),
            finite
        );
    }
}
