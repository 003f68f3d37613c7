//! Symmetric int8 quantization of f32 values, the step every int8 scheme and kernel
//! shares: the largest magnitude, its scale, and the rounded, clamped codes (AVX2 where
//! the CPU has it, bit for bit with the portable loops).

/// Symmetric int8 scale of values whose largest magnitude is `absmax`: `absmax / 127`, or
/// 1 for an all-zero (or empty) vector, which every scale represents exactly.
pub fn symmetric_scale(absmax: f32) -> f32 {
    if absmax > 0.0 {
        absmax / 127.0
    } else {
        1.0
    }
}

/// Largest |v| (NaN ignored, as `f32::max` ignores it).
pub fn absmax(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::tensor::has_avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { absmax_avx2(values) };
    }
    absmax_lanes(values)
}

/// [`absmax`] in AVX2, 32 values per step in four running maxima (the compiler kept
/// [`absmax_lanes`] in 4-wide SSE with a NaN test per step). `max_ps(|v|, m)` returns
/// `m` when `|v|` is NaN, so a NaN is ignored as in the portable loop; a maximum is the
/// same in any order.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn absmax_avx2(values: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let mut m = [_mm256_setzero_ps(); 4];
    let mut chunks = values.chunks_exact(32);
    for c in &mut chunks {
        for (lane, m) in m.iter_mut().enumerate() {
            let v = _mm256_andnot_ps(sign, _mm256_loadu_ps(c.as_ptr().add(8 * lane)));
            *m = _mm256_max_ps(v, *m);
        }
    }
    let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
    let mut lanes = [0.0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    lanes.iter().fold(absmax_lanes(chunks.remainder()), |a, &v| a.max(v))
}

/// [`absmax`] in portable code.
fn absmax_lanes(values: &[f32]) -> f32 {
    // Eight running maxima (a maximum is the same in any order, NaN ignored as
    // `f32::max` does), so the loop vectorises.
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for c in chunks {
        for i in 0..8 {
            lanes[i] = lanes[i].max(c[i].abs());
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// `clamp(round_half_even(v / scale), −127, 127)` into `out`.
pub fn quantize_symmetric(values: &[f32], scale: f32, out: &mut [i8]) {
    if crate::tensor::has_avx2() {
        // SAFETY: the CPU has AVX2.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            quantize_symmetric_avx2(values, scale, out)
        };
        #[cfg(target_arch = "x86_64")]
        return;
    }
    quantize_symmetric_lanes(values, scale, out);
}

#[inline(always)]
pub(crate) fn quantize_symmetric_lanes(values: &[f32], scale: f32, out: &mut [i8]) {
    for (q, &v) in out.iter_mut().zip(values) {
        *q = (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
}

/// [`quantize_symmetric_lanes`] in AVX2 intrinsics, 32 values per step: divide, round
/// half to even, clamp, then pack to bytes (the compiler's own vectorisation of the
/// saturating `as i8` took about 2.5 cycles per value). The same result bit for bit: a
/// NaN quotient becomes 0, as `as i8` makes it.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_symmetric_avx2(values: &[f32], scale: f32, out: &mut [i8]) {
    use std::arch::x86_64::*;
    let n = values.len().min(out.len());
    let (s, lo, hi) = (_mm256_set1_ps(scale), _mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let eight = |at: usize| {
        let q = _mm256_div_ps(_mm256_loadu_ps(values.as_ptr().add(at)), s);
        let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
        // NaN → 0 (an ordered self-comparison is false only for NaN), then clamp.
        let q = _mm256_and_ps(q, _mm256_cmp_ps::<_CMP_ORD_Q>(q, q));
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi))
    };
    let mut i = 0;
    while i + 32 <= n {
        let (a, b, c, d) = (eight(i), eight(i + 8), eight(i + 16), eight(i + 24));
        // packs work within 128-bit lanes: one permute restores the order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, bytes);
        i += 32;
    }
    quantize_symmetric_lanes(&values[i..n], scale, &mut out[i..n]);
}
