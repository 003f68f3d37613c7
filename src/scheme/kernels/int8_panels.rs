//! int8 weights packed once, when a layer is built, into the AVX-512 VNNI kernel's panels
//! ([`super::int8_gemm_vnni`]'s layout), and the product that reads them and writes f32
//! outputs directly: `out[i, j] = acc[i, j] · (s_x[i] · s_w[j]) + b[j]`.
//!
//! Why: [`super::int8_gemm::gemm_i8`] packs the weights on every call, writes an i32
//! product that [`crate::scheme::int8_dynamic::rescale`] then reads back on one thread. On
//! all-MiniLM-L6-v2 (8 × 128 tokens) packing, the i32 round trip and the serial rescale
//! were a third of the int8 linears' time. Here the weights are packed once, the rescale
//! and the bias run on each 8 × 32 register block as it leaves the kernel, and every
//! activation row count (decode included) takes the same path.
//!
//! The layer holds the panels instead of row-major codes (the same bytes for shapes whose
//! rows are a multiple of 32 and columns a multiple of 4, as every real model's are);
//! [`Int8Panels::row_major`] gives the codes back for saving and for other backends.
//!
//! Numerics: the i32 sums are the scalar reference's bits (wrapping arithmetic, as in
//! [`super::int8_gemm_vnni`]); the rescale is the same f32 operations in the same order
//! as [`crate::scheme::int8_dynamic::rescale`] (`s_x · s_w` rounded, then `acc · scale + b`, or one
//! fused multiply-add in torch mode), so outputs are bit-identical to the unpacked path.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::int8_gemm_vnni::{self as vnni, UnsignedRows, NR};

/// The kernel name a layer on this path records.
pub(crate) const KERNEL: &str = "int8-avx512vnni-packed";

/// i8 codes `q` (`[m, k]`) as the kernel's unsigned rows.
pub(crate) fn unsigned(q: &[i8], m: usize, k: usize) -> UnsignedRows {
    UnsignedRows::from_codes(q, m, k)
}

/// Fewest activation values [`quantize_rows`] hands to the thread pool. At 128 Ki,
/// SmolLM2's 64-token prefill (64 × 576 and 64 × 1536 values) quantized on one thread:
/// 4.7-4.8 ms of its 34-39 ms per pass, against 2.9-3.0 ms on two (Xeon, alternated).
const PARALLEL_QUANTIZE_ELEMENTS: usize = 1 << 15;

/// Activations `x[m, k]` quantized symmetric per row (or with one scale for all when
/// `per_tensor`) exactly as [`crate::scheme::int8_dynamic::quantize_activations`] does, written
/// straight into the kernel's unsigned rows (`code + 128`); and the scales.
pub(crate) fn quantize_rows(x: &[f32], m: usize, k: usize, per_tensor: bool) -> (UnsignedRows, Vec<f32>) {
    use super::int8_quant::{absmax, quantize_symmetric_offset, symmetric_scale};
    let _span = crate::profile::span("activation quantization", "int8 symmetric", || crate::profile::Work {
        ops: 3.0 * x.len() as f64,
        bytes: 5.0 * x.len() as f64,
    });
    let mut rows = UnsignedRows::zeroed(m, k, 128);
    if k == 0 {
        return (rows, vec![1.0; m]);
    }
    let tensor_scale = per_tensor.then(|| symmetric_scale(absmax(x)));
    let (bytes, stride) = rows.bytes_mut();
    let row = |(src, dst): (&[f32], &mut [u8])| {
        let scale = tensor_scale.unwrap_or_else(|| symmetric_scale(absmax(src)));
        quantize_symmetric_offset(src, scale, &mut dst[..k]);
        scale
    };
    let scales = if x.len() >= PARALLEL_QUANTIZE_ELEMENTS {
        x.par_chunks_exact(k).zip(bytes.par_chunks_exact_mut(stride)).with_min_len(8).map(row).collect()
    } else {
        x.chunks_exact(k).zip(bytes.chunks_exact_mut(stride)).map(row).collect()
    };
    (rows, scales)
}

/// Activation rows per register block: 8 rows × 2 vectors of 16 columns = 16
/// accumulators.
const MR: usize = 8;

/// Bytes of panels a task walks for each block of activation rows (a quarter of a 1 MiB
/// L2), so the panels stay in cache while the rows pass.
const GROUP_BYTES: usize = 256 * 1024;

/// Activation rows a task takes at most: enough to reuse each panel read many times, few
/// enough that a prefill splits into several tasks per thread.
const ROWS_PER_TASK: usize = 128;

/// Products below this many multiply-adds run on the calling thread.
///
/// Why this size: at 128 Ki, SmolLM2's 192 × 576 key and value projections (110 Ki) ran
/// on one thread in every decode step; on the pool its int8-dynamic decode step went from
/// 10.2 to 9.6 ms on two threads of the Xeon (medians of 4 alternated runs).
const SERIAL_MACS: usize = 32 * 1024;

/// A `[n, k]` int8 weight as the VNNI kernel reads it: panels of 32 output columns,
/// `[k/4][32][4]` bytes each (zeros past `n` and `k`), with each column's correction
/// `−128 · Σ_k w[j, k]` for activations stored as `code + 128`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Panels {
    data: Vec<i8>,
    corrections: Vec<i32>,
    rows: usize,
    cols: usize,
}

impl Int8Panels {
    /// Whether this CPU runs the packed product (AVX-512 F, BW and VNNI).
    pub fn available() -> bool {
        vnni::available()
    }

    /// Pack the row-major codes `w` (`[rows, cols]`); `None` where the CPU lacks VNNI.
    pub fn pack(w: &[i8], rows: usize, cols: usize) -> Option<Int8Panels> {
        if !Self::available() {
            return None;
        }
        assert_eq!(w.len(), rows * cols, "int8 panels: weight is not [rows, cols]");
        let len = vnni::panel_len(cols);
        let panels = rows.div_ceil(NR);
        let mut data = vec![0i8; panels * len];
        let mut corrections = vec![0i32; panels * NR];
        if len > 0 {
            data.par_chunks_mut(len).zip(corrections.par_chunks_mut(NR)).enumerate().for_each(
                |(p, (panel, fix))| {
                    let (j0, width) = (p * NR, (rows - p * NR).min(NR));
                    // SAFETY: `available()` was checked above; `panel` is one panel long
                    // and `fix` holds 32 columns.
                    unsafe {
                        vnni::pack_panel(w, cols, j0, width, panel);
                        vnni::column_corrections(panel, 128, fix);
                    }
                },
            );
        }
        corrections.truncate(rows);
        Some(Int8Panels { data, corrections, rows, cols })
    }

    /// The codes back as row-major `[rows, cols]`.
    pub fn row_major(&self) -> Vec<i8> {
        let len = vnni::panel_len(self.cols);
        let mut out = vec![0i8; self.rows * self.cols];
        if self.cols == 0 {
            return out;
        }
        out.par_chunks_mut(self.cols).enumerate().for_each(|(j, row)| {
            let panel = &self.data[(j / NR) * len..][..len];
            let c = j % NR;
            for (kk, v) in row.iter_mut().enumerate() {
                *v = panel[((kk / 4) * NR + c) * 4 + kk % 4];
            }
        });
        out
    }

    /// Output features (weight rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: the panels and the corrections.
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.corrections.len()
    }
}

/// How the i32 sums become f32 outputs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rescale<'a> {
    /// One scale per activation row.
    pub row_scales: &'a [f32],
    /// One scale per output column.
    pub col_scales: &'a [f32],
    /// One value per output column.
    pub bias: Option<&'a [f32]>,
    /// `fma(acc, scale, b)` (one rounding, torch mode) instead of `acc · scale + b`.
    pub fused: bool,
}

/// `out[m, n] = rescale(a[m, k] · wᵀ)`; `a` from [`UnsignedRows`] with i8 codes (shift
/// 128).
///
/// # Panics
/// When the shapes disagree.
pub(crate) fn matmul_f32(panels: &Int8Panels, a: &UnsignedRows, m: usize, rescale: Rescale, out: &mut [f32]) {
    let (n, k) = (panels.rows, panels.cols);
    assert_eq!(a.shift(), 128, "int8 panels: activations must be i8 codes stored + 128");
    assert_eq!(a.rows(), m, "int8 panels: {} activation rows, expected {m}", a.rows());
    assert_eq!(out.len(), m * n, "int8 panels: output is not [m, n]");
    assert_eq!(rescale.row_scales.len(), m, "int8 panels: row scales");
    assert_eq!(rescale.col_scales.len(), n, "int8 panels: column scales");
    assert!(rescale.bias.is_none_or(|b| b.len() == n), "int8 panels: bias");
    if m == 0 || n == 0 {
        return;
    }
    let tasks = tasks(m, n, k);
    let ptr = OutF32(out.as_mut_ptr());
    let run = |(rows, panels_range): &(std::ops::Range<usize>, std::ops::Range<usize>)| {
        // SAFETY: `Int8Panels` exists only where VNNI was detected; each task writes the
        // output rows `rows` × columns of `panels_range` alone.
        unsafe { task(panels, a, rows.clone(), panels_range.clone(), &rescale, ptr) }
    };
    if m * n * k < SERIAL_MACS || crate::tensor::threads() == 1 || tasks.len() == 1 {
        tasks.iter().for_each(run);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// The output pointer shared by the tasks, each writing its own rows × columns.
#[derive(Clone, Copy)]
struct OutF32(*mut f32);
// SAFETY: tasks write disjoint blocks of the output.
unsafe impl Send for OutF32 {}
unsafe impl Sync for OutF32 {}

/// Row ranges × panel ranges: panel groups of at most [`GROUP_BYTES`], split further so a
/// single row block (decode) still gives each thread a few tasks.
fn tasks(m: usize, n: usize, k: usize) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let panels = n.div_ceil(NR);
    let row_chunks = m.div_ceil(ROWS_PER_TASK);
    let by_size = (GROUP_BYTES / vnni::panel_len(k).max(1)).max(1);
    let wanted = crate::tensor::threads() * 4;
    let by_count = panels.div_ceil(wanted.div_ceil(row_chunks).max(1)).max(1);
    let group = by_size.min(by_count);
    let rows_per = m.div_ceil(row_chunks);
    let mut out = Vec::new();
    for r in (0..m).step_by(rows_per) {
        for p in (0..panels).step_by(group) {
            out.push((r..(r + rows_per).min(m), p..(p + group).min(panels)));
        }
    }
    out
}

/// Rows `rows` against panels `panel_range`, block by block.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI; `out` points to `[m, n]` f32 and no other
/// thread writes this block.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn task(
    w: &Int8Panels,
    a: &UnsignedRows,
    rows: std::ops::Range<usize>,
    panel_range: std::ops::Range<usize>,
    rescale: &Rescale,
    out: OutF32,
) {
    let len = vnni::panel_len(w.cols);
    let quads = w.cols.div_ceil(4);
    let mut i = rows.start;
    while i < rows.end {
        let count = (rows.end - i).min(MR);
        for p in panel_range.clone() {
            let j0 = p * NR;
            let b = Block {
                a,
                i,
                quads,
                panel: &w.data[p * len..][..len],
                fix: &w.corrections[j0..(j0 + NR).min(w.rows)],
                n: w.rows,
                j0,
                rescale,
                out,
            };
            match count {
                8 => block::<8>(&b),
                7 => block::<7>(&b),
                6 => block::<6>(&b),
                5 => block::<5>(&b),
                4 => block::<4>(&b),
                3 => block::<3>(&b),
                2 => block::<2>(&b),
                _ => block::<1>(&b),
            }
        }
        i += count;
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
    /// The real columns' corrections (up to 32).
    fix: &'a [i32],
    n: usize,
    /// First output column.
    j0: usize,
    rescale: &'a Rescale<'a>,
    out: OutF32,
}

/// Activation rows `i..i + R` against one panel, rescaled into f32.
///
/// # Safety
/// As [`task`]; rows `i..i + R` exist and `panel` holds `quads` quads.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block<const R: usize>(b: &Block) {
    let mut acc = [[_mm512_setzero_si512(); 2]; R];
    let rows: [*const i32; R] = std::array::from_fn(|r| b.a.row_ptr(b.i + r) as *const i32);
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
    let width = b.fix.len();
    let masks = [lane_mask(width, 0), lane_mask(width, 16)];
    let s = b.rescale;
    for half in 0..2 {
        let (mask, at) = (masks[half], b.j0 + 16 * half);
        if mask == 0 {
            continue;
        }
        let fix = _mm512_maskz_loadu_epi32(mask, b.fix.as_ptr().add(16 * half));
        let col_scale = _mm512_maskz_loadu_ps(mask, s.col_scales.as_ptr().add(at));
        let bias = match s.bias {
            Some(bias) => _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(at)),
            None => _mm512_setzero_ps(),
        };
        for (r, acc) in acc.iter().enumerate() {
            let row = b.i + r;
            let value = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[half], fix));
            let scale = _mm512_mul_ps(_mm512_set1_ps(s.row_scales[row]), col_scale);
            let y = if s.fused {
                _mm512_fmadd_ps(value, scale, bias)
            } else {
                _mm512_add_ps(_mm512_mul_ps(value, scale), bias)
            };
            _mm512_mask_storeu_ps(b.out.0.add(row * b.n + at), mask, y);
        }
    }
}

/// The lanes of the 16 columns from `lo` that lie inside `width`.
fn lane_mask(width: usize, lo: usize) -> __mmask16 {
    let valid = width.saturating_sub(lo).min(16);
    ((1u32 << valid) - 1) as __mmask16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::int8_dynamic::{quantize_activations, rescale as rescale_reference};
    use crate::scheme::kernels::int8_gemm::gemm_i8_reference;
    use crate::tensor::SeededRng;

    fn skipped() -> bool {
        if !Int8Panels::available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
        }
        !Int8Panels::available()
    }

    fn codes(rng: &mut SeededRng, len: usize) -> Vec<i8> {
        (0..len).map(|_| rng.next_u64() as i8).collect()
    }

    #[test]
    fn packing_round_trips_to_the_row_major_codes() {
        if skipped() {
            return;
        }
        let mut rng = SeededRng::new(3);
        for &(n, k) in &[(1, 1), (32, 4), (33, 7), (67, 130), (576, 576)] {
            let w = codes(&mut rng, n * k);
            let panels = Int8Panels::pack(&w, n, k).unwrap();
            assert_eq!(panels.row_major(), w, "{n}×{k}");
            assert_eq!((panels.rows(), panels.cols()), (n, k));
        }
    }

    /// Every row count from decode to prefill, odd shapes, both rescale modes, with and
    /// without bias: the unpacked path's bits (reference product, then `rescale`).
    #[test]
    fn packed_product_gives_the_unpacked_paths_bits() {
        if skipped() {
            return;
        }
        let mut rng = SeededRng::new(8);
        for &(m, k, n) in
            &[(1, 4, 32), (3, 5, 17), (8, 33, 40), (13, 576, 576), (130, 100, 67), (9, 1001, 96)]
        {
            let w = codes(&mut rng, n * k);
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let (q, row_scales) = quantize_activations(&x, m, k, false);
            let col_scales: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 * 0.01 + 1e-4).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let mut acc = vec![0i32; m * n];
            gemm_i8_reference(&q, m, k, &w, n, &mut acc);
            let panels = Int8Panels::pack(&w, n, k).unwrap();
            let rows = UnsignedRows::from_codes(&q, m, k);
            for fused in [false, true] {
                for bias in [None, Some(bias.as_slice())] {
                    let mut want = vec![0.0f32; m * n];
                    rescale_reference(&acc, &row_scales, &col_scales, bias, fused, &mut want);
                    let mut got = vec![f32::NAN; m * n];
                    let r = Rescale { row_scales: &row_scales, col_scales: &col_scales, bias, fused };
                    matmul_f32(&panels, &rows, m, r, &mut got);
                    let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "m {m} k {k} n {n} fused {fused} bias {}", bias.is_some());
                }
            }
        }
    }

    #[test]
    fn extreme_codes_stay_exact() {
        if skipped() {
            return;
        }
        let (m, k, n) = (9, 1001, 33);
        for (av, wv) in [(-128i8, -128i8), (-128, 127), (127, 127), (127, -128)] {
            let (q, w) = (vec![av; m * k], vec![wv; n * k]);
            let mut acc = vec![0i32; m * n];
            gemm_i8_reference(&q, m, k, &w, n, &mut acc);
            let ones = vec![1.0f32; n];
            let row_scales = vec![1.0f32; m];
            let r = Rescale { row_scales: &row_scales, col_scales: &ones, bias: None, fused: false };
            let mut got = vec![0.0f32; m * n];
            matmul_f32(
                &Int8Panels::pack(&w, n, k).unwrap(),
                &UnsignedRows::from_codes(&q, m, k),
                m,
                r,
                &mut got,
            );
            assert!(got.iter().zip(&acc).all(|(&g, &a)| g == a as f32), "{av} · {wv}");
        }
    }
}
