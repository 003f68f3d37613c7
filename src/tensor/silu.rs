//! SiLU times up (`silu(g) · u`, Llama's MLP) in f32: a vectorised AVX2 kernel and a
//! scalar loop that compute the same bits.
//!
//! `silu(g) = g · sigmoid(g)`, with `e = exp(−|g|) ≤ 1` ([`super::exp`]): `g / (1 + e)`
//! for `g ≥ 0`, `g · e / (1 + e)` below, so no exponential overflows.

use super::exp::exp_nonpositive;

/// `gate[i] = silu(gate[i]) · up[i]`: AVX2 where the CPU has it, else the scalar loop.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the features were just detected.
        unsafe { avx2::silu_mul(gate, up) };
        return;
    }
    gate.iter_mut().zip(up).for_each(|(g, &u)| *g = silu_mul_scalar(*g, u));
}

/// One value, the reference order of operations for the vector path.
pub fn silu_mul_scalar(g: f32, u: f32) -> f32 {
    let e = exp_nonpositive(-g.abs());
    let s = if g >= 0.0 { g } else { g * e };
    s / (1.0 + e) * u
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::tensor::exp::avx2::exp8;

    /// [`super::silu_mul_scalar`] eight values at a time; the tail by the scalar function.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let (sign, one, zero) = (_mm256_set1_ps(-0.0), _mm256_set1_ps(1.0), _mm256_setzero_ps());
        let mut i = 0;
        while i + 8 <= n {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = exp8(_mm256_or_ps(g, sign));
            let s = _mm256_blendv_ps(_mm256_mul_ps(g, e), g, _mm256_cmp_ps::<_CMP_GE_OQ>(g, zero));
            let v =
                _mm256_mul_ps(_mm256_div_ps(s, _mm256_add_ps(one, e)), _mm256_loadu_ps(up.as_ptr().add(i)));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), v);
            i += 8;
        }
        for (g, &u) in gate[i..n].iter_mut().zip(&up[i..n]) {
            *g = super::silu_mul_scalar(*g, u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest error of [`silu_mul_scalar`] against the f64 SiLU (u = 1), relative to
    /// max(|silu|, 1e-3).
    const SILU_F32_ERROR: f64 = 5e-7;

    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (-40_000_000..40_000_000).step_by(131).map(|i| i as f32 * 1e-6).collect();
        v.extend([0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0, 1e30, -1e30]);
        v
    }

    #[test]
    fn stays_within_its_budget_of_the_f64_silu() {
        let mut worst = (0.0f64, 0.0f32);
        for g in inputs() {
            let want = g as f64 / (1.0 + (-(g as f64)).exp());
            let err = (silu_mul_scalar(g, 1.0) as f64 - want).abs() / want.abs().max(1e-3);
            if err > worst.0 {
                worst = (err, g);
            }
        }
        assert!(worst.0 <= SILU_F32_ERROR, "error {:.3e} at g = {}", worst.0, worst.1);
    }

    #[test]
    fn the_vector_path_gives_the_scalar_bits() {
        let g = inputs();
        let up: Vec<f32> = g.iter().map(|v| 1.0 - v * 0.25).collect();
        let mut fast = g.clone();
        silu_mul(&mut fast, &up);
        for ((f, &g), &u) in fast.iter().zip(&g).zip(&up) {
            assert_eq!(f.to_bits(), silu_mul_scalar(g, u).to_bits(), "g = {g}");
        }
        let mut nan = [f32::NAN, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, 5.0];
        silu_mul(&mut nan, &[1.0; 9]);
        assert!(nan[0].is_nan() && nan[1..].iter().all(|v| v.is_finite()));
    }
}
