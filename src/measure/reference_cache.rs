//! The reference pass on disk: computed once per model and workload, read back by later
//! runs, and refused (not silently recomputed) when the model, tokenizer or workload it
//! was made from differ from the run's.
//!
//! Layout: the magic `QBREF\0\0\x01`, a little-endian u64 header length, a JSON header
//! ([`CacheKey`] and the array lengths), then little-endian arrays: targets (u32), their
//! reference log-probabilities (f32), the reference's top-1 (u32), the log-normalisers
//! (f32), then the kept distributions (top-k: ids u32 and log-probabilities f32, then the
//! sampled tail tokens likewise; full: f32 per vocabulary entry).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

use super::divergence::{Kept, Reference, TAIL_SAMPLES};

const MAGIC: &[u8; 8] = b"QBREF\0\0\x02";

/// What a stored reference was computed from; all of it must match to reuse it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// sha256 over the reference model's config and weights.
    pub model_sha256: String,
    /// Precision the reference model ran at.
    pub dtype: String,
    /// sha256 of the tokenizer.
    pub tokenizer_sha256: String,
    /// sha256 of the evaluation text.
    pub eval_sha256: String,
    /// Chunk length.
    pub context: usize,
    /// Cap on chunks.
    pub max_chunks: Option<usize>,
    /// Tokens kept per position (`None`: all).
    pub top_k: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    key: CacheKey,
    vocab: usize,
    positions: usize,
}

/// Bytes llama.cpp's `--kl-divergence-base` file takes for the same evaluation: its
/// header and tokens, then per scored token the log-probabilities of the whole
/// vocabulary as u16 (`2·⌈vocab/2⌉ + 4` values, the extra four holding the row's scale,
/// minimum and two padding values).
pub fn llama_cpp_bytes(vocab: usize, context: usize, chunks: usize, scored: usize) -> u64 {
    let header = 8 + 3 * 4;
    let tokens = 4 * context * chunks;
    let per_token = 2 * (2 * vocab.div_ceil(2) + 4);
    (header + tokens + per_token * scored) as u64
}

/// Write `reference` with its key, atomically. Returns the file size.
pub fn write(path: &Path, key: &CacheKey, reference: &Reference) -> Result<u64> {
    let header = Header { key: key.clone(), vocab: reference.vocab, positions: reference.len() };
    let header = serde_json::to_vec(&header).expect("header serialises");
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    put_u32(&mut out, &reference.targets);
    put_f32(&mut out, &reference.target_logprobs);
    put_u32(&mut out, &reference.top1);
    put_f32(&mut out, &reference.log_norms);
    match &reference.kept {
        Kept::TopK { ids, logprobs, tail_ids, tail_logprobs, .. } => {
            put_u32(&mut out, ids);
            put_f32(&mut out, logprobs);
            put_u32(&mut out, tail_ids);
            put_f32(&mut out, tail_logprobs);
        }
        Kept::Full(all) => put_f32(&mut out, all),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    crate::report::write_atomic(path, &out)?;
    Ok(out.len() as u64)
}

/// Read the reference at `path` if there is one. A file made from another model,
/// tokenizer or workload is an error naming the field that differs.
pub fn read(path: &Path, expected: &CacheKey) -> Result<Option<Reference>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    let bad = |message: String| Error::Results { path: path.to_path_buf(), message };
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(bad("not a quantbench reference file (bad magic); delete it to recompute".into()));
    }
    let header_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let body_start = 16usize.checked_add(header_len).filter(|&end| end <= bytes.len());
    let body_start =
        body_start.ok_or_else(|| bad(format!("header of {header_len} bytes runs past the file")))?;
    let header: Header = serde_json::from_slice(&bytes[16..body_start])
        .map_err(|e| bad(format!("unreadable header: {e}; delete it to recompute")))?;
    check_key(&header.key, expected)
        .map_err(|m| bad(format!("{m}; delete the file to recompute the reference")))?;
    let mut reader = Reader { bytes: &bytes[body_start..] };
    let n = header.positions;
    let targets = reader.u32s(n);
    let target_logprobs = reader.f32s(n);
    let top1 = reader.u32s(n);
    let log_norms = reader.f32s(n);
    let kept = match expected.top_k {
        Some(k) => {
            let k = k.min(header.vocab);
            let s = TAIL_SAMPLES;
            match (reader.u32s(n * k), reader.f32s(n * k), reader.u32s(n * s), reader.f32s(n * s)) {
                (Some(ids), Some(logprobs), Some(tail_ids), Some(tail_logprobs)) => {
                    Some(Kept::TopK { k, ids, logprobs, tail_ids, tail_logprobs })
                }
                _ => None,
            }
        }
        None => reader.f32s(n * header.vocab).map(Kept::Full),
    };
    let (Some(targets), Some(target_logprobs), Some(top1), Some(log_norms), Some(kept), true) =
        (targets, target_logprobs, top1, log_norms, kept, reader.bytes.is_empty())
    else {
        return Err(bad("truncated or oversized: the arrays do not match the header; delete it".into()));
    };
    Ok(Some(Reference { vocab: header.vocab, targets, target_logprobs, top1, kept, log_norms }))
}

/// The first field of `found` that differs from `expected`, as a message.
fn check_key(found: &CacheKey, expected: &CacheKey) -> std::result::Result<(), String> {
    let fields = [
        ("model sha256", &found.model_sha256, &expected.model_sha256),
        ("dtype", &found.dtype, &expected.dtype),
        ("tokenizer sha256", &found.tokenizer_sha256, &expected.tokenizer_sha256),
        ("evaluation text sha256", &found.eval_sha256, &expected.eval_sha256),
    ];
    for (what, a, b) in fields {
        if a != b {
            return Err(format!("it was computed for {what} {a}, this run has {b}"));
        }
    }
    let numbers = [
        ("context", format!("{}", found.context), format!("{}", expected.context)),
        ("max_chunks", format!("{:?}", found.max_chunks), format!("{:?}", expected.max_chunks)),
        ("reference_top_k", format!("{:?}", found.top_k), format!("{:?}", expected.top_k)),
    ];
    for (what, a, b) in numbers {
        if a != b {
            return Err(format!("it was computed with {what} {a}, this run has {b}"));
        }
    }
    Ok(())
}

/// An array reader that yields `None` past the end (never panics on a short file).
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let len = n.checked_mul(4).filter(|&len| len <= self.bytes.len())?;
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Some(head)
    }

    fn u32s(&mut self, n: usize) -> Option<Vec<u32>> {
        self.take(n)
            .map(|b| b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4"))).collect())
    }

    fn f32s(&mut self, n: usize) -> Option<Vec<f32>> {
        self.take(n)
            .map(|b| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect())
    }
}

fn put_u32(out: &mut Vec<u8>, values: &[u32]) {
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
}

fn put_f32(out: &mut Vec<u8>, values: &[f32]) {
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(top_k: Option<usize>) -> CacheKey {
        CacheKey {
            model_sha256: "m".into(),
            dtype: "f32".into(),
            tokenizer_sha256: "t".into(),
            eval_sha256: "e".into(),
            context: 8,
            max_chunks: None,
            top_k,
        }
    }

    fn sample(top_k: bool) -> Reference {
        Reference {
            vocab: 3,
            targets: vec![2, 0],
            target_logprobs: vec![-0.5, -1.5],
            top1: vec![2, 1],
            kept: if top_k {
                Kept::TopK {
                    k: 2,
                    ids: vec![2, 1, 1, 0],
                    logprobs: vec![-0.5, -1.0, -0.2, -1.5],
                    tail_ids: (0..2 * TAIL_SAMPLES as u32).map(|i| i % 3).collect(),
                    tail_logprobs: (0..2 * TAIL_SAMPLES).map(|i| -(i as f32)).collect(),
                }
            } else {
                Kept::Full(vec![-2.0, -1.0, -0.5, -1.5, -0.2, -3.0])
            },
            log_norms: vec![0.25, -1.5],
        }
    }

    #[test]
    fn round_trips_both_kinds() {
        let dir = tempfile::tempdir().unwrap();
        for (top_k, k) in [(true, Some(2)), (false, None)] {
            let path = dir.path().join(format!("{top_k}.qbref"));
            let reference = sample(top_k);
            write(&path, &key(k), &reference).unwrap();
            assert_eq!(read(&path, &key(k)).unwrap(), Some(reference));
        }
        assert_eq!(read(&dir.path().join("absent.qbref"), &key(None)).unwrap(), None);
    }

    #[test]
    fn a_mismatched_key_or_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.qbref");
        write(&path, &key(Some(2)), &sample(true)).unwrap();
        let other = CacheKey { tokenizer_sha256: "u".into(), ..key(Some(2)) };
        let err = read(&path, &other).unwrap_err().to_string();
        assert!(err.contains("tokenizer sha256 t, this run has u"), "{err}");
        let err = read(&path, &key(Some(3))).unwrap_err().to_string();
        assert!(err.contains("reference_top_k Some(2)"), "{err}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(read(&path, &key(Some(2))).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn llama_cpp_size_of_a_known_case() {
        // 49152-entry vocabulary, 8 chunks of 512, 255 scored per chunk.
        let bytes = llama_cpp_bytes(49152, 512, 8, 8 * 255);
        assert_eq!(bytes, 20 + 4 * 4096 + 2 * 49156 * 2040);
    }
}
