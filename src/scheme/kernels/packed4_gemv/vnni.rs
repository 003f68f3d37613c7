//! The 4-bit GEMV's byte-product kernel on AVX-512 VNNI: the same exact integer lane
//! sums as the 16-bit kernel (the parent module, [`super`]) in fewer instructions, so the same
//! bits, for every table the 16-bit kernel takes on weights of whole chunk pairs.
//!
//! Why: the 16-bit kernel decodes a chunk pair (64 weights) into four vectors of 16-bit
//! codes and multiplies them with `vpmaddwd`; on the Xeon this runs on, one core decoded
//! about 9 GB/s of packed weights where its caches deliver 20–60, bound by instructions
//! (about 35 a pair with the loop's bookkeeping). Here `vpdpbusd` multiplies four byte
//! pairs per 32-bit lane, and 512-bit registers take two pairs per step:
//! - int4-block's integer tables (`Layout::SignedBytes`, `Layout::UnsignedBytes`): one
//!   shift and two masks leave the high nibbles (even values) and low nibbles (odd values)
//!   as bytes `u`, after an exclusive or with `0x88` for the signed table (it maps the
//!   two's-complement `t = u − 8` to `u ^ 8`, which each lane's start corrects). Each
//!   16-bit activation code is held as a signed high byte and an unsigned low byte,
//!   `x = 256·hi + lo`, and a lane sums `256·Σ u·hi + Σ lo·u + start`.
//! - Any other table (`Layout::LookupBytes`: NF4, FP4, k-means; 13-bit codes `|c| < 4096`
//!   against activation codes `|x| ≤ 8191`): the codes biased by 4096 are positive, so
//!   their high byte (0..32) and low byte are unsigned, looked up with `vpshufb`; the
//!   activation code is held as two signed bytes, `x = 256·xh + xl` with `xl` in −128..128;
//!   a lane sums `65536·Σ ch·xh + 256·Σ (ch·xl + cl·xh) + Σ cl·xl − 4096·Σ x` in eight
//!   `vpdpbusd` per pair. Each chunk's packed bytes are first put in the order of the
//!   16-bit kernel's lanes ([`super::lookup_byte_order`]).
//!
//! So each lane sums the values the 16-bit kernel's lane sums, every sum is exact (below
//! 2³¹ in magnitude), and conversion, scaling and the block walk
//! (`walk_pairs` in the parent) are the 16-bit kernel's. The tests compare the two bit
//! for bit on every layout, block size and row count.

use super::{hsum, walk_pairs, Activations, Lut, RowStart, LOOKUP_ORDER, PAIR, SPLIT_ENTRY};
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
/// `Layout::LookupBytes`.
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

/// Where one row's steps read: its packed weight row; each activation row's split
/// entries, lane starts and scales; and for [`LOOKUP`] the biased code bytes and the
/// chunk byte order, in every 128-bit lane.
struct Rows<const M: usize> {
    bytes: *const u8,
    xs: [*const u8; M],
    starts: [*const i32; M],
    scales: [*const f32; M],
    code_high: std::arch::x86_64::__m512i,
    code_low: std::arch::x86_64::__m512i,
    order: std::arch::x86_64::__m512i,
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
        let lanes =
            |bytes: &[u8; 16]| _mm512_broadcast_i32x4(_mm_loadu_si128(bytes.as_ptr() as *const __m128i));
        Rows {
            bytes: p.bytes.as_ptr().add(r * p.cols / 2),
            xs: std::array::from_fn(|i| acts.split_at(first + i, 0)),
            starts: std::array::from_fn(|i| acts.lane_starts_at(first + i, 0)),
            scales: std::array::from_fn(|i| acts.scales_at(first + i, 0, 0)),
            code_high: lanes(&lut.biased[0]),
            code_low: lanes(&lut.biased[1]),
            order: lanes(&LOOKUP_ORDER),
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
        raw = _mm256_shuffle_epi8(raw, _mm512_castsi512_si256(rows.order));
    } else if K == SIGNED {
        raw = _mm256_xor_si256(raw, _mm256_set1_epi8(0x88u8 as i8));
    }
    let mask = _mm256_set1_epi8(0x0F);
    let even = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    let odd = _mm256_and_si256(raw, mask);
    let (high_table, low_table) =
        (_mm512_castsi512_si256(rows.code_high), _mm512_castsi512_si256(rows.code_low));
    let (even_high, even_low, odd_high, odd_low) = if K == LOOKUP {
        (
            _mm256_shuffle_epi8(high_table, even),
            _mm256_shuffle_epi8(low_table, even),
            _mm256_shuffle_epi8(high_table, odd),
            _mm256_shuffle_epi8(low_table, odd),
        )
    } else {
        (even, even, odd, odd)
    };
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
        let sum = if K == LOOKUP {
            // Biased codes `256·ch + cl` (both unsigned) times `256·xh + xl` (both signed).
            let hh = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, even_high, xh_even), odd_high, xh_odd);
            let mid = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, even_high, xl_even), even_low, xh_even);
            let mid = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(mid, odd_high, xl_odd), odd_low, xh_odd);
            let ll = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(start, even_low, xl_even), odd_low, xl_odd);
            _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(_mm256_slli_epi32(hh, 8), mid), 8), ll)
        } else {
            // Nibbles `u` times the signed high byte, and the unsigned low byte times `u`.
            let high = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, even, xh_even), odd, xh_odd);
            let low = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(start, xl_even, even), xl_odd, odd);
            _mm256_add_epi32(_mm256_slli_epi32(high, 8), low)
        };
        let scale = _mm256_loadu_ps(rows.scales[i].add(8 * j));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
    }
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
        raw = _mm512_shuffle_epi8(raw, rows.order);
    } else if K == SIGNED {
        raw = _mm512_xor_si512(raw, _mm512_set1_epi8(0x88u8 as i8));
    }
    let mask = _mm512_set1_epi8(0x0F);
    let even = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
    let odd = _mm512_and_si512(raw, mask);
    let (even_high, even_low, odd_high, odd_low) = if K == LOOKUP {
        (
            _mm512_shuffle_epi8(rows.code_high, even),
            _mm512_shuffle_epi8(rows.code_low, even),
            _mm512_shuffle_epi8(rows.code_high, odd),
            _mm512_shuffle_epi8(rows.code_low, odd),
        )
    } else {
        (even, even, odd, odd)
    };
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
        let sum = if K == LOOKUP {
            let hh = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, even_high, xh_even), odd_high, xh_odd);
            let mid = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, even_high, xl_even), even_low, xh_even);
            let mid = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(mid, odd_high, xl_odd), odd_low, xh_odd);
            let ll = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, even_low, xl_even), odd_low, xl_odd);
            _mm512_add_epi32(_mm512_slli_epi32::<8>(_mm512_add_epi32(_mm512_slli_epi32::<8>(hh), mid)), ll)
        } else {
            let high = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, even, xh_even), odd, xh_odd);
            let low = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, xl_even, even), xl_odd, odd);
            _mm512_add_epi32(_mm512_slli_epi32::<8>(high), low)
        };
        let scale = _mm512_loadu_ps(rows.scales[i].add(8 * j));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *acc);
    }
}
