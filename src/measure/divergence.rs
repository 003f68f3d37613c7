//! Divergence of a model's next-token distributions from the reference's on the same
//! tokens, scored the way llama.cpp's perplexity tool scores: the evaluation text is cut
//! into chunks of `context` tokens and only the second half of each chunk is scored.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{CausalLm, Logits};
use crate::tensor;

/// Chunks of the evaluation tokens: consecutive, non-overlapping, `context` long.
pub fn chunks(tokens: &[u32], context: usize, max_chunks: Option<usize>) -> Vec<&[u32]> {
    let n = tokens.len() / context;
    tokens.chunks_exact(context).take(max_chunks.unwrap_or(n).min(n)).collect()
}

/// First scored position of a chunk: positions `first..context-1` predict the token after.
pub fn first_scored(context: usize) -> usize {
    context / 2
}

/// Log-probabilities of the reference at every scored position, with the tokens that
/// actually followed.
#[derive(Debug, Clone)]
pub struct Reference {
    vocab: usize,
    /// `[scored, vocab]` natural-log probabilities.
    logprobs: Vec<f32>,
    /// The true next token of each scored position.
    targets: Vec<u32>,
}

impl Reference {
    /// Scored positions.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// True when nothing was scored.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// Run `model` over every chunk and call `score(position_logits, target)` for each scored
/// position, in order.
fn for_each_scored(
    model: &dyn CausalLm,
    chunks: &[&[u32]],
    mut score: impl FnMut(&[f32], u32),
) -> Result<()> {
    let vocab = model.vocab_size();
    for chunk in chunks {
        let mut cache = model.new_cache(1, chunk.len());
        let logits = model.forward(chunk, 1, &mut cache, Logits::All)?;
        for pos in first_scored(chunk.len())..chunk.len() - 1 {
            score(&logits[pos * vocab..(pos + 1) * vocab], chunk[pos + 1]);
        }
    }
    Ok(())
}

/// The reference pass: log-probabilities at every scored position.
pub fn reference(model: &dyn CausalLm, chunks: &[&[u32]]) -> Result<Reference> {
    let vocab = model.vocab_size();
    let mut logprobs = Vec::new();
    let mut targets = Vec::new();
    let mut row = Vec::new();
    for_each_scored(model, chunks, |logits, target| {
        tensor::log_softmax(logits, &mut row);
        logprobs.extend(row.iter().map(|&v| v as f32));
        targets.push(target);
    })?;
    Ok(Reference { vocab, logprobs, targets })
}

/// Divergence of one model from the reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// Positions scored.
    pub tokens_scored: usize,
    /// Mean KL(reference ‖ model), nats.
    pub kld_mean: f64,
    /// Standard deviation of the per-position KL.
    pub kld_std_dev: f64,
    /// Largest per-position KL.
    pub kld_max: f64,
    /// Fraction of positions with the same most likely token.
    pub same_top1: f64,
    /// Perplexity of the reference on the evaluation text.
    pub ppl_reference: f64,
    /// Perplexity of this model.
    pub ppl: f64,
    /// `ppl / ppl_reference`.
    pub ppl_ratio: f64,
}

/// Score `model` against `reference` on the same chunks.
pub fn measure(model: &dyn CausalLm, chunks: &[&[u32]], reference: &Reference) -> Result<Divergence> {
    if model.vocab_size() != reference.vocab {
        return Err(Error::Workload(format!(
            "model vocabulary {} differs from the reference's {}",
            model.vocab_size(),
            reference.vocab
        )));
    }
    let vocab = reference.vocab;
    let (mut i, mut kl_sum, mut kl_sq, mut kl_max, mut same) = (0usize, 0.0f64, 0.0f64, 0.0f64, 0usize);
    let (mut nll_ref, mut nll) = (0.0f64, 0.0f64);
    let mut row = Vec::new();
    for_each_scored(model, chunks, |logits, target| {
        let ref_row = &reference.logprobs[i * vocab..(i + 1) * vocab];
        debug_assert_eq!(reference.targets[i], target, "chunks differ from the reference's");
        tensor::log_softmax(logits, &mut row);
        // The reference is stored as f32; round this side the same way, so a model
        // identical to the reference scores exactly zero.
        row.iter_mut().for_each(|q| *q = *q as f32 as f64);
        let kl: f64 = ref_row
            .iter()
            .zip(&row)
            .map(|(&p, &q)| {
                let p = p as f64;
                p.exp() * (p - q)
            })
            .sum::<f64>()
            .max(0.0);
        kl_sum += kl;
        kl_sq += kl * kl;
        kl_max = kl_max.max(kl);
        same += (tensor::argmax(ref_row) == tensor::argmax(logits)) as usize;
        nll_ref -= ref_row[target as usize] as f64;
        nll -= row[target as usize];
        i += 1;
    })?;
    if i != reference.len() {
        return Err(Error::Workload(format!(
            "scored {i} positions, the reference scored {}",
            reference.len()
        )));
    }
    let n = i.max(1) as f64;
    let mean = kl_sum / n;
    let var = if i > 1 { (kl_sq - n * mean * mean).max(0.0) / (n - 1.0) } else { 0.0 };
    let (ppl_reference, ppl) = ((nll_ref / n).exp(), (nll / n).exp());
    Ok(Divergence {
        tokens_scored: i,
        kld_mean: mean,
        kld_std_dev: var.sqrt(),
        kld_max: kl_max,
        same_top1: same as f64 / n,
        ppl_reference,
        ppl,
        ppl_ratio: ppl / ppl_reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_whole_and_capped() {
        let tokens: Vec<u32> = (0..10).collect();
        assert_eq!(chunks(&tokens, 4, None), vec![&[0, 1, 2, 3][..], &[4, 5, 6, 7][..]]);
        assert_eq!(chunks(&tokens, 4, Some(1)).len(), 1);
        assert_eq!(chunks(&tokens, 11, None).len(), 0);
        assert_eq!(first_scored(128), 64);
    }
}
