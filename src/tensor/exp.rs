//! `exp` in f32 for non-positive arguments (softmax's shifted scores, GELU's erfc), as a
//! scalar function and an AVX2 kernel that compute the same bits: powers of two times a
//! degree-6 polynomial on [−ln 2 / 2, ln 2 / 2] (Cephes' `expf`, about 1 ulp).
//!
//! Arguments below −87 give exactly 0 (−∞ too, so a masked score weighs nothing), a NaN
//! gives NaN.

/// The polynomial, highest degree first: `exp(r) ≈ 1 + r + r² · q(r)` (the published
/// digits, more than an f32 holds).
#[allow(clippy::excessive_precision)]
const EXP_POLY: [f32; 6] = [
    1.987_569_15e-4,
    1.398_199_950_7e-3,
    8.333_451_907_3e-3,
    4.166_579_589_4e-2,
    1.666_666_545_9e-1,
    5.000_000_120_1e-1,
];

/// ln 2 in two parts: the high one exact in few bits, so `n · LN2_HI` is exact.
#[allow(clippy::excessive_precision)]
const LN2_HI: f32 = 0.693_359_375;
const LN2_LO: f32 = -2.121_944_4e-4;

/// Below this `exp` would leave the normal range: the result is 0.
pub const EXP_MIN_ARG: f32 = -87.0;

/// `exp(v)` for `v ≤ 0.5` (larger arguments are not reduced correctly).
pub fn exp_nonpositive(v: f32) -> f32 {
    if v < EXP_MIN_ARG {
        return 0.0;
    }
    let n = (v * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, v));
    let q = EXP_POLY[1..].iter().fold(EXP_POLY[0], |q, &c| q.mul_add(r, c));
    let y = q.mul_add(r * r, r) + 1.0;
    // A NaN n converts to 0: y (NaN) keeps the NaN.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Lanes of the vector path; [`exp_sum_in_place`] sums in this many lanes on every CPU.
pub const LANES: usize = 8;

/// `row[i] = exp(row[i] − shift)` for every value (each argument ≤ 0.5), returning their
/// sum, added in [`LANES`] lanes then pairwise (the same order in both paths).
pub fn exp_sum_in_place(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the features were just detected.
        return unsafe { avx512::exp_sum_in_place(row, shift) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the features were just detected.
        return unsafe { avx2::exp_sum_in_place(row, shift) };
    }
    let mut lanes = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(c.iter_mut()) {
            *v = exp_nonpositive(*v - shift);
            *lane += *v;
        }
    }
    let tail = chunks.into_remainder();
    for v in tail.iter_mut() {
        *v = exp_nonpositive(*v - shift);
    }
    crate::tensor::sum_lanes(lanes) + tail.iter().sum::<f32>()
}

/// The AVX2 kernels, for the other vectorised element-wise passes to build on.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXP_MIN_ARG, EXP_POLY, LANES, LN2_HI, LN2_LO};

    /// [`super::exp_nonpositive`] of eight values.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA ([`crate::tensor::has_avx2_fma`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(v: __m256) -> __m256 {
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_set1_ps(EXP_MIN_ARG));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            v,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), v));
        let mut q = _mm256_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        // A NaN n converts to i32::MIN: the power is garbage, y (NaN) keeps the NaN.
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)))
    }

    /// [`super::exp_sum_in_place`], eight values at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA ([`crate::tensor::has_avx2_fma`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum_in_place(row: &mut [f32], shift: f32) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0.0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let tail = chunks.into_remainder();
        for v in tail.iter_mut() {
            *v = super::exp_nonpositive(*v - shift);
        }
        crate::tensor::sum_lanes(lanes) + tail.iter().sum::<f32>()
    }
}

/// Sixteen values at a time where the CPU has AVX-512F: the same operations as
/// [`avx2::exp8`] lane for lane, and the sum still added in eight lanes in row order, so
/// the bits match the other paths. Half the instructions per value: the softmax of an
/// encoder's attention spends most of its time here.
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use std::arch::x86_64::*;

    use super::{EXP_MIN_ARG, EXP_POLY, LANES, LN2_HI, LN2_LO};

    /// [`super::exp_nonpositive`] of sixteen values.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn exp16(v: __m512) -> __m512 {
        let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, _mm512_set1_ps(EXP_MIN_ARG));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            v,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), v));
        let mut q = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(_mm512_fmadd_ps(q, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        // A NaN n converts to i32::MIN: the power is garbage, y (NaN) keeps the NaN.
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
        _mm512_maskz_mul_ps(!underflow, y, _mm512_castsi512_ps(bits))
    }

    /// [`super::exp_sum_in_place`], sixteen values at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn exp_sum_in_place(row: &mut [f32], shift: f32) -> f32 {
        let [sum] = exp_sum_rows([row], [shift]);
        sum
    }

    /// [`exp_sum_in_place`] of `N` rows of one length at once: each row's operations in
    /// the one-row order, so the same bits, with the rows' chains of dependent sums
    /// interleaved (a lone 128-value attention row waited on its own).
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX2 and FMA.
    ///
    /// # Panics
    /// When the rows differ in length.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn exp_sum_rows<const N: usize>(rows: [&mut [f32]; N], shifts: [f32; N]) -> [f32; N] {
        let len = rows.first().map_or(0, |r| r.len());
        assert!(rows.iter().all(|r| r.len() == len), "exp_sum_rows: rows differ in length");
        let ptrs = rows.map(|r| r.as_mut_ptr());
        let mut acc = [_mm256_setzero_ps(); N];
        let whole = len - len % (2 * LANES);
        for at in (0..whole).step_by(2 * LANES) {
            for ((p, acc), &shift) in ptrs.iter().zip(acc.iter_mut()).zip(&shifts) {
                let p = p.add(at);
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_set1_ps(shift)));
                _mm512_storeu_ps(p, e);
                // The low eight values, then the high eight: the order of the 8-lane paths.
                *acc = _mm256_add_ps(*acc, _mm512_castps512_ps256(e));
                *acc =
                    _mm256_add_ps(*acc, _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))));
            }
        }
        let mut sums = [0.0f32; N];
        for (r, sum) in sums.iter_mut().enumerate() {
            // SAFETY: row r is `len` values from ptrs[r], borrowed mutably by `rows`.
            let rest = std::slice::from_raw_parts_mut(ptrs[r].add(whole), len - whole);
            *sum = finish(rest, shifts[r], acc[r]);
        }
        sums
    }

    /// The values after the last sixteen of a row: eight more in the lanes `acc` holds,
    /// then one at a time; the lanes summed pairwise and the tail added.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn finish(rest: &mut [f32], shift: f32, mut acc: __m256) -> f32 {
        let mut eights = rest.chunks_exact_mut(LANES);
        for c in &mut eights {
            let e = super::avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), _mm256_set1_ps(shift)));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0.0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let tail = eights.into_remainder();
        for v in tail.iter_mut() {
            *v = super::exp_nonpositive(*v - shift);
        }
        crate::tensor::sum_lanes(lanes) + tail.iter().sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest relative error of [`exp_nonpositive`] against f64 `exp` on [−87, 0.5].
    const EXP_F32_ERROR: f64 = 3e-7;

    #[test]
    fn stays_within_its_budget_of_the_f64_exp() {
        let mut worst = (0.0f64, 0.0f32);
        for i in 0..2_000_000 {
            let v = 0.5 - i as f32 * (87.5 / 2_000_000.0);
            let want = (v as f64).exp();
            let err = ((exp_nonpositive(v) as f64 - want) / want).abs();
            if err > worst.0 {
                worst = (err, v);
            }
        }
        assert!(worst.0 <= EXP_F32_ERROR, "error {:.3e} at {}", worst.0, worst.1);
    }

    #[test]
    fn the_vector_path_gives_the_scalar_bits_and_sum() {
        let mut rng = crate::tensor::SeededRng::new(3);
        for len in [0, 1, 7, 8, 9, 31, 64, 129] {
            let mut row: Vec<f32> = rng.normal_vec(len, 4.0);
            if len > 3 {
                row[1] = f32::NEG_INFINITY;
                row[2] = -200.0;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut fast = row.clone();
            let sum = exp_sum_in_place(&mut fast, max);
            let mut lanes = [0.0f32; LANES];
            let mut plain = row.clone();
            let full = len / LANES * LANES;
            for (i, v) in plain.iter_mut().enumerate() {
                *v = exp_nonpositive(*v - max);
                if i < full {
                    lanes[i % LANES] += *v;
                }
            }
            let want = crate::tensor::sum_lanes(lanes) + plain[full..].iter().sum::<f32>();
            assert_eq!(
                fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "len {len}"
            );
            assert_eq!(sum.to_bits(), want.to_bits(), "len {len}");
            // The eight-lane path too, where the dispatch above took the sixteen-lane one.
            #[cfg(target_arch = "x86_64")]
            if crate::tensor::has_avx2_fma() {
                let mut eight = row.clone();
                // SAFETY: the features were just detected.
                let sum8 = unsafe { avx2::exp_sum_in_place(&mut eight, max) };
                assert_eq!(sum8.to_bits(), want.to_bits(), "len {len}");
                assert_eq!(
                    eight.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
            if len > 3 {
                assert_eq!((fast[1], fast[2]), (0.0, 0.0), "masked scores weigh nothing");
            }
        }
    }

    #[test]
    fn nan_stays_nan() {
        assert!(exp_nonpositive(f32::NAN).is_nan());
        let mut row = [0.0, f32::NAN, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0];
        assert!(exp_sum_in_place(&mut row, 0.0).is_nan());
        assert!(row[1].is_nan() && row[0] == 1.0);
    }
}
