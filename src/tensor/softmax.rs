//! Softmax of one row, in place: the attention's hot element-wise pass.
//!
//! Why a kernel of its own: in an encoder pass of all-MiniLM-L6-v2 (8 × 128 tokens) the
//! softmax over 9.4 M scores took half the attention's time. The scalar fold for the
//! maximum runs one value per instruction, and the final scaling four; the AVX2 path
//! takes eight at a time for both and the AVX-512 path sixteen, two rows at once where
//! the rows have one length ([`softmax_rows_in_place`]). The exponentials and their sum
//! are [`super::exp`]'s on every path, summed in the same order, so all give the same
//! bits.

/// Softmax of `row`, in place, numerically stable (shifted by the row's maximum).
pub fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::tile::has_tiles() && super::has_avx2_fma() {
        // SAFETY: the features were just detected.
        unsafe { avx512::softmax_in_place(row) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the features were just detected.
        unsafe { avx2::softmax_in_place(row) };
        return;
    }
    softmax_scalar(row);
}

/// [`softmax_in_place`] of every row of `width` values of `x`: the same bits, two rows at
/// a time where the CPU has AVX-512 (their chains of dependent sums interleave).
pub fn softmax_rows_in_place(x: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::tile::has_tiles() && super::has_avx2_fma() {
        let mut pairs = x.chunks_exact_mut(2 * width);
        for pair in &mut pairs {
            let (a, b) = pair.split_at_mut(width);
            // SAFETY: the features were just detected.
            unsafe { avx512::softmax_two(a, b) };
        }
        pairs.into_remainder().chunks_mut(width).for_each(softmax_in_place);
        return;
    }
    x.chunks_mut(width).for_each(softmax_in_place);
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
        let sum = crate::tensor::exp::avx2::exp_sum_in_place(row, max);
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

/// Sixteen values at a time: the maximum, the exponentials and their sum
/// ([`crate::tensor::exp::avx512::exp_sum_rows`], the same bits as the other paths), then
/// the scaling; tails through masked loads and stores.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::tensor::exp::avx512 as exp;
    use std::arch::x86_64::*;

    const LANES: usize = 16;

    /// [`super::softmax_in_place`] sixteen values at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn softmax_in_place(row: &mut [f32]) {
        let shift = max(row);
        let [sum] = exp::exp_sum_rows([&mut *row], [shift]);
        scale(row, 1.0 / sum);
    }

    /// [`softmax_in_place`] of two rows of one length, the exponentials of both in one
    /// loop.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn softmax_two(a: &mut [f32], b: &mut [f32]) {
        let shifts = [max(a), max(b)];
        let [sum_a, sum_b] = exp::exp_sum_rows([&mut *a, &mut *b], shifts);
        scale(a, 1.0 / sum_a);
        scale(b, 1.0 / sum_b);
    }

    /// `row[i] *= inv`.
    #[target_feature(enable = "avx512f")]
    unsafe fn scale(row: &mut [f32], inv: f32) {
        let (inv, p) = (_mm512_set1_ps(inv), row.as_mut_ptr());
        for at in (0..row.len()).step_by(LANES) {
            let mask = tail_mask(row.len() - at);
            let v = _mm512_maskz_loadu_ps(mask, p.add(at));
            _mm512_mask_storeu_ps(p.add(at), mask, _mm512_mul_ps(v, inv));
        }
    }

    /// Lanes holding values when `left` values remain.
    fn tail_mask(left: usize) -> u16 {
        if left >= LANES {
            u16::MAX
        } else {
            ((1u32 << left) - 1) as u16
        }
    }

    /// The largest value of `row` (−∞ when empty), in two running maxima; lanes past the
    /// end are not read (−∞).
    #[target_feature(enable = "avx512f")]
    unsafe fn max(row: &[f32]) -> f32 {
        let low = _mm512_set1_ps(f32::NEG_INFINITY);
        let load = |at: usize| {
            _mm512_mask_loadu_ps(low, tail_mask(row.len().saturating_sub(at)), row.as_ptr().wrapping_add(at))
        };
        let (mut even, mut odd) = (low, low);
        for at in (0..row.len()).step_by(2 * LANES) {
            even = _mm512_max_ps(even, load(at));
            odd = _mm512_max_ps(odd, load(at + LANES));
        }
        _mm512_reduce_max_ps(_mm512_max_ps(even, odd))
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
    fn rows_in_pairs_give_each_row_s_bits() {
        for (rows, width) in [(4, 128), (3, 40), (5, 7), (1, 33)] {
            let mut x = crate::tensor::test_values(rows * width, width as u32);
            x.iter_mut().step_by(9).for_each(|v| *v = f32::MIN);
            let mut each = x.clone();
            each.chunks_mut(width).for_each(softmax_scalar);
            softmax_rows_in_place(&mut x, width);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x), bits(&each), "{rows} rows of {width}");
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
