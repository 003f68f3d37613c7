//! Pieces every decoder's forward pass shares: batch checks, embedding lookup, picking the
//! rows whose logits are wanted, and the output head (its own layer or the tied embedding).

use crate::error::{Error, Result};
use crate::scheme::Linear;
use crate::tensor::{self, attention::KvCache};

use super::Logits;

/// Check that `tokens` form `batch` equal sequences matching `cache`; returns
/// `(rows, seq)`.
pub fn check_batch(tokens: &[u32], batch: usize, cache: &KvCache) -> Result<(usize, usize)> {
    if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) || cache.batch() != batch {
        return Err(Error::Workload(format!(
            "{} tokens cannot form a batch of {batch} equal sequences for a cache of {}",
            tokens.len(),
            cache.batch()
        )));
    }
    Ok((tokens.len(), tokens.len() / batch))
}

/// Rows of `table` (`[vocab, width]`) for each token, or an error for an id outside it.
pub fn embed_rows(table: &[f32], vocab: usize, tokens: &[u32]) -> Result<Vec<f32>> {
    let width = table.len() / vocab;
    let mut out = Vec::with_capacity(tokens.len() * width);
    for &t in tokens {
        let t = t as usize;
        if t >= vocab {
            return Err(Error::Workload(format!(
                "token id {t} is outside the model's vocabulary of {vocab}"
            )));
        }
        out.extend_from_slice(&table[t * width..(t + 1) * width]);
    }
    Ok(out)
}

/// The hidden rows whose logits are wanted: all, or the last of each sequence.
pub fn select_rows(hidden: Vec<f32>, seq: usize, width: usize, logits: Logits) -> Vec<f32> {
    match logits {
        Logits::All => hidden,
        Logits::Last => {
            hidden.chunks_exact(seq * width).flat_map(|s| s[(seq - 1) * width..].to_vec()).collect()
        }
    }
}

/// Logits of normalised `hidden` rows through `head`, or through the embedding matrix
/// when the head is tied and unquantized.
pub fn head_logits(hidden: &[f32], head: Option<&dyn Linear>, embed: &[f32], vocab: usize) -> Vec<f32> {
    let width = embed.len() / vocab;
    let rows = hidden.len() / width;
    let mut out = vec![0.0; rows * vocab];
    match head {
        Some(head) => head.forward(hidden, rows, &mut out),
        None => tensor::matmul_nt(hidden, rows, width, embed, vocab, &mut out),
    }
    out
}

/// Run the linear layer `layer` on `rows` rows of `x`.
pub fn run_linear(layer: &dyn Linear, x: &[f32], rows: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * layer.out_features()];
    layer.forward(x, rows, &mut out);
    out
}
