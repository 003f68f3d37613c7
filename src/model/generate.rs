//! Greedy generation with the KV cache, timed: the loop behind `bench generate`, the
//! generation check and the latency runs.

use std::time::Instant;

use crate::error::Result;
use crate::tensor;

use super::{CausalLm, Logits};

/// One greedy continuation.
#[derive(Debug, Clone)]
pub struct Greedy {
    /// Generated ids (exactly `max_new`: generation does not stop at end-of-sequence, so
    /// every scheme is timed over the same number of steps).
    pub ids: Vec<u32>,
    /// Prefill time, seconds.
    pub prefill_s: f64,
    /// Time of each decode step, seconds.
    pub step_s: Vec<f64>,
    /// Logits of every prompt position (`[prompt, vocab]`), when asked for.
    pub prompt_logits: Option<Vec<f32>>,
    /// Logits that chose each generated token (`[max_new, vocab]`), when asked for.
    pub step_logits: Option<Vec<f32>>,
}

/// Greedily continue `prompt` by `max_new` tokens. With `keep_logits`, the logits of
/// every prompt position and every step are returned (the prefill then computes the head
/// over all positions, so its time is not the time to first token).
pub fn greedy(model: &dyn CausalLm, prompt: &[u32], max_new: usize, keep_logits: bool) -> Result<Greedy> {
    let vocab = model.vocab_size();
    let mut cache = model.new_cache(1, prompt.len() + max_new);
    let wanted = if keep_logits { Logits::All } else { Logits::Last };
    let start = Instant::now();
    let logits = model.forward(prompt, 1, &mut cache, wanted)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let prompt_row = |pos: usize| format!("prompt position {pos}");
    tensor::check_finite("logits", &logits, vocab, prompt_row, "vocabulary entry")?;
    let mut last = logits[logits.len() - vocab..].to_vec();
    let prompt_logits = keep_logits.then_some(logits);
    let mut step_logits = keep_logits.then(Vec::new);
    let mut ids = Vec::with_capacity(max_new);
    let mut step_s = Vec::with_capacity(max_new);
    for step in 0..max_new {
        let next = tensor::argmax(&last) as u32;
        ids.push(next);
        if let Some(kept) = step_logits.as_mut() {
            kept.extend_from_slice(&last);
        }
        if step + 1 == max_new {
            break;
        }
        let start = Instant::now();
        last = model.forward(&[next], 1, &mut cache, Logits::Last)?;
        let step_row = |_| format!("generated token {}", step + 1);
        tensor::check_finite("logits", &last, vocab, step_row, "vocabulary entry")?;
        step_s.push(start.elapsed().as_secs_f64());
    }
    Ok(Greedy { ids, prefill_s, step_s, prompt_logits, step_logits })
}
