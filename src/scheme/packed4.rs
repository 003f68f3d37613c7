//! The 4-bit block format shared by `int4-block`, `nf4`, `fp4` and 16-cluster `kmeans`:
//! codes packed two per byte (first value in the high nibble) over the flattened weight,
//! blocks of consecutive values each with its own scale (and optional offset), and the
//! kernels that multiply by it: a fused GEMV for decode (no dequantized copy of the
//! matrix) and dequantize-then-GEMM for prefill.
//!
//! The fused GEMV has three paths ([`Gemv`]): the scalar f32 reference; an AVX2 f32 path
//! that decodes nibbles to f32 and multiplies with FMAs (exact numerics, compute-bound at
//! a fifth of memory bandwidth); and, by default on AVX2 where the shape allows, the
//! fixed-point path of [`super::kernels::packed4_gemv`] (activations rounded to 16-bit fixed point
//! per 32 values, integer block dot products; memory-bound). Scheme parameter
//! `exact_gemv: true` keeps the exact f32 path. Prefill (more than [`GEMV_MAX_ROWS`]
//! rows) always runs the exact dequantize-then-GEMM, so divergence measured on prefill
//! chunks does not depend on the GEMV path.
//!
//! A weight value is `table[code] * scale[block] + offset[block]`. The 16-entry `table`
//! is what differs between schemes (signed integers for int4, the NF4/FP4 code books,
//! k-means centroids); blocks run over the flattened `[rows, cols]` weight, so a block
//! may span two rows and a row may start in the middle of a block or a byte.

use crate::tensor::skinny::{WeightRows, SKINNY_MAX_ROWS};
use rayon::prelude::*;

/// Above this many activation rows, `forward` dequantizes row panels and runs the f32
/// GEMM instead of the fused GEMV. Measured on the 2-core AMD EPYC (Zen 3, AVX2) this
/// crate is developed on, fixed-point GEMV against SIMD dequantize + `gemm`, best of
/// several runs, 32 weights rotated so they stream from memory; ms at m = 16 / 32 / 48 / 64:
/// - SmolLM2's 1536×576: fused 0.48 / 0.98 / 1.66 / 2.02, dequant+GEMM 0.55 / 0.81 / 1.01 / 1.69;
/// - SmolLM2's 576×1536: fused 0.61 / 1.18 / 1.34 / 1.53, dequant+GEMM 0.82 / 1.17 / 1.04 / 1.08.
///
/// They cross between 16 and 32 rows on the real model's layers, so 32 stays. (A
/// 4096×4096 weight crosses near 100 rows: there the `gemm` crate runs few rows against a
/// long `k` at 10–80 GFLOP/s, and the fused GEMV wins longer. `benches/int4_gemv.rs`
/// times that shape.)
pub const GEMV_MAX_ROWS: usize = 32;

/// Values dequantized per panel on the prefill path (4 MiB of f32): bounds the
/// temporary so a prefill never holds a full f32 copy of the weight.
const PANEL_VALUES: usize = 1 << 20;

/// Most output rows per parallel task of the fused GEMV ([`Packed4::task_rows`] picks
/// the size).
const ROWS_PER_TASK: usize = 64;

/// A `[rows, cols]` weight in the shared 4-bit block format.
#[derive(Debug, Clone)]
pub struct Packed4 {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Values per block over the flattened weight (≥ 1).
    pub block: usize,
    /// `ceil(rows·cols / 2)` bytes, value `i` in the high nibble of byte `i/2` when `i`
    /// is even, the low nibble when odd; an odd count ends with a zero low nibble.
    pub bytes: Vec<u8>,
    /// The value of each 4-bit code before scaling.
    pub table: [f32; 16],
    /// One scale per block.
    pub scales: Vec<f32>,
    /// One offset per block (asymmetric formats), added after scaling.
    pub offsets: Option<Vec<f32>>,
    /// Keep the fused GEMV's activations in f32 (the exact path) instead of 16-bit fixed
    /// point (see [`super::kernels::packed4_gemv`]): slower, bit for bit the reference numerics.
    pub exact_gemv: bool,
}

/// The fused GEMV paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemv {
    /// Exact f32 activations, portable scalar loop (the reference).
    Scalar,
    /// Exact f32 activations, nibbles decoded to f32 with AVX2 and multiplied with FMAs.
    Avx2,
    /// 16-bit fixed-point activations and exact integer block dot products
    /// ([`super::kernels::packed4_gemv`]), AVX2.
    Avx2Fixed,
    /// As [`Gemv::Avx2Fixed`] for weights of whole chunk pairs, the products on bytes
    /// with AVX-512 VNNI ([`super::kernels::packed4_gemv::vnni`]): the same sums, so the
    /// same bits.
    VnniFixed,
}

impl Gemv {
    /// The name reported as the case's kernel.
    pub fn name(self) -> &'static str {
        match self {
            Gemv::Scalar => "fused-gemv-scalar (m<=32) / dequant-f32-gemm",
            Gemv::Avx2 => "fused-gemv-avx2-f32 (m<=32) / dequant-f32-gemm",
            Gemv::Avx2Fixed => "fused-gemv-avx2-q15 (m<=32) / dequant-f32-gemm",
            Gemv::VnniFixed => "fused-gemv-vnni-q15 (m<=32) / dequant-f32-gemm",
        }
    }
}

/// The scheme parameter that keeps the fused GEMV exact ([`Packed4::exact_gemv`]), shared
/// by `int4-block`, `nf4` and `fp4`.
pub(super) const EXACT_GEMV_PARAM: super::ParamInfo = super::ParamInfo {
    name: "exact_gemv",
    kind: super::ParamKind::Bool,
    default: "false",
    help: "decode with f32 activations (exact, slower) instead of 16-bit fixed-point ones",
};

/// Below this many weight values a GEMV runs on one thread: waking the pool costs more
/// than reading the weight.
///
/// Why this size: at 256 Ki, SmolLM2's 192 × 576 key and value projections ran on one
/// thread. On two threads of the Xeon (best of 30 calls, each shape rotated through more
/// copies than fit in L2) they take 3.9–4.5 µs instead of 5.3–6.2, and 256 × 256 takes
/// 3.0–3.3 µs instead of 3.5 and more; SmolLM2's decode-step GEMVs went from 3.9 to 3.7
/// ms (medians of 4 alternated runs, int4-block and nf4 alike).
const SERIAL_VALUES: usize = 64 * 1024;

/// Pack 4-bit codes two per byte, the first in the high nibble; an odd count is padded
/// with a zero nibble. Codes above 15 keep their low nibble.
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes.chunks(2).map(|p| (p[0] & 0x0F) << 4 | p.get(1).map_or(0, |c| c & 0x0F)).collect()
}

/// Code `i` of nibble-packed `bytes`.
#[inline(always)]
pub fn nibble(bytes: &[u8], i: usize) -> u8 {
    let b = bytes[i / 2];
    if i.is_multiple_of(2) {
        b >> 4
    } else {
        b & 0x0F
    }
}

/// Number of blocks of `block` values covering `n` values.
pub fn block_count(n: usize, block: usize) -> usize {
    n.div_ceil(block)
}

/// Quantize `data` block by block: `quantize(values, codes)` writes one code per value of
/// a block and returns what the block stores (its scale, its minimum). Blocks are
/// independent, so groups of them go to the thread pool; codes and per-block results come
/// back in order, the same as a serial loop.
pub fn quantize_blocks<T: Send>(
    data: &[f32],
    block: usize,
    quantize: impl Fn(&[f32], &mut [u8]) -> T + Sync,
) -> (Vec<u8>, Vec<T>) {
    const BLOCKS_PER_TASK: usize = 512;
    let span = block.max(1) * BLOCKS_PER_TASK;
    let mut codes = vec![0u8; data.len()];
    let per_task: Vec<Vec<T>> = data
        .par_chunks(span)
        .zip(codes.par_chunks_mut(span))
        .map(|(values, codes)| {
            values
                .chunks(block.max(1))
                .zip(codes.chunks_mut(block.max(1)))
                .map(|(v, c)| quantize(v, c))
                .collect()
        })
        .collect();
    (codes, per_task.into_iter().flatten().collect())
}

impl Packed4 {
    /// Weight value `i` of the flattened matrix.
    #[inline(always)]
    pub fn value(&self, i: usize) -> f32 {
        let b = i / self.block;
        let v = self.table[nibble(&self.bytes, i) as usize] * self.scales[b];
        match &self.offsets {
            Some(o) => v + o[b],
            None => v,
        }
    }

    /// Dequantize flattened values `start..start + out.len()` into `out`, bit for bit
    /// [`Self::value`] (with AVX2, 32 values per step).
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        assert!(start + out.len() <= self.rows * self.cols, "packed4 dequantize: range past the weight");
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA checked; the range lies in the weight (asserted above).
            match decode_mode(&self.table) {
                DECODE_SIGNED => unsafe { dequantize_avx2::<DECODE_SIGNED>(self, start, out) },
                DECODE_UNSIGNED => unsafe { dequantize_avx2::<DECODE_UNSIGNED>(self, start, out) },
                _ => unsafe { dequantize_avx2::<DECODE_TABLE>(self, start, out) },
            }
            return;
        }
        self.dequantize_scalar(start, out);
    }

    /// [`Self::dequantize_range`] value by value: the reference.
    pub fn dequantize_scalar(&self, start: usize, out: &mut [f32]) {
        for (k, v) in out.iter_mut().enumerate() {
            *v = self.value(start + k);
        }
    }

    /// The whole weight as f32 (tests and reference paths).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.dequantize_range(0, &mut out);
        out
    }

    /// The kernels `matmul` runs on this CPU: the fused GEMV for decode, dequantized
    /// panels through the f32 GEMM for prefill.
    pub fn kernel(&self) -> &'static str {
        self.gemv_path().name()
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ` (no bias): fused GEMV up to [`GEMV_MAX_ROWS`]
    /// activation rows, dequantized panels through the f32 GEMM above.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "packed4 matmul: input is not [m, cols]");
        assert_eq!(out.len(), m * self.rows, "packed4 matmul: output is not [m, rows]");
        if m > GEMV_MAX_ROWS {
            self.dequant_gemm(x, m, out);
        } else {
            self.gemv(x, m, out, self.gemv_path());
        }
    }

    /// Dequantize panels of output rows and multiply each with the f32 GEMM (the prefill
    /// path; public so the benchmark can time it at any row count). From 2 to
    /// [`SKINNY_MAX_ROWS`] activation rows, each task of the skinny product dequantizes
    /// its own block of weight rows into a buffer that stays in cache.
    ///
    /// Why: a panel of 4 MiB left L2 between its dequantization and its product, and the
    /// dequantization ran as a pass of its own. SmolLM2's 64-token prefill on two threads
    /// of the Xeon (3 alternated runs): int4-block 112–123 → 85–96 ms, NF4 115–118 →
    /// 89–93 ms, the same bits.
    pub fn dequant_gemm(&self, x: &[f32], m: usize, out: &mut [f32]) {
        if (2..=SKINNY_MAX_ROWS).contains(&m) {
            crate::tensor::skinny::matmul_nt_skinny_rows(
                x,
                m,
                self.cols,
                &DequantizedRows(self),
                self.rows,
                out,
            );
            return;
        }
        let (rows, cols) = (self.rows, self.cols);
        let panel_rows = (PANEL_VALUES / cols.max(1)).clamp(1, rows.max(1));
        let mut panel = vec![0.0f32; panel_rows * cols];
        let mut product = vec![0.0f32; m * panel_rows];
        for r0 in (0..rows).step_by(panel_rows) {
            let n = panel_rows.min(rows - r0);
            let panel = &mut panel[..n * cols];
            let work = || crate::profile::Work { ops: (n * cols) as f64, bytes: (n * cols) as f64 * 4.5 };
            let dequantizing = crate::profile::span("dequantization", "4-bit to f32 panels", work);
            panel.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, dst)| {
                self.dequantize_range((r0 + r) * cols, dst);
            });
            drop(dequantizing);
            let product = &mut product[..m * n];
            crate::tensor::matmul_nt(x, m, cols, panel, n, product);
            for i in 0..m {
                out[i * rows + r0..i * rows + r0 + n].copy_from_slice(&product[i * n..(i + 1) * n]);
            }
        }
    }

    /// For one activation row: run `rows(r0, dst)` over runs of [`ROWS_PER_TASK`] weight
    /// rows from `r0` (`dst`: their outputs, written in place), in parallel for large
    /// weights.
    pub(crate) fn run_row_runs(&self, out: &mut [f32], rows: impl Fn(usize, &mut [f32]) + Sync) {
        let span = self.task_rows();
        let task = |(t, dst): (usize, &mut [f32])| rows(t * span, dst);
        if self.rows * self.cols < SERIAL_VALUES {
            out.chunks_mut(span).enumerate().for_each(task);
        } else {
            out.par_chunks_mut(span).enumerate().for_each(task);
        }
    }

    /// Weight rows per task: at most [`ROWS_PER_TASK`], in a count of tasks that the
    /// pool's threads share evenly.
    ///
    /// Why: in tasks of 64 a 192-row projection (SmolLM2's k and v) made 3 tasks, two on
    /// one thread and one on the other, and a 576-row one 9; the thread left over waited.
    fn task_rows(&self) -> usize {
        crate::tensor::balanced_task_len(self.rows, ROWS_PER_TASK)
    }

    /// Run `row(r, dst)` for every weight row `r` (`dst`: its `m` outputs), in tasks of
    /// [`ROWS_PER_TASK`] rows, and scatter the results into `out` (`[m, rows]`).
    pub(crate) fn run_tasks(&self, m: usize, out: &mut [f32], row: impl Fn(usize, &mut [f32]) + Sync) {
        let rows = self.rows;
        if m == 0 || rows == 0 {
            return;
        }
        let serial = m * rows * self.cols < SERIAL_VALUES;
        if m == 1 {
            self.run_row_runs(out, |r0, dst| {
                for (r, d) in dst.iter_mut().enumerate() {
                    row(r0 + r, std::slice::from_mut(d));
                }
            });
            return;
        }
        let span = self.task_rows();
        let task = |t: usize| {
            let r0 = t * span;
            let n = span.min(rows - r0);
            let mut local = vec![0.0f32; n * m];
            for (r, dst) in local.chunks_exact_mut(m).enumerate() {
                row(r0 + r, dst);
            }
            local
        };
        let count = rows.div_ceil(span);
        let tasks: Vec<Vec<f32>> = if serial {
            (0..count).map(task).collect()
        } else {
            (0..count).into_par_iter().map(task).collect()
        };
        for (t, local) in tasks.iter().enumerate() {
            let r0 = t * span;
            for (r, vals) in local.chunks_exact(m).enumerate() {
                for (i, v) in vals.iter().enumerate() {
                    out[i * rows + r0 + r] = *v;
                }
            }
        }
    }

    /// `dst[i] = x[i] · W[r]` for every activation row `i` (`dst.len()` rows of `x`).
    pub(crate) fn row_dots(&self, r: usize, x: &[f32], dst: &mut [f32], avx2: bool) {
        let cols = self.cols;
        let mut i = 0;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            match decode_mode(&self.table) {
                DECODE_SIGNED => i = self.row_dots_avx2::<DECODE_SIGNED>(r, x, dst),
                DECODE_UNSIGNED => i = self.row_dots_avx2::<DECODE_UNSIGNED>(r, x, dst),
                _ => i = self.row_dots_avx2::<DECODE_TABLE>(r, x, dst),
            }
        }
        for (k, d) in dst.iter_mut().enumerate().skip(i) {
            *d = self.row_dot(r, &x[k * cols..(k + 1) * cols]);
        }
    }

    /// The AVX2 part of [`Self::row_dots`]: every activation row, returning how many were
    /// done (all of them). Only called when the CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    fn row_dots_avx2<const D: u8>(&self, r: usize, x: &[f32], dst: &mut [f32]) -> usize {
        let cols = self.cols;
        let mut i = 0;
        // Four activation rows share each decoded weight vector; the rest go one by one.
        while i + 4 <= dst.len() {
            let xs: [&[f32]; 4] = std::array::from_fn(|k| &x[(i + k) * cols..(i + k + 1) * cols]);
            // SAFETY: only called when the CPU was checked to have AVX2 and FMA.
            let d = unsafe { row_dot_avx2::<4, D>(self, r, xs) };
            dst[i..i + 4].copy_from_slice(&d);
            i += 4;
        }
        while i < dst.len() {
            // SAFETY: as above.
            dst[i] = unsafe { row_dot_avx2::<1, D>(self, r, [&x[i * cols..(i + 1) * cols]]) }[0];
            i += 1;
        }
        i
    }

    /// Dot product of weight row `r` with `x` (`cols` values), block piece by piece: the
    /// scalar reference of the fused GEMV.
    fn row_dot(&self, r: usize, x: &[f32]) -> f32 {
        let start = r * self.cols;
        let end = start + self.cols;
        let mut sum = 0.0f32;
        let mut a = start;
        while a < end {
            let b = a / self.block;
            let e = ((b + 1) * self.block).min(end);
            let (dot, xsum) =
                piece_scalar(&self.bytes, a, &x[a - start..e - start], &self.table, self.offsets.is_some());
            sum += dot * self.scales[b];
            if let Some(o) = &self.offsets {
                sum += xsum * o[b];
            }
            a = e;
        }
        sum
    }
}

/// Whether the fused GEMV's SIMD path can run here.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Within one block: `(Σ table[code(a+k)]·x[k], Σ x[k])` (the second only when
/// `want_xsum`, for the block's offset).
fn piece_scalar(bytes: &[u8], a: usize, x: &[f32], table: &[f32; 16], want_xsum: bool) -> (f32, f32) {
    let mut dot = 0.0f32;
    let mut xsum = 0.0f32;
    for (k, &xv) in x.iter().enumerate() {
        dot += table[nibble(bytes, a + k) as usize] * xv;
        if want_xsum {
            xsum += xv;
        }
    }
    (dot, xsum)
}

/// AVX2 version of [`Packed4::row_dot`] for `M` activation rows at once: 16 codes
/// (8 bytes) per step, split into nibbles in order, looked up in the 16-entry table with
/// two 8-lane permutes, multiplied into each activation row. Each block's products
/// accumulate in vectors and are scaled once at the block's end; only a piece starting on
/// a low nibble (odd flattened index) and the last `< 16` values of a piece go through
/// scalar code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2<const M: usize, const D: u8>(p: &Packed4, r: usize, x: [&[f32]; M]) -> [f32; M] {
    use std::arch::x86_64::*;
    let start = r * p.cols;
    let end = start + p.cols;
    let bytes = &p.bytes;
    let lut_lo = _mm256_loadu_ps(p.table.as_ptr());
    let lut_hi = _mm256_loadu_ps(p.table.as_ptr().add(8));
    let mut total = [_mm256_setzero_ps(); M];
    let mut scalar = [0.0f32; M];
    let mut a = start;
    while a < end {
        let b = a / p.block;
        let e = ((b + 1) * p.block).min(end);
        let scale = p.scales[b];
        let offset = p.offsets.as_ref().map(|o| o[b]);
        let mut k = a - start;
        let stop = e - start;
        if a % 2 == 1 {
            // A piece starting on a low nibble takes its first value alone, so the vector
            // loop starts on a byte boundary.
            let w = p.table[nibble(bytes, a) as usize];
            for i in 0..M {
                scalar[i] += w * scale * x[i][k] + offset.map_or(0.0, |o| o * x[i][k]);
            }
            k += 1;
        }
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        let mut xacc = [_mm256_setzero_ps(); M];
        // 32 values (16 bytes) per step into four independent accumulators per row, so
        // the FMA latency chain does not bound the loop.
        while k + 32 <= stop {
            // SAFETY: flattened values start+k .. start+k+32 lie in the weight and
            // start+k is even here, so bytes (start+k)/2 .. +16 exist; x[i][k..k+32] is
            // in bounds because k + 32 <= stop <= cols.
            let byte_at = (start + k) / 2;
            debug_assert!(byte_at + 16 <= bytes.len());
            let raw = _mm_loadu_si128(bytes.as_ptr().add(byte_at) as *const __m128i);
            let (first, second) = codes_in_order(raw);
            let (w0, w1) = decode16::<D>(first, lut_lo, lut_hi);
            let (w2, w3) = decode16::<D>(second, lut_lo, lut_hi);
            for i in 0..M {
                let xp = x[i].as_ptr().add(k);
                let (x0, x1, x2, x3) = (
                    _mm256_loadu_ps(xp),
                    _mm256_loadu_ps(xp.add(8)),
                    _mm256_loadu_ps(xp.add(16)),
                    _mm256_loadu_ps(xp.add(24)),
                );
                acc[i][0] = _mm256_fmadd_ps(w0, x0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, x1, acc[i][1]);
                acc[i][2] = _mm256_fmadd_ps(w2, x2, acc[i][2]);
                acc[i][3] = _mm256_fmadd_ps(w3, x3, acc[i][3]);
                if offset.is_some() {
                    xacc[i] =
                        _mm256_add_ps(xacc[i], _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)));
                }
            }
            k += 32;
        }
        while k + 16 <= stop {
            // SAFETY: as above, for 16 values (8 bytes).
            let byte_at = (start + k) / 2;
            debug_assert!(byte_at + 8 <= bytes.len());
            let raw = _mm_loadl_epi64(bytes.as_ptr().add(byte_at) as *const __m128i);
            let (w0, w1) = decode16::<D>(codes_in_order(raw).0, lut_lo, lut_hi);
            for i in 0..M {
                let x0 = _mm256_loadu_ps(x[i].as_ptr().add(k));
                let x1 = _mm256_loadu_ps(x[i].as_ptr().add(k + 8));
                acc[i][0] = _mm256_fmadd_ps(w0, x0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(w1, x1, acc[i][1]);
                if offset.is_some() {
                    xacc[i] = _mm256_add_ps(xacc[i], _mm256_add_ps(x0, x1));
                }
            }
            k += 16;
        }
        let acc: [__m256; M] = std::array::from_fn(|i| {
            _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3]))
        });
        let vscale = _mm256_set1_ps(scale);
        for i in 0..M {
            total[i] = _mm256_fmadd_ps(acc[i], vscale, total[i]);
            if let Some(o) = offset {
                total[i] = _mm256_fmadd_ps(xacc[i], _mm256_set1_ps(o), total[i]);
            }
        }
        for i in 0..M {
            let (dot, xsum) = piece_scalar(bytes, start + k, &x[i][k..stop], &p.table, offset.is_some());
            scalar[i] += dot * scale + offset.map_or(0.0, |o| o * xsum);
        }
        a = e;
    }
    std::array::from_fn(|i| hsum(total[i]) + scalar[i])
}

/// [`Packed4::dequantize_range`] with AVX2: block piece by block piece, 32 values (16
/// bytes) per step decoded as in the fused GEMV, then `table · scale` and `+ offset` as
/// two rounded operations (no FMA), exactly as [`Packed4::value`] computes them. A piece
/// starting on a low nibble and the last `< 32` values of a piece go value by value.
///
/// # Safety
/// The CPU must have AVX2 and FMA, and `start + out.len() ≤ rows·cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_avx2<const D: u8>(p: &Packed4, start: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (lut_lo, lut_hi) = (_mm256_loadu_ps(p.table.as_ptr()), _mm256_loadu_ps(p.table.as_ptr().add(8)));
    let end = start + out.len();
    let mut a = start;
    while a < end {
        let b = a / p.block;
        let e = ((b + 1) * p.block).min(end);
        let scale = _mm256_set1_ps(*p.scales.get_unchecked(b));
        let offset = p.offsets.as_ref().map(|o| _mm256_set1_ps(*o.get_unchecked(b)));
        if a % 2 == 1 {
            out[a - start] = p.value(a);
            a += 1;
        }
        while a + 32 <= e {
            // SAFETY: values a..a+32 lie in the weight and `a` is even, so bytes
            // a/2..a/2+16 exist; `out` holds a-start..a-start+32.
            let raw = _mm_loadu_si128(p.bytes.as_ptr().add(a / 2) as *const __m128i);
            let (first, second) = codes_in_order(raw);
            let (w0, w1) = decode16::<D>(first, lut_lo, lut_hi);
            let (w2, w3) = decode16::<D>(second, lut_lo, lut_hi);
            let dst = out.as_mut_ptr().add(a - start);
            for (j, w) in [w0, w1, w2, w3].into_iter().enumerate() {
                let v = _mm256_mul_ps(w, scale);
                let v = offset.map_or(v, |o| _mm256_add_ps(v, o));
                _mm256_storeu_ps(dst.add(8 * j), v);
            }
            a += 32;
        }
        while a < e {
            out[a - start] = p.value(a);
            a += 1;
        }
    }
}

/// How the fused GEMV turns codes into values.
const DECODE_TABLE: u8 = 0;
/// The table is `(u + 8) % 16 - 8` (int4-block symmetric): a sign extension.
const DECODE_SIGNED: u8 = 1;
/// The table is `u` (int4-block asymmetric): a zero extension.
const DECODE_UNSIGNED: u8 = 2;

/// The cheapest exact decoding of `table`: integer conversion for the two integer
/// tables, a lookup otherwise.
fn decode_mode(table: &[f32; 16]) -> u8 {
    if table.iter().enumerate().all(|(u, &v)| v == ((u as i32 + 8) % 16 - 8) as f32) {
        DECODE_SIGNED
    } else if table.iter().enumerate().all(|(u, &v)| v == u as f32) {
        DECODE_UNSIGNED
    } else {
        DECODE_TABLE
    }
}

/// The 32 codes of 16 packed bytes, one per byte in flattened order (each byte's high
/// nibble, then its low one): the codes of bytes 0–7, then of bytes 8–15.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn codes_in_order(
    raw: std::arch::x86_64::__m128i,
) -> (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0F);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    let lo = _mm_and_si128(raw, mask);
    (_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo))
}

/// The values of 16 codes (one per byte of `codes`, in order) as two 8-lane vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn decode16<const D: u8>(
    codes: std::arch::x86_64::__m128i,
    lut_lo: std::arch::x86_64::__m256,
    lut_hi: std::arch::x86_64::__m256,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let upper = _mm_srli_si128(codes, 8);
    match D {
        DECODE_SIGNED => {
            let eight = _mm_set1_epi8(8);
            let s = _mm_sub_epi8(_mm_xor_si128(codes, eight), eight);
            (
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s, 8))),
            )
        }
        DECODE_UNSIGNED => {
            (_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(upper)))
        }
        _ => (
            lookup(lut_lo, lut_hi, _mm256_cvtepu8_epi32(codes)),
            lookup(lut_lo, lut_hi, _mm256_cvtepu8_epi32(upper)),
        ),
    }
}

/// `table[codes]` for 8 codes in 0..16: each half of the table by a lane permute, the
/// half chosen by bit 3 of the code (moved to the sign bit for the blend).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn lookup(
    lut_lo: std::arch::x86_64::__m256,
    lut_hi: std::arch::x86_64::__m256,
    codes: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let lo = _mm256_permutevar8x32_ps(lut_lo, codes);
    let hi = _mm256_permutevar8x32_ps(lut_hi, codes);
    let select = _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28));
    _mm256_blendv_ps(lo, hi, select)
}

/// Sum of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Shared test helpers for the 4-bit schemes.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::tensor::SeededRng;

    /// A random packed weight with random codes, scales and (optionally) offsets.
    pub fn random(rows: usize, cols: usize, block: usize, offsets: bool, seed: u64) -> Packed4 {
        let mut rng = SeededRng::new(seed);
        let n = rows * cols;
        let codes: Vec<u8> = (0..n).map(|_| (rng.next_u64() % 16) as u8).collect();
        let nb = block_count(n, block);
        let mut table = [0.0f32; 16];
        table.iter_mut().for_each(|t| *t = rng.normal() as f32);
        Packed4 {
            rows,
            cols,
            block,
            bytes: pack_nibbles(&codes),
            table,
            scales: rng.normal_vec(nb, 1.0),
            offsets: offsets.then(|| rng.normal_vec(nb, 1.0)),
            exact_gemv: false,
        }
    }
}

/// A 4-bit weight's rows as the skinny product takes them: dequantized per task.
struct DequantizedRows<'a>(&'a Packed4);

impl WeightRows for DequantizedRows<'_> {
    fn rows<'s>(&'s self, j0: usize, rows: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        scratch.resize(rows * k, 0.0);
        self.0.dequantize_range(j0 * k, scratch);
        scratch
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn packing_puts_the_first_value_in_the_high_nibble_and_pads_odd_counts() {
        assert_eq!(pack_nibbles(&[1, 2, 3, 4, 5]), vec![0x12, 0x34, 0x50]);
        let bytes = pack_nibbles(&[0xA, 0xB, 0xC]);
        assert_eq!((nibble(&bytes, 0), nibble(&bytes, 1), nibble(&bytes, 2)), (0xA, 0xB, 0xC));
    }

    #[test]
    fn simd_dequantize_equals_value_by_value_bit_for_bit() {
        let signed: [f32; 16] = std::array::from_fn(|u| ((u as i32 + 8) % 16 - 8) as f32);
        let unsigned: [f32; 16] = std::array::from_fn(|u| u as f32);
        for (seed, &(rows, cols, block)) in
            [(3, 5, 4), (7, 33, 16), (9, 300, 128), (33, 129, 64), (4, 64, 200)].iter().enumerate()
        {
            for offsets in [false, true] {
                let mut p = random(rows, cols, block, offsets, seed as u64);
                for table in [p.table, signed, unsigned] {
                    p.table = table;
                    let n = rows * cols;
                    // Ranges starting on odd and even values, ending anywhere.
                    for (start, len) in [(0, n), (1, n - 1), (cols, n - cols), (3, n / 2), (n - 1, 1)] {
                        let (mut fast, mut slow) = (vec![0.0f32; len], vec![1.0f32; len]);
                        p.dequantize_range(start, &mut fast);
                        p.dequantize_scalar(start, &mut slow);
                        let same = fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{rows}x{cols} block {block} from {start}: dequantize differs");
                    }
                }
            }
        }
    }

    #[test]
    fn prefill_products_are_the_f32_products_of_the_dequantized_weight() {
        // Rows of activations on the skinny path (weight rows dequantized per task), at its
        // limit and past it (panels): the bits of the f32 product of the whole weight.
        let p = random(150, 96, 32, true, 8);
        for m in [2, 33, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1] {
            let x = crate::tensor::SeededRng::new(m as u64).normal_vec(m * p.cols, 1.0);
            let mut want = vec![0.0; m * p.rows];
            crate::tensor::matmul_nt(&x, m, p.cols, &p.dequantize(), p.rows, &mut want);
            let mut got = vec![f32::NAN; m * p.rows];
            p.dequant_gemm(&x, m, &mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "m = {m}");
        }
    }

    #[test]
    fn a_block_spanning_two_rows_uses_one_scale() {
        // 2 rows of 3 with block 4: block 0 = row 0 + the first value of row 1.
        let mut table = [0.0f32; 16];
        table.iter_mut().enumerate().for_each(|(i, t)| *t = i as f32);
        let p = Packed4 {
            rows: 2,
            cols: 3,
            block: 4,
            bytes: pack_nibbles(&[1, 2, 3, 4, 5, 6]),
            table,
            scales: vec![10.0, 100.0],
            offsets: None,
            exact_gemv: false,
        };
        assert_eq!(p.dequantize(), vec![10.0, 20.0, 30.0, 40.0, 500.0, 600.0]);
        let mut out = vec![0.0; 2];
        p.gemv(&[1.0, 1.0, 1.0], 1, &mut out, p.gemv_path());
        assert_eq!(out, vec![60.0, 1140.0]);
    }
}
