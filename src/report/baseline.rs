//! Named baselines: `bench run --save-baseline NAME` stores a run's results.json and
//! summary.md under `reports/baselines/NAME/`; `--baseline NAME` compares a run with it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::measure::results::Results;

/// Folder of the named baselines, relative to the working directory.
pub const BASELINES_DIR: &str = "reports/baselines";

/// The folder of baseline `name` under `root`, after checking the name.
pub fn dir(root: &Path, name: &str) -> Result<PathBuf> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(Error::Render(format!(
            "baseline name `{name}` is not allowed, expected letters, digits, `.`, `_` or `-` (not starting with `.`)"
        )));
    }
    Ok(root.join(name))
}

/// Store `results` (and its summary.md) as baseline `name`; returns the results.json path.
pub fn save(root: &Path, name: &str, results: &Results) -> Result<PathBuf> {
    let dir = dir(root, name)?;
    let path = dir.join("results.json");
    results.write(&path)?;
    crate::files::write_atomic(&dir.join("summary.md"), super::summary::markdown(results).as_bytes())?;
    Ok(path)
}

/// The results.json of baseline `name`, which must exist.
pub fn path(root: &Path, name: &str) -> Result<PathBuf> {
    let path = dir(root, name)?.join("results.json");
    if !path.is_file() {
        return Err(Error::Render(format!(
            "baseline `{name}` not found: {} does not exist, expected a results.json saved by \
             `bench run SUITE --save-baseline {name}`",
            path.display()
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_names() {
        let root = Path::new("b");
        assert_eq!(dir(root, "nightly-2").unwrap(), Path::new("b/nightly-2"));
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            let err = dir(root, bad).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")) && err.contains("expected"), "{err}");
        }
        let err = path(root, "missing").unwrap_err().to_string();
        assert!(err.contains("b/missing/results.json") && err.contains("--save-baseline missing"), "{err}");
    }
}
