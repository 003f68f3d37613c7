//! Softmax of one row, in place: the attention's hot element-wise pass.
//!
//! Why a kernel of its own: in an encoder pass of all-MiniLM-L6-v2 (8 × 128 tokens) the
//! softmax over 9.4 M scores took half the attention's time. The scalar fold for the
//! maximum runs one value per instruction, and the final scaling four; the AVX2 path
//! takes eight at a time for both. The exponentials and their sum are
//! [`super::exp::exp_sum_in_place`] on both paths, so both give the same bits.

/// Softmax of `row`, in place, numerically stable (shifted by the row's maximum).
pub fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the features were just detected.
        unsafe { avx2::softmax_in_place(row) };
        return;
    }
    softmax_scalar(row);
}

/// The portable path, and the reference the vector one is tested against.
fn softmax_scalar(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = super::exp::exp_sum_in_place(row, max);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    const LANES: usize = 8;

    /// [`super::softmax_in_place`] eight values at a time. The maximum of finite values
    /// is the same in any order; a NaN makes the whole row NaN on both paths (the sum of
    /// the exponentials is NaN).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_in_place(row: &mut [f32]) {
        let max = max(row);
        // The dispatching pass: sixteen lanes where the CPU has AVX-512, the same bits.
        let sum = crate::tensor::exp::exp_sum_in_place(row, max);
        let inv = 1.0 / sum;
        let v = _mm256_set1_ps(inv);
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), v));
        }
        chunks.into_remainder().iter_mut().for_each(|x| *x *= inv);
    }

    /// The largest value of `row` (−∞ when empty), in four accumulators: one would be a
    /// chain of dependent maxima, four cycles each.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn max(row: &[f32]) -> f32 {
        let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        let mut quads = row.chunks_exact(4 * LANES);
        for c in &mut quads {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_max_ps(*a, _mm256_loadu_ps(c.as_ptr().add(i * LANES)));
            }
        }
        let mut eights = quads.remainder().chunks_exact(LANES);
        for c in &mut eights {
            acc[0] = _mm256_max_ps(acc[0], _mm256_loadu_ps(c.as_ptr()));
        }
        let both = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), both);
        lanes.iter().chain(eights.remainder()).copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vector_path_gives_the_scalar_bits() {
        for len in [1, 7, 8, 9, 31, 128, 1000] {
            let mut row = crate::tensor::test_values(len, len as u32);
            // Masked keys, as the attention sets them.
            row.iter_mut().step_by(5).for_each(|v| *v = f32::MIN);
            row[len / 2] = 3.5;
            let mut scalar = row.clone();
            softmax_scalar(&mut scalar);
            softmax_in_place(&mut row);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&row), bits(&scalar), "length {len}");
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "length {len}: {sum}");
        }
    }

    #[test]
    fn a_nan_makes_the_row_nan_on_every_path() {
        let mut row = crate::tensor::test_values(40, 3);
        row[17] = f32::NAN;
        let mut scalar = row.clone();
        softmax_scalar(&mut scalar);
        softmax_in_place(&mut row);
        assert!(row.iter().all(|v| v.is_nan()) && scalar.iter().all(|v| v.is_nan()));
    }
}
