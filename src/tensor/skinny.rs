//! `out[m, n] = a[m, k] · w[n, k]ᵀ` for a few rows (`m` from 2 to [`SKINNY_MAX_ROWS`]):
//! short prefills and small batches, where the `gemm` crate's general path ran at 25–70
//! GFLOP/s on SmolLM2's shapes (16 to 64 rows; this kernel: 77–132 on a 2-core AMD EPYC)
//! while its one-row path streams weights at the memory's speed.
//!
//! Each weight row is read once per tile of `TILE_W` rows and dotted with every row of
//! `a` in tiles of `TILE_A`: `TILE_W × TILE_A` accumulators of eight lanes in registers,
//! fused multiply-adds along `k`, then each accumulator's lanes summed in a fixed order
//! and the `k % 8` tail added. The scalar path computes the same operations in the same
//! order, so both give the same bits; blocks of weight rows go to the thread pool.
//!
//! With AVX-512, a register holds two rows' eight-lane accumulators side by side (the
//! weight vector broadcast to both halves), so each lane sums exactly what the AVX2
//! lane sums and the bits stay the same, at twice the work per instruction: tiles of
//! 8 rows of `a` × 6 weight rows, the edges in AVX2 tiles.

use rayon::prelude::*;

/// Most rows of `a` this kernel takes; more go to the `gemm` crate, whose packed kernels
/// then win (measured on SmolLM2's shapes: even at 128 rows, 232 against 241 ms per
/// pass; at 256, 438 against 397).
pub const SKINNY_MAX_ROWS: usize = 128;

/// Weight rows per register tile. With [`TILE_A`]: 12 accumulators, 3 weight vectors and
/// one row vector, AVX2's 16 registers (a 4 × 4 tile spills: half the speed).
const TILE_W: usize = 3;
/// Rows of `a` per register tile.
const TILE_A: usize = 4;
/// Lanes of an accumulator.
const LANES: usize = 8;
/// Weight rows per task of the thread pool (a multiple of [`TILE_W`]).
const ROWS_PER_TASK: usize = 48;

/// `out[m, n] = a[m, k] · w[n, k]ᵀ`, row-major, on AVX2 and FMA when the CPU has them
/// (the same bits either way).
pub fn matmul_nt_skinny(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(w.len(), n * k, "matmul_nt_skinny: weight is not [n, k]");
    matmul_nt_skinny_rows(a, m, k, w, n, out);
}

/// Where the skinny product gets a task's block of weight rows as f32: the weights
/// themselves, or 16-bit weights widened into the task's scratch buffer, which stays in
/// cache while the block is multiplied.
pub trait WeightRows: Sync {
    /// Rows `j0 .. j0 + rows` (each `k` long) as f32.
    fn rows<'s>(&'s self, j0: usize, rows: usize, k: usize, scratch: &'s mut Vec<f32>) -> &'s [f32];

    /// Whether the rows come straight from memory, so that the kernel should prefetch
    /// the next tile's; rows made in the task's scratch are in cache already (prefetching
    /// them made 4-bit prefill 3% slower).
    const FROM_MEMORY: bool = false;
}

impl WeightRows for [f32] {
    const FROM_MEMORY: bool = true;

    fn rows<'s>(&'s self, j0: usize, rows: usize, k: usize, _: &'s mut Vec<f32>) -> &'s [f32] {
        &self[j0 * k..(j0 + rows) * k]
    }
}

/// [`matmul_nt_skinny`] over any [`WeightRows`] (`n` rows of `k`).
pub fn matmul_nt_skinny_rows<W: WeightRows + ?Sized>(
    a: &[f32],
    m: usize,
    k: usize,
    w: &W,
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(a.len(), m * k, "matmul_nt_skinny: lhs is not [m, k]");
    assert_eq!(out.len(), m * n, "matmul_nt_skinny: output is not [m, n]");
    let path = Path::detect();
    let paired = if path == Path::Avx512 { pair_rows(a, m, k) } else { Vec::new() };
    // Each task computes the columns j0 .. j0 + ROWS_PER_TASK of every output row into a
    // buffer of its own and copies them into place itself: done after the tasks, on one
    // thread, the copies cost SmolLM2's 64-row prefill about 6% of its time (Xeon).
    let dst = super::DisjointOut::new(out);
    (0..n.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|t| {
        let j0 = t * ROWS_PER_TASK;
        let rows = ROWS_PER_TASK.min(n - j0);
        let mut part = super::scratch::take(m * rows);
        let mut scratch = Vec::new();
        let lhs = Lhs { a, paired: &paired, prefetch: W::FROM_MEMORY };
        block(lhs, m, k, w.rows(j0, rows, k, &mut scratch), rows, &mut part, path);
        for (i, src) in part.chunks_exact(rows).enumerate() {
            // SAFETY: out is m × n (asserted above) and j0 + rows ≤ n, so row i's columns
            // j0 .. j0 + rows lie inside it; they belong to this task alone, and `out`
            // stays borrowed until every task is done.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.at(i * n + j0), rows) };
        }
        super::scratch::recycle(part);
    });
    super::scratch::recycle(paired);
}

/// The tile kernels this CPU runs (all give the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Scalar,
    Avx2,
    Avx512,
}

impl Path {
    fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            return if std::arch::is_x86_feature_detected!("avx512f") { Path::Avx512 } else { Path::Avx2 };
        }
        Path::Scalar
    }
}

/// The rows of `a`, and for the AVX-512 tiles the same values with rows paired.
#[derive(Clone, Copy)]
struct Lhs<'a> {
    a: &'a [f32],
    /// The whole tiles' rows, paired and interleaved (see [`pair_rows`]); empty on the
    /// other paths.
    paired: &'a [f32],
    /// Whether the AVX-512 tiles prefetch the next tile's weights (see
    /// [`WeightRows::FROM_MEMORY`]).
    prefetch: bool,
}

/// The rows of `a` that fill whole AVX-512 tiles, laid out as the tile kernel reads them:
/// `[m / TILE_A, k / 8, TILE_A / 2, 16]`, each tile's step holding eight values of rows
/// `2p` and `2p + 1` in turn for each pair `p` (the tail past `k/8·8` left out). A step
/// then loads each row pair with one instruction instead of two loads and an insert,
/// which competed with the multiply-adds for a port, and a tile's rows are one stream
/// behind one pointer (four pointers had spilled to the stack).
fn pair_rows(a: &[f32], m: usize, k: usize) -> Vec<f32> {
    let tile_a = avx512_tile_a();
    let (tiles, steps) = (m / tile_a, k / LANES);
    let tile_len = steps * tile_a * LANES;
    // Every value is written below: a recycled buffer needs no zeroing.
    let mut paired = super::scratch::take(tiles * tile_len);
    // On the pool: done serially it cost a tenth of a 64-row product on two threads.
    paired.par_chunks_mut(tile_len.max(1)).enumerate().for_each(|(q, dst)| {
        let rows = &a[q * tile_a * k..][..tile_a * k];
        for (t, step) in dst.chunks_exact_mut(tile_a * LANES).enumerate() {
            for (r, eight) in step.chunks_exact_mut(LANES).enumerate() {
                eight.copy_from_slice(&rows[r * k + t * LANES..][..LANES]);
            }
        }
    });
    paired
}

/// Rows of `a` per AVX-512 tile (none where the module is not compiled).
fn avx512_tile_a() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        avx512::TILE_A
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        usize::MAX
    }
}

/// `part[m, rows] = a · w_blockᵀ` for one block of weight rows.
fn block(lhs: Lhs, m: usize, k: usize, w: &[f32], rows: usize, part: &mut [f32], path: Path) {
    let a = lhs.a;
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx512 {
        let (full_m, full_rows) =
            (m / avx512::TILE_A * avx512::TILE_A, rows / avx512::TILE_W * avx512::TILE_W);
        // Each tile prefetches the next tile's weights into L1, in shares over its passes
        // across the rows of `a`: without it each tile's first pass waited on memory
        // (SmolLM2's 64-token prefill: 165 against 185-192 GFLOP/s in its products, Xeon).
        // The last tile prefetches the rows after the block: the next task's, for weights
        // that lie in one slice (a prefetch past an allocation is dropped, not a fault).
        let a_tiles = full_m / avx512::TILE_A;
        let tile_lines = (avx512::TILE_W * k).div_ceil(avx512::LINE);
        let steps = (k / LANES).max(1);
        let per_step = match lhs.prefetch {
            true => tile_lines.div_ceil(steps * a_tiles.max(1)).min(avx512::MOST_PREFETCH_PER_STEP),
            false => 0,
        };
        for j in (0..full_rows).step_by(avx512::TILE_W) {
            let next = w.as_ptr().wrapping_add((j + avx512::TILE_W) * k);
            for i in (0..full_m).step_by(avx512::TILE_A) {
                // Lines the passes before this one prefetched: none left, none to do.
                let done = i / avx512::TILE_A * steps * per_step;
                let prefetch = avx512::Prefetch {
                    from: next.wrapping_add(done * avx512::LINE),
                    per_step: if done < tile_lines { per_step } else { 0 },
                };
                let mut sums = [[0.0f32; avx512::TILE_W]; avx512::TILE_A];
                // SAFETY: AVX-512F, AVX2 and FMA were detected; the tile lies inside a and w.
                unsafe { avx512::full(lhs, i, w, j, k, prefetch, &mut sums) };
                for (r, row) in sums.iter().enumerate() {
                    part[(i + r) * rows + j..][..avx512::TILE_W].copy_from_slice(row);
                }
            }
        }
        // The edges: the last weight rows for every row of `a`, the last rows of `a`.
        tiles(a, k, w, (0..m, full_rows..rows), rows, part, Path::Avx2);
        tiles(a, k, w, (full_m..m, 0..full_rows), rows, part, Path::Avx2);
        return;
    }
    tiles(a, k, w, (0..m, 0..rows), rows, part, path);
}

/// `part` for rows `ms` of `a` against rows `js` of the block (`rows` weight rows in all),
/// in `TILE_A × TILE_W` tiles.
fn tiles(
    a: &[f32],
    k: usize,
    w: &[f32],
    (ms, js): (std::ops::Range<usize>, std::ops::Range<usize>),
    rows: usize,
    part: &mut [f32],
    path: Path,
) {
    let fast = path != Path::Scalar;
    for j in js.clone().step_by(TILE_W) {
        let tw = TILE_W.min(js.end - j);
        for i in ms.clone().step_by(TILE_A) {
            let ta = TILE_A.min(ms.end - i);
            let (mut sums, at) = ([[0.0f32; TILE_W]; TILE_A], At { i, ta, j, tw });
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: AVX2 and FMA were detected by the caller.
                unsafe { avx2::tile(a, w, k, at, &mut sums) };
            } else {
                tile(a, w, k, at, &mut sums);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = fast;
                tile(a, w, k, at, &mut sums);
            }
            for (r, row) in sums.iter().enumerate().take(ta) {
                part[(i + r) * rows + j..][..tw].copy_from_slice(&row[..tw]);
            }
        }
    }
}

/// Where a register tile sits: rows `i .. i + ta` of `a` against rows `j .. j + tw` of `w`.
#[derive(Clone, Copy)]
struct At {
    i: usize,
    ta: usize,
    j: usize,
    tw: usize,
}

/// The scalar tile: `sums[r][c] = a[i + r] · w[j + c]` for `r < ta`, `c < tw`. Inlined,
/// so that inside the AVX2 path (partial tiles) `mul_add` is one instruction, not a call.
#[inline(always)]
fn tile(a: &[f32], w: &[f32], k: usize, at: At, sums: &mut [[f32; TILE_W]; TILE_A]) {
    let At { i, ta, j, tw } = at;
    let body = k / LANES * LANES;
    for r in 0..ta {
        let ar = &a[(i + r) * k..][..k];
        for c in 0..tw {
            let wc = &w[(j + c) * k..][..k];
            let mut lanes = [0.0f32; LANES];
            for (ac, wv) in ar[..body].chunks_exact(LANES).zip(wc[..body].chunks_exact(LANES)) {
                for l in 0..LANES {
                    lanes[l] = ac[l].mul_add(wv[l], lanes[l]);
                }
            }
            let mut s = crate::tensor::sum_lanes(lanes);
            for t in body..k {
                s = ar[t].mul_add(wc[t], s);
            }
            sums[r][c] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{At, LANES, TILE_A, TILE_W};

    /// [`super::tile`] with the `TILE_A × TILE_W` accumulators in registers.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(a: &[f32], w: &[f32], k: usize, at: At, sums: &mut [[f32; TILE_W]; TILE_A]) {
        if at.ta == TILE_A && at.tw == TILE_W {
            full(a, at.i, w, at.j, k, sums);
        } else {
            super::tile(a, w, k, at, sums);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn full(a: &[f32], i: usize, w: &[f32], j: usize, k: usize, sums: &mut [[f32; TILE_W]; TILE_A]) {
        let body = k / LANES * LANES;
        let ap: [*const f32; TILE_A] = std::array::from_fn(|r| a.as_ptr().add((i + r) * k));
        let wp: [*const f32; TILE_W] = std::array::from_fn(|c| w.as_ptr().add((j + c) * k));
        let mut acc = [[_mm256_setzero_ps(); TILE_W]; TILE_A];
        let mut t = 0;
        while t < body {
            let wv: [__m256; TILE_W] = std::array::from_fn(|c| _mm256_loadu_ps(wp[c].add(t)));
            for r in 0..TILE_A {
                let av = _mm256_loadu_ps(ap[r].add(t));
                for c in 0..TILE_W {
                    acc[r][c] = _mm256_fmadd_ps(av, wv[c], acc[r][c]);
                }
            }
            t += LANES;
        }
        for r in 0..TILE_A {
            for c in 0..TILE_W {
                let mut lanes = [0.0f32; LANES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]);
                let mut s = crate::tensor::sum_lanes(lanes);
                for t in body..k {
                    s = (*ap[r].add(t)).mul_add(*wp[c].add(t), s);
                }
                sums[r][c] = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::LANES;

    /// Rows of `a` per tile: four registers of two rows each.
    pub const TILE_A: usize = 8;
    /// Weight rows per tile: 24 accumulators, 6 weight vectors and one row pair, 31 of
    /// the 32 registers. (Four weight rows left the loads and the pair inserts a larger
    /// share: one SmolLM2 layer at 64 rows took 2.64 ms on two threads, against 2.33.)
    pub const TILE_W: usize = 6;
    /// f32 values per cache line.
    pub const LINE: usize = 16;

    /// Cache lines a tile prefetches per step of eight values, at most: three cover the
    /// next tile of six rows in one pass (a tile of 8 rows of `a`).
    pub const MOST_PREFETCH_PER_STEP: usize = 3;

    /// What a tile prefetches while it runs: `per_step` cache lines a step, consecutive,
    /// from `from` on (any address: prefetches never fault).
    #[derive(Clone, Copy)]
    pub struct Prefetch {
        pub from: *const f32,
        pub per_step: usize,
    }

    /// `sums[r][c] = a[i + r] · w[j + c]` for a whole tile, each lane summing what the
    /// AVX2 and scalar paths' lane sums, in the same order; prefetching as `prefetch`
    /// says meanwhile.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and FMA; rows `i .. i + TILE_A` of `lhs.a` and `j .. j +
    /// TILE_W` of `w` (each `k` long) must exist, `i` a multiple of `TILE_A`, and
    /// `lhs.paired` must be [`super::pair_rows`] of `lhs.a` with those rows in it.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn full(
        lhs: super::Lhs,
        i: usize,
        w: &[f32],
        j: usize,
        k: usize,
        prefetch: Prefetch,
        sums: &mut [[f32; TILE_W]; TILE_A],
    ) {
        // A constant count per step: counted at run time, the prefetch loop's registers
        // pushed three row pointers to the stack.
        match prefetch.per_step {
            0 => tile::<0>(lhs, i, w, j, k, prefetch.from, sums),
            1 => tile::<1>(lhs, i, w, j, k, prefetch.from, sums),
            2 => tile::<2>(lhs, i, w, j, k, prefetch.from, sums),
            _ => tile::<MOST_PREFETCH_PER_STEP>(lhs, i, w, j, k, prefetch.from, sums),
        }
    }

    /// [`full`] with `PREFETCH` lines a step.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile<const PREFETCH: usize>(
        lhs: super::Lhs,
        i: usize,
        w: &[f32],
        j: usize,
        k: usize,
        mut prefetch: *const f32,
        sums: &mut [[f32; TILE_W]; TILE_A],
    ) {
        const PAIRS: usize = TILE_A / 2;
        let body = k / LANES * LANES;
        let ap: [*const f32; TILE_A] = std::array::from_fn(|r| lhs.a.as_ptr().add((i + r) * k));
        let wp: [*const f32; TILE_W] = std::array::from_fn(|c| w.as_ptr().add((j + c) * k));
        // This tile's steps, TILE_A · 8 values each: pair p's sixteen at 16·p.
        let mut tp = lhs.paired.as_ptr().add(i * (k / LANES) * LANES);
        let mut acc = [[_mm512_setzero_ps(); TILE_W]; PAIRS];
        let mut t = 0;
        while t < body {
            for _ in 0..PREFETCH {
                _mm_prefetch::<_MM_HINT_T0>(prefetch.cast());
                prefetch = prefetch.wrapping_add(LINE);
            }
            // Eight weights of each row in both halves of a register.
            let wv: [__m512; TILE_W] = std::array::from_fn(|c| {
                let eight = _mm256_castps_pd(_mm256_loadu_ps(wp[c].add(t)));
                _mm512_castpd_ps(_mm512_broadcast_f64x4(eight))
            });
            for (p, acc_p) in acc.iter_mut().enumerate() {
                // Row 2p's eight values in the low half, row 2p + 1's in the high half.
                let av = _mm512_loadu_ps(tp.add(2 * LANES * p));
                for (acc_pc, wv_c) in acc_p.iter_mut().zip(&wv) {
                    *acc_pc = _mm512_fmadd_ps(av, *wv_c, *acc_pc);
                }
            }
            t += LANES;
            tp = tp.add(TILE_A * LANES);
        }
        for (p, acc_p) in acc.iter().enumerate() {
            for (c, acc_pc) in acc_p.iter().enumerate() {
                let [low, high] = sum_lanes_pair(*acc_pc);
                for (r, mut s) in [(2 * p, low), (2 * p + 1, high)] {
                    for t in body..k {
                        s = (*ap[r].add(t)).mul_add(*wp[c].add(t), s);
                    }
                    sums[r][c] = s;
                }
            }
        }
    }

    /// [`crate::tensor::sum_lanes`] of both eight-lane halves of `v`, in registers: the
    /// same additions in the same order, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)),
    /// each done for all lanes at once. (Through memory, the 32 sums of a tile cost as
    /// much as its products at SmolLM2's row length.)
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    fn sum_lanes_pair(v: __m512) -> [f32; 2] {
        // Lanes 0-3 of each half: l0 + l4, l1 + l5, l2 + l6, l3 + l7.
        let h = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
        // Lanes 0 and 1: (l0 + l4) + (l2 + l6) and (l1 + l5) + (l3 + l7).
        let q = _mm512_add_ps(h, _mm512_permute_ps::<0b01_00_11_10>(h));
        // Lane 0: their sum.
        let s = _mm512_add_ps(q, _mm512_permute_ps::<0b10_11_00_01>(q));
        [_mm512_cvtss_f32(s), _mm_cvtss_f32(_mm512_extractf32x4_ps::<2>(s))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{matmul_nt_reference, SeededRng};

    /// Largest error against the f64 product, relative to the largest |output|.
    const SKINNY_VS_F64: f32 = 1e-5;

    /// Every fast path (AVX-512's two-row registers where the CPU has them, AVX2 tiles at
    /// the edges) gives the scalar tiles' bits.
    #[test]
    fn matches_the_f64_product_and_the_scalar_bits_on_ragged_shapes() {
        println!("fast path on this CPU: {:?}", Path::detect());
        let mut rng = SeededRng::new(9);
        for &(m, k, n) in &[
            (2, 8, 4),
            (5, 37, 9),
            (4, 576, 64),
            (17, 100, 33),
            (64, 576, 70),
            (3, 7, 5),
            (128, 64, 50),
            (8, 16, 4),
            (9, 43, 97),
        ] {
            let a = rng.normal_vec(m * k, 1.0);
            let w = rng.normal_vec(n * k, 0.1);
            let mut out = vec![f32::NAN; m * n];
            matmul_nt_skinny(&a, m, k, &w, n, &mut out);
            let want = matmul_nt_reference(&a, m, k, &w, n);
            let scale = want.iter().fold(0.0f32, |s, v| s.max(v.abs()));
            for (g, r) in out.iter().zip(&want) {
                assert!((g - r).abs() <= SKINNY_VS_F64 * scale, "{m}×{k}×{n}: {g} vs {r}");
            }
            let mut scalar = vec![f32::NAN; m * n];
            block_scalar(&a, m, k, &w, n, &mut scalar);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&scalar), "{m}×{k}×{n}: the fast path's bits");
        }
    }

    /// The whole product through the scalar tiles.
    fn block_scalar(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
        let mut part = vec![0.0f32; m * n];
        block(Lhs { a, paired: &[], prefetch: true }, m, k, w, n, &mut part, Path::Scalar);
        out.copy_from_slice(&part);
    }
}
