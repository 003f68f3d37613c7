//! index.html: one self-contained page (no network: styles, script and charts inline) with
//! the sortable tables, one card per scheme, the charts and the provenance. The page
//! frame is shared with compare.html.

use super::charts::CHARTS;
use super::summary::provenance_line;
use super::table::{self, Cell, Column, SUMMARY_COLUMNS};
use crate::measure::results::{CaseResult, Results};

/// Escape text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
:root { --fg:#1d2430; --muted:#5d6776; --line:#d9dee6; --bg:#f6f7f9; --card:#fff; --accent:#3b6fb6;
        --good:#1a7f37; --bad:#c62828; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#1d2430; color:#fff; padding:22px 32px 16px; }
header h1 { margin:0 0 4px; font-size:26px; }
header p { margin:2px 0; color:#c9d1dc; }
nav { display:flex; gap:18px; padding:10px 32px; background:#fff; border-bottom:1px solid var(--line);
      position:sticky; top:0; z-index:2; }
nav a { color:var(--accent); text-decoration:none; font-weight:600; }
main { padding:8px 32px 40px; max-width:1400px; }
h2 { margin:28px 0 10px; font-size:21px; }
h3 { margin:0 0 6px; font-size:17px; }
.muted { color:var(--muted); }
.scroll { overflow-x:auto; background:var(--card); border:1px solid var(--line); border-radius:8px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align:left; }
th { background:#eef1f5; position:relative; user-select:none; }
table.sortable th { cursor:pointer; }
table.sortable th:hover { background:#e2e7ef; }
th[data-dir="asc"]::after { content:" \25B2"; font-size:11px; }
th[data-dir="desc"]::after { content:" \25BC"; font-size:11px; }
tbody tr:hover { background:#f3f6fb; }
.cards { display:grid; grid-template-columns:repeat(auto-fill, minmax(360px, 1fr)); gap:14px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
.card dl { display:grid; grid-template-columns:auto 1fr; gap:2px 12px; margin:8px 0 0; }
.card dt { color:var(--muted); white-space:nowrap; }
.card dd { margin:0; text-align:right; font-variant-numeric:tabular-nums; overflow-wrap:anywhere; }
.tag { display:inline-block; font-size:12px; padding:1px 7px; border-radius:10px; background:#e8eef8;
       color:#2c4f86; margin-right:4px; }
.warn { color:#8a5300; font-size:13px; margin-top:8px; }
figure { margin:0 0 18px; background:var(--card); border:1px solid var(--line); border-radius:8px;
         padding:12px; }
figure svg { max-width:100%; height:auto; display:block; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; }
pre { background:#fff; border:1px solid var(--line); padding:10px; overflow-x:auto; font-size:13px; }
.improved { color:var(--good); font-weight:600; }
.regressed { color:var(--bad); font-weight:700; }
.noise { color:var(--muted); }
"#;

/// Click a header to sort by it; numbers by `data-sort`, missing cells last.
const SORT_SCRIPT: &str = r#"
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
      table.querySelectorAll('th').forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function (row) { var c = row.cells[col]; return c ? c.getAttribute('data-sort') : null; };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || x === '') return (y === null || y === '') ? 0 : 1;
        if (y === null || y === '') return -1;
        var nx = parseFloat(x), ny = parseFloat(y), r;
        r = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return dir === 'asc' ? r : -r;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"#;

/// A whole page: title, header lines, navigation and body, styles and script inline.
pub fn page(title: &str, header: &[String], nav: &[(&str, &str)], body: &str) -> String {
    let mut out = String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    out.push_str(&format!("<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n", escape(title)));
    out.push_str(&format!("<header><h1>{}</h1>\n", escape(title)));
    for line in header {
        out.push_str(&format!("<p>{}</p>\n", escape(line)));
    }
    out.push_str("</header>\n<nav>");
    for (anchor, label) in nav {
        out.push_str(&format!("<a href=\"#{anchor}\">{}</a>", escape(label)));
    }
    out.push_str("</nav>\n<main>\n");
    out.push_str(body);
    out.push_str(&format!("</main>\n<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n"));
    out
}

/// A sortable HTML table of `cases` over `columns`.
pub fn table(cases: &[&CaseResult], columns: &[&Column]) -> String {
    let mut out = String::from("<div class=\"scroll\"><table class=\"sortable\">\n<thead><tr>");
    for col in columns {
        out.push_str(&format!("<th title=\"sort\">{}</th>", escape(col.header)));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for case in cases {
        out.push_str("<tr>");
        for col in columns {
            let cell = (col.value)(case);
            let (sort, class) = match &cell {
                Cell::Text(t) => (t.clone(), " class=\"text\""),
                Cell::Missing => (String::new(), ""),
                other => (other.number().map_or(String::new(), |v| v.to_string()), ""),
            };
            // A worst-layer cell sorts by its dB value, not its text.
            let sort = match (col.header, &cell) {
                ("worst layer SQNR dB", _) => case.worst_layer().map_or(String::new(), |l| {
                    if l.sqnr_db.is_finite() {
                        l.sqnr_db.to_string()
                    } else {
                        "1e308".into()
                    }
                }),
                _ => sort,
            };
            let class = if col.header == "worst layer SQNR dB" { "" } else { class };
            out.push_str(&format!(
                "<td{class} data-sort=\"{}\">{}</td>",
                escape(&sort),
                escape(&cell.display())
            ));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
    out
}

fn card(case: &CaseResult) -> String {
    let mut out = String::from("<div class=\"card\">");
    out.push_str(&format!("<h3>{}</h3>", escape(&case.label)));
    out.push_str(&format!("<span class=\"tag\">{}</span>", escape(&case.scheme)));
    out.push_str(&format!("<span class=\"tag\">{}</span>", escape(&case.device)));
    for kernel in &case.kernels {
        out.push_str(&format!("<span class=\"tag\">{}</span>", escape(kernel)));
    }
    let params: Vec<String> =
        case.params.iter().filter(|(k, _)| *k != "label").map(|(k, v)| format!("{k}={v}")).collect();
    if !params.is_empty() {
        out.push_str(&format!("<div class=\"muted\">{}</div>", escape(&params.join(", "))));
    }
    out.push_str("<dl>");
    for col in table::columns(SUMMARY_COLUMNS).into_iter().skip(1) {
        let cell = (col.value)(case);
        if cell != Cell::Missing {
            out.push_str(&format!("<dt>{}</dt><dd>{}</dd>", escape(col.header), escape(&cell.display())));
        }
    }
    if let Some(l) = case.latency.as_ref() {
        out.push_str(&format!(
            "<dt>prefill 95% CI</dt><dd>{:.3} – {:.3} ms</dd>",
            l.prefill.median_ci95[0], l.prefill.median_ci95[1]
        ));
    }
    if let Some(gen) = case.generation.as_ref().and_then(|g| g.first()) {
        let first = gen.first_divergent_token.map_or("identical".to_string(), |p| format!("differs at {p}"));
        out.push_str(&format!("<dt>greedy vs reference</dt><dd>{}</dd>", escape(&first)));
    }
    out.push_str("</dl>");
    if let Some(gen) = case.generation.as_ref().and_then(|g| g.first()) {
        out.push_str(&format!(
            "<div class=\"muted\" style=\"margin-top:8px\"><b>{}</b>{}</div>",
            escape(&gen.prompt),
            escape(&gen.text)
        ));
    }
    for w in &case.warnings {
        out.push_str(&format!("<div class=\"warn\">⚠ {}</div>", escape(w)));
    }
    out.push_str("</div>\n");
    out
}

fn provenance(results: &Results) -> String {
    let p = &results.provenance;
    let w = &results.workload;
    let mut rows: Vec<(String, String)> = vec![
        ("bench".into(), format!("{} ({})", p.bench_version, p.build_profile)),
        ("git revision".into(), p.git_revision.clone()),
        ("build features".into(), p.build_features.join(", ")),
        ("target".into(), p.target.clone()),
        ("CPU".into(), p.cpu.clone()),
        ("CPU features".into(), p.cpu_features.join(", ")),
        ("threads".into(), p.threads.to_string()),
        ("GPUs".into(), if p.gpus.is_empty() { "none".into() } else { p.gpus.join(", ") }),
        ("started".into(), p.started_at.clone()),
        (
            "suite".into(),
            format!("{} ({}), sha256 {}", results.suite.name, results.suite.path, results.suite.sha256),
        ),
        ("evaluation text".into(), format!("{}, sha256 {}", w.eval_source, w.eval_sha256)),
        (
            "workload".into(),
            format!(
                "prompt {} × batch {}, {} decode steps, context {}, {} repeats, {} warm-up, seed {}",
                w.prompt_len, w.batch_size, w.gen_len, w.context, w.repeats, w.warmup, w.seed
            ),
        ),
    ];
    if let Some(c) = &w.calibration {
        rows.push(("calibration".into(), format!("{} ({} rows), sha256 {}", c.source, c.samples, c.sha256)));
    }
    for shard in &results.shards {
        let p = &shard.provenance;
        rows.push((
            format!("shard {}/{}", shard.index, shard.count),
            format!(
                "{} of {} cases · {} · {} {} · started {}",
                shard.cases.len(),
                shard.planned.len(),
                p.machine(),
                p.bench_version,
                p.git_revision,
                p.started_at
            ),
        ));
    }
    for m in &results.models {
        rows.push((
            format!("model {}", m.name),
            format!(
                "{} · {} · {} parameters · {} · model sha256 {} · tokenizer sha256 {}",
                m.path, m.arch, m.parameters, m.dtype, m.model_sha256, m.tokenizer_sha256
            ),
        ));
    }
    let mut out = String::from("<div class=\"scroll\"><table>\n<tbody>\n");
    for (k, v) in rows {
        out.push_str(&format!(
            "<tr><th class=\"text\">{}</th><td class=\"text\" style=\"white-space:normal\">{}</td></tr>\n",
            escape(&k),
            escape(&v)
        ));
    }
    out.push_str("</tbody></table></div>\n");
    out.push_str(&format!(
        "<details><summary>suite file</summary><pre>{}</pre></details>\n",
        escape(&results.suite.text)
    ));
    out
}

/// Drop the XML prolog of an SVG document so it can sit inline in HTML.
fn inline_svg(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

/// The whole index.html; `svgs` are the charts of [`CHARTS`], in order.
pub fn index(results: &Results, svgs: &[String]) -> String {
    let mut body = String::from("<section id=\"summary\">\n");
    let columns = table::columns(SUMMARY_COLUMNS);
    for (model, cases) in table::cases_by_model(results) {
        body.push_str(&format!("<h2>{}</h2>\n", escape(&model)));
        if let Some(m) = results.models.iter().find(|m| m.name == model) {
            if let Some(note) = m.fallback_note() {
                body.push_str(&format!("<p class=\"warn\"><strong>{}</strong></p>\n", escape(&note)));
            }
            body.push_str(&format!(
                "<p class=\"muted\">{}, {} parameters, judged against {} ({}), {} evaluation tokens. \
                 Click a column to sort.</p>\n",
                escape(&m.arch),
                m.parameters,
                escape(&m.reference),
                escape(&m.dtype),
                m.eval_tokens
            ));
        }
        body.push_str(&table(&cases, &table::present_columns(&columns, &cases)));
    }
    body.push_str("</section>\n<section id=\"charts\">\n<h2>Charts</h2>\n");
    for (chart, svg) in CHARTS.iter().zip(svgs) {
        body.push_str(&format!(
            "<figure id=\"chart-{}\"><h3>{}</h3>\n{}\n<figcaption>{} <a href=\"charts/{}.png\">PNG</a> · \
             <a href=\"charts/{}.svg\">SVG</a></figcaption></figure>\n",
            chart.file,
            escape(chart.title),
            inline_svg(svg),
            escape(chart.caption),
            chart.file,
            chart.file
        ));
    }
    body.push_str("</section>\n<section id=\"schemes\">\n<h2>Schemes</h2>\n");
    for (model, cases) in table::cases_by_model(results) {
        if results.models.len() > 1 {
            body.push_str(&format!("<h3>{}</h3>\n", escape(&model)));
        }
        body.push_str("<div class=\"cards\">\n");
        for case in cases {
            body.push_str(&card(case));
        }
        body.push_str("</div>\n");
    }
    body.push_str("</section>\n<section id=\"all\">\n<h2>All columns</h2>\n");
    let all: Vec<&Column> = table::COLUMNS.iter().collect();
    let cases: Vec<&CaseResult> = results.cases.iter().collect();
    body.push_str(&table(&cases, &table::present_columns(&all, &cases)));
    body.push_str("</section>\n<section id=\"provenance\">\n<h2>Provenance</h2>\n");
    body.push_str(&provenance(results));
    body.push_str("</section>\n");
    let mut header = vec![provenance_line(results)];
    if let Some(description) = results.suite.description.clone() {
        header.insert(0, description);
    }
    page(
        &format!("{} — quantbench report", results.suite.name),
        &header,
        &[
            ("summary", "Summary"),
            ("charts", "Charts"),
            ("schemes", "Schemes"),
            ("all", "All columns"),
            ("provenance", "Provenance"),
        ],
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(escape("<a href=\"x\">&'</a>"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;");
    }

    #[test]
    fn inline_svg_drops_the_prolog() {
        assert_eq!(inline_svg("<?xml version=\"1.0\"?>\n<svg a=\"1\"/>"), "<svg a=\"1\"/>");
    }
}
