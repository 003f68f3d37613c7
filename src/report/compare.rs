//! `bench compare`: every case and metric of two runs, with a verdict of improved,
//! regressed or within noise. Latency with raw samples is judged by the bootstrap
//! confidence interval of the relative change of the medians against a noise threshold;
//! every other metric by its relative tolerance in the metric registry ([`METRICS`]).

use std::path::Path;

use super::html::{escape, page};
use crate::measure::latency::percentile;
use crate::measure::results::Results;
use crate::measure::{MetricGroup, MetricInfo, METRICS};
use crate::tensor::SeededRng;

/// Noise threshold of latency comparisons when neither the suite nor the command line sets
/// one: a relative change of the median must be outside ±2% with 95% confidence.
pub const DEFAULT_NOISE_THRESHOLD: f64 = 0.02;

/// Bootstrap resamples behind the interval of a relative change.
const RESAMPLES: usize = 2000;

/// Fixed seed, so the same two runs always give the same verdicts.
const SEED: u64 = 0xC0FF_EE00;

/// Confidence level of the interval.
const LEVEL: f64 = 0.95;

/// Below this absolute difference two deterministic values count as equal (a value of 0
/// has no relative change).
const ABS_EPSILON: f64 = 1e-12;

/// The verdict on one metric of one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Better by more than the noise or tolerance.
    Improved,
    /// Worse by more than the noise or tolerance.
    Regressed,
    /// Not distinguishable from no change.
    WithinNoise,
}

impl Verdict {
    /// As printed.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Improved => "improved",
            Verdict::Regressed => "regressed",
            Verdict::WithinNoise => "within noise",
        }
    }
}

/// One case × metric.
#[derive(Debug, Clone)]
pub struct Row {
    /// Case id.
    pub case: String,
    /// The metric.
    pub metric: &'static MetricInfo,
    /// Baseline value.
    pub baseline: f64,
    /// New value.
    pub new: f64,
    /// Relative change, new / baseline − 1 (infinite from 0 or to infinity).
    pub change: f64,
    /// 95% bootstrap interval of the relative change (timings with samples).
    pub interval: Option<[f64; 2]>,
    /// The noise threshold or tolerance it was judged against.
    pub threshold: f64,
    /// The verdict.
    pub verdict: Verdict,
    /// Why a regression here does not fail the comparison (a timing from another machine,
    /// or one without repeated samples); `None`: it does.
    pub not_gating: Option<&'static str>,
}

/// Where one side of the comparison came from.
#[derive(Debug, Clone)]
pub struct Side {
    /// results.json path.
    pub path: String,
    /// Git revision of the build.
    pub revision: String,
    /// Start of the run.
    pub started_at: String,
    /// CPU and thread count.
    pub machine: String,
}

impl Side {
    fn of(results: &Results, path: &Path) -> Side {
        let p = &results.provenance;
        Side {
            path: path.display().to_string(),
            revision: p.git_revision.clone(),
            started_at: p.started_at.clone(),
            machine: machines_of(results),
        }
    }
}

/// The machines of a run in words: one, or each of a merged run's.
fn machines_of(results: &Results) -> String {
    let machines = super::summary::machines(results);
    match &machines[..] {
        [one] => one.clone(),
        many => format!("{} machines: {}", many.len(), many.join("; ")),
    }
}

/// Two runs compared.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Suite name of the new run.
    pub suite: String,
    /// The baseline.
    pub baseline: Side,
    /// The new run.
    pub new: Side,
    /// Latency noise threshold used.
    pub noise_threshold: f64,
    /// Where the threshold came from.
    pub threshold_source: String,
    /// Every case × metric both runs have.
    pub rows: Vec<Row>,
    /// Cases only the baseline has.
    pub only_baseline: Vec<String>,
    /// Cases only the new run has.
    pub only_new: Vec<String>,
    /// What the reader should know (different machines, workloads).
    pub notes: Vec<String>,
    /// `case: metric` for each metric the baseline measured and the new run did not.
    pub missing_metrics: Vec<String>,
    /// Workload fields whose values differ (`prompt_len`, `eval_sha256`): verdicts on
    /// different work are shown, never gating, and a gate refuses to judge.
    pub workload_differences: Vec<String>,
}

impl Comparison {
    /// Regressions that fail the comparison.
    pub fn regressions(&self) -> usize {
        self.rows.iter().filter(|r| r.verdict == Verdict::Regressed && r.not_gating.is_none()).count()
    }

    /// Cases and metrics of the baseline that the new run lacks: a gate cannot vouch for
    /// what was not measured, so each one fails it.
    pub fn vanished(&self) -> usize {
        self.only_baseline.len() + self.missing_metrics.len()
    }

    /// What fails a `--fail-on-regression` gate: gating regressions, vanished cases and
    /// metrics, and a comparison of nothing at all.
    pub fn gate_failures(&self) -> usize {
        self.regressions() + self.vanished() + usize::from(self.rows.is_empty())
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.rows.iter().filter(|r| r.verdict == verdict).count()
    }

    /// One line: the verdict counts.
    pub fn headline(&self) -> String {
        let regressed = self.count(Verdict::Regressed);
        let gating = self.regressions();
        let lead = match (gating, regressed - gating) {
            (0, 0) => "no regression".to_string(),
            (0, loose) => format!("no gating regression ({loose} timings regressed without gating)"),
            (g, 0) => format!("{g} regressed"),
            (g, loose) => format!("{g} regressed (and {loose} timings without gating)"),
        };
        let vanished = match (self.only_baseline.len(), self.missing_metrics.len()) {
            (0, 0) => String::new(),
            (cases, 0) => format!("{cases} baseline cases missing from the new run, "),
            (0, metrics) => format!("{metrics} baseline metrics missing from the new run, "),
            (cases, metrics) => {
                format!("{cases} baseline cases and {metrics} metrics missing from the new run, ")
            }
        };
        format!(
            "{vanished}{lead}, {} improved, {} within noise ({} comparisons)",
            self.count(Verdict::Improved),
            self.count(Verdict::WithinNoise),
            self.rows.len()
        )
    }
}

/// The suite's `noise_threshold`, as recorded in results.json.
fn suite_threshold(results: &Results) -> Option<f64> {
    results.suite.noise_threshold
}

/// Compare `new` against `baseline`. `threshold` overrides the noise threshold of the new
/// run's suite (else [`DEFAULT_NOISE_THRESHOLD`]).
pub fn compare(
    baseline: &Results,
    baseline_path: &Path,
    new: &Results,
    new_path: &Path,
    threshold: Option<f64>,
) -> Comparison {
    let (noise_threshold, threshold_source) = match (threshold, suite_threshold(new)) {
        (Some(t), _) => (t, "--noise-threshold".to_string()),
        (None, Some(t)) => (t, format!("noise_threshold of suite {}", new.suite.name)),
        (None, None) => (DEFAULT_NOISE_THRESHOLD, "default".to_string()),
    };
    // Per case: a run merged from shards measured its cases on several machines.
    let same_machine = |id: &str| baseline.provenance_of(id).machine() == new.provenance_of(id).machine();
    let mut notes = Vec::new();
    let across: Vec<&str> = new
        .cases
        .iter()
        .filter(|c| baseline.cases.iter().any(|b| b.id == c.id) && !same_machine(&c.id))
        .map(|c| c.id.as_str())
        .collect();
    if !across.is_empty() {
        let (b, n) = (machines_of(baseline), machines_of(new));
        notes.push(format!(
            "{} of the cases were measured on different machines ({b} against {n}): their timing and \
             resident-memory verdicts are shown but do not fail the comparison",
            if across.len() == new.cases.len() { "all".to_string() } else { across.len().to_string() }
        ));
    }
    let workload_differences = baseline.workload.differences(&new.workload);
    if !workload_differences.is_empty() {
        notes.push(format!(
            "the workloads differ ({}): verdicts are shown but do not gate",
            workload_differences.join(", ")
        ));
    }
    let other_workload = (!workload_differences.is_empty()).then_some("other workload");
    let mut rows = Vec::new();
    let mut only_new = Vec::new();
    let mut missing_metrics = Vec::new();
    for case in &new.cases {
        let Some(base) = baseline.cases.iter().find(|c| c.id == case.id) else {
            only_new.push(case.id.clone());
            continue;
        };
        let other_machine = !same_machine(&case.id);
        for metric in METRICS {
            let (Some(b), Some(n)) = ((metric.value)(base), (metric.value)(case)) else {
                if (metric.value)(base).is_some() {
                    missing_metrics.push(format!("{}: {}", case.id, metric.name));
                }
                continue;
            };
            if b.is_nan() || n.is_nan() {
                continue;
            }
            let across_machines =
                other_workload.or((metric.machine_dependent && other_machine).then_some("other machine"));
            let samples = ((metric.samples)(base), (metric.samples)(case));
            let row = match samples {
                (Some(sb), Some(sn)) if sb.len() >= 2 && sn.len() >= 2 => {
                    let interval = bootstrap_relative_change(&sb, &sn);
                    Row {
                        case: case.id.clone(),
                        metric,
                        baseline: b,
                        new: n,
                        change: relative_change(b, n),
                        interval: Some(interval),
                        threshold: noise_threshold,
                        verdict: interval_verdict(interval, noise_threshold, metric.higher_is_better),
                        not_gating: across_machines,
                    }
                }
                _ => Row {
                    case: case.id.clone(),
                    metric,
                    baseline: b,
                    new: n,
                    change: relative_change(b, n),
                    interval: None,
                    threshold: metric.tolerance,
                    verdict: tolerance_verdict(b, n, metric.tolerance, metric.higher_is_better),
                    // One timing has no noise estimate: it is shown, never gating.
                    not_gating: across_machines
                        .or((metric.group == MetricGroup::Latency).then_some("single sample")),
                },
            };
            rows.push(row);
        }
    }
    let only_baseline = baseline
        .cases
        .iter()
        .filter(|c| !new.cases.iter().any(|n| n.id == c.id))
        .map(|c| c.id.clone())
        .collect();
    Comparison {
        suite: new.suite.name.clone(),
        baseline: Side::of(baseline, baseline_path),
        new: Side::of(new, new_path),
        noise_threshold,
        threshold_source,
        rows,
        only_baseline,
        only_new,
        notes,
        missing_metrics,
        workload_differences,
    }
}

/// new / baseline − 1; infinite (with the sign of the move) from 0 or to or from infinity.
pub fn relative_change(baseline: f64, new: f64) -> f64 {
    if baseline == new {
        0.0
    } else if baseline == 0.0 || baseline.is_infinite() || new.is_infinite() {
        if new > baseline {
            f64::INFINITY
        } else {
            f64::NEG_INFINITY
        }
    } else {
        (new - baseline) / baseline.abs()
    }
}

/// Percentile-bootstrap 95% interval of median(new) / median(baseline) − 1: both sample
/// vectors are resampled with replacement, independently, 2000 times.
pub fn bootstrap_relative_change(baseline: &[f64], new: &[f64]) -> [f64; 2] {
    let mut rng = SeededRng::new(SEED);
    let mut median_of_resample = |samples: &[f64], buf: &mut Vec<f64>| {
        buf.clear();
        buf.extend((0..samples.len()).map(|_| samples[(rng.next_u64() % samples.len() as u64) as usize]));
        buf.sort_by(f64::total_cmp);
        percentile(buf, 0.5)
    };
    let (mut bb, mut bn) = (Vec::new(), Vec::new());
    let mut changes: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let b = median_of_resample(baseline, &mut bb);
            let n = median_of_resample(new, &mut bn);
            relative_change(b, n)
        })
        .collect();
    changes.sort_by(f64::total_cmp);
    let tail = (1.0 - LEVEL) / 2.0;
    [percentile(&changes, tail), percentile(&changes, 1.0 - tail)]
}

/// A timing's verdict: regressed when the whole interval is worse than the threshold,
/// improved when it is wholly better, else within noise.
pub fn interval_verdict(interval: [f64; 2], threshold: f64, higher_is_better: bool) -> Verdict {
    let [lo, hi] = interval;
    let (worse, better) =
        if higher_is_better { (hi < -threshold, lo > threshold) } else { (lo > threshold, hi < -threshold) };
    if worse {
        Verdict::Regressed
    } else if better {
        Verdict::Improved
    } else {
        Verdict::WithinNoise
    }
}

/// A deterministic metric's verdict: a relative change beyond `tolerance` in either
/// direction (any change at all for a tolerance of 0).
pub fn tolerance_verdict(baseline: f64, new: f64, tolerance: f64, higher_is_better: bool) -> Verdict {
    if baseline == new || (baseline.is_finite() && new.is_finite() && (new - baseline).abs() <= ABS_EPSILON) {
        return Verdict::WithinNoise;
    }
    if relative_change(baseline, new).abs() <= tolerance {
        return Verdict::WithinNoise;
    }
    if (new > baseline) == higher_is_better {
        Verdict::Improved
    } else {
        Verdict::Regressed
    }
}

/// A value as printed: bytes whole, others with about four significant digits.
pub fn format_value(metric: &MetricInfo, v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if metric.unit == "B" || metric.unit == "tok" {
        return format!("{v:.0}");
    }
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.4}")
    } else if a >= 1e-3 {
        format!("{v:.6}")
    } else {
        format!("{v:.3e}")
    }
}

/// A relative change as a signed percentage (`from 0`, `to inf` when it has none).
pub fn format_change(change: f64) -> String {
    if change.is_finite() {
        format!("{:+.2}%", 100.0 * change)
    } else if change > 0.0 {
        "up from 0".into()
    } else {
        "down".into()
    }
}

fn format_interval(row: &Row) -> String {
    row.interval.map_or("–".into(), |[lo, hi]| format!("[{}, {}]", format_change(lo), format_change(hi)))
}

fn verdict_text(row: &Row) -> String {
    match (row.verdict, row.not_gating) {
        (Verdict::Regressed, None) => "**regressed**".into(),
        (Verdict::Regressed, Some(why)) => format!("regressed (not gating: {why})"),
        (v, _) => v.name().into(),
    }
}

fn markdown_rows(rows: &[&Row]) -> String {
    let mut out = String::from(
        "| case | metric | baseline | new | change | 95% interval | threshold | verdict |\n\
         |---|---|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | ±{:.2}% | {} |\n",
            r.case.replace('|', "\\|"),
            r.metric.name,
            format_value(r.metric, r.baseline),
            format_value(r.metric, r.new),
            format_change(r.change),
            format_interval(r),
            100.0 * r.threshold,
            verdict_text(r)
        ));
    }
    out
}

fn changed(c: &Comparison) -> Vec<&Row> {
    let mut rows: Vec<&Row> = c.rows.iter().filter(|r| r.verdict == Verdict::Regressed).collect();
    rows.extend(c.rows.iter().filter(|r| r.verdict == Verdict::Improved));
    rows
}

/// compare.md.
pub fn markdown(c: &Comparison) -> String {
    let mut md = format!("# compare: {}\n\n", c.suite);
    md.push_str("| | baseline | new |\n|---|---|---|\n");
    md.push_str(&format!("| results | `{}` | `{}` |\n", c.baseline.path, c.new.path));
    md.push_str(&format!("| revision | {} | {} |\n", c.baseline.revision, c.new.revision));
    md.push_str(&format!("| started | {} | {} |\n", c.baseline.started_at, c.new.started_at));
    md.push_str(&format!("| machine | {} | {} |\n\n", c.baseline.machine, c.new.machine));
    md.push_str(&format!(
        "Timings with raw samples: the 95% bootstrap interval of the relative change of the medians \
         against a noise threshold of ±{:.2}% ({}). Other metrics: the relative tolerance of the metric \
         registry (`bench list metrics`).\n\n",
        100.0 * c.noise_threshold,
        c.threshold_source
    ));
    md.push_str(&format!("**Verdict: {}.**\n", c.headline()));
    let mut notes: Vec<String> = c.notes.iter().map(|n| format!("- note: {n}")).collect();
    if !c.only_baseline.is_empty() {
        notes.push(format!("- only in the baseline: {}", c.only_baseline.join(", ")));
    }
    if !c.only_new.is_empty() {
        notes.push(format!("- only in the new run: {}", c.only_new.join(", ")));
    }
    if !c.missing_metrics.is_empty() {
        notes.push(format!("- measured in the baseline only: {}", c.missing_metrics.join(", ")));
    }
    if !notes.is_empty() {
        md.push_str(&format!("\n{}\n", notes.join("\n")));
    }
    md.push_str("\n## Changes\n\n");
    let changed = changed(c);
    if changed.is_empty() {
        md.push_str("None: every metric is within noise or tolerance.\n");
    } else {
        md.push_str(&markdown_rows(&changed));
    }
    md.push_str(&format!("\n<details><summary>All {} comparisons</summary>\n\n", c.rows.len()));
    md.push_str(&markdown_rows(&c.rows.iter().collect::<Vec<_>>()));
    md.push_str("\n</details>\n");
    md
}

fn html_rows(rows: &[&Row]) -> String {
    let mut out = String::from(
        "<div class=\"scroll\"><table class=\"sortable\"><thead><tr><th>case</th><th class=\"text\">metric</th>\
         <th>baseline</th><th>new</th><th>change</th><th>95% interval</th><th>threshold</th>\
         <th class=\"text\">verdict</th></tr></thead>\n<tbody>\n",
    );
    for r in rows {
        let class = match r.verdict {
            Verdict::Improved => "improved",
            Verdict::Regressed => "regressed",
            Verdict::WithinNoise => "noise",
        };
        let sort_change = if r.change.is_finite() { r.change.to_string() } else { String::new() };
        out.push_str(&format!(
            "<tr><td class=\"text\" data-sort=\"{case}\">{case}</td><td class=\"text\" data-sort=\"{m}\">{m}</td>\
             <td data-sort=\"{b}\">{bs}</td><td data-sort=\"{n}\">{ns}</td>\
             <td class=\"{class}\" data-sort=\"{sort_change}\">{change}</td><td>{interval}</td><td>±{thr:.2}%</td>\
             <td class=\"text {class}\" data-sort=\"{v}\">{v}</td></tr>\n",
            case = escape(&r.case),
            m = r.metric.name,
            b = r.baseline,
            bs = escape(&format_value(r.metric, r.baseline)),
            n = r.new,
            ns = escape(&format_value(r.metric, r.new)),
            change = escape(&format_change(r.change)),
            interval = escape(&format_interval(r)),
            thr = 100.0 * r.threshold,
            v = escape(&verdict_text(r).replace("**", "")),
        ));
    }
    out.push_str("</tbody></table></div>\n");
    out
}

/// compare.html: the same tables, deltas coloured (green improved, red regressed).
pub fn html(c: &Comparison) -> String {
    let mut body = String::from("<section id=\"verdict\">\n");
    let class = if c.regressions() + c.vanished() > 0 { "regressed" } else { "improved" };
    body.push_str(&format!("<h2 class=\"{class}\">{}</h2>\n", escape(&c.headline())));
    body.push_str(&format!(
        "<p class=\"muted\">Timings with raw samples: 95% bootstrap interval of the relative change of the \
         medians against ±{:.2}% ({}). Other metrics: the tolerance of the metric registry.</p>\n",
        100.0 * c.noise_threshold,
        escape(&c.threshold_source)
    ));
    body.push_str(
        "<div class=\"scroll\"><table><thead><tr><th class=\"text\"></th><th class=\"text\">baseline</th>\
                   <th class=\"text\">new</th></tr></thead><tbody>\n",
    );
    for (k, b, n) in [
        ("results", &c.baseline.path, &c.new.path),
        ("revision", &c.baseline.revision, &c.new.revision),
        ("started", &c.baseline.started_at, &c.new.started_at),
        ("machine", &c.baseline.machine, &c.new.machine),
    ] {
        body.push_str(&format!(
            "<tr><th class=\"text\">{k}</th><td class=\"text\">{}</td><td class=\"text\">{}</td></tr>\n",
            escape(b),
            escape(n)
        ));
    }
    body.push_str("</tbody></table></div>\n<ul>\n");
    for note in &c.notes {
        body.push_str(&format!("<li>{}</li>\n", escape(note)));
    }
    if !c.only_baseline.is_empty() {
        body.push_str(&format!("<li>only in the baseline: {}</li>\n", escape(&c.only_baseline.join(", "))));
    }
    if !c.only_new.is_empty() {
        body.push_str(&format!("<li>only in the new run: {}</li>\n", escape(&c.only_new.join(", "))));
    }
    if !c.missing_metrics.is_empty() {
        let missing = escape(&c.missing_metrics.join(", "));
        body.push_str(&format!("<li class=\"regressed\">measured in the baseline only: {missing}</li>\n"));
    }
    body.push_str("</ul>\n</section>\n<section id=\"changes\">\n<h2>Changes</h2>\n");
    let changed = changed(c);
    if changed.is_empty() {
        body.push_str("<p>None: every metric is within noise or tolerance.</p>\n");
    } else {
        body.push_str(&html_rows(&changed));
    }
    body.push_str("</section>\n<section id=\"all\">\n<h2>All comparisons</h2>\n");
    body.push_str(&html_rows(&c.rows.iter().collect::<Vec<_>>()));
    body.push_str("</section>\n");
    page(
        &format!("{} — quantbench compare", c.suite),
        &[format!("baseline {} · new {}", c.baseline.path, c.new.path)],
        &[("verdict", "Verdict"), ("changes", "Changes"), ("all", "All comparisons")],
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_change_handles_zero_and_infinity() {
        assert_eq!(relative_change(2.0, 2.2), 0.10000000000000009);
        assert_eq!(relative_change(0.0, 0.0), 0.0);
        assert_eq!(relative_change(0.0, 1e-3), f64::INFINITY);
        assert_eq!(relative_change(f64::INFINITY, 40.0), f64::NEG_INFINITY);
        assert_eq!(relative_change(f64::INFINITY, f64::INFINITY), 0.0);
    }

    #[test]
    fn bootstrap_separates_a_clear_shift_from_a_wobble() {
        let mut rng = SeededRng::new(9);
        let tight: Vec<f64> = (0..20).map(|_| 10.0 * (1.0 + 0.002 * rng.normal())).collect();
        let slower: Vec<f64> = tight.iter().map(|v| v * 1.10).collect();
        let ci = bootstrap_relative_change(&tight, &slower);
        assert!(ci[0] > 0.08 && ci[1] < 0.12, "{ci:?}");
        assert_eq!(interval_verdict(ci, 0.02, false), Verdict::Regressed);
        assert_eq!(interval_verdict(ci, 0.02, true), Verdict::Improved);

        let wide: Vec<f64> = (0..6).map(|_| 10.0 * (1.0 + 0.08 * rng.normal())).collect();
        let wobble: Vec<f64> = wide.iter().map(|v| v * 1.01).collect();
        let ci = bootstrap_relative_change(&wide, &wobble);
        assert!(ci[0] < 0.0, "{ci:?}");
        assert_eq!(interval_verdict(ci, 0.02, false), Verdict::WithinNoise);
    }

    #[test]
    fn tolerance_verdicts_follow_direction() {
        assert_eq!(tolerance_verdict(0.010, 0.0102, 0.01, false), Verdict::Regressed);
        assert_eq!(tolerance_verdict(0.010, 0.01005, 0.01, false), Verdict::WithinNoise);
        assert_eq!(tolerance_verdict(0.010, 0.009, 0.01, false), Verdict::Improved);
        assert_eq!(tolerance_verdict(0.95, 0.90, 0.005, true), Verdict::Regressed);
        assert_eq!(tolerance_verdict(100.0, 101.0, 0.0, false), Verdict::Regressed);
        assert_eq!(tolerance_verdict(0.0, 0.0, 0.0, false), Verdict::WithinNoise);
        assert_eq!(tolerance_verdict(f64::INFINITY, 35.0, 0.01, true), Verdict::Regressed);
        assert_eq!(tolerance_verdict(f64::INFINITY, f64::INFINITY, 0.01, true), Verdict::WithinNoise);
    }
}
