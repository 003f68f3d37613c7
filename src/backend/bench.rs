//! The arithmetic of the CUDA kernel benchmark (`src/bin/cuda-kernels.rs`), kept apart
//! from the device code so it is tested on every machine: timing statistics, the shape
//! list, bytes and operations per kernel call, how many weight copies to rotate so each
//! timed call reads from device memory rather than L2, and the verdict against the
//! targets of the CUDA issue (≥ 75% of copy bandwidth for the GEMVs, ≥ 1.5× the bf16
//! GEMM for the int8 GEMM).

/// Fraction of the measured device-to-device copy bandwidth the GEMVs must reach.
pub const GEMV_BANDWIDTH_TARGET: f64 = 0.75;

/// Speed-up over the bf16 cuBLAS GEMM the int8 cuBLASLt GEMM must reach.
pub const INT8_GEMM_SPEEDUP_TARGET: f64 = 1.5;

/// How many times larger than L2 the rotated working set must be.
pub const L2_MULTIPLE: usize = 3;

/// Summary of one kernel's timed runs (milliseconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Runs.
    pub n: usize,
    /// Fastest run.
    pub min: f64,
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one run).
    pub stdev: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
}

impl Stats {
    /// Statistics of `samples`; `None` when there are none or one is not finite.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() || samples.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
        let mean = s.iter().sum::<f64>() / n as f64;
        let stdev = if n > 1 {
            (s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
        Some(Stats { n, min: s[0], median, mean, stdev, p90: s[rank - 1] })
    }
}

/// Bytes moved per millisecond as GB/s (10⁹ bytes per second).
pub fn gb_per_s(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

/// Operations per millisecond as TFLOP/s (TOP/s for integer products).
pub fn tflop_per_s(ops: f64, ms: f64) -> f64 {
    ops / (ms * 1e-3) / 1e12
}

/// A product `out[m, n] = x[m, k] · W[n, k]ᵀ` to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Activation rows (1 for decode).
    pub m: usize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

impl Shape {
    /// Multiply-adds counted as two operations.
    pub fn ops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// Decode shapes: the 4096×4096 and the larger projections of 7B–8B Llama-style
/// models at one activation row, and two of them at eight (batched decode).
pub const DECODE_SHAPES: [Shape; 7] = [
    Shape { m: 1, n: 4096, k: 4096 },
    Shape { m: 1, n: 11008, k: 4096 },
    Shape { m: 1, n: 4096, k: 11008 },
    Shape { m: 1, n: 14336, k: 4096 },
    Shape { m: 1, n: 8192, k: 8192 },
    Shape { m: 8, n: 4096, k: 4096 },
    Shape { m: 8, n: 8192, k: 8192 },
];

/// Prefill shapes for the GEMMs.
pub const PREFILL_SHAPES: [Shape; 4] = [
    Shape { m: 512, n: 4096, k: 4096 },
    Shape { m: 2048, n: 4096, k: 4096 },
    Shape { m: 2048, n: 11008, k: 4096 },
    Shape { m: 4096, n: 4096, k: 4096 },
];

/// Bytes one fused 4-bit GEMV call reads and writes: nibbles, one scale per block (2
/// bytes as bf16, else 4), f32 activations and outputs.
pub fn packed4_gemv_bytes(s: Shape, block: usize, bf16_scales: bool) -> f64 {
    let weights = (s.n * s.k).div_ceil(2);
    let scales = (s.n * s.k).div_ceil(block.max(1)) * if bf16_scales { 2 } else { 4 };
    (weights + scales + 4 * s.m * s.k + 4 * s.m * s.n) as f64
}

/// Bytes one dense GEMV call reads and writes: `bytes_per_value` per weight, f32
/// activations and outputs.
pub fn dense_gemv_bytes(s: Shape, bytes_per_value: usize) -> f64 {
    (s.n * s.k * bytes_per_value + 4 * s.m * s.k + 4 * s.m * s.n) as f64
}

/// Bytes one int8 GEMV call reads and writes: int8 weights and activations, f32 scales
/// and outputs.
pub fn int8_gemv_bytes(s: Shape) -> f64 {
    (s.n * s.k + 4 * s.n + s.m * s.k + 4 * s.m + 4 * s.m * s.n) as f64
}

/// How many copies of a weight of `set_bytes` to rotate through so the rotated set is at
/// least [`L2_MULTIPLE`] × `l2_bytes` (at least 2), limited to what fits in half of
/// `free_bytes`. Returns the count and whether it reaches the L2 multiple; when it does
/// not, the caller must flush L2 between calls instead.
pub fn rotation(set_bytes: usize, l2_bytes: usize, free_bytes: usize) -> (usize, bool) {
    let set = set_bytes.max(1);
    let wanted = (L2_MULTIPLE * l2_bytes).div_ceil(set).max(2);
    let fits = (free_bytes / 2 / set).max(1);
    let count = wanted.min(fits);
    (count, count * set >= L2_MULTIPLE * l2_bytes)
}

/// Bytes of the buffer written between calls to evict L2 (twice its size).
pub fn l2_flush_bytes(l2_bytes: usize) -> usize {
    2 * l2_bytes.max(1 << 20)
}

/// The achieved fraction of a peak, and whether it reaches `target`.
pub fn verdict(achieved: f64, peak: f64, target: f64) -> (f64, bool) {
    if peak <= 0.0 || !peak.is_finite() {
        return (0.0, false);
    }
    let f = achieved / peak;
    (f, f >= target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_hand_samples() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.n, s.min, s.median, s.mean), (4, 1.0, 2.5, 2.5));
        assert!((s.stdev - 1.290_994_448_735_805_6).abs() < 1e-12);
        assert_eq!(s.p90, 4.0);
        let one = Stats::of(&[7.0]).unwrap();
        assert_eq!((one.median, one.stdev, one.p90), (7.0, 0.0, 7.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(Stats::of(&ten).unwrap().p90, 9.0);
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn rates_use_decimal_units() {
        assert_eq!(gb_per_s(3.0e9, 1000.0), 3.0);
        assert_eq!(tflop_per_s(2.0e12, 500.0), 4.0);
        assert_eq!(Shape { m: 2, n: 3, k: 4 }.ops(), 48.0);
    }

    #[test]
    fn bytes_per_call_count_weights_scales_and_activations() {
        let s = Shape { m: 1, n: 4096, k: 4096 };
        // 8 MiB of nibbles + 131072 bf16 scales + 16 KiB in + 16 KiB out.
        assert_eq!(packed4_gemv_bytes(s, 128, true), (8_388_608 + 262_144 + 16_384 + 16_384) as f64);
        assert_eq!(packed4_gemv_bytes(s, 64, false), (8_388_608 + 1_048_576 + 32_768) as f64);
        assert_eq!(int8_gemv_bytes(s), (16_777_216 + 16_384 + 4096 + 4 + 16_384) as f64);
    }

    #[test]
    fn rotation_exceeds_l2_or_says_it_cannot() {
        let l2 = 50 << 20; // H100
        let set = 8 << 20; // a 4096×4096 int4 weight
        assert_eq!(rotation(set, l2, 80 << 30), (19, true));
        assert_eq!(rotation(1 << 30, l2, 80 << 30), (2, true));
        // Too little memory: one copy, so L2 must be flushed instead.
        assert_eq!(rotation(set, l2, 10 << 20), (1, false));
        assert_eq!(l2_flush_bytes(l2), 100 << 20);
    }

    #[test]
    fn verdicts_against_the_targets() {
        assert_eq!(verdict(2.7, 3.6, GEMV_BANDWIDTH_TARGET), (0.75, true));
        assert!(!verdict(1.0, 0.0, 0.5).1);
        let (f, ok) = verdict(1.4, 1.0, INT8_GEMM_SPEEDUP_TARGET);
        assert!(!ok && (f - 1.4).abs() < 1e-12);
        assert_eq!(DECODE_SHAPES[0], Shape { m: 1, n: 4096, k: 4096 });
        assert!(DECODE_SHAPES.iter().all(|s| (1..=8).contains(&s.m) && s.n >= 4096 && s.k >= 4096));
        assert!(PREFILL_SHAPES.iter().all(|s| s.m >= 512));
    }
}
