//! Typed access to a Hugging Face `config.json`, with errors that name the key and the
//! value expected.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct ConfigJson {
    path: PathBuf,
    value: Value,
}

impl ConfigJson {
    /// Read and parse `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| Error::Json { path: path.to_path_buf(), source: e })?;
        if !value.is_object() {
            return Err(Error::Config { path: path.to_path_buf(), message: "expected a JSON object".into() });
        }
        Ok(ConfigJson { path: path.to_path_buf(), value })
    }

    /// A config from a value (built-in models, tests).
    pub fn from_value(path: PathBuf, value: Value) -> Self {
        ConfigJson { path, value }
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw JSON.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The value at `key`; `a.b` reaches into nested objects.
    pub fn get(&self, key: &str) -> Option<&Value> {
        key.split('.').try_fold(&self.value, |v, part| v.get(part)).filter(|v| !v.is_null())
    }

    fn error(&self, message: String) -> Error {
        Error::Config { path: self.path.clone(), message }
    }

    /// A required positive integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.error(format!("key `{key}` is {v}, expected a positive integer"))),
            None => Err(self.error(format!("key `{key}` is missing, expected a positive integer"))),
        }
    }

    /// An optional positive integer.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    /// The first of `keys` that is present, as a required positive integer (configs name
    /// some sizes differently across versions, e.g. BLOOM's `n_embed` / `hidden_size`).
    pub fn usize_first(&self, keys: &[&str]) -> Result<usize> {
        match keys.iter().find(|k| self.get(k).is_some()) {
            Some(key) => self.usize(key),
            None => {
                Err(self
                    .error(format!("key `{}` is missing, expected a positive integer", keys.join("` or `"))))
            }
        }
    }

    /// An optional number.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            Some(v) => v.as_f64().ok_or_else(|| self.error(format!("key `{key}` is {v}, expected a number"))),
            None => Ok(default),
        }
    }

    /// A norm's epsilon: a number that stays positive as f32. Zero (or a value that
    /// rounds to it) divides zero by zero on an all-zero row, making every output NaN.
    pub fn epsilon_or(&self, key: &str, default: f64) -> Result<f32> {
        let eps = self.f64_or(key, default)?;
        if (eps as f32) > 0.0 && (eps as f32).is_finite() {
            return Ok(eps as f32);
        }
        Err(self.error(format!("key `{key}` is {eps}, expected a positive number (at least 1e-38)")))
    }

    /// The first of `keys` that is present, as a number.
    pub fn f64_first(&self, keys: &[&str], default: f64) -> Result<f64> {
        match keys.iter().find(|k| self.get(k).is_some()) {
            Some(key) => self.f64_or(key, default),
            None => Ok(default),
        }
    }

    /// An optional boolean.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => {
                v.as_bool().ok_or_else(|| self.error(format!("key `{key}` is {v}, expected true or false")))
            }
            None => Ok(default),
        }
    }

    /// An optional string.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// A value the architecture cannot use.
    pub fn unsupported(&self, key: &str, found: &Value, expected: &str) -> Error {
        self.error(format!("key `{key}` is {found}, expected {expected}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> ConfigJson {
        ConfigJson::from_value("config.json".into(), v)
    }

    #[test]
    fn errors_name_the_key_and_expectation() {
        let c = cfg(json!({"hidden_size": -3, "rope_parameters": {"rope_theta": 5e5}}));
        let err = c.usize("hidden_size").unwrap_err().to_string();
        assert!(err.contains("`hidden_size` is -3, expected a positive integer"), "{err}");
        let err = c.usize("num_hidden_layers").unwrap_err().to_string();
        assert!(err.contains("`num_hidden_layers` is missing"), "{err}");
        assert_eq!(c.f64_first(&["rope_theta", "rope_parameters.rope_theta"], 1e4).unwrap(), 5e5);
    }

    #[test]
    fn a_norm_epsilon_must_stay_positive_as_f32() {
        let c = cfg(json!({"rms_norm_eps": 0.0, "tiny": 1e-60, "fine": 1e-6}));
        let err = c.epsilon_or("rms_norm_eps", 1e-6).unwrap_err().to_string();
        assert!(err.contains("`rms_norm_eps` is 0, expected a positive number"), "{err}");
        assert!(c.epsilon_or("tiny", 1e-6).is_err());
        assert_eq!(c.epsilon_or("fine", 1.0).unwrap(), 1e-6);
        assert_eq!(c.epsilon_or("absent", 1e-5).unwrap(), 1e-5);
    }
}
