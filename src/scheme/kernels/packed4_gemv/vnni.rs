//! The 4-bit GEMV's kernel on AVX-512 VNNI: the same exact integer lane sums as the
//! 16-bit kernel (the parent module, [`super`]) in fewer instructions, so the same bits,
//! for every table the 16-bit kernel takes on weights of whole chunk pairs.
//!
//! Why: the 16-bit kernel decodes a chunk pair (64 weights) into four vectors of 16-bit
//! codes and multiplies them with `vpmaddwd`; on the Xeon this runs on, one core decoded
//! about 9 GB/s of packed weights where its caches deliver 20–60, bound by instructions
//! (about 35 a pair with the loop's bookkeeping). Here 512-bit registers take two pairs
//! per step:
//! - int4-block's integer tables (`Layout::SignedBytes`, `Layout::UnsignedBytes`):
//!   `vpdpbusd` multiplies four byte pairs per 32-bit lane. One shift and two masks leave
//!   the high nibbles (even values) and low nibbles (odd values) as bytes `u`, after an
//!   exclusive or with `0x88` for the signed table (it maps the two's-complement
//!   `t = u − 8` to `u ^ 8`, which each lane's start corrects). Each 16-bit activation
//!   code is held as a signed high byte and an unsigned low byte, `x = 256·hi + lo`, and
//!   a lane sums `256·Σ u·hi + Σ lo·u + start`.
//! - Any other table (`Layout::LookupWords`: NF4, FP4, k-means; 13-bit codes `|c| < 4096`
//!   against activation codes `|x| ≤ 8191`): `vpdpwssd` multiplies two pairs of 16-bit
//!   words per lane. Each 128-bit lane's packed bytes 0–7 and 8–15 are widened to words;
//!   a shift leaves their high nibbles, and `vpermw` looks up the codes of both nibbles
//!   in the table held as 32 words. The activation codes are stored in that order
//!   ([`super::lookup_word_slot`]), so 32-bit lane `j` sums the values of bytes `2j, 2j + 1,
//!   2j + 8, 2j + 9`, as the 16-bit kernel's lane `j` does. Four `vpdpwssd` a step replaced
//!   eight `vpdpbusd` on codes split into bytes, and the byte shuffle that put each chunk
//!   in lane order: SmolLM2's NF4 decode-step GEMVs went from 3.9 to 3.1 ms on two threads
//!   of the Xeon (medians of 4 alternated runs, two weight rows at a time).
//!
//! So each lane sums the values the 16-bit kernel's lane sums, every sum is exact (below
//! 2³¹ in magnitude), and conversion, scaling and the block walk
//! (`walk_pairs` in the parent) are the 16-bit kernel's. The tests compare the two bit
//! for bit on every layout, block size and row count.

use super::{hsum, walk_pairs, Activations, Lut, RowStart, PAIR, SPLIT_ENTRY};
use crate::scheme::packed4::Packed4;

/// Whether this CPU runs the byte-product kernel: AVX-512 (F, BW, VL) with VNNI, and AVX2
/// and FMA for the shared walk.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && crate::scheme::packed4::has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How far ahead of the two pairs being decoded the weight bytes are prefetched: at the
/// 16-bit kernel's former 1024 this kernel waited on memory once it decoded faster.
/// SmolLM2-135M's decode-step GEMVs on two threads of the Xeon (medians of alternated
/// runs): int4-block 4.25 ms at 1024 bytes, 3.6–3.9 ms at 4096, the same at 8192.
const PREFETCH_AHEAD: usize = 4096;

/// The kernel's kinds of code, by layout: `Layout::SignedBytes`.
pub(super) const SIGNED: u8 = 0;
/// `Layout::UnsignedBytes`.
pub(super) const UNSIGNED: u8 = 1;
/// `Layout::LookupWords`.
pub(super) const LOOKUP: u8 = 2;

/// `dst[i] = x[first + i] · W[r]` for `M` activation rows held in byte layout `K`.
///
/// Two consecutive pairs of a block piece go through 512-bit registers at once, the
/// first in the low half (the piece's even accumulator) and the second in the high half
/// (its odd one); a piece's odd last pair goes through 256 bits into the even half. So
/// every accumulator takes the same FMAs in the same order as the 256-bit kernel, with
/// half the instructions: at one pair per step the loop was bound by instructions
/// (about 35 a pair), not by its two multiply ports. Blocks of one pair (NF4's) take two
/// blocks per 512-bit step, each half then scaled by its own block in order.
///
/// # Safety
/// [`has_vnni`] must hold, and what `row_dots` in the parent requires of a whole-pairs
/// weight, with `acts` in byte layout `K` and `lut` built from the weight's table.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn row_dots_split<const M: usize, const K: u8>(
    p: &Packed4,
    lut: &Lut,
    acts: &Activations,
    r: usize,
    first: usize,
) -> [f32; M] {
    let rows = Rows::new(p, lut, acts, r, first);
    split_row::<M, K>(p, acts, &rows, RowStart::of(p, r), first)
}

/// [`row_dots_split`] for one activation row and the consecutive weight rows from `r0`
/// (`dst`: their outputs), each row's block start stepped from the last.
///
/// # Safety
/// As [`row_dots_split`], for rows `r0..r0 + dst.len()` and activation row 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn run_dots_split<const K: u8>(
    p: &Packed4,
    lut: &Lut,
    acts: &Activations,
    r0: usize,
    dst: &mut [f32],
) {
    let mut rows = Rows::<1>::new(p, lut, acts, r0, 0);
    let mut at = RowStart::of(p, r0);
    if p.block == PAIR && p.block < p.rows * p.cols {
        let mut twos = dst.chunks_exact_mut(2);
        for d in &mut twos {
            d.copy_from_slice(&single_pair_rows::<2, K>(p, acts, &rows, at));
            rows.bytes = rows.bytes.add(p.cols);
            at = at.next(p).next(p);
        }
        for d in twos.into_remainder() {
            *d = single_pair_rows::<1, K>(p, acts, &rows, at)[0];
        }
        return;
    }
    if whole_two_pair_blocks(p) {
        let mut twos = dst.chunks_exact_mut(2);
        for d in &mut twos {
            let second = at.next(p);
            d.copy_from_slice(&two_pair_rows::<2, K>(p, &rows, [at, second]));
            rows.bytes = rows.bytes.add(p.cols);
            at = second.next(p);
        }
        for d in twos.into_remainder() {
            *d = two_pair_rows::<1, K>(p, &rows, [at])[0];
        }
        return;
    }
    for d in dst.iter_mut() {
        *d = split_row::<1, K>(p, acts, &rows, at, 0)[0];
        rows.bytes = rows.bytes.add(p.cols / 2);
        at = at.next(p);
    }
}

/// One weight row (`rows.bytes`) against `M` activation rows from `first`.
///
/// # Safety
/// As [`row_dots_split`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[inline]
unsafe fn split_row<const M: usize, const K: u8>(
    p: &Packed4,
    acts: &Activations,
    rows: &Rows<M>,
    at: RowStart,
    first: usize,
) -> [f32; M] {
    use std::arch::x86_64::*;
    if p.block == PAIR && p.block < p.rows * p.cols {
        return single_pair_blocks::<M, K>(p, acts, rows, at, first);
    }
    walk_pairs::<M>(p, acts, at, first, |j0, end, even, odd| {
        let mut both = [_mm512_setzero_ps(); M];
        let mut j = j0;
        while j + 2 <= end {
            two_pairs_step::<M, K>(rows, j, &mut both);
            j += 2;
        }
        for i in 0..M {
            (even[i], odd[i]) = halves(both[i]);
        }
        if j < end {
            pair_step::<M, K>(rows, j, even);
        }
    })
}

/// The low and high 256 bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[inline]
fn halves(v: std::arch::x86_64::__m512) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    (_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))))
}

/// [`split_row`] where every block is one pair (and rows start on block boundaries, as
/// whole pairs do): what `walk_pairs` does for such blocks (each pair's scaled sums,
/// plus zero for its empty odd accumulator, times the block scale into the total, in
/// block order), two blocks per 512-bit step.
///
/// # Safety
/// As [`row_dots_split`]; `p.block == 64`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[inline]
unsafe fn single_pair_blocks<const M: usize, const K: u8>(
    p: &Packed4,
    acts: &Activations,
    rows: &Rows<M>,
    at: RowStart,
    first: usize,
) -> [f32; M] {
    use std::arch::x86_64::*;
    let row_pairs = p.cols / PAIR;
    let mut total = [_mm256_setzero_ps(); M];
    let mut extra = [0.0f32; M];
    let zero = _mm256_setzero_ps();
    let mut add_block = |b: usize, j: usize, sums: [__m256; M], total: &mut [__m256; M]| {
        let scale = _mm256_set1_ps(*p.scales.get_unchecked(b));
        for i in 0..M {
            total[i] = _mm256_fmadd_ps(_mm256_add_ps(sums[i], zero), scale, total[i]);
        }
        if let Some(o) = &p.offsets {
            let o = *o.get_unchecked(b);
            for (i, e) in extra.iter_mut().enumerate() {
                *e += o * acts.sum(first + i, j * PAIR, (j + 1) * PAIR);
            }
        }
    };
    let mut j = 0;
    while j + 2 <= row_pairs {
        let mut both = [_mm512_setzero_ps(); M];
        two_pairs_step::<M, K>(rows, j, &mut both);
        let split: [(__m256, __m256); M] = std::array::from_fn(|i| halves(both[i]));
        add_block(at.block + j, j, std::array::from_fn(|i| split[i].0), &mut total);
        add_block(at.block + j + 1, j + 1, std::array::from_fn(|i| split[i].1), &mut total);
        j += 2;
    }
    if j < row_pairs {
        let mut sums = [zero; M];
        pair_step::<M, K>(rows, j, &mut sums);
        add_block(at.block + j, j, sums, &mut total);
    }
    std::array::from_fn(|i| hsum(total[i]) + extra[i])
}

/// Whether [`two_pair_rows`] takes `p`: blocks of two pairs, more than one, without
/// offsets.
#[cfg(target_arch = "x86_64")]
fn whole_two_pair_blocks(p: &Packed4) -> bool {
    p.block == 2 * PAIR && p.block < p.rows * p.cols && p.offsets.is_none()
}

/// One activation row against `R` consecutive weight rows from `rows.bytes` (starting at
/// `at`) where every block is two pairs (int4-block's default of 128 values) and there
/// are no offsets: what `walk_pairs` does for such blocks (a row that starts in a block's
/// second pair begins with that pair alone, one that ends in a block's first pair ends
/// with it; each piece's even plus odd sums times the block scale into the total, in
/// block order), with one 512-bit step a whole block, the rows' steps interleaved. Each
/// row's sums take the same operations in the same order, so the same bits.
///
/// Why: at 576 values a row is 4.5 blocks, and the walk's per-piece work (zeroed halves,
/// the piece's bounds, the offsets check) was about as many instructions as the products
/// (one Xeon core, 1536 × 576 from its caches: 39.5 µs); without it, 33 µs; and each row
/// ends in a chain of dependent additions (its total's horizontal sum) that then held a
/// third of a profile's samples, which a second row's work overlaps: 31.7 µs. Several
/// activation rows (small batches) keep the walk.
///
/// # Safety
/// As [`row_dots_split`] for the `R` rows; `p.block == 128`, more than one block, no
/// offsets.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[inline]
unsafe fn two_pair_rows<const R: usize, const K: u8>(
    p: &Packed4,
    rows: &Rows<1>,
    at: [RowStart; R],
) -> [f32; R] {
    use std::arch::x86_64::*;
    let row_pairs = p.cols / PAIR;
    let each: [Rows<1>; R] = std::array::from_fn(|t| Rows { bytes: rows.bytes.add(t * p.cols / 2), ..*rows });
    let zero = _mm256_setzero_ps();
    let mut total = [zero; R];
    let mut block: [usize; R] = std::array::from_fn(|t| at[t].block);
    let mut pair = [0usize; R];
    // One pair alone (the even sums; the odd ones are zero) into a row's total.
    let lone_pair = |t: usize, j: usize, b: usize, total: &mut __m256| {
        let mut even = [zero];
        pair_step::<1, K>(&each[t], j, &mut even);
        *total =
            _mm256_fmadd_ps(_mm256_add_ps(even[0], zero), _mm256_set1_ps(*p.scales.get_unchecked(b)), *total);
    };
    for t in 0..R {
        if at[t].left == 1 && row_pairs > 0 {
            lone_pair(t, 0, block[t], &mut total[t]);
            (block[t], pair[t]) = (block[t] + 1, 1);
        }
    }
    loop {
        let mut stepped = false;
        for t in 0..R {
            if pair[t] + 2 <= row_pairs {
                let mut both = [_mm512_setzero_ps()];
                two_pairs_step::<1, K>(&each[t], pair[t], &mut both);
                let (even, odd) = halves(both[0]);
                let scale = _mm256_set1_ps(*p.scales.get_unchecked(block[t]));
                total[t] = _mm256_fmadd_ps(_mm256_add_ps(even, odd), scale, total[t]);
                (block[t], pair[t], stepped) = (block[t] + 1, pair[t] + 2, true);
            }
        }
        if !stepped {
            break;
        }
    }
    for t in 0..R {
        if pair[t] < row_pairs {
            lone_pair(t, pair[t], block[t], &mut total[t]);
        }
    }
    // The walk adds each row's offset term, zero here: kept, for the same bits (-0 + 0).
    std::array::from_fn(|t| hsum(total[t]) + 0.0)
}

/// [`single_pair_blocks`] for `R` consecutive weight rows from `rows.bytes` (the first
/// starting at `at`) against activation row 0, their steps interleaved: each row's sums
/// take the same operations in the same order, so the same bits.
///
/// Why: a row's block scales go into one total in block order, two dependent
/// multiply-adds per 512-bit step. Once NF4's codes took 16-bit products, that chain
/// held most of a profile's samples; two rows' chains overlap. NF4 GEMVs on two threads
/// of the Xeon (best of 30 calls, each shape rotated through more copies than fit in L2):
/// 1536 × 576 25.3 → 21.7 µs, 576 × 576 10.3 → 9.2 µs, 192 × 576 4.7 → 4.1 µs; 576 × 1536
/// (longer rows) unchanged at 21 µs.
///
/// # Safety
/// As [`row_dots_split`] for the `R` rows; `p.block == 64`, more than one block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[inline]
unsafe fn single_pair_rows<const R: usize, const K: u8>(
    p: &Packed4,
    acts: &Activations,
    rows: &Rows<1>,
    at: RowStart,
) -> [f32; R] {
    use std::arch::x86_64::*;
    let row_pairs = p.cols / PAIR;
    let each: [Rows<1>; R] = std::array::from_fn(|t| Rows { bytes: rows.bytes.add(t * p.cols / 2), ..*rows });
    let mut total = [_mm256_setzero_ps(); R];
    let mut extra = [0.0f32; R];
    let zero = _mm256_setzero_ps();
    let add_block = |t: usize, j: usize, sums: __m256, total: &mut __m256, extra: &mut f32| {
        let b = at.block + t * row_pairs + j;
        *total =
            _mm256_fmadd_ps(_mm256_add_ps(sums, zero), _mm256_set1_ps(*p.scales.get_unchecked(b)), *total);
        if let Some(o) = &p.offsets {
            *extra += *o.get_unchecked(b) * acts.sum(0, j * PAIR, (j + 1) * PAIR);
        }
    };
    let mut j = 0;
    while j + 2 <= row_pairs {
        for t in 0..R {
            let mut both = [_mm512_setzero_ps()];
            two_pairs_step::<1, K>(&each[t], j, &mut both);
            let (first, second) = halves(both[0]);
            add_block(t, j, first, &mut total[t], &mut extra[t]);
            add_block(t, j + 1, second, &mut total[t], &mut extra[t]);
        }
        j += 2;
    }
    if j < row_pairs {
        for t in 0..R {
            let mut sums = [zero];
            pair_step::<1, K>(&each[t], j, &mut sums);
            add_block(t, j, sums[0], &mut total[t], &mut extra[t]);
        }
    }
    std::array::from_fn(|t| hsum(total[t]) + extra[t])
}

/// Where one row's steps read: its packed weight row; each activation row's split
/// entries, lane starts and scales; and for [`LOOKUP`] the table's 16-bit codes twice
/// over (`Lut::words`).
#[derive(Clone, Copy)]
struct Rows<const M: usize> {
    bytes: *const u8,
    xs: [*const u8; M],
    starts: [*const i32; M],
    scales: [*const f32; M],
    table: std::arch::x86_64::__m512i,
}

impl<const M: usize> Rows<M> {
    /// Row `r` against activation rows `first..first + M`.
    ///
    /// # Safety
    /// AVX-512 F; the rows exist.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn new(p: &Packed4, lut: &Lut, acts: &Activations, r: usize, first: usize) -> Rows<M> {
        use std::arch::x86_64::*;
        Rows {
            bytes: p.bytes.as_ptr().add(r * p.cols / 2),
            xs: std::array::from_fn(|i| acts.split_at(first + i, 0)),
            starts: std::array::from_fn(|i| acts.lane_starts_at(first + i, 0)),
            scales: std::array::from_fn(|i| acts.scales_at(first + i, 0, 0)),
            table: _mm512_loadu_si512(lut.words.as_ptr() as *const __m512i),
        }
    }
}

/// Pair `j` of a row: the lane sums times their chunk's scale, added to `acc`.
///
/// # Safety
/// As [`row_dots_split`]; pair `j` lies in the row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[inline]
unsafe fn pair_step<const M: usize, const K: u8>(
    rows: &Rows<M>,
    j: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) {
    use std::arch::x86_64::*;
    let mut raw = _mm256_loadu_si256(rows.bytes.add(32 * j) as *const __m256i);
    if K == LOOKUP {
        let codes = lookup_words_256(raw, _mm512_castsi512_si256(rows.table));
        for (i, acc) in acc.iter_mut().enumerate() {
            // The runs sit 64 bytes apart; this pair's words are their first halves.
            let x = rows.xs[i].add(SPLIT_ENTRY * j) as *const __m256i;
            let words: [__m256i; 4] = std::array::from_fn(|r| _mm256_loadu_si256(x.add(2 * r)));
            let sum = codes
                .iter()
                .zip(&words)
                .fold(_mm256_setzero_si256(), |s, (&c, &x)| _mm256_dpwssd_epi32(s, c, x));
            let scale = _mm256_loadu_ps(rows.scales[i].add(8 * j));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
        }
        return;
    }
    if K == SIGNED {
        raw = _mm256_xor_si256(raw, _mm256_set1_epi8(0x88u8 as i8));
    }
    let mask = _mm256_set1_epi8(0x0F);
    let even = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    let odd = _mm256_and_si256(raw, mask);
    for (i, acc) in acc.iter_mut().enumerate() {
        // The entry's runs sit 64 bytes apart; this pair's are their first halves.
        let x = rows.xs[i].add(SPLIT_ENTRY * j) as *const __m256i;
        let (xh_even, xl_even, xh_odd, xl_odd) = (
            _mm256_loadu_si256(x),
            _mm256_loadu_si256(x.add(2)),
            _mm256_loadu_si256(x.add(4)),
            _mm256_loadu_si256(x.add(6)),
        );
        let zero = _mm256_setzero_si256();
        let start = if K == UNSIGNED {
            zero
        } else {
            _mm256_loadu_si256(rows.starts[i].add(8 * j) as *const __m256i)
        };
        // Nibbles `u` times the signed high byte, and the unsigned low byte times `u`.
        let high = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, even, xh_even), odd, xh_odd);
        let low = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(start, xl_even, even), xl_odd, odd);
        let sum = _mm256_add_epi32(_mm256_slli_epi32(high, 8), low);
        let scale = _mm256_loadu_ps(rows.scales[i].add(8 * j));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
    }
}

/// The 16-bit codes of one pair's 32 packed bytes (one chunk per 128-bit lane) in the
/// order of `Layout::LookupWords`' runs: the bytes 0–7 and 8–15 of each lane widened to
/// words, their high nibbles (a shift) and low nibbles (the low four bits, which a 256-bit
/// `vpermw` reads) looked up in `table`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
#[inline]
fn lookup_words_256(
    raw: std::arch::x86_64::__m256i,
    table: std::arch::x86_64::__m256i,
) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_si256();
    let (first, second) = (_mm256_unpacklo_epi8(raw, zero), _mm256_unpackhi_epi8(raw, zero));
    let code = |index| _mm256_permutexvar_epi16(index, table);
    [code(_mm256_srli_epi16::<4>(first)), code(first), code(_mm256_srli_epi16::<4>(second)), code(second)]
}

/// [`lookup_words_256`] for two pairs: with 32 words a `vpermw` reads five index bits,
/// which the doubled table (`Lut::words`) answers for the low nibble.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
#[inline]
fn lookup_words_512(
    raw: std::arch::x86_64::__m512i,
    table: std::arch::x86_64::__m512i,
) -> [std::arch::x86_64::__m512i; 4] {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_si512();
    let (first, second) = (_mm512_unpacklo_epi8(raw, zero), _mm512_unpackhi_epi8(raw, zero));
    let code = |index| _mm512_permutexvar_epi16(index, table);
    [code(_mm512_srli_epi16::<4>(first)), code(first), code(_mm512_srli_epi16::<4>(second)), code(second)]
}

/// Pairs `j` and `j + 1` of a row in one 512-bit step: [`pair_step`] of each, the first
/// in the low half of `acc` and the second in the high half.
///
/// # Safety
/// As [`row_dots_split`]; pairs `j` and `j + 1` lie in the row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[inline]
unsafe fn two_pairs_step<const M: usize, const K: u8>(
    rows: &Rows<M>,
    j: usize,
    acc: &mut [std::arch::x86_64::__m512; M],
) {
    use std::arch::x86_64::*;
    let mut raw = _mm512_loadu_si512(rows.bytes.add(32 * j) as *const __m512i);
    _mm_prefetch::<_MM_HINT_T0>(rows.bytes.wrapping_add(32 * j + PREFETCH_AHEAD) as *const i8);
    if K == LOOKUP {
        let codes = lookup_words_512(raw, rows.table);
        for (i, acc) in acc.iter_mut().enumerate() {
            // Each 64-byte run holds this pair's 16 words and then the next pair's.
            let x = rows.xs[i].add(SPLIT_ENTRY * j) as *const __m512i;
            let words: [__m512i; 4] = std::array::from_fn(|r| _mm512_loadu_si512(x.add(r)));
            let sum = codes
                .iter()
                .zip(&words)
                .fold(_mm512_setzero_si512(), |s, (&c, &x)| _mm512_dpwssd_epi32(s, c, x));
            let scale = _mm512_loadu_ps(rows.scales[i].add(8 * j));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *acc);
        }
        return;
    }
    if K == SIGNED {
        raw = _mm512_xor_si512(raw, _mm512_set1_epi8(0x88u8 as i8));
    }
    let mask = _mm512_set1_epi8(0x0F);
    let even = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
    let odd = _mm512_and_si512(raw, mask);
    for (i, acc) in acc.iter_mut().enumerate() {
        // Each 64-byte run holds this pair's 32 bytes and then the next pair's.
        let x = rows.xs[i].add(SPLIT_ENTRY * j) as *const __m512i;
        let (xh_even, xl_even, xh_odd, xl_odd) = (
            _mm512_loadu_si512(x),
            _mm512_loadu_si512(x.add(1)),
            _mm512_loadu_si512(x.add(2)),
            _mm512_loadu_si512(x.add(3)),
        );
        let zero = _mm512_setzero_si512();
        let start = if K == UNSIGNED {
            zero
        } else {
            _mm512_loadu_si512(rows.starts[i].add(8 * j) as *const __m512i)
        };
        let high = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, even, xh_even), odd, xh_odd);
        let low = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, xl_even, even), xl_odd, odd);
        let sum = _mm512_add_epi32(_mm512_slli_epi32::<8>(high), low);
        let scale = _mm512_loadu_ps(rows.scales[i].add(8 * j));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *acc);
    }
}
