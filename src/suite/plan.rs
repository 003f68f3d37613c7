//! Validation of a parsed suite into a [`Plan`]: every model path, scheme, parameter,
//! metric and device is checked, and every model opened, before any work starts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

use crate::backend::{self, Device, DeviceError, DeviceRequest};
use crate::error::{Error, Result};
use crate::measure::{self, MetricGroup};
use crate::model::{self, ModelFiles};
use crate::scheme::{self, FloatStorage, SchemeInfo, SchemeParams};

use super::{SchemeEntry, SuiteFile};

/// A validated suite: everything the runner needs, checked.
pub struct Plan {
    /// Suite file path.
    pub suite_path: PathBuf,
    /// Suite text as read (stored in results.json).
    pub suite_text: String,
    /// sha256 of the suite text.
    pub suite_hash: String,
    /// Suite name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The relative change `bench compare` treats as noise for this suite.
    pub noise_threshold: Option<f64>,
    /// Models, opened.
    pub models: Vec<PlannedModel>,
    /// Schemes, with validated parameters.
    pub schemes: Vec<PlannedScheme>,
    /// The workload.
    pub workload: Workload,
    /// Calibration data, when a scheme needs it.
    pub calibration: Option<CalibrationData>,
    /// Metric groups to measure.
    pub metrics: BTreeSet<MetricGroup>,
    /// The device the cases run on (`auto` resolved).
    pub device: Device,
    /// Timed repetitions.
    pub repeats: usize,
    /// Warm-up runs.
    pub warmup: usize,
    /// Seed.
    pub seed: u64,
    /// The suite's published report folder (`output`, else reports/NAME): where
    /// `bench run --publish` writes a committed example report.
    pub output: PathBuf,
}

/// Where `bench run` writes unless told otherwise: under the working directory, ignored
/// by git, so a first run never dirties a checkout's committed reports.
pub const RUNS_DIR: &str = "runs";

impl Plan {
    /// The default output folder of a run: [`RUNS_DIR`]/NAME.
    pub fn run_folder(&self) -> PathBuf {
        PathBuf::from(RUNS_DIR).join(&self.name)
    }
}

/// A model of the plan.
pub struct PlannedModel {
    /// Name in reports.
    pub name: String,
    /// Path as written in the suite.
    pub spec: String,
    /// Reference precision.
    pub dtype: FloatStorage,
    /// The opened model.
    pub files: ModelFiles,
    /// Index (in the plan's models) of the model whose outputs are the reference, when it
    /// is another one.
    pub reference: Option<usize>,
    /// Set when the suite's `path` could not be had and its `fallback` runs instead.
    pub substitute: Option<Substitute>,
}

/// A model entry's `fallback` standing in for its `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Substitute {
    /// The `path` the suite asked for.
    pub requested: String,
    /// Why it could not be had.
    pub reason: String,
}

/// A scheme of the plan.
pub struct PlannedScheme {
    /// Case label (`label` parameter, else the scheme name).
    pub label: String,
    /// Registry row.
    pub info: &'static SchemeInfo,
    /// Validated parameters.
    pub params: SchemeParams,
}

/// What every case runs.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Prompts for latency and generation.
    pub prompts: Vec<String>,
    /// Evaluation text.
    pub eval_text: String,
    /// Where the evaluation text came from.
    pub eval_source: String,
    /// Latency prompt length in tokens.
    pub prompt_len: usize,
    /// Tokens generated per run.
    pub gen_len: usize,
    /// Sequences per latency run.
    pub batch_size: usize,
    /// Evaluation chunk length.
    pub context: usize,
    /// Cap on evaluation chunks.
    pub max_chunks: Option<usize>,
    /// Tokens the reference keeps per scored position (`None`: the whole vocabulary).
    pub reference_top_k: Option<usize>,
    /// Rows of the batch-invariance probe, when it runs.
    pub batch_invariance: Option<usize>,
}

/// Tokens the reference keeps per scored position unless the suite says otherwise.
pub const DEFAULT_REFERENCE_TOP_K: usize = 64;

/// Calibration text and how many token rows to record per layer.
#[derive(Debug, Clone)]
pub struct CalibrationData {
    /// The text.
    pub text: String,
    /// Where it came from, as written in the suite.
    pub source: String,
    /// Token rows recorded per layer.
    pub samples: usize,
    /// sha256 of the text and the sample count.
    pub sha256: String,
}

/// Prompts used when a suite names none.
const DEFAULT_PROMPTS: &[&str] = &["Hello, how are you?", "1.1+2.3=?"];

/// Whether calibrating `files` on `text` records any rows: a decoder needs a token, an
/// encoder a sentence.
fn calibration_has_rows(files: &ModelFiles, text: &str) -> Result<bool> {
    Ok(match files.arch.kind {
        model::ArchKind::Causal => !files.tokenizer.encode(text)?.is_empty(),
        model::ArchKind::Encoder => !crate::measure::embedding::split_sentences(text).is_empty(),
    })
}

/// The workload's sequences fit the model: latency prompts with their generated tokens,
/// evaluation chunks, and each generation prompt with its continuation.
fn check_lengths(files: &ModelFiles, w: &Workload) -> Result<()> {
    if files.arch.kind == model::ArchKind::Encoder {
        return files.check_positions(w.prompt_len, "workload.prompt_len");
    }
    let latency = w.prompt_len.saturating_add(w.gen_len);
    files.check_positions(latency, "workload.prompt_len + gen_len")?;
    files.check_positions(w.context, "workload.context")?;
    for (i, prompt) in w.prompts.iter().enumerate() {
        let tokens = files.tokenizer.encode(prompt)?.len();
        files.check_positions(
            tokens.saturating_add(w.gen_len),
            &format!("workload.prompts[{i}] ({tokens} tokens) + gen_len"),
        )?;
    }
    Ok(())
}

impl Plan {
    /// Read, parse and validate the suite at `path`.
    pub fn load(path: &Path) -> Result<Plan> {
        let (text, suite) = super::read(path)?;
        Plan::from_suite(path, text, suite)
    }

    /// Validate a parsed suite.
    pub fn from_suite(path: &Path, text: String, suite: SuiteFile) -> Result<Plan> {
        let check = Checker { path };
        let base = path.parent().unwrap_or(Path::new("."));
        let name = suite.name.value.clone();
        if name.is_empty() || name.contains(['/', '\\']) {
            return Err(check.value(&suite.name, format!("name `{name}` must be non-empty, without slashes")));
        }
        if suite.models.is_empty() {
            return Err(check.at(0, "`models` is empty, expected at least one model".into()));
        }
        if suite.schemes.is_empty() {
            return Err(check.at(0, "`schemes` is empty, expected at least one scheme".into()));
        }
        let schemes = check.schemes(&suite.schemes)?;
        let workload = check.workload(&suite.workload, base)?;
        let models = check.models(&suite.models, base, &workload)?;
        let calibration = check.calibration(suite.calibration.as_ref(), base, &schemes, &models)?;
        let metrics = check.metrics(suite.metrics.as_deref())?;
        let device = check.device(suite.device.as_ref(), &models)?;
        if suite.repeats.value == 0 {
            return Err(check.value(&suite.repeats, "repeats is 0, expected at least 1".into()));
        }
        if let Some(t) = &suite.noise_threshold {
            if !(t.value > 0.0 && t.value < 1.0) {
                return Err(check.value(
                    t,
                    format!(
                        "noise_threshold is {}, expected a fraction between 0 and 1 (0.02 = 2%)",
                        t.value
                    ),
                ));
            }
        }
        let output = PathBuf::from(suite.output.clone().unwrap_or_else(|| format!("reports/{name}")));
        Ok(Plan {
            suite_path: path.to_path_buf(),
            suite_hash: crate::hash::sha256_hex(text.as_bytes()),
            suite_text: text,
            name,
            description: suite.description.clone(),
            noise_threshold: suite.noise_threshold.as_ref().map(|t| t.value),
            models,
            schemes,
            workload,
            calibration,
            metrics,
            device,
            repeats: suite.repeats.value as usize,
            warmup: suite.warmup as usize,
            seed: suite.seed,
            output,
        })
    }

    /// Case ids (`model/label`) in run order.
    pub fn case_ids(&self) -> Vec<String> {
        self.models
            .iter()
            .flat_map(|m| self.schemes.iter().map(move |s| format!("{}/{}", m.name, s.label)))
            .collect()
    }
}

struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    /// An error at `line` of the suite; line 0 (a value the suite left out, or the suite
    /// as a whole) names no line.
    fn at(&self, line: u64, message: String) -> Error {
        match line {
            0 => Error::SuiteSyntax { path: self.path.to_path_buf(), message },
            line => Error::SuiteValue { path: self.path.to_path_buf(), line, message },
        }
    }

    fn value<T>(&self, spanned: &Spanned<T>, message: String) -> Error {
        self.at(spanned.referenced.line(), message)
    }

    fn schemes(&self, entries: &[Spanned<SchemeEntry>]) -> Result<Vec<PlannedScheme>> {
        let mut out: Vec<PlannedScheme> = Vec::new();
        for entry in entries {
            let SchemeEntry { name, params } = &entry.value;
            let wrap = |e: Error| self.value(entry, e.to_string());
            let info = scheme::lookup(name).map_err(wrap)?;
            let params = info.validate_params(params.clone()).map_err(wrap)?;
            let label = params.text("label").unwrap_or(info.name).to_string();
            if out.iter().any(|s| s.label == label) {
                return Err(self.value(
                    entry,
                    format!("scheme label `{label}` is used twice; give one a distinct `label`"),
                ));
            }
            out.push(PlannedScheme { label, info, params });
        }
        Ok(out)
    }

    fn positive(&self, value: &Spanned<usize>, key: &str) -> Result<usize> {
        if value.value == 0 {
            return Err(self.value(value, format!("workload.{key} is 0, expected at least 1")));
        }
        Ok(value.value)
    }

    fn workload(&self, spec: &super::WorkloadSpec, base: &Path) -> Result<Workload> {
        let (eval_text, eval_source) = match &spec.eval_text {
            Some(file) => {
                let path = base.join(&file.value);
                let text = crate::files::read_text(&path)
                    .map_err(|e| self.value(file, format!("workload.eval_text {}: {e}", path.display())))?;
                (text, file.value.clone())
            }
            None => {
                return Err(self.at(
                    0,
                    "workload.eval_text is missing, expected a text file (relative to the suite) \
                     for the divergence and perplexity measurements"
                        .into(),
                ))
            }
        };
        let context = self.positive(&spec.context, "context")?;
        if context < 4 {
            return Err(
                self.value(&spec.context, format!("workload.context is {context}, expected at least 4"))
            );
        }
        let prompts = match &spec.prompts {
            None => DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect(),
            Some(list) if list.value.is_empty() => {
                return Err(self.value(
                    list,
                    "workload.prompts is empty, expected at least one prompt (or leave the key out \
                     for the built-in prompts)"
                        .into(),
                ))
            }
            Some(list) => list.value.clone(),
        };
        if let Some(i) = prompts.iter().position(|p| p.trim().is_empty()) {
            let line = spec.prompts.as_ref().map_or(0, |p| p.referenced.line());
            return Err(self.at(line, format!("workload.prompts[{i}] is empty, expected text")));
        }
        Ok(Workload {
            prompts,
            eval_text,
            eval_source,
            prompt_len: self.positive(&spec.prompt_len, "prompt_len")?,
            gen_len: self.positive(&spec.gen_len, "gen_len")?,
            batch_size: self.positive(&spec.batch_size, "batch_size")?,
            context,
            max_chunks: spec.max_chunks,
            reference_top_k: self.top_k(spec.reference_top_k.as_ref())?,
            batch_invariance: match &spec.batch_invariance {
                Some(rows) if rows.value < 2 => {
                    return Err(self.value(
                        rows,
                        format!("workload.batch_invariance is {}, expected at least 2 rows", rows.value),
                    ))
                }
                other => other.as_ref().map(|r| r.value),
            },
        })
    }

    fn top_k(&self, spec: Option<&Spanned<serde_json::Value>>) -> Result<Option<usize>> {
        let Some(spec) = spec else { return Ok(Some(DEFAULT_REFERENCE_TOP_K)) };
        match &spec.value {
            serde_json::Value::String(s) if s == "full" => Ok(None),
            serde_json::Value::Number(n) if n.as_u64().is_some_and(|k| k >= 1) => {
                Ok(Some(n.as_u64().expect("checked") as usize))
            }
            other => Err(self.value(
                spec,
                format!("workload.reference_top_k is {other}, expected a count of at least 1 or `full`"),
            )),
        }
    }

    fn models(
        &self,
        entries: &[super::ModelEntry],
        base: &Path,
        workload: &Workload,
    ) -> Result<Vec<PlannedModel>> {
        let mut out: Vec<PlannedModel> = Vec::new();
        for entry in entries {
            let name = entry.name.value.clone();
            if name.is_empty() || name.contains(['/', '\\']) || out.iter().any(|m| m.name == name) {
                return Err(self.value(
                    &entry.name,
                    format!("model name `{name}` must be unique, non-empty, without slashes"),
                ));
            }
            // `None`: `auto`, the checkpoint's own precision, known once its files are open.
            let dtype = match &entry.dtype {
                None => None,
                Some(at) => FloatStorage::parse_dtype(&at.value).ok_or_else(|| {
                    self.value(
                        at,
                        format!(
                            "model {name}: dtype `{}`, expected one of: {}",
                            at.value,
                            FloatStorage::dtype_names()
                        ),
                    )
                })?,
            };
            let context = |e: Error| self.value(&entry.path, format!("model {name}: {}", e.chain_inline()));
            let (spec, dir, substitute) =
                match (model::resolve_model_path(&entry.path.value, base), &entry.fallback) {
                    (Ok(dir), _) => (entry.path.value.clone(), dir, None),
                    (Err(e), Some(fallback)) => {
                        let reason = e.chain_inline();
                        eprintln!(
                        "warning: model {name}: `{}` is unavailable ({reason}); running its fallback `{}` \
                         instead, and the reports say so",
                        entry.path.value, fallback.value
                    );
                        let fallback_context = |e: Error| {
                            self.value(fallback, format!("model {name}: fallback: {}", e.chain_inline()))
                        };
                        let dir =
                            model::resolve_model_path(&fallback.value, base).map_err(fallback_context)?;
                        let substitute = Substitute { requested: entry.path.value.clone(), reason };
                        (fallback.value.clone(), dir, Some(substitute))
                    }
                    (Err(e), None) => return Err(context(e)),
                };
            let files = ModelFiles::open(&dir).map_err(context)?;
            let tokens = files.tokenizer.encode(&workload.eval_text).map_err(context)?;
            if tokens.len() < workload.context {
                return Err(self.value(
                    &entry.path,
                    format!(
                        "model {name}: the evaluation text is {} tokens, fewer than workload.context ({})",
                        tokens.len(),
                        workload.context
                    ),
                ));
            }
            check_lengths(&files, workload).map_err(context)?;
            let dtype = match dtype {
                Some(dtype) => dtype,
                None => files.stored_precision().map_err(context)?,
            };
            out.push(PlannedModel { name, spec, dtype, files, reference: None, substitute });
        }
        for (i, entry) in entries.iter().enumerate() {
            if let Some(other) = &entry.reference {
                out[i].reference = Some(self.reference(other, i, &out)?);
            }
        }
        Ok(out)
    }

    /// Resolve model `i`'s `reference:` to another model with the same tokenizer.
    fn reference(&self, name: &Spanned<String>, i: usize, models: &[PlannedModel]) -> Result<usize> {
        let this = &models[i];
        let Some(j) = models.iter().position(|m| m.name == name.value) else {
            let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
            return Err(self.value(
                name,
                format!(
                    "model {}: reference `{}` is not a model of this suite, expected one of: {}",
                    this.name,
                    name.value,
                    names.join(", ")
                ),
            ));
        };
        if j == i {
            return Err(self.value(
                name,
                format!("model {}: reference names the model itself; leave it out for that", this.name),
            ));
        }
        let other = &models[j];
        if other.files.tokenizer.fingerprint() != this.files.tokenizer.fingerprint() {
            return Err(self.value(
                name,
                format!(
                    "model {}: its tokenizer differs from reference {}'s (sha256 {} vs {}); divergence \
                     needs both to read the same tokens",
                    this.name,
                    other.name,
                    this.files.tokenizer.fingerprint(),
                    other.files.tokenizer.fingerprint()
                ),
            ));
        }
        let vocab = |m: &PlannedModel| m.files.config.get("vocab_size").and_then(|v| v.as_u64());
        if let (Some(a), Some(b)) = (vocab(this), vocab(other)) {
            if a != b {
                return Err(self.value(
                    name,
                    format!(
                        "model {}: its vocabulary is {a} tokens, reference {}'s is {b}; divergence needs \
                         both to score the same tokens",
                        this.name, other.name
                    ),
                ));
            }
        }
        Ok(j)
    }

    fn calibration(
        &self,
        spec: Option<&super::CalibrationSpec>,
        base: &Path,
        schemes: &[PlannedScheme],
        models: &[PlannedModel],
    ) -> Result<Option<CalibrationData>> {
        let needing: Vec<&str> =
            schemes.iter().filter(|s| s.info.needs_calibration).map(|s| s.label.as_str()).collect();
        let Some(spec) = spec else {
            if needing.is_empty() {
                return Ok(None);
            }
            return Err(self.at(
                0,
                format!(
                    "schemes {} need calibration data: add `calibration: {{text: FILE, samples: N}}` \
                     (a text file relative to the suite, and the token rows recorded per layer)",
                    needing.join(", ")
                ),
            ));
        };
        let path = base.join(&spec.text.value);
        let text = crate::files::read_text(&path)
            .map_err(|e| self.value(&spec.text, format!("calibration.text {}: {e}", path.display())))?;
        if spec.samples.value == 0 {
            return Err(self.value(&spec.samples, "calibration.samples is 0, expected at least 1".into()));
        }
        if !needing.is_empty() {
            for model in models {
                if !calibration_has_rows(&model.files, &text)? {
                    return Err(self.value(
                        &spec.text,
                        format!(
                            "calibration.text {} gives model {} no tokens to calibrate on, expected text",
                            path.display(),
                            model.name
                        ),
                    ));
                }
            }
        }
        let samples = spec.samples.value;
        let sha256 = crate::hash::sha256_hex(format!("{samples}\n{text}").as_bytes());
        Ok(Some(CalibrationData { text, source: spec.text.value.clone(), samples, sha256 }))
    }

    fn metrics(&self, names: Option<&[Spanned<String>]>) -> Result<BTreeSet<MetricGroup>> {
        let Some(names) = names else {
            return Ok(MetricGroup::ALL.into_iter().collect());
        };
        names.iter().map(|n| measure::resolve_metric(&n.value).map_err(|m| self.value(n, m))).collect()
    }

    /// The device the cases run on. Encoders have no CUDA forward pass yet: `auto` stays
    /// on the CPU for a suite holding one, and `cuda` is refused naming it.
    fn device(&self, device: Option<&Spanned<String>>, models: &[PlannedModel]) -> Result<Device> {
        let encoder = models.iter().find(|m| m.files.arch.kind == crate::model::ArchKind::Encoder);
        let Some(spanned) = device else {
            let device = backend::resolve(DeviceRequest::Auto).map_err(|e| self.at(0, e.to_string()))?;
            return Ok(if encoder.is_some() { Device::Cpu } else { device });
        };
        let request: DeviceRequest =
            spanned.value.parse().map_err(|e: DeviceError| self.value(spanned, e.to_string()))?;
        let device = backend::resolve(request).map_err(|e| self.value(spanned, e.to_string()))?;
        match (device, encoder) {
            (Device::Cuda, Some(m)) if request == DeviceRequest::Cuda => Err(self.value(
                spanned,
                format!(
                    "device `cuda`: model `{}` is an encoder ({}), which has no CUDA forward pass yet; \
                     use `cpu` or `auto`",
                    m.name, m.files.arch.name
                ),
            )),
            (Device::Cuda, Some(_)) => Ok(Device::Cpu),
            _ => Ok(device),
        }
    }
}

impl Error {
    /// The error and its causes on one line (for nesting inside another message).
    pub fn chain_inline(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            out.push_str(": ");
            out.push_str(&cause.to_string());
            source = cause.source();
        }
        out
    }
}
