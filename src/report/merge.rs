//! `bench merge`: the shards of one suite (`bench run --shard I/N` on many machines) made
//! into one results file, refusing shards that did not measure the same thing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::measure::results::{ModelRecord, Provenance, Results, ShardRecord};

/// The merged results and what they lack.
#[derive(Debug)]
pub struct Merged {
    /// One results file: the suite's cases in suite order, every shard's record (with the
    /// machine it ran on) under `shards`.
    pub results: Results,
    /// Planned cases no shard has (only with `allow_partial`).
    pub missing: Vec<String>,
}

/// Merge shard results read from `inputs` (path, results). Refused, naming the field and
/// both files, when two shards differ in suite, workload, bench revision, model or
/// partition; when a shard or a case appears twice; and, unless `allow_partial`, when a
/// planned case is missing.
pub fn merge(inputs: Vec<(PathBuf, Results)>, allow_partial: bool) -> Result<Merged> {
    if inputs.is_empty() {
        return Err(Error::Merge("bench merge needs at least one shard's results".into()));
    }
    for (path, results) in &inputs {
        if results.shards.is_empty() {
            return Err(refusal(
                path,
                "is not a shard: it has no `shards` record (run it with `bench run --shard I/N`)".into(),
            ));
        }
    }
    let mut inputs = inputs;
    inputs.sort_by_key(|(_, r)| r.shards.iter().map(|s| s.index).min());
    let (first_path, first) = &inputs[0];
    for (path, results) in &inputs[1..] {
        check_same_run(first_path, first, path, results)?;
    }
    let shards = collect_shards(&inputs)?;
    let planned = &shards[0].planned;
    let models = collect_models(&inputs)?;
    let mut by_id = BTreeMap::new();
    for (path, results) in &inputs {
        for case in &results.cases {
            if let Some((other, _)) = by_id.insert(case.id.clone(), (path.clone(), case.clone())) {
                return Err(refusal(
                    path,
                    format!("case {} is also in {}: shards must not overlap", case.id, other.display()),
                ));
            }
        }
    }
    let missing: Vec<String> = planned.iter().filter(|id| !by_id.contains_key(*id)).cloned().collect();
    if !missing.is_empty() && !allow_partial {
        return Err(Error::Merge(missing_message(&missing, &shards, planned.len())));
    }
    let position = |id: &str| planned.iter().position(|p| p == id).unwrap_or(usize::MAX);
    let mut cases: Vec<_> = by_id.into_values().map(|(_, case)| case).collect();
    cases.sort_by_key(|c| position(&c.id));
    let kept: BTreeSet<&str> = cases.iter().map(|c| c.model.as_str()).collect();
    let models = models.into_iter().filter(|m| kept.contains(m.name.as_str())).collect();
    let results = Results {
        schema_version: first.schema_version,
        suite: first.suite.clone(),
        provenance: shards[0].provenance.clone(),
        workload: first.workload.clone(),
        models,
        cases,
        shards,
    };
    Ok(Merged { results, missing })
}

fn refusal(path: &Path, message: String) -> Error {
    Error::Results { path: path.to_path_buf(), message }
}

/// Suite, workload and build must be the same in every shard.
fn check_same_run(first_path: &Path, first: &Results, path: &Path, results: &Results) -> Result<()> {
    let differs = |field: &str, theirs: &str, ours: &str| {
        refusal(
            path,
            format!(
                "{field} is {theirs}, but {} has {ours}: only shards of one run can be merged",
                first_path.display()
            ),
        )
    };
    if results.suite.sha256 != first.suite.sha256 {
        let name = |r: &Results| format!("{} (sha256 {})", r.suite.name, r.suite.sha256);
        return Err(differs("suite", &name(results), &name(first)));
    }
    if results.workload.sha256 != first.workload.sha256 {
        let fields = first.workload.differences(&results.workload).join(", ");
        return Err(differs("workload", &format!("another (it differs in {fields})"), "this suite's"));
    }
    for shard in results.shards.iter().chain(&first.shards) {
        let (ours, theirs) = (&first.shards[0].provenance, &shard.provenance);
        if (&theirs.bench_version, &theirs.git_revision) != (&ours.bench_version, &ours.git_revision) {
            let build = |p: &Provenance| format!("{} {}", p.bench_version, p.git_revision);
            return Err(differs(
                &format!("the bench revision of shard {}/{}", shard.index, shard.count),
                &build(theirs),
                &build(ours),
            ));
        }
    }
    Ok(())
}

/// Every shard record, sorted, checked to share one partition with no index twice.
fn collect_shards(inputs: &[(PathBuf, Results)]) -> Result<Vec<ShardRecord>> {
    let mut seen: BTreeMap<usize, &Path> = BTreeMap::new();
    let mut shards = Vec::new();
    let (first_path, first) = (&inputs[0].0, &inputs[0].1.shards[0]);
    for (path, results) in inputs {
        for shard in &results.shards {
            if shard.count != first.count {
                return Err(refusal(
                    path,
                    format!(
                        "shard {}/{} is one of {} shards, but {} is one of {}",
                        shard.index,
                        shard.count,
                        shard.count,
                        first_path.display(),
                        first.count
                    ),
                ));
            }
            if shard.planned != first.planned {
                return Err(refusal(
                    path,
                    format!(
                        "shard {}/{} shared out other cases than {} ({} against {}): was --filter the same?",
                        shard.index,
                        shard.count,
                        first_path.display(),
                        shard.planned.len(),
                        first.planned.len()
                    ),
                ));
            }
            if let Some(other) = seen.insert(shard.index, path) {
                return Err(refusal(
                    path,
                    format!("shard {}/{} is also in {}", shard.index, shard.count, other.display()),
                ));
            }
            shards.push(shard.clone());
        }
    }
    shards.sort_by_key(|s| s.index);
    Ok(shards)
}

/// Each model's record, once, refusing a model whose files or tokenizer differ between
/// shards.
fn collect_models(inputs: &[(PathBuf, Results)]) -> Result<Vec<ModelRecord>> {
    let mut models: Vec<(&Path, ModelRecord)> = Vec::new();
    for (path, results) in inputs {
        for model in &results.models {
            match models.iter().find(|(_, m)| m.name == model.name) {
                None => models.push((path, model.clone())),
                Some((other, kept)) => {
                    let fields = [
                        ("model_sha256", &kept.model_sha256, &model.model_sha256),
                        ("tokenizer_sha256", &kept.tokenizer_sha256, &model.tokenizer_sha256),
                        ("dtype", &kept.dtype, &model.dtype),
                        ("reference", &kept.reference, &model.reference),
                    ];
                    if let Some((field, ours, theirs)) = fields.iter().find(|(_, a, b)| a != b) {
                        return Err(refusal(
                            path,
                            format!(
                                "model {} has {field} {theirs}, but {} has {ours}: the shards measured \
                                 different files",
                                model.name,
                                other.display()
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok(models.into_iter().map(|(_, m)| m).collect())
}

fn missing_message(missing: &[String], shards: &[ShardRecord], planned: usize) -> String {
    let count = shards[0].count;
    let present: BTreeSet<usize> = shards.iter().map(|s| s.index).collect();
    let absent: Vec<String> =
        (1..=count).filter(|i| !present.contains(i)).map(|i| format!("{i}/{count}")).collect();
    let shards_note =
        if absent.is_empty() { String::new() } else { format!(" (shards not given: {})", absent.join(", ")) };
    format!(
        "{} of the {planned} planned cases are missing{shards_note}: {}; pass --allow-partial to merge \
         what there is",
        missing.len(),
        missing.join(", ")
    )
}
