//! `bench profile`: where one forward pass spends its time, per op kind, with achieved
//! rates against this machine's peaks measured at start (the f32 multiply-add peak of
//! every thread and a parallel memory read). The spans come from [`crate::profile`];
//! time no span covers (embedding lookups, residual adds, copies, allocation) is
//! reported as "other".

use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::{Logits, Model};
use crate::profile::{self, Totals};
use crate::tensor;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct ProfileOptions {
    /// Sequences per pass.
    pub batch: usize,
    /// Tokens per sequence (the prompt, for decoders).
    pub tokens: usize,
    /// Profile decode steps after the prompt instead of the prompt's pass.
    pub decode: bool,
    /// Passes (or decode steps) profiled, after one untimed warm-up.
    pub repeats: usize,
}

/// The machine's peaks, measured before profiling.
#[derive(Debug, Clone, Copy)]
pub struct Peaks {
    /// f32 multiply-add throughput of every thread at once, GFLOP/s
    /// ([`tensor::fma_peak`]): the ceiling of any f32 product.
    pub fma_gflop_s: f64,
    /// Read bandwidth of a parallel sum over 256 MiB, GB/s.
    pub read_gb_s: f64,
}

/// One op kind's line.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    /// `linear`, `attention`, `norm`, …
    pub category: &'static str,
    /// The kernel path or variant.
    pub detail: &'static str,
    /// What it accumulated over all profiled passes.
    pub totals: Totals,
}

/// The result of [`profile_model`].
#[derive(Debug, Clone)]
pub struct ProfileReport {
    /// What ran, in words.
    pub what: String,
    /// Passes (or steps) profiled.
    pub passes: usize,
    /// Wall time of all profiled passes, seconds.
    pub total_s: f64,
    /// Op kinds, longest first.
    pub rows: Vec<ProfileRow>,
    /// The peaks measured at start.
    pub peaks: Peaks,
}

/// Best of three timings of `f`, seconds.
fn best_of_three(mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Measure the multiply-add and read-bandwidth peaks (under a second).
pub fn measure_peaks() -> Peaks {
    use rayon::prelude::*;
    let fma_gflop_s = tensor::fma_peak::fma_peak_gflop_s();
    let buffer: Vec<f32> = (0..(64usize << 20)).map(|i| (i % 7) as f32).collect();
    let mut sink = 0.0f32;
    // Eight running sums per chunk, so the read is vectorised and memory is the bound.
    let lanes = |c: &[f32]| {
        let mut acc = [0.0f32; 8];
        c.chunks_exact(8).for_each(|v| (0..8).for_each(|i| acc[i] += v[i]));
        acc.iter().sum::<f32>()
    };
    let read_s = best_of_three(|| sink += buffer.par_chunks(1 << 16).map(lanes).sum::<f32>());
    std::hint::black_box(sink);
    Peaks { fma_gflop_s, read_gb_s: (buffer.len() * 4) as f64 / read_s / 1e9 }
}

/// Deterministic token ids below `vocab` (the profile times arithmetic, not text).
fn token_ids(count: usize, vocab: usize) -> Vec<u32> {
    (0..count).map(|i| ((i * 7919 + 13) % vocab.max(1)) as u32).collect()
}

/// Profile `model` (one warm-up pass, then `repeats` profiled ones). `vocab` bounds the
/// synthetic token ids; `max_positions` the tokens a sequence may hold.
pub fn profile_model(
    model: &Model,
    vocab: usize,
    max_positions: usize,
    opts: ProfileOptions,
) -> Result<ProfileReport> {
    let ProfileOptions { batch, tokens, decode, repeats } = opts;
    if batch == 0 || tokens == 0 || repeats == 0 {
        return Err(Error::Workload(format!(
            "--batch {batch}, --tokens {tokens}, --repeats {repeats}: each must be at least 1"
        )));
    }
    if decode && matches!(model, Model::Encoder(_)) {
        return Err(Error::Workload("--decode: an encoder has no decode steps".into()));
    }
    let needed = tokens + if decode { repeats + 1 } else { 0 };
    if needed > max_positions {
        return Err(Error::Workload(format!(
            "{needed} positions per sequence (--tokens {tokens}{}), expected at most the model's {max_positions}",
            if decode { format!(" + {} decode steps", repeats + 1) } else { String::new() }
        )));
    }
    let peaks = measure_peaks();
    let ids = token_ids(batch * tokens, vocab);
    // Recording stops however this returns.
    struct Recording;
    impl Drop for Recording {
        fn drop(&mut self) {
            profile::set_enabled(false);
        }
    }
    let _recording = Recording;
    let (what, total_s) = match model {
        Model::Causal(lm) => {
            let pass = |cache: &mut _| lm.forward(&ids, batch, cache, Logits::Last);
            if decode {
                let mut cache = lm.new_cache(batch, needed);
                pass(&mut cache)?;
                let step = token_ids(batch, vocab);
                lm.forward(&step, batch, &mut cache, Logits::Last)?;
                profile::set_enabled(true);
                let t = Instant::now();
                for _ in 0..repeats {
                    lm.forward(&step, batch, &mut cache, Logits::Last)?;
                }
                (
                    format!("decode steps of {batch} sequence(s) after {tokens} tokens"),
                    t.elapsed().as_secs_f64(),
                )
            } else {
                pass(&mut lm.new_cache(batch, tokens))?;
                profile::set_enabled(true);
                let t = Instant::now();
                for _ in 0..repeats {
                    pass(&mut lm.new_cache(batch, tokens))?;
                }
                (format!("prefill of {batch} × {tokens} tokens"), t.elapsed().as_secs_f64())
            }
        }
        Model::Encoder(enc) => {
            let mask = vec![1u8; ids.len()];
            enc.encode(&ids, &mask, batch)?;
            profile::set_enabled(true);
            let t = Instant::now();
            for _ in 0..repeats {
                enc.encode(&ids, &mask, batch)?;
            }
            (format!("encoder pass of {batch} × {tokens} tokens"), t.elapsed().as_secs_f64())
        }
    };
    profile::set_enabled(false);
    let mut rows: Vec<ProfileRow> = profile::take()
        .into_iter()
        .map(|((category, detail), totals)| ProfileRow { category, detail, totals })
        .collect();
    rows.sort_by(|a, b| b.totals.seconds.total_cmp(&a.totals.seconds));
    Ok(ProfileReport { what, passes: repeats, total_s, rows, peaks })
}

/// The report as a text table: per op kind its milliseconds per pass, share, calls per
/// pass, achieved GFLOP/s and GB/s, and the larger of the two fractions of the peaks.
pub fn render(r: &ProfileReport) -> String {
    let per_pass = |s: f64| s / r.passes as f64 * 1e3;
    let mut out = format!(
        "{} · {} pass(es) · {:.2} ms per pass\npeaks measured here: f32 multiply-add {:.0} GFLOP/s (all threads), memory read {:.1} GB/s\n\n",
        r.what,
        r.passes,
        per_pass(r.total_s),
        r.peaks.fma_gflop_s,
        r.peaks.read_gb_s
    );
    out.push_str(&format!(
        "{:<24} {:<48} {:>9} {:>6} {:>7} {:>9} {:>8}  {}\n",
        "op", "kind", "ms/pass", "share", "calls", "GFLOP/s", "GB/s", "against the peaks"
    ));
    let mut covered = 0.0;
    for row in &r.rows {
        let t = row.totals;
        covered += t.seconds;
        let (gflops, gbs) =
            if t.seconds > 0.0 { (t.ops / t.seconds / 1e9, t.bytes / t.seconds / 1e9) } else { (0.0, 0.0) };
        let (of_fma, of_read) = (gflops / r.peaks.fma_gflop_s, gbs / r.peaks.read_gb_s);
        // Integer products can pass the f32 peak: say how many times over.
        let against = if of_fma > 1.0 && of_fma >= of_read {
            format!("{of_fma:.1}× the f32 FMA peak")
        } else if of_fma >= of_read {
            format!("{:.0}% of the f32 FMA peak", 100.0 * of_fma)
        } else {
            format!("{:.0}% of read bandwidth", 100.0 * of_read)
        };
        out.push_str(&format!(
            "{:<24} {:<48} {:>9.3} {:>5.1}% {:>7} {:>9.1} {:>8.1}  {}\n",
            row.category,
            row.detail,
            per_pass(t.seconds),
            100.0 * t.seconds / r.total_s,
            t.calls as usize / r.passes,
            gflops,
            gbs,
            against
        ));
    }
    let other = (r.total_s - covered).max(0.0);
    out.push_str(&format!(
        "{:<24} {:<48} {:>9.3} {:>5.1}%  (embedding lookups, residual adds, copies, allocation)\n",
        "other",
        "",
        per_pass(other),
        100.0 * other / r.total_s
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_tokens_stay_below_the_vocabulary() {
        assert!(token_ids(1000, 17).iter().all(|&t| t < 17));
        assert_eq!(token_ids(3, 1), vec![0, 0, 0]);
    }

    #[test]
    fn the_table_names_every_kind_and_the_rest_as_other() {
        let report = ProfileReport {
            what: "prefill of 1 × 8 tokens".into(),
            passes: 2,
            total_s: 0.010,
            rows: vec![ProfileRow {
                category: "linear",
                detail: "f32-gemm",
                totals: Totals { calls: 8, seconds: 0.006, ops: 6e9, bytes: 1e6 },
            }],
            peaks: Peaks { fma_gflop_s: 2000.0, read_gb_s: 20.0 },
        };
        let text = render(&report);
        assert!(text.contains("prefill of 1 × 8 tokens · 2 pass(es) · 5.00 ms per pass"), "{text}");
        assert!(text.contains("f32-gemm") && text.contains("3.000") && text.contains("60.0%"), "{text}");
        // 6e9 operations in 6 ms: 1000 GFLOP/s, half the multiply-add peak.
        assert!(text.contains("1000.0") && text.contains("50% of the f32 FMA peak"), "{text}");
        assert!(text.contains("other") && text.contains("2.000") && text.contains("40.0%"), "{text}");
    }
}
