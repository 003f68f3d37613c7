//! Divergence of a model's next-token distributions from the reference's on the same
//! tokens, scored the way llama.cpp's perplexity tool scores: the evaluation text is cut
//! into chunks of `context` tokens and only the second half of each chunk is scored.
//!
//! The reference keeps, per scored position, the log-probability of the true next token,
//! its own top-1, and either its top-k log-probabilities (default) or the whole
//! distribution. With top-k, the part of KL(P‖Q) carried by P's tail (the tokens outside
//! its top k, mass T) is not known exactly: the reported KLD takes the tail as one bin,
//! `T·ln(T/Q_T)`, which is a lower bound of the tail's share (log-sum inequality), and
//! the per-position gap to the largest share the tail could carry (every tail probability
//! is at most the k-th largest, p_k, so the worst case puts p_k on each of the tokens Q
//! makes least likely) is reported as the truncation bound: exact KLD ∈ [KLD, KLD + bound].

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{CausalLm, Logits};
use crate::tensor::{self, SeededRng};

use super::latency::percentile;

/// Tail tokens a top-k reference samples per position (see [`Kept::TopK`]).
pub const TAIL_SAMPLES: usize = 32;

/// Fewest scored tokens whose statistics are reported.
pub const MIN_SCORED_TOKENS: usize = 100;

/// Chunks of the evaluation tokens: consecutive, non-overlapping, `context` long.
pub fn chunks(tokens: &[u32], context: usize, max_chunks: Option<usize>) -> Vec<&[u32]> {
    let n = tokens.len() / context;
    tokens.chunks_exact(context).take(max_chunks.unwrap_or(n).min(n)).collect()
}

/// First scored position of a chunk: positions `first..context-1` predict the token after.
pub fn first_scored(context: usize) -> usize {
    context / 2
}

/// What the reference keeps of each scored position's distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum Kept {
    /// The `k` most likely tokens and their log-probabilities, `[scored, k]`, most likely
    /// first.
    TopK {
        /// Tokens kept per position.
        k: usize,
        /// Token ids.
        ids: Vec<u32>,
        /// Their natural-log probabilities.
        logprobs: Vec<f32>,
        /// Tail tokens drawn per position ([`TAIL_SAMPLES`]), `[scored, samples]`: a
        /// systematic sample of the tail in proportion to its probabilities.
        tail_ids: Vec<u32>,
        /// Their natural-log probabilities.
        tail_logprobs: Vec<f32>,
    },
    /// Every token's log-probability, `[scored, vocab]`.
    Full(Vec<f32>),
}

/// The reference's outputs at every scored position.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// Vocabulary size.
    pub vocab: usize,
    /// The true next token of each scored position.
    pub targets: Vec<u32>,
    /// The reference's log-probability of that token.
    pub target_logprobs: Vec<f32>,
    /// The reference's most likely token.
    pub top1: Vec<u32>,
    /// The distributions, truncated or whole.
    pub kept: Kept,
    /// Each position's log-normaliser (logsumexp of the logits): a kept log-probability
    /// plus it gives back the logit, for the logits cosine and NMSE.
    pub log_norms: Vec<f32>,
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

    /// `Some(k)` for a top-k reference, `None` for a full one.
    pub fn top_k(&self) -> Option<usize> {
        match self.kept {
            Kept::TopK { k, .. } => Some(k),
            Kept::Full(_) => None,
        }
    }

    /// The first inconsistency that would make [`measure`] index out of bounds: arrays
    /// whose lengths disagree with the scored positions, `k` or the vocabulary, and token
    /// ids (targets, top-1, kept and tail ids) outside the vocabulary.
    pub fn check(&self) -> std::result::Result<(), String> {
        let n = self.len();
        let lengths = [
            ("target log-probabilities", self.target_logprobs.len()),
            ("top-1 tokens", self.top1.len()),
            ("log-normalisers", self.log_norms.len()),
        ];
        for (what, len) in lengths {
            if len != n {
                return Err(format!("{len} {what}, expected one per scored position ({n})"));
            }
        }
        let in_vocab = |what: &str, ids: &[u32]| match ids.iter().position(|&id| id as usize >= self.vocab) {
            Some(i) => {
                Err(format!("{what} {i} is token {}, outside the vocabulary of {}", ids[i], self.vocab))
            }
            None => Ok(()),
        };
        in_vocab("target", &self.targets)?;
        in_vocab("top-1 token", &self.top1)?;
        let sized = |what: &str, len: usize, per: usize, per_what: &str| match n.checked_mul(per) {
            Some(want) if want == len => Ok(()),
            _ => Err(format!("{len} {what}, expected {n} positions × {per} {per_what}")),
        };
        match &self.kept {
            Kept::TopK { k, ids, logprobs, tail_ids, tail_logprobs } => {
                if *k == 0 || *k > self.vocab {
                    return Err(format!("top-k of {k}, expected 1 to the vocabulary size {}", self.vocab));
                }
                sized("kept ids", ids.len(), *k, "kept")?;
                sized("kept log-probabilities", logprobs.len(), *k, "kept")?;
                sized("tail ids", tail_ids.len(), TAIL_SAMPLES, "tail samples")?;
                sized("tail log-probabilities", tail_logprobs.len(), TAIL_SAMPLES, "tail samples")?;
                in_vocab("kept id", ids)?;
                in_vocab("tail id", tail_ids)
            }
            Kept::Full(all) => sized("log-probabilities", all.len(), self.vocab, "vocabulary entries"),
        }
    }
}

/// Run `model` over every chunk and call `score(index, position_logits, target)` for each
/// scored position, in order.
fn for_each_scored(
    model: &dyn CausalLm,
    chunks: &[&[u32]],
    mut score: impl FnMut(usize, &[f32], u32),
) -> Result<()> {
    let vocab = model.vocab_size();
    let mut index = 0;
    for (c, chunk) in chunks.iter().enumerate() {
        let mut cache = model.new_cache(1, chunk.len());
        let logits = model.forward(chunk, 1, &mut cache, Logits::All)?;
        let row = |pos: usize| format!("evaluation chunk {c}, position {pos}");
        tensor::check_finite("logits", &logits, vocab, row, "vocabulary entry")?;
        for pos in first_scored(chunk.len())..chunk.len() - 1 {
            score(index, &logits[pos * vocab..(pos + 1) * vocab], chunk[pos + 1]);
            index += 1;
        }
    }
    Ok(())
}

/// Indices of the `k` largest values of `row`, largest first (ties: lower index first).
fn top_indices(row: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let by_value = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_value);
        idx.truncate(k);
    }
    idx.sort_by(by_value);
    idx
}

/// The reference pass: what [`measure`] needs of every scored position. `top_k: None`
/// keeps the whole distribution.
pub fn reference(model: &dyn CausalLm, chunks: &[&[u32]], top_k: Option<usize>) -> Result<Reference> {
    let vocab = model.vocab_size();
    let k = top_k.map(|k| k.min(vocab));
    let (mut targets, mut target_logprobs, mut top1) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ids, mut kept, mut log_norms) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tail_ids, mut tail_logprobs) = (Vec::new(), Vec::new());
    let mut row = Vec::new();
    for_each_scored(model, chunks, |i, logits, target| {
        tensor::log_softmax(logits, &mut row);
        log_norms.push(log_norm(logits, &row));
        targets.push(target);
        target_logprobs.push(row[target as usize] as f32);
        top1.push(tensor::argmax(logits) as u32);
        match k {
            Some(k) => {
                let top = top_indices(&row, k);
                for &j in &top {
                    ids.push(j as u32);
                    kept.push(row[j] as f32);
                }
                for j in sample_tail(&row, &top, i as u64) {
                    tail_ids.push(j as u32);
                    tail_logprobs.push(row[j] as f32);
                }
            }
            None => kept.extend(row.iter().map(|&v| v as f32)),
        }
    })?;
    let kept = match k {
        Some(k) => Kept::TopK { k, ids, logprobs: kept, tail_ids, tail_logprobs },
        None => Kept::Full(kept),
    };
    Ok(Reference { vocab, targets, target_logprobs, top1, kept, log_norms })
}

/// [`TAIL_SAMPLES`] tokens outside `top`, drawn by systematic sampling in proportion to
/// their probabilities (`logprobs`), with a random start seeded by the position: every tail
/// token is drawn with probability proportional to its mass, so the mean of any function
/// over the draws estimates its tail average without bias. An empty tail repeats the last
/// kept token, which is never read (its tail weight is 0).
fn sample_tail(logprobs: &[f64], top: &[usize], position: u64) -> Vec<usize> {
    let mut in_top = vec![false; logprobs.len()];
    top.iter().for_each(|&j| in_top[j] = true);
    let tail: f64 = logprobs.iter().zip(&in_top).filter(|(_, &t)| !t).map(|(lp, _)| lp.exp()).sum();
    let fallback = *top.last().expect("k ≥ 1");
    if tail <= 0.0 {
        return vec![fallback; TAIL_SAMPLES];
    }
    let start = SeededRng::new(position).uniform();
    let mut targets = (0..TAIL_SAMPLES).map(|s| (s as f64 + start) / TAIL_SAMPLES as f64 * tail).peekable();
    let (mut drawn, mut cumulative, mut last) = (Vec::with_capacity(TAIL_SAMPLES), 0.0, fallback);
    for (j, lp) in logprobs.iter().enumerate().filter(|(j, _)| !in_top[*j]) {
        cumulative += lp.exp();
        last = j;
        while targets.next_if(|&t| t < cumulative).is_some() {
            drawn.push(j);
        }
    }
    // Rounding can leave the last target a hair beyond the cumulative sum.
    drawn.resize(TAIL_SAMPLES, last);
    drawn
}

/// The log-normaliser behind `logprobs = log_softmax(logits)`, rounded to f32 as stored.
fn log_norm(logits: &[f32], logprobs: &[f64]) -> f32 {
    (logits[0] as f64 - logprobs[0]) as f32
}

/// A value with its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The value.
    pub value: f64,
    /// Its standard error.
    pub std_error: f64,
}

/// Percentiles of a per-token quantity, llama.cpp's set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Largest value.
    pub max: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Median.
    pub median: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 5th percentile.
    pub p5: f64,
    /// 1st percentile.
    pub p1: f64,
    /// 0.1th percentile.
    pub p0_1: f64,
    /// Smallest value.
    pub min: f64,
}

impl Percentiles {
    /// Percentiles of `values` (linear interpolation between order statistics).
    pub fn of(values: &[f64]) -> Percentiles {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| percentile(&sorted, p);
        Percentiles {
            max: sorted[sorted.len() - 1],
            p99_9: q(0.999),
            p99: q(0.99),
            p95: q(0.95),
            p90: q(0.90),
            median: q(0.5),
            p10: q(0.10),
            p5: q(0.05),
            p1: q(0.01),
            p0_1: q(0.001),
            min: sorted[0],
        }
    }
}

/// Mean, spread and percentiles of a per-token quantity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Standard error of the mean.
    pub std_error: f64,
    /// Sample standard deviation.
    pub std_dev: f64,
    /// Percentiles.
    pub percentiles: Percentiles,
}

/// The change in probability of the correct token, model minus reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaP {
    /// Mean, percentiles and spread.
    pub spread: Spread,
    /// Root mean square.
    pub rms: Estimate,
}

/// Every divergence statistic of one model against the reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DivergenceStats {
    /// KL(reference ‖ model) per token, nats.
    pub kld: Spread,
    /// Mean width of the interval the KLD must lie in given what a top-k reference kept
    /// (the tail taken as one bin below, the worst-placed tail above); 0 for a full
    /// reference.
    pub kld_truncation_bound: f64,
    /// Standard error the tail sampling adds to the mean KLD (0 for a full reference).
    pub kld_sampling_std_error: f64,
    /// Δp of the correct token.
    pub delta_p: DeltaP,
    /// Fraction of positions where both pick the same most likely token, binomial error.
    pub same_top1: Estimate,
    /// Perplexity of the reference.
    pub ppl_reference: Estimate,
    /// Perplexity of this model.
    pub ppl: Estimate,
    /// `ppl / ppl_reference`, error from the paired per-token values.
    pub ppl_ratio: Estimate,
    /// `ln(ppl / ppl_reference)`, error from the paired per-token values.
    pub ln_ppl_ratio: Estimate,
    /// Pearson correlation of the per-token negative log-likelihoods.
    pub nll_correlation: f64,
    /// Mean over positions of the cosine of the two logit vectors, restricted to the
    /// tokens the reference kept (all of them with a full reference).
    pub logits_cosine: f64,
    /// Mean over positions of ‖model − reference‖² / ‖reference‖² of those logits.
    pub logits_nmse: f64,
}

/// Divergence of one model from the reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// Positions scored.
    pub tokens_scored: usize,
    /// Tokens the reference kept per position (`None`: the whole vocabulary).
    pub reference_top_k: Option<usize>,
    /// Why the statistics are withheld, when they are.
    pub withheld: Option<String>,
    /// The statistics (absent when withheld).
    pub stats: Option<DivergenceStats>,
}

/// What one scored position contributes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenScore {
    /// KL(reference ‖ model) as reported (exact for a full reference, else the top-k part
    /// plus the sampled tail's estimate, kept within the bounds).
    pub kl: f64,
    /// The smallest the KL could be given what the reference kept.
    pub kl_lower: f64,
    /// The largest the KL could be.
    pub kl_upper: f64,
    /// Variance of the tail estimate inside `kl` (0 for a full reference).
    pub kl_variance: f64,
    /// Negative log-likelihood of the true token under the reference.
    pub nll_reference: f64,
    /// Negative log-likelihood of the true token under the model.
    pub nll: f64,
    /// Both pick the same most likely token.
    pub same_top1: bool,
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
    let mut scores = Vec::with_capacity(reference.len());
    let (mut cosines, mut nmses) = (Vec::new(), Vec::new());
    let mut mismatch = None;
    let mut row = Vec::new();
    let mut scratch = TailScratch::default();
    for_each_scored(model, chunks, |i, logits, target| {
        if i >= reference.len() || reference.targets[i] != target {
            mismatch.get_or_insert(i);
            return;
        }
        tensor::log_softmax(logits, &mut row);
        let norm = log_norm(logits, &row);
        // The reference is stored as f32; round this side the same way, so a model
        // identical to the reference scores exactly zero.
        row.iter_mut().for_each(|q| *q = *q as f32 as f64);
        scores.push(score_position(reference, i, &row, tensor::argmax(logits) as u32, &mut scratch));
        let (r, q) = kept_logits(reference, i, &row, norm);
        cosines.push(cosine(&r, &q));
        nmses.push(nmse(&r, &q));
    })?;
    if let Some(i) = mismatch.or((scores.len() != reference.len()).then_some(scores.len())) {
        return Err(Error::Workload(format!(
            "the evaluation tokens differ from the reference's at scored position {i} \
             ({} positions scored, the reference has {})",
            scores.len(),
            reference.len()
        )));
    }
    Ok(summarize(&scores, &cosines, &nmses, reference.top_k()))
}

/// The logits of the tokens the reference kept at position `i`, rebuilt the same way on
/// both sides (f32 log-probability plus f32 log-normaliser), so identical models give
/// identical vectors: the reference's and the model's (from its rounded log-probabilities
/// `q` and normaliser `norm`).
fn kept_logits(reference: &Reference, i: usize, q: &[f64], norm: f32) -> (Vec<f32>, Vec<f32>) {
    let ref_norm = reference.log_norms[i];
    let logit = |lp: f64, norm: f32| (lp + norm as f64) as f32;
    match &reference.kept {
        Kept::TopK { k, ids, logprobs, .. } => ids[i * k..(i + 1) * k]
            .iter()
            .zip(&logprobs[i * k..(i + 1) * k])
            .map(|(&j, &lp)| (logit(lp as f64, ref_norm), logit(q[j as usize], norm)))
            .unzip(),
        Kept::Full(all) => all[i * reference.vocab..(i + 1) * reference.vocab]
            .iter()
            .zip(q)
            .map(|(&lp, &lq)| (logit(lp as f64, ref_norm), logit(lq, norm)))
            .unzip(),
    }
}

/// Reusable buffers for the tail bound.
#[derive(Default)]
struct TailScratch {
    in_top: Vec<bool>,
    tail_q: Vec<f64>,
}

/// The score of scored position `i`, given the model's log-probabilities `q` (rounded
/// to f32) and its most likely token.
fn score_position(
    reference: &Reference,
    i: usize,
    q: &[f64],
    top1: u32,
    scratch: &mut TailScratch,
) -> TokenScore {
    let target = reference.targets[i] as usize;
    let kl = match &reference.kept {
        Kept::Full(all) => {
            let p = &all[i * reference.vocab..(i + 1) * reference.vocab];
            let kl = p.iter().zip(q).map(|(&lp, &lq)| (lp as f64).exp() * (lp as f64 - lq)).sum::<f64>();
            let kl = non_negative(kl);
            TruncatedKl { estimate: kl, lower: kl, upper: kl, variance: 0.0 }
        }
        Kept::TopK { k, ids, logprobs, tail_ids, tail_logprobs } => {
            let (top, tail) = (i * k..(i + 1) * k, i * TAIL_SAMPLES..(i + 1) * TAIL_SAMPLES);
            let sample = TailSample { ids: &tail_ids[tail.clone()], logprobs: &tail_logprobs[tail] };
            truncated_kl(&ids[top.clone()], &logprobs[top], &sample, q, scratch)
        }
    };
    TokenScore {
        kl: kl.estimate,
        kl_lower: kl.lower,
        kl_upper: kl.upper,
        kl_variance: kl.variance,
        nll_reference: -(reference.target_logprobs[i] as f64),
        nll: -q[target],
        same_top1: reference.top1[i] == top1,
    }
}

/// Tail tokens a top-k reference drew for one position, with their log-probabilities.
struct TailSample<'a> {
    ids: &'a [u32],
    logprobs: &'a [f32],
}

/// KL(P‖Q) of one position from a truncated P: an estimate, rigorous bounds, and the
/// variance of the estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TruncatedKl {
    estimate: f64,
    lower: f64,
    upper: f64,
    variance: f64,
}

/// KL(P‖Q) when only P's top entries (`ids`, `logprobs`, most likely first) and a sample
/// of its tail are known, and Q (`q`, log-probabilities over the whole vocabulary) is known
/// exactly. The tail's share Σ pᵢ·ln(pᵢ/qᵢ) is T·E[ln(p/q)] over tail tokens drawn in
/// proportion to p, estimated by the sample mean; the bounds hold whatever the tail is.
fn truncated_kl(
    ids: &[u32],
    logprobs: &[f32],
    sample: &TailSample,
    q: &[f64],
    scratch: &mut TailScratch,
) -> TruncatedKl {
    let head: f64 =
        ids.iter().zip(logprobs).map(|(&j, &lp)| (lp as f64).exp() * (lp as f64 - q[j as usize])).sum();
    let p_top: f64 = logprobs.iter().map(|&lp| (lp as f64).exp()).sum();
    let tail = (1.0 - p_top).max(0.0);
    if tail <= 0.0 || ids.len() == q.len() {
        let kl = non_negative(head);
        return TruncatedKl { estimate: kl, lower: kl, upper: kl, variance: 0.0 };
    }
    scratch.in_top.clear();
    scratch.in_top.resize(q.len(), false);
    ids.iter().for_each(|&j| scratch.in_top[j as usize] = true);
    scratch.tail_q.clear();
    scratch.tail_q.extend(q.iter().zip(&scratch.in_top).filter(|(_, &top)| !top).map(|(&lq, _)| lq.exp()));
    // Both tails by the same formula, so a model identical to the reference scores 0.
    let q_top: f64 = ids.iter().map(|&j| q[j as usize].exp()).sum();
    let q_tail = (1.0 - q_top).max(f64::MIN_POSITIVE);
    let lower = non_negative(head + tail * (tail / q_tail).ln());
    let cap = (*logprobs.last().expect("k ≥ 1") as f64).exp();
    let upper = (head + worst_tail_share(tail, cap, &mut scratch.tail_q)).max(lower);
    let ratios: Vec<f64> =
        sample.ids.iter().zip(sample.logprobs).map(|(&j, &lp)| lp as f64 - q[j as usize]).collect();
    let n = ratios.len() as f64;
    let mean = ratios.iter().sum::<f64>() / n;
    let var = ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    // Bounds made from finite inputs are ordered; anything else stays NaN, for the
    // results' finiteness check to name, rather than panicking in `clamp`.
    let estimate = if lower <= upper { (head + tail * mean).clamp(lower, upper) } else { f64::NAN };
    TruncatedKl { estimate, lower, upper, variance: tail * tail * var / n }
}

/// `x`, with rounding's small negatives raised to 0; unlike `f64::max`, a NaN stays NaN
/// (`NaN.max(0.0)` is 0, which would score a broken model as perfect agreement).
fn non_negative(x: f64) -> f64 {
    if x < 0.0 {
        0.0
    } else {
        x
    }
}

/// The largest Σ pᵢ·ln(pᵢ/qᵢ) over tail distributions with Σ pᵢ = `tail` and every
/// pᵢ ≤ `cap`: the objective is convex, so the maximum sits at a vertex, which gives `cap`
/// to the tokens with the smallest qᵢ and the remainder to the next one.
fn worst_tail_share(tail: f64, cap: f64, tail_q: &mut [f64]) -> f64 {
    let full = ((tail / cap).floor() as usize).min(tail_q.len());
    let take = (full + 1).min(tail_q.len());
    if take < tail_q.len() {
        tail_q.select_nth_unstable_by(take, f64::total_cmp);
    }
    let smallest = &mut tail_q[..take];
    smallest.sort_by(f64::total_cmp);
    let term = |p: f64, q: f64| if p > 0.0 { p * (p / q.max(f64::MIN_POSITIVE)).ln() } else { 0.0 };
    let mut total: f64 = smallest[..full].iter().map(|&q| term(cap, q)).sum();
    if full < take {
        total += term(tail - full as f64 * cap, smallest[full]);
    }
    total
}

/// Cosine of two logit vectors (exactly 1 for identical ones).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a == b {
        return 1.0;
    }
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE)
}

/// Signal-to-quantization-noise ratio of `b` against the reference `a`, dB:
/// 10·log10(‖a‖² / ‖a − b‖²); `+inf` when they are equal.
pub fn sqnr_db(reference: &[f32], b: &[f32]) -> f64 {
    match nmse(reference, b) {
        0.0 => f64::INFINITY,
        e => -10.0 * e.log10(),
    }
}

/// ‖b − a‖² / ‖a‖², with `a` the reference.
pub fn nmse(reference: &[f32], b: &[f32]) -> f64 {
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in reference.iter().zip(b) {
        err += (y as f64 - x as f64).powi(2);
        norm += (x as f64).powi(2);
    }
    err / norm.max(f64::MIN_POSITIVE)
}

/// Mean and its standard error as llama.cpp computes it: √((⟨x²⟩ − ⟨x⟩²)/(n − 1)).
fn mean_with_error(values: &[f64]) -> Estimate {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let mean_sq = values.iter().map(|x| x * x).sum::<f64>() / n;
    let std_error =
        if values.len() > 1 { ((mean_sq - mean * mean).max(0.0) / (n - 1.0)).sqrt() } else { 0.0 };
    Estimate { value: mean, std_error }
}

/// Mean, errors and percentiles of `values`.
pub fn spread(values: &[f64]) -> Spread {
    let n = values.len() as f64;
    let mean = mean_with_error(values);
    let var = if values.len() > 1 {
        values.iter().map(|x| (x - mean.value).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Spread {
        mean: mean.value,
        std_error: mean.std_error,
        std_dev: var.sqrt(),
        percentiles: Percentiles::of(values),
    }
}

/// Pearson correlation (exactly 1 for identical values, 0 when either side is constant).
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    if a == b && a.iter().any(|x| *x != a[0]) {
        return 1.0;
    }
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma).powi(2);
        vb += (y - mb).powi(2);
    }
    if va == 0.0 || vb == 0.0 {
        0.0
    } else {
        cov / (va * vb).sqrt()
    }
}

/// Exponentiate a mean log with its error (first-order propagation).
fn exp_estimate(log: Estimate) -> Estimate {
    let value = log.value.exp();
    Estimate { value, std_error: value * log.std_error }
}

/// The statistics of per-token scores, or why they are withheld.
pub fn summarize(scores: &[TokenScore], cosines: &[f64], nmses: &[f64], top_k: Option<usize>) -> Divergence {
    let n = scores.len();
    let mut divergence = Divergence { tokens_scored: n, reference_top_k: top_k, withheld: None, stats: None };
    if n < MIN_SCORED_TOKENS {
        divergence.withheld = Some(format!(
            "only {n} tokens were scored and divergence statistics need at least {MIN_SCORED_TOKENS}; \
             lengthen `eval_text`, raise `context` or `max_chunks`"
        ));
        return divergence;
    }
    let column = |f: fn(&TokenScore) -> f64| scores.iter().map(f).collect::<Vec<f64>>();
    let (kl, kl_lower, kl_upper) = (column(|s| s.kl), column(|s| s.kl_lower), column(|s| s.kl_upper));
    let (nll_ref, nll) = (column(|s| s.nll_reference), column(|s| s.nll));
    let delta_p: Vec<f64> = scores.iter().map(|s| (-s.nll).exp() - (-s.nll_reference).exp()).collect();
    let log_ratio: Vec<f64> = nll.iter().zip(&nll_ref).map(|(a, b)| a - b).collect();
    let same = scores.iter().filter(|s| s.same_top1).count() as f64 / n as f64;
    let squares = mean_with_error(&delta_p.iter().map(|d| d * d).collect::<Vec<_>>());
    let rms = squares.value.sqrt();
    let ln_ppl_ratio = mean_with_error(&log_ratio);
    let mean = |v: &[f64]| if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 };
    divergence.stats = Some(DivergenceStats {
        kld: spread(&kl),
        kld_truncation_bound: kl_upper.iter().zip(&kl_lower).map(|(u, l)| u - l).sum::<f64>() / n as f64,
        kld_sampling_std_error: scores.iter().map(|s| s.kl_variance).sum::<f64>().sqrt() / n as f64,
        delta_p: DeltaP {
            spread: spread(&delta_p),
            // δ√x = δx / (2√x).
            rms: Estimate {
                value: rms,
                std_error: if rms > 0.0 { squares.std_error / (2.0 * rms) } else { 0.0 },
            },
        },
        same_top1: Estimate { value: same, std_error: (same * (1.0 - same) / (n as f64 - 1.0)).sqrt() },
        ppl_reference: exp_estimate(mean_with_error(&nll_ref)),
        ppl: exp_estimate(mean_with_error(&nll)),
        ppl_ratio: exp_estimate(ln_ppl_ratio),
        ln_ppl_ratio,
        nll_correlation: correlation(&nll, &nll_ref),
        logits_cosine: mean(cosines),
        logits_nmse: mean(nmses),
    });
    divergence
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::Linear;
    use crate::tensor::attention::{AttentionShape, KvCache};

    /// A causal model whose logits are a fixed function of the token, with one value
    /// replaced by `poison` at (`position`, `entry`) of every sequence.
    struct Poisoned {
        poison: f32,
        position: usize,
        entry: usize,
    }

    impl CausalLm for Poisoned {
        fn vocab_size(&self) -> usize {
            4
        }
        fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
            KvCache::new(1, batch, AttentionShape { heads: 1, kv_heads: 1, head_dim: 1 }, capacity)
        }
        fn forward_observed(
            &self,
            tokens: &[u32],
            _: usize,
            _: &mut KvCache,
            _: Logits,
            _: &mut dyn FnMut(usize, &[f32]),
        ) -> Result<Vec<f32>> {
            let mut logits: Vec<f32> =
                tokens.iter().flat_map(|&t| (0..4).map(move |j| (t + j) as f32 % 3.0)).collect();
            logits[self.position * 4 + self.entry] = self.poison;
            Ok(logits)
        }
        fn export_to(&self, _: &mut crate::scheme::TensorSink) {}
        fn linears(&self) -> Vec<(&str, &dyn Linear)> {
            Vec::new()
        }
    }

    #[test]
    fn non_finite_logits_are_an_error_naming_the_place_never_a_score() {
        let tokens: Vec<u32> = (0..512).map(|i| i % 4).collect();
        let chunks = chunks(&tokens, 16, None);
        let clean = Poisoned { poison: 1.0, position: 0, entry: 0 };
        let reference = reference(&clean, &chunks, Some(2)).unwrap();
        for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let model = Poisoned { poison, position: 9, entry: 2 };
            let err = measure(&model, &chunks, &reference).unwrap_err().to_string();
            assert!(err.contains("non-finite value in logits"), "{err}");
            assert!(err.contains("evaluation chunk 0, position 9, vocabulary entry 2"), "{err}");
            assert!(err.contains(&format!("found {poison}")), "{err}");
            let err = super::reference(&model, &chunks, None).unwrap_err().to_string();
            assert!(err.contains("position 9, vocabulary entry 2"), "{err}");
        }
        // The clean model scores as exact agreement: the check does not get in the way.
        let exact = measure(&clean, &chunks, &reference).unwrap().stats.unwrap();
        assert_eq!(exact.kld.mean, 0.0);
    }

    #[test]
    fn a_nan_kl_stays_nan_instead_of_clamping_to_zero() {
        assert!(non_negative(f64::NAN).is_nan());
        assert_eq!(non_negative(-1e-17), 0.0);
        assert_eq!(non_negative(0.25), 0.25);
    }

    #[test]
    fn chunks_are_whole_and_capped() {
        let tokens: Vec<u32> = (0..10).collect();
        assert_eq!(chunks(&tokens, 4, None), vec![&[0, 1, 2, 3][..], &[4, 5, 6, 7][..]]);
        assert_eq!(chunks(&tokens, 4, Some(1)).len(), 1);
        assert_eq!(chunks(&tokens, 11, None).len(), 0);
        assert_eq!(first_scored(128), 64);
    }

    fn log(p: &[f64]) -> Vec<f64> {
        p.iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn truncated_kl_is_exact_without_a_tail_and_brackets_the_exact_value_with_one() {
        let p: [f64; 4] = [0.5, 0.3, 0.15, 0.05];
        let q = [0.4, 0.4, 0.1, 0.1];
        // By hand: Σ p ln(p/q).
        let exact: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
        assert!((exact - 0.051_429_56).abs() < 1e-6, "{exact}");
        let mut scratch = TailScratch::default();
        let lp: Vec<f32> = p.iter().map(|x| x.ln() as f32).collect();
        let none = TailSample { ids: &[], logprobs: &[] };
        let all = truncated_kl(&[0, 1, 2, 3], &lp, &none, &log(&q), &mut scratch);
        assert!((all.estimate - exact).abs() < 1e-6 && all.lower == all.upper && all.variance == 0.0);
        // Keep two: tail T = 0.2 against Q_T = 0.2, so the lower bound is the head alone:
        // 0.5 ln(0.5/0.4) + 0.3 ln(0.3/0.4) + 0.2 ln(0.2/0.2).
        let head = 0.5 * (0.5f64 / 0.4).ln() + 0.3 * (0.3f64 / 0.4).ln();
        // Tail draws in proportion to p (0.15 : 0.05 = 3 : 1): ln(1.5) three times, ln(0.5) once,
        // whose mean times T is exactly the tail's share, 0.15 ln 1.5 + 0.05 ln 0.5.
        let sample = TailSample { ids: &[2, 2, 2, 3], logprobs: &[lp[2], lp[2], lp[2], lp[3]] };
        let two = truncated_kl(&[0, 1], &lp[..2], &sample, &log(&q), &mut scratch);
        assert!((two.lower - head).abs() < 1e-6, "{two:?} vs {head}");
        // Worst tail under p ≤ 0.3: all 0.2 on one of the q = 0.1 tokens: 0.2 ln 2.
        assert!((two.upper - (head + 0.2 * 2f64.ln())).abs() < 1e-6, "{two:?}");
        assert!((two.estimate - exact).abs() < 1e-6, "{two:?} vs {exact}");
        // Sample variance of {ln 1.5 ×3, ln 0.5}: T² · s² / 4.
        let r = [1.5f64.ln(), 1.5f64.ln(), 1.5f64.ln(), 0.5f64.ln()];
        let m = r.iter().sum::<f64>() / 4.0;
        let s2 = r.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 3.0;
        assert!((two.variance - 0.04 * s2 / 4.0).abs() < 1e-9, "{two:?}");
    }

    #[test]
    fn the_tail_sample_draws_tokens_in_proportion_to_their_probability() {
        // Top token 0; tail tokens 1..=4 with probabilities 0.4, 0.2, 0.1, 0.1 (tail 0.8).
        let p = [0.2f64, 0.4, 0.2, 0.1, 0.1];
        let lp: Vec<f64> = p.iter().map(|x| x.ln()).collect();
        let mut counts = [0usize; 5];
        for position in 0..200 {
            let drawn = sample_tail(&lp, &[0], position);
            assert_eq!(drawn.len(), TAIL_SAMPLES);
            drawn.iter().for_each(|&j| counts[j] += 1);
        }
        let total = (200 * TAIL_SAMPLES) as f64;
        assert_eq!(counts[0], 0, "kept tokens are never drawn");
        for (j, want) in [(1, 0.5), (2, 0.25), (3, 0.125), (4, 0.125)] {
            let got = counts[j] as f64 / total;
            // Systematic sampling hits each share to within one draw per position.
            assert!((got - want).abs() < 1.0 / TAIL_SAMPLES as f64, "token {j}: {got} vs {want}");
        }
        assert_eq!(sample_tail(&[0.0, f64::NEG_INFINITY], &[0], 3), vec![0; TAIL_SAMPLES], "empty tail");
    }

    #[test]
    fn worst_tail_fills_the_least_likely_tokens_first() {
        // T = 0.25, cap 0.1: 0.1 on q = 0.01 and 0.02, the remaining 0.05 on q = 0.05.
        let mut q = vec![0.2, 0.05, 0.01, 0.3, 0.02];
        let got = worst_tail_share(0.25, 0.1, &mut q);
        let want = 0.1 * (0.1f64 / 0.01).ln() + 0.1 * (0.1f64 / 0.02).ln() + 0.05 * (0.05f64 / 0.05).ln();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    /// Hand-computed statistics of 100 scored tokens: 50 with KL 0 and 50 with KL 0.2,
    /// the model 10% less sure of the true token on the second half.
    #[test]
    fn statistics_of_hand_computed_scores() {
        let p_ref: f64 = 0.5;
        let scores: Vec<TokenScore> = (0..100)
            .map(|i| {
                let worse = i >= 50;
                let kl = if worse { 0.2 } else { 0.0 };
                let p: f64 = if worse { 0.45 } else { 0.5 };
                TokenScore {
                    kl,
                    kl_lower: kl,
                    kl_upper: kl,
                    kl_variance: 0.0,
                    nll_reference: -p_ref.ln(),
                    nll: -p.ln(),
                    same_top1: i % 4 != 0,
                }
            })
            .collect();
        let d = summarize(&scores, &[1.0, 0.5], &[0.0, 0.25], Some(64));
        let s = d.stats.expect("100 tokens are enough");
        // KL: mean 0.1, ⟨x²⟩ = 0.02, SE = √((0.02 − 0.01)/99), σ = √(100·0.01/99).
        assert!((s.kld.mean - 0.1).abs() < 1e-12);
        assert!((s.kld.std_error - (0.01f64 / 99.0).sqrt()).abs() < 1e-12);
        assert!((s.kld.std_dev - (1.0f64 / 99.0).sqrt()).abs() < 1e-12);
        assert_eq!((s.kld.percentiles.max, s.kld.percentiles.min), (0.2, 0.0));
        // The 50th percentile sits between the 49th (0) and 50th (0.2) order statistics.
        assert!((s.kld.percentiles.median - 0.1).abs() < 1e-12);
        assert!((s.kld.percentiles.p90 - 0.2).abs() < 1e-12);
        // Δp: 0 on half, −0.05 on the other half: mean −0.025, RMS √(0.00125).
        assert!((s.delta_p.spread.mean + 0.025).abs() < 1e-12);
        assert!((s.delta_p.rms.value - 0.00125f64.sqrt()).abs() < 1e-12);
        // SE of the mean square: values 0 and 0.0025 → √((0.0025²/2 − 0.00125²)/99).
        let se_sq = ((0.0025f64.powi(2) / 2.0 - 0.00125f64.powi(2)) / 99.0).sqrt();
        assert!((s.delta_p.rms.std_error - se_sq / (2.0 * 0.00125f64.sqrt())).abs() < 1e-12);
        // Same top-1: 75 of 100, SE √(0.75·0.25/99).
        assert!((s.same_top1.value - 0.75).abs() < 1e-12);
        assert!((s.same_top1.std_error - (0.75f64 * 0.25 / 99.0).sqrt()).abs() < 1e-12);
        // PPL: reference exactly 2; ln ratio = ½ ln(0.5/0.45), SE from the paired values.
        assert!((s.ppl_reference.value - 2.0).abs() < 1e-12 && s.ppl_reference.std_error == 0.0);
        let half = (0.5f64 / 0.45).ln();
        assert!((s.ln_ppl_ratio.value - half / 2.0).abs() < 1e-12);
        let se = ((half * half / 2.0 - half * half / 4.0) / 99.0).sqrt();
        assert!((s.ln_ppl_ratio.std_error - se).abs() < 1e-12);
        assert!((s.ppl_ratio.value - (half / 2.0).exp()).abs() < 1e-12);
        assert!((s.ppl_ratio.std_error - (half / 2.0).exp() * se).abs() < 1e-12);
        assert!((s.ppl.value - 2.0 * (half / 2.0).exp()).abs() < 1e-12);
        // The reference's NLL is constant: no correlation to speak of.
        assert!(s.nll_correlation.abs() < 1e-9, "{}", s.nll_correlation);
        assert_eq!((s.logits_cosine, s.logits_nmse), (0.75, 0.125));
        assert_eq!((s.kld_truncation_bound, s.kld_sampling_std_error), (0.0, 0.0));
    }

    #[test]
    fn fewer_than_100_tokens_withhold_the_statistics_with_a_reason() {
        let d = summarize(&vec![TokenScore::default(); 99], &[], &[], None);
        assert!(d.stats.is_none());
        assert!(d.withheld.as_deref().unwrap().contains("only 99 tokens"), "{:?}", d.withheld);
    }

    #[test]
    fn cosine_and_nmse_of_known_vectors() {
        assert_eq!(cosine(&[1.0, 2.0], &[1.0, 2.0]), 1.0);
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(nmse(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((nmse(&[3.0, 4.0], &[3.0, 3.0]) - 1.0 / 25.0).abs() < 1e-12);
    }

    #[test]
    fn sqnr_of_known_vectors_and_of_identical_ones() {
        assert_eq!(sqnr_db(&[1.0, 2.0], &[1.0, 2.0]), f64::INFINITY);
        // ‖a‖² = 100, ‖a − b‖² = 1: 20 dB.
        assert!((sqnr_db(&[6.0, 8.0], &[6.0, 9.0]) - 20.0).abs() < 1e-12);
    }

    #[test]
    fn top_indices_pick_the_largest_in_order() {
        assert_eq!(top_indices(&[0.1, 0.5, 0.3, 0.5], 3), vec![1, 3, 2]);
        assert_eq!(top_indices(&[0.1, 0.5], 5), vec![1, 0]);
    }
}
