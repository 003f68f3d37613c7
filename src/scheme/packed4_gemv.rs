//! The fast fused GEMV of the 4-bit block format ([`super::packed4`]): activations in
//! 16-bit fixed point, codes looked up as 16-bit integers, exact integer dot products.
//!
//! Why: decoding every nibble to f32 and multiplying with FMAs costs about three vector
//! instructions per 8 weights, so the f32 GEMV is compute-bound at 2–2.7 GB/s of packed
//! weights on the 2-core AVX2 machine this crate is developed on, where memory delivers
//! about 15 GB/s. Here 32 weights cost about 11 instructions: one 16-byte load broadcast
//! to both lanes, a shift and a mask that leave the high nibbles (even values) in one lane
//! and the low nibbles (odd values) in the other, two `vpshufb` lookups of the low and high
//! bytes of the 16-bit code table, two unpacks into sixteen 16-bit codes each, two
//! `vpmaddwd` against the activations, an add, a conversion to f32 and one FMA by the
//! chunk's activation scale. The block scale (and offset) is applied once per block.
//!
//! Numerics (what changes against the exact f32 path):
//! - Activations are quantized once per call, per chunk of [`CHUNK`] values of each row:
//!   `d = absmax / qx`, `q = round_half_even(x / d)` with `qx` = 32767 (integer tables) or
//!   8191 (other tables), so `|x − d·q| ≤ d/2`: a relative step of 1/65534 or 1/16382 of
//!   the chunk's largest magnitude, far below the bf16 rounding of int4-block's scales.
//! - A table whose values are integers of magnitude ≤ 2048 (int4-block's signed and
//!   unsigned tables) is used exactly. Any other table (NF4, FP4, k-means centroids) is
//!   rounded to 13-bit fixed point `c·γ` with `γ = max|t| / 4095`, so `|t − c·γ| ≤ γ/2`.
//! - Offsets multiply the exact f32 sum of the activations over the block piece (f64
//!   prefix sums), not the quantized ones.
//! - The integer sums are exact: a chunk's sum is at most `32·2048·32767 < 2³¹` (integer
//!   tables) or `32·4095·8191` (fixed-point tables), and a `vpmaddwd` pair at most
//!   `2·2048·32767`; only their conversion to f32 and the float accumulation round.
//!
//! Hence for output `y = Σ_k w_k x_k` with `w_k = s_b·t_k + o_b`, the error against the
//! exact product is at most `Σ_k |s_b|·(|c_k·γ|·d_k/2 + |x_k|·|t_k − c_k·γ|)` plus f32
//! summation rounding; `testing::fixed_point_bound` computes it and the tests hold the
//! kernel to it. The exact f32 path stays available (`Packed4::exact_gemv`) and is what
//! runs without AVX2, for non-finite activations, and for shapes this path does not take.
//!
//! Shapes: every boundary between a row's block pieces must fall on a multiple of 16
//! values (`cols` a multiple of 16, and `block` a multiple of 16 or covering the whole
//! weight), so each piece is whole 32-value chunks plus at most one 16-value half at each
//! end. SmolLM2 (576, 1536), MiniLM (384, 1536) and the built-in models (256, 688) qualify.

use super::packed4::Packed4;

/// Activation values per chunk: one scale each, and the unit of the integer dot products.
pub const CHUNK: usize = 32;

/// The granularity of block boundaries this path handles: half a chunk (8 packed bytes).
const HALF: usize = 16;

/// Largest activation code with an exact integer table of magnitude ≤ [`MAX_INT_TABLE`].
const QX_INTEGER_TABLE: f32 = 32767.0;

/// Largest integer table value used as is: `32·2048·32767 < 2³¹`, so a chunk's sum fits.
const MAX_INT_TABLE: f32 = 2048.0;

/// Largest activation code with a fixed-point table.
const QX_FIXED_TABLE: f32 = 8191.0;

/// Largest fixed-point table code: `32·4095·8191 < 2³¹`.
const QT_FIXED: f32 = 4095.0;

/// The 16-entry code table as 16-bit integers `c` with `t ≈ c·step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedTable {
    /// The integer code of each nibble.
    pub codes: [i16; 16],
    /// The value of one code unit (`γ`; 1 for integer tables).
    pub step: f32,
    /// Largest activation code (`qx`).
    pub qx: f32,
}

impl FixedTable {
    /// The exact integer table when `table` holds small integers, else its 13-bit
    /// fixed-point rounding; `None` for a table with a non-finite value.
    pub fn new(table: &[f32; 16]) -> Option<FixedTable> {
        if table.iter().any(|t| !t.is_finite()) {
            return None;
        }
        let max = table.iter().fold(0.0f32, |m, t| m.max(t.abs()));
        if table.iter().all(|t| t.fract() == 0.0) && max <= MAX_INT_TABLE {
            let codes = table.map(|t| t as i16);
            return Some(FixedTable { codes, step: 1.0, qx: QX_INTEGER_TABLE });
        }
        let step = max / QT_FIXED;
        let codes = table.map(|t| (t / step).round_ties_even().clamp(-QT_FIXED, QT_FIXED) as i16);
        Some(FixedTable { codes, step, qx: QX_FIXED_TABLE })
    }

    /// The table value code `u` stands for here.
    pub fn value(&self, u: usize) -> f32 {
        self.codes[u] as f32 * self.step
    }
}

/// Whether `p`'s shape lets every block piece of a row split into 16-value halves (see the
/// module documentation), with the lengths the unchecked loads rely on.
pub fn shape_fits(p: &Packed4) -> bool {
    let n = p.rows * p.cols;
    let nb = n.div_ceil(p.block.max(1));
    p.cols > 0
        && p.cols.is_multiple_of(HALF)
        && p.block > 0
        && (p.block.is_multiple_of(HALF) || p.block >= n)
        && p.bytes.len() * 2 >= n
        && p.scales.len() >= nb
        && p.offsets.as_ref().is_none_or(|o| o.len() >= nb)
}

/// The activation rows of one call, quantized chunk by chunk and laid out in the order
/// the kernel produces codes.
pub struct Activations {
    /// Chunks per row (`cols / 32` rounded up).
    chunks: usize,
    /// `[rows, chunks, 32]` codes; within a chunk, value `p` sits at slot
    /// `16·(p / 16) + 8·(p % 2) + (p % 16) / 2` (even values of each half first).
    codes: Vec<i16>,
    /// `[rows, chunks]`: each chunk's activation step times the table step.
    scales: Vec<f32>,
    /// `[rows, cols / 16 + 1]` f64 prefix sums of each row over 16-value halves (for
    /// offsets; empty without them).
    prefix: Vec<f64>,
    /// `cols / 16 + 1`: the row stride of `prefix`.
    prefix_stride: usize,
}

/// The slot of value `p` (0..32) inside its chunk's codes.
pub fn slot(p: usize) -> usize {
    16 * (p / 16) + 8 * (p % 2) + (p % 16) / 2
}

impl Activations {
    /// Quantize `x` (`[m, cols]`, `cols` a multiple of 16) for `table`; `None` when a
    /// value is not finite (the exact path then runs).
    pub fn new(x: &[f32], m: usize, cols: usize, table: &FixedTable, sums: bool) -> Option<Activations> {
        if x.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let chunks = cols.div_ceil(CHUNK);
        let mut codes = vec![0i16; m * chunks * CHUNK];
        let mut scales = vec![0.0f32; m * chunks];
        #[cfg(target_arch = "x86_64")]
        if super::packed4::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { quantize_rows_avx2(x, cols, table, &mut codes, &mut scales) };
        } else {
            quantize_rows(x, cols, table, &mut codes, &mut scales);
        }
        #[cfg(not(target_arch = "x86_64"))]
        quantize_rows(x, cols, table, &mut codes, &mut scales);
        let prefix = if sums { prefix_sums(x, m, cols) } else { Vec::new() };
        Some(Activations { chunks, codes, scales, prefix, prefix_stride: cols / HALF + 1 })
    }

    /// `Σ x[row, k0..k1]` in f32 from the prefix sums (`k0`, `k1` multiples of 16).
    fn sum(&self, row: usize, k0: usize, k1: usize) -> f32 {
        let p = &self.prefix[row * self.prefix_stride..(row + 1) * self.prefix_stride];
        (p[k1 / HALF] - p[k0 / HALF]) as f32
    }

    /// Value `k` of row `row` as the kernel sees it: `d·q` (tests).
    pub fn value(&self, row: usize, k: usize, step: f32) -> f32 {
        let at = row * self.chunks + k / CHUNK;
        self.codes[at * CHUNK + slot(k % CHUNK)] as f32 * self.scales[at] / step
    }
}

/// Quantize every chunk of every row of `x` into `codes` and `scales` (laid out as in
/// [`Activations`]).
#[inline(always)]
fn quantize_rows(x: &[f32], cols: usize, table: &FixedTable, codes: &mut [i16], scales: &mut [f32]) {
    let chunks = cols.div_ceil(CHUNK);
    for (r, row) in x.chunks_exact(cols).enumerate() {
        for (c, values) in row.chunks(CHUNK).enumerate() {
            let at = r * chunks + c;
            scales[at] = quantize_chunk(values, table, &mut codes[at * CHUNK..(at + 1) * CHUNK]);
        }
    }
}

/// [`quantize_rows`] compiled for AVX2, where rounding half to even is one instruction
/// (the baseline x86-64 target calls a library function per value).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_rows_avx2(
    x: &[f32],
    cols: usize,
    table: &FixedTable,
    codes: &mut [i16],
    scales: &mut [f32],
) {
    quantize_rows(x, cols, table, codes, scales)
}

/// Quantize one chunk into `out` (in kernel order, zeros past the chunk's end); returns
/// its scale times the table step.
#[inline(always)]
fn quantize_chunk(values: &[f32], table: &FixedTable, out: &mut [i16]) -> f32 {
    let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if absmax == 0.0 {
        return 0.0;
    }
    let d = absmax / table.qx;
    let inv = table.qx / absmax;
    for (p, &v) in values.iter().enumerate() {
        // |v·inv| ≤ qx up to rounding; the clamp keeps a rounding overshoot in range.
        out[slot(p)] = (v * inv).round_ties_even().clamp(-table.qx, table.qx) as i16;
    }
    d * table.step
}

/// f64 prefix sums of each row over 16-value halves: `[m, cols / 16 + 1]`.
fn prefix_sums(x: &[f32], m: usize, cols: usize) -> Vec<f64> {
    let stride = cols / HALF + 1;
    let mut prefix = vec![0.0f64; m * stride];
    for (r, row) in x.chunks_exact(cols).enumerate().take(m) {
        let p = &mut prefix[r * stride..(r + 1) * stride];
        for (h, half) in row.chunks_exact(HALF).enumerate() {
            p[h + 1] = p[h] + half.iter().map(|&v| v as f64).sum::<f64>();
        }
    }
    prefix
}

/// `dst[i] = x[first + i] · W[r]` for `M` activation rows on the fixed-point path.
///
/// # Safety
/// The CPU must have AVX2 and FMA, `shape_fits(p)` must hold, `acts` must come from
/// `Activations::new` with `p.cols` columns and `table`, with offsets' sums when `p` has
/// offsets, and rows `first..first + M` must exist in it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_dots<const M: usize>(
    p: &Packed4,
    table: &FixedTable,
    acts: &Activations,
    r: usize,
    first: usize,
) -> [f32; M] {
    use std::arch::x86_64::*;
    let (cols, start) = (p.cols, r * p.cols);
    let lut = Lut::new(table);
    let mut total = [_mm256_setzero_ps(); M];
    let mut extra = [0.0f32; M];
    let mut k0 = 0;
    // One division per row: the pieces then walk the blocks in order.
    let mut b = start / p.block;
    while k0 < cols {
        let k1 = ((b + 1) * p.block - start).min(cols);
        let mut acc = [_mm256_setzero_ps(); M];
        let mut k = k0;
        if k % CHUNK == HALF {
            // The piece starts in the second half of a chunk.
            half::<M>(p, &lut, acts, start + k, first, k / CHUNK, 1, &mut acc);
            k += HALF;
        }
        while k + CHUNK <= k1 {
            full::<M>(p, &lut, acts, start + k, first, k / CHUNK, &mut acc);
            k += CHUNK;
        }
        if k < k1 {
            // The piece ends in the first half of a chunk.
            half::<M>(p, &lut, acts, start + k, first, k / CHUNK, 0, &mut acc);
        }
        let scale = _mm256_set1_ps(*p.scales.get_unchecked(b));
        for i in 0..M {
            total[i] = _mm256_fmadd_ps(acc[i], scale, total[i]);
        }
        if let Some(o) = &p.offsets {
            let o = *o.get_unchecked(b);
            for (i, e) in extra.iter_mut().enumerate() {
                *e += o * acts.sum(first + i, k0, k1);
            }
        }
        k0 = k1;
        b += 1;
    }
    std::array::from_fn(|i| hsum(total[i]) + extra[i])
}

/// The code table split into the low and high bytes of its 16-bit codes, in both lanes,
/// and the constants of the nibble split.
#[cfg(target_arch = "x86_64")]
struct Lut {
    lo: std::arch::x86_64::__m256i,
    hi: std::arch::x86_64::__m256i,
    /// Shift counts: 4 in the low lane (high nibbles), 0 in the high lane (low nibbles).
    shift: std::arch::x86_64::__m256i,
    mask: std::arch::x86_64::__m256i,
}

#[cfg(target_arch = "x86_64")]
impl Lut {
    #[target_feature(enable = "avx2,fma")]
    fn new(table: &FixedTable) -> Lut {
        use std::arch::x86_64::*;
        let lo: [u8; 16] = std::array::from_fn(|u| table.codes[u] as u16 as u8);
        let hi: [u8; 16] = std::array::from_fn(|u| (table.codes[u] as u16 >> 8) as u8);
        // SAFETY: 16-byte reads of 16-byte arrays.
        let (lo, hi) = unsafe {
            (
                _mm256_broadcastsi128_si256(_mm_loadu_si128(lo.as_ptr() as *const __m128i)),
                _mm256_broadcastsi128_si256(_mm_loadu_si128(hi.as_ptr() as *const __m128i)),
            )
        };
        Lut { lo, hi, shift: _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0), mask: _mm256_set1_epi8(0x0F) }
    }
}

/// The 16-bit codes of the bytes in `raw` (the same bytes in both lanes): high nibbles
/// from the low lane, low nibbles from the high lane, so `(v0, v1)` hold the values of
/// bytes 0–7 and 8–15 as `[even values | odd values]`, the order of [`slot`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn decode(
    lut: &Lut,
    raw: std::arch::x86_64::__m256i,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    let nibbles = _mm256_and_si256(_mm256_srlv_epi32(raw, lut.shift), lut.mask);
    let lo = _mm256_shuffle_epi8(lut.lo, nibbles);
    let hi = _mm256_shuffle_epi8(lut.hi, nibbles);
    (_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi))
}

/// One whole chunk: 32 values from flattened index `a` (even) against chunk `c` of each
/// row, added to `acc` times the chunk's scale.
///
/// # Safety
/// As [`row_dots`]; values `a..a + 32` lie in the weight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn full<const M: usize>(
    p: &Packed4,
    lut: &Lut,
    acts: &Activations,
    a: usize,
    first: usize,
    c: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) {
    use std::arch::x86_64::*;
    debug_assert!(a.is_multiple_of(2) && a / 2 + 16 <= p.bytes.len());
    let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.bytes.as_ptr().add(a / 2) as *const __m128i));
    let (v0, v1) = decode(lut, raw);
    for (i, acc) in acc.iter_mut().enumerate() {
        let at = (first + i) * acts.chunks + c;
        let x = acts.codes.as_ptr().add(at * CHUNK) as *const __m256i;
        let sum = _mm256_add_epi32(
            _mm256_madd_epi16(v0, _mm256_loadu_si256(x)),
            _mm256_madd_epi16(v1, _mm256_loadu_si256(x.add(1))),
        );
        let scale = _mm256_set1_ps(*acts.scales.get_unchecked(at));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
    }
}

/// Half a chunk: 16 values from flattened index `a` (even) against half `h` (0 or 1) of
/// chunk `c` of each row, added to `acc` times the chunk's scale.
///
/// # Safety
/// As [`row_dots`]; values `a..a + 16` lie in the weight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn half<const M: usize>(
    p: &Packed4,
    lut: &Lut,
    acts: &Activations,
    a: usize,
    first: usize,
    c: usize,
    h: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) {
    use std::arch::x86_64::*;
    debug_assert!(a.is_multiple_of(2) && a / 2 + 8 <= p.bytes.len());
    let raw = _mm256_broadcastsi128_si256(_mm_loadl_epi64(p.bytes.as_ptr().add(a / 2) as *const __m128i));
    let (v0, _) = decode(lut, raw);
    for (i, acc) in acc.iter_mut().enumerate() {
        let at = (first + i) * acts.chunks + c;
        let x = acts.codes.as_ptr().add(at * CHUNK + h * HALF) as *const __m256i;
        let sum = _mm256_madd_epi16(v0, _mm256_loadu_si256(x));
        let scale = _mm256_set1_ps(*acts.scales.get_unchecked(at));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
    }
}

/// Sum of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The error budget of the fixed-point path.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Relative slack for f32 summation in a different order: `n·ε` of `Σ|w·x|` over the
    /// `n` terms of a row (the textbook worst case of recursive summation).
    pub fn summation_slack(n: usize) -> f64 {
        n as f64 * f32::EPSILON as f64
    }

    /// For every output `[m, rows]`: the bound of the module documentation,
    /// `Σ_k |s_b|·(|c_k·γ|·d_k/2 + |x_k|·|t_k − c_k·γ|)`, plus [`summation_slack`] of
    /// `Σ_k |w_k·x_k|`.
    pub fn fixed_point_bound(p: &Packed4, x: &[f32], m: usize) -> Vec<f64> {
        let table = FixedTable::new(&p.table).expect("finite table");
        let acts = Activations::new(x, m, p.cols, &table, false).expect("finite activations");
        let mut out = vec![0.0f64; m * p.rows];
        for i in 0..m {
            for r in 0..p.rows {
                let (mut bound, mut mass) = (0.0f64, 0.0f64);
                for k in 0..p.cols {
                    let flat = r * p.cols + k;
                    let (b, u) = (flat / p.block, super::super::packed4::nibble(&p.bytes, flat) as usize);
                    let xv = x[i * p.cols + k] as f64;
                    let d = (acts.scales[i * acts.chunks + k / CHUNK] / table.step) as f64;
                    let s = p.scales[b].abs() as f64;
                    let fixed = table.value(u) as f64;
                    bound += s * (fixed.abs() * d / 2.0 + xv.abs() * (p.table[u] as f64 - fixed).abs());
                    mass += (p.value(flat) as f64 * xv).abs();
                }
                out[i * p.rows + r] = bound + summation_slack(p.cols) * mass;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_put_even_values_of_each_half_first() {
        let order: Vec<usize> = (0..CHUNK).map(slot).collect();
        assert_eq!(&order[..4], &[0, 8, 1, 9]);
        assert_eq!(&order[14..18], &[7, 15, 16, 24]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..CHUNK).collect::<Vec<_>>());
    }

    #[test]
    fn integer_tables_are_exact_and_others_within_half_a_step() {
        let signed = [0., 1., 2., 3., 4., 5., 6., 7., -8., -7., -6., -5., -4., -3., -2., -1.];
        let t = FixedTable::new(&signed).unwrap();
        assert_eq!((t.step, t.qx), (1.0, QX_INTEGER_TABLE));
        assert!((0..16).all(|u| t.value(u) == signed[u]));
        let mut nf = [0.0f32; 16];
        nf.iter_mut().enumerate().for_each(|(u, v)| *v = (u as f32 - 7.3) * 0.137);
        let t = FixedTable::new(&nf).unwrap();
        assert_eq!(t.qx, QX_FIXED_TABLE);
        assert!((0..16).all(|u| (t.value(u) - nf[u]).abs() <= t.step / 2.0 * 1.0001));
        assert!(FixedTable::new(&[f32::NAN; 16]).is_none());
    }

    #[test]
    fn activations_round_to_within_half_a_step() {
        let table = FixedTable::new(&[0.5; 16]).unwrap();
        let x: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let acts = Activations::new(&x, 2, 48, &table, true).unwrap();
        for row in 0..2 {
            for k in 0..48 {
                let chunk =
                    &x[row * 48 + k / CHUNK * CHUNK..(row * 48 + (k / CHUNK + 1) * CHUNK).min(row * 48 + 48)];
                let d = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs())) / table.qx;
                let err = (acts.value(row, k, table.step) - x[row * 48 + k]).abs();
                assert!(err <= d * (0.5 + 1e-4), "row {row} k {k}: {err} > {d}/2");
            }
        }
        let exact: f32 = x[48 + 16..48 + 48].iter().sum();
        assert!((acts.sum(1, 16, 48) - exact).abs() <= 1e-5);
        assert!(Activations::new(&[f32::INFINITY; 16], 1, 16, &table, false).is_none());
    }
}
