//! Encoder outputs and their divergence from the reference: sentence embeddings (mean
//! pooling over real tokens, L2-normalised, as sentence-transformers does for MiniLM)
//! compared by cosine, hidden states by normalised mean squared error.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Encoder;

/// Sentences encoded per forward pass (padded to the longest of the group).
pub const GROUP: usize = 8;

/// What an encoder produced for each sentence.
#[derive(Debug, Clone)]
pub struct EncoderOutputs {
    /// Sentence embeddings, unit length, `[hidden]` each.
    pub embeddings: Vec<Vec<f32>>,
    /// Last hidden states at the real positions, `[len, hidden]` each.
    pub hidden: Vec<Vec<f32>>,
}

/// Encode `sentences` (token ids, special tokens included) in padded groups of `group`.
pub fn encode_all(
    model: &dyn Encoder,
    sentences: &[Vec<u32>],
    pad: u32,
    group: usize,
) -> Result<EncoderOutputs> {
    let h = model.hidden_size();
    let mut out = EncoderOutputs { embeddings: Vec::new(), hidden: Vec::new() };
    for chunk in sentences.chunks(group.max(1)) {
        let seq = chunk.iter().map(Vec::len).max().unwrap_or(0);
        if seq == 0 {
            return Err(Error::Workload("a sentence has no tokens".into()));
        }
        let mut tokens = Vec::with_capacity(chunk.len() * seq);
        let mut mask = Vec::with_capacity(chunk.len() * seq);
        for ids in chunk {
            tokens.extend(ids.iter().copied().chain(std::iter::repeat_n(pad, seq - ids.len())));
            mask.extend((0..seq).map(|i| u8::from(i < ids.len())));
        }
        let hidden = model.encode(&tokens, &mask, chunk.len())?;
        let first = out.hidden.len();
        let row = |r: usize| format!("sentence {}, position {}", first + r / seq, r % seq);
        crate::tensor::check_finite("the last hidden state", &hidden, h, row, "channel")?;
        for (ids, rows) in chunk.iter().zip(hidden.chunks_exact(seq * h)) {
            let real = rows[..ids.len() * h].to_vec();
            out.embeddings.push(mean_pool_normalized(&real, h));
            out.hidden.push(real);
        }
    }
    Ok(out)
}

/// Cut `ids` to at most `limit` tokens, keeping the last one (the closing special token,
/// as the tokenizers' own truncation does).
pub fn truncate_keeping_last(ids: &mut Vec<u32>, limit: usize) {
    if ids.len() > limit && limit > 0 {
        let last = *ids.last().expect("longer than limit > 0");
        ids.truncate(limit - 1);
        ids.push(last);
    }
}

/// Mean of the rows of `hidden` (`[len, width]`), scaled to unit length.
pub fn mean_pool_normalized(hidden: &[f32], width: usize) -> Vec<f32> {
    let rows = (hidden.len() / width).max(1) as f64;
    let mut mean: Vec<f64> = vec![0.0; width];
    for row in hidden.chunks_exact(width) {
        mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= rows);
    // sentence-transformers' Normalize clamps the norm at 1e-12.
    let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12);
    mean.iter().map(|m| (m / norm) as f32).collect()
}

/// Cosine similarity in f64, exactly 1 for identical vectors (one definition with the
/// hidden-state comparison's).
pub use super::divergence::cosine;

/// Divergence of an encoder from the reference on the same sentences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingDivergence {
    /// Sentences compared.
    pub sentences: usize,
    /// Mean cosine between the sentence embeddings.
    pub cosine_mean: f64,
    /// Smallest cosine.
    pub cosine_min: f64,
    /// `Σ‖h − h_ref‖² / Σ‖h_ref‖²` over every real position's last hidden state.
    pub hidden_nmse: f64,
}

/// Compare `outputs` with `reference` (same sentences, same order).
pub fn compare(reference: &EncoderOutputs, outputs: &EncoderOutputs) -> EmbeddingDivergence {
    let cosines: Vec<f64> =
        reference.embeddings.iter().zip(&outputs.embeddings).map(|(r, o)| cosine(r, o)).collect();
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for (r, o) in reference.hidden.iter().zip(&outputs.hidden) {
        for (&x, &y) in r.iter().zip(o) {
            err += (x as f64 - y as f64).powi(2);
            norm += (x as f64).powi(2);
        }
    }
    EmbeddingDivergence {
        sentences: cosines.len(),
        cosine_mean: cosines.iter().sum::<f64>() / cosines.len().max(1) as f64,
        cosine_min: cosines.iter().copied().fold(f64::INFINITY, f64::min),
        hidden_nmse: err / norm.max(f64::MIN_POSITIVE),
    }
}

/// The sentences of a text: split after `.`, `!` or `?` followed by whitespace, and at
/// blank lines; trimmed; empty ones dropped.
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        current.push(c);
        let at_end = matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| n.is_whitespace());
        let paragraph = c == '\n' && chars.peek() == Some(&'\n');
        if at_end || paragraph {
            let sentence = current.split_whitespace().collect::<Vec<_>>().join(" ");
            if !sentence.is_empty() {
                out.push(sentence);
            }
            current.clear();
        }
    }
    let rest = current.split_whitespace().collect::<Vec<_>>().join(" ");
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_averages_then_normalises() {
        let e = mean_pool_normalized(&[1.0, 0.0, 3.0, 4.0], 2);
        // mean (2, 2) → (1/√2, 1/√2)
        assert!((e[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7 && (e[0] - e[1]).abs() < 1e-7);
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn sentences_split_on_terminal_punctuation_and_paragraphs() {
        let s = split_sentences("One. Two is 3.5 long!  Three?\n\nA heading\nwith text");
        assert_eq!(s, ["One.", "Two is 3.5 long!", "Three?", "A heading with text"]);
    }
}
