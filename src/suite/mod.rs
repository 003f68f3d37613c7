//! Suite files: the YAML schema (strict: unknown keys are errors with their line and the
//! allowed keys), and validation into a [`plan::Plan`] before any work starts.

pub mod plan;
pub mod shard;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use crate::error::{Error, Result};

pub use plan::{CalibrationData, Plan, PlannedModel, PlannedScheme, Workload};
pub use shard::Shard;

/// A suite as written in YAML.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteFile {
    /// Suite name (also the default output folder).
    pub name: Spanned<String>,
    /// Free text shown in reports.
    #[serde(default)]
    pub description: Option<String>,
    /// Models to measure.
    pub models: Vec<ModelEntry>,
    /// Schemes to apply to every model.
    pub schemes: Vec<Spanned<SchemeEntry>>,
    /// What to run.
    #[serde(default)]
    pub workload: WorkloadSpec,
    /// Metric groups or metric names to measure (default: all).
    #[serde(default)]
    pub metrics: Option<Vec<Spanned<String>>>,
    /// `cpu`, `cuda` or `auto`.
    #[serde(default)]
    pub device: Option<Spanned<String>>,
    /// Calibration data for schemes that need it (int8-static, qat-sim).
    #[serde(default)]
    pub calibration: Option<CalibrationSpec>,
    /// Timed repetitions per case.
    #[serde(default = "default_repeats")]
    pub repeats: Spanned<u32>,
    /// Untimed warm-up runs per case.
    #[serde(default = "default_warmup")]
    pub warmup: u32,
    /// Seed for anything random (prompt sampling, schemes that draw).
    #[serde(default)]
    pub seed: u64,
    /// Output folder, relative to the working directory.
    #[serde(default)]
    pub output: Option<String>,
    /// Relative change of a median timing that `bench compare` treats as noise (default
    /// 0.02): a timing regresses only when its whole 95% interval lies beyond it.
    #[serde(default)]
    pub noise_threshold: Option<Spanned<f64>>,
}

/// A default value, which has no place in the file.
fn defaulted<T>(value: T) -> Spanned<T> {
    Spanned::new(value, serde_saphyr::Location::UNKNOWN, serde_saphyr::Location::UNKNOWN)
}

fn default_repeats() -> Spanned<u32> {
    defaulted(5)
}

fn default_warmup() -> u32 {
    1
}

/// One model of a suite.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Name in reports.
    pub name: Spanned<String>,
    /// A Hugging Face style directory (relative to the suite file) or `builtin:NAME`.
    pub path: Spanned<String>,
    /// Precision of the reference model: `f32` (default), `f16` or `bf16`.
    #[serde(default)]
    pub dtype: Option<Spanned<String>>,
    /// Another model of the suite whose full-precision outputs this model's cases are
    /// judged against (a distilled student against its teacher); it must share the
    /// tokenizer.
    #[serde(default)]
    pub reference: Option<Spanned<String>>,
    /// What to run when `path` is a hub id that cannot be had here (offline, no network,
    /// refused): a folder or `builtin:NAME`. The results and reports say plainly that the
    /// fallback ran, and why.
    #[serde(default)]
    pub fallback: Option<Spanned<String>>,
}

/// One scheme of a suite: a bare name, or a map with `name` and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemeEntry {
    /// Registry name.
    pub name: String,
    /// Parameters, checked against the registry during validation.
    pub params: BTreeMap<String, serde_json::Value>,
}

impl<'de> Deserialize<'de> for SchemeEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = SchemeEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scheme name, or a map with `name` and the scheme's parameters")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<SchemeEntry, E> {
                Ok(SchemeEntry { name: v.to_string(), params: BTreeMap::new() })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<SchemeEntry, A::Error> {
                let mut name = None;
                let mut params = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "name" {
                        name = Some(map.next_value::<String>()?);
                    } else {
                        params.insert(key, map.next_value::<serde_json::Value>()?);
                    }
                }
                let name = name.ok_or_else(|| de::Error::missing_field("name"))?;
                Ok(SchemeEntry { name, params })
            }
        }
        deserializer.deserialize_any(EntryVisitor)
    }
}

/// Calibration data: a text run through the full-precision model to record each linear
/// layer's inputs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    /// Text file, relative to the suite file.
    pub text: Spanned<String>,
    /// Token rows recorded per layer.
    #[serde(default = "default_samples")]
    pub samples: Spanned<usize>,
}

fn default_samples() -> Spanned<usize> {
    defaulted(256)
}

/// What each case runs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Prompts for latency and the generation check (absent: built-in defaults).
    #[serde(default)]
    pub prompts: Option<Spanned<Vec<String>>>,
    /// Text file (relative to the suite file) for divergence and perplexity.
    #[serde(default)]
    pub eval_text: Option<Spanned<String>>,
    /// Prompt length in tokens for the latency runs (prompts are cycled to this length).
    #[serde(default = "default_prompt_len")]
    pub prompt_len: Spanned<usize>,
    /// Tokens generated per latency run and per generation check.
    #[serde(default = "default_gen_len")]
    pub gen_len: Spanned<usize>,
    /// Sequences per latency run.
    #[serde(default = "default_batch")]
    pub batch_size: Spanned<usize>,
    /// Tokens per evaluation chunk; the second half of each chunk is scored.
    #[serde(default = "default_context")]
    pub context: Spanned<usize>,
    /// At most this many evaluation chunks (all if absent).
    #[serde(default)]
    pub max_chunks: Option<usize>,
    /// Tokens the reference keeps per scored position: a count (default 64) or `full`.
    #[serde(default)]
    pub reference_top_k: Option<Spanned<serde_json::Value>>,
    /// Run the batch-invariance probe with batches of this many rows (at least 2).
    #[serde(default)]
    pub batch_invariance: Option<Spanned<usize>>,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            prompts: None,
            eval_text: None,
            prompt_len: default_prompt_len(),
            gen_len: default_gen_len(),
            batch_size: default_batch(),
            context: default_context(),
            max_chunks: None,
            reference_top_k: None,
            batch_invariance: None,
        }
    }
}

fn default_prompt_len() -> Spanned<usize> {
    defaulted(32)
}
fn default_gen_len() -> Spanned<usize> {
    defaulted(16)
}
fn default_batch() -> Spanned<usize> {
    defaulted(1)
}
fn default_context() -> Spanned<usize> {
    defaulted(128)
}

/// Parse suite text; `path` is only used in messages. Errors give the key path (from
/// `serde_path_to_error`), the line and column, and a snippet of the file.
pub fn parse(text: &str, path: &Path) -> Result<SuiteFile> {
    let mut key_path = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            // `Spanned<T>` adds a `value` segment of its own; users never wrote it.
            key_path =
                e.path().to_string().split('.').filter(|s| *s != "value").collect::<Vec<_>>().join(".");
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let name = path.display().to_string();
        let rendered = e.render_with_options(serde_saphyr::render_options! { source_name: Some(&name) });
        let rendered = rendered.strip_prefix("error: ").unwrap_or(&rendered);
        // The parser's advice names its own options; say what the suite must change.
        let rendered = rendered.replace(
            ", set DuplicateKeyPolicy in Options if acceptable",
            ", expected each key once per mapping",
        );
        let at = if key_path.is_empty() || key_path == "." || key_path == "?" {
            String::new()
        } else {
            format!("key `{key_path}`, ")
        };
        Error::SuiteSyntax { path: path.to_path_buf(), message: format!("{at}{rendered}") }
    })
}

/// Read and parse the suite at `path`.
pub fn read(path: &Path) -> Result<(String, SuiteFile)> {
    let text = crate::files::read_text(path).map_err(|e| Error::io("cannot read suite", path, e))?;
    let suite = parse(&text, path)?;
    Ok((text, suite))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("s.yaml")).unwrap_err().to_string()
    }

    const MINIMAL: &str = "name: t\nmodels:\n  - name: m\n    path: builtin:tiny-llama\nschemes: [fp32]\n";

    #[test]
    fn minimal_suite_parses_with_defaults() {
        let s = parse(MINIMAL, Path::new("s.yaml")).unwrap();
        assert_eq!(s.name.value, "t");
        assert_eq!(s.repeats.value, 5);
        assert_eq!(s.workload.context.value, 128);
        assert_eq!(s.schemes[0].value, SchemeEntry { name: "fp32".into(), params: BTreeMap::new() });
    }

    #[test]
    fn scheme_entries_take_a_name_or_a_map() {
        let text = MINIMAL.replace("[fp32]", "\n  - fp16\n  - name: bf16\n    label: b\n");
        let s = parse(&text, Path::new("s.yaml")).unwrap();
        assert_eq!(s.schemes[1].value.name, "bf16");
        assert_eq!(s.schemes[1].value.params["label"], serde_json::json!("b"));
        assert_eq!(s.schemes[1].referenced.line(), 7);
    }

    #[test]
    fn unknown_key_names_the_key_its_line_and_the_allowed_keys() {
        let err = parse_err(&format!("{MINIMAL}workload:\n  prompt_length: 5\n"));
        assert!(err.contains("prompt_length"), "{err}");
        assert!(err.contains("prompt_len"), "allowed keys missing: {err}");
        assert!(err.contains("line 7"), "line missing: {err}");
    }

    #[test]
    fn noise_threshold_is_optional() {
        assert!(parse(MINIMAL, Path::new("s.yaml")).unwrap().noise_threshold.is_none());
        let s = parse(&format!("{MINIMAL}noise_threshold: 0.05\n"), Path::new("s.yaml")).unwrap();
        assert_eq!(s.noise_threshold.map(|t| t.value), Some(0.05));
    }

    #[test]
    fn wrong_type_is_reported_with_its_line() {
        let err = parse_err(&format!("{MINIMAL}repeats: many\n"));
        assert!(err.contains("repeats") || err.contains("many"), "{err}");
        assert!(err.contains("line 6"), "{err}");
    }
}
