//! summary.md: the short report for a terminal or a CI job summary — one table per model
//! (scheme, bits per weight, memory, disk, prefill, decode tok/s, KLD, same top-1, PPL
//! ratio, worst layer), the provenance in one line, and the warnings.

use super::table::{self, SUMMARY_COLUMNS};
use crate::measure::results::Results;

/// The provenance in one line; a run merged from shards also says on how many machines.
pub fn provenance_line(results: &Results) -> String {
    let p = &results.provenance;
    let gpus = if p.gpus.is_empty() { String::new() } else { format!(" · GPU {}", p.gpus.join(", ")) };
    let line = format!(
        "bench {} ({}) · revision {} · {} · {} threads{gpus} · {}",
        p.bench_version, p.build_profile, p.git_revision, p.cpu, p.threads, p.started_at
    );
    match (&results.shards[..], machines(results).len()) {
        ([], _) => line,
        ([one], _) => format!("{line} · shard {}/{}", one.index, one.count),
        (shards, 1) => format!("{line} · {} shards on one machine", shards.len()),
        (shards, n) => format!(
            "{line} · {} shards on {n} machines (timings are per machine; see the provenance)",
            shards.len()
        ),
    }
}

/// The distinct machines that measured the run's cases ([`Provenance::machine`]), in
/// shard order.
///
/// [`Provenance::machine`]: crate::measure::results::Provenance::machine
pub fn machines(results: &Results) -> Vec<String> {
    let mut machines: Vec<String> = Vec::new();
    let all = results.shards.iter().map(|s| &s.provenance);
    for machine in all.chain(results.shards.is_empty().then_some(&results.provenance)).map(|p| p.machine()) {
        if !machines.contains(&machine) {
            machines.push(machine);
        }
    }
    machines
}

/// The whole summary.md.
pub fn markdown(results: &Results) -> String {
    let mut md = format!("# {}\n\n", results.suite.name);
    md.push_str(&format!("{}\n\n", provenance_line(results)));
    let w = &results.workload;
    md.push_str(&format!(
        "Workload: prompt {} tokens × batch {}, {} decode steps, {} repeats after {} warm-up; \
         divergence over {}-token chunks{}.\n",
        w.prompt_len,
        w.batch_size,
        w.gen_len,
        w.repeats,
        w.warmup,
        w.context,
        w.max_chunks.map_or(String::new(), |m| format!(" (at most {m})")),
    ));
    md.push_str(&model_tables(results));
    let warnings: Vec<String> = results
        .cases
        .iter()
        .flat_map(|c| c.warnings.iter().map(move |w| format!("- {}: {w}", c.id)))
        .collect();
    if !warnings.is_empty() {
        md.push_str("\n## Warnings\n\n");
        md.push_str(&warnings.join("\n"));
        md.push('\n');
    }
    md.push_str("\nAll columns: results.md and results.csv; charts and one card per scheme: index.html.\n");
    md
}

/// One table per model (a `## model` heading, a line about the model, the table with the
/// columns some case fills, withheld divergence): the body of summary.md, and what
/// `bench run` prints.
pub fn model_tables(results: &Results) -> String {
    let mut md = String::new();
    let columns = table::columns(SUMMARY_COLUMNS);
    for (model, cases) in table::cases_by_model(results) {
        md.push_str(&format!("\n## {model}\n\n"));
        if let Some(m) = results.models.iter().find(|m| m.name == model) {
            if let Some(note) = m.fallback_note() {
                md.push_str(&format!("**{note}**\n\n"));
            }
            md.push_str(&format!(
                "{}, {} parameters, reference {} ({}), {} evaluation tokens.\n\n",
                m.arch, m.parameters, m.reference, m.dtype, m.eval_tokens
            ));
        }
        let present = table::present_columns(&columns, &cases);
        md.push_str(&table::markdown_table(&cases, &present));
        let withheld: Vec<String> = cases
            .iter()
            .filter_map(|c| c.divergence.as_ref().and_then(|d| d.withheld.as_ref()).map(|r| (c, r)))
            .map(|(c, r)| format!("- {}: divergence withheld: {r}", c.label))
            .collect();
        if !withheld.is_empty() {
            md.push('\n');
            md.push_str(&withheld.join("\n"));
            md.push('\n');
        }
    }
    md
}
