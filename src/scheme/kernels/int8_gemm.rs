//! int8×int8→int32 matrix products `c[m, n] = a[m, k] · w[n, k]ᵀ` for the integer
//! schemes: a scalar reference, an AVX2 path and an AVX-512 VNNI path (prefill, from
//! 8 rows; `int8_gemm_vnni`), chosen at run time, multi-threaded with
//! rayon over blocks of weight rows. Every path gives the reference's bits.
//!
//! Measured speed against the f32 GEMM (`benches/int8_gemm.rs`, 2 threads, SmolLM2's
//! layer shapes and 2048×2048, m = 1, 64, 512; figures in `reports/cpu-vnni`):
//! - with VNNI (a 16-core Xeon with AVX-512 VNNI, pinned to 2 cores; the f32 side runs
//!   `gemm`'s AVX-512 kernels): 3.1–8.6× at m = 1, 4.7–8.3× at 64, 3.1–4.3× at 512;
//! - AVX2 only (the 2-core Zen 3 this crate is developed on): 3.8–9× at m = 1, but
//!   1.3–2.6× from 64 rows, below the 2.5× the harness aims for; the reason follows.
//!
//! Both paths accumulate in i32 with wrapping addition, so they agree bit for bit on
//! every input, including −128 and sums past i32 (which need k > 131072 and cannot occur
//! in the layers we run: |a·w| ≤ 16384).
//!
//! Two AVX2 kernels, both on i16 operands multiplied with `vpmaddwd` (`_mm256_madd_epi16`:
//! i16×i16 products summed in pairs into i32; a pair is at most 2·128·128 = 32768, so
//! nothing saturates and −128 needs no special case):
//! - from 8 activation rows (prefill), `int8_gemm_panel`: weights packed
//!   per task into i16 panels of 16 columns, a 4×16 register block fed by broadcast
//!   activation pairs, no horizontal sums;
//! - below it (decode), the row-major kernel here: 2 activation rows × 4 weight rows,
//!   the weights widened in the loop (`vpmovsxbw`), lanes reduced at the end — it reads
//!   each weight once, which is what a memory-bound decode step needs.
//!
//! Why not `vpmaddubsw` (u8×i8 summed in pairs into a *saturating* i16, 32 products per
//! instruction)? It needs an unsigned operand: for signed activations the sign trick
//! `maddubs(|a|, sign(w, a))`, plus a `vpmaddwd` by ones to widen the i16 pairs to i32.
//! Measured on this machine's Zen 3 cores (dependency-free loops): `vpmaddwd`,
//! `vpmaddubsw` and `vpsignb` each issue twice per cycle and share the same two pipes
//! (alternating `vpmaddwd`/`vpsignb` runs at one pair per cycle, not two). So the sign
//! trick costs 3 of those pipe slots per 32 products, 21 products per cycle at best, and
//! `vpmaddwd` on widened operands costs 1 slot per 16, 32 per cycle. Without VNNI
//! (`vpdpbusd`, which the AVX-512 path uses) there is no faster exact instruction.
//!
//! Where the time goes, per pair of k values in a 4×16 panel block: 2 panel loads,
//! 4 broadcasts (load ports only), 8 `vpmaddwd` and 8 `vpaddd`: 16 vector ALU
//! instructions per 128 multiply-adds, 8 per instruction. An f32 FMA also does 8
//! multiply-adds per instruction, but only two pipes execute FMAs while four execute
//! integer adds; the integer kernel's ceiling is therefore 32 multiply-adds per cycle
//! (all four pipes busy, the two multiply pipes saturated) against 16 for f32: 2.0× the
//! f32 *peak*. The `gemm` crate reaches 70–88% of its peak at these shapes, so 2.5× its
//! speed would need the int8 kernel at 88–110% of its own ceiling: out of reach on AVX2.
//! Measured single-threaded (best of N, shared machine): the panel kernel runs at about
//! 21 multiply-adds per cycle (m = 64 and 512, k = 576), the row-major one at 13–19, the
//! f32 GEMM at 11.5–14; see `benches/int8_gemm.rs` for the two-thread ratios.

use rayon::prelude::*;

pub use super::int8_common::Code;
use super::int8_common::OutPtr;
#[cfg(target_arch = "x86_64")]
use super::int8_common::{widen_rows, Widened};

#[cfg(target_arch = "x86_64")]
use super::int8_gemm_panel::PANEL_MIN_ROWS;

/// Task boundaries of the panel kernel: whole panels of 16 output columns.
#[cfg(target_arch = "x86_64")]
const PANEL_ALIGN: usize = 16;

/// Task boundaries of the VNNI kernel: whole panels of 32 output columns.
#[cfg(target_arch = "x86_64")]
const VNNI_ALIGN: usize = 32;

/// Products below this many multiply-adds run on one thread: waking the pool costs more
/// than it saves. Measured here (2 cores, benches/int8_gemm.rs, from a pool thread as
/// `bench run` calls it): a 576×576 decode step (332k multiply-adds) takes 9.3 µs on one
/// thread and 4.8–6.1 µs split over rayon; 1536×576, 28 µs and 11–14 µs. (From a thread
/// outside the pool the split cost 35 µs, hence an earlier limit of 1M.)
const SERIAL_MACS: usize = 128 * 1024;

/// Weight rows (output columns) per rayon task: 64 rows of k = 576 int8 values are 36 KiB,
/// a block that stays in L2 while every activation row streams past it.
const ROWS_PER_TASK: usize = 64;

/// The kernel path [`gemm_i8`] takes on this machine: `int8-avx512vnni/avx2` (VNNI from
/// 8 activation rows, AVX2 below), `int8-avx2` or `int8-scalar`.
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if super::int8_gemm_vnni::available() {
        return "int8-avx512vnni/avx2";
    }
    if avx2_available() {
        "int8-avx2"
    } else {
        "int8-scalar"
    }
}

fn avx2_available() -> bool {
    crate::tensor::has_avx2()
}

/// Scalar reference: `out[i·n + j] = Σ_kk a[i·k + kk] · w[j·k + kk]`, wrapping i32 sums.
pub fn gemm_i8_reference<T: Code>(a: &[T], m: usize, k: usize, w: &[i8], n: usize, out: &mut [i32]) {
    check_shapes(a, m, k, w, n, out);
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = dot_scalar(&a[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        }
    }
}

fn dot_scalar<T: Code>(a: &[T], w: &[i8]) -> i32 {
    a.iter().zip(w).fold(0i32, |acc, (&x, &y)| acc.wrapping_add(Into::<i32>::into(x) * y as i32))
}

fn check_shapes<T>(a: &[T], m: usize, k: usize, w: &[i8], n: usize, out: &[i32]) {
    assert_eq!(a.len(), m * k, "gemm_i8: lhs is not [m, k]");
    assert_eq!(w.len(), n * k, "gemm_i8: weight is not [n, k]");
    assert_eq!(out.len(), m * n, "gemm_i8: output is not [m, n]");
}

/// `out[m, n] = a[m, k] · w[n, k]ᵀ` in i32, on the fastest path this CPU has; bit-exact
/// with [`gemm_i8_reference`]. `a` is `i8` or `u8`.
pub fn gemm_i8<T: Code>(a: &[T], m: usize, k: usize, w: &[i8], n: usize, out: &mut [i32]) {
    check_shapes(a, m, k, w, n, out);
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if m >= PANEL_MIN_ROWS && super::int8_gemm_vnni::available() {
        let bytes = super::int8_gemm_vnni::unsigned_rows(a, m, k);
        run_blocks(m, n, k, VNNI_ALIGN, out, |cols, out_ptr| {
            // SAFETY: AVX-512 VNNI was detected above; `bytes` holds m rows of k values;
            // `run_blocks` hands each task disjoint output columns.
            unsafe { super::int8_gemm_vnni::gemm_cols(&bytes, m, k, w, n, cols, out_ptr) }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        let a16 = widen_rows(a, m, k);
        if m >= PANEL_MIN_ROWS {
            run_blocks(m, n, k, PANEL_ALIGN, out, |cols, out_ptr| {
                // SAFETY: AVX2 was detected above; `a16` holds m rows widened from k
                // values; `run_blocks` hands each task disjoint output columns.
                unsafe { super::int8_gemm_panel::gemm_cols(&a16, m, k, w, n, cols, out_ptr) }
            });
        } else {
            run_blocks(m, n, k, 1, out, |rows, out_ptr| {
                // SAFETY: AVX2 was detected above; `run_blocks` hands each task a disjoint
                // range of output columns and a pointer to the [m, n] output.
                unsafe { avx2::gemm_block(&a16, m, k, w, n, rows, out_ptr) }
            });
        }
        return;
    }
    run_blocks(m, n, k, 1, out, |rows, out_ptr| {
        for i in 0..m {
            for j in rows.clone() {
                let v = dot_scalar(&a[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
                // SAFETY: (i, j) lies inside the [m, n] output and column j belongs to
                // this task alone.
                unsafe { out_ptr.0.add(i * n + j).write(v) };
            }
        }
    });
}

/// Split the weight rows (output columns) into tasks and run `task(rows, out)` on each,
/// in parallel when the product is large enough to pay for it.
/// Task boundaries are multiples of `align` columns (the panel kernel's panel width).
fn run_blocks<F>(m: usize, n: usize, k: usize, align: usize, out: &mut [i32], task: F)
where
    F: Fn(std::ops::Range<usize>, OutPtr) + Sync,
{
    let ptr = OutPtr(out.as_mut_ptr());
    let threads = crate::tensor::threads();
    if m * n * k < SERIAL_MACS || threads == 1 {
        task(0..n, ptr);
        return;
    }
    // Small n (decode on a narrow layer) still needs a few tasks per thread.
    let per_task = ROWS_PER_TASK.min(n.div_ceil(threads * 4)).max(4).next_multiple_of(align);
    let blocks: Vec<_> = (0..n).step_by(per_task).map(|s| s..(s + per_task).min(n)).collect();
    blocks.into_par_iter().for_each(|rows| task(rows, ptr));
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 kernel: register blocks of up to 2 activation rows × 4 weight rows (8
    //! accumulators, 4 widened weight vectors and one activation vector: 13 of the 16
    //! ymm registers; a 3×4 block needs 17 and spills).

    use std::arch::x86_64::*;

    use super::{OutPtr, Widened};

    /// Every activation row against weight rows `rows`, written into `out` ([m, n]).
    ///
    /// # Safety
    /// The CPU must support AVX2; `out` must point to `m·n` i32 and no other thread may
    /// write columns `rows`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gemm_block(
        a: &Widened,
        m: usize,
        k: usize,
        w: &[i8],
        n: usize,
        rows: std::ops::Range<usize>,
        out: OutPtr,
    ) {
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(2);
            let mut j = rows.start;
            while j < rows.end {
                let nr = (rows.end - j).min(4);
                match (mr, nr) {
                    (2, 4) => tile::<2, 4>(a, i, k, w, j, n, out),
                    (1, 4) => tile::<1, 4>(a, i, k, w, j, n, out),
                    (2, 3) => tile::<2, 3>(a, i, k, w, j, n, out),
                    (1, 3) => tile::<1, 3>(a, i, k, w, j, n, out),
                    (2, 2) => tile::<2, 2>(a, i, k, w, j, n, out),
                    (1, 2) => tile::<1, 2>(a, i, k, w, j, n, out),
                    (2, _) => tile::<2, 1>(a, i, k, w, j, n, out),
                    _ => tile::<1, 1>(a, i, k, w, j, n, out),
                }
                j += nr;
            }
            i += mr;
        }
    }

    /// One MR×NR tile of the output: activation rows `i..i+MR`, weight rows `j..j+NR`.
    #[target_feature(enable = "avx2")]
    unsafe fn tile<const MR: usize, const NR: usize>(
        a: &Widened,
        i: usize,
        k: usize,
        w: &[i8],
        j: usize,
        n: usize,
        out: OutPtr,
    ) {
        let mut acc = [[_mm256_setzero_si256(); NR]; MR];
        let full = k / 16;
        let wrow = |r: usize| w.as_ptr().add((j + r) * k);
        let (base, stride) = (a.as_ptr(), a.stride());
        let arow = |r: usize| base.add((i + r) * stride);
        for c in 0..full {
            let mut wv = [_mm256_setzero_si256(); NR];
            for (r, v) in wv.iter_mut().enumerate() {
                *v = _mm256_cvtepi8_epi16(_mm_loadu_si128(wrow(r).add(c * 16) as *const __m128i));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_loadu_si256(arow(r).add(c * 16) as *const __m256i);
                for (acc_rc, wv_c) in acc_r.iter_mut().zip(&wv) {
                    *acc_rc = _mm256_add_epi32(*acc_rc, _mm256_madd_epi16(av, *wv_c));
                }
            }
        }
        let tail = k - full * 16;
        if tail > 0 {
            // The weight rows are not padded: copy their last values into a zeroed
            // buffer (the activations are padded with zeros already).
            let mut wv = [_mm256_setzero_si256(); NR];
            for (r, v) in wv.iter_mut().enumerate() {
                let mut buf = [0i8; 16];
                std::ptr::copy_nonoverlapping(wrow(r).add(full * 16), buf.as_mut_ptr(), tail);
                *v = _mm256_cvtepi8_epi16(_mm_loadu_si128(buf.as_ptr() as *const __m128i));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_loadu_si256(arow(r).add(full * 16) as *const __m256i);
                for (acc_rc, wv_c) in acc_r.iter_mut().zip(&wv) {
                    *acc_rc = _mm256_add_epi32(*acc_rc, _mm256_madd_epi16(av, *wv_c));
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (c, v) in acc_r.iter().enumerate() {
                out.0.add((i + r) * n + j + c).write(hsum(*v));
            }
        }
    }

    /// Sum of the eight i32 lanes (wrapping, like the scalar reference).
    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    fn random_i8(rng: &mut SeededRng, len: usize) -> Vec<i8> {
        (0..len).map(|_| (rng.next_u64() & 0xff) as u8 as i8).collect()
    }

    fn both(a: &[i8], m: usize, k: usize, w: &[i8], n: usize) -> (Vec<i32>, Vec<i32>) {
        let (mut fast, mut reference) = (vec![7; m * n], vec![7; m * n]);
        gemm_i8(a, m, k, w, n, &mut fast);
        gemm_i8_reference(a, m, k, w, n, &mut reference);
        (fast, reference)
    }

    #[test]
    fn fast_path_matches_the_reference_on_random_odd_shapes() {
        let mut rng = SeededRng::new(11);
        // m ≥ 8 takes the panel kernel: rows not a multiple of its 4-row block, k not a
        // multiple of its 16-value packing step, n not a multiple of its 16-column panel.
        let shapes = [
            (1, 1, 1),
            (1, 17, 5),
            (3, 15, 4),
            (5, 33, 7),
            (7, 100, 13),
            (2, 576, 9),
            (8, 1, 1),
            (9, 17, 33),
            (13, 31, 16),
            (64, 300, 70),
            (33, 577, 50),
        ];
        for &(m, k, n) in &shapes {
            let (a, w) = (random_i8(&mut rng, m * k), random_i8(&mut rng, n * k));
            let (fast, reference) = both(&a, m, k, &w, n);
            assert_eq!(fast, reference, "m={m} k={k} n={n}");
        }
    }

    /// −128·−128 pairs are where `vpmaddubsw` saturates and the sign trick overflows.
    #[test]
    fn extreme_values_are_exact() {
        for &(m, k, n) in &[(3, 64, 5), (1, 31, 4), (4, 1000, 3), (9, 33, 17), (13, 1000, 40)] {
            for (av, wv) in [(-128i8, -128i8), (-128, 127), (127, 127), (127, -128)] {
                let (a, w) = (vec![av; m * k], vec![wv; n * k]);
                let (fast, reference) = both(&a, m, k, &w, n);
                assert_eq!(fast, reference);
                assert_eq!(reference[0], av as i32 * wv as i32 * k as i32);
            }
        }
    }

    /// Large enough to be split into parallel tasks.
    #[test]
    fn parallel_blocks_cover_every_output() {
        let mut rng = SeededRng::new(12);
        let (m, k, n) = (17, 515, 131);
        let (a, w) = (random_i8(&mut rng, m * k), random_i8(&mut rng, n * k));
        assert!(m * n * k >= SERIAL_MACS);
        let (fast, reference) = both(&a, m, k, &w, n);
        assert_eq!(fast, reference);
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let (fast, reference) = both(&[], 2, 0, &[], 3);
        assert_eq!(fast, vec![0; 6]);
        assert_eq!(reference, vec![0; 6]);
    }
}
