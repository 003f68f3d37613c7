//! The prefill kernel of [`super::int8_gemm`] on CPUs with AVX-512 VNNI: `vpdpbusd`
//! multiplies 64 unsigned by 64 signed bytes and adds each group of four products into
//! one of 16 i32 lanes, 64 multiply-adds per instruction against 16 for an AVX-512 f32 FMA.
//!
//! Operands: `vpdpbusd` wants its activations unsigned. `u8` codes (int8-static) go in as
//! they are; `i8` codes go in as `a + 128`, and each output subtracts `128·Σ_k w[j, k]`,
//! the weight row's sum, computed while packing. Everything is wrapping i32 arithmetic,
//! so the result is the scalar reference's bits for every input, −128 included.
//!
//! Layout: activation rows as bytes, `k` padded to a multiple of 4 with zeros (a padded
//! activation meets a zero weight, in either encoding). Weight rows packed, per task,
//! into panels of 32 output columns, `[k/4][32 columns][4]` bytes: one k quad of 16
//! columns is one 64-byte vector, gathered from 16 weight rows at once. A register block
//! of 8 activation rows × 32 columns keeps 16 accumulators; per k quad it loads 2 panel
//! vectors, broadcasts 8 activation quads and issues 16 `vpdpbusd` (1024 multiply-adds).
//!
//! The CPU this crate is developed on has no AVX-512; this path is chosen at run time and
//! its tests run where the CPU has it (they print that they were skipped otherwise).

use std::arch::x86_64::*;

use super::int8_common::{Code, OutPtr};

/// Output columns per panel: two vectors of 16 i32 lanes.
pub(crate) const NR: usize = 32;

/// Activation rows per register block: 8 rows × 2 vectors = 16 accumulators.
const MR: usize = 8;

/// Bytes of packed panels a task keeps at once (a quarter of a 2 MiB L2).
const PACKED_BYTES: usize = 512 * 1024;

/// Whether this CPU runs the kernel.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Activation rows as unsigned bytes, `stride` (k rounded up to 4) per row, and the
/// amount added to each code to make it unsigned (128 for `i8`, 0 for `u8`).
pub(crate) struct UnsignedRows {
    data: Vec<u8>,
    stride: usize,
    shift: i32,
    rows: usize,
}

/// `a` (`[m, k]`) as [`UnsignedRows`].
pub(crate) fn unsigned_rows<T: Code>(a: &[T], m: usize, k: usize) -> UnsignedRows {
    UnsignedRows::from_codes(a, m, k)
}

impl UnsignedRows {
    /// `a` (`[m, k]`) stored unsigned.
    pub(super) fn from_codes<T: Code>(a: &[T], m: usize, k: usize) -> UnsignedRows {
        let mut rows = UnsignedRows::zeroed(m, k, T::SHIFT);
        if k > 0 {
            for (dst, src) in rows.data.chunks_exact_mut(rows.stride).zip(a.chunks_exact(k)) {
                dst[..k].iter_mut().zip(src).for_each(|(d, &s)| *d = (Into::<i32>::into(s) + T::SHIFT) as u8);
            }
        }
        rows
    }

    /// `m` rows of `k` zero bytes (plus padding) for codes shifted by `shift`, to be
    /// filled through [`UnsignedRows::rows_mut`].
    pub(super) fn zeroed(m: usize, k: usize, shift: i32) -> UnsignedRows {
        let stride = k.div_ceil(4) * 4;
        UnsignedRows { data: vec![0u8; m * stride], stride, shift, rows: m }
    }

    /// The rows' bytes and the stride between rows (only each row's first `k` bytes may
    /// be written: the padding must stay zero).
    pub(super) fn bytes_mut(&mut self) -> (&mut [u8], usize) {
        (&mut self.data, self.stride)
    }

    /// What was added to each code.
    pub(super) fn shift(&self) -> i32 {
        self.shift
    }

    /// Rows held.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// The first byte of row `r`.
    pub(super) fn row_ptr(&self, r: usize) -> *const u8 {
        self.data[r * self.stride..].as_ptr()
    }
}

/// Bytes per packed panel for `k` inputs.
pub(crate) fn panel_len(k: usize) -> usize {
    k.div_ceil(4) * 4 * NR
}

/// Weight rows `cols` (a range of output columns) against every activation row, into
/// `out` (`[m, n]`).
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI ([`available`]); `a` must come from
/// [`unsigned_rows`] with `m` rows of `k` values; `out` must point to `m·n` i32 and no
/// other thread may write columns `cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_cols(
    a: &UnsignedRows,
    m: usize,
    k: usize,
    w: &[i8],
    n: usize,
    cols: std::ops::Range<usize>,
    out: OutPtr,
) {
    let len = panel_len(k);
    // Never more than this task's columns: a fresh half-MiB buffer per task costs more
    // page faults than a small product's arithmetic.
    let group = ((PACKED_BYTES / len.max(1)).max(1) * NR).min(cols.len().next_multiple_of(NR));
    let mut packed = vec![0i8; len * group / NR];
    let mut corrections = vec![0i32; group];
    for start in cols.clone().step_by(group) {
        let end = (start + group).min(cols.end);
        let panels: Vec<usize> = (start..end).step_by(NR).collect();
        for (p, &j0) in panels.iter().enumerate() {
            let width = (end - j0).min(NR);
            let panel = &mut packed[p * len..(p + 1) * len];
            pack_panel(w, k, j0, width, panel);
            column_corrections(panel, a.shift, &mut corrections[p * NR..(p + 1) * NR]);
        }
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(MR);
            for (p, &j0) in panels.iter().enumerate() {
                let panel = &packed[p * len..(p + 1) * len];
                let fix = &corrections[p * NR..(p + 1) * NR];
                let width = (end - j0).min(NR);
                let args = Block { a, i, quads: k.div_ceil(4), panel, fix, n, j0, width, out };
                match rows {
                    8 => block::<8>(&args),
                    7 => block::<7>(&args),
                    6 => block::<6>(&args),
                    5 => block::<5>(&args),
                    4 => block::<4>(&args),
                    3 => block::<3>(&args),
                    2 => block::<2>(&args),
                    _ => block::<1>(&args),
                }
            }
            i += rows;
        }
    }
}

/// Pack weight rows `j0..j0 + width` (zeros beyond `width` and past `k`) into `dst` as
/// `[k/4][32][4]` bytes: whole quads of 16 full-width columns by one gather each, the
/// rest byte by byte.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn pack_panel(w: &[i8], k: usize, j0: usize, width: usize, dst: &mut [i8]) {
    let (quads, whole) = (k.div_ceil(4), k / 4);
    dst.fill(0);
    let offsets = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(k as i32),
    );
    for half in 0..2 {
        let first = half * 16;
        if first + 16 <= width {
            let base = w.as_ptr().add((j0 + first) * k);
            for q in 0..whole {
                // SAFETY: 4 bytes at 4q of each of the 16 rows, all inside `w`.
                let v = _mm512_i32gather_epi32::<1>(offsets, base.add(4 * q) as *const i32);
                _mm512_storeu_si512(dst.as_mut_ptr().add((q * NR + first) * 4) as *mut __m512i, v);
            }
            for q in whole..quads {
                pack_bytes(w, k, j0, first..first + 16, q, dst);
            }
        } else if first < width {
            for q in 0..quads {
                pack_bytes(w, k, j0, first..width, q, dst);
            }
        }
    }
}

/// `−shift·Σ_k w` for each of a packed panel's 32 columns: the sums by `vpdpbusd` against
/// a vector of ones, two instructions per k quad.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn column_corrections(panel: &[i8], shift: i32, dst: &mut [i32]) {
    let ones = _mm512_set1_epi8(1);
    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let w = panel.as_ptr() as *const __m512i;
    for q in 0..panel.len() / (4 * NR) {
        s0 = _mm512_dpbusd_epi32(s0, ones, _mm512_loadu_si512(w.add(2 * q)));
        s1 = _mm512_dpbusd_epi32(s1, ones, _mm512_loadu_si512(w.add(2 * q + 1)));
    }
    let factor = _mm512_set1_epi32(shift.wrapping_neg());
    _mm512_storeu_si512(dst.as_mut_ptr() as *mut __m512i, _mm512_mullo_epi32(s0, factor));
    _mm512_storeu_si512(dst.as_mut_ptr().add(16) as *mut __m512i, _mm512_mullo_epi32(s1, factor));
}

/// Quad `q` of columns `cols` of the panel from `j0`, byte by byte.
fn pack_bytes(w: &[i8], k: usize, j0: usize, cols: std::ops::Range<usize>, q: usize, dst: &mut [i8]) {
    for c in cols {
        for t in 0..4.min(k - 4 * q) {
            dst[(q * NR + c) * 4 + t] = w[(j0 + c) * k + 4 * q + t];
        }
    }
}

/// One register block's operands.
struct Block<'a> {
    a: &'a UnsignedRows,
    /// First activation row.
    i: usize,
    /// k quads.
    quads: usize,
    panel: &'a [i8],
    /// Added to each column's sum (`−shift·Σ_k w`).
    fix: &'a [i32],
    n: usize,
    /// First output column and how many of the panel's 32 are real.
    j0: usize,
    width: usize,
    out: OutPtr,
}

/// Activation rows `i..i + R` against one packed panel.
///
/// # Safety
/// As [`gemm_cols`]; rows `i..i + R` exist and `panel` holds `quads` quads.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block<const R: usize>(b: &Block) {
    let mut acc = [[_mm512_setzero_si512(); 2]; R];
    let rows: [*const i32; R] =
        std::array::from_fn(|r| b.a.data.as_ptr().add((b.i + r) * b.a.stride) as *const i32);
    let w = b.panel.as_ptr() as *const __m512i;
    for q in 0..b.quads {
        let w0 = _mm512_loadu_si512(w.add(2 * q));
        let w1 = _mm512_loadu_si512(w.add(2 * q + 1));
        for r in 0..R {
            // The quad k = 4q..4q + 4 of row r, the same in every lane.
            let x = _mm512_set1_epi32(rows[r].add(q).read_unaligned());
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, w0);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, w1);
        }
    }
    let fix0 = _mm512_loadu_si512(b.fix.as_ptr() as *const __m512i);
    let fix1 = _mm512_loadu_si512(b.fix.as_ptr().add(16) as *const __m512i);
    let mask = |lo: usize| -> __mmask16 {
        let valid = b.width.saturating_sub(lo).min(16);
        ((1u32 << valid) - 1) as __mmask16
    };
    for (r, acc) in acc.iter().enumerate() {
        let dst = b.out.0.add((b.i + r) * b.n + b.j0);
        _mm512_mask_storeu_epi32(dst, mask(0), _mm512_add_epi32(acc[0], fix0));
        _mm512_mask_storeu_epi32(dst.wrapping_add(16), mask(16), _mm512_add_epi32(acc[1], fix1));
    }
}

#[cfg(test)]
mod tests {
    use super::super::int8_gemm::{gemm_i8, gemm_i8_reference, Code};
    use super::*;
    use crate::tensor::SeededRng;

    /// Run the kernel directly (every column in one task) against the reference.
    fn check<T: Code + PartialEq + std::fmt::Debug>(a: &[T], m: usize, k: usize, w: &[i8], n: usize) {
        let mut want = vec![0i32; m * n];
        gemm_i8_reference(a, m, k, w, n, &mut want);
        let mut got = vec![7i32; m * n];
        let rows = unsigned_rows(a, m, k);
        // SAFETY: `available()` was checked by the caller; one task writes every column.
        unsafe { gemm_cols(&rows, m, k, w, n, 0..n, OutPtr(got.as_mut_ptr())) };
        assert_eq!(got, want, "m {m} k {k} n {n}");
        let mut through = vec![0i32; m * n];
        gemm_i8(a, m, k, w, n, &mut through);
        assert_eq!(through, want, "gemm_i8 m {m} k {k} n {n}");
    }

    fn skipped() -> bool {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
        }
        !available()
    }

    #[test]
    fn vnni_kernel_matches_the_reference_bit_for_bit_on_odd_shapes() {
        if skipped() {
            return;
        }
        let mut rng = SeededRng::new(21);
        // k not a multiple of 4, n not a multiple of 16 or 32, m not a multiple of 8.
        for &(m, k, n) in
            &[(8, 4, 32), (9, 5, 17), (13, 33, 40), (8, 576, 576), (21, 1000, 67), (64, 130, 100)]
        {
            let w: Vec<i8> = (0..n * k).map(|_| rng.next_u64() as i8).collect();
            let signed: Vec<i8> = (0..m * k).map(|_| rng.next_u64() as i8).collect();
            let unsigned: Vec<u8> = (0..m * k).map(|_| rng.next_u64() as u8).collect();
            check(&signed, m, k, &w, n);
            check(&unsigned, m, k, &w, n);
        }
    }

    #[test]
    fn vnni_kernel_is_exact_at_the_extremes() {
        if skipped() {
            return;
        }
        for &(m, k, n) in &[(8, 64, 5), (9, 1001, 33), (16, 4096, 48)] {
            for (av, wv) in [(-128i8, -128i8), (-128, 127), (127, 127), (127, -128)] {
                check(&vec![av; m * k], m, k, &vec![wv; n * k], n);
            }
            check(&vec![255u8; m * k], m, k, &vec![-128i8; n * k], n);
        }
    }
}
