//! Latency statistics over repeated timings: median with a bootstrap confidence interval,
//! mean, spread, percentiles, and the warnings that tell the user what to change when the
//! timings cannot be trusted. Timing goes through a [`Clock`] so tests can script it.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::tensor::SeededRng;

/// The coefficient of variation above which timings are called noisy.
pub const NOISY_CV: f64 = 0.05;

/// The modified z-score above which the first measured run is called an outlier
/// (Iglewicz and Hoaglin's cut-off).
pub const OUTLIER_Z: f64 = 3.5;

/// Bootstrap resamples behind the confidence interval of the median.
const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Fixed seed of the bootstrap, so the same samples always give the same interval.
const BOOTSTRAP_SEED: u64 = 0x5EED_B007;

/// Where time comes from: the wall clock in runs, a script in tests.
pub trait Clock {
    /// Milliseconds since an arbitrary origin.
    fn now_ms(&mut self) -> f64;
}

/// Makes the clock a run times with: [`wall_clock`] in runs, a script in tests.
pub type ClockSource = fn() -> Box<dyn Clock>;

/// A fresh [`WallClock`], as a [`ClockSource`].
pub fn wall_clock() -> Box<dyn Clock> {
    Box::new(WallClock::default())
}

/// The monotonic wall clock.
#[derive(Debug, Clone, Copy)]
pub struct WallClock(Instant);

impl Default for WallClock {
    fn default() -> Self {
        WallClock(Instant::now())
    }
}

impl Clock for WallClock {
    fn now_ms(&mut self) -> f64 {
        self.0.elapsed().as_secs_f64() * 1e3
    }
}

/// Summary of one set of timing samples (milliseconds or seconds, as recorded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub median: f64,
    /// Percentile-bootstrap 95% confidence interval of the median, `[low, high]`.
    pub median_ci95: [f64; 2],
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one sample).
    pub std_dev: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// 90th percentile (linear interpolation).
    pub p90: f64,
    /// 99th percentile (linear interpolation).
    pub p99: f64,
}

impl Stats {
    /// Summarise `samples`; `None` when empty.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var =
            if n > 1 { sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Some(Stats {
            n,
            median: percentile(&sorted, 0.5),
            median_ci95: bootstrap_median_ci(&sorted, 0.95),
            mean,
            std_dev: var.sqrt(),
            min: sorted[0],
            max: sorted[n - 1],
            p90: percentile(&sorted, 0.9),
            p99: percentile(&sorted, 0.99),
        })
    }

    /// Coefficient of variation (σ / mean).
    pub fn cv(&self) -> f64 {
        if self.mean == 0.0 {
            0.0
        } else {
            self.std_dev / self.mean
        }
    }
}

/// The `q` quantile of sorted samples, interpolating linearly between neighbours.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Percentile-bootstrap confidence interval of the median at `level` (e.g. 0.95):
/// resample with replacement, take each resample's median, and read the interval off
/// the sorted medians. Deterministic: the generator is seeded with a constant.
pub fn bootstrap_median_ci(samples: &[f64], level: f64) -> [f64; 2] {
    if samples.len() < 2 {
        let only = samples.first().copied().unwrap_or(f64::NAN);
        return [only, only];
    }
    let mut rng = SeededRng::new(BOOTSTRAP_SEED);
    let mut resample = vec![0.0; samples.len()];
    let mut medians: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            for slot in resample.iter_mut() {
                *slot = samples[(rng.next_u64() % samples.len() as u64) as usize];
            }
            resample.sort_by(f64::total_cmp);
            percentile(&resample, 0.5)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    [percentile(&medians, tail), percentile(&medians, 1.0 - tail)]
}

/// Modified z-score of `value` against `samples`: 0.6745·(value − median) / MAD. When more
/// than half the samples are equal the MAD is zero, and the mean absolute deviation
/// stands in for it, scaled to match a normal's spread: (value − median) / (1.2533·MeanAD).
/// `None` when every sample is the same.
pub fn modified_z(samples: &[f64], value: f64) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = percentile(&sorted, 0.5);
    let mut deviations: Vec<f64> = sorted.iter().map(|x| (x - median).abs()).collect();
    deviations.sort_by(f64::total_cmp);
    let mad = percentile(&deviations, 0.5);
    if mad > 0.0 {
        return Some(0.6745 * (value - median) / mad);
    }
    let mean_ad = deviations.iter().sum::<f64>() / deviations.len() as f64;
    (mean_ad > 0.0).then(|| (value - median) / (1.2533 * mean_ad))
}

/// Warnings about the timings of `what` (`prefill`, `decode`), each saying what to change:
/// a coefficient of variation above [`NOISY_CV`], and a first measured run whose modified
/// z-score exceeds [`OUTLIER_Z`] (a cold cache or a CPU still ramping its clock).
pub fn warnings(what: &str, samples: &[f64], first_run: Option<f64>) -> Vec<String> {
    let mut found = Vec::new();
    let Some(stats) = Stats::of(samples) else { return found };
    if stats.cv() > NOISY_CV {
        found.push(format!(
            "{what} timings vary by {:.1}% (coefficient of variation over {} samples, above {:.0}%); \
             close other programs, pin the CPU frequency, or raise `repeats`",
            100.0 * stats.cv(),
            stats.n,
            100.0 * NOISY_CV
        ));
    }
    match first_run.and_then(|first| modified_z(samples, first)) {
        Some(z) if z > OUTLIER_Z => found.push(format!(
            "the first measured {what} run is an outlier (modified z-score {z:.1}, above {OUTLIER_Z}); \
             raise `warmup` so caches and clocks settle before timing"
        )),
        Some(z) if z < -OUTLIER_Z => found.push(format!(
            "the first measured {what} run is an outlier, faster than the rest (modified z-score {z:.1}); \
             the machine got busier while timing: close other programs and run again"
        )),
        _ => {}
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_known_samples() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        assert_eq!((s.n, s.median, s.mean, s.min, s.max), (5, 3.0, 3.0, 1.0, 5.0));
        assert!((s.std_dev - 2.5f64.sqrt()).abs() < 1e-12);
        assert!((s.p90 - 4.6).abs() < 1e-12);
        assert!((s.p99 - 4.96).abs() < 1e-12);
        assert_eq!(Stats::of(&[2.0]).unwrap().std_dev, 0.0);
        assert_eq!(Stats::of(&[2.0]).unwrap().median_ci95, [2.0, 2.0]);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn bootstrap_interval_brackets_the_median_and_narrows_with_more_samples() {
        let mut rng = SeededRng::new(3);
        let few: Vec<f64> = (0..10).map(|_| 10.0 + rng.normal()).collect();
        let many: Vec<f64> = (0..1000).map(|_| 10.0 + rng.normal()).collect();
        let (a, b) = (Stats::of(&few).unwrap(), Stats::of(&many).unwrap());
        for s in [&a, &b] {
            assert!(s.median_ci95[0] <= s.median && s.median <= s.median_ci95[1], "{s:?}");
        }
        let width = |s: &Stats| s.median_ci95[1] - s.median_ci95[0];
        assert!(width(&b) < width(&a) / 3.0, "{} vs {}", width(&b), width(&a));
        // The median of N(10, 1) has standard error ≈ 1.2533/√n: a 95% interval of about
        // ±0.078 for n = 1000.
        assert!((width(&b) - 2.0 * 1.96 * 1.2533 / 1000f64.sqrt()).abs() < 0.06, "{}", width(&b));
        assert_eq!(Stats::of(&few), Stats::of(&few), "deterministic");
    }

    #[test]
    fn modified_z_of_hand_computed_values() {
        // Median 3, absolute deviations 2, 1, 0, 1, 2 → MAD 1; z(10) = 0.6745 · 7.
        assert!((modified_z(&[1.0, 2.0, 3.0, 4.0, 5.0], 10.0).unwrap() - 4.7215).abs() < 1e-12);
        assert_eq!(modified_z(&[2.0, 2.0, 2.0], 5.0), None);
        // MAD 0, mean absolute deviation 1/4: z(4) = 2 / (1.2533 / 4).
        assert!((modified_z(&[2.0, 2.0, 2.0, 3.0], 4.0).unwrap() - 8.0 / 1.2533).abs() < 1e-12);
    }

    #[test]
    fn warnings_name_the_fix() {
        let steady = [10.0, 10.1, 9.9, 10.05, 9.95, 10.0];
        assert!(warnings("decode", &steady, Some(10.0)).is_empty());
        let noisy = [10.0, 14.0, 8.0, 12.5, 7.0, 11.0];
        let found = warnings("decode", &noisy, Some(10.0));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("raise `repeats`"), "{}", found[0]);
        let slow_first = [13.0, 10.0, 10.1, 9.9, 10.05, 9.95, 10.0, 10.02];
        let found = warnings("prefill", &slow_first, Some(13.0));
        assert!(found.iter().any(|w| w.contains("raise `warmup`")), "{found:?}");
        let fast_first = [7.0, 10.0, 10.1, 9.9, 10.05, 9.95, 10.0, 10.02];
        let found = warnings("prefill", &fast_first, Some(7.0));
        assert!(found.iter().any(|w| w.contains("faster than the rest")), "{found:?}");
    }
}
