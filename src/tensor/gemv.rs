//! Products of a few activation rows with a weight matrix (decode), one fused dot product
//! per output: each weight row is read once from memory while the activation rows stay in
//! cache, so the product runs at the speed of reading the weights.

use rayon::prelude::*;

/// Activation rows up to which the dot-product path runs; more rows go to products whose
/// register tiles reuse each weight across rows.
pub const DOT_MAX_ROWS: usize = 4;

/// Below this many multiply-adds the dot products run on the calling thread.
///
/// Why not the products' `SERIAL_MACS` (256 Ki): a dot product reads each weight once, so
/// 256 Ki multiply-adds are a megabyte of f32 weights. At that size SmolLM2's 192 × 576
/// key and value projections ran on one thread: 28 µs, against 17–21 µs on two threads
/// of the Xeon (256 × 256: 16.5 against 11 µs; best of 50 calls rotating through more
/// weights than fit in L2).
const SERIAL_DOT_MACS: usize = 32 * 1024;

/// `out[i·n + j] = dot(i, j)` for `m` activation rows and `n` weight rows of length `k`,
/// weight rows split over the pool in tasks of about 256 k multiply-adds (`SERIAL_MACS`)
/// when there are `SERIAL_DOT_MACS` or more.
pub fn by_dots(m: usize, k: usize, n: usize, out: &mut [f32], dot: impl Fn(usize, usize) -> f32 + Sync) {
    assert_eq!(out.len(), m * n, "gemv: output is not [m, n]");
    // A small product runs on this thread: a pool task costs more than its work.
    if m * n * k < SERIAL_DOT_MACS {
        for i in 0..m {
            out[i * n..(i + 1) * n].iter_mut().enumerate().for_each(|(j, o)| *o = dot(i, j));
        }
        return;
    }
    // Tasks of about `SERIAL_MACS` in a count the threads share: from `SERIAL_DOT_MACS`
    // up, a product of a few rows would otherwise be one task, run on this thread after
    // the copy below.
    let per_task = super::balanced_task_len(n, super::SERIAL_MACS / (m * k).max(1));
    if m == 1 {
        out.par_chunks_mut(per_task).enumerate().for_each(|(task, chunk)| {
            let first = task * per_task;
            chunk.iter_mut().enumerate().for_each(|(r, o)| *o = dot(0, first + r));
        });
        return;
    }
    // Transposed results (`[n, m]`) so each task writes one contiguous range.
    let mut by_row = vec![0.0f32; n * m];
    by_row.par_chunks_mut(per_task * m).enumerate().for_each(|(task, chunk)| {
        let first = task * per_task;
        for (r, dots) in chunk.chunks_exact_mut(m).enumerate() {
            dots.iter_mut().enumerate().for_each(|(i, d)| *d = dot(i, first + r));
        }
    });
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = by_row[j * m + i];
        }
    }
}

/// `out[m×n] = a[m×k] · wᵀ` by dot products (`m` at most a few rows).
pub fn matmul_nt_dots(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    by_dots(m, k, n, out, |i, j| dot_f32(&a[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]));
}

/// `Σ a[i] · b[i]`: AVX2 with four eight-lane accumulators where the CPU has it.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the features were just detected.
        return unsafe { avx2::dot(a, b) };
    }
    dot_f32_scalar(a, b)
}

/// The scalar dot product the vector path is checked against.
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

/// The body of an eight-lane fused dot product of `n` terms: four accumulators over 32
/// terms an iteration, then eight at a time, lanes summed by [`super::sum_lanes`], the tail
/// one by one. `$a` points at the f32 activations; `$load(i)` gives the eight weights
/// from `i` as an `__m256`, `$tail(i)` the product of term `i`, and `$ahead(i)` asks for
/// the weights [`WEIGHT_PREFETCH_BYTES`] past term `i`'s (once per 32 terms). For use
/// inside an `unsafe` function compiled with AVX2 and FMA (and what `$load` needs).
#[cfg(target_arch = "x86_64")]
macro_rules! fused_dot_avx2 {
    ($n:expr, $a:expr, $load:expr, $tail:expr, $ahead:expr) => {{
        use std::arch::x86_64::*;
        let (n, pa) = ($n, $a);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            $ahead(i);
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), $load(o), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), $load(i), acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total = $crate::tensor::sum_lanes(lanes);
        for j in i..n {
            total += $tail(j);
        }
        total
    }};
}
#[cfg(target_arch = "x86_64")]
pub(crate) use fused_dot_avx2;

/// How far ahead of the weights being multiplied a GEMV prefetches them (rows follow one
/// another in memory, so past a row's end is the next row's start): the hardware's own
/// prefetch left decode GEMVs waiting on memory (see `bench profile --decode`).
pub(crate) const WEIGHT_PREFETCH_BYTES: usize = 4096;

/// Ask for the cache line at `p` (which may lie past the weights: a prefetch does not
/// fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    use std::arch::x86_64::*;
    // SAFETY: a prefetch reads nothing architecturally and never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    /// [`super::dot_f32`], 32 products an iteration.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let pb = b.as_ptr();
        super::fused_dot_avx2!(
            a.len().min(b.len()),
            a.as_ptr(),
            |i| _mm256_loadu_ps(pb.add(i)),
            |j: usize| a[j] * b[j],
            // 32 terms are two cache lines.
            |i: usize| {
                let ahead = (pb as *const u8).wrapping_add(4 * i + super::WEIGHT_PREFETCH_BYTES);
                super::prefetch(ahead);
                super::prefetch(ahead.wrapping_add(64));
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::matmul_nt_reference;

    /// Largest error of the dot-product path against the f64 product, relative to Σ|a·w|
    /// of the output: f32 accumulation over k terms.
    const DOT_PRODUCT_ERROR: f64 = 1e-5;

    use crate::tensor::test_values as values;

    #[test]
    fn dot_products_match_the_f64_reference() {
        for (m, k, n) in [(1, 1, 1), (1, 7, 5), (1, 576, 1536), (2, 33, 9), (4, 100, 70), (1, 0, 3)] {
            let (a, w) = (values(m * k, 3), values(n * k, 11));
            let want = matmul_nt_reference(&a, m, k, &w, n);
            let mut got = vec![f32::NAN; m * n];
            matmul_nt_dots(&a, m, k, &w, n, &mut got);
            for i in 0..m {
                for j in 0..n {
                    let scale: f64 = (0..k).map(|kk| (a[i * k + kk] * w[j * k + kk]).abs() as f64).sum();
                    let err = (got[i * n + j] as f64 - want[i * n + j] as f64).abs();
                    assert!(
                        err <= DOT_PRODUCT_ERROR * scale.max(1e-30),
                        "m {m} k {k} n {n} ({i}, {j}): {err:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn pool_tasks_give_each_dot_product_its_own_bits() {
        // Serial, one row on the pool, a few rows on the pool (the transposed copy).
        for (m, k, n) in [(2, 33, 9), (1, 200, 300), (3, 200, 300), (4, 576, 192)] {
            let (a, w) = (values(m * k, 5), values(n * k, 13));
            let mut got = vec![f32::NAN; m * n];
            crate::tensor::on_pool(|| matmul_nt_dots(&a, m, k, &w, n, &mut got));
            for i in 0..m {
                for j in 0..n {
                    let want = dot_f32(&a[i * k..][..k], &w[j * k..][..k]);
                    assert_eq!(got[i * n + j].to_bits(), want.to_bits(), "m {m} k {k} n {n} ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn the_vector_dot_stays_within_budget_of_the_scalar_one() {
        for k in [0, 1, 8, 31, 32, 33, 100, 4096] {
            let (a, b) = (values(k, 5), values(k, 9));
            let scale: f64 = a.iter().zip(&b).map(|(&x, &y)| (x * y).abs() as f64).sum();
            let err = (dot_f32(&a, &b) as f64 - dot_f32_scalar(&a, &b) as f64).abs();
            assert!(err <= DOT_PRODUCT_ERROR * scale.max(1e-30), "k {k}: {err:e}");
        }
    }
}
