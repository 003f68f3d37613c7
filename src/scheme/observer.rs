//! Calibration observers (activation ranges → per-tensor affine uint8 parameters) and
//! the per-channel symmetric int8 weight quantization shared by the calibrated schemes.
//!
//! The uint8 parameters follow `torch.ao.quantization.observer`'s `_calculate_qparams`
//! for `quint8` / `per_tensor_affine` with the full 0..255 range (`reduce_range=False`),
//! computed in f32 as torch does:
//!
//! ```text
//! min_neg = min(min, 0);  max_pos = max(max, 0)        // the range always holds 0
//! scale   = max((max_pos − min_neg) / 255, eps)         // eps = f32::EPSILON (torch.finfo(float32).eps)
//! zp      = clamp(0 − round_half_even(min_neg / scale), 0, 255)
//! ```
//!
//! and an empty observation (nothing seen) gives torch's `(1.0, 0)`. Quantization then
//! is `q = clamp(round_half_even(x · (1/scale)) + zp, 0, 255)` — torch's fake-quantize
//! and fbgemm both multiply by the f32 inverse scale — and `deq(q) = (q − zp) · scale`.

use rayon::prelude::*;

use super::SchemeParams;
use crate::error::{Error, Result};

/// Lowest uint8 code.
pub const U8_MIN: i32 = 0;
/// Highest uint8 code.
pub const U8_MAX: i32 = 255;
/// Lowest int8 code of the weights.
pub const I8_MIN: i32 = -128;
/// Highest int8 code of the weights.
pub const I8_MAX: i32 = 127;

/// Per-tensor affine uint8 quantization parameters of an activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AffineU8 {
    /// Step between codes.
    pub scale: f32,
    /// The code that represents 0.0 exactly.
    pub zero_point: i32,
}

impl AffineU8 {
    /// torch's `_calculate_qparams` for `quint8` per-tensor affine over `[min, max]`
    /// (see the module comment). `min > max` means "nothing observed".
    pub fn from_range(min: f32, max: f32) -> AffineU8 {
        if min > max {
            return AffineU8 { scale: 1.0, zero_point: 0 };
        }
        let min_neg = min.min(0.0);
        let max_pos = max.max(0.0);
        let scale = ((max_pos - min_neg) / (U8_MAX - U8_MIN) as f32).max(f32::EPSILON);
        let zero_point = (U8_MIN as f32 - (min_neg / scale).round_ties_even()) as i32;
        AffineU8 { scale, zero_point: zero_point.clamp(U8_MIN, U8_MAX) }
    }

    /// The code of `x`: `clamp(round(x / scale) + zp, 0, 255)` (NaN gives 0).
    pub fn quantize(&self, x: f32) -> u8 {
        let q = (x * (1.0 / self.scale)).round_ties_even() + self.zero_point as f32;
        q.clamp(U8_MIN as f32, U8_MAX as f32) as u8
    }

    /// The value a code stands for.
    pub fn dequantize(&self, q: u8) -> f32 {
        (q as i32 - self.zero_point) as f32 * self.scale
    }

    /// Quantize then dequantize (fake quantization).
    pub fn fake(&self, x: f32) -> f32 {
        self.dequantize(self.quantize(x))
    }

    /// The real interval the codes cover, `[(0 − zp)·scale, (255 − zp)·scale]`.
    pub fn range(&self) -> (f32, f32) {
        (self.dequantize(U8_MIN as u8), self.dequantize(U8_MAX as u8))
    }
}

/// One row of the observer table.
#[derive(Debug, Clone, Copy)]
pub struct ObserverInfo {
    /// Name as spelled in a suite (`observer: NAME`).
    pub name: &'static str,
    /// What it does.
    pub summary: &'static str,
}

/// Every observer the calibrated schemes accept.
pub const OBSERVERS: &[ObserverInfo] = &[
    ObserverInfo { name: "minmax", summary: "running min and max of all calibration inputs (torch MinMaxObserver)" },
    ObserverInfo {
        name: "moving-average",
        summary: "min and max averaged over batches of 16 rows with constant 0.01 (torch MovingAverageMinMaxObserver)",
    },
    ObserverInfo {
        name: "percentile",
        summary: "min and max clipped to ±the `percentile`-th percentile of |x| (linear interpolation)",
    },
    ObserverInfo {
        name: "mse",
        summary: "the min–max range shrunk by the factor in {0.01, 0.02, …, 1} that minimises the fake-quantization MSE",
    },
];

/// Rows of calibration inputs per batch of the moving-average observer: a batch of
/// torch's calibration loop, made parameter-free.
pub const MOVING_AVERAGE_ROWS: usize = 16;

/// torch's `MovingAverageMinMaxObserver` default averaging constant.
pub const MOVING_AVERAGE_CONSTANT: f32 = 0.01;

/// Default percentile of the percentile observer.
pub const DEFAULT_PERCENTILE: f64 = 99.99;

/// Number of shrink factors the MSE observer tries: `k / MSE_GRID` for `k = 1..=MSE_GRID`.
pub const MSE_GRID: usize = 100;

/// The MSE observer evaluates candidates on at most this many values (an evenly strided
/// sample), bounding its cost on large layers; the unshrunk range always comes from all.
pub const MSE_SAMPLE: usize = 1 << 20;

/// A configured activation range observer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observer {
    /// Global min and max.
    MinMax,
    /// Exponential moving average of per-batch min and max.
    MovingAverage,
    /// Clip at a percentile (in `(0, 100]`) of |x|.
    Percentile(f64),
    /// Grid search of the range minimising the fake-quantization MSE.
    Mse,
}

impl Observer {
    /// The observer a scheme's parameters ask for (`observer`, default `minmax`;
    /// `percentile` only with `observer: percentile`).
    pub fn from_params(scheme: &str, params: &SchemeParams) -> Result<Observer> {
        let name = params.text("observer").unwrap_or("minmax");
        let error = |message: String| Error::Scheme { scheme: scheme.to_string(), message };
        let percentile = params.0.get("percentile").map(|_| params.number("percentile", DEFAULT_PERCENTILE));
        if let (Some(p), false) = (percentile, name == "percentile") {
            return Err(error(format!(
                "parameter `percentile` is {p} but observer is `{name}`, expected it only with observer `percentile`"
            )));
        }
        match name {
            "minmax" => Ok(Observer::MinMax),
            "moving-average" => Ok(Observer::MovingAverage),
            "mse" => Ok(Observer::Mse),
            "percentile" => {
                let p = percentile.unwrap_or(DEFAULT_PERCENTILE);
                if !(p > 0.0 && p <= 100.0) {
                    return Err(error(format!(
                        "parameter `percentile` is {p}, expected a number in (0, 100]"
                    )));
                }
                Ok(Observer::Percentile(p))
            }
            other => {
                let names: Vec<_> = OBSERVERS.iter().map(|o| o.name).collect();
                Err(error(format!(
                    "parameter `observer` is `{other}`, expected one of: {}",
                    names.join(", ")
                )))
            }
        }
    }

    /// The observed `(min, max)` of row-major inputs with `cols` values per row.
    pub fn range(&self, inputs: &[f32], cols: usize) -> (f32, f32) {
        match *self {
            Observer::MinMax => min_max(inputs),
            Observer::MovingAverage => moving_average_range(inputs, cols.max(1) * MOVING_AVERAGE_ROWS),
            Observer::Percentile(p) => percentile_range(inputs, p),
            Observer::Mse => mse_range(inputs),
        }
    }

    /// The uint8 parameters of the observed range.
    pub fn qparams(&self, inputs: &[f32], cols: usize) -> AffineU8 {
        let (min, max) = self.range(inputs, cols);
        AffineU8::from_range(min, max)
    }
}

/// `(min, max)` of the finite values; `(+inf, −inf)` (nothing observed) when none.
pub fn min_max(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// torch's moving-average update: the first batch sets the range, each later batch moves
/// it by `c · (batch − running)`.
fn moving_average_range(inputs: &[f32], batch_len: usize) -> (f32, f32) {
    let mut running: Option<(f32, f32)> = None;
    for batch in inputs.chunks(batch_len) {
        let (lo, hi) = min_max(batch);
        if lo > hi {
            continue;
        }
        running = Some(match running {
            None => (lo, hi),
            Some((min, max)) => {
                (min + MOVING_AVERAGE_CONSTANT * (lo - min), max + MOVING_AVERAGE_CONSTANT * (hi - max))
            }
        });
    }
    running.unwrap_or((f32::INFINITY, f32::NEG_INFINITY))
}

/// The `p`-th percentile of |x| over the finite values, with numpy's default linear
/// interpolation between the two nearest ranks (position `p/100 · (n − 1)`).
pub fn abs_percentile(values: &[f32], p: f64) -> Option<f32> {
    let mut abs: Vec<f32> = values.iter().filter(|v| v.is_finite()).map(|v| v.abs()).collect();
    if abs.is_empty() {
        return None;
    }
    let position = (p / 100.0).clamp(0.0, 1.0) * (abs.len() - 1) as f64;
    let lo_rank = position.floor() as usize;
    let (_, &mut lo, above) = abs.select_nth_unstable_by(lo_rank, f32::total_cmp);
    // The next rank up is the smallest value above the selected one.
    let hi = above.iter().copied().reduce(f32::min).unwrap_or(lo);
    let frac = position - lo_rank as f64;
    Some((lo as f64 + frac * (hi as f64 - lo as f64)) as f32)
}

/// Min and max clipped to `[−t, t]`, `t` the `p`-th percentile of |x|: a lone outlier
/// stops setting the range, and a lopsided range stays lopsided.
fn percentile_range(inputs: &[f32], p: f64) -> (f32, f32) {
    let (min, max) = min_max(inputs);
    match abs_percentile(inputs, p) {
        Some(t) => (min.max(-t), max.min(t)),
        None => (min, max),
    }
}

/// Mean squared error between `values` and their fake-quantized versions under `q`.
pub fn fake_quant_mse(values: &[f32], q: &AffineU8) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let sum: f64 = values
        .iter()
        .map(|&x| {
            let d = (x - q.fake(x)) as f64;
            d * d
        })
        .sum();
    sum / values.len() as f64
}

/// The min–max range scaled by `α = k / MSE_GRID` (`k = 1..=MSE_GRID`) whose uint8
/// parameters give the lowest fake-quantization MSE on the inputs (on an evenly strided
/// sample of at most [`MSE_SAMPLE`] finite values). Ties go to the larger α, so
/// `α = 1` (plain min–max) wins unless a shrunk range is strictly better.
fn mse_range(inputs: &[f32]) -> (f32, f32) {
    let (min, max) = min_max(inputs);
    if min > max {
        return (min, max);
    }
    let finite: Vec<f32> = inputs.iter().copied().filter(|v| v.is_finite()).collect();
    let stride = finite.len().div_ceil(MSE_SAMPLE).max(1);
    let sample: Vec<f32> = finite.iter().step_by(stride).copied().collect();
    let candidate = |k: usize| {
        let alpha = k as f32 / MSE_GRID as f32;
        (min * alpha, max * alpha)
    };
    let errors: Vec<f64> = (1..=MSE_GRID)
        .into_par_iter()
        .map(|k| {
            let (lo, hi) = candidate(k);
            fake_quant_mse(&sample, &AffineU8::from_range(lo, hi))
        })
        .collect();
    // Walk from α = 1 down, replacing only on a strict improvement.
    let mut best = MSE_GRID;
    for k in (1..=MSE_GRID).rev() {
        if errors[k - 1] < errors[best - 1] {
            best = k;
        }
    }
    candidate(best)
}

/// The symmetric int8 scale of one weight row: `absmax / 127`, or 1 for an all-zero row
/// (any scale represents it exactly; 1 keeps the scale finite and positive).
///
/// torch's `PerChannelMinMaxObserver` (qint8, per-channel symmetric) divides by
/// `(127 − (−128)) / 2 = 127.5`, which maps `+absmax` to code 128 and clamps it to 127;
/// dividing by 127 keeps both signs exact at ±127, as int8 weight kernels usually do.
pub fn channel_scale(row: &[f32]) -> f32 {
    let absmax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if absmax > 0.0 {
        absmax / I8_MAX as f32
    } else {
        1.0
    }
}

/// The int8 code of `w` under `scale`: `clamp(round_half_even(w / scale), −128, 127)`.
pub fn quantize_i8(w: f32, scale: f32) -> i8 {
    (w / scale).round_ties_even().clamp(I8_MIN as f32, I8_MAX as f32) as i8
}

/// Per-channel symmetric int8 weights: the codes (`[rows, cols]`) and one scale per
/// output row.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelInt8 {
    /// Codes, row-major `[rows, cols]`.
    pub codes: Vec<i8>,
    /// One scale per row.
    pub scales: Vec<f32>,
}

impl ChannelInt8 {
    /// Quantize `[rows, cols]` weights with each row's [`channel_scale`].
    pub fn quantize(weight: &[f32], cols: usize) -> ChannelInt8 {
        let scales: Vec<f32> = weight.chunks_exact(cols.max(1)).map(channel_scale).collect();
        Self::with_scales(weight, cols, scales)
    }

    /// Quantize `[rows, cols]` weights with the given per-row scales.
    pub fn with_scales(weight: &[f32], cols: usize, scales: Vec<f32>) -> ChannelInt8 {
        let codes = weight
            .chunks_exact(cols.max(1))
            .zip(&scales)
            .flat_map(|(row, &s)| row.iter().map(move |&w| quantize_i8(w, s)))
            .collect();
        ChannelInt8 { codes, scales }
    }

    /// The dequantized weights `code · scale`, row-major.
    pub fn dequantize(&self, cols: usize) -> Vec<f32> {
        self.codes
            .chunks_exact(cols.max(1))
            .zip(&self.scales)
            .flat_map(|(row, &s)| row.iter().map(move |&q| q as f32 * s))
            .collect()
    }
}

/// Check that calibration inputs fit a layer with `cols` inputs and are finite.
pub fn check_calibration(scheme: &str, layer: &str, inputs: &[f32], rows: usize, cols: usize) -> Result<()> {
    let error = |message: String| Error::Scheme { scheme: scheme.to_string(), message };
    if rows == 0 || inputs.len() != rows * cols {
        return Err(error(format!(
            "calibration inputs of `{layer}` hold {} values for {rows} rows, expected {rows} × {cols} with at least one row",
            inputs.len()
        )));
    }
    if let Some(bad) = inputs.iter().find(|v| !v.is_finite()) {
        return Err(error(format!("calibration inputs of `{layer}` contain {bad}, expected finite values")));
    }
    Ok(())
}

/// Check that a weight is finite (a non-finite weight has no int8 scale).
pub fn check_weight(scheme: &str, layer: &str, data: &[f32]) -> Result<()> {
    match data.iter().find(|v| !v.is_finite()) {
        Some(bad) => Err(Error::Scheme {
            scheme: scheme.to_string(),
            message: format!("weight `{layer}` contains {bad}, expected finite values"),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    fn params(pairs: &[(&str, serde_json::Value)]) -> SchemeParams {
        SchemeParams(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    }

    #[test]
    fn qparams_follow_torch_calculate_qparams() {
        // [-1, 3]: scale 4/255, zp = −round(−1 / (4/255)) = −round(−63.75) = 64.
        let q = AffineU8::from_range(-1.0, 3.0);
        assert_eq!(q, AffineU8 { scale: 4.0 / 255.0, zero_point: 64 });
        // A positive range is widened to hold 0: [0, 2].
        assert_eq!(AffineU8::from_range(0.5, 2.0), AffineU8 { scale: 2.0 / 255.0, zero_point: 0 });
        // A negative range: [-2, 0], zp at the top code.
        assert_eq!(AffineU8::from_range(-2.0, -1.0), AffineU8 { scale: 2.0 / 255.0, zero_point: 255 });
        // All zeros: the scale is eps.
        assert_eq!(AffineU8::from_range(0.0, 0.0), AffineU8 { scale: f32::EPSILON, zero_point: 0 });
        // Nothing observed: torch's (1, 0).
        assert_eq!(
            AffineU8::from_range(f32::INFINITY, f32::NEG_INFINITY),
            AffineU8 { scale: 1.0, zero_point: 0 }
        );
        // Ties round to even: scale 1 exactly, −min/scale = 127.5 → 128 and 0.5 → 0.
        assert_eq!(AffineU8::from_range(-127.5, 127.5), AffineU8 { scale: 1.0, zero_point: 128 });
        assert_eq!(AffineU8::from_range(-0.5, 254.5), AffineU8 { scale: 1.0, zero_point: 0 });
    }

    #[test]
    fn quantize_clamps_and_rounds_half_to_even() {
        let q = AffineU8 { scale: 0.5, zero_point: 10 };
        assert_eq!(q.quantize(0.0), 10);
        assert_eq!(q.quantize(0.25), 10); // 0.5 → 0
        assert_eq!(q.quantize(0.75), 12); // 1.5 → 2
        assert_eq!(q.quantize(-100.0), 0);
        assert_eq!(q.quantize(1000.0), 255);
        assert_eq!(q.dequantize(255), 122.5);
        assert_eq!(q.range(), (-5.0, 122.5));
    }

    #[test]
    fn affine_round_trip_is_within_half_a_step_inside_the_range() {
        let mut rng = SeededRng::new(11);
        for &(lo, hi) in &[(-1.0f32, 3.0f32), (0.0, 6.5), (-7.25, -0.5), (-0.01, 0.02)] {
            let q = AffineU8::from_range(lo, hi);
            let (rlo, rhi) = q.range();
            for _ in 0..2000 {
                let x = rlo + (rhi - rlo) * rng.uniform() as f32;
                let err = (x - q.fake(x)).abs();
                assert!(err <= q.scale / 2.0 * (1.0 + 1e-5), "{x} in {lo}..{hi}: {err} > {}", q.scale / 2.0);
            }
        }
    }

    #[test]
    fn minmax_and_moving_average_on_hand_inputs() {
        // Two rows of 2: the min-max range is [-2, 6].
        let x = [1.0, -2.0, 6.0, 0.5];
        assert_eq!(Observer::MinMax.range(&x, 2), (-2.0, 6.0));
        assert_eq!(Observer::MinMax.qparams(&x, 2), AffineU8 { scale: 8.0 / 255.0, zero_point: 64 });

        // Moving average over 16-row batches of 1 column: batch 1 is rows 0..16 with
        // range [-1, 1], batch 2 has range [-3, 5]: min = −1 + 0.01·(−3 + 1) = −1.02,
        // max = 1 + 0.01·(5 − 1) = 1.04.
        let mut x = vec![0.0f32; 32];
        x[0] = -1.0;
        x[1] = 1.0;
        x[16] = -3.0;
        x[17] = 5.0;
        let (lo, hi) = Observer::MovingAverage.range(&x, 1);
        assert_eq!((lo, hi), (-1.0 + 0.01 * (-3.0 + 1.0), 1.0 + 0.01 * (5.0 - 1.0)));
        let q = Observer::MovingAverage.qparams(&x, 1);
        let scale = (hi - lo) / 255.0;
        assert_eq!(q, AffineU8 { scale, zero_point: (-lo / scale).round_ties_even() as i32 });
        assert_eq!(q.zero_point, 126); // 1.02 / (2.06 / 255) = 126.26…
    }

    #[test]
    fn percentile_clips_an_injected_outlier() {
        // 0, 1, …, 99 and one outlier at 1000 (101 values): the 99th percentile of |x|
        // sits at position 0.99 · 100 = 99, i.e. the value 99.
        let mut x: Vec<f32> = (0..100).map(|v| v as f32).collect();
        x.push(1000.0);
        assert_eq!(abs_percentile(&x, 99.0), Some(99.0));
        // Position 0.995 · 100 = 99.5: halfway between 99 and 1000.
        assert_eq!(abs_percentile(&x, 99.5), Some(549.5));
        assert_eq!(Observer::Percentile(99.0).range(&x, 1), (0.0, 99.0));
        assert_eq!(
            Observer::Percentile(99.0).qparams(&x, 1),
            AffineU8 { scale: 99.0 / 255.0, zero_point: 0 }
        );
        // Negative outliers are clipped by |x| too; the lopsided minimum stays.
        let y: Vec<f32> = x.iter().map(|v| -v * 0.5).chain([3.0]).collect();
        let (lo, hi) = Observer::Percentile(99.0).range(&y, 1);
        assert!(lo > -60.0 && hi == 3.0, "{lo} {hi}");
        assert_eq!(Observer::MinMax.range(&y, 1), (-500.0, 3.0));
    }

    #[test]
    fn mse_is_never_worse_than_minmax_and_better_with_outliers() {
        let mut x = SeededRng::new(7).normal_vec(4000, 1.0);
        x[17] = 60.0;
        x[901] = -45.0;
        let mse = fake_quant_mse(&x, &Observer::Mse.qparams(&x, 1));
        let minmax = fake_quant_mse(&x, &Observer::MinMax.qparams(&x, 1));
        // Clipping the two outliers costs more than it saves on the bulk here, but a
        // slightly shrunk range still wins strictly.
        assert!(mse < minmax, "mse {mse} vs minmax {minmax}");
        // Without outliers it still never loses.
        let y = SeededRng::new(8).normal_vec(4000, 1.0);
        assert!(
            fake_quant_mse(&y, &Observer::Mse.qparams(&y, 1))
                <= fake_quant_mse(&y, &Observer::MinMax.qparams(&y, 1))
        );
        // The chosen range is one of the grid's.
        let (lo, hi) = Observer::Mse.range(&x, 1);
        let k = (hi / 60.0 * MSE_GRID as f32).round();
        assert!((1.0..=MSE_GRID as f32).contains(&k) && lo == -45.0 * k / MSE_GRID as f32, "{lo} {hi}");
    }

    #[test]
    fn every_observer_in_the_table_is_accepted() {
        for info in OBSERVERS {
            let p = params(&[("observer", info.name.into())]);
            assert!(Observer::from_params("s", &p).is_ok(), "{}", info.name);
        }
    }

    #[test]
    fn observer_parameters_are_validated() {
        assert_eq!(Observer::from_params("s", &params(&[])).unwrap(), Observer::MinMax);
        let p = params(&[("observer", "percentile".into())]);
        assert_eq!(Observer::from_params("s", &p).unwrap(), Observer::Percentile(99.99));
        let p = params(&[("observer", "percentile".into()), ("percentile", 99.0.into())]);
        assert_eq!(Observer::from_params("s", &p).unwrap(), Observer::Percentile(99.0));
        let err =
            Observer::from_params("s", &params(&[("observer", "histogram".into())])).unwrap_err().to_string();
        assert!(
            err.contains("`histogram`") && err.contains("minmax, moving-average, percentile, mse"),
            "{err}"
        );
        let p = params(&[("observer", "percentile".into()), ("percentile", 0.into())]);
        let err = Observer::from_params("s", &p).unwrap_err().to_string();
        assert!(err.contains("`percentile` is 0") && err.contains("(0, 100]"), "{err}");
        let err =
            Observer::from_params("s", &params(&[("percentile", 99.0.into())])).unwrap_err().to_string();
        assert!(err.contains("observer is `minmax`"), "{err}");
    }

    #[test]
    fn channel_quantization_is_symmetric_per_row() {
        let w = [0.5, -1.27, 0.0, 0.0, 0.0, 0.0, 2.54, 1.0, -0.01];
        let q = ChannelInt8::quantize(&w, 3);
        assert_eq!(q.scales, vec![0.01, 1.0, 0.02]);
        assert_eq!(q.codes, vec![50, -127, 0, 0, 0, 0, 127, 50, 0]); // -0.5 rounds to -0
        let deq = q.dequantize(3);
        for (a, b) in w.iter().zip(&deq) {
            assert!((a - b).abs() <= 0.01 + 1e-6, "{a} {b}");
        }
        // Clamped codes with a smaller scale.
        assert_eq!(ChannelInt8::with_scales(&[3.0, -3.0], 2, vec![0.01]).codes, vec![127, -128]);
    }
}
