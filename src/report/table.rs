//! The results tables (one row per model × scheme) as Markdown, CSV and sortable HTML,
//! all from one column list so they never disagree. `summary.md` and the HTML report pick
//! their columns from the same list by header.

use crate::error::{Error, Result};
use crate::measure::results::{CaseResult, Results};
use crate::measure::{
    MetricInfo, BITS_PER_WEIGHT, DECODE_MS_PER_TOKEN, DECODE_TOKENS_PER_S, DELTA_P_RMS, DISK_BYTES,
    HIDDEN_NMSE, KLD_MEAN, KLD_P99, PEAK_RSS_BYTES, PPL, PPL_RATIO, PREFILL_MS, QUANTIZE_S, SAME_TOP1,
    WEIGHT_BYTES,
};

/// One cell's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Free text.
    Text(String),
    /// A number and the decimals Markdown shows.
    Num(f64, usize),
    /// A number shown with three significant digits (scientific below 0.001).
    Sig(f64),
    /// A count.
    Int(u64),
    /// Not measured.
    Missing,
}

impl Cell {
    /// As printed in Markdown and HTML (`–` when missing).
    pub fn display(&self) -> String {
        match self {
            Cell::Text(t) => t.clone(),
            Cell::Num(v, d) => format!("{v:.d$}"),
            Cell::Sig(v) => significant(*v),
            Cell::Int(v) => v.to_string(),
            Cell::Missing => "–".into(),
        }
    }

    /// As written in CSV: full precision, empty when missing.
    fn csv(&self) -> String {
        match self {
            Cell::Text(t) => t.clone(),
            Cell::Num(v, _) | Cell::Sig(v) => v.to_string(),
            Cell::Int(v) => v.to_string(),
            Cell::Missing => String::new(),
        }
    }

    /// The number a sortable table orders by (`None` for text and missing cells).
    pub fn number(&self) -> Option<f64> {
        match self {
            Cell::Num(v, _) | Cell::Sig(v) => Some(*v),
            Cell::Int(v) => Some(*v as f64),
            Cell::Text(_) | Cell::Missing => None,
        }
    }
}

/// `v` with three significant digits: `0.136`, `0.00567`, `5.67e-7`, `0`.
pub fn significant(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || !v.is_finite() {
        format!("{v}")
    } else if a < 1e-3 {
        format!("{v:.2e}")
    } else {
        let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
    }
}

/// One column: its header and how a case fills it.
pub struct Column {
    /// Header, unique across [`COLUMNS`].
    pub header: &'static str,
    /// The cell of a case.
    pub value: fn(&CaseResult) -> Cell,
}

const MIB: f64 = 1024.0 * 1024.0;

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Cell) -> Cell {
    v.map_or(Cell::Missing, f)
}

/// The cell of a metric's value in `c`, read by the metric table's own reader (the table
/// and comparisons read each value one way).
fn metric(m: &MetricInfo, c: &CaseResult, cell: impl FnOnce(f64) -> Cell) -> Cell {
    opt((m.value)(c), cell)
}

/// SQNR as printed: `inf` for identical outputs.
pub fn format_db(db: f64) -> String {
    if db.is_infinite() {
        "inf".into()
    } else {
        format!("{db:.1}")
    }
}

/// Every column of results.md and results.csv, in order.
pub const COLUMNS: &[Column] = &[
    Column { header: "model", value: |c| Cell::Text(c.model.clone()) },
    Column { header: "scheme", value: |c| Cell::Text(c.label.clone()) },
    Column { header: "bits/weight", value: |c| metric(&BITS_PER_WEIGHT, c, |v| Cell::Num(v, 2)) },
    Column { header: "weights MiB", value: |c| metric(&WEIGHT_BYTES, c, |v| Cell::Num(v / MIB, 2)) },
    Column { header: "disk MiB", value: |c| metric(&DISK_BYTES, c, |v| Cell::Num(v / MIB, 2)) },
    Column { header: "quantize s", value: |c| metric(&QUANTIZE_S, c, |v| Cell::Num(v, 3)) },
    Column { header: "prefill ms", value: |c| metric(&PREFILL_MS, c, |v| Cell::Num(v, 2)) },
    Column {
        header: "prefill ±σ", value: |c| opt(c.latency.as_ref(), |l| Cell::Num(l.prefill.std_dev, 2))
    },
    Column { header: "decode ms/step", value: |c| metric(&DECODE_MS_PER_TOKEN, c, |v| Cell::Num(v, 3)) },
    Column { header: "tok/s", value: |c| metric(&DECODE_TOKENS_PER_S, c, |v| Cell::Num(v, 1)) },
    Column {
        header: "GPU ms/step",
        value: |c| opt(c.device_latency().and_then(|d| d.decode.as_ref()), |d| Cell::Num(d.median, 3)),
    },
    Column {
        header: "GPU tok/s",
        value: |c| opt(c.device_latency().and_then(|d| d.decode_tokens_per_s), |t| Cell::Num(t, 1)),
    },
    Column {
        header: "eager tok/s",
        value: |c| opt(c.device_latency().and_then(|d| d.eager_decode_tokens_per_s), |t| Cell::Num(t, 1)),
    },
    Column {
        header: "floor tok/s",
        value: |c| opt(c.device_latency(), |d| Cell::Num(d.floor_tokens_per_s, 1)),
    },
    Column {
        header: "GPU peak MiB",
        value: |c| opt(c.memory.as_ref().and_then(|m| m.peak_device_bytes), |b| Cell::Num(b as f64 / MIB, 1)),
    },
    Column { header: "peak RSS MiB", value: |c| metric(&PEAK_RSS_BYTES, c, |v| Cell::Num(v / MIB, 1)) },
    Column { header: "KLD mean", value: |c| metric(&KLD_MEAN, c, Cell::Sig) },
    Column { header: "KLD p99", value: |c| metric(&KLD_P99, c, Cell::Sig) },
    Column { header: "same top-1 %", value: |c| metric(&SAME_TOP1, c, |v| Cell::Num(100.0 * v, 2)) },
    Column { header: "Δp RMS %", value: |c| metric(&DELTA_P_RMS, c, |v| Cell::Num(100.0 * v, 3)) },
    Column {
        header: "PPL ref",
        value: |c| opt(c.divergence_stats(), |d| Cell::Num(d.ppl_reference.value, 3)),
    },
    Column { header: "PPL", value: |c| metric(&PPL, c, |v| Cell::Num(v, 3)) },
    Column { header: "PPL ratio", value: |c| metric(&PPL_RATIO, c, |v| Cell::Num(v, 4)) },
    Column {
        header: "worst layer SQNR dB",
        value: |c| opt(c.worst_layer(), |l| Cell::Text(format!("{} ({})", format_db(l.sqnr_db), l.name))),
    },
    Column { header: "emb cos min", value: |c| opt(c.embedding.as_ref(), |e| Cell::Num(e.cosine_min, 6)) },
    Column { header: "hidden NMSE", value: |c| metric(&HIDDEN_NMSE, c, |v| Cell::Num(v, 8)) },
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

/// The columns of `summary.md` and the HTML report's tables, by header in [`COLUMNS`].
pub const SUMMARY_COLUMNS: &[&str] = &[
    "scheme",
    "bits/weight",
    "weights MiB",
    "disk MiB",
    "prefill ms",
    "tok/s",
    "GPU tok/s",
    "eager tok/s",
    "floor tok/s",
    "GPU peak MiB",
    "peak RSS MiB",
    "KLD mean",
    "same top-1 %",
    "PPL ratio",
    "worst layer SQNR dB",
    "emb cos min",
];

/// The columns named by `headers`, in that order (unknown headers are skipped; a unit test
/// keeps [`SUMMARY_COLUMNS`] in step with [`COLUMNS`]).
pub fn columns(headers: &[&str]) -> Vec<&'static Column> {
    headers.iter().filter_map(|h| COLUMNS.iter().find(|c| c.header == *h)).collect()
}

/// `columns` without those every one of `cases` leaves missing (an encoder has no KLD, a
/// decoder no embedding cosine).
pub fn present_columns<'a>(columns: &[&'a Column], cases: &[&CaseResult]) -> Vec<&'a Column> {
    columns.iter().copied().filter(|col| cases.iter().any(|c| (col.value)(c) != Cell::Missing)).collect()
}

/// A Markdown table of `cases` over `columns` (text columns left-aligned: the first one and
/// any whose cells are all text).
pub fn markdown_table(cases: &[&CaseResult], columns: &[&Column]) -> String {
    let mut out = String::new();
    let headers: Vec<&str> = columns.iter().map(|c| c.header).collect();
    out.push_str(&format!("| {} |\n", headers.join(" | ")));
    let aligns: Vec<&str> = columns
        .iter()
        .map(|col| {
            let textual = cases.iter().all(|c| matches!((col.value)(c), Cell::Text(_) | Cell::Missing));
            if textual && col.header != "worst layer SQNR dB" {
                "---"
            } else {
                "---:"
            }
        })
        .collect();
    out.push_str(&format!("|{}|\n", aligns.join("|")));
    for case in cases {
        let cells: Vec<String> =
            columns.iter().map(|col| (col.value)(case).display().replace('|', "\\|")).collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

/// The Markdown table of every case over every column.
pub fn markdown(results: &Results) -> String {
    let all: Vec<&Column> = COLUMNS.iter().collect();
    markdown_table(&results.cases.iter().collect::<Vec<_>>(), &all)
}

/// The cases of each model, models in results order (cases of unlisted models last).
pub fn cases_by_model(results: &Results) -> Vec<(String, Vec<&CaseResult>)> {
    let mut names: Vec<String> = results.models.iter().map(|m| m.name.clone()).collect();
    for case in &results.cases {
        if !names.contains(&case.model) {
            names.push(case.model.clone());
        }
    }
    names
        .into_iter()
        .map(|name| {
            let cases = results.cases.iter().filter(|c| c.model == name).collect();
            (name, cases)
        })
        .filter(|(_, cases): &(String, Vec<&CaseResult>)| !cases.is_empty())
        .collect()
}

/// The CSV table of every case (full precision numbers, empty cells for missing values).
pub fn csv(results: &Results) -> Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let to_err = |e: csv::Error| Error::Render(format!("cannot render csv: {e}"));
    writer.write_record(COLUMNS.iter().map(|c| c.header)).map_err(to_err)?;
    for case in &results.cases {
        writer.write_record(COLUMNS.iter().map(|col| (col.value)(case).csv())).map_err(to_err)?;
    }
    let bytes = writer.into_inner().map_err(|e| Error::Render(format!("cannot render csv: {e}")))?;
    String::from_utf8(bytes).map_err(|e| Error::Render(format!("cannot render csv: {e}")))
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
    crate::files::write_atomic(&dir.join("results.md"), md.as_bytes())?;
    crate::files::write_atomic(&dir.join("results.csv"), csv(results)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_columns_exist_and_headers_are_unique() {
        assert_eq!(columns(SUMMARY_COLUMNS).len(), SUMMARY_COLUMNS.len());
        let mut headers: Vec<&str> = COLUMNS.iter().map(|c| c.header).collect();
        headers.sort();
        headers.dedup();
        assert_eq!(headers.len(), COLUMNS.len());
    }

    #[test]
    fn significant_digits() {
        assert_eq!(significant(0.136287), "0.136");
        assert_eq!(significant(0.005669), "0.00567");
        assert_eq!(significant(5.669e-7), "5.67e-7");
        assert_eq!(significant(12.345), "12.3");
        assert_eq!(significant(0.0), "0");
        assert_eq!(Cell::Sig(2.5).number(), Some(2.5));
    }
}
