//! Models named `org/name`: found in the Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`,
//! `~/.cache/huggingface/hub`), or downloaded into it ([`super::hub_download`]: the hub's
//! file API from Rust, `HF_ENDPOINT` and `HF_TOKEN` honoured) unless `HF_HUB_OFFLINE` is
//! set.

use std::path::{Path, PathBuf};

use super::hub_download::HubClient;

use crate::error::{Error, Result};

/// Files fetched for a model: config, tokenizer and safetensors weights (not the
/// PyTorch, TensorFlow or ONNX copies many repositories also hold).
const PATTERNS: &[&str] = &["*.json", "*.safetensors", "*.txt", "tokenizer.model"];

/// The revision fetched.
const REVISION: &str = "main";

/// True for a string shaped like a hub repository id (`org/name`) rather than a path.
pub fn looks_like_repo(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (org, name, rest) = (parts.next(), parts.next(), parts.next());
    let plain = |s: &str| {
        !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_alphanumeric() || "-_.".contains(c))
    };
    matches!((org, name, rest), (Some(o), Some(n), None) if plain(o) && plain(n))
}

/// The hub cache directory, as huggingface_hub computes it.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = env("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = env("HF_HOME") {
        return home.join("hub");
    }
    let cache = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| ".cache".into());
    cache.join("huggingface").join("hub")
}

fn offline() -> bool {
    ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"].iter().any(|k| {
        std::env::var(k).is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
    })
}

/// The snapshot directory of `repo` in the cache (the `main` ref's revision, else the
/// only snapshot), if it holds a config.json.
fn cached_snapshot(repo_dir: &Path) -> Option<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    let by_ref = std::fs::read_to_string(repo_dir.join("refs").join("main"))
        .ok()
        .map(|rev| snapshots.join(rev.trim()));
    let candidates: Vec<PathBuf> = match by_ref {
        Some(dir) => vec![dir],
        None => std::fs::read_dir(&snapshots).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect(),
    };
    match candidates.as_slice() {
        [one] if one.join("config.json").is_file() => Some(one.clone()),
        _ => None,
    }
}

/// The local directory of hub model `repo`, fetching it first when allowed.
pub fn resolve(repo: &str) -> Result<PathBuf> {
    let cache = cache_dir();
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if let Some(dir) = cached_snapshot(&repo_dir) {
        return Ok(dir);
    }
    let manual = format!(
        "download it where the network allows (`bench` fetches it when HF_HUB_OFFLINE is unset) and copy {} \
         here, or point the suite at a directory holding config.json, the safetensors weights and tokenizer.json",
        repo_dir.display()
    );
    if offline() {
        return Err(Error::ModelMissing {
            what: "snapshot",
            path: repo_dir,
            hint: format!("not in the Hugging Face cache and HF_HUB_OFFLINE is set; {manual}"),
        });
    }
    let client = HubClient::from_env(|k| std::env::var(k).ok());
    let snapshot = client.download(repo, REVISION, PATTERNS, &cache)?;
    if snapshot.join("config.json").is_file() {
        return Ok(snapshot);
    }
    Err(Error::ModelMissing {
        what: "config.json",
        path: snapshot,
        hint: format!("the download of {repo} holds no config.json; {manual}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(looks_like_repo("bigscience/bloom-560m"));
        assert!(looks_like_repo("HuggingFaceTB/SmolLM2-135M-Instruct"));
        for path in ["models/a/b", "./x", "/abs/path", "single", "../up/x", "a/"] {
            assert!(!looks_like_repo(path), "{path}");
        }
    }

    #[test]
    fn cached_snapshot_follows_the_main_ref() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("models--org--m");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        assert_eq!(cached_snapshot(&repo), None, "no config.json yet");
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        assert_eq!(cached_snapshot(&repo), Some(snap));
    }
}
