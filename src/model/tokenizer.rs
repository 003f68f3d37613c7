//! Text ↔ token ids through a Hugging Face `tokenizer.json` (the `tokenizers` crate,
//! pure Rust, offline).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A loaded tokenizer.
pub struct TextTokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
    fingerprint: String,
}

impl TextTokenizer {
    /// Load `tokenizer.json` at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::ModelMissing {
                what: "tokenizer",
                path: path.to_path_buf(),
                hint: "expected tokenizer.json beside config.json (a Hugging Face fast tokenizer)".into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
        Self::from_text(&text, path)
    }

    /// A tokenizer from tokenizer.json text; `origin` names where it came from (a GGUF
    /// file's vocabulary, say) in messages.
    pub fn from_text(text: &str, origin: &Path) -> Result<Self> {
        let error = |message: String| Error::Tokenizer { path: origin.to_path_buf(), message };
        let mut inner: tokenizers::Tokenizer =
            text.parse().map_err(|e: tokenizers::Error| error(e.to_string()))?;
        // Some tokenizer.json files pad every input to a fixed length (MiniLM's pads to
        // 128) or truncate it; the harness pads and masks batches itself and cuts inputs
        // explicitly, so both are turned off here.
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| error(e.to_string()))?;
        let fingerprint = crate::hash::sha256_hex(text.as_bytes());
        Ok(TextTokenizer { path: origin.to_path_buf(), inner, fingerprint })
    }

    /// sha256 of the tokenizer.json text it was built from.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with the special tokens the tokenizer's post-processor adds
    /// (BERT's `[CLS] … [SEP]`).
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
