//! Downloading a model repository from the Hugging Face hub into the hub's own cache
//! layout, in Rust (no Python at run time).
//!
//! The protocol is the hub's file API, as `huggingface_hub` uses it:
//! - `GET {endpoint}/api/models/{repo}/revision/{revision}` lists the files (`siblings`)
//!   and names the commit (`sha`);
//! - `HEAD {endpoint}/{repo}/resolve/{commit}/{file}`, redirects not followed, gives the
//!   file's ETag (`X-Linked-Etag` for large files, else `ETag`), its size (`X-Linked-Size`
//!   or `Content-Length`) and, for large files, a `Location` to fetch it from;
//! - `GET` of that location (or of the resolve URL) fetches the bytes.
//!
//! The cache is the one `huggingface_hub` writes: `models--org--name/blobs/{etag}` holds
//! each file once, `snapshots/{commit}/{file}` links to it, `refs/{revision}` names the
//! commit, so either tool reuses what the other fetched. A download goes to
//! `blobs/{etag}.incomplete` first and resumes from its length with a `Range` request;
//! the finished blob is checked against its size and, where the ETag is a SHA-256 (large
//! files), against its hash, then renamed into place. `HF_TOKEN` is sent to the endpoint,
//! never to another host a redirect points at.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The public hub, where `HF_ENDPOINT` does not name another.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and as whom to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubClient {
    /// Base URL, without a trailing slash.
    pub endpoint: String,
    /// Bearer token for private and gated repositories.
    pub token: Option<String>,
    /// Print progress to stderr.
    pub progress: bool,
}

impl HubClient {
    /// The client the environment describes: `HF_ENDPOINT` and `HF_TOKEN`, read through
    /// `var` (so tests need not touch the process environment).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> HubClient {
        let set = |k: &str| var(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let endpoint = set("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        HubClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: set("HF_TOKEN").or_else(|| set("HUGGING_FACE_HUB_TOKEN")),
            progress: true,
        }
    }

    /// Download the files of `repo` at `revision` that match `patterns` into `cache` (the
    /// hub cache directory); returns the snapshot directory.
    pub fn download(&self, repo: &str, revision: &str, patterns: &[&str], cache: &Path) -> Result<PathBuf> {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(120))
            .build();
        let session = Session { client: self, agent, repo };
        let listing = session.listing(revision)?;
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        let snapshot = repo_dir.join("snapshots").join(&listing.sha);
        let files: Vec<&String> =
            listing.files.iter().filter(|f| patterns.iter().any(|p| glob(p, f))).collect();
        if files.is_empty() {
            return Err(session.error(format!(
                "the repository has no file matching {} at revision {revision}",
                patterns.join(", ")
            )));
        }
        for file in files {
            let meta = session.metadata(&listing.sha, file)?;
            let blob = session.fetch_blob(&repo_dir.join("blobs"), file, &meta)?;
            link_snapshot(&snapshot, file, &blob).map_err(|e| session.io_error(&snapshot.join(file), e))?;
        }
        let refs = repo_dir.join("refs");
        if revision != listing.sha {
            fs::create_dir_all(&refs).map_err(|e| session.io_error(&refs, e))?;
            crate::files::write_atomic(&refs.join(revision), listing.sha.as_bytes())?;
        }
        Ok(snapshot)
    }
}

/// A repository's commit and file names at one revision.
struct Listing {
    sha: String,
    files: Vec<String>,
}

/// What the hub says about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileMeta {
    /// The blob's name in the cache (ETag without quotes or `W/`).
    etag: String,
    /// Bytes.
    size: u64,
    /// Where to GET the bytes: the redirect target, or the resolve URL itself.
    url: String,
}

/// One download's client, HTTP agent and repository.
struct Session<'a> {
    client: &'a HubClient,
    agent: ureq::Agent,
    repo: &'a str,
}

impl Session<'_> {
    fn error(&self, message: String) -> Error {
        Error::Hub { repo: self.repo.to_string(), endpoint: self.client.endpoint.clone(), message }
    }

    fn io_error(&self, path: &Path, e: io::Error) -> Error {
        self.error(format!("cannot write {}: {e}", path.display()))
    }

    /// A request to the endpoint, with the token when there is one.
    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let request = self.agent.request(method, url);
        match &self.client.token {
            Some(token) if url.starts_with(&self.client.endpoint) => {
                request.set("Authorization", &format!("Bearer {token}"))
            }
            _ => request,
        }
    }

    /// The response, or an error naming the URL and what the status means.
    fn call(&self, request: ureq::Request, what: &str) -> Result<ureq::Response> {
        let url = request.url().to_string();
        match request.call() {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, _)) => {
                let meaning = match status {
                    401 | 403 => "not allowed: a private or gated repository needs HF_TOKEN with access to it",
                    404 => "not found: check the repository id and revision",
                    _ => "the hub refused the request",
                };
                Err(self.error(format!("{what} ({url}) answered HTTP {status}, {meaning}")))
            }
            Err(e) => Err(self.error(format!(
                "{what} ({url}) failed: {e}; without network, set HF_HUB_OFFLINE=1 and fill the cache elsewhere"
            ))),
        }
    }

    fn listing(&self, revision: &str) -> Result<Listing> {
        let url = format!("{}/api/models/{}/revision/{}", self.client.endpoint, self.repo, revision);
        let response = self.call(self.request("GET", &url), "listing the files")?;
        let body: serde_json::Value = response
            .into_json()
            .map_err(|e| self.error(format!("the file listing at {url} is not JSON: {e}")))?;
        let sha = body.get("sha").and_then(|s| s.as_str()).filter(|s| is_commit(s));
        let Some(sha) = sha else {
            return Err(
                self.error(format!("the file listing at {url} has no commit `sha`, expected 40 hex digits"))
            );
        };
        let files = body
            .get("siblings")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().filter_map(|f| f.get("rfilename")?.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        Ok(Listing { sha: sha.to_string(), files })
    }

    fn metadata(&self, commit: &str, file: &str) -> Result<FileMeta> {
        check_file_name(file).map_err(|m| self.error(m))?;
        let url = format!("{}/{}/resolve/{}/{}", self.client.endpoint, self.repo, commit, file);
        let response = self.call(self.request("HEAD", &url), &format!("asking for `{file}`"))?;
        let header = |name: &str| response.header(name).map(str::to_string);
        let etag = header("X-Linked-Etag").or_else(|| header("ETag")).map(|e| clean_etag(&e));
        let size = header("X-Linked-Size").or_else(|| header("Content-Length")).and_then(|s| s.parse().ok());
        let (Some(etag), Some(size)) = (etag.filter(|e| !e.is_empty()), size) else {
            return Err(self.error(format!("`{file}` came without an ETag or a size ({url})")));
        };
        if !etag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(
                self.error(format!("`{file}` has the ETag {etag:?}, expected letters, digits and '-'"))
            );
        }
        let url = match (response.status(), response.header("Location")) {
            (300..=399, Some(location)) => absolute(&self.client.endpoint, location),
            _ => url,
        };
        Ok(FileMeta { etag, size, url })
    }

    /// The blob of `meta` in `blobs`, downloaded (or resumed) unless it is there.
    fn fetch_blob(&self, blobs: &Path, file: &str, meta: &FileMeta) -> Result<PathBuf> {
        let blob = blobs.join(&meta.etag);
        if fs::metadata(&blob).is_ok_and(|m| m.len() == meta.size) {
            return Ok(blob);
        }
        fs::create_dir_all(blobs).map_err(|e| self.io_error(blobs, e))?;
        let partial = blobs.join(format!("{}.incomplete", meta.etag));
        let have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        let mut request = self.request("GET", &meta.url);
        let resuming = have > 0 && have < meta.size;
        if resuming {
            request = request.set("Range", &format!("bytes={have}-"));
        }
        let response = self.call(request, &format!("downloading `{file}`"))?;
        // 206: the server sent the rest; anything else: the whole file, from the start.
        let append = resuming && response.status() == 206;
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&partial)
            .map_err(|e| self.io_error(&partial, e))?;
        let start = if append { have } else { 0 };
        let mut progress = Progress::new(file, start, meta.size, self.client.progress);
        copy_counting(&mut response.into_reader(), &mut out, &mut progress)
            .map_err(|e| self.error(format!("downloading `{file}` stopped: {e}; run again to resume")))?;
        out.sync_all().map_err(|e| self.io_error(&partial, e))?;
        drop(out);
        progress.finish();
        self.verify(&partial, file, meta)?;
        fs::rename(&partial, &blob).map_err(|e| self.io_error(&blob, e))?;
        Ok(blob)
    }

    /// The downloaded size, and the SHA-256 where the ETag is one (large files).
    fn verify(&self, path: &Path, file: &str, meta: &FileMeta) -> Result<()> {
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len != meta.size {
            return Err(self.error(format!(
                "`{file}` arrived with {len} bytes, expected {}; run again to resume",
                meta.size
            )));
        }
        if meta.etag.len() == 64 && meta.etag.chars().all(|c| c.is_ascii_hexdigit()) {
            let sha = sha256_file(path).map_err(|e| self.io_error(path, e))?;
            if !sha.eq_ignore_ascii_case(&meta.etag) {
                let _ = fs::remove_file(path);
                return Err(self.error(format!(
                    "`{file}` has SHA-256 {sha}, expected {} (its ETag); the partial download was removed",
                    meta.etag
                )));
            }
        }
        Ok(())
    }
}

/// A commit id: 40 hex digits.
fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// A repository file name the cache can hold: relative, no `..`, no empty parts.
fn check_file_name(file: &str) -> std::result::Result<(), String> {
    let bad = file.is_empty()
        || file.starts_with('/')
        || file.contains('\\')
        || file.split('/').any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(format!("the listing names the file {file:?}, expected a relative path without `..`"));
    }
    Ok(())
}

/// An ETag as a blob name: without `W/` and quotes.
fn clean_etag(etag: &str) -> String {
    etag.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// `location` made absolute against `endpoint` when it is a path.
fn absolute(endpoint: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if let Some(path) = location.strip_prefix('/') {
        // The endpoint's scheme and host, without any path it carries.
        let host_end = endpoint.find("://").map_or(0, |i| i + 3);
        let root = endpoint[host_end..].find('/').map_or(endpoint, |i| &endpoint[..host_end + i]);
        format!("{root}/{path}")
    } else {
        format!("{endpoint}/{location}")
    }
}

/// `*` matches any run of characters (`/` included, as the hub's `allow_patterns` do);
/// everything else matches itself.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else { return false };
            (0..=tail.len()).filter(|&i| tail.is_char_boundary(i)).any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// `snapshot/file` → the blob, as a relative symbolic link (a copy where links fail).
fn link_snapshot(snapshot: &Path, file: &str, blob: &Path) -> io::Result<()> {
    let link = snapshot.join(file);
    let parent = link.parent().unwrap_or(snapshot);
    fs::create_dir_all(parent)?;
    // snapshots/{commit}/a/b → ../../../blobs/{etag}: one `..` per directory below the
    // repository folder.
    let depth = 2 + file.matches('/').count();
    let mut target = PathBuf::new();
    (0..depth).for_each(|_| target.push(".."));
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    let _ = fs::remove_file(&link);
    #[cfg(unix)]
    if std::os::unix::fs::symlink(&target, &link).is_ok() {
        return Ok(());
    }
    fs::copy(blob, &link).map(|_| ())
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Copy `from` into `to`, telling `progress` each piece.
fn copy_counting(from: &mut dyn Read, to: &mut File, progress: &mut Progress) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        progress.advance(n as u64);
    }
}

/// A one-line progress display on stderr: redrawn in place on a terminal (at most four
/// times a second), one line at the end otherwise.
struct Progress {
    file: String,
    done: u64,
    total: u64,
    started: Instant,
    start_bytes: u64,
    last_draw: Option<Instant>,
    terminal: bool,
    on: bool,
}

impl Progress {
    fn new(file: &str, done: u64, total: u64, on: bool) -> Progress {
        let progress = Progress {
            file: file.to_string(),
            done,
            total,
            started: Instant::now(),
            start_bytes: done,
            last_draw: None,
            terminal: io::stderr().is_terminal(),
            on,
        };
        if on && done > 0 {
            eprintln!("resuming {file} at {} of {}", mib(done), mib(total));
        }
        progress
    }

    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        let due = self.last_draw.is_none_or(|t| t.elapsed() >= Duration::from_millis(250));
        if self.on && self.terminal && due {
            self.last_draw = Some(Instant::now());
            eprint!("\r{}", self.line());
        }
    }

    fn line(&self) -> String {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = (self.done - self.start_bytes) as f64 / seconds / (1 << 20) as f64;
        let percent = if self.total > 0 { 100.0 * self.done as f64 / self.total as f64 } else { 100.0 };
        format!(
            "{}: {} of {} ({percent:.0}%), {rate:.1} MiB/s   ",
            self.file,
            mib(self.done),
            mib(self.total)
        )
    }

    fn finish(&self) {
        if self.on {
            let end = if self.terminal { "\r" } else { "" };
            eprintln!("{end}{}", self.line());
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_the_hubs_patterns() {
        assert!(glob("*.json", "config.json"));
        assert!(glob("*.json", "1_Pooling/config.json"));
        assert!(glob("*.safetensors", "model-00001-of-00002.safetensors"));
        assert!(!glob("*.json", "model.safetensors"));
        assert!(glob("tokenizer.model", "tokenizer.model") && !glob("tokenizer.model", "xtokenizer.model"));
        assert!(glob("a*b*c", "aXXbYYc") && !glob("a*b*c", "aXXbYY"));
    }

    #[test]
    fn environment_sets_endpoint_and_token() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let default = HubClient::from_env(env(&[]));
        assert_eq!((default.endpoint.as_str(), default.token), (DEFAULT_ENDPOINT, None));
        let custom =
            HubClient::from_env(env(&[("HF_ENDPOINT", "http://mirror.local:8080/"), ("HF_TOKEN", "t0k")]));
        assert_eq!(custom.endpoint, "http://mirror.local:8080");
        assert_eq!(custom.token.as_deref(), Some("t0k"));
        let legacy = HubClient::from_env(env(&[("HF_TOKEN", " "), ("HUGGING_FACE_HUB_TOKEN", "old")]));
        assert_eq!(legacy.token.as_deref(), Some("old"));
    }

    #[test]
    fn redirect_locations_become_absolute() {
        assert_eq!(absolute("http://h:1", "/cdn/x"), "http://h:1/cdn/x");
        assert_eq!(absolute("http://h:1/mirror", "/cdn/x"), "http://h:1/cdn/x");
        assert_eq!(absolute("http://h:1", "https://cdn.example/x"), "https://cdn.example/x");
        assert_eq!(clean_etag("W/\"abc-1\""), "abc-1");
    }

    #[test]
    fn unsafe_file_names_are_refused() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "", "a\\b"] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
        assert!(check_file_name("1_Pooling/config.json").is_ok());
    }
}
