//! sentence-transformers' settings of an encoder folder: the sequence length it truncates
//! inputs to (`sentence_bert_config.json`'s `max_seq_length`) and its pooling
//! (`1_Pooling/config.json`), read so that `bench embed` and the encoder suites cut and pool
//! as the library users run does.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The sentence-transformers settings found beside a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentenceConfig {
    /// Tokens an input is cut to, special tokens included.
    pub max_seq_length: usize,
    /// The file that says so.
    pub source: PathBuf,
}

/// The pooling modes of `1_Pooling/config.json`; the harness pools by the mean alone.
const POOLING_MODES: [&str; 6] = [
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
];

/// `dir`'s sentence-transformers settings, `None` when it has no
/// `sentence_bert_config.json`. A pooling other than the mean is an error naming the file
/// and the mode, since the embeddings would not be the ones users get.
pub fn read(dir: &Path) -> Result<Option<SentenceConfig>> {
    let path = dir.join("sentence_bert_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let json = read_json(&path)?;
    let max_seq_length =
        json.get("max_seq_length").and_then(Value::as_u64).filter(|&n| n > 0).ok_or_else(|| {
            Error::ModelFormat {
                path: path.clone(),
                message: format!(
                    "key `max_seq_length` is {}, expected a positive integer",
                    json.get("max_seq_length").map_or("missing".into(), Value::to_string)
                ),
            }
        })? as usize;
    check_pooling(&dir.join("1_Pooling").join("config.json"))?;
    Ok(Some(SentenceConfig { max_seq_length, source: path }))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path: path.to_path_buf(), source: e })
}

/// Mean pooling, or no pooling config at all (sentence-transformers' default is the mean).
fn check_pooling(path: &Path) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let json = read_json(path)?;
    let on: Vec<&str> = POOLING_MODES
        .iter()
        .copied()
        .filter(|m| json.get(m).and_then(Value::as_bool) == Some(true))
        .collect();
    if on != ["pooling_mode_mean_tokens"] {
        return Err(Error::ModelFormat {
            path: path.to_path_buf(),
            message: format!(
                "pooling modes {} are on, expected pooling_mode_mean_tokens alone (the harness mean-pools)",
                if on.is_empty() { "none".into() } else { on.join(", ") }
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(config: Option<&str>, pooling: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        if let Some(c) = config {
            std::fs::write(dir.path().join("sentence_bert_config.json"), c).unwrap();
        }
        if let Some(p) = pooling {
            std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
            std::fs::write(dir.path().join("1_Pooling/config.json"), p).unwrap();
        }
        dir
    }

    #[test]
    fn reads_the_length_and_accepts_mean_pooling() {
        let dir = folder(
            Some(r#"{"max_seq_length": 256, "do_lower_case": false}"#),
            Some(
                r#"{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}"#,
            ),
        );
        let config = read(dir.path()).unwrap().unwrap();
        assert_eq!(config.max_seq_length, 256);
        assert!(config.source.ends_with("sentence_bert_config.json"));
        assert_eq!(read(folder(None, None).path()).unwrap(), None);
    }

    #[test]
    fn bad_settings_name_the_file_and_the_value() {
        let err = read(folder(Some(r#"{"max_seq_length": "long"}"#), None).path()).unwrap_err().to_string();
        assert!(err.contains("sentence_bert_config.json") && err.contains("\"long\""), "{err}");
        let cls = folder(Some(r#"{"max_seq_length": 128}"#), Some(r#"{"pooling_mode_cls_token": true}"#));
        let err = read(cls.path()).unwrap_err().to_string();
        assert!(err.contains("1_Pooling") && err.contains("pooling_mode_cls_token"), "{err}");
    }
}
