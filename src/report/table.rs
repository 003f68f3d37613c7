//! The results table (one row per model × scheme) as Markdown and CSV, from one column
//! list so the two never disagree.

use super::results::{CaseResult, LayerDivergence, Results};
use crate::error::{Error, Result};
use crate::measure::divergence::DivergenceStats;

/// One cell's value.
enum Cell {
    Text(String),
    /// A number and the decimals Markdown shows.
    Num(f64, usize),
    Int(u64),
    Missing,
}

struct Column {
    header: &'static str,
    value: fn(&CaseResult) -> Cell,
}

const MIB: f64 = 1024.0 * 1024.0;

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Cell) -> Cell {
    v.map_or(Cell::Missing, f)
}

/// A case's divergence statistics, when measured and not withheld.
fn stats(c: &CaseResult) -> Option<&DivergenceStats> {
    c.divergence.as_ref().and_then(|d| d.stats.as_ref())
}

/// The quantized linear layer with the lowest SQNR.
pub fn worst_layer(c: &CaseResult) -> Option<&LayerDivergence> {
    c.layers.iter().filter(|l| l.kind == "linear").min_by(|a, b| a.sqnr_db.total_cmp(&b.sqnr_db))
}

/// SQNR as printed: `inf` for identical outputs.
pub fn format_db(db: f64) -> String {
    if db.is_infinite() {
        "inf".into()
    } else {
        format!("{db:.1}")
    }
}

const COLUMNS: &[Column] = &[
    Column { header: "model", value: |c| Cell::Text(c.model.clone()) },
    Column { header: "scheme", value: |c| Cell::Text(c.label.clone()) },
    Column { header: "bits/weight", value: |c| opt(c.memory.as_ref(), |m| Cell::Num(m.bits_per_weight, 2)) },
    Column {
        header: "weights MiB",
        value: |c| opt(c.memory.as_ref(), |m| Cell::Num(m.total_bytes as f64 / MIB, 2)),
    },
    Column { header: "disk MiB", value: |c| opt(c.disk.as_ref(), |d| Cell::Num(d.bytes as f64 / MIB, 2)) },
    Column { header: "quantize s", value: |c| opt(c.latency.as_ref(), |l| Cell::Num(l.quantize_s, 3)) },
    Column { header: "prefill ms", value: |c| opt(c.latency.as_ref(), |l| Cell::Num(l.prefill.median, 2)) },
    Column {
        header: "prefill ±σ", value: |c| opt(c.latency.as_ref(), |l| Cell::Num(l.prefill.std_dev, 2))
    },
    Column {
        header: "decode ms/step",
        value: |c| opt(c.latency.as_ref().and_then(|l| l.decode.as_ref()), |d| Cell::Num(d.median, 3)),
    },
    Column {
        header: "tok/s",
        value: |c| opt(c.latency.as_ref().and_then(|l| l.decode_tokens_per_s), |t| Cell::Num(t, 1)),
    },
    Column {
        header: "peak RSS MiB",
        value: |c| opt(c.memory.as_ref().and_then(|m| m.peak_rss_bytes), |b| Cell::Num(b as f64 / MIB, 1)),
    },
    Column { header: "KLD mean", value: |c| opt(stats(c), |d| Cell::Num(d.kld.mean, 6)) },
    Column { header: "KLD p99", value: |c| opt(stats(c), |d| Cell::Num(d.kld.percentiles.p99, 6)) },
    Column { header: "same top-1 %", value: |c| opt(stats(c), |d| Cell::Num(100.0 * d.same_top1.value, 2)) },
    Column { header: "Δp RMS %", value: |c| opt(stats(c), |d| Cell::Num(100.0 * d.delta_p.rms.value, 3)) },
    Column { header: "PPL ref", value: |c| opt(stats(c), |d| Cell::Num(d.ppl_reference.value, 3)) },
    Column { header: "PPL", value: |c| opt(stats(c), |d| Cell::Num(d.ppl.value, 3)) },
    Column { header: "PPL ratio", value: |c| opt(stats(c), |d| Cell::Num(d.ppl_ratio.value, 4)) },
    Column {
        header: "worst layer SQNR dB",
        value: |c| opt(worst_layer(c), |l| Cell::Text(format!("{} ({})", format_db(l.sqnr_db), l.name))),
    },
    Column { header: "emb cos min", value: |c| opt(c.embedding.as_ref(), |e| Cell::Num(e.cosine_min, 6)) },
    Column { header: "hidden NMSE", value: |c| opt(c.embedding.as_ref(), |e| Cell::Num(e.hidden_nmse, 8)) },
    Column {
        header: "first diff tok",
        value: |c| {
            opt(c.generation.as_ref(), |g| match g.iter().filter_map(|x| x.first_divergent_token).min() {
                Some(p) => Cell::Int(p as u64),
                None => Cell::Text("none".into()),
            })
        },
    },
];

/// The Markdown table of every case.
pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let headers: Vec<&str> = COLUMNS.iter().map(|c| c.header).collect();
    out.push_str(&format!("| {} |\n", headers.join(" | ")));
    let aligns: Vec<&str> =
        COLUMNS.iter().enumerate().map(|(i, _)| if i < 2 { "---" } else { "---:" }).collect();
    out.push_str(&format!("|{}|\n", aligns.join("|")));
    for case in &results.cases {
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|col| match (col.value)(case) {
                Cell::Text(t) => t.replace('|', "\\|"),
                Cell::Num(v, d) => format!("{v:.d$}"),
                Cell::Int(v) => v.to_string(),
                Cell::Missing => "–".into(),
            })
            .collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

/// The CSV table of every case (full precision numbers, empty cells for missing values).
pub fn csv(results: &Results) -> Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let to_err = |e: csv::Error| Error::Render(format!("cannot render csv: {e}"));
    writer.write_record(COLUMNS.iter().map(|c| c.header)).map_err(to_err)?;
    for case in &results.cases {
        let cells = COLUMNS.iter().map(|col| match (col.value)(case) {
            Cell::Text(t) => t,
            Cell::Num(v, _) => v.to_string(),
            Cell::Int(v) => v.to_string(),
            Cell::Missing => String::new(),
        });
        writer.write_record(cells).map_err(to_err)?;
    }
    let bytes = writer.into_inner().map_err(|e| Error::Render(format!("cannot render csv: {e}")))?;
    Ok(String::from_utf8(bytes).expect("csv of utf-8 cells is utf-8"))
}

/// Write results.md and results.csv beside results.json in `dir`.
pub fn write_tables(results: &Results, dir: &std::path::Path) -> Result<()> {
    let mut md = format!("# {}\n\n", results.suite.name);
    md.push_str(&format!(
        "Revision {} · {} · {} threads · {}\n\n",
        results.provenance.git_revision,
        results.provenance.cpu,
        results.provenance.threads,
        results.provenance.started_at
    ));
    md.push_str(&markdown(results));
    for case in results.cases.iter().filter(|c| !c.stats_mean.is_empty()) {
        let stats: Vec<String> = case.stats_mean.iter().map(|(k, v)| format!("{k} {v:.6}")).collect();
        md.push_str(&format!(
            "\n- {}: {} (mean over the {} layers that report them)",
            case.id,
            stats.join(", "),
            case.layer_stats.len()
        ));
    }
    for case in &results.cases {
        for w in &case.warnings {
            md.push_str(&format!("\n- warning ({}): {w}", case.id));
        }
    }
    md.push('\n');
    super::write_atomic(&dir.join("results.md"), md.as_bytes())?;
    super::write_atomic(&dir.join("results.csv"), csv(results)?.as_bytes())
}
