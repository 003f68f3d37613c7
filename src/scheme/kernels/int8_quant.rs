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
    // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid
    // for both.
    let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, out.len()) };
    quantize_bytes::<false>(values, scale, bytes);
}

/// [`quantize_symmetric`]'s codes plus 128, as unsigned bytes (the form the VNNI kernels
/// multiply), in the same pass: the sign bit flipped in the register before the store.
pub fn quantize_symmetric_offset(values: &[f32], scale: f32, out: &mut [u8]) {
    quantize_bytes::<true>(values, scale, out);
}

/// The codes as bytes, plus 128 when `OFFSET`.
fn quantize_bytes<const OFFSET: bool>(values: &[f32], scale: f32, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::tensor::has_avx2() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F and AVX2.
            unsafe { quantize_avx512::<OFFSET>(values, scale, out) };
        } else {
            // SAFETY: the CPU has AVX2.
            unsafe { quantize_avx2::<OFFSET>(values, scale, out) };
        }
        return;
    }
    quantize_lanes::<OFFSET>(values, scale, out);
}

/// One code.
#[inline(always)]
fn code(v: f32, scale: f32) -> i8 {
    (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8
}

#[inline(always)]
fn quantize_lanes<const OFFSET: bool>(values: &[f32], scale: f32, out: &mut [u8]) {
    let flip = if OFFSET { 0x80 } else { 0 };
    for (q, &v) in out.iter_mut().zip(values) {
        *q = code(v, scale) as u8 ^ flip;
    }
}

/// The portable loop of [`quantize_symmetric`] (tests compare the vector paths with it).
#[cfg(test)]
pub(crate) fn quantize_symmetric_lanes(values: &[f32], scale: f32, out: &mut [i8]) {
    for (q, &v) in out.iter_mut().zip(values) {
        *q = code(v, scale);
    }
}

/// [`quantize_lanes`] in AVX2 intrinsics, 32 values per step: divide, round half to
/// even, clamp, then pack to bytes (the compiler's own vectorisation of the saturating
/// `as i8` took about 2.5 cycles per value). The same result bit for bit: a NaN quotient
/// becomes 0, as `as i8` makes it.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2<const OFFSET: bool>(values: &[f32], scale: f32, out: &mut [u8]) {
    use std::arch::x86_64::*;
    let n = values.len().min(out.len());
    let (s, lo, hi) = (_mm256_set1_ps(scale), _mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let flip = _mm256_set1_epi8(if OFFSET { 0x80u8 as i8 } else { 0 });
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
        _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, _mm256_xor_si256(bytes, flip));
        i += 32;
    }
    quantize_lanes::<OFFSET>(&values[i..n], scale, &mut out[i..n]);
}

/// [`quantize_avx2`] sixteen values per instruction where the CPU has AVX-512F: the same
/// codes lane for lane, and a truncating narrow to bytes (the values are already clamped
/// to ±127).
///
/// The quotient is `v · (1 / scale)` wherever that provably rounds to the same integer as
/// `v / scale`: the two differ by under 3 units in the last place of a value at most
/// 127.5 in size (2.3e-5; larger ones clamp alike), so they round alike unless the
/// product lies within [`TIE_GUARD`] of a half-integer. A vector with such a lane, or a
/// NaN or infinity, is divided instead. Why: the division was the loop's slowest
/// instruction (one per 8 cycles per vector on the Xeon); it now runs for few vectors.
///
/// # Safety
/// The CPU must have AVX-512F and AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn quantize_avx512<const OFFSET: bool>(values: &[f32], scale: f32, out: &mut [u8]) {
    use std::arch::x86_64::*;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let n = values.len().min(out.len());
    let (s, lo, hi) = (_mm512_set1_ps(scale), _mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let (inv, guard) = (_mm512_set1_ps(1.0 / scale), _mm512_set1_ps(0.5 - TIE_GUARD));
    let flip = _mm_set1_epi8(if OFFSET { 0x80u8 as i8 } else { 0 });
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(values.as_ptr().add(i));
        let product = _mm512_mul_ps(v, inv);
        let mut q = _mm512_roundscale_ps::<NEAREST>(product);
        // Distance to the nearest integer; at least 0.5 − guard, or NaN (an infinite or
        // NaN product), means the product may round differently from the quotient.
        let off = _mm512_abs_ps(_mm512_sub_ps(product, q));
        if _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(off, guard) != 0 {
            q = _mm512_roundscale_ps::<NEAREST>(_mm512_div_ps(v, s));
        }
        let q = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(q, q), q);
        let codes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi)));
        _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, _mm_xor_si128(codes, flip));
        i += 16;
    }
    quantize_avx2::<OFFSET>(&values[i..n], scale, &mut out[i..n]);
}

/// How close to a half-integer `v · (1 / scale)` may lie and still be trusted to round
/// as `v / scale` does: 2⁻¹⁴ (6.1e-5), above the 2.3e-5 the two can differ by.
const TIE_GUARD: f32 = 1.0 / 16384.0;

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose quotient by `scale` lies at, or a unit in the last place either side
    /// of, every half-integer from −128.5 to 128.5: where a reciprocal's rounding could
    /// differ from the division's.
    fn near_ties(scale: f32) -> Vec<f32> {
        (-257..=257)
            .flat_map(|h| {
                let tie = h as f32 * 0.5 * scale;
                [tie, f32::from_bits(tie.to_bits() + 1), f32::from_bits(tie.to_bits().saturating_sub(1))]
            })
            .collect()
    }

    #[test]
    fn values_at_half_integers_get_the_divided_codes() {
        for scale in [1.0f32, 0.37, symmetric_scale(10.0), symmetric_scale(3.3e-3), 7.9e4] {
            let x = near_ties(scale);
            let (mut want, mut got) = (vec![0u8; x.len()], vec![0u8; x.len()]);
            quantize_lanes::<true>(&x, scale, &mut want);
            quantize_symmetric_offset(&x, scale, &mut got);
            let wrong: Vec<_> = (0..x.len()).filter(|&i| got[i] != want[i]).map(|i| x[i] / scale).collect();
            assert!(wrong.is_empty(), "scale {scale}: quotients coded differently: {wrong:?}");
        }
    }

    /// Every vector path gives the portable loop's bytes, plain and offset, at lengths
    /// around the 16- and 32-value steps, with ties, clamping, signed zero and NaN.
    #[test]
    fn every_path_gives_the_portable_bytes() {
        let mut x = crate::tensor::SeededRng::new(8).normal_vec(300, 3.0);
        x[..6].copy_from_slice(&[0.5, -0.5, 1.5, -2.5, -0.0, f32::NAN]);
        x[37] = 1e30;
        x[50] = f32::NEG_INFINITY;
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 47, 64, 100, 300] {
            let x = &x[..len];
            for scale in [1.0f32, 0.37, symmetric_scale(10.0)] {
                let (mut plain, mut offset) = (vec![0u8; len], vec![0u8; len]);
                quantize_lanes::<false>(x, scale, &mut plain);
                quantize_lanes::<true>(x, scale, &mut offset);
                assert!(plain.iter().zip(&offset).all(|(p, o)| p ^ 0x80 == *o));
                let mut signed = vec![0i8; len];
                quantize_symmetric(x, scale, &mut signed);
                assert_eq!(signed.iter().map(|&c| c as u8).collect::<Vec<_>>(), plain, "{len} {scale}");
                let mut fast = vec![0u8; len];
                quantize_symmetric_offset(x, scale, &mut fast);
                assert_eq!(fast, offset, "{len} {scale}");
                #[cfg(target_arch = "x86_64")]
                if crate::tensor::has_avx2() {
                    let mut avx2 = vec![0u8; len];
                    // SAFETY: the CPU has AVX2.
                    unsafe { quantize_avx2::<true>(x, scale, &mut avx2) };
                    assert_eq!(avx2, offset, "avx2 {len} {scale}");
                }
            }
        }
    }
}
