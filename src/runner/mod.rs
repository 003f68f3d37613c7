//! The runner: a validated [`Plan`] becomes cases (model × scheme), each measured and
//! appended to results.json as soon as it finishes.

mod calibrate;
mod case;
pub mod lock;
mod progress;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, ResultExt};
use crate::hash::{sha256_file, sha256_hex};
use crate::measure::latency::{self, ClockSource};
use crate::measure::results::{
    CalibrationRecord, CaseResult, FallbackRecord, ModelRecord, Provenance, Results, ShardRecord,
    SuiteRecord, WorkloadRecord, SCHEMA_VERSION,
};
use crate::suite::{Plan, PlannedModel, PlannedScheme, Shard};

use case::{CaseOutput, ModelRunner};
use progress::Progress;

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
    /// Run only this part of the (filtered) cases: one machine of many.
    pub shard: Option<Shard>,
    /// Where divergence references are read from and stored (default `OUT/references/`):
    /// a folder shared by the shards, or one an earlier run filled.
    pub references: Option<PathBuf>,
    /// Where every timing of the run comes from (default: the wall clock); a test
    /// scripts it to check the whole path from a timed pass to results.json.
    pub clock: Option<ClockSource>,
}

/// Run the plan. Returns the results, also written to `OUT/results.json` after every case.
/// The work runs on a thread of the compute pool ([`crate::tensor::on_pool`]).
pub fn run(plan: &Plan, options: &RunOptions) -> Result<(PathBuf, Results)> {
    crate::tensor::on_pool(|| run_on_pool(plan, options))
}

fn run_on_pool(plan: &Plan, options: &RunOptions) -> Result<(PathBuf, Results)> {
    let out = options.out.clone().unwrap_or_else(|| plan.output.clone());
    let planned: Vec<String> =
        plan.case_ids().into_iter().filter(|id| selected(id, options.filter.as_deref())).collect();
    if let (Some(pattern), true) = (&options.filter, planned.is_empty()) {
        return Err(Error::Workload(format!(
            "--filter {pattern:?} matches none of the suite's cases, expected a substring of a case id or a \
             pattern with `*`; the cases are: {}",
            plan.case_ids().join(", ")
        )));
    }
    let assigned: Vec<String> = options.shard.map_or(&planned[..], |s| s.select(&planned)).to_vec();
    if let (Some(shard), true) = (options.shard, assigned.is_empty()) {
        eprintln!(
            "note: shard {shard} has no cases: the {} cases are shared out among {} shards",
            planned.len(),
            shard.count
        );
    }
    let chosen = |id: &str| assigned.iter().any(|a| a == id);
    let results_path = out.join("results.json");
    // Before any work: a second run into this folder fails here, naming this one.
    let _lock = lock::lock(&out)?;
    let workload = workload_record(plan);
    let previous = previous_cases(&results_path, options.resume, &workload)?;
    if !previous.is_empty() {
        crate::interrupt::record_kept(results_path.clone(), previous.len());
    }
    if !options.resume && results_path.is_file() {
        eprintln!("note: replacing {} (pass --resume to keep its finished cases)", results_path.display());
    }
    let mut progress = Progress::new(assigned.len());
    let provenance = provenance(plan)?;
    let shards = match options.shard {
        Some(shard) => vec![ShardRecord {
            index: shard.index,
            count: shard.count,
            planned: planned.clone(),
            cases: assigned.clone(),
            provenance: provenance.clone(),
        }],
        None => Vec::new(),
    };
    let reference_folder = options.references.clone().unwrap_or_else(|| out.join("references"));
    let mut results = Results {
        schema_version: SCHEMA_VERSION,
        suite: SuiteRecord {
            name: plan.name.clone(),
            path: plan.suite_path.display().to_string(),
            sha256: plan.suite_hash.clone(),
            text: plan.suite_text.clone(),
            description: plan.description.clone(),
            noise_threshold: plan.noise_threshold,
        },
        provenance,
        workload,
        models: Vec::new(),
        cases: Vec::new(),
        shards,
    };
    // Each model's files are hashed once, even when another model names it as reference.
    let mut hashes: BTreeMap<usize, String> = BTreeMap::new();
    let mut hash_of = |i: usize| -> Result<String> {
        if let Some(h) = hashes.get(&i) {
            return Ok(h.clone());
        }
        let h = model_sha256(&plan.models[i])?;
        hashes.insert(i, h.clone());
        Ok(h)
    };
    for (index, model) in plan.models.iter().enumerate() {
        let ids: Vec<String> = plan.schemes.iter().map(|s| format!("{}/{}", model.name, s.label)).collect();
        let wanted = |id: &String| chosen(id) || previous.contains_key(id);
        if !ids.iter().any(wanted) {
            continue;
        }
        progress.note(&format!("{}: hashing model files", model.name));
        let record = model_record(plan, model, hash_of(index)?)?;
        // The model's record goes in first, so results written after each case are whole.
        results.models.push(record.clone());
        let mut runner: Option<ModelRunner> = None;
        for (planned, id) in plan.schemes.iter().zip(ids) {
            let spec = case_spec_hash(plan, &record, &results.workload, planned);
            let this_run = chosen(&id);
            // With --resume, finished cases stay in the results whether or not the filter
            // (or the shard) selects them; a filtered run must not drop earlier work.
            match previous.get(&id) {
                Some(done) if done.spec_sha256 == spec => {
                    if this_run {
                        progress.skip(&id);
                    }
                    results.cases.push(done.clone());
                    continue;
                }
                Some(_) => {
                    eprintln!(
                    "note: {id}: the earlier result is {}: its model, scheme parameters, metrics or device \
                     differ from this run's",
                    if this_run { "replaced" } else { "dropped (--filter or --shard does not select the case)" }
                )
                }
                None => {}
            }
            if !this_run {
                continue;
            }
            if runner.is_none() {
                progress.note(&format!("{}: reference pass", model.name));
                let built = ModelRunner::new(
                    plan,
                    index,
                    &hash_of(model.reference.unwrap_or(index))?,
                    &reference_folder,
                )
                .with_context(|| format!("model {}", model.name))?
                .with_clock(options.clock.unwrap_or(latency::wall_clock));
                let record = results.models.last_mut().expect("pushed above");
                record.reference_cache = built.reference_cache.clone();
                record.input_limit = built.input_limit.clone();
                runner = Some(built);
            }
            let runner = runner.as_ref().expect("set above");
            progress.start(&id);
            let output = CaseOutput { dir: &out, keep_models: options.keep_models };
            let case = runner
                .run_case(planned, &id, spec, &output, &mut progress)
                .with_context(|| format!("case {id}"))?;
            case.check_finite()?;
            results.cases.push(case);
            progress.finish(&id);
            results.write(&results_path)?;
            crate::interrupt::record_kept(results_path.clone(), results.cases.len());
        }
    }
    results.write(&results_path)?;
    // Tables, summary, charts and the HTML page, all from the results just written.
    crate::report::render(&results, &out)?;
    progress.done();
    Ok((out, results))
}

/// The finished cases of the earlier run in `path`, with `--resume`. Refused when that
/// run measured another workload: resuming would drop all of its cases.
fn previous_cases(
    path: &Path,
    resume: bool,
    workload: &WorkloadRecord,
) -> Result<BTreeMap<String, CaseResult>> {
    if !resume || !path.is_file() {
        return Ok(BTreeMap::new());
    }
    let previous = Results::read(path).with_context(|| "--resume needs the earlier results.json".into())?;
    if previous.workload.sha256 != workload.sha256 {
        let fields = previous.workload.differences(workload);
        return Err(Error::Results {
            path: path.to_path_buf(),
            message: format!(
                "--resume: these results were measured with another workload (it differs in {}), so \
                 none of their {} cases can be kept; run without --resume to replace them, or pass \
                 another --out",
                fields.join(", "),
                previous.cases.len()
            ),
        });
    }
    Ok(previous.cases.into_iter().map(|c| (c.id.clone(), c)).collect())
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
        reference_top_k: w.reference_top_k,
        batch_invariance: w.batch_invariance,
        calibration: plan.calibration.as_ref().map(|c| CalibrationRecord {
            source: c.source.clone(),
            samples: c.samples,
            sha256: c.sha256.clone(),
        }),
        sha256: String::new(),
    };
    record.sha256 = sha256_hex(serde_json::to_string(&record).expect("record serialises").as_bytes());
    record
}

/// sha256 over a model's config and weight files.
fn model_sha256(model: &PlannedModel) -> Result<String> {
    let files = &model.files;
    // A GGUF file is its own config: hash each distinct file once.
    let mut paths = vec![files.config.path()];
    paths.extend(files.store.paths());
    paths.dedup();
    let mut model_hash = Vec::new();
    for path in paths {
        model_hash.extend(sha256_file(path)?.into_bytes());
    }
    Ok(sha256_hex(&model_hash))
}

fn model_record(plan: &Plan, model: &PlannedModel, model_sha256: String) -> Result<ModelRecord> {
    let (files, workload) = (&model.files, &plan.workload);
    let summary = files.summary()?;
    let tokenizer_sha256 = files.tokenizer.fingerprint().to_string();
    Ok(ModelRecord {
        name: model.name.clone(),
        path: model.spec.clone(),
        arch: summary.arch,
        dtype: model.dtype.name().into(),
        parameters: summary.parameters,
        linear_parameters: summary.linear_parameters,
        model_sha256,
        tokenizer_sha256,
        eval_tokens: files.tokenizer.encode(&workload.eval_text)?.len(),
        reference: model.reference.map_or_else(|| model.name.clone(), |j| plan.models[j].name.clone()),
        reference_cache: None,
        input_limit: None,
        fallback_for: model
            .substitute
            .as_ref()
            .map(|s| FallbackRecord { requested: s.requested.clone(), reason: s.reason.clone() }),
    })
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
        "metrics": metrics, "device": plan.device, "reference": model.reference,
    });
    sha256_hex(spec.to_string().as_bytes())
}

/// This build and machine, with the GPU when the plan runs on one.
fn provenance(plan: &Plan) -> Result<Provenance> {
    let mut p = Provenance::collect();
    if plan.device == crate::backend::Device::Cuda {
        let gpu = crate::backend::gpu_record()?;
        p.gpus = vec![gpu.name];
        p.gpu_driver = Some(gpu.driver);
        p.gpu_copy_gb_s = Some(gpu.copy_gb_s);
    }
    Ok(p)
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
