//! The prefill kernel of [`super::int8_gemm`] (AVX2): weight rows widened to i16 and
//! packed, per task, into panels of 16 output columns, `[k/2][16 columns][2]`; each step
//! of the register block broadcasts one pair of activations per row (`vpbroadcastd`) and
//! multiplies it into two panel vectors with `vpmaddwd`, so the 8 columns of a vector
//! accumulate in its 8 i32 lanes and no horizontal sums are needed.
//!
//! Per pair of k values a 4×16 block issues 2 panel loads, 4 broadcasts (loads only), 8
//! `vpmaddwd` and 8 `vpaddd`: 16 vector instructions for 128 multiply-adds, against the
//! row-major kernel's 20 (it widens the weights in the loop and reduces lanes at the end).
//! Packing costs one widening and an 8×8 transpose per 128 weights and is amortized over
//! the activation rows, so this path runs from [`PANEL_MIN_ROWS`] rows up.
//!
//! Exactness: a `vpmaddwd` pair is at most 2·128·128 = 32768 in magnitude (i16 operands
//! from i8 or u8 values), so it never saturates; the accumulators wrap like the scalar
//! reference's `wrapping_add`, and every input, −128 included, gives the reference's bits.

use std::arch::x86_64::*;

use super::int8_common::{OutPtr, Widened};

/// Output columns per panel: two vectors of 8 i32 lanes.
const NR: usize = 16;

/// Activation rows per register block: 4 rows × 2 vectors = 8 accumulators, 2 panel
/// vectors and one broadcast (11 of the 16 ymm registers).
const MR: usize = 4;

/// Bytes of packed panels a task keeps at once (half of the 512 KiB L2 of this
/// machine's cores).
const PACKED_BYTES: usize = 256 * 1024;

/// Fewest activation rows for which packing pays: below this the row-major kernel runs.
pub(crate) const PANEL_MIN_ROWS: usize = 8;

/// i16 values per packed panel for `k` inputs (k rounded up to 16 so packing handles
/// whole 8×8 blocks of pairs).
fn panel_len(k: usize) -> usize {
    k.div_ceil(16) * 16 * NR
}

/// Weight rows `cols` (a range of output columns) against every activation row, into
/// `out` (`[m, n]`).
///
/// # Safety
/// The CPU must have AVX2; `a` must hold `m` rows widened from `k` values (stride a
/// multiple of 16, zero padded); `out` must point to `m·n` i32 and no other thread may
/// write columns `cols`.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn gemm_cols(
    a: &Widened,
    m: usize,
    k: usize,
    w: &[i8],
    n: usize,
    cols: std::ops::Range<usize>,
    out: OutPtr,
) {
    let len = panel_len(k);
    // Columns packed at a time: their panels stay in L2 while every activation row passes.
    // Never more than this task's columns: a fresh 256 KiB buffer per task costs more
    // page faults than a small product's arithmetic.
    let group = ((PACKED_BYTES / (2 * len)).max(1) * NR).min(cols.len().next_multiple_of(NR));
    let mut packed = vec![0i16; len * group / NR];
    for start in cols.clone().step_by(group) {
        let end = (start + group).min(cols.end);
        let panels: Vec<usize> = (start..end).step_by(NR).collect();
        for (p, &j0) in panels.iter().enumerate() {
            pack_panel(w, k, j0, (end - j0).min(NR), &mut packed[p * len..(p + 1) * len]);
        }
        rows_against_panels(a, m, k, &packed, &panels, end, n, out);
    }
}

/// Every activation row, `MR` at a time, against the packed `panels` (first columns
/// listed; the last ends at `end`).
///
/// # Safety
/// As [`gemm_cols`]; `packed` holds the panels, [`panel_len`] values each.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_against_panels(
    a: &Widened,
    m: usize,
    k: usize,
    packed: &[i16],
    panels: &[usize],
    end: usize,
    n: usize,
    out: OutPtr,
) {
    let (len, pairs) = (panel_len(k), k.div_ceil(2));
    let mut i = 0;
    while i < m {
        let rows = (m - i).min(MR);
        for (p, &j0) in panels.iter().enumerate() {
            let panel = &packed[p * len..(p + 1) * len];
            let width = (end - j0).min(NR);
            match rows {
                4 => block::<4>(a, i, pairs, panel, n, j0, width, out),
                3 => block::<3>(a, i, pairs, panel, n, j0, width, out),
                2 => block::<2>(a, i, pairs, panel, n, j0, width, out),
                _ => block::<1>(a, i, pairs, panel, n, j0, width, out),
            }
        }
        i += rows;
    }
}

/// Pack weight rows `j0..j0 + width` (output columns; zeros beyond `width`) into `dst`
/// as `[k/2][16][2]` i16: 16 k values of 8 rows at a time are widened (8 i32 lanes of
/// k pairs per row) and transposed so each vector holds one k pair of 8 columns.
#[target_feature(enable = "avx2")]
unsafe fn pack_panel(w: &[i8], k: usize, j0: usize, width: usize, dst: &mut [i16]) {
    let blocks = k.div_ceil(16);
    for kb in 0..blocks {
        for half in 0..2 {
            let rows: [__m256i; 8] = std::array::from_fn(|c| {
                let col = half * 8 + c;
                if col >= width {
                    return _mm256_setzero_si256();
                }
                let row = &w[(j0 + col) * k..(j0 + col + 1) * k];
                let start = kb * 16;
                let bytes = if start + 16 <= k {
                    // SAFETY: 16 bytes of this row.
                    unsafe { _mm_loadu_si128(row.as_ptr().add(start) as *const __m128i) }
                } else {
                    let mut buf = [0i8; 16];
                    buf[..k - start].copy_from_slice(&row[start..]);
                    // SAFETY: a 16-byte local buffer.
                    unsafe { _mm_loadu_si128(buf.as_ptr() as *const __m128i) }
                };
                _mm256_cvtepi8_epi16(bytes)
            });
            let t = transpose8(rows);
            for (pair, v) in t.iter().enumerate() {
                let at = ((kb * 8 + pair) * NR + half * 8) * 2;
                debug_assert!(at + 16 <= dst.len());
                _mm256_storeu_si256(dst.as_mut_ptr().add(at) as *mut __m256i, *v);
            }
        }
    }
}

/// Transpose 8 vectors of 8 i32 lanes: lane `l` of output `o` is lane `o` of input `l`.
#[target_feature(enable = "avx2")]
fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
    let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
    let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
    let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
    let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256(u0, u4, 0x20),
        _mm256_permute2x128_si256(u1, u5, 0x20),
        _mm256_permute2x128_si256(u2, u6, 0x20),
        _mm256_permute2x128_si256(u3, u7, 0x20),
        _mm256_permute2x128_si256(u0, u4, 0x31),
        _mm256_permute2x128_si256(u1, u5, 0x31),
        _mm256_permute2x128_si256(u2, u6, 0x31),
        _mm256_permute2x128_si256(u3, u7, 0x31),
    ]
}

/// One register block: activation rows `i..i + R` against one packed panel (`width`
/// valid columns from `j0`), over `pairs` k pairs.
///
/// # Safety
/// As [`gemm_cols`]; rows `i..i + R` exist and `panel` holds `pairs` pairs.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const R: usize>(
    a: &Widened,
    i: usize,
    pairs: usize,
    panel: &[i16],
    n: usize,
    j0: usize,
    width: usize,
    out: OutPtr,
) {
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    let rows: [*const i32; R] = std::array::from_fn(|r| a.row(i + r).as_ptr() as *const i32);
    let w = panel.as_ptr() as *const __m256i;
    for p in 0..pairs {
        let w0 = _mm256_loadu_si256(w.add(2 * p));
        let w1 = _mm256_loadu_si256(w.add(2 * p + 1));
        for r in 0..R {
            // The pair (k = 2p, 2p + 1) of row r, the same in every lane.
            let x = _mm256_set1_epi32(rows[r].add(p).read_unaligned());
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, w0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, w1));
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let dst = out.0.add((i + r) * n + j0);
        if width == NR {
            _mm256_storeu_si256(dst as *mut __m256i, acc[0]);
            _mm256_storeu_si256(dst.add(8) as *mut __m256i, acc[1]);
        } else {
            let mut tmp = [0i32; NR];
            _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, acc[0]);
            _mm256_storeu_si256(tmp.as_mut_ptr().add(8) as *mut __m256i, acc[1]);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, width);
        }
    }
}
