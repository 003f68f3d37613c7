//! The report's charts, drawn with plotters from results.json alone and written as PNG and
//! SVG: the KLD / size trade-off with its Pareto front, latency with confidence intervals,
//! bytes by tensor role, and the per-layer SQNR heat map. PNG text uses the bundled DejaVu
//! Sans subset, so no system font is needed.

use std::error::Error as StdError;
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::table::format_db;
use crate::error::{Error, Result};
use crate::measure::results::{CaseResult, Results};

/// The bundled font (DejaVu Sans, Latin subset; see assets/fonts/LICENSE).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

/// The family every chart draws text with.
const FAMILY: &str = "sans-serif";

type DrawResult = std::result::Result<(), Box<dyn StdError>>;

/// What a chart shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartKind {
    /// KLD (log) against bytes per parameter, colour for decode tok/s, Pareto front.
    Tradeoff,
    /// Prefill and decode medians per case with their 95% intervals.
    Latency,
    /// Stacked bytes by tensor role per case.
    Memory,
    /// SQNR of every quantized linear layer (or block) per case.
    LayerSqnr,
}

/// One chart of the report.
#[derive(Debug, Clone, Copy)]
pub struct ChartInfo {
    /// What it draws.
    pub kind: ChartKind,
    /// File stem under `charts/` (`.png` and `.svg`).
    pub file: &'static str,
    /// Heading in the HTML report.
    pub title: &'static str,
    /// How to read it.
    pub caption: &'static str,
}

/// Every chart of the report, in report order.
pub const CHARTS: &[ChartInfo] = &[
    ChartInfo {
        kind: ChartKind::Tradeoff,
        file: "tradeoff",
        title: "Divergence against size",
        caption: "Mean KL divergence from the reference (log scale) against bytes per parameter. \
                  Colour: decode tokens/s. The line joins the Pareto front of each model (no other \
                  scheme is both smaller and closer). A KLD of exactly 0 sits on the bottom edge.",
    },
    ChartInfo {
        kind: ChartKind::Latency,
        file: "latency",
        title: "Latency",
        caption: "Median prefill time and median decode step per scheme; whiskers are the 95% \
                  bootstrap confidence interval of the median.",
    },
    ChartInfo {
        kind: ChartKind::Memory,
        file: "memory",
        title: "Bytes by tensor role",
        caption: "Bytes of every tensor as the scheme stores it, stacked by role.",
    },
    ChartInfo {
        kind: ChartKind::LayerSqnr,
        file: "layer_sqnr",
        title: "Per-layer SQNR",
        caption: "SQNR (dB) of each quantized linear layer's output against the reference's, on the \
                  reference's inputs; darker is worse, the worst layer of each scheme is outlined \
                  in red, grey cells are identical outputs (infinite SQNR).",
    },
];

/// Register the bundled font with plotters once.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "the bundled font assets/fonts/DejaVuSans-subset.ttf is not a valid font".into())
        })
        .clone()
        .map_err(Error::Render)
}

/// Pixel size of a chart for these results.
pub fn size(kind: ChartKind, results: &Results) -> (u32, u32) {
    let rows = results.cases.len().max(1) as u32;
    match kind {
        ChartKind::Tradeoff => (1000, 640),
        ChartKind::Latency | ChartKind::Memory => (1000, 140 + 26 * rows),
        // Without per-layer data the chart is only its message.
        ChartKind::LayerSqnr if results.cases.iter().all(|c| c.layers.is_empty()) => (1100, 120),
        ChartKind::LayerSqnr => (1100, 190 + 30 * rows),
    }
}

fn render_error(chart: &ChartInfo, e: Box<dyn StdError>) -> Error {
    Error::Render(format!("cannot draw chart {}: {e}", chart.file))
}

/// The chart as an SVG document.
pub fn svg(chart: &ChartInfo, results: &Results) -> Result<String> {
    ensure_font()?;
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, size(chart.kind, results)).into_drawing_area();
        draw(chart.kind, results, &root)
            .and_then(|_| root.present().map_err(Into::into))
            .map_err(|e| render_error(chart, e))?;
    }
    Ok(text)
}

/// The chart as a PNG file.
pub fn png(chart: &ChartInfo, results: &Results) -> Result<Vec<u8>> {
    ensure_font()?;
    let (w, h) = size(chart.kind, results);
    let mut rgb = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(chart.kind, results, &root)
            .and_then(|_| root.present().map_err(Into::into))
            .map_err(|e| render_error(chart, e))?;
    }
    let mut out = Vec::new();
    let mut encoder = ::png::Encoder::new(&mut out, w, h);
    encoder.set_color(::png::ColorType::Rgb);
    encoder.set_depth(::png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&rgb))
        .map_err(|e| Error::Render(format!("cannot encode chart {} as png: {e}", chart.file)))?;
    Ok(out)
}

fn draw<DB: DrawingBackend>(kind: ChartKind, results: &Results, root: &DrawingArea<DB, Shift>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    match kind {
        ChartKind::Tradeoff => tradeoff(results, root),
        ChartKind::Latency => latency(results, root),
        ChartKind::Memory => memory(results, root),
        ChartKind::LayerSqnr => layer_sqnr(results, root),
    }
}

// ---- shared pieces ------------------------------------------------------------------

fn font(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&BLACK)
}

/// A case's name on a chart: its label, prefixed by the model when there are several.
fn case_name(results: &Results, case: &CaseResult) -> String {
    if results.models.len() > 1 {
        format!("{}/{}", case.model, case.label)
    } else {
        case.label.clone()
    }
}

/// A message in the middle of an otherwise empty chart.
fn empty<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, message: &str) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = root.dim_in_pixel();
    root.draw(&Text::new(title.to_string(), (20, 16), font(22)))?;
    let style = font(16).color(&RGBColor(90, 90, 90)).pos(Pos::new(HPos::Center, VPos::Center));
    root.draw(&Text::new(message.to_string(), (w as i32 / 2, h as i32 / 2), style))?;
    Ok(())
}

/// Viridis, sampled: `t` in [0, 1] from dark purple to yellow.
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 6] =
        [(68, 1, 84), (65, 68, 135), (42, 120, 142), (34, 168, 132), (122, 209, 81), (253, 231, 37)];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 } * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A vertical colour bar with its low and high labels, at `x, y` (top-left).
fn colour_bar<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    height: i32,
    title: &str,
    labels: (String, String),
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.draw(&Text::new(title.to_string(), (x, y - 22), font(14)))?;
    let steps = 40;
    for s in 0..steps {
        let t = 1.0 - s as f64 / (steps - 1) as f64;
        let top = y + s * height / steps;
        let bottom = y + (s + 1) * height / steps;
        root.draw(&Rectangle::new([(x, top), (x + 18, bottom)], viridis(t).filled()))?;
    }
    root.draw(&Rectangle::new([(x, y), (x + 18, y + height)], BLACK.stroke_width(1)))?;
    root.draw(&Text::new(labels.1, (x + 24, y - 2), font(13)))?;
    root.draw(&Text::new(labels.0, (x + 24, y + height - 12), font(13)))?;
    Ok(())
}

/// Drop trailing zeros of a decimal mantissa: `2.50` → `2.5`, `1.0e-4` → `1e-4`.
fn trim_zeros(text: String) -> String {
    let (mantissa, exponent) = match text.split_once('e') {
        Some((m, e)) => (m.to_string(), format!("e{e}")),
        None => (text, String::new()),
    };
    let mantissa = if mantissa.contains('.') {
        mantissa.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        mantissa
    };
    mantissa + &exponent
}

/// Short significant-digit formatting for axis labels and annotations.
fn short(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim_zeros(format!("{v:.2}"))
    } else if a >= 1e-3 {
        trim_zeros(format!("{v:.4}"))
    } else {
        trim_zeros(format!("{v:.1e}"))
    }
}

/// Category labels at the left of a chart, one per row (`rows[0]` on top), right-aligned
/// against the y axis. The chart's y coordinate of row `i` is `n - 1 - i`.
fn row_labels<DB: DrawingBackend, X: Ranged<ValueType = f64>>(
    root: &DrawingArea<DB, Shift>,
    chart: &ChartContext<DB, Cartesian2d<X, RangedCoordf64>>,
    x_left: f64,
    rows: &[String],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let n = rows.len();
    let style = font(13).pos(Pos::new(HPos::Right, VPos::Center));
    for (i, label) in rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(x_left, (n - 1 - i) as f64));
        root.draw(&Text::new(label.clone(), (px - 8, py), style.clone()))?;
    }
    Ok(())
}

/// Room for the longest of `labels` at 13 px, in pixels.
fn label_room(labels: &[String]) -> u32 {
    labels.iter().map(|s| s.chars().count()).max().unwrap_or(4).clamp(4, 32) as u32 * 8 + 16
}

// ---- (a) trade-off ------------------------------------------------------------------

struct Point {
    model: String,
    name: String,
    x: f64,
    kld: f64,
    tokens_per_s: Option<f64>,
}

/// The Pareto front of `points` (minimise both x and y): indices sorted by x.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| points[a].0.total_cmp(&points[b].0).then(points[a].1.total_cmp(&points[b].1)));
    let mut front = Vec::new();
    let mut best = f64::INFINITY;
    for i in order {
        if points[i].1 < best {
            best = points[i].1;
            front.push(i);
        }
    }
    front
}

fn tradeoff<DB: DrawingBackend>(results: &Results, root: &DrawingArea<DB, Shift>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let title = "KL divergence against bytes per parameter";
    let points: Vec<Point> = results
        .cases
        .iter()
        .filter_map(|c| {
            let kld = c.divergence_stats()?.kld.mean;
            let x = c.memory.as_ref()?.bytes_per_parameter;
            (kld.is_finite() && x.is_finite()).then(|| Point {
                model: c.model.clone(),
                name: case_name(results, c),
                x,
                kld: kld.max(0.0),
                tokens_per_s: c.latency.as_ref().and_then(|l| l.decode_tokens_per_s),
            })
        })
        .collect();
    if points.is_empty() {
        return empty(root, title, "no case has both a byte account and KL divergence statistics");
    }
    let positive = points.iter().map(|p| p.kld).filter(|k| *k > 0.0);
    let min_pos = positive.clone().fold(f64::INFINITY, f64::min);
    let max_pos = positive.fold(0.0, f64::max);
    // KLD 0 (the reference itself) cannot sit on a log axis: it goes on a floor a decade
    // below the smallest positive value, drawn as the bottom edge.
    let floor = if min_pos.is_finite() { min_pos / 10.0 } else { 1e-6 };
    let top = if max_pos > 0.0 { max_pos * 3.0 } else { floor * 100.0 };
    let x_max = points.iter().map(|p| p.x).fold(0.0, f64::max) * 1.12 + 0.05;
    let speeds: Vec<f64> = points.iter().filter_map(|p| p.tokens_per_s).collect();
    let (s_lo, s_hi) =
        (speeds.iter().copied().fold(f64::INFINITY, f64::min), speeds.iter().copied().fold(0.0, f64::max));
    let colour = |p: &Point| match p.tokens_per_s {
        Some(s) if s_hi > s_lo => viridis((s - s_lo) / (s_hi - s_lo)),
        Some(_) => viridis(0.6),
        None => RGBColor(150, 150, 150),
    };

    let (w, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(w as i32 - 150);
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, font(22))
        .margin(14)
        .x_label_area_size(46)
        .y_label_area_size(76)
        .build_cartesian_2d(0.0..x_max, (floor * 0.7..top).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("bytes per parameter (everything stored)")
        .y_desc("mean KLD (nat)")
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .label_style(font(13))
        .axis_desc_style(font(15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    let y_of = |k: f64| if k > 0.0 { k } else { floor };
    let mut models: Vec<&str> = points.iter().map(|p| p.model.as_str()).collect();
    models.dedup();
    for model in models {
        let idx: Vec<usize> = (0..points.len()).filter(|&i| points[i].model == model).collect();
        let coords: Vec<(f64, f64)> = idx.iter().map(|&i| (points[i].x, y_of(points[i].kld))).collect();
        let front = pareto_front(&coords);
        let mut path = Vec::new();
        for (n, &f) in front.iter().enumerate() {
            if n > 0 {
                path.push((coords[f].0, path.last().map_or(coords[f].1, |p: &(f64, f64)| p.1)));
            }
            path.push(coords[f]);
        }
        chart.draw_series(std::iter::once(PathElement::new(path, RGBColor(200, 60, 60).stroke_width(2))))?;
    }
    chart.draw_series(
        points.iter().map(|p| Circle::new((p.x, y_of(p.kld)), 7, ShapeStyle::from(&colour(p)).filled())),
    )?;
    chart.draw_series(points.iter().map(|p| Circle::new((p.x, y_of(p.kld)), 7, BLACK.stroke_width(1))))?;

    // Labels: try a few places around each point and keep the first that overlaps no
    // earlier label and no point.
    let mut taken: Vec<(i32, i32, i32, i32)> = points
        .iter()
        .map(|p| {
            let (x, y) = chart.backend_coord(&(p.x, y_of(p.kld)));
            (x - 7, y - 7, x + 7, y + 7)
        })
        .collect();
    let overlaps =
        |a: &(i32, i32, i32, i32), b: &(i32, i32, i32, i32)| a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3;
    for p in &points {
        let (x, y) = chart.backend_coord(&(p.x, y_of(p.kld)));
        let text = if p.kld == 0.0 { format!("{} (KLD 0)", p.name) } else { p.name.clone() };
        let (tw, _) = root.estimate_text_size(&text, &font(13))?;
        let (tw, th) = (tw as i32, 14);
        let candidates = [
            (x + 10, y - th / 2),
            (x - 10 - tw, y - th / 2),
            (x - tw / 2, y - 12 - th),
            (x - tw / 2, y + 11),
            (x + 10, y - th - 6),
            (x + 10, y + 6),
            (x - 10 - tw, y - th - 6),
            (x - 10 - tw, y + 6),
        ];
        let place = candidates
            .iter()
            .map(|&(lx, ly)| (lx, ly, lx + tw, ly + th))
            .find(|b| !taken.iter().any(|t| overlaps(b, t)))
            .unwrap_or((x + 10, y - th / 2, x + 10 + tw, y + th / 2));
        taken.push(place);
        plot.draw(&Text::new(text, (place.0, place.1), font(13)))?;
    }

    if speeds.is_empty() {
        legend.draw(&Text::new("grey: no decode", (10, 60), font(13)))?;
    } else {
        colour_bar(&legend, (14, 90), 220, "decode tok/s", (short(s_lo), short(s_hi)))?;
    }
    legend.draw(&Text::new("red line:", (10, 360), font(13)))?;
    legend.draw(&Text::new("Pareto front", (10, 378), font(13)))?;
    Ok(())
}

// ---- (b) latency --------------------------------------------------------------------

fn latency<DB: DrawingBackend>(results: &Results, root: &DrawingArea<DB, Shift>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let cases: Vec<&CaseResult> = results.cases.iter().filter(|c| c.latency.is_some()).collect();
    if cases.is_empty() {
        return empty(root, "Latency", "no case measured latency");
    }
    let names: Vec<String> = cases.iter().map(|c| case_name(results, c)).collect();
    let prefill: Vec<Option<(f64, [f64; 2])>> =
        cases.iter().map(|c| c.latency.as_ref().map(|l| (l.prefill.median, l.prefill.median_ci95))).collect();
    let decode: Vec<Option<(f64, [f64; 2])>> = cases
        .iter()
        .map(|c| c.latency.as_ref().and_then(|l| l.decode.as_ref()).map(|d| (d.median, d.median_ci95)))
        .collect();
    let area = root.titled("Latency: median and 95% interval of the median", font(22))?;
    let (w, _) = area.dim_in_pixel();
    let (left, right) = area.split_horizontally(w as i32 / 2);
    let prefill_desc = format!("prefill ms ({} prompt tokens)", results.workload.prompt_len);
    bars(root, &left, &names, &prefill, &prefill_desc, true, RGBColor(65, 105, 170))?;
    if decode.iter().all(Option::is_none) {
        let (pw, ph) = right.dim_in_pixel();
        let style = font(15).color(&RGBColor(90, 90, 90)).pos(Pos::new(HPos::Center, VPos::Center));
        right.draw(&Text::new("no decode steps (encoders)", (pw as i32 / 2, ph as i32 / 2), style))?;
    } else {
        bars(root, &right, &names, &decode, "decode ms per step", false, RGBColor(40, 150, 120))?;
    }
    Ok(())
}

/// Horizontal bars with confidence whiskers, one row per name (first name on top).
fn bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    area: &DrawingArea<DB, Shift>,
    names: &[String],
    values: &[Option<(f64, [f64; 2])>],
    x_desc: &str,
    with_labels: bool,
    colour: RGBColor,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let n = names.len();
    let max =
        values.iter().flatten().map(|(m, ci)| m.max(ci[1])).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let x_max = if max > 0.0 { max * 1.2 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(if with_labels { label_room(names) } else { 12 })
        .build_cartesian_2d(0.0..x_max, -0.5..(n as f64 - 0.5))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc(x_desc)
        .x_labels(6)
        .x_label_formatter(&|v| short(*v))
        .label_style(font(13))
        .axis_desc_style(font(14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    if with_labels {
        row_labels(root, &chart, 0.0, names)?;
    }
    let whisker = BLACK.stroke_width(2);
    for (i, value) in values.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let Some((median, ci)) = value else { continue };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y - 0.32), (*median, y + 0.32)],
            colour.mix(0.8).filled(),
        )))?;
        let (lo, hi) = (ci[0].min(*median), ci[1].max(*median));
        chart.draw_series(std::iter::once(PathElement::new(vec![(lo, y), (hi, y)], whisker)))?;
        for end in [lo, hi] {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(end, y - 0.18), (end, y + 0.18)],
                whisker,
            )))?;
        }
        let (px, py) = chart.backend_coord(&(hi, y));
        root.draw(&Text::new(
            short(*median),
            (px + 6, py),
            font(12).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

// ---- (c) memory ---------------------------------------------------------------------

/// Fixed colours for tensor roles, cycled.
const ROLE_COLOURS: [RGBColor; 8] = [
    RGBColor(65, 105, 170),
    RGBColor(230, 140, 50),
    RGBColor(60, 160, 90),
    RGBColor(200, 70, 70),
    RGBColor(140, 100, 180),
    RGBColor(140, 90, 70),
    RGBColor(220, 120, 180),
    RGBColor(120, 120, 120),
];

fn memory<DB: DrawingBackend>(results: &Results, root: &DrawingArea<DB, Shift>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let cases: Vec<&CaseResult> = results.cases.iter().filter(|c| c.memory.is_some()).collect();
    if cases.is_empty() {
        return empty(root, "Bytes by tensor role", "no case measured memory");
    }
    let mut roles: Vec<&str> = Vec::new();
    for c in &cases {
        let stored = c.memory.as_ref().map(|m| m.bytes_by_role.iter()).into_iter().flatten();
        for (role, _) in stored.filter(|(_, bytes)| **bytes > 0) {
            if !roles.contains(&role.as_str()) {
                roles.push(role);
            }
        }
    }
    let max_total = cases.iter().filter_map(|c| c.memory.as_ref()).map(|m| m.total_bytes).max().unwrap_or(0);
    let (unit, scale) =
        if max_total as f64 >= 1024.0 * 1024.0 { ("MiB", 1024.0 * 1024.0) } else { ("KiB", 1024.0) };
    let names: Vec<String> = cases.iter().map(|c| case_name(results, c)).collect();
    let n = cases.len();
    let (w, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(w as i32 - 170);
    // Room on the right of the longest bar for its total.
    let x_max = (max_total as f64 / scale).max(f64::MIN_POSITIVE) * 1.4;
    let mut chart = ChartBuilder::on(&plot)
        .caption("Bytes by tensor role", font(22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(label_room(&names))
        .build_cartesian_2d(0.0..x_max, -0.5..(n as f64 - 0.5))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc(format!("{unit} stored"))
        .x_label_formatter(&|v| short(*v))
        .label_style(font(13))
        .axis_desc_style(font(14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    row_labels(root, &chart, 0.0, &names)?;
    let mut end = vec![0.0; n];
    for (r, role) in roles.iter().enumerate() {
        let colour = ROLE_COLOURS[r % ROLE_COLOURS.len()];
        for (i, c) in cases.iter().enumerate() {
            let bytes = c.memory.as_ref().and_then(|m| m.bytes_by_role.get(*role)).copied().unwrap_or(0);
            if bytes == 0 {
                continue;
            }
            let y = (n - 1 - i) as f64;
            let start = end[i];
            end[i] += bytes as f64 / scale;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(start, y - 0.32), (end[i], y + 0.32)],
                colour.filled(),
            )))?;
        }
        let y = 40 + 22 * r as i32;
        legend.draw(&Rectangle::new([(8, y - 7), (22, y + 7)], colour.filled()))?;
        legend.draw(&Text::new(
            role.replace('_', " "),
            (28, y),
            font(13).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    for (i, c) in cases.iter().enumerate() {
        let Some(m) = c.memory.as_ref() else { continue };
        let (px, py) = chart.backend_coord(&(end[i], (n - 1 - i) as f64));
        let text =
            format!("{} {unit} · {:.2} bits/weight", short(m.total_bytes as f64 / scale), m.bits_per_weight);
        root.draw(&Text::new(text, (px + 6, py), font(12).pos(Pos::new(HPos::Left, VPos::Center))))?;
    }
    Ok(())
}

// ---- (d) per-layer SQNR heat map ----------------------------------------------------

/// `layers.3.self_attn.q_proj` → `3.q_proj`.
fn short_layer(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').filter(|p| !matches!(*p, "layers" | "model" | "h")).collect();
    match parts.as_slice() {
        [index, .., last] if index.chars().all(|c| c.is_ascii_digit()) => format!("{index}.{last}"),
        _ => name.to_string(),
    }
}

fn layer_sqnr<DB: DrawingBackend>(results: &Results, root: &DrawingArea<DB, Shift>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let title = "Per-layer SQNR (dB)";
    // Linear layers when any case has them, else blocks.
    let kind = if results.cases.iter().any(|c| c.layers.iter().any(|l| l.kind == "linear")) {
        "linear"
    } else {
        "block"
    };
    let mut layers: Vec<&str> = Vec::new();
    for c in &results.cases {
        for l in c.layers.iter().filter(|l| l.kind == kind) {
            if !layers.contains(&l.name.as_str()) {
                layers.push(&l.name);
            }
        }
    }
    let cases: Vec<&CaseResult> =
        results.cases.iter().filter(|c| c.layers.iter().any(|l| l.kind == kind)).collect();
    if layers.is_empty() {
        return empty(root, title, "no per-layer SQNR in results.json (not measured for these cases)");
    }
    let finite: Vec<f64> = cases
        .iter()
        .flat_map(|c| c.layers.iter())
        .filter(|l| l.kind == kind && l.sqnr_db.is_finite())
        .map(|l| l.sqnr_db)
        .collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi.max(lo + 1e-9)) } else { (0.0, 1.0) };
    let names: Vec<String> = cases.iter().map(|c| case_name(results, c)).collect();
    let (ncols, nrows) = (layers.len(), cases.len());

    let (w, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(w as i32 - 130);
    let what =
        if kind == "linear" { "quantized linear layers" } else { "blocks (hidden state after the block)" };
    let mut chart = ChartBuilder::on(&plot)
        .caption(format!("{title}: {what}"), font(20))
        .margin(12)
        .margin_right(150)
        .x_label_area_size(48)
        .y_label_area_size(label_room(&names))
        .build_cartesian_2d(0.0..ncols as f64, -0.5..(nrows as f64 - 0.5))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc(format!("{} {what}, in model order", layers.len()))
        .axis_desc_style(font(14))
        .draw()?;
    row_labels(root, &chart, 0.0, &names)?;
    // Column labels: as many as fit without overlapping.
    let short_names: Vec<String> = layers.iter().map(|l| short_layer(l)).collect();
    let (x0, _) = chart.backend_coord(&(0.0, 0.0));
    let (x1, y_axis) = chart.backend_coord(&(ncols as f64, -0.5));
    let widest = short_names.iter().map(|s| s.chars().count()).max().unwrap_or(1) as i32 * 7 + 10;
    let fit = (((x1 - x0) / widest).max(1)) as usize;
    let step = ncols.div_ceil(fit).max(1);
    for j in (0..ncols).step_by(step) {
        let (px, _) = chart.backend_coord(&(j as f64 + 0.5, 0.0));
        let style = font(12).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new(short_names[j].clone(), (px, y_axis + 5), style))?;
    }
    let cell = |x: usize, y: usize| [(x as f64, y as f64 - 0.5), (x as f64 + 1.0, y as f64 + 0.5)];
    for (i, c) in cases.iter().enumerate() {
        let y = nrows - 1 - i;
        let mut worst: Option<(usize, f64)> = None;
        let mut rects = Vec::new();
        for l in c.layers.iter().filter(|l| l.kind == kind) {
            let Some(x) = layers.iter().position(|n| *n == l.name) else { continue };
            let colour = if l.sqnr_db.is_finite() {
                viridis((l.sqnr_db - lo) / (hi - lo))
            } else {
                RGBColor(215, 215, 215)
            };
            rects.push(Rectangle::new(cell(x, y), colour.filled()));
            if l.sqnr_db.is_finite() && worst.is_none_or(|(_, w)| l.sqnr_db < w) {
                worst = Some((x, l.sqnr_db));
            }
        }
        chart.draw_series(rects)?;
        if let Some((x, db)) = worst {
            chart.draw_series(std::iter::once(Rectangle::new(
                cell(x, y),
                RGBColor(230, 30, 30).stroke_width(3),
            )))?;
            let (px, py) = chart.backend_coord(&(ncols as f64, y as f64));
            let text = format!("min {} dB ({})", format_db(db), short_names[x]);
            let style = font(12).color(&RGBColor(200, 20, 20)).pos(Pos::new(HPos::Left, VPos::Center));
            plot.draw(&Text::new(text, (px + 6, py), style))?;
        }
    }
    let (_, h) = legend.dim_in_pixel();
    let bar = (h as i32 - 150).clamp(40, 220);
    colour_bar(&legend, (14, 60), bar, "SQNR dB", (format!("{lo:.1}"), format!("{hi:.1}")))?;
    let y = 60 + bar + 18;
    legend.draw(&Rectangle::new([(14, y), (32, y + 16)], RGBColor(215, 215, 215).filled()))?;
    legend.draw(&Text::new("identical (∞)", (38, y + 1), font(13)))?;
    legend.draw(&Rectangle::new([(14, y + 26), (32, y + 42)], RGBColor(230, 30, 30).stroke_width(3)))?;
    legend.draw(&Text::new("worst layer", (38, y + 27), font(13)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_front_keeps_undominated_points_in_x_order() {
        let pts = [(4.0, 0.0), (2.0, 0.001), (2.0, 0.01), (1.0, 0.05), (1.2, 0.1), (0.5, 0.3)];
        assert_eq!(pareto_front(&pts), vec![5, 3, 1, 0]);
        assert!(pareto_front(&[]).is_empty());
    }

    #[test]
    fn viridis_spans_its_stops_and_tolerates_nan() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(f64::NAN), RGBColor(68, 1, 84));
        assert_eq!(viridis(7.0), RGBColor(253, 231, 37));
    }

    #[test]
    fn short_numbers_drop_trailing_zeros() {
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(2.0), "2");
        assert_eq!(short(1e-4), "1e-4");
        assert_eq!(short(5.67e-7), "5.7e-7");
        assert_eq!(short(0.0123), "0.0123");
        assert_eq!(short(2614.2), "2614");
    }

    #[test]
    fn layer_names_shorten_to_index_and_leaf() {
        assert_eq!(short_layer("layers.3.self_attn.q_proj"), "3.q_proj");
        assert_eq!(short_layer("model.layers.12.mlp.down_proj"), "12.down_proj");
        assert_eq!(short_layer("lm_head"), "lm_head");
    }

    #[test]
    fn bundled_font_registers() {
        ensure_font().unwrap();
    }
}
