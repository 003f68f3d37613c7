//! The reference pass on disk: computed once per model and workload, read back by later
//! runs, and refused (not silently recomputed) when the model, tokenizer or workload it
//! was made from differ from the run's.
//!
//! Layout (format 3): the magic `QBREF\0\0\x03`, a little-endian u64 header length, a
//! JSON header ([`CacheKey`] and the array lengths), then little-endian arrays: targets
//! (u32), their reference log-probabilities (f32), the reference's top-1 (u32), the
//! log-normalisers (f32), then the kept distributions (top-k: ids u32 and
//! log-probabilities f32, then the sampled tail tokens likewise; full: f32 per vocabulary
//! entry); last, the sha256 of everything before it (32 bytes). A file whose checksum,
//! lengths or token ids do not hold is refused with an error saying how to rebuild it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

use super::divergence::{Kept, Reference, TAIL_SAMPLES};

/// The format's magic: its last byte is the format version.
const MAGIC: &[u8; 8] = b"QBREF\0\0\x03";
/// Bytes of the trailing sha256.
const CHECKSUM_BYTES: usize = 32;
/// What every message about an unusable file ends with.
const REBUILD: &str = "delete the file to recompute the reference on the next run";

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

/// `reference` with its key in the stored layout, checksum included.
pub fn encode(key: &CacheKey, reference: &Reference) -> Vec<u8> {
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
    let checksum = Sha256::digest(&out);
    out.extend_from_slice(&checksum);
    out
}

/// Write `reference` with its key, atomically. Returns the file size. A reference whose
/// arrays disagree (see [`Reference::check`]) is refused rather than stored.
pub fn write(path: &Path, key: &CacheKey, reference: &Reference) -> Result<u64> {
    reference.check().map_err(|m| Error::Reference {
        path: path.to_path_buf(),
        message: format!("not written: the reference is inconsistent: {m}"),
    })?;
    let out = encode(key, reference);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    }
    crate::files::write_atomic(path, &out)?;
    Ok(out.len() as u64)
}

/// Read the reference at `path` if there is one. A file made from another model,
/// tokenizer or workload is an error naming the field that differs; a corrupted file
/// (checksum, lengths or token ids wrong) is an error saying how to rebuild it.
pub fn read(path: &Path, expected: &CacheKey) -> Result<Option<Reference>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    let (key, reference) = parse(&bytes, path)?;
    check_key(&key, expected)
        .map_err(|m| Error::Reference { path: path.to_path_buf(), message: format!("{m}; {REBUILD}") })?;
    Ok(Some(reference))
}

/// Parse a stored reference from its bytes (`path` is named in errors): the key it was
/// made for and the reference. Verifies the checksum, that every array has the length the
/// header gives, and that every token id lies inside the vocabulary; never panics and
/// allocates no more than the input's size (plus the header's JSON).
pub fn parse(bytes: &[u8], path: &Path) -> Result<(CacheKey, Reference)> {
    let bad = |message: String| Error::Reference {
        path: path.to_path_buf(),
        message: format!("{message}; {REBUILD}"),
    };
    if bytes.len() < 8 || bytes[..7] != MAGIC[..7] {
        return Err(bad(
            "not a quantbench reference file (it does not start with the magic \"QBREF\")".into()
        ));
    }
    if bytes[7] != MAGIC[7] {
        return Err(bad(format!(
            "stored in format {}, this version of quantbench reads format {}",
            bytes[7], MAGIC[7]
        )));
    }
    let Some(body_len) = bytes.len().checked_sub(CHECKSUM_BYTES).filter(|&len| len >= 16) else {
        return Err(bad(format!(
            "{} bytes, too short for the magic, header length and checksum ({} bytes at least)",
            bytes.len(),
            16 + CHECKSUM_BYTES
        )));
    };
    let (body, stored) = bytes.split_at(body_len);
    let computed = Sha256::digest(body);
    if computed.as_slice() != stored {
        return Err(bad(format!(
            "checksum mismatch: the file stores sha256 {}, its contents hash to {} (corrupted or truncated)",
            crate::hash::hex(stored),
            crate::hash::hex(&computed)
        )));
    }
    let header_len = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let body_start = usize::try_from(header_len)
        .ok()
        .and_then(|len| 16usize.checked_add(len))
        .filter(|&end| end <= body.len());
    let body_start = body_start.ok_or_else(|| {
        bad(format!("header length {header_len} runs past the end of the data ({} bytes)", body.len()))
    })?;
    let header: Header =
        serde_json::from_slice(&body[16..body_start]).map_err(|e| bad(format!("unreadable header: {e}")))?;
    let arrays = &body[body_start..];
    let reference = read_arrays(arrays, &header).map_err(bad)?;
    reference.check().map_err(|m| bad(format!("inconsistent reference: {m}")))?;
    Ok((header.key, reference))
}

/// The arrays after the header, their lengths from `header`, checked against the bytes
/// there before anything is allocated.
fn read_arrays(arrays: &[u8], header: &Header) -> std::result::Result<Reference, String> {
    let (n, vocab) = (header.positions, header.vocab);
    let per_position = match header.key.top_k {
        Some(k) => {
            let k = k.min(vocab);
            k.checked_mul(2).and_then(|kk| kk.checked_add(2 * TAIL_SAMPLES))
        }
        None => Some(vocab),
    };
    let words = per_position
        .and_then(|p| p.checked_add(4))
        .and_then(|p| p.checked_mul(n))
        .and_then(|w| w.checked_mul(4));
    if words != Some(arrays.len()) {
        let expected =
            words.map_or_else(|| "more than can be addressed".to_string(), |w| format!("{w} bytes"));
        return Err(format!(
            "the arrays take {} bytes, but {n} positions (vocabulary {vocab}, top_k {}) need {expected}",
            arrays.len(),
            header.key.top_k.map_or_else(|| "full".to_string(), |k| k.to_string()),
        ));
    }
    // From here every length is known to fit in the bytes present.
    let mut reader = Reader { bytes: arrays };
    let targets = reader.u32s(n);
    let target_logprobs = reader.f32s(n);
    let top1 = reader.u32s(n);
    let log_norms = reader.f32s(n);
    let kept = match header.key.top_k {
        Some(k) => {
            let k = k.min(vocab);
            let (ids, logprobs) = (reader.u32s(n * k), reader.f32s(n * k));
            let (tail_ids, tail_logprobs) = (reader.u32s(n * TAIL_SAMPLES), reader.f32s(n * TAIL_SAMPLES));
            Kept::TopK { k, ids, logprobs, tail_ids, tail_logprobs }
        }
        None => Kept::Full(reader.f32s(n * vocab)),
    };
    Ok(Reference { vocab, targets, target_logprobs, top1, kept, log_norms })
}

/// An optional count as a suite writes it: the number, or `unset`/`full`.
fn count_or(value: Option<usize>, none: &str) -> String {
    value.map_or_else(|| none.to_string(), |v| v.to_string())
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
        ("context", found.context.to_string(), expected.context.to_string()),
        ("max_chunks", count_or(found.max_chunks, "unset"), count_or(expected.max_chunks, "unset")),
        ("reference_top_k", count_or(found.top_k, "full"), count_or(expected.top_k, "full")),
    ];
    for (what, a, b) in numbers {
        if a != b {
            return Err(format!("it was computed with {what} {a}, this run has {b}"));
        }
    }
    Ok(())
}

/// A reader over arrays whose total length was checked first.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    /// The next `n` 4-byte words; the caller checked that they are there.
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.bytes.split_at((n * 4).min(self.bytes.len()));
        self.bytes = rest;
        head
    }

    fn u32s(&mut self, n: usize) -> Vec<u32> {
        self.take(n).chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.take(n).chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
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
        assert!(err.contains("r.qbref") && err.contains("delete the file to recompute"), "{err}");
        let err = read(&path, &key(Some(3))).unwrap_err().to_string();
        assert!(err.contains("reference_top_k 2, this run has 3"), "{err}");
        let err = read(&path, &key(None)).unwrap_err().to_string();
        assert!(err.contains("reference_top_k 2, this run has full"), "{err}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = read(&path, &key(Some(2))).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch") && err.contains("r.qbref"), "{err}");
    }

    /// Regression: a flipped byte used to panic (index out of bounds in the divergence
    /// measure) or to be used silently. Every single-byte change, and every truncation,
    /// of both kinds of stored reference is now an error naming the file.
    #[test]
    fn every_flipped_byte_and_every_truncation_is_an_error() {
        let path = Path::new("references/x.qbref");
        for (top_k, k) in [(true, Some(2)), (false, None)] {
            let reference = sample(top_k);
            let bytes = encode(&key(k), &reference);
            assert_eq!(parse(&bytes, path).unwrap(), (key(k), reference));
            for at in 0..bytes.len() {
                for mask in [0x01u8, 0x80, 0xff] {
                    let mut corrupt = bytes.clone();
                    corrupt[at] ^= mask;
                    let err = parse(&corrupt, path).expect_err("a flipped byte must be refused");
                    assert!(err.to_string().contains("x.qbref"), "{err}");
                }
            }
            for len in 0..bytes.len() {
                assert!(parse(&bytes[..len], path).is_err(), "truncated to {len} bytes");
            }
        }
    }

    /// A file whose checksum holds but whose contents are inconsistent (a writer bug, or
    /// a hand-made file) is refused too: ids outside the vocabulary, lengths that disagree
    /// with the header, and header counts far beyond the file's size.
    #[test]
    fn inconsistent_contents_under_a_valid_checksum_are_refused() {
        let path = Path::new("r.qbref");
        type Spoil = fn(&mut Reference);
        let cases: [(&str, Spoil); 5] = [
            ("target 1 is token 7", |r| r.targets[1] = 7),
            ("top-1 token 0 is token 3", |r| r.top1[0] = 3),
            ("kept id 3 is token 9", |r| {
                if let Kept::TopK { ids, .. } = &mut r.kept {
                    ids[3] = 9
                }
            }),
            ("tail id 5 is token 3", |r| {
                if let Kept::TopK { tail_ids, .. } = &mut r.kept {
                    tail_ids[5] = 3
                }
            }),
            ("arrays take", |r| r.log_norms.push(0.0)),
        ];
        for (want, spoil) in cases {
            let mut reference = sample(true);
            spoil(&mut reference);
            let err = parse(&encode(&key(Some(2)), &reference), path).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("r.qbref"), "{want}: {err}");
            let dir = tempfile::tempdir().unwrap();
            assert!(write(&dir.path().join("r.qbref"), &key(Some(2)), &reference).is_err(), "{want}");
        }
        // A header claiming 2^60 positions: refused before anything is allocated.
        let header =
            serde_json::to_vec(&Header { key: key(None), vocab: 1 << 20, positions: 1 << 60 }).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend((header.len() as u64).to_le_bytes());
        bytes.extend(header);
        bytes.extend(Sha256::digest(&bytes));
        let err = parse(&bytes, path).unwrap_err().to_string();
        assert!(err.contains("more than can be addressed"), "{err}");
    }

    #[test]
    fn an_older_format_names_both_versions() {
        let mut bytes = encode(&key(None), &sample(false));
        bytes[7] = 2;
        let err = parse(&bytes, Path::new("r.qbref")).unwrap_err().to_string();
        assert!(err.contains("format 2, this version of quantbench reads format 3"), "{err}");
        assert!(err.contains("delete the file to recompute"), "{err}");
    }

    #[test]
    fn llama_cpp_size_of_a_known_case() {
        // 49152-entry vocabulary, 8 chunks of 512, 255 scored per chunk.
        let bytes = llama_cpp_bytes(49152, 512, 8, 8 * 255);
        assert_eq!(bytes, 20 + 4 * 4096 + 2 * 49156 * 2040);
    }
}
