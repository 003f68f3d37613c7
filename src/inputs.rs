//! Prompt and sentence files for `bench generate` and `bench embed`, read by extension:
//! `.jsonl` (one JSON string, or object with a `"prompt"` or `"text"` key, per line),
//! `.json` and `.yaml`/`.yml` (a list of such items), anything else one input per line.
//! The structured forms carry multi-line inputs (code, chat templates) whole.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Keys an object item may hold its text under, in order of preference.
const TEXT_KEYS: [&str; 2] = ["prompt", "text"];

/// The inputs in `path`, non-empty ones only; an error names the file, the item and what
/// was expected.
pub fn read(path: &Path) -> Result<Vec<String>> {
    let text = crate::files::read_text(path).map_err(|e| Error::io("cannot read", path, e))?;
    let bad = |message: String| Error::Inputs { path: path.to_path_buf(), message };
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let inputs = match extension.as_deref() {
        Some("jsonl") => text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                let value: Value =
                    serde_json::from_str(line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
                item_text(&value).map_err(|m| bad(format!("line {}: {m}", i + 1)))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(kind @ ("json" | "yaml" | "yml")) => {
            let value: Value = if kind == "json" {
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
            } else {
                serde_saphyr::from_str(&text).map_err(|e| bad(e.to_string()))?
            };
            let Value::Array(items) = value else {
                return Err(bad(format!("holds {}, expected a list of prompts", kind_of(&value))));
            };
            items
                .iter()
                .enumerate()
                .map(|(i, item)| item_text(item).map_err(|m| bad(format!("item {}: {m}", i + 1))))
                .collect::<Result<Vec<_>>>()?
        }
        _ => text.lines().map(String::from).collect(),
    };
    let inputs: Vec<String> = inputs.into_iter().filter(|t| !t.trim().is_empty()).collect();
    if inputs.is_empty() {
        return Err(bad("holds no non-empty input".into()));
    }
    Ok(inputs)
}

/// An item's text: a string, or an object's `"prompt"` (or `"text"`) string.
fn item_text(item: &Value) -> std::result::Result<String, String> {
    match item {
        Value::String(s) => Ok(s.clone()),
        Value::Object(map) => {
            TEXT_KEYS.iter().find_map(|k| map.get(*k)).and_then(Value::as_str).map(String::from).ok_or_else(
                || format!("an object without a string \"prompt\" or \"text\" (keys: {})", keys(map)),
            )
        }
        other => Err(format!("{}, expected a string or an object with \"prompt\"", kind_of(other))),
    }
}

fn keys(map: &serde_json::Map<String, Value>) -> String {
    map.keys().cloned().collect::<Vec<_>>().join(", ")
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODE: &str = "def add(a, b):\n    return a + b\n";
    const CHAT: &str = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn multi_line_prompts_round_trip_through_each_structured_format() {
        let dir = tempfile::tempdir().unwrap();
        let want = vec![CODE.to_string(), CHAT.to_string()];
        let jsonl =
            format!("{}\n\n{}\n", serde_json::json!({"prompt": CODE}), serde_json::to_string(CHAT).unwrap());
        assert_eq!(read(&write(dir.path(), "p.jsonl", &jsonl)).unwrap(), want);
        let json = serde_json::to_string(&serde_json::json!([CODE, {"text": CHAT}])).unwrap();
        assert_eq!(read(&write(dir.path(), "p.json", &json)).unwrap(), want);
        let yaml = "- |\n  def add(a, b):\n      return a + b\n- prompt: \"<|im_start|>user\\nHi there<|im_end|>\\n<|im_start|>assistant\\n\"\n";
        assert_eq!(read(&write(dir.path(), "p.yaml", yaml)).unwrap(), want);
        assert_eq!(read(&write(dir.path(), "p.txt", "one\n\n  \ntwo\n")).unwrap(), ["one", "two"]);
    }

    #[test]
    fn bad_items_name_the_file_the_item_and_the_expected_form() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            read(&write(dir.path(), "p.jsonl", "\"ok\"\n{\"question\": \"x\"}\n")).unwrap_err().to_string();
        assert!(err.contains("p.jsonl") && err.contains("line 2") && err.contains("question"), "{err}");
        let err = read(&write(dir.path(), "p.json", "{\"prompt\": \"x\"}")).unwrap_err().to_string();
        assert!(err.contains("an object, expected a list"), "{err}");
        let err = read(&write(dir.path(), "p.yaml", "- 3\n")).unwrap_err().to_string();
        assert!(err.contains("item 1: a number"), "{err}");
        let err = read(&write(dir.path(), "p.jsonl", "{not json\n")).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        let err = read(&write(dir.path(), "p.txt", "\n \n")).unwrap_err().to_string();
        assert!(err.contains("no non-empty input"), "{err}");
    }
}
