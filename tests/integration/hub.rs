//! The hub client against a local server that speaks the hub's file API: listing, HEAD
//! metadata with a redirect for large files, resumable downloads, the cache layout, the
//! token, and `bench` resolving `org/name` through `HF_ENDPOINT` with no Python.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use quantbench::model::hub_download::HubClient;
use sha2::{Digest, Sha256};

use crate::support::fixture;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
}

/// A file the mock hub serves: small ones straight from the resolve URL (a git ETag),
/// large ones through a redirect to `/cdn/…` (a SHA-256 ETag, as the hub does for LFS).
struct Served {
    body: Vec<u8>,
    large: bool,
}

impl Served {
    fn etag(&self) -> String {
        if self.large {
            Sha256::digest(&self.body).iter().map(|b| format!("{b:02x}")).collect()
        } else {
            // Any stable 40-hex name stands in for the git blob id.
            Sha256::digest(&self.body).iter().take(20).map(|b| format!("{b:02x}")).collect()
        }
    }
}

struct MockHub {
    endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Cut the next large-file download after half its bytes.
    cut_next: Arc<AtomicBool>,
}

impl MockHub {
    /// Serve `repo` with `files` (name → content; `.safetensors` files are large).
    fn start(repo: &'static str, files: BTreeMap<String, Vec<u8>>) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        // Large files redirect to another origin, as the hub's CDN is.
        let cdn: Arc<str> = format!("http://localhost:{port}").into();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cut_next = Arc::new(AtomicBool::new(false));
        let files: Arc<BTreeMap<String, Served>> = Arc::new(
            files
                .into_iter()
                .map(|(name, body)| {
                    let large = name.ends_with(".safetensors");
                    (name, Served { body, large })
                })
                .collect(),
        );
        let (log, cut) = (seen.clone(), cut_next.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (log, cut, files, cdn) = (log.clone(), cut.clone(), files.clone(), cdn.clone());
                std::thread::spawn(move || serve(stream, (repo, &cdn), &files, &log, &cut));
            }
        });
        MockHub { endpoint, seen, cut_next }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Answer requests for `repo`, redirecting large files to `cdn`.
fn serve(
    stream: TcpStream,
    (repo, cdn): (&str, &str),
    files: &BTreeMap<String, Served>,
    log: &Mutex<Vec<Seen>>,
    cut: &AtomicBool,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        log.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
        });
        let response = respond(&method, &path, &headers, (repo, cdn), files, cut);
        let Some((head, body, cut_at)) = response else {
            let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot found");
            continue;
        };
        let _ = out.write_all(head.as_bytes());
        if method != "HEAD" {
            match cut_at {
                Some(n) => {
                    let _ = out.write_all(&body[..n]);
                    let _ = out.flush();
                    return; // the connection drops mid-body
                }
                None => {
                    let _ = out.write_all(&body);
                }
            }
        }
        let _ = out.flush();
    }
}

/// The status line and headers, the body, and where to cut it.
fn respond(
    method: &str,
    path: &str,
    headers: &BTreeMap<String, String>,
    (repo, cdn): (&str, &str),
    files: &BTreeMap<String, Served>,
    cut: &AtomicBool,
) -> Option<(String, Vec<u8>, Option<usize>)> {
    if path == format!("/api/models/{repo}/revision/main") {
        let siblings: Vec<_> = files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "sha": COMMIT, "siblings": siblings })).unwrap();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        return Some((head, body, None));
    }
    if let Some(name) = path.strip_prefix(&format!("/{repo}/resolve/{COMMIT}/")) {
        let file = files.get(name)?;
        let etag = file.etag();
        if file.large {
            let head = format!(
                "HTTP/1.1 302 Found\r\nlocation: {cdn}/cdn/{etag}\r\nx-repo-commit: {COMMIT}\r\nx-linked-etag: \"{etag}\"\r\n\
                 x-linked-size: {}\r\ncontent-length: 0\r\n\r\n",
                file.body.len()
            );
            return Some((head, Vec::new(), None));
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\netag: \"{etag}\"\r\nx-repo-commit: {COMMIT}\r\ncontent-length: {}\r\n\r\n",
            file.body.len()
        );
        return Some((head, if method == "HEAD" { Vec::new() } else { file.body.clone() }, None));
    }
    if let Some(etag) = path.strip_prefix("/cdn/") {
        let file = files.values().find(|f| f.large && f.etag() == etag)?;
        let len = file.body.len();
        let from = headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
        let (status, body) = match from {
            Some(from) => ("206 Partial Content", file.body[from..].to_vec()),
            None => ("200 OK", file.body.clone()),
        };
        let range = from.map_or(String::new(), |f| format!("content-range: bytes {f}-{}/{len}\r\n", len - 1));
        let head = format!("HTTP/1.1 {status}\r\n{range}content-length: {}\r\n\r\n", body.len());
        let cut_at = cut.swap(false, Ordering::SeqCst).then_some(body.len() / 2);
        return Some((head, body, cut_at));
    }
    None
}

/// The llama-tiny fixture as a hub repository, plus a file the patterns leave out.
fn tiny_repo() -> BTreeMap<String, Vec<u8>> {
    let dir = fixture("llama-tiny");
    let mut files: BTreeMap<String, Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("golden"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.insert("pytorch_model.bin".into(), vec![0u8; 100]);
    files
}

fn client(hub: &MockHub, token: Option<&str>) -> HubClient {
    HubClient { endpoint: hub.endpoint.clone(), token: token.map(str::to_string), progress: false }
}

const PATTERNS: &[&str] = &["*.json", "*.safetensors", "*.txt"];

#[test]
fn downloads_into_the_hub_cache_layout_with_the_token_kept_on_the_endpoint() {
    let files = tiny_repo();
    let hub = MockHub::start("org/tiny", files.clone());
    let cache = tempfile::tempdir().unwrap();
    let snapshot = client(&hub, Some("secret")).download("org/tiny", "main", PATTERNS, cache.path()).unwrap();

    let repo_dir = cache.path().join("models--org--tiny");
    assert_eq!(snapshot, repo_dir.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    for (name, body) in &files {
        let link = snapshot.join(name);
        if name.ends_with(".bin") {
            assert!(!link.exists(), "{name} matches no pattern and must not be fetched");
            continue;
        }
        assert_eq!(&std::fs::read(&link).unwrap(), body, "{name}");
        // A relative link into blobs/, named by the ETag.
        let target = std::fs::read_link(&link).unwrap();
        assert!(target.starts_with("../../blobs"), "{name} → {}", target.display());
    }
    let blobs: Vec<_> =
        std::fs::read_dir(repo_dir.join("blobs")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(blobs.iter().all(|b| !b.to_string_lossy().ends_with(".incomplete")), "{blobs:?}");

    let seen = hub.seen();
    for s in &seen {
        let auth = s.headers.get("authorization").map(String::as_str);
        if s.path.starts_with("/cdn/") {
            assert_eq!(auth, None, "the token must not follow a redirect: {s:?}");
        } else {
            assert_eq!(auth, Some("Bearer secret"), "{s:?}");
        }
    }
    assert!(seen.iter().any(|s| s.method == "HEAD"), "metadata comes from HEAD requests");

    // A second run finds every blob and downloads nothing.
    let before = hub.seen().iter().filter(|s| s.method == "GET" && !s.path.starts_with("/api")).count();
    client(&hub, Some("secret")).download("org/tiny", "main", PATTERNS, cache.path()).unwrap();
    let after = hub.seen().iter().filter(|s| s.method == "GET" && !s.path.starts_with("/api")).count();
    assert_eq!(before, after, "cached blobs are not fetched again");
}

#[test]
fn an_interrupted_download_resumes_from_where_it_stopped() {
    let files = tiny_repo();
    let hub = MockHub::start("org/tiny", files.clone());
    let cache = tempfile::tempdir().unwrap();
    hub.cut_next.store(true, Ordering::SeqCst);
    let err =
        client(&hub, None).download("org/tiny", "main", PATTERNS, cache.path()).unwrap_err().to_string();
    assert!(err.contains("org/tiny") && err.contains("run again to resume"), "{err}");
    let blobs = cache.path().join("models--org--tiny/blobs");
    let partial: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert_eq!(partial.len(), 1, "one partial blob");
    let had = std::fs::metadata(&partial[0]).unwrap().len();
    assert!(had > 0);

    let snapshot = client(&hub, None).download("org/tiny", "main", PATTERNS, cache.path()).unwrap();
    let ranges: Vec<_> = hub.seen().into_iter().filter_map(|s| s.headers.get("range").cloned()).collect();
    assert_eq!(ranges, vec![format!("bytes={had}-")], "the second run asks for the rest only");
    for (name, body) in files.iter().filter(|(n, _)| !n.ends_with(".bin")) {
        assert_eq!(&std::fs::read(snapshot.join(name)).unwrap(), body, "{name}");
    }
}

#[test]
fn a_missing_repository_names_the_status_and_what_to_check() {
    let hub = MockHub::start("org/tiny", tiny_repo());
    let cache = tempfile::tempdir().unwrap();
    let err =
        client(&hub, None).download("org/absent", "main", PATTERNS, cache.path()).unwrap_err().to_string();
    assert!(err.contains("org/absent") && err.contains("404") && err.contains("repository id"), "{err}");
}

#[test]
fn bench_resolves_a_hub_model_through_hf_endpoint() {
    let hub = MockHub::start("org/tiny", tiny_repo());
    let dir = tempfile::tempdir().unwrap();
    let hf_cache = dir.path().join("hf");
    let run = bench_online(
        &["generate", "org/tiny", "--prompt", "Hello", "--max-new-tokens", "2"],
        dir.path(),
        &[("HF_ENDPOINT", hub.endpoint.as_str()), ("HF_HUB_CACHE", hf_cache.to_str().unwrap())],
    );
    assert_eq!(run.0, 0, "{}", run.1);
    assert!(hf_cache.join("models--org--tiny/snapshots").join(COMMIT).join("config.json").is_file());
    // Offline now, the cached snapshot is enough.
    let again = bench_online(
        &["generate", "org/tiny", "--prompt", "Hello", "--max-new-tokens", "2"],
        dir.path(),
        &[("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", hf_cache.to_str().unwrap())],
    );
    assert_eq!(again.0, 0, "{}", again.1);
}

/// `bench` with the network allowed (the `support::bench` helper sets HF_HUB_OFFLINE):
/// exit code and stderr.
fn bench_online(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_bench"));
    command.args(args).current_dir(cwd).env_remove("HF_HUB_OFFLINE").env_remove("HF_TOKEN");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}
