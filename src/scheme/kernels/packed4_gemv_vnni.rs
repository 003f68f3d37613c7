//! The 4-bit GEMV's byte-product step for int4-block's integer tables on AVX-512 VNNI:
//! the same exact integer lane sums as the 16-bit kernel ([`super::packed4_gemv`]) in
//! fewer instructions, so the same bits.
//!
//! Why: on the Intel cores this runs on, the 16-bit kernel's shifts and `vpmaddwd`
//! products only issue on two of the three vector ports: a chunk pair (64 weights) costs
//! 13 such instructions, and one core decoded about 9 GB/s of packed weights where its
//! cache delivers 20–60. Here a pair costs 8 of them:
//! - one shift and two masks leave the 32 high nibbles (even values) and 32 low nibbles
//!   (odd values) as bytes, after an exclusive or with `0x88` for the signed table (it maps
//!   `t = u − 8` for two's-complement nibbles to `u ^ 8`, which the lane start corrects);
//! - each 16-bit activation code `x` is held as a signed high byte and an unsigned low
//!   byte, `x = 256·hi + lo` ([`super::packed4_gemv::split_slot`]), and `vpdpbusd`
//!   multiplies four byte pairs per 32-bit lane: nibbles × high bytes and low bytes ×
//!   nibbles, two instructions each for the even and odd values;
//! - the lane sum is `256·Σ u·hi + Σ lo·u + start`, with `start = −8·Σ x` for the
//!   signed table.
//!
//! Lane `j` sums values `8j..8j + 8` (packed bytes `4j..4j + 4`), the lanes the 16-bit
//! kernel's shift layout sums, and each sum is exact (at most `8·15·32767` before the
//! start), so it is the same integer; conversion, scaling and the block walk
//! ([`super::packed4_gemv::walk_pairs`]) are shared. Tests compare the two bit for bit.

use super::packed4_gemv::{walk_pairs, Activations, RowStart, PREFETCH_BYTES, SPLIT_ENTRY};
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

/// `dst[i] = x[first + i] · W[r]` for `M` activation rows held in a byte layout
/// (`Layout::SignedBytes` when `SIGNED`, else `Layout::UnsignedBytes`).
///
/// Two consecutive pairs of a block piece go through 512-bit registers at once, the
/// first in the low half (the piece's even accumulator) and the second in the high half
/// (its odd one); a piece's odd last pair goes through 256 bits into the even half. So
/// every accumulator takes the same FMAs in the same order as the 256-bit kernel, with
/// half the instructions: at one pair per step the loop was bound by instructions
/// (about 35 a pair), not by its two multiply ports.
///
/// # Safety
/// [`has_vnni`] must hold, and what `packed4_gemv::row_dots` requires of a whole-pairs
/// weight, with `acts` in the byte layout of `SIGNED`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn row_dots_split<const M: usize, const SIGNED: bool>(
    p: &Packed4,
    acts: &Activations,
    r: usize,
    first: usize,
) -> [f32; M] {
    let rows = Rows {
        bytes: p.bytes.as_ptr().add(r * p.cols / 2),
        xs: std::array::from_fn(|i| acts.split_at(first + i, 0)),
        starts: std::array::from_fn(|i| acts.lane_starts_at(first + i, 0)),
        scales: std::array::from_fn(|i| acts.scales_at(first + i, 0, 0)),
    };
    split_row::<M, SIGNED>(p, acts, &rows, RowStart::of(p, r), first)
}

/// [`row_dots_split`] for one activation row and the consecutive weight rows from `r0`
/// (`dst`: their outputs), each row's block start stepped from the last.
///
/// # Safety
/// As [`row_dots_split`], for rows `r0..r0 + dst.len()` and activation row 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn run_dots_split<const SIGNED: bool>(
    p: &Packed4,
    acts: &Activations,
    r0: usize,
    dst: &mut [f32],
) {
    let mut rows = Rows {
        bytes: p.bytes.as_ptr().add(r0 * p.cols / 2),
        xs: [acts.split_at(0, 0)],
        starts: [acts.lane_starts_at(0, 0)],
        scales: [acts.scales_at(0, 0, 0)],
    };
    let mut at = RowStart::of(p, r0);
    for d in dst.iter_mut() {
        *d = split_row::<1, SIGNED>(p, acts, &rows, at, 0)[0];
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
unsafe fn split_row<const M: usize, const SIGNED: bool>(
    p: &Packed4,
    acts: &Activations,
    rows: &Rows<M>,
    at: RowStart,
    first: usize,
) -> [f32; M] {
    use std::arch::x86_64::*;
    walk_pairs::<M>(p, acts, at, first, |j0, end, even, odd| {
        let mut both = [_mm512_setzero_ps(); M];
        let mut j = j0;
        while j + 2 <= end {
            two_pairs_step::<M, SIGNED>(rows, j, &mut both);
            j += 2;
        }
        for i in 0..M {
            even[i] = _mm512_castps512_ps256(both[i]);
            odd[i] = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(both[i])));
        }
        if j < end {
            pair_step::<M, SIGNED>(rows, j, even);
        }
    })
}

/// Where one row's steps read: its packed weight row, and each activation row's split
/// entries, lane starts and scales.
struct Rows<const M: usize> {
    bytes: *const u8,
    xs: [*const u8; M],
    starts: [*const i32; M],
    scales: [*const f32; M],
}

/// Pair `j` of a row: the lane sums times their chunk's scale, added to `acc`.
///
/// # Safety
/// As [`row_dots_split`]; pair `j` lies in the row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[inline]
unsafe fn pair_step<const M: usize, const SIGNED: bool>(
    rows: &Rows<M>,
    j: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) {
    use std::arch::x86_64::*;
    let mut raw = _mm256_loadu_si256(rows.bytes.add(32 * j) as *const __m256i);
    if SIGNED {
        raw = _mm256_xor_si256(raw, _mm256_set1_epi8(0x88u8 as i8));
    }
    let mask = _mm256_set1_epi8(0x0F);
    let even = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    let odd = _mm256_and_si256(raw, mask);
    for (i, acc) in acc.iter_mut().enumerate() {
        // The entry's runs sit 64 bytes apart; this pair's are their first halves.
        let x = rows.xs[i].add(SPLIT_ENTRY * j) as *const __m256i;
        let zero = _mm256_setzero_si256();
        let high = _mm256_dpbusd_epi32(
            _mm256_dpbusd_epi32(zero, even, _mm256_loadu_si256(x)),
            odd,
            _mm256_loadu_si256(x.add(4)),
        );
        let start =
            if SIGNED { _mm256_loadu_si256(rows.starts[i].add(8 * j) as *const __m256i) } else { zero };
        let low = _mm256_dpbusd_epi32(
            _mm256_dpbusd_epi32(start, _mm256_loadu_si256(x.add(2)), even),
            _mm256_loadu_si256(x.add(6)),
            odd,
        );
        let sum = _mm256_add_epi32(_mm256_slli_epi32(high, 8), low);
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
unsafe fn two_pairs_step<const M: usize, const SIGNED: bool>(
    rows: &Rows<M>,
    j: usize,
    acc: &mut [std::arch::x86_64::__m512; M],
) {
    use std::arch::x86_64::*;
    let mut raw = _mm512_loadu_si512(rows.bytes.add(32 * j) as *const __m512i);
    _mm_prefetch::<_MM_HINT_T0>(rows.bytes.wrapping_add(32 * j + PREFETCH_BYTES) as *const i8);
    if SIGNED {
        raw = _mm512_xor_si512(raw, _mm512_set1_epi8(0x88u8 as i8));
    }
    let mask = _mm512_set1_epi8(0x0F);
    let even = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
    let odd = _mm512_and_si512(raw, mask);
    for (i, acc) in acc.iter_mut().enumerate() {
        // Each 64-byte run holds this pair's 32 bytes and then the next pair's.
        let x = rows.xs[i].add(SPLIT_ENTRY * j) as *const __m512i;
        let zero = _mm512_setzero_si512();
        let high = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(zero, even, _mm512_loadu_si512(x)),
            odd,
            _mm512_loadu_si512(x.add(2)),
        );
        let start =
            if SIGNED { _mm512_loadu_si512(rows.starts[i].add(8 * j) as *const __m512i) } else { zero };
        let low = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(start, _mm512_loadu_si512(x.add(1)), even),
            _mm512_loadu_si512(x.add(3)),
            odd,
        );
        let sum = _mm512_add_epi32(_mm512_slli_epi32::<8>(high), low);
        let scale = _mm512_loadu_ps(rows.scales[i].add(8 * j));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *acc);
    }
}
