//! The fast fused GEMV of the 4-bit block format ([`crate::scheme::packed4`]): activations in
//! 16-bit fixed point, codes looked up as 16-bit integers, exact integer dot products.
//!
//! Why: decoding every nibble to f32 and multiplying with FMAs costs about three vector
//! instructions per 8 weights, so the f32 GEMV is compute-bound at about 5.6 GB/s of
//! packed weights on the 2-core AVX2 machine this crate is developed on, where memory
//! delivers 29–33 GB/s to two threads. Here a chunk pair, 64 weights in 32 packed bytes, costs 21 vector
//! instructions: one 32-byte load; a shift and two masks that leave the high nibbles
//! (even values) and the low nibbles (odd values) of both chunks; four `vpshufb` lookups of
//! the low and high bytes of the 16-bit code table; four unpacks into four vectors of
//! sixteen 16-bit codes; four `vpmaddwd` against the activations; three adds; a conversion
//! to f32 and one FMA by the two chunks' activation scales (one chunk per 128-bit lane).
//! The block scale (and offset) is applied once per block, and two accumulators take
//! alternate pairs so the FMA latency does not bound the loop. Rows and blocks of whole
//! pairs run one loop with advancing pointers; other shapes add 16- and 32-value steps
//! at the ends of each block piece. (A first version decoded one chunk per step into one
//! accumulator: 23 instructions per 32 weights, half of them scalar bookkeeping, and an
//! FMA chain of one latency per chunk; it reached 55–60% of memory bandwidth.)
//!
//! Where the CPU has AVX-512 VNNI, weights of whole chunk pairs go to the byte-product
//! kernel of [`vnni`] instead ([`Gemv::VnniFixed`]): the same integer
//! lane sums, so the same bits. Activations are quantized once per call in registers
//! (the same codes as the portable loop), and a thread reuses the last activations it
//! made when the next call's input has the same bits ([`Activations::shared`]).
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
//! end. SmolLM2 (576, 1536), MiniLM (384, 1536) and the built-in models (256, 688) qualify;
//! all but 688 are whole pairs.

use crate::scheme::packed4::{has_avx2, Gemv, Packed4};
use std::cell::RefCell;
use std::rc::Rc;
use vnni::has_vnni;

pub mod vnni;

/// Activation values per chunk: one scale each, and the unit of the integer dot products.
pub const CHUNK: usize = 32;

/// The granularity of block boundaries this path handles: half a chunk (8 packed bytes).
const HALF: usize = 16;

/// Values per chunk pair: the 32 packed bytes one 256-bit register decodes.
const PAIR: usize = 2 * CHUNK;

/// How far ahead of the pair being decoded the weight bytes are prefetched. Without it
/// one core streamed the weights at about 70% of what it reads in a plain summing loop
/// (the same with the cheaper signed-nibble decoding: it waited on memory, not on
/// instructions); 512, 1024 and 2048 bytes measured alike on the AMD machine. On the
/// Xeon, 4096 against 1024 took the `int4_gemv` bench's 4096×4096 GEMV from 21.7 to 24.3
/// GB/s (int4) and 19.7 to 21.8 GB/s (NF4). A prefetch past the end of the weight reads
/// nothing and cannot fault.
const PREFETCH_BYTES: usize = 4096;

/// [`row_dots_pairs`]'s decoding, by [`Layout`].
const DECODE_LOOKUP: u8 = 0;
const DECODE_SIGNED: u8 = 1;
const DECODE_UNSIGNED: u8 = 2;

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

/// How the kernel turns a chunk pair's 32 bytes into 16-bit codes, and so the order in
/// which it wants the activation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Nibbles looked up in the table ([`slot`]): any table, any shape.
    Lookup,
    /// int4-block's symmetric table `(u + 8) % 16 − 8`, a 4-bit two's complement: each
    /// 16-bit lane of the 32 bytes holds four values, and two shifts per value
    /// sign-extend one of them ([`shift_slot`]). Weights of whole pairs only.
    SignedNibbles,
    /// int4-block's asymmetric table `u`: as [`Layout::SignedNibbles`], zero-extended.
    UnsignedNibbles,
    /// [`Layout::SignedNibbles`]' table for the byte-product kernel (AVX-512 VNNI,
    /// [`vnni`]): activation codes split into bytes ([`split_slot`]),
    /// with each lane's code sum for the table's offset of 8.
    SignedBytes,
    /// [`Layout::UnsignedNibbles`]' table for the byte-product kernel.
    UnsignedBytes,
    /// Any 13-bit fixed-point table (NF4, FP4, k-means) for the VNNI kernel's 16-bit
    /// products ([`vnni`]): activation codes as 16-bit words ([`lookup_word_slot`]) in
    /// the byte layouts' entries, so that each 32-bit lane sums the values that
    /// [`Layout::Lookup`]'s lane sums.
    LookupWords,
}

impl Layout {
    /// The cheapest layout for weight `p` with `table` (its fixed-point table).
    pub fn for_weight(p: &Packed4, table: &FixedTable) -> Layout {
        let signed = (0..16).all(|u| table.codes[u] as i32 == (u as i32 + 8) % 16 - 8);
        let unsigned = (0..16).all(|u| table.codes[u] as usize == u);
        match (pairs_only(p), signed, unsigned) {
            (true, true, _) => Layout::SignedNibbles,
            (true, _, true) => Layout::UnsignedNibbles,
            _ => Layout::Lookup,
        }
    }

    /// The layout [`Gemv::VnniFixed`] runs for weight `p` with `table`: whole pairs, and
    /// for a looked-up table 13-bit codes (the kernel's tests cover those; an integer
    /// table other than int4-block's two stays on the 16-bit kernel).
    pub fn for_bytes(p: &Packed4, table: &FixedTable) -> Option<Layout> {
        match Layout::for_weight(p, table) {
            Layout::SignedNibbles => Some(Layout::SignedBytes),
            Layout::UnsignedNibbles => Some(Layout::UnsignedBytes),
            Layout::Lookup if pairs_only(p) && table.qx == QX_FIXED_TABLE => Some(Layout::LookupWords),
            _ => None,
        }
    }

    /// Whether activation codes sit in the VNNI kernel's entries (`SPLIT_ENTRY` bytes a
    /// pair: split into bytes at [`split_slot`], or words at [`lookup_word_slot`])
    /// rather than held as 16-bit codes at [`Layout::slot`].
    pub fn is_split(self) -> bool {
        matches!(self, Layout::SignedBytes | Layout::UnsignedBytes | Layout::LookupWords)
    }

    /// The slot of value `p` (0..64) inside its pair's 16-bit codes (byte layouts: the
    /// slot of its high byte, [`split_slot`]; [`Layout::LookupWords`]: the word).
    pub fn slot(self, p: usize) -> usize {
        self.slots()[p] as usize
    }

    /// [`Layout::slot`] of every value of a pair, from a table built at compile time:
    /// quantization places each code through it.
    fn slots(self) -> &'static [u8; PAIR] {
        match self {
            Layout::Lookup => &LOOKUP_SLOTS,
            Layout::SignedNibbles | Layout::UnsignedNibbles => &SHIFT_SLOTS,
            Layout::SignedBytes | Layout::UnsignedBytes => &SPLIT_SLOTS,
            Layout::LookupWords => &LOOKUP_WORD_SLOTS,
        }
    }
}

/// Every value's slot in `layout` (each below 128, so a byte).
const fn slot_table(layout: Layout) -> [u8; PAIR] {
    let mut table = [0u8; PAIR];
    let mut p = 0;
    while p < PAIR {
        table[p] = match layout {
            Layout::Lookup => slot(p),
            Layout::SignedNibbles | Layout::UnsignedNibbles => shift_slot(p),
            Layout::SignedBytes | Layout::UnsignedBytes => split_slot(p),
            Layout::LookupWords => lookup_word_slot(p),
        } as u8;
        p += 1;
    }
    table
}

static LOOKUP_SLOTS: [u8; PAIR] = slot_table(Layout::Lookup);
static SHIFT_SLOTS: [u8; PAIR] = slot_table(Layout::SignedNibbles);
static SPLIT_SLOTS: [u8; PAIR] = slot_table(Layout::SignedBytes);
static LOOKUP_WORD_SLOTS: [u8; PAIR] = slot_table(Layout::LookupWords);

/// The word of value `p` (0..64) inside its pair's half of a [`Layout::LookupWords`]
/// entry: run `r` of four (each 64 bytes: this pair's 16 words, then the next pair's)
/// holds the even values of each chunk's first half (`r = 0`), its odd ones (1), the even
/// values of its second half (2) and the odd ones (3); word `8h + w` of a run belongs to
/// chunk `h`'s packed byte `w` (runs 0 and 1) or `8 + w` (runs 2 and 3).
///
/// Why this order: zero-extending the chunk's bytes 0–7 and 8–15 to words
/// (`vpunpcklbw`, `vpunpckhbw`) puts bytes `2j, 2j + 1` and `2j + 8, 2j + 9` in 32-bit lane
/// `j` of the two vectors, which are the bytes whose values [`Layout::Lookup`]'s lane `j`
/// sums ([`slot`]): the integer lane sums, and so the bits, are the 16-bit kernel's.
pub const fn lookup_word_slot(p: usize) -> usize {
    let (h, v) = (p / CHUNK, p % CHUNK);
    let run = 2 * (v / HALF) + v % 2;
    32 * run + 8 * h + (v % HALF) / 2
}

/// The activation rows of one call, quantized chunk by chunk and laid out in the order
/// the kernel produces codes.
pub struct Activations {
    /// The order of the codes within each pair.
    layout: Layout,
    /// Chunk pairs per row (`cols / 64` rounded up; a missing last chunk is zeros).
    pairs: usize,
    /// `[rows, pairs, 64]` codes; value `p` of a pair sits at [`Layout::slot`]`(p)`
    /// (empty for the byte layouts).
    codes: Vec<i16>,
    /// Byte layouts: `[rows, pairs, SPLIT_ENTRY]` codes split into bytes ([`split_slot`],
    /// [`SPLIT_ENTRY`]).
    split: Vec<u8>,
    /// Byte layouts: `[rows, pairs, 8]`, what each lane's integer sum starts from: minus
    /// 8 times its codes' sum for the signed table, zero for the others.
    lane_starts: Vec<i32>,
    /// `[rows, pairs, 8]`: each chunk's activation step times the table step, four times
    /// over (lanes 0–3 the pair's first chunk, 4–7 its second), as the kernel multiplies.
    scales: Vec<f32>,
    /// `[rows, cols / 16 + 1]` f64 prefix sums of each row over 16-value halves (for
    /// offsets; empty without them).
    prefix: Vec<f64>,
    /// `cols / 16 + 1`: the row stride of `prefix`.
    prefix_stride: usize,
}

/// The slot of value `p` (0..64) inside its pair's codes: 16-code vector `v` (even values
/// of the first half of a chunk, even of the second, odd of the first, odd of the
/// second), then the chunk `h` in the pair (the 128-bit lane), then the byte within the
/// half. This is the order in which unpacking the looked-up nibbles of 32 packed bytes
/// leaves the codes.
pub const fn slot(p: usize) -> usize {
    let (h, within) = (p / CHUNK, p % CHUNK);
    let v = 2 * (within % 2) + within / HALF;
    16 * v + 8 * h + (within % HALF) / 2
}

/// The slot of value `p` (0..64) inside its pair's codes for the shift layouts: 16-bit
/// lane `p / 4` of the 32 bytes holds values `4j+1` (bits 0–3), `4j` (4–7), `4j+3` (8–11)
/// and `4j+2` (12–15), extracted in that order into four vectors of 16 codes.
pub const fn shift_slot(p: usize) -> usize {
    const VECTOR: [usize; 4] = [1, 0, 3, 2];
    16 * VECTOR[p % 4] + p / 4
}

/// The activations a thread quantized last, with what they were made from.
struct Memo {
    input: Vec<f32>,
    m: usize,
    table: FixedTable,
    sums: bool,
    layout: Layout,
    acts: Rc<Activations>,
}

impl Memo {
    /// Whether these activations are what quantizing `x` this way would make.
    fn serves(&self, x: &[f32], m: usize, table: &FixedTable, sums: bool, layout: Layout) -> bool {
        let same_bits = |a: &[f32], b: &[f32]| {
            a.len() == b.len()
                && a.chunks(64).zip(b.chunks(64)).all(|(a, b)| {
                    a.iter().zip(b).fold(true, |same, (a, b)| same & (a.to_bits() == b.to_bits()))
                })
        };
        self.m == m
            && self.table == *table
            && self.sums == sums
            && self.layout == layout
            && same_bits(&self.input, x)
    }
}

thread_local! {
    /// See [`Activations::shared`].
    static LAST_ACTIVATIONS: RefCell<Option<Memo>> = const { RefCell::new(None) };
}

/// Whether every value is finite, 64 at a time without an exit per value (which
/// the compiler cannot vectorise: the check cost a cycle a value).
fn all_finite(x: &[f32]) -> bool {
    x.chunks(64).all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
}

/// The byte of value `p` (0..64) inside its pair's 128 split bytes: the high bytes of the
/// even values' codes, their low bytes, then the same of the odd values, each in value
/// order. The low byte sits 32 bytes after the high one. This is the order in which a
/// shift and two masks leave the nibbles of 32 packed bytes: even values (high nibbles)
/// in one vector, odd in another, byte `i` holding value `2i` or `2i + 1`.
pub const fn split_slot(p: usize) -> usize {
    64 * (p % 2) + p / 2
}

/// Bytes per pair in the byte layouts: each of [`split_slot`]'s four 32-byte runs of the
/// pair, then the same run of the next pair (zeros after a row's last pair), so one
/// 512-bit load takes a run of two consecutive pairs wherever a block piece starts.
const SPLIT_ENTRY: usize = 4 * PAIR;

/// Where byte `s` of a pair's 128 split bytes ([`split_slot`]) sits in its own entry.
const fn entry_offset(s: usize) -> usize {
    64 * (s / 32) + s % 32
}

/// The 8·(sum of codes) each 32-bit lane of a split pair subtracts for the signed table
/// (stored negated): lane `j` covers values `8j..8j + 8` (packed bytes `4j..4j + 4`).
const SIGNED_OFFSET: i32 = 8;

impl Activations {
    /// Quantize `x` (`[m, cols]`, `cols` a multiple of 16) for `table`; `None` when a
    /// value is not finite (the exact path then runs).
    pub fn new(
        x: &[f32],
        m: usize,
        cols: usize,
        table: &FixedTable,
        sums: bool,
        layout: Layout,
    ) -> Option<Activations> {
        if !all_finite(x) {
            return None;
        }
        let pairs = cols.div_ceil(PAIR);
        let mut out = Codes {
            words: if layout.is_split() { Vec::new() } else { vec![0i16; m * pairs * PAIR] },
            split: if layout.is_split() { vec![0u8; m * pairs * SPLIT_ENTRY] } else { Vec::new() },
            lane_starts: if layout.is_split() { vec![0i32; m * pairs * 8] } else { Vec::new() },
            scales: vec![0.0f32; m * pairs * 8],
        };
        #[cfg(target_arch = "x86_64")]
        if crate::scheme::packed4::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { quantize_rows_avx2(x, cols, table, layout, &mut out) };
        } else {
            quantize_rows(x, cols, table, layout, &mut out, &Portable);
        }
        #[cfg(not(target_arch = "x86_64"))]
        quantize_rows(x, cols, table, layout, &mut out, &Portable);
        let prefix = if sums { prefix_sums(x, m, cols) } else { Vec::new() };
        let Codes { words: codes, split, lane_starts, scales } = out;
        Some(Activations {
            layout,
            pairs,
            codes,
            split,
            lane_starts,
            scales,
            prefix,
            prefix_stride: cols / HALF + 1,
        })
    }

    /// [`Activations::new`], or the activations this thread made last when they were
    /// made from the same bits of `x` with the same table, layout and sums: a layer's q,
    /// k and v projections read one input, and so do gate and up, so a decode step
    /// quantizes 4 inputs per layer rather than 7.
    pub fn shared(
        x: &[f32],
        m: usize,
        cols: usize,
        table: &FixedTable,
        sums: bool,
        layout: Layout,
    ) -> Option<Rc<Activations>> {
        LAST_ACTIVATIONS.with(|last| {
            let mut last = last.borrow_mut();
            if let Some(memo) = last.as_ref().filter(|memo| memo.serves(x, m, table, sums, layout)) {
                return Some(memo.acts.clone());
            }
            // The profile's quantization line counts the inputs quantized, not those served
            // from the memo (whose bit check stays in the linear's own time).
            let work = || crate::profile::Work { ops: 3.0 * x.len() as f64, bytes: 6.0 * x.len() as f64 };
            let quantizing = crate::profile::span("activation quantization", "16-bit per 32 values", work);
            let acts = Rc::new(Activations::new(x, m, cols, table, sums, layout)?);
            drop(quantizing);
            let mut input = last.take().map(|memo| memo.input).unwrap_or_default();
            input.clear();
            input.extend_from_slice(x);
            *last = Some(Memo { input, m, table: *table, sums, layout, acts: acts.clone() });
            Some(acts)
        })
    }

    /// `Σ x[row, k0..k1]` in f32 from the prefix sums (`k0`, `k1` multiples of 16).
    fn sum(&self, row: usize, k0: usize, k1: usize) -> f32 {
        let p = &self.prefix[row * self.prefix_stride..(row + 1) * self.prefix_stride];
        (p[k1 / HALF] - p[k0 / HALF]) as f32
    }

    /// Value `k` of row `row` as the kernel sees it: `d·q` (tests).
    pub fn value(&self, row: usize, k: usize, step: f32) -> f32 {
        let (at, h) = (row * self.pairs + k / PAIR, (k % PAIR) / CHUNK);
        let code = if self.layout.is_split() {
            let at = at * SPLIT_ENTRY;
            if self.layout == Layout::LookupWords {
                let at = at + 2 * self.layout.slot(k % PAIR);
                i16::from_le_bytes([self.split[at], self.split[at + 1]])
            } else {
                let at = at + entry_offset(self.layout.slot(k % PAIR));
                ((self.split[at] as i8 as i32) * 256 + self.split[at + 64] as i32) as i16
            }
        } else {
            self.codes[at * PAIR + self.layout.slot(k % PAIR)]
        };
        code as f32 * self.scales[at * 8 + 4 * h] / step
    }

    /// The step times the table step of the chunk holding value `k` of row `row` (tests).
    #[cfg(test)]
    fn chunk_scale(&self, row: usize, k: usize) -> f32 {
        self.scales[(row * self.pairs + k / PAIR) * 8 + 4 * ((k % PAIR) / CHUNK)]
    }

    /// The codes of pair `pair` of row `row`, from slot `offset` (16-byte aligned units).
    #[inline(always)]
    fn codes_at(&self, row: usize, pair: usize, offset: usize) -> *const i16 {
        // SAFETY (of the callers' reads): `offset + 16 ≤ 64` codes within the pair.
        unsafe { self.codes.as_ptr().add((row * self.pairs + pair) * PAIR + offset) }
    }

    /// The split entry of pair `pair` of row `row` (byte layouts, [`SPLIT_ENTRY`]).
    #[inline(always)]
    fn split_at(&self, row: usize, pair: usize) -> *const u8 {
        // SAFETY (of the callers' reads): 128 bytes per pair.
        unsafe { self.split.as_ptr().add((row * self.pairs + pair) * SPLIT_ENTRY) }
    }

    /// The eight lane starts of pair `pair` of row `row` (byte layouts).
    #[inline(always)]
    fn lane_starts_at(&self, row: usize, pair: usize) -> *const i32 {
        // SAFETY (of the callers' reads): eight lanes per pair.
        unsafe { self.lane_starts.as_ptr().add((row * self.pairs + pair) * 8) }
    }

    /// The eight expanded scales of pair `pair` of row `row`, from lane `lane`.
    #[inline(always)]
    fn scales_at(&self, row: usize, pair: usize, lane: usize) -> *const f32 {
        // SAFETY (of the callers' reads): `lane + 4 ≤ 8` or `lane = 0` for eight lanes.
        unsafe { self.scales.as_ptr().add((row * self.pairs + pair) * 8 + lane) }
    }
}

/// The buffers [`quantize_rows`] fills, laid out as in [`Activations`].
struct Codes {
    words: Vec<i16>,
    split: Vec<u8>,
    lane_starts: Vec<i32>,
    scales: Vec<f32>,
}

/// How a chunk's codes are made and placed: portable loops ([`Portable`]) or AVX2
/// registers ([`Avx2Chunks`]), with the same results.
trait ChunkOps {
    /// Quantize `values` (one chunk, maybe short) into `out` in value order; returns
    /// the chunk's scale times the table step.
    fn quantize(&self, values: &[f32], table: &FixedTable, out: &mut [i16; CHUNK]) -> f32;

    /// Place chunk `h`'s codes into half `half` of a split entry of byte layout `layout`:
    /// its pair's own entry (half 0) or the previous pair's (half 1); see [`SPLIT_ENTRY`].
    fn place_split(
        &self,
        layout: Layout,
        codes: &[i16; CHUNK],
        h: usize,
        entry: &mut [u8; SPLIT_ENTRY],
        half: usize,
    ) {
        for (p, &q) in codes.iter().enumerate() {
            let slot = layout.slot(CHUNK * h + p);
            if layout == Layout::LookupWords {
                let at = 2 * slot + 32 * half;
                entry[at..at + 2].copy_from_slice(&q.to_le_bytes());
            } else {
                let at = entry_offset(slot) + 32 * half;
                (entry[at], entry[at + 64]) = ((q >> 8) as u8, q as u8);
            }
        }
    }
}

/// [`ChunkOps`] in portable loops.
struct Portable;

impl ChunkOps for Portable {
    fn quantize(&self, values: &[f32], table: &FixedTable, out: &mut [i16; CHUNK]) -> f32 {
        quantize_chunk(values, table, out)
    }
}

/// Quantize every chunk of every row of `x` into `out` (laid out as in [`Activations`]).
#[inline(always)]
fn quantize_rows(
    x: &[f32],
    cols: usize,
    table: &FixedTable,
    layout: Layout,
    out: &mut Codes,
    ops: &impl ChunkOps,
) {
    let pairs = cols.div_ceil(PAIR);
    let mut chunk = [0i16; CHUNK];
    for (r, row) in x.chunks_exact(cols).enumerate() {
        for (c, values) in row.chunks(CHUNK).enumerate() {
            let (at, h) = (r * pairs + c / 2, c % 2);
            let scale = ops.quantize(values, table, &mut chunk);
            out.scales[at * 8 + 4 * h..at * 8 + 4 * h + 4].fill(scale);
            if layout.is_split() {
                let entry = |at: usize| at * SPLIT_ENTRY..(at + 1) * SPLIT_ENTRY;
                let own = (&mut out.split[entry(at)]).try_into().expect("an entry");
                ops.place_split(layout, &chunk, h, own, 0);
                if c >= 2 {
                    let previous = (&mut out.split[entry(at - 1)]).try_into().expect("an entry");
                    ops.place_split(layout, &chunk, h, previous, 1);
                }
                if layout == Layout::SignedBytes {
                    let starts = &mut out.lane_starts[at * 8 + 4 * h..at * 8 + 4 * h + 4];
                    for (start, values) in starts.iter_mut().zip(chunk.chunks_exact(8)) {
                        *start = -SIGNED_OFFSET * values.iter().map(|&q| q as i32).sum::<i32>();
                    }
                }
            } else {
                let pair: &mut [i16; PAIR] =
                    (&mut out.words[at * PAIR..(at + 1) * PAIR]).try_into().expect("a pair");
                let slots = &layout.slots()[CHUNK * h..CHUNK * (h + 1)];
                for (&s, &q) in slots.iter().zip(&chunk) {
                    // A mask the compiler can see through: no bounds checks.
                    pair[s as usize & (PAIR - 1)] = q;
                }
            }
        }
    }
}

/// [`ChunkOps`] in AVX2 registers for whole chunks.
#[cfg(target_arch = "x86_64")]
struct Avx2Chunks;

#[cfg(target_arch = "x86_64")]
impl ChunkOps for Avx2Chunks {
    #[inline(always)]
    fn quantize(&self, values: &[f32], table: &FixedTable, out: &mut [i16; CHUNK]) -> f32 {
        match values.try_into() {
            // SAFETY: an `Avx2Chunks` is only used where the CPU has AVX2 and FMA.
            Ok(whole) => unsafe { quantize_chunk_avx2(whole, table, out) },
            Err(_) => quantize_chunk(values, table, out),
        }
    }

    #[inline(always)]
    fn place_split(
        &self,
        layout: Layout,
        codes: &[i16; CHUNK],
        h: usize,
        entry: &mut [u8; SPLIT_ENTRY],
        half: usize,
    ) {
        // SAFETY: as above.
        unsafe { place_split_avx2(layout, codes, h, entry, half) }
    }
}

/// [`quantize_rows`] compiled for AVX2, where rounding half to even is one instruction
/// (the baseline x86-64 target calls a library function per value).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_rows_avx2(x: &[f32], cols: usize, table: &FixedTable, layout: Layout, out: &mut Codes) {
    quantize_rows(x, cols, table, layout, out, &Avx2Chunks)
}

/// [`ChunkOps::place_split`] in registers: one byte shuffle per 128-bit lane of eight
/// codes leaves four 32-bit groups (high bytes of the even values, their low bytes, the
/// same of the odd), a permutation pairs each register's groups, and 64-bit unpacks join
/// the two registers' groups into the four 16-byte runs. [`Layout::LookupWords`]: one
/// shuffle per 128-bit lane gathers its even codes before its odd ones, and a permutation
/// of 64-bit quarters joins each run's two halves.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn place_split_avx2(
    layout: Layout,
    codes: &[i16; CHUNK],
    h: usize,
    entry: &mut [u8; SPLIT_ENTRY],
    half: usize,
) {
    use std::arch::x86_64::*;
    // Little-endian codes: value v of a lane has its low byte at 2v and its high at 2v + 1.
    const GROUPS: [i8; 16] = [1, 5, 9, 13, 0, 4, 8, 12, 3, 7, 11, 15, 2, 6, 10, 14];
    const EVEN_THEN_ODD: [i8; 16] = [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15];
    let lanes = |bytes: &[i8; 16]| {
        // SAFETY: a 16-byte read of a 16-byte array.
        _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(bytes.as_ptr() as *const __m128i) })
    };
    // SAFETY: two 32-byte reads of 64 bytes of codes; four 16-byte writes at
    // `32·half + 16h + {0, 64, 128, 192}` ≤ 240 of a 256-byte entry.
    unsafe {
        let load = |at: usize| _mm256_loadu_si256(codes.as_ptr().add(at) as *const __m256i);
        let (first, second) = if layout == Layout::LookupWords {
            // Runs 0 and 1 from the chunk's first half, 2 and 3 from its second.
            let runs = |at: usize| {
                _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(
                    load(at),
                    lanes(&EVEN_THEN_ODD),
                ))
            };
            let (a, b) = (runs(0), runs(16));
            (_mm256_permute2x128_si256::<0x20>(a, b), _mm256_permute2x128_si256::<0x31>(a, b))
        } else {
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let group =
                |at: usize| _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(load(at), lanes(&GROUPS)), order);
            let (a, b) = (group(0), group(16));
            // Lane 0: even values' high bytes, lane 1: odd values' high bytes; then low bytes.
            (_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b))
        };
        let dst = entry.as_mut_ptr().add(32 * half + 16 * h);
        _mm_storeu_si128(dst as *mut __m128i, _mm256_castsi256_si128(first));
        _mm_storeu_si128(dst.add(64) as *mut __m128i, _mm256_castsi256_si128(second));
        _mm_storeu_si128(dst.add(128) as *mut __m128i, _mm256_extracti128_si256::<1>(first));
        _mm_storeu_si128(dst.add(192) as *mut __m128i, _mm256_extracti128_si256::<1>(second));
    }
}

/// [`quantize_chunk`] of a whole chunk in AVX2 registers, with the same operations on
/// each value (the maximum, one multiplication, rounding half to even, the clamp), so
/// the same codes. The portable loop converts to 16 bits one value at a time (a
/// saturating cast), which held quantization at 3.5 ns a value.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn quantize_chunk_avx2(values: &[f32; CHUNK], table: &FixedTable, out: &mut [i16; CHUNK]) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: four 8-float reads of a 32-float array; two 32-byte writes of 32 codes.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(values.as_ptr().add(8 * i)));
        let a: [__m256; 4] = std::array::from_fn(|i| _mm256_andnot_ps(sign, v[i]));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let absmax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        if absmax == 0.0 {
            out.fill(0);
            return 0.0;
        }
        let (d, inv) = (absmax / table.qx, table.qx / absmax);
        let (lo, hi, scale) = (_mm256_set1_ps(-table.qx), _mm256_set1_ps(table.qx), _mm256_set1_ps(inv));
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                v[i], scale,
            ));
            _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
        });
        // Packing interleaves the 128-bit lanes; the permutation puts values back in order.
        let pack = |a, b| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, pack(q[0], q[1]));
        _mm256_storeu_si256(out.as_mut_ptr().add(16) as *mut __m256i, pack(q[2], q[3]));
        d * table.step
    }
}

/// Quantize one chunk into `out` (in value order, zeros past the chunk's end); returns
/// its scale times the table step.
#[inline(always)]
fn quantize_chunk(values: &[f32], table: &FixedTable, out: &mut [i16; CHUNK]) -> f32 {
    out.fill(0);
    let absmax = abs_max(values);
    if absmax == 0.0 {
        return 0.0;
    }
    let d = absmax / table.qx;
    let inv = table.qx / absmax;
    for (o, &v) in out.iter_mut().zip(values) {
        // |v·inv| ≤ qx up to rounding; the clamp keeps a rounding overshoot in range.
        *o = (v * inv).round_ties_even().clamp(-table.qx, table.qx) as i16;
    }
    d * table.step
}

/// The largest magnitude of `values` (finite), in eight running maxima: one running
/// maximum is a chain of 32 dependent instructions per chunk, which held quantization at
/// 3.5 ns a value. The maximum does not depend on the order, so the value is the same.
#[inline(always)]
fn abs_max(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut groups = values.chunks_exact(8);
    for group in &mut groups {
        for (m, v) in lanes.iter_mut().zip(group) {
            *m = m.max(v.abs());
        }
    }
    let tail = groups.remainder().iter().fold(0.0f32, |m, v| m.max(v.abs()));
    lanes.iter().fold(tail, |m, &v| m.max(v))
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
/// Each block piece of the row goes in the largest steps its alignment allows: whole
/// chunk pairs (64 values, 32 bytes, 256-bit registers), then single chunks and halves
/// (128-bit registers) at its ends.
///
/// # Safety
/// The CPU must have AVX2 and FMA, `shape_fits(p)` must hold, `acts` must come from
/// `Activations::new` with `p.cols` columns and `table`, with offsets' sums when `p` has
/// offsets, and rows `first..first + M` must exist in it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn row_dots<const M: usize>(
    p: &Packed4,
    lut: &Lut,
    acts: &Activations,
    r: usize,
    first: usize,
) -> [f32; M] {
    use std::arch::x86_64::*;
    match acts.layout {
        _ if !pairs_only(p) => {}
        Layout::Lookup => return row_dots_pairs::<M, DECODE_LOOKUP>(p, lut, acts, r, first),
        Layout::SignedNibbles => return row_dots_pairs::<M, DECODE_SIGNED>(p, lut, acts, r, first),
        Layout::UnsignedNibbles => return row_dots_pairs::<M, DECODE_UNSIGNED>(p, lut, acts, r, first),
        // The byte layouts come only from `Gemv::VnniFixed`, chosen where the CPU has VNNI.
        Layout::SignedBytes => return vnni::row_dots_split::<M, { vnni::SIGNED }>(p, lut, acts, r, first),
        Layout::UnsignedBytes => {
            return vnni::row_dots_split::<M, { vnni::UNSIGNED }>(p, lut, acts, r, first)
        }
        Layout::LookupWords => return vnni::row_dots_split::<M, { vnni::LOOKUP }>(p, lut, acts, r, first),
    }
    debug_assert_eq!(acts.layout, Layout::Lookup, "shift layouts need whole pairs");
    let (cols, start) = (p.cols, r * p.cols);
    let bytes = p.bytes.as_ptr().add(start / 2);
    let mut total = [_mm256_setzero_ps(); M];
    let mut extra = [0.0f32; M];
    let mut k0 = 0;
    // One division per row: the pieces then walk the blocks in order.
    let mut b = start / p.block;
    while k0 < cols {
        let k1 = ((b + 1) * p.block - start).min(cols);
        let mut acc = [_mm256_setzero_ps(); M];
        let mut k = k0;
        // Up to the first pair boundary, then whole pairs, then what is left.
        while k < k1 && (k % PAIR != 0 || k + PAIR > k1) {
            k = edge_dots::<M>(lut, bytes, acts, first, k, k1, &mut acc);
        }
        if k + PAIR <= k1 {
            let n = (k1 - k) / PAIR;
            pairs_dots::<M>(lut, bytes.add(k / 2), acts, first, k / PAIR, n, &mut acc);
            k += n * PAIR;
        }
        while k < k1 {
            k = edge_dots::<M>(lut, bytes, acts, first, k, k1, &mut acc);
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

/// Whether every block piece of every row is whole chunk pairs: rows of whole pairs and
/// blocks of whole pairs (or one block over the whole weight). Then [`row_dots_pairs`]
/// runs, with no edge steps.
fn pairs_only(p: &Packed4) -> bool {
    p.cols.is_multiple_of(PAIR) && (p.block.is_multiple_of(PAIR) || p.block >= p.rows * p.cols)
}

/// [`row_dots`] for a weight where [`pairs_only`] holds: one loop over the row's pairs,
/// split at block boundaries, with pointers that only advance.
///
/// # Safety
/// As [`row_dots`], and `pairs_only(p)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dots_pairs<const M: usize, const D: u8>(
    p: &Packed4,
    lut: &Lut,
    acts: &Activations,
    r: usize,
    first: usize,
) -> [f32; M] {
    use std::arch::x86_64::*;
    let bytes = p.bytes.as_ptr().add(r * p.cols / 2);
    let xs: [*const __m256i; M] = std::array::from_fn(|i| acts.codes_at(first + i, 0, 0) as *const __m256i);
    let ss: [*const f32; M] = std::array::from_fn(|i| acts.scales_at(first + i, 0, 0));
    walk_pairs::<M>(p, acts, RowStart::of(p, r), first, |j, end, even, odd| {
        alternate(j, end, even, odd, |j, acc| pair_step::<M, D>(lut, bytes, &xs, &ss, j, acc))
    })
}

/// [`row_dots_pairs`] for one activation row and the consecutive weight rows from `r0`
/// (`dst`: their outputs): one call for a task's rows, each row's block start stepped
/// from the last, where a call per row and its division cost a third of a 576-value
/// row's time.
///
/// # Safety
/// As [`row_dots_pairs`], for rows `r0..r0 + dst.len()` and activation row 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_dots_pairs<const D: u8>(
    p: &Packed4,
    lut: &Lut,
    acts: &Activations,
    r0: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let xs: [*const __m256i; 1] = [acts.codes_at(0, 0, 0) as *const __m256i];
    let ss: [*const f32; 1] = [acts.scales_at(0, 0, 0)];
    let mut at = RowStart::of(p, r0);
    for (k, d) in dst.iter_mut().enumerate() {
        let bytes = p.bytes.as_ptr().add((r0 + k) * p.cols / 2);
        *d = walk_pairs::<1>(p, acts, at, 0, |j, end, even, odd| {
            alternate(j, end, even, odd, |j, acc| pair_step::<1, D>(lut, bytes, &xs, &ss, j, acc))
        })[0];
        at = at.next(p);
    }
}

/// `dst[k] = x[0] · W[r0 + k]` on the fixed-point path for one activation row.
///
/// # Safety
/// As [`row_dots`] for each of the rows, with one activation row in `acts`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn run_dots(p: &Packed4, lut: &Lut, acts: &Activations, r0: usize, dst: &mut [f32]) {
    if pairs_only(p) {
        match acts.layout {
            Layout::Lookup => return run_dots_pairs::<DECODE_LOOKUP>(p, lut, acts, r0, dst),
            Layout::SignedNibbles => return run_dots_pairs::<DECODE_SIGNED>(p, lut, acts, r0, dst),
            Layout::UnsignedNibbles => return run_dots_pairs::<DECODE_UNSIGNED>(p, lut, acts, r0, dst),
            Layout::SignedBytes => return vnni::run_dots_split::<{ vnni::SIGNED }>(p, lut, acts, r0, dst),
            Layout::UnsignedBytes => {
                return vnni::run_dots_split::<{ vnni::UNSIGNED }>(p, lut, acts, r0, dst)
            }
            Layout::LookupWords => return vnni::run_dots_split::<{ vnni::LOOKUP }>(p, lut, acts, r0, dst),
        }
    }
    for (k, d) in dst.iter_mut().enumerate() {
        *d = row_dots::<1>(p, lut, acts, r0 + k, 0)[0];
    }
}

/// The block walk of a whole-pairs row, shared by the 16-bit and the byte-split kernels:
/// `piece(j0, end, even, odd)` adds the chunk sums times their activation scales of pairs
/// `j0..end` (one block's piece of the row) to two accumulators, even-numbered pairs of
/// the piece to `even` and odd-numbered ones to `odd` ([`alternate`]; two chains keep
/// the FMA latency off the critical path), which meet at the block's end to take its
/// scale (and its offset's sum).
///
/// # Safety
/// As [`row_dots`], and `pairs_only(p)`; `piece` must be safe to call for every piece of
/// the row; the CPU must have AVX2 and FMA. Always inlined, into callers compiled for
/// those features (a call would pass every accumulator through memory, and the caller's
/// `piece` could not be inlined into a function compiled for fewer features).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn walk_pairs<const M: usize>(
    p: &Packed4,
    acts: &Activations,
    at: RowStart,
    first: usize,
    mut piece: impl FnMut(usize, usize, &mut [std::arch::x86_64::__m256; M], &mut [std::arch::x86_64::__m256; M]),
) -> [f32; M] {
    use std::arch::x86_64::*;
    let row_pairs = p.cols / PAIR;
    let block_pairs = if p.block >= p.rows * p.cols { row_pairs } else { p.block / PAIR };
    let (mut b, mut left_in_block) = (at.block, at.left);
    let mut total = [_mm256_setzero_ps(); M];
    let mut extra = [0.0f32; M];
    let mut j0 = 0;
    while j0 < row_pairs {
        let end = (j0 + left_in_block).min(row_pairs);
        let (mut even, mut odd) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
        piece(j0, end, &mut even, &mut odd);
        let scale = _mm256_set1_ps(*p.scales.get_unchecked(b));
        for i in 0..M {
            total[i] = _mm256_fmadd_ps(_mm256_add_ps(even[i], odd[i]), scale, total[i]);
        }
        if let Some(o) = &p.offsets {
            let o = *o.get_unchecked(b);
            for (i, e) in extra.iter_mut().enumerate() {
                *e += o * acts.sum(first + i, j0 * PAIR, end * PAIR);
            }
        }
        b += 1;
        j0 = end;
        left_in_block = block_pairs;
    }
    std::array::from_fn(|i| hsum(total[i]) + extra[i])
}

/// Where a whole-pairs row's first block piece starts: its block and the pairs left in
/// that block. Consecutive rows step from one to the next without a division.
#[derive(Debug, Clone, Copy)]
struct RowStart {
    /// The block holding the row's first value.
    block: usize,
    left: usize,
    /// Values from the block's start to the row's.
    offset: usize,
}

impl RowStart {
    /// Row `r`'s start (`pairs_only(p)`).
    fn of(p: &Packed4, r: usize) -> RowStart {
        if p.block >= p.rows * p.cols {
            return RowStart { block: 0, left: p.cols / PAIR, offset: 0 };
        }
        let start = r * p.cols;
        let offset = start % p.block;
        RowStart { block: start / p.block, left: (p.block - offset) / PAIR, offset }
    }

    /// The next row's start.
    fn next(self, p: &Packed4) -> RowStart {
        if p.block >= p.rows * p.cols {
            return self;
        }
        let (mut block, mut offset) = (self.block + p.cols / p.block, self.offset + p.cols % p.block);
        if offset >= p.block {
            (block, offset) = (block + 1, offset - p.block);
        }
        RowStart { block, left: (p.block - offset) / PAIR, offset }
    }
}

/// Pairs `j..end` one at a time, alternately into `even` and `odd` (the first into
/// `even`): the accumulation order every kernel keeps.
#[inline(always)]
fn alternate<A>(mut j: usize, end: usize, even: &mut A, odd: &mut A, mut step: impl FnMut(usize, &mut A)) {
    while j + 2 <= end {
        step(j, even);
        step(j + 1, odd);
        j += 2;
    }
    if j < end {
        step(j, even);
    }
}

/// Pair `j` of a row (its bytes from `bytes`, each activation row's codes and scales from
/// `xs` and `ss`): the integer sums of each chunk times its scale, added to `acc`.
///
/// # Safety
/// As [`row_dots_pairs`]; pair `j` lies in the row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pair_step<const M: usize, const D: u8>(
    lut: &Lut,
    bytes: *const u8,
    xs: &[*const std::arch::x86_64::__m256i; M],
    ss: &[*const f32; M],
    j: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) {
    use std::arch::x86_64::*;
    let raw = _mm256_loadu_si256(bytes.add(32 * j) as *const __m256i);
    _mm_prefetch::<_MM_HINT_T0>(bytes.wrapping_add(32 * j + PREFETCH_BYTES) as *const i8);
    let w = match D {
        DECODE_SIGNED => decode_pair_signed(raw),
        DECODE_UNSIGNED => decode_pair_unsigned(raw),
        _ => decode_pair(lut, raw),
    };
    for (i, acc) in acc.iter_mut().enumerate() {
        let x = xs[i].add(4 * j);
        let sum = _mm256_add_epi32(
            _mm256_add_epi32(
                _mm256_madd_epi16(w[0], _mm256_loadu_si256(x)),
                _mm256_madd_epi16(w[1], _mm256_loadu_si256(x.add(1))),
            ),
            _mm256_add_epi32(
                _mm256_madd_epi16(w[2], _mm256_loadu_si256(x.add(2))),
                _mm256_madd_epi16(w[3], _mm256_loadu_si256(x.add(3))),
            ),
        );
        let scale = _mm256_loadu_ps(ss[i].add(8 * j));
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc);
    }
}

/// The code table split into the low and high bytes of its 16-bit codes, in both lanes,
/// and the nibble mask.
#[cfg(target_arch = "x86_64")]
pub struct Lut {
    lo: std::arch::x86_64::__m256i,
    hi: std::arch::x86_64::__m256i,
    mask: std::arch::x86_64::__m256i,
    /// [`Layout::LookupWords`]: the 16-bit codes twice over, so a word's low five bits
    /// (its byte's low nibble and one bit of the high) look up the low nibble's code.
    words: [i16; 2 * 16],
}

#[cfg(target_arch = "x86_64")]
impl Lut {
    /// Built once per GEMV call. Rebuilt per row (32 byte stores read back as two
    /// vectors, which stalls store forwarding), it held SmolLM2's 4-bit decode GEMVs at
    /// 8.5 GB/s on one thread of the 2-core Xeon, against 9.0 GB/s built once.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub fn new(table: &FixedTable) -> Lut {
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
        let words = std::array::from_fn(|i| table.codes[i % 16]);
        Lut { lo, hi, mask: _mm256_set1_epi8(0x0F), words }
    }
}

/// The 16-bit codes of 32 packed bytes (a chunk pair, one chunk per lane) as the four
/// vectors of [`slot`]: even values of each chunk's first half, even of its second half,
/// odd of the first, odd of the second.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn decode_pair(lut: &Lut, raw: std::arch::x86_64::__m256i) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    // The first value of a byte is its high nibble.
    let even = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lut.mask);
    let odd = _mm256_and_si256(raw, lut.mask);
    let (even_lo, even_hi) = (_mm256_shuffle_epi8(lut.lo, even), _mm256_shuffle_epi8(lut.hi, even));
    let (odd_lo, odd_hi) = (_mm256_shuffle_epi8(lut.lo, odd), _mm256_shuffle_epi8(lut.hi, odd));
    [
        _mm256_unpacklo_epi8(even_lo, even_hi),
        _mm256_unpackhi_epi8(even_lo, even_hi),
        _mm256_unpacklo_epi8(odd_lo, odd_hi),
        _mm256_unpackhi_epi8(odd_lo, odd_hi),
    ]
}

/// The codes of a pair of [`Layout::SignedNibbles`]: each nibble of each 16-bit lane
/// shifted to the top and arithmetic-shifted back down, in [`shift_slot`] order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn decode_pair_signed(raw: std::arch::x86_64::__m256i) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    [
        _mm256_srai_epi16(_mm256_slli_epi16(raw, 12), 12),
        _mm256_srai_epi16(_mm256_slli_epi16(raw, 8), 12),
        _mm256_srai_epi16(_mm256_slli_epi16(raw, 4), 12),
        _mm256_srai_epi16(raw, 12),
    ]
}

/// The codes of a pair of [`Layout::UnsignedNibbles`]: each nibble of each 16-bit lane
/// shifted down and masked, in [`shift_slot`] order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn decode_pair_unsigned(raw: std::arch::x86_64::__m256i) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi16(0x0F);
    [
        _mm256_and_si256(raw, mask),
        _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask),
        _mm256_and_si256(_mm256_srli_epi16(raw, 8), mask),
        _mm256_srli_epi16(raw, 12),
    ]
}

/// [`decode_pair`] for 16 bytes (one chunk) in 128-bit registers; with only 8 bytes
/// loaded (the upper 8 zero), the first and third vectors hold that half's codes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn decode_chunk(lut: &Lut, raw: std::arch::x86_64::__m128i) -> [std::arch::x86_64::__m128i; 4] {
    use std::arch::x86_64::*;
    let (lo, hi, mask) =
        (_mm256_castsi256_si128(lut.lo), _mm256_castsi256_si128(lut.hi), _mm256_castsi256_si128(lut.mask));
    let even = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    let odd = _mm_and_si128(raw, mask);
    let (even_lo, even_hi) = (_mm_shuffle_epi8(lo, even), _mm_shuffle_epi8(hi, even));
    let (odd_lo, odd_hi) = (_mm_shuffle_epi8(lo, odd), _mm_shuffle_epi8(hi, odd));
    [
        _mm_unpacklo_epi8(even_lo, even_hi),
        _mm_unpackhi_epi8(even_lo, even_hi),
        _mm_unpacklo_epi8(odd_lo, odd_hi),
        _mm_unpackhi_epi8(odd_lo, odd_hi),
    ]
}

/// `n` whole chunk pairs: the `32·n` bytes from `bytes` against pairs `pair..pair + n`
/// of each row, each chunk's integer sums times its scale added to `acc`.
///
/// # Safety
/// As [`row_dots`]; `32·n` bytes readable from `bytes`, pairs up to `pair + n` in `acts`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pairs_dots<const M: usize>(
    lut: &Lut,
    bytes: *const u8,
    acts: &Activations,
    first: usize,
    pair: usize,
    n: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) {
    use std::arch::x86_64::*;
    let xs: [*const __m256i; M] =
        std::array::from_fn(|i| acts.codes_at(first + i, pair, 0) as *const __m256i);
    let ss: [*const f32; M] = std::array::from_fn(|i| acts.scales_at(first + i, pair, 0));
    for j in 0..n {
        pair_step::<M, DECODE_LOOKUP>(lut, bytes, &xs, &ss, j, acc);
    }
}

/// One step at a piece's ends: a whole chunk from `k` if one fits before `k1`, else half
/// a chunk; returns where the next step starts.
///
/// # Safety
/// As [`row_dots`]; `k` and `k1` multiples of 16 within the row at `bytes`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn edge_dots<const M: usize>(
    lut: &Lut,
    bytes: *const u8,
    acts: &Activations,
    first: usize,
    k: usize,
    k1: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) -> usize {
    let (pair, h) = (k / PAIR, (k % PAIR) / CHUNK);
    if k.is_multiple_of(CHUNK) && k + CHUNK <= k1 {
        chunk_dots::<M>(lut, bytes.add(k / 2), acts, first, pair, h, acc);
        k + CHUNK
    } else {
        half_dots::<M>(lut, bytes.add(k / 2), acts, first, pair, h, (k % CHUNK) / HALF, acc);
        k + HALF
    }
}

/// One whole chunk: the 16 bytes at `bytes` against chunk `h` of pair `pair` of each
/// row, added to `acc` (its low lane) times the chunk's scale.
///
/// # Safety
/// As [`row_dots`]; 16 bytes readable at `bytes`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn chunk_dots<const M: usize>(
    lut: &Lut,
    bytes: *const u8,
    acts: &Activations,
    first: usize,
    pair: usize,
    h: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) {
    use std::arch::x86_64::*;
    let w = decode_chunk(lut, _mm_loadu_si128(bytes as *const __m128i));
    for (i, acc) in acc.iter_mut().enumerate() {
        let x = |v: usize| _mm_loadu_si128(acts.codes_at(first + i, pair, 16 * v + 8 * h) as *const __m128i);
        let sum = _mm_add_epi32(
            _mm_add_epi32(_mm_madd_epi16(w[0], x(0)), _mm_madd_epi16(w[1], x(1))),
            _mm_add_epi32(_mm_madd_epi16(w[2], x(2)), _mm_madd_epi16(w[3], x(3))),
        );
        add_low(acc, _mm_cvtepi32_ps(sum), acts.scales_at(first + i, pair, 4 * h));
    }
}

/// Half a chunk: the 8 bytes at `bytes` against half `q` (0 or 1) of chunk `h` of pair
/// `pair` of each row, added to `acc` (its low lane) times the chunk's scale.
///
/// # Safety
/// As [`row_dots`]; 8 bytes readable at `bytes`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn half_dots<const M: usize>(
    lut: &Lut,
    bytes: *const u8,
    acts: &Activations,
    first: usize,
    pair: usize,
    h: usize,
    q: usize,
    acc: &mut [std::arch::x86_64::__m256; M],
) {
    use std::arch::x86_64::*;
    let w = decode_chunk(lut, _mm_loadl_epi64(bytes as *const __m128i));
    for (i, acc) in acc.iter_mut().enumerate() {
        let x = |v: usize| _mm_loadu_si128(acts.codes_at(first + i, pair, 16 * v + 8 * h) as *const __m128i);
        let sum = _mm_add_epi32(_mm_madd_epi16(w[0], x(q)), _mm_madd_epi16(w[2], x(2 + q)));
        add_low(acc, _mm_cvtepi32_ps(sum), acts.scales_at(first + i, pair, 4 * h));
    }
}

/// `acc.low += products · scales[0..4]`, the upper lane unchanged.
///
/// # Safety
/// AVX2 and FMA; four floats readable at `scales`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn add_low(
    acc: &mut std::arch::x86_64::__m256,
    products: std::arch::x86_64::__m128,
    scales: *const f32,
) {
    use std::arch::x86_64::*;
    let scaled = _mm_mul_ps(products, _mm_loadu_ps(scales));
    *acc = _mm256_add_ps(*acc, _mm256_zextps128_ps256(scaled));
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

/// The fused GEMV's dispatch on a 4-bit weight: which path this CPU and weight take, and
/// the fixed-point path's rows (the exact path's rows live with the format, `scheme::packed4`).
impl Packed4 {
    /// The fused GEMV path [`Self::matmul`] takes on this CPU for this weight (finite
    /// activations).
    pub fn gemv_path(&self) -> Gemv {
        if !has_avx2() {
            Gemv::Scalar
        } else if self.exact_gemv || !shape_fits(self) {
            Gemv::Avx2
        } else {
            match FixedTable::new(&self.table) {
                None => Gemv::Avx2,
                Some(t) if Layout::for_bytes(self, &t).is_some() && has_vnni() => Gemv::VnniFixed,
                Some(_) => Gemv::Avx2Fixed,
            }
        }
    }

    /// The fused GEMV over all output rows, in tasks of 16 rows (parallel for large
    /// weights). `path` must be one this CPU runs ([`Self::gemv_path`] or a slower one);
    /// the fixed-point path falls back to the exact one for a shape it does not take or
    /// non-finite activations.
    pub fn gemv(&self, x: &[f32], m: usize, out: &mut [f32], path: Gemv) {
        assert_eq!(x.len(), m * self.cols, "packed4 gemv: input is not [m, cols]");
        assert_eq!(out.len(), m * self.rows, "packed4 gemv: output is not [m, rows]");
        #[cfg(target_arch = "x86_64")]
        let fixed = path == Gemv::Avx2Fixed || path == Gemv::VnniFixed;
        if fixed && has_avx2() && shape_fits(self) {
            let prepared = FixedTable::new(&self.table).and_then(|t| {
                let bytes = Layout::for_bytes(self, &t).filter(|_| path == Gemv::VnniFixed && has_vnni());
                let layout = bytes.unwrap_or_else(|| Layout::for_weight(self, &t));
                Activations::shared(x, m, self.cols, &t, self.offsets.is_some(), layout).map(|a| (t, a))
            });
            if let Some((table, acts)) = prepared {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                let lut = unsafe { Lut::new(&table) };
                let acts: &Activations = &acts;
                if m == 1 {
                    // SAFETY: as `row_dots_fixed`'s, for each row of the run.
                    self.run_row_runs(out, |r0, dst| unsafe { run_dots(self, &lut, acts, r0, dst) });
                } else {
                    self.run_tasks(m, out, |r, dst| self.row_dots_fixed(&lut, acts, r, dst));
                }
                return;
            }
        }
        let avx2 = path != Gemv::Scalar && has_avx2();
        self.run_tasks(m, out, |r, dst| self.row_dots(r, x, dst, avx2));
    }

    /// `dst[i] = x[i] · W[r]` on the fixed-point path, four activation rows at a time.
    #[cfg(target_arch = "x86_64")]
    fn row_dots_fixed(&self, lut: &Lut, acts: &Activations, r: usize, dst: &mut [f32]) {
        let mut i = 0;
        while i + 4 <= dst.len() {
            // SAFETY: `gemv` checked AVX2, FMA and `shape_fits`, and built `acts` from
            // this weight's table with `dst.len()` rows (and sums when it has offsets).
            let d = unsafe { row_dots::<4>(self, lut, acts, r, i) };
            dst[i..i + 4].copy_from_slice(&d);
            i += 4;
        }
        while i < dst.len() {
            // SAFETY: as above.
            dst[i] = unsafe { row_dots::<1>(self, lut, acts, r, i) }[0];
            i += 1;
        }
    }
}

/// The error budget of the fixed-point path.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::scheme::packed4::GEMV_MAX_ROWS;
    use crate::tensor::SeededRng;

    /// Exact fused GEMV against dequantize + f64 reference GEMM: f32 accumulation over
    /// `cols` terms in a different order, relative L2 of the output.
    pub const GEMV_REL_L2_BUDGET: f64 = 1e-5;

    /// Check every GEMV path of `p` (and the panel path) against the reference: the
    /// exact paths within [`GEMV_REL_L2_BUDGET`], the fixed-point path within the bound
    /// `fixed_point_bound` derives from its rounding steps.
    pub fn check_kernels(p: &Packed4, seed: u64) {
        let mut first_row: Option<Vec<f32>> = None;
        for m in [1, 3, 5, GEMV_MAX_ROWS + 1] {
            let x = SeededRng::new(seed).normal_vec(m * p.cols, 1.0);
            let reference = crate::tensor::matmul_nt_reference(&x, m, p.cols, &p.dequantize(), p.rows);
            let scalar = run(p, &x, m, Gemv::Scalar);
            let err = crate::tensor::relative_l2(&scalar, &reference);
            assert!(err <= GEMV_REL_L2_BUDGET, "scalar gemv {}x{} m={m}: {err}", p.rows, p.cols);
            if has_avx2() {
                let err = crate::tensor::relative_l2(&run(p, &x, m, Gemv::Avx2), &scalar);
                assert!(err <= GEMV_REL_L2_BUDGET, "avx2 vs scalar {}x{} m={m}: {err}", p.rows, p.cols);
                if shape_fits(p) {
                    let fixed = run(p, &x, m, Gemv::Avx2Fixed);
                    within_fixed_point_bound(p, &x, m, &fixed, &reference);
                    // Every m shares its first activation row: one row's run over
                    // consecutive weight rows gives the per-row kernel's bits.
                    let row: Vec<f32> = fixed[..p.rows].to_vec();
                    match &first_row {
                        None => first_row = Some(row),
                        Some(one) => assert!(
                            one.iter().zip(&row).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "row runs vs rows {}x{} m={m}",
                            p.rows,
                            p.cols
                        ),
                    }
                    if has_vnni() {
                        // The byte products sum the same integers: the same bits.
                        let vnni = run(p, &x, m, Gemv::VnniFixed);
                        let same = vnni.iter().zip(&fixed).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "vnni vs avx2 fixed-point {}x{} m={m}", p.rows, p.cols);
                    }
                }
            }
            let mut auto = vec![f32::NAN; m * p.rows];
            p.matmul(&x, m, &mut auto);
            if m <= GEMV_MAX_ROWS && matches!(p.gemv_path(), Gemv::Avx2Fixed | Gemv::VnniFixed) {
                within_fixed_point_bound(p, &x, m, &auto, &reference);
            } else {
                let err = crate::tensor::relative_l2(&auto, &reference);
                assert!(err <= GEMV_REL_L2_BUDGET, "matmul {}x{} m={m}: {err}", p.rows, p.cols);
            }
        }
    }

    /// `p.gemv` on `path`, into a fresh output.
    pub fn run(p: &Packed4, x: &[f32], m: usize, path: Gemv) -> Vec<f32> {
        let mut out = vec![f32::NAN; m * p.rows];
        p.gemv(x, m, &mut out, path);
        out
    }

    /// Every output of the fixed-point path within its bound of the reference.
    pub fn within_fixed_point_bound(p: &Packed4, x: &[f32], m: usize, got: &[f32], reference: &[f32]) {
        let bound = fixed_point_bound(p, x, m);
        for (i, ((&g, &r), &b)) in got.iter().zip(reference).zip(&bound).enumerate() {
            let err = (g as f64 - r as f64).abs();
            assert!(
                err <= b,
                "fixed-point {}x{} m={m} output {i}: |{g} - {r}| = {err} > {b}",
                p.rows,
                p.cols
            );
        }
    }

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
        let acts = Activations::new(x, m, p.cols, &table, false, Layout::Lookup).expect("finite activations");
        let mut out = vec![0.0f64; m * p.rows];
        for i in 0..m {
            for r in 0..p.rows {
                let (mut bound, mut mass) = (0.0f64, 0.0f64);
                for k in 0..p.cols {
                    let flat = r * p.cols + k;
                    let (b, u) = (flat / p.block, crate::scheme::packed4::nibble(&p.bytes, flat) as usize);
                    let xv = x[i * p.cols + k] as f64;
                    let d = (acts.chunk_scale(i, k) / table.step) as f64;
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
    use super::testing::*;
    use super::*;
    use crate::scheme::packed4::testing::random;

    #[test]
    fn every_layout_of_whole_pair_weights_agrees_with_the_reference() {
        let signed: [f32; 16] = std::array::from_fn(|u| ((u as i32 + 8) % 16 - 8) as f32);
        let unsigned: [f32; 16] = std::array::from_fn(|u| u as f32);
        // Rows of whole pairs with blocks of one or two pairs (an odd count of one-pair
        // blocks per row, and an odd count of rows, which the VNNI kernel takes two at a
        // time), blocks across rows, and one block over the whole weight.
        for (seed, &(rows, cols, block)) in
            [(5, 128, 64), (5, 192, 64), (3, 192, 128), (4, 64, 128), (2, 256, 512)].iter().enumerate()
        {
            for offsets in [false, true] {
                let mut p = random(rows, cols, block, offsets, seed as u64);
                for (table, layout) in [(signed, Layout::SignedNibbles), (unsigned, Layout::UnsignedNibbles)]
                {
                    p.table = table;
                    assert_eq!(Layout::for_weight(&p, &FixedTable::new(&table).unwrap()), layout);
                    check_kernels(&p, 7 + seed as u64);
                }
                p.table = random(1, 16, 16, false, 50 + seed as u64).table;
                assert_eq!(Layout::for_weight(&p, &FixedTable::new(&p.table).unwrap()), Layout::Lookup);
                check_kernels(&p, 9 + seed as u64);
            }
        }
    }

    #[test]
    fn kernels_agree_on_odd_shapes_and_blocks_spanning_rows() {
        // Odd column counts make rows start on a low nibble; blocks that do not divide
        // the row make blocks span rows and rows start mid-block.
        let shapes =
            [(1, 1, 128), (3, 5, 4), (7, 33, 16), (5, 127, 128), (9, 300, 128), (33, 129, 64), (4, 64, 200)];
        for (seed, &(rows, cols, block)) in shapes.iter().enumerate() {
            for offsets in [false, true] {
                check_kernels(&random(rows, cols, block, offsets, seed as u64), 100 + seed as u64);
            }
        }
    }

    #[test]
    fn fixed_point_path_stays_within_its_bound_on_every_piece_layout() {
        // Columns of 16·odd leave a half chunk at each row's end; blocks of 48 start pieces
        // mid-chunk; 688 with block 128 is the built-in model's down projection (rows
        // start at multiples of 16 inside a block); a block larger than the weight is
        // k-means' single block.
        let shapes = [
            (3, 16, 16),
            (5, 48, 32),
            (6, 80, 48),
            (7, 688, 128),
            (4, 576, 128),
            (9, 16, 128),
            (2, 32, 1000),
        ];
        for (seed, &(rows, cols, block)) in shapes.iter().enumerate() {
            for offsets in [false, true] {
                let p = random(rows, cols, block, offsets, 40 + seed as u64);
                assert!(shape_fits(&p), "{rows}x{cols} block {block}");
                check_kernels(&p, 200 + seed as u64);
            }
        }
    }

    #[test]
    fn fixed_point_path_handles_integer_tables_extreme_and_non_finite_inputs() {
        let mut p = random(5, 96, 32, true, 7);
        p.table = [0., 1., 2., 3., 4., 5., 6., 7., -8., -7., -6., -5., -4., -3., -2., -1.];
        check_kernels(&p, 8);
        // One huge value per chunk next to tiny ones, and all-zero chunks.
        let mut x = vec![0.0f32; 2 * 96];
        x.iter_mut().enumerate().for_each(|(k, v)| {
            *v = if k % 32 == 5 {
                3.0e4
            } else if k < 96 {
                1e-3
            } else {
                0.0
            }
        });
        let reference = crate::tensor::matmul_nt_reference(&x, 2, 96, &p.dequantize(), 5);
        if has_avx2() {
            let fixed = run(&p, &x, 2, Gemv::Avx2Fixed);
            within_fixed_point_bound(&p, &x, 2, &fixed, &reference);
            // Non-finite activations take the exact path: the same NaN/inf pattern.
            x[3] = f32::NAN;
            let (fixed, exact) = (run(&p, &x, 2, Gemv::Avx2Fixed), run(&p, &x, 2, Gemv::Avx2));
            assert!(fixed.iter().zip(&exact).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn row_starts_step_to_what_each_row_computes() {
        for &(rows, cols, block) in
            &[(9, 576, 128), (7, 192, 128), (5, 128, 64), (6, 64, 256), (4, 256, 2048)]
        {
            let p = random(rows, cols, block, false, 1);
            let mut at = RowStart::of(&p, 0);
            for r in 0..rows {
                let want = RowStart::of(&p, r);
                assert_eq!(
                    (at.block, at.left),
                    (want.block, want.left),
                    "{rows}x{cols} block {block} row {r}"
                );
                at = at.next(&p);
            }
        }
    }

    #[test]
    fn slots_follow_the_unpacked_order_of_a_chunk_pair() {
        let order: Vec<usize> = (0..PAIR).map(slot).collect();
        // Even values of the first chunk's first half, then the same of the second chunk.
        assert_eq!(&order[..4], &[0, 32, 1, 33]);
        assert_eq!(&order[14..18], &[7, 39, 16, 48]);
        assert_eq!(slot(32), 8);
        assert_eq!(slot(63), 16 * 3 + 8 + 7);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..PAIR).collect::<Vec<_>>());
    }

    #[test]
    fn shift_slots_follow_the_nibbles_of_each_16_bit_lane() {
        let order: Vec<usize> = (0..PAIR).map(shift_slot).collect();
        // Lane 0 holds values 1, 0, 3, 2 (bits 0–3, 4–7, 8–11, 12–15): slots 0, 16, 32, 48.
        assert_eq!(&order[..4], &[16, 0, 48, 32]);
        assert_eq!(shift_slot(33), 8);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..PAIR).collect::<Vec<_>>());
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
    fn register_quantization_makes_the_portable_codes_bit_for_bit() {
        if !has_avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let int_table = FixedTable::new(&std::array::from_fn(|u| u as f32)).unwrap();
        let nf_table = FixedTable::new(&std::array::from_fn(|u| (u as f32 - 7.3) * 0.137)).unwrap();
        let mut chunks: Vec<[f32; CHUNK]> = (0..64)
            .map(|seed| {
                let v =
                    crate::tensor::SeededRng::new(seed).normal_vec(CHUNK, 10f64.powi(seed as i32 % 9 - 4));
                v.try_into().unwrap()
            })
            .collect();
        // Exact ties under the integer table (absmax 32767, so the scale is 1 and every
        // other value is k + 0.5, rounded to even), negative zero, one spike, all zero.
        chunks.push(std::array::from_fn(|i| if i == 0 { 32767.0 } else { i as f32 - 16.0 + 0.5 }));
        chunks.push(std::array::from_fn(|i| if i % 2 == 0 { -0.0 } else { 1e-30 * i as f32 }));
        chunks.push(std::array::from_fn(|i| if i == 31 { -3.0e38 } else { i as f32 }));
        chunks.push([0.0; CHUNK]);
        for table in [&int_table, &nf_table] {
            for (n, chunk) in chunks.iter().enumerate() {
                let (mut portable, mut registers) = ([0i16; CHUNK], [7i16; CHUNK]);
                let a = Portable.quantize(chunk, table, &mut portable);
                let b = Avx2Chunks.quantize(chunk, table, &mut registers);
                assert_eq!((a.to_bits(), portable), (b.to_bits(), registers), "chunk {n}");
                for h in 0..2 {
                    for half in 0..2 {
                        let (mut portable_entry, mut register_entry) =
                            ([1u8; SPLIT_ENTRY], [1u8; SPLIT_ENTRY]);
                        for layout in [Layout::SignedBytes, Layout::LookupWords] {
                            Portable.place_split(layout, &portable, h, &mut portable_entry, half);
                            Avx2Chunks.place_split(layout, &portable, h, &mut register_entry, half);
                            assert_eq!(
                                portable_entry, register_entry,
                                "{layout:?} chunk {n}, {h}, half {half}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_repeated_input_reuses_its_activations_and_a_changed_one_does_not() {
        let table = FixedTable::new(&std::array::from_fn(|u| u as f32)).unwrap();
        let mut x = crate::tensor::SeededRng::new(4).normal_vec(2 * 128, 1.0);
        let make = |x: &[f32], layout| Activations::shared(x, 2, 128, &table, false, layout).unwrap();
        let first = make(&x, Layout::UnsignedNibbles);
        assert!(Rc::ptr_eq(&first, &make(&x, Layout::UnsignedNibbles)));
        // Another layout, or one value changed in its last bit, quantizes afresh.
        let other = make(&x, Layout::UnsignedBytes);
        assert!(!Rc::ptr_eq(&first, &other) && other.layout == Layout::UnsignedBytes);
        x[200] = f32::from_bits(x[200].to_bits() ^ 1);
        let changed = make(&x, Layout::UnsignedBytes);
        assert!(!Rc::ptr_eq(&other, &changed));
        let fresh = Activations::new(&x, 2, 128, &table, false, Layout::UnsignedBytes).unwrap();
        assert_eq!((changed.split.clone(), changed.scales.clone()), (fresh.split, fresh.scales));
    }

    #[test]
    fn activations_round_to_within_half_a_step() {
        let table = FixedTable::new(&[0.5; 16]).unwrap();
        let x: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let acts = Activations::new(&x, 2, 48, &table, true, Layout::Lookup).unwrap();
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
        assert!(Activations::new(&[f32::INFINITY; 16], 1, 16, &table, false, Layout::Lookup).is_none());
    }
}
