//! The runner: a validated [`Plan`] becomes cases (model × scheme), each measured and
//! appended to results.json as soon as it finishes.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result, ResultExt};
use crate::measure::divergence::{self, Reference};
use crate::measure::latency::Stats;
use crate::measure::MetricGroup;
use crate::model::generate::greedy;
use crate::model::weights::WeightStore;
use crate::model::{CausalLm, Logits, QuantizeFactory, ReloadFactory};
use crate::report::results::{
    CaseResult, Disk, Generation, Latency, Memory, ModelRecord, Provenance, Results, SuiteRecord,
    WorkloadRecord, SCHEMA_VERSION,
};
use crate::report::table;
use crate::scheme::{self, FloatStorage, Scheme, TensorRole};
use crate::suite::plan::{sha256_file, sha256_hex};
use crate::suite::{Plan, PlannedModel, PlannedScheme};
use crate::tensor;

/// Command-line choices that shape a run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Output folder (default: the suite's `output`).
    pub out: Option<PathBuf>,
    /// Keep finished cases of an earlier run and skip them.
    pub resume: bool,
    /// Run only cases whose id (`model/label`) matches (`*` wildcards, else substring).
    pub filter: Option<String>,
    /// Keep the saved quantized models under `OUT/models/`.
    pub keep_models: bool,
}

/// The coefficient of variation above which timings are called noisy.
const NOISY_CV: f64 = 0.05;

/// Run the plan. Returns the results, also written to `OUT/results.json` after every case.
pub fn run(plan: &Plan, options: &RunOptions) -> Result<(PathBuf, Results)> {
    let out = options.out.clone().unwrap_or_else(|| plan.output.clone());
    let results_path = out.join("results.json");
    let previous = previous_cases(&results_path, options.resume)?;
    if !options.resume && results_path.is_file() {
        eprintln!("note: replacing {} (pass --resume to keep its finished cases)", results_path.display());
    }
    let workload = workload_record(plan);
    let mut progress = Progress::new(count_selected(plan, options));
    let mut results = Results {
        schema_version: SCHEMA_VERSION,
        suite: SuiteRecord {
            name: plan.name.clone(),
            path: plan.suite_path.display().to_string(),
            sha256: plan.suite_hash.clone(),
            text: plan.suite_text.clone(),
        },
        provenance: Provenance::collect(),
        workload,
        models: Vec::new(),
        cases: Vec::new(),
    };
    for model in &plan.models {
        let ids: Vec<String> = plan.schemes.iter().map(|s| format!("{}/{}", model.name, s.label)).collect();
        let wanted = |id: &String| selected(id, options.filter.as_deref()) || previous.contains_key(id);
        if !ids.iter().any(wanted) {
            continue;
        }
        progress.note(&format!("{}: hashing model files", model.name));
        let record = model_record(model, &plan.workload)?;
        // The model's record goes in first, so results written after each case are whole.
        results.models.push(record.clone());
        let mut runner: Option<ModelRunner> = None;
        for (planned, id) in plan.schemes.iter().zip(ids) {
            let spec = case_spec_hash(plan, &record, &results.workload, planned);
            let chosen = selected(&id, options.filter.as_deref());
            // With --resume, finished cases stay in the results whether or not the filter
            // selects them; a filtered run must not drop earlier work.
            if let Some(done) = previous.get(&id).filter(|c| c.spec_sha256 == spec) {
                if chosen {
                    progress.skip(&id);
                }
                results.cases.push(done.clone());
                continue;
            }
            if !chosen {
                continue;
            }
            if runner.is_none() {
                progress.note(&format!("{}: reference pass", model.name));
                runner =
                    Some(ModelRunner::new(plan, model).with_context(|| format!("model {}", model.name))?);
            }
            let runner = runner.as_ref().expect("set above");
            progress.start(&id);
            let case = runner
                .run_case(planned, &id, spec, &out, options.keep_models, &mut progress)
                .with_context(|| format!("case {id}"))?;
            results.cases.push(case);
            progress.finish(&id);
            results.write(&results_path)?;
        }
    }
    results.write(&results_path)?;
    table::write_tables(&results, &out)?;
    progress.done();
    Ok((out, results))
}

fn previous_cases(path: &Path, resume: bool) -> Result<BTreeMap<String, CaseResult>> {
    if !resume || !path.is_file() {
        return Ok(BTreeMap::new());
    }
    let previous = Results::read(path).with_context(|| "--resume needs the earlier results.json".into())?;
    Ok(previous.cases.into_iter().map(|c| (c.id.clone(), c)).collect())
}

fn count_selected(plan: &Plan, options: &RunOptions) -> usize {
    plan.case_ids().iter().filter(|id| selected(id, options.filter.as_deref())).count()
}

/// Whether case `id` passes the filter: a pattern with `*` must match the whole id, one
/// without is a substring.
pub fn selected(id: &str, filter: Option<&str>) -> bool {
    let Some(pattern) = filter else { return true };
    if !pattern.contains('*') {
        return id.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !id.starts_with(first) || !id[first.len()..].ends_with(last) || id.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &id[first.len()..id.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

fn workload_record(plan: &Plan) -> WorkloadRecord {
    let w = &plan.workload;
    let mut record = WorkloadRecord {
        prompts: w.prompts.clone(),
        eval_source: w.eval_source.clone(),
        eval_sha256: sha256_hex(w.eval_text.as_bytes()),
        prompt_len: w.prompt_len,
        gen_len: w.gen_len,
        batch_size: w.batch_size,
        context: w.context,
        max_chunks: w.max_chunks,
        repeats: plan.repeats,
        warmup: plan.warmup,
        seed: plan.seed,
        sha256: String::new(),
    };
    record.sha256 = sha256_hex(serde_json::to_string(&record).expect("record serialises").as_bytes());
    record
}

fn model_record(model: &PlannedModel, workload: &crate::suite::Workload) -> Result<ModelRecord> {
    let files = &model.files;
    let summary = files.summary()?;
    let config_path = files.config.path();
    let mut model_hash = Vec::new();
    for path in std::iter::once(config_path).chain(files.store.paths()) {
        model_hash.extend(sha256_file(path)?.into_bytes());
    }
    let tokenizer_sha256 = sha256_file(files.tokenizer.path())?;
    Ok(ModelRecord {
        name: model.name.clone(),
        path: model.spec.clone(),
        arch: summary.arch,
        dtype: storage_name(model.dtype).into(),
        parameters: summary.parameters,
        linear_parameters: summary.linear_parameters,
        model_sha256: sha256_hex(&model_hash),
        tokenizer_sha256,
        eval_tokens: files.tokenizer.encode(&workload.eval_text)?.len(),
    })
}

fn storage_name(s: FloatStorage) -> &'static str {
    match s {
        FloatStorage::F32 => "f32",
        FloatStorage::F16 => "f16",
        FloatStorage::BF16 => "bf16",
    }
}

fn case_spec_hash(
    plan: &Plan,
    model: &ModelRecord,
    workload: &WorkloadRecord,
    scheme: &PlannedScheme,
) -> String {
    let metrics: Vec<&str> = plan.metrics.iter().map(|m| m.name()).collect();
    let spec = serde_json::json!({
        "model": model.model_sha256, "tokenizer": model.tokenizer_sha256, "dtype": model.dtype,
        "scheme": scheme.info.name, "params": scheme.params, "workload": workload.sha256,
        "metrics": metrics, "device": plan.device,
    });
    sha256_hex(spec.to_string().as_bytes())
}

/// Everything shared by the cases of one model: the reference outputs.
struct ModelRunner<'p> {
    plan: &'p Plan,
    model: &'p PlannedModel,
    eval_tokens: Vec<u32>,
    reference: Option<Reference>,
    prompt_ids: Vec<Vec<u32>>,
    reference_generations: Vec<Vec<u32>>,
}

impl<'p> ModelRunner<'p> {
    fn new(plan: &'p Plan, model: &'p PlannedModel) -> Result<Self> {
        let tokenizer = &model.files.tokenizer;
        let eval_tokens = tokenizer.encode(&plan.workload.eval_text)?;
        let prompt_ids =
            plan.workload.prompts.iter().map(|p| tokenizer.encode(p)).collect::<Result<Vec<_>>>()?;
        let fp32 = (scheme::lookup("fp32")?.build)(&Default::default())?;
        let reference_model = model.files.build(&mut QuantizeFactory::new(
            &model.files.store,
            model.dtype,
            fp32.as_ref(),
            false,
        ))?;
        let mut runner = ModelRunner {
            plan,
            model,
            eval_tokens,
            reference: None,
            prompt_ids,
            reference_generations: Vec::new(),
        };
        if plan.metrics.contains(&MetricGroup::Divergence) {
            let chunks = runner.chunks();
            runner.reference = Some(divergence::reference(reference_model.as_ref(), &chunks)?);
        }
        if plan.metrics.contains(&MetricGroup::Generation) {
            runner.reference_generations = runner
                .prompt_ids
                .iter()
                .map(|ids| greedy(reference_model.as_ref(), ids, plan.workload.gen_len, false).map(|g| g.ids))
                .collect::<Result<_>>()?;
        }
        Ok(runner)
    }

    fn chunks(&self) -> Vec<&[u32]> {
        divergence::chunks(&self.eval_tokens, self.plan.workload.context, self.plan.workload.max_chunks)
    }

    fn run_case(
        &self,
        planned: &PlannedScheme,
        id: &str,
        spec: String,
        out: &Path,
        keep_models: bool,
        progress: &mut Progress,
    ) -> Result<CaseResult> {
        let started = Instant::now();
        let metrics = &self.plan.metrics;
        let scheme = (planned.info.build)(&planned.params)?;
        let quantize_head = planned.params.bool("quantize_head", false);
        progress.step("quantize");
        let t = Instant::now();
        let files = &self.model.files;
        let model = files.build(&mut QuantizeFactory::new(
            &files.store,
            self.model.dtype,
            scheme.as_ref(),
            quantize_head,
        ))?;
        let quantize_s = t.elapsed().as_secs_f64();

        let exported = model.export();
        let mut warnings = Vec::new();
        let memory = self.memory(&exported)?;
        let mut load_s = None;
        let disk = if metrics.contains(&MetricGroup::Disk) {
            progress.step("save and reload");
            let (disk, seconds) = self.disk(
                model.as_ref(),
                &exported,
                planned,
                scheme.as_ref(),
                id,
                out,
                keep_models,
                &memory,
            )?;
            load_s = Some(seconds);
            Some(disk)
        } else {
            None
        };
        drop(exported);
        let latency = if metrics.contains(&MetricGroup::Latency) {
            progress.step("latency");
            Some(self.latency(model.as_ref(), quantize_s, load_s, &mut warnings)?)
        } else {
            None
        };
        let divergence = match &self.reference {
            Some(reference) => {
                progress.step("divergence");
                Some(divergence::measure(model.as_ref(), &self.chunks(), reference)?)
            }
            None => None,
        };
        let generation = if metrics.contains(&MetricGroup::Generation) {
            progress.step("generation");
            Some(self.generation(model.as_ref())?)
        } else {
            None
        };
        Ok(CaseResult {
            id: id.to_string(),
            model: self.model.name.clone(),
            scheme: planned.info.name.to_string(),
            label: planned.label.clone(),
            params: planned.params.0.clone(),
            device: self.plan.device.to_string(),
            kernels: model.kernels().into_iter().map(String::from).collect(),
            spec_sha256: spec,
            git_revision: crate::report::results::git_revision().to_string(),
            elapsed_s: started.elapsed().as_secs_f64(),
            memory: metrics.contains(&MetricGroup::Memory).then_some(memory),
            disk,
            latency,
            divergence,
            generation,
            warnings,
        })
    }

    fn memory(&self, exported: &[scheme::StoredTensor]) -> Result<Memory> {
        let parameters = self.model.files.summary()?.parameters;
        let mut by_role: BTreeMap<String, u64> =
            TensorRole::ALL.iter().map(|r| (r.name().to_string(), 0)).collect();
        let (mut weight_bytes, mut quantized_weights) = (0u64, 0u64);
        for t in exported {
            *by_role.get_mut(t.role.name()).expect("every role listed") += t.bytes.len() as u64;
            if t.role.is_weight_representation() {
                weight_bytes += t.bytes.len() as u64;
                quantized_weights += t.represents as u64;
            }
        }
        let total_bytes: u64 = by_role.values().sum();
        Ok(Memory {
            bytes_by_role: by_role,
            total_bytes,
            quantized_weights,
            bits_per_weight: 8.0 * weight_bytes as f64 / quantized_weights.max(1) as f64,
            bytes_per_parameter: total_bytes as f64 / parameters.max(1) as f64,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn disk(
        &self,
        model: &dyn CausalLm,
        exported: &[scheme::StoredTensor],
        planned: &PlannedScheme,
        scheme: &dyn Scheme,
        id: &str,
        out: &Path,
        keep: bool,
        memory: &Memory,
    ) -> Result<(Disk, f64)> {
        let dir = out.join("models");
        let path = dir.join(format!("{}.safetensors", id.replace('/', "__")));
        let metadata = BTreeMap::from([
            ("quantbench.format_version".to_string(), "1".to_string()),
            ("quantbench.scheme".to_string(), planned.info.name.to_string()),
            (
                "quantbench.params".to_string(),
                serde_json::to_string(&planned.params).expect("params serialise"),
            ),
            ("quantbench.arch".to_string(), self.model.files.arch.name.to_string()),
        ]);
        let bytes = crate::model::weights::save(&path, exported, metadata)?;
        let t = Instant::now();
        let store = WeightStore::open_files(std::slice::from_ref(&path))?;
        let quantize_head = planned.params.bool("quantize_head", false);
        let reloaded = self.model.files.build(&mut ReloadFactory::new(&store, scheme, quantize_head))?;
        let load_s = t.elapsed().as_secs_f64();
        let probe = &self.eval_tokens[..self.plan.workload.context.min(self.eval_tokens.len())];
        let run = |m: &dyn CausalLm| m.forward(probe, 1, &mut m.new_cache(1, probe.len()), Logits::All);
        let (a, b) = (run(model)?, run(reloaded.as_ref())?);
        let identical = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        drop((reloaded, store));
        if !keep {
            std::fs::remove_file(&path).map_err(|e| Error::io("cannot remove", &path, e))?;
            let _ = std::fs::remove_dir(&dir);
        }
        if !identical {
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            return Err(Error::Case {
                case: id.to_string(),
                message: format!(
                    "the model reloaded from {} differs from the original (max |Δlogit| {diff})",
                    path.display()
                ),
            });
        }
        let disk = Disk {
            bytes,
            bytes_over_memory: bytes as f64 / memory.total_bytes as f64,
            reload_identical: true,
        };
        Ok((disk, load_s))
    }

    /// The latency prompt: the workload's prompts tokenized, concatenated and cycled, each
    /// sequence of the batch starting at a different offset.
    fn latency_tokens(&self) -> Vec<u32> {
        let all: Vec<u32> = self.prompt_ids.iter().flatten().copied().collect();
        let w = &self.plan.workload;
        let n = all.len();
        (0..w.batch_size)
            .flat_map(|b| (0..w.prompt_len).map(move |i| (b * 7 + i) % n))
            .map(|i| all[i])
            .collect()
    }

    fn latency(
        &self,
        model: &dyn CausalLm,
        quantize_s: f64,
        load_s: Option<f64>,
        warnings: &mut Vec<String>,
    ) -> Result<Latency> {
        let w = &self.plan.workload;
        let tokens = self.latency_tokens();
        let vocab = model.vocab_size();
        let (mut prefill_ms, mut decode_ms) = (Vec::new(), Vec::new());
        for run in 0..self.plan.warmup + self.plan.repeats {
            let timed = run >= self.plan.warmup;
            let mut cache = model.new_cache(w.batch_size, w.prompt_len + w.gen_len);
            let t = Instant::now();
            let mut logits = model.forward(&tokens, w.batch_size, &mut cache, Logits::Last)?;
            if timed {
                prefill_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            for _ in 0..w.gen_len {
                let next: Vec<u32> =
                    logits.chunks_exact(vocab).map(|row| tensor::argmax(row) as u32).collect();
                let t = Instant::now();
                logits = model.forward(&next, w.batch_size, &mut cache, Logits::Last)?;
                if timed {
                    decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let prefill = Stats::of(&prefill_ms).expect("repeats ≥ 1");
        let decode = Stats::of(&decode_ms).expect("gen_len ≥ 1");
        for (name, stats) in [("prefill", &prefill), ("decode", &decode)] {
            if stats.cv() > NOISY_CV {
                warnings.push(format!(
                    "{name} timings vary by {:.1}% (coefficient of variation over {} samples); \
                     close other programs, raise `repeats`, or raise `warmup` if the first runs are slow",
                    100.0 * stats.cv(),
                    stats.n
                ));
            }
        }
        Ok(Latency {
            quantize_s,
            load_s,
            decode_tokens_per_s: w.batch_size as f64 * 1e3 / decode.median,
            prefill_ms,
            prefill,
            decode_ms,
            decode,
            batch_size: w.batch_size,
            prompt_len: w.prompt_len,
            gen_len: w.gen_len,
        })
    }

    fn generation(&self, model: &dyn CausalLm) -> Result<Vec<Generation>> {
        let tokenizer = &self.model.files.tokenizer;
        self.prompt_ids
            .iter()
            .zip(&self.reference_generations)
            .zip(&self.plan.workload.prompts)
            .map(|((ids, reference), prompt)| {
                let ids = greedy(model, ids, self.plan.workload.gen_len, false)?.ids;
                Ok(Generation {
                    prompt: prompt.clone(),
                    text: tokenizer.decode(&ids)?,
                    reference_text: tokenizer.decode(reference)?,
                    first_divergent_token: ids.iter().zip(reference).position(|(a, b)| a != b),
                    ids,
                    reference_ids: reference.clone(),
                })
            })
            .collect()
    }
}

/// Progress on stderr: a live line with the current case and an ETA on a terminal,
/// plain log lines otherwise (CI logs).
pub struct Progress {
    total: usize,
    finished: usize,
    measured: usize,
    started: Instant,
    case: String,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress {
            total,
            finished: 0,
            measured: 0,
            started: Instant::now(),
            case: String::new(),
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn eta(&self) -> String {
        if self.measured == 0 {
            return String::new();
        }
        let per_case = self.started.elapsed().as_secs_f64() / self.measured as f64;
        format!(" · ETA {:.0}s", per_case * (self.total - self.finished) as f64)
    }

    fn line(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{text}");
        } else {
            let _ = writeln!(err, "{text}");
        }
        let _ = err.flush();
    }

    fn note(&self, text: &str) {
        self.line(&format!("[{}/{}] {text}", self.finished, self.total));
    }

    fn start(&mut self, id: &str) {
        self.case = id.to_string();
        self.step("start");
    }

    fn step(&mut self, what: &str) {
        let bar = if self.tty { self.bar() } else { String::new() };
        self.line(&format!(
            "{bar}[{}/{}] {} · {what}{}",
            self.finished + 1,
            self.total,
            self.case,
            self.eta()
        ));
    }

    /// `▕████░░░░░░▏ ` with one cell per 5% of the cases finished.
    fn bar(&self) -> String {
        const CELLS: usize = 20;
        let full = CELLS * self.finished / self.total.max(1);
        format!("▕{}{}▏ ", "█".repeat(full), "░".repeat(CELLS - full))
    }

    fn skip(&mut self, id: &str) {
        self.finished += 1;
        self.line(&format!(
            "[{}/{}] {id} · already in results.json (--resume), skipped",
            self.finished, self.total
        ));
        if self.tty {
            eprintln!();
        }
    }

    fn finish(&mut self, id: &str) {
        self.finished += 1;
        self.measured += 1;
        self.line(&format!(
            "[{}/{}] {id} · done in {:.1}s total",
            self.finished,
            self.total,
            self.started.elapsed().as_secs_f64()
        ));
        if self.tty {
            eprintln!();
        }
    }

    fn done(&self) {
        if self.tty {
            self.line("");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_substrings_and_globs() {
        assert!(selected("tiny/fp16", None));
        assert!(selected("tiny/fp16", Some("fp16")));
        assert!(!selected("tiny/fp16", Some("bf16")));
        assert!(selected("tiny/fp16", Some("tiny/*")));
        assert!(selected("tiny/fp16", Some("*16")));
        assert!(selected("tiny/fp16", Some("t*/f*6")));
        assert!(!selected("tiny/fp16", Some("*/bf*")));
        assert!(!selected("ab", Some("ab*ab")));
    }
}
