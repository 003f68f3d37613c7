//! Products with 16-bit weights (bf16 or f16) and f32 activations: the weights stay 16-bit
//! in memory, half the bytes of f32, and are widened to f32 inside the product.
//!
//! A few rows (decode) take a fused dot product that widens eight weights at a time in
//! registers, so the product reads 2 bytes per weight. Up to 128 rows, each task of the
//! skinny product widens its 48 weight rows into a buffer that stays in cache; beyond,
//! blocks of weight rows are widened for [`super::matmul_nt`]. The widening is exact, so
//! every path computes the f32 product of the same values; only the order of the
//! additions differs from an f32 product of the widened matrix.

use rayon::prelude::*;

/// The 16-bit float formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfType {
    /// IEEE half precision (5 exponent bits, 10 mantissa bits).
    F16,
    /// bfloat16 (8 exponent bits, 7 mantissa bits): the top half of an f32.
    Bf16,
}

impl HalfType {
    /// The value of `bits`.
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            HalfType::F16 => half::f16::from_bits(bits).to_f32(),
            HalfType::Bf16 => f32::from_bits((bits as u32) << 16),
        }
    }

    /// `v` rounded to nearest, ties to even.
    pub fn from_f32(self, v: f32) -> u16 {
        match self {
            HalfType::F16 => half::f16::from_f32(v).to_bits(),
            HalfType::Bf16 => half::bf16::from_f32(v).to_bits(),
        }
    }

    /// `values` rounded, on the thread pool for large tensors.
    pub fn encode(self, values: &[f32]) -> Vec<u16> {
        values.par_iter().with_min_len(1 << 16).map(|&v| self.from_f32(v)).collect()
    }

    /// Widen `src` into `dst` (same length).
    pub fn widen(self, src: &[u16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.has_vector_path() {
            // SAFETY: the features were just detected.
            unsafe { avx2::widen(self, src, dst) };
            return;
        }
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = self.to_f32(s));
    }

    /// Whether the AVX2 kernels apply: AVX2 and FMA, and F16C for f16.
    #[cfg(target_arch = "x86_64")]
    fn has_vector_path(self) -> bool {
        super::has_avx2_fma() && (self == HalfType::Bf16 || std::arch::is_x86_feature_detected!("f16c"))
    }
}

/// f32 values of widened weights per block on the many-rows path: 1 MiB, in L2.
const BLOCK_VALUES: usize = 1 << 18;

/// `out[m×n] = a[m×k] · wᵀ` for 16-bit `w` (`[n, k]`, row-major).
pub fn matmul_nt_half(a: &[f32], m: usize, k: usize, w: &[u16], ty: HalfType, n: usize, out: &mut [f32]) {
    assert_eq!(a.len(), m * k, "matmul_nt_half: lhs is not [m, k]");
    assert_eq!(w.len(), n * k, "matmul_nt_half: weight is not [n, k]");
    assert_eq!(out.len(), m * n, "matmul_nt_half: output is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if m <= super::gemv::DOT_MAX_ROWS {
        few_rows(a, m, k, w, ty, n, out);
    } else if m <= super::skinny::SKINNY_MAX_ROWS {
        super::skinny::matmul_nt_skinny_rows(a, m, k, &HalfRows { bits: w, ty }, n, out);
    } else {
        many_rows(a, m, k, w, ty, n, out);
    }
}

/// 16-bit weight rows, widened per task of the skinny product.
struct HalfRows<'a> {
    bits: &'a [u16],
    ty: HalfType,
}

impl super::skinny::WeightRows for HalfRows<'_> {
    fn rows<'s>(&'s self, j0: usize, rows: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        scratch.resize(rows * k, 0.0);
        self.ty.widen(&self.bits[j0 * k..(j0 + rows) * k], scratch);
        scratch
    }
}

/// Each weight row widened in registers and dotted with every activation row.
fn few_rows(a: &[f32], m: usize, k: usize, w: &[u16], ty: HalfType, n: usize, out: &mut [f32]) {
    super::gemv::by_dots(m, k, n, out, |i, j| dot_half(&a[i * k..(i + 1) * k], &w[j * k..(j + 1) * k], ty));
}

/// Blocks of weight rows widened into an f32 buffer, each multiplied by the f32 product.
fn many_rows(a: &[f32], m: usize, k: usize, w: &[u16], ty: HalfType, n: usize, out: &mut [f32]) {
    let block = (BLOCK_VALUES / k.max(1)).clamp(16, n);
    let mut widened = vec![0.0f32; block * k];
    let mut part = vec![0.0f32; m * block];
    for first in (0..n).step_by(block) {
        let rows = block.min(n - first);
        let (dst, part) = (&mut widened[..rows * k], &mut part[..m * rows]);
        dst.par_chunks_mut(k)
            .zip(w[first * k..(first + rows) * k].par_chunks(k))
            .for_each(|(d, s)| ty.widen(s, d));
        super::matmul_nt(a, m, k, dst, rows, part);
        for i in 0..m {
            out[i * n + first..i * n + first + rows].copy_from_slice(&part[i * rows..(i + 1) * rows]);
        }
    }
}

/// `Σ a[i] · w[i]` with `w` widened; AVX2 where the CPU has it.
pub fn dot_half(a: &[f32], w: &[u16], ty: HalfType) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if ty.has_vector_path() {
        // SAFETY: the features were just detected.
        return unsafe { avx2::dot(a, w, ty) };
    }
    dot_half_scalar(a, w, ty)
}

/// The scalar dot product: the reference the vector path is checked against.
pub fn dot_half_scalar(a: &[f32], w: &[u16], ty: HalfType) -> f32 {
    a.iter().zip(w).map(|(&x, &b)| x * ty.to_f32(b)).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::HalfType;

    /// Eight 16-bit values from `p`, widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u16, ty: HalfType) -> __m256 {
        let bits = _mm_loadu_si128(p as *const __m128i);
        match ty {
            HalfType::F16 => _mm256_cvtph_ps(bits),
            HalfType::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits))),
        }
    }

    /// [`super::HalfType::widen`], eight at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen(ty: HalfType, src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), load8(src.as_ptr().add(i), ty));
            i += 8;
        }
        for (d, &s) in dst[i..n].iter_mut().zip(&src[i..n]) {
            *d = ty.to_f32(s);
        }
    }

    /// [`super::dot_half`]: four eight-lane accumulators, 32 weights an iteration.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(a: &[f32], w: &[u16], ty: HalfType) -> f32 {
        let pw = w.as_ptr();
        crate::tensor::gemv::fused_dot_avx2!(
            a.len().min(w.len()),
            a.as_ptr(),
            |i| load8(pw.add(i), ty),
            |j: usize| a[j] * ty.to_f32(w[j]),
            // 32 terms are one cache line.
            |i: usize| crate::tensor::gemv::prefetch(
                (pw as *const u8).wrapping_add(2 * i + crate::tensor::gemv::WEIGHT_PREFETCH_BYTES)
            )
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::matmul_nt_reference;

    /// Largest error of the 16-bit product against the f64 product of the same (widened)
    /// values, relative to Σ|a·w| of the output: f32 accumulation over k terms.
    const HALF_PRODUCT_ERROR: f64 = 1e-5;

    use crate::tensor::test_values as values;

    #[test]
    fn widening_is_exact_for_every_bf16_and_finite_f16() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        for ty in [HalfType::Bf16, HalfType::F16] {
            let mut wide = vec![0.0; bits.len()];
            ty.widen(&bits, &mut wide);
            for (&b, &v) in bits.iter().zip(&wide) {
                let want = ty.to_f32(b);
                assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "{ty:?} {b:#06x}");
                if v.is_finite() {
                    assert_eq!(ty.from_f32(v), b, "{ty:?} {b:#06x} round-trips");
                }
            }
        }
    }

    #[test]
    fn products_match_the_f64_reference_at_every_row_count() {
        for ty in [HalfType::Bf16, HalfType::F16] {
            for (m, k, n) in [
                (1, 7, 5),
                (1, 576, 64),
                (3, 100, 33),
                (4, 64, 70),
                (5, 576, 40),
                (64, 130, 300),
                (9, 2048, 140),
            ] {
                let a = values(m * k, 1 + m as u32);
                let w = ty.encode(&values(n * k, 7 + k as u32));
                let wide: Vec<f32> = w.iter().map(|&b| ty.to_f32(b)).collect();
                let want = matmul_nt_reference(&a, m, k, &wide, n);
                let mut got = vec![f32::NAN; m * n];
                matmul_nt_half(&a, m, k, &w, ty, n, &mut got);
                for i in 0..m {
                    for j in 0..n {
                        let scale: f64 =
                            (0..k).map(|kk| (a[i * k + kk] * wide[j * k + kk]).abs() as f64).sum();
                        let err = (got[i * n + j] as f64 - want[i * n + j] as f64).abs() / scale.max(1e-30);
                        assert!(err <= HALF_PRODUCT_ERROR, "{ty:?} m {m} k {k} n {n} at ({i}, {j}): {err:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_vector_dot_product_stays_within_budget_of_the_scalar_one() {
        for ty in [HalfType::Bf16, HalfType::F16] {
            for k in [0, 1, 8, 31, 32, 33, 100, 4096] {
                let a = values(k, 3);
                let w = ty.encode(&values(k, 5));
                let scale: f64 = a.iter().zip(&w).map(|(&x, &b)| (x * ty.to_f32(b)).abs() as f64).sum();
                let err = (dot_half(&a, &w, ty) as f64 - dot_half_scalar(&a, &w, ty) as f64).abs();
                assert!(err <= HALF_PRODUCT_ERROR * scale.max(1e-30), "{ty:?} k {k}: {err:e}");
            }
        }
    }
}
