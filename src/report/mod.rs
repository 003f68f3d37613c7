//! Results and their renderings: results.json (the source of truth, written atomically
//! after every case), and everything derived from it alone: the Markdown and CSV tables,
//! summary.md, the charts, index.html, and the comparison of two runs.

pub mod baseline;
pub mod charts;
pub mod compare;
pub mod html;
pub mod merge;
pub mod summary;
pub mod table;

use std::path::Path;

use crate::error::Result;

use crate::files::write_atomic;
pub use crate::measure::results::{CaseResult, Results};

/// Folder under a run's output that holds the charts.
pub const CHARTS_DIR: &str = "charts";

/// The results file of `path`: `path` itself when it is a file, else `path/results.json`.
pub fn results_path(path: &Path) -> std::path::PathBuf {
    if path.is_dir() {
        path.join("results.json")
    } else {
        path.to_path_buf()
    }
}

/// Render every report of `results` into `dir`: results.md, results.csv, summary.md,
/// charts/*.png and *.svg, and index.html. Returns the files written.
pub fn render(results: &Results, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    table::write_tables(results, dir)?;
    let mut written = vec![dir.join("results.md"), dir.join("results.csv")];
    let summary_path = dir.join("summary.md");
    write_atomic(&summary_path, summary::markdown(results).as_bytes())?;
    written.push(summary_path);
    let mut svgs = Vec::new();
    for chart in charts::CHARTS {
        let svg = charts::svg(chart, results)?;
        let base = dir.join(CHARTS_DIR).join(chart.file);
        write_atomic(&base.with_extension("svg"), svg.as_bytes())?;
        write_atomic(&base.with_extension("png"), &charts::png(chart, results)?)?;
        written.extend([base.with_extension("png"), base.with_extension("svg")]);
        svgs.push(svg);
    }
    let index = dir.join("index.html");
    write_atomic(&index, html::index(results, &svgs).as_bytes())?;
    written.push(index);
    Ok(written)
}
