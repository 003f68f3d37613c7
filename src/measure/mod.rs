//! Measurements and the one registry table of metrics: what each metric means, its unit,
//! its direction and its noise tolerance. Reports and comparisons read this table.

pub mod divergence;
pub mod embedding;
pub mod finite;
pub mod latency;
pub mod memory;
pub mod profile;
pub mod reference_cache;
pub mod results;

use serde::Serialize;

use results::CaseResult;

/// The groups a suite's `metrics:` list switches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricGroup {
    /// Bytes by tensor role, bits per weight.
    Memory,
    /// Saved safetensors size, reload check.
    Disk,
    /// Quantize, load, prefill and decode times.
    Latency,
    /// KL divergence, same top-1, perplexity.
    Divergence,
    /// Greedy continuations and the first divergent token.
    Generation,
}

impl MetricGroup {
    /// Every group, in report order.
    pub const ALL: [MetricGroup; 5] = [
        MetricGroup::Memory,
        MetricGroup::Disk,
        MetricGroup::Latency,
        MetricGroup::Divergence,
        MetricGroup::Generation,
    ];

    /// Name in suites.
    pub fn name(self) -> &'static str {
        match self {
            MetricGroup::Memory => "memory",
            MetricGroup::Disk => "disk",
            MetricGroup::Latency => "latency",
            MetricGroup::Divergence => "divergence",
            MetricGroup::Generation => "generation",
        }
    }
}

/// How a metric's values over cases or runs combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// One exact value per case (bytes).
    Exact,
    /// The median of repeated timings.
    Median,
    /// The mean over scored tokens.
    MeanOverTokens,
    /// A ratio of two case-level values.
    Ratio,
}

/// One row of the metric table.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MetricInfo {
    /// Its value in a case, when the case measured it.
    #[serde(skip)]
    pub value: fn(&CaseResult) -> Option<f64>,
    /// For timings, the raw samples behind the value (compared by bootstrap); `None`
    /// for deterministic values.
    #[serde(skip)]
    pub samples: fn(&CaseResult) -> Option<Vec<f64>>,
    /// Name in results and reports.
    pub name: &'static str,
    /// Group that measures it.
    pub group: MetricGroup,
    /// Unit as printed.
    pub unit: &'static str,
    /// Whether larger is better.
    pub higher_is_better: bool,
    /// How values combine.
    pub aggregation: Aggregation,
    /// Relative change within which two runs count as equal.
    pub tolerance: f64,
    /// What it means.
    pub summary: &'static str,
    /// Whether its value depends on the machine (timings, resident memory): across two
    /// machines `bench compare` shows its verdict but does not fail on it.
    pub machine_dependent: bool,
}

/// A metric row without its value reader: [`MetricRow::read`] completes it, so no row can
/// leave out where its value lives.
struct MetricRow {
    name: &'static str,
    group: MetricGroup,
    unit: &'static str,
    higher_is_better: bool,
    aggregation: Aggregation,
    tolerance: f64,
    summary: &'static str,
    machine_dependent: bool,
}

const fn metric(
    name: &'static str,
    group: MetricGroup,
    unit: &'static str,
    higher_is_better: bool,
    aggregation: Aggregation,
    tolerance: f64,
    summary: &'static str,
) -> MetricRow {
    // Timings depend on the machine by nature; other groups say so with `on_machine`.
    let machine_dependent = matches!(group, MetricGroup::Latency);
    MetricRow { name, group, unit, higher_is_better, aggregation, tolerance, summary, machine_dependent }
}

impl MetricRow {
    /// The same row, marked as depending on the machine.
    const fn on_machine(self) -> MetricRow {
        MetricRow { machine_dependent: true, ..self }
    }

    /// The row, reading its value off a case with `value`.
    const fn read(self, value: fn(&CaseResult) -> Option<f64>) -> MetricInfo {
        let MetricRow {
            name,
            group,
            unit,
            higher_is_better,
            aggregation,
            tolerance,
            summary,
            machine_dependent,
        } = self;
        MetricInfo {
            value,
            samples: no_samples,
            name,
            group,
            unit,
            higher_is_better,
            aggregation,
            tolerance,
            summary,
            machine_dependent,
        }
    }
}

impl MetricInfo {
    /// The same row, with the raw samples behind its value.
    const fn sampled(self, samples: fn(&CaseResult) -> Option<Vec<f64>>) -> MetricInfo {
        MetricInfo { samples, ..self }
    }
}

fn no_samples(_: &CaseResult) -> Option<Vec<f64>> {
    None
}

use Aggregation::*;
use MetricGroup::*;

/// The `weight_bytes` row.
pub const WEIGHT_BYTES: MetricInfo =
    metric("weight_bytes", Memory, "B", false, Exact, 0.0, "bytes of every tensor as the scheme stores it")
        .read(|c| c.memory.as_ref().map(|m| m.total_bytes as f64));

/// The `bits_per_weight` row.
pub const BITS_PER_WEIGHT: MetricInfo = metric(
    "bits_per_weight",
    Memory,
    "bit",
    false,
    Exact,
    0.0,
    "bits per quantized linear weight, scales and zero points included",
)
.read(|c| c.memory.as_ref().map(|m| m.bits_per_weight));

/// The `peak_rss_bytes` row.
pub const PEAK_RSS_BYTES: MetricInfo = metric(
    "peak_rss_bytes",
    Memory,
    "B",
    false,
    Exact,
    0.05,
    "peak resident set size of the process during the case (the high-water mark is reset per case)",
)
.on_machine()
.read(|c| c.memory.as_ref().and_then(|m| m.peak_rss_bytes).map(|b| b as f64));

/// The `disk_bytes` row.
pub const DISK_BYTES: MetricInfo =
    metric("disk_bytes", Disk, "B", false, Exact, 0.0, "size of the saved safetensors file")
        .read(|c| c.disk.as_ref().map(|d| d.bytes as f64));

/// The `quantize_s` row.
pub const QUANTIZE_S: MetricInfo = metric(
    "quantize_s",
    Latency,
    "s",
    false,
    Median,
    0.10,
    "time to build the model from the full-precision checkpoint, quantization included",
)
.read(|c| c.latency.as_ref().map(|l| l.quantize_s));

/// The `load_s` row.
pub const LOAD_S: MetricInfo =
    metric("load_s", Latency, "s", false, Median, 0.10, "time to load the saved quantized file")
        .read(|c| c.latency.as_ref().and_then(|l| l.load_s));

/// The `prefill_ms` row.
pub const PREFILL_MS: MetricInfo = metric(
    "prefill_ms",
    Latency,
    "ms",
    false,
    Median,
    0.02,
    "time to first token: one forward pass over batch × prompt_len tokens",
)
.read(|c| c.latency.as_ref().map(|l| l.prefill.median))
.sampled(|c| c.latency.as_ref().map(|l| l.prefill_ms.clone()));

/// The `decode_ms_per_token` row.
pub const DECODE_MS_PER_TOKEN: MetricInfo = metric(
    "decode_ms_per_token",
    Latency,
    "ms",
    false,
    Median,
    0.02,
    "time of one decode step (batch tokens) with the KV cache",
)
.read(|c| c.latency.as_ref().and_then(|l| l.decode.as_ref()).map(|d| d.median))
.sampled(|c| c.latency.as_ref().map(|l| l.decode_ms.clone()).filter(|s| !s.is_empty()));

/// The `decode_tokens_per_s` row.
pub const DECODE_TOKENS_PER_S: MetricInfo = metric(
    "decode_tokens_per_s",
    Latency,
    "tok/s",
    true,
    Median,
    0.02,
    "tokens generated per second across the batch",
)
.read(|c| c.latency.as_ref().and_then(|l| l.decode_tokens_per_s))
.sampled(|c| {
    let l = c.latency.as_ref()?;
    let batch = l.batch_size.max(1) as f64;
    Some(l.decode_ms.iter().filter(|ms| **ms > 0.0).map(|ms| batch * 1e3 / ms).collect())
        .filter(|s: &Vec<f64>| !s.is_empty())
});

/// The `kld_mean` row.
pub const KLD_MEAN: MetricInfo = metric(
    "kld_mean",
    Divergence,
    "nat",
    false,
    MeanOverTokens,
    0.01,
    "mean KL(reference ‖ quantized) of next-token distributions",
)
.read(|c| c.divergence_stats().map(|s| s.kld.mean));

/// The `same_top1` row.
pub const SAME_TOP1: MetricInfo = metric(
    "same_top1",
    Divergence,
    "fraction",
    true,
    MeanOverTokens,
    0.005,
    "fraction of positions whose most likely token is unchanged",
)
.read(|c| c.divergence_stats().map(|s| s.same_top1.value));

/// The `kld_p99` row.
pub const KLD_P99: MetricInfo = metric(
    "kld_p99",
    Divergence,
    "nat",
    false,
    MeanOverTokens,
    0.02,
    "99th percentile of the per-token KL divergence",
)
.read(|c| c.divergence_stats().map(|s| s.kld.percentiles.p99));

/// The `delta_p_rms` row.
pub const DELTA_P_RMS: MetricInfo = metric(
    "delta_p_rms",
    Divergence,
    "",
    false,
    MeanOverTokens,
    0.01,
    "root mean square change in probability of the correct token",
)
.read(|c| c.divergence_stats().map(|s| s.delta_p.rms.value));

/// The `logits_cosine` row.
pub const LOGITS_COSINE: MetricInfo = metric(
    "logits_cosine",
    Divergence,
    "",
    true,
    MeanOverTokens,
    0.0001,
    "cosine of quantized and reference logit vectors at the probe positions",
)
.read(|c| c.divergence_stats().map(|s| s.logits_cosine));

/// The `worst_layer_sqnr_db` row.
pub const WORST_LAYER_SQNR_DB: MetricInfo = metric(
    "worst_layer_sqnr_db",
    Divergence,
    "dB",
    true,
    Exact,
    0.01,
    "lowest SQNR of any quantized linear layer's output on the reference's inputs",
)
.read(|c| c.worst_layer().map(|l| l.sqnr_db));

/// The `ppl` row.
pub const PPL: MetricInfo =
    metric("ppl", Divergence, "", false, MeanOverTokens, 0.005, "perplexity of the evaluation text")
        .read(|c| c.divergence_stats().map(|s| s.ppl.value));

/// The `ppl_ratio` row.
pub const PPL_RATIO: MetricInfo =
    metric("ppl_ratio", Divergence, "", false, Ratio, 0.005, "perplexity over the reference's perplexity")
        .read(|c| c.divergence_stats().map(|s| s.ppl_ratio.value));

/// The `embedding_cosine` row.
pub const EMBEDDING_COSINE: MetricInfo = metric(
    "embedding_cosine",
    Divergence,
    "",
    true,
    MeanOverTokens,
    0.0001,
    "encoders: cosine between quantized and reference sentence embeddings (mean and min)",
)
.read(|c| c.embedding.as_ref().map(|e| e.cosine_mean));

/// The `hidden_nmse` row.
pub const HIDDEN_NMSE: MetricInfo = metric(
    "hidden_nmse",
    Divergence,
    "",
    false,
    MeanOverTokens,
    0.01,
    "encoders: squared error of last hidden states over their squared norm",
)
.read(|c| c.embedding.as_ref().map(|e| e.hidden_nmse));

/// The `first_divergent_token` row.
pub const FIRST_DIVERGENT_TOKEN: MetricInfo = metric(
    "first_divergent_token",
    Generation,
    "tok",
    true,
    Exact,
    0.0,
    "first generated position where greedy output differs from the reference",
)
.read(|c| {
    // Identical continuations count as diverging after their last token.
    c.generation.as_ref().and_then(|g| {
        g.iter().map(|x| x.first_divergent_token.unwrap_or(x.ids.len()) as f64).reduce(f64::min)
    })
});

/// Every metric the harness reports.
pub static METRICS: &[MetricInfo] = &[
    WEIGHT_BYTES,
    BITS_PER_WEIGHT,
    PEAK_RSS_BYTES,
    DISK_BYTES,
    QUANTIZE_S,
    LOAD_S,
    PREFILL_MS,
    DECODE_MS_PER_TOKEN,
    DECODE_TOKENS_PER_S,
    KLD_MEAN,
    SAME_TOP1,
    KLD_P99,
    DELTA_P_RMS,
    LOGITS_COSINE,
    WORST_LAYER_SQNR_DB,
    PPL,
    PPL_RATIO,
    EMBEDDING_COSINE,
    HIDDEN_NMSE,
    FIRST_DIVERGENT_TOKEN,
];

/// A suite's metric entry (a group or a metric name) resolved to its group, or a message
/// listing what is accepted.
pub fn resolve_metric(name: &str) -> Result<MetricGroup, String> {
    if let Some(group) = MetricGroup::ALL.into_iter().find(|g| g.name() == name) {
        return Ok(group);
    }
    if let Some(m) = METRICS.iter().find(|m| m.name == name) {
        return Ok(m.group);
    }
    let groups: Vec<_> = MetricGroup::ALL.iter().map(|g| g.name()).collect();
    let metrics: Vec<_> = METRICS.iter().map(|m| m.name).collect();
    Err(format!(
        "unknown metric `{name}`, expected a group ({}) or a metric ({})",
        groups.join(", "),
        metrics.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::results::Results;

    /// Every row reads its value off a case: a committed decoder run (the quickstart
    /// suite: memory, disk, timings, divergence, layers, generation) has each decoder
    /// metric, and an encoder's embedding divergence gives the encoder metrics. Timings
    /// carry their samples.
    #[test]
    fn every_metric_reads_its_value_off_a_case() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/reports/quickstart/results.json");
        let results = Results::read(std::path::Path::new(path)).unwrap();
        let mut encoder = results.cases[1].clone();
        encoder.embedding = Some(embedding::EmbeddingDivergence {
            sentences: 2,
            cosine_mean: 0.99,
            cosine_min: 0.98,
            hidden_nmse: 0.01,
        });
        for m in METRICS {
            let read = results.cases.iter().chain([&encoder]).any(|c| (m.value)(c).is_some());
            assert!(read, "no case gives a value for {}", m.name);
            // Only timings have samples to bootstrap.
            let sampled = results.cases.iter().any(|c| (m.samples)(c).is_some_and(|s| s.len() >= 2));
            assert!(!sampled || m.group == MetricGroup::Latency, "{} has samples", m.name);
        }
        let sampled = METRICS.iter().filter(|m| results.cases.iter().any(|c| (m.samples)(c).is_some()));
        assert_eq!(sampled.count(), 3, "prefill, decode time and decode tokens/s carry samples");
    }

    use super::*;

    #[test]
    fn every_group_has_a_metric_and_names_are_unique() {
        for g in MetricGroup::ALL {
            assert!(METRICS.iter().any(|m| m.group == g), "{g:?} has no metric");
        }
        let mut names: Vec<_> = METRICS.iter().map(|m| m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
    }

    #[test]
    fn metric_names_resolve_to_their_group() {
        assert_eq!(resolve_metric("kld_mean"), Ok(MetricGroup::Divergence));
        assert_eq!(resolve_metric("latency"), Ok(MetricGroup::Latency));
        let err = resolve_metric("speed").unwrap_err();
        assert!(err.contains("`speed`") && err.contains("latency") && err.contains("ppl"), "{err}");
    }
}
