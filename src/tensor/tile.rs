//! Register-tile products for small strided matrices (attention's per-head scores and
//! weighted sums): `c = scale · a · b`, every value one chain of fused multiply-adds in
//! `k` order from zero, then scaled, on AVX-512 when the CPU has it.
//!
//! Why not the `gemm` crate: a head's products are 128 × 128 × 32 and 128 × 32 × 128 in
//! MiniLM, where the crate's dispatch and packing cost as much as the arithmetic (the two
//! ran at 116 GFLOP/s with the softmax between them on a 2-core Xeon). Here `b`'s rows
//! are read in place (the keys transposed once per head into a scratch buffer, the values
//! as they lie), `a`'s values are broadcast from their rows, and a tile of 12 rows × 32
//! columns stays in 24 registers for the whole sum.
//!
//! The scalar [`product_reference`] computes the same chains with `mul_add`, so both give
//! the same bits.

/// Rows of `a` per register tile: 12 × 2 accumulators, 2 `b` vectors and a broadcast fit
/// AVX-512's 32 registers.
const TILE_ROWS: usize = 12;
/// Columns of `b` per register tile: two 16-lane vectors.
const TILE_COLS: usize = 32;

/// A row-major matrix read in place: element `(i, j)` at `data[i · stride + j]`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<'a> Matrix<'a> {
    /// The `rows × cols` matrix whose rows start `stride` values apart in `data`.
    ///
    /// # Panics
    /// When it does not lie inside `data`, or its rows overlap (`cols > stride`).
    pub fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, stride),
            "a {rows} × {cols} matrix at row stride {stride} does not fit in {} values",
            data.len()
        );
        Matrix { data, rows, cols, stride }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.stride + j]
    }

    /// The values the matrix lies in.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Values from one row's start to the next's.
    pub fn stride(&self) -> usize {
        self.stride
    }
}

/// Whether a `rows × cols` matrix at row stride `stride` lies inside `len` values.
fn fits(len: usize, rows: usize, cols: usize, stride: usize) -> bool {
    rows == 0 || cols == 0 || (cols <= stride && (rows - 1) * stride + cols <= len)
}

/// Whether [`product`] runs the AVX-512 tiles here (the CPU has AVX-512 F).
pub fn has_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[i, j] = scale · Σ_kk a[i, kk] · b[kk, j]`: `c` is `a.rows × b.cols` at row stride
/// `c_stride`.
///
/// # Panics
/// When `a`'s columns are not `b`'s rows, or `c` cannot hold the output.
pub fn product(a: Matrix, b: Matrix, scale: f32, c: &mut [f32], c_stride: usize) {
    assert_eq!(a.cols, b.rows, "tile product: lhs columns differ from rhs rows");
    let (rows, cols) = (a.rows, b.cols);
    assert!(
        fits(c.len(), rows, cols, c_stride),
        "tile product: the output is not {rows} × {cols} at stride {c_stride}"
    );
    // SAFETY: every element read is inside its matrix (checked when made) and the output
    // inside `c` (checked above), which is borrowed mutably.
    unsafe { product_raw(a, b, scale, c.as_mut_ptr(), c_stride) }
}

/// [`product`] into a raw output (heads writing their own columns of a shared output).
///
/// # Safety
/// `a.cols` must equal `b.rows`; `c` must be valid for writes of an `a.rows × b.cols`
/// matrix at row stride `c_stride`, written by no one else meanwhile.
pub unsafe fn product_raw(a: Matrix, b: Matrix, scale: f32, c: *mut f32, c_stride: usize) {
    debug_assert_eq!(a.cols, b.rows);
    #[cfg(target_arch = "x86_64")]
    if has_tiles() {
        // SAFETY: the CPU has AVX-512 F; the caller's contract covers every access.
        unsafe { avx512::product(a, b, scale, c, c_stride) };
        return;
    }
    for i in 0..a.rows {
        for j in 0..b.cols {
            // SAFETY: (i, j) is inside the output the caller vouched for.
            unsafe { *c.add(i * c_stride + j) = chain(a, b, i, j) * scale };
        }
    }
}

/// Output `(i, j)`'s sum: fused multiply-adds in `k` order from zero.
#[inline(always)]
fn chain(a: Matrix, b: Matrix, i: usize, j: usize) -> f32 {
    (0..a.cols).fold(0.0f32, |acc, kk| a.at(i, kk).mul_add(b.at(kk, j), acc))
}

/// The scalar twin of [`product`], the same bits: each value's chain of fused
/// multiply-adds, then the scale (`a.rows × b.cols`, row-major).
pub fn product_reference(a: Matrix, b: Matrix, scale: f32) -> Vec<f32> {
    assert_eq!(a.cols, b.rows, "tile product: lhs columns differ from rhs rows");
    (0..a.rows).flat_map(|i| (0..b.cols).map(move |j| chain(a, b, i, j) * scale)).collect()
}

/// `t[j, i] = m[i, j]`, into `t` (`m.cols × m.rows`, row-major).
pub fn transpose_into(m: Matrix, t: &mut [f32]) {
    assert!(t.len() >= m.rows * m.cols, "transpose: {} values cannot hold {} × {}", t.len(), m.cols, m.rows);
    #[cfg(target_arch = "x86_64")]
    if has_tiles() && m.stride < (i32::MAX as usize) / 16 {
        // SAFETY: the CPU has AVX-512 F; `t` holds the output (asserted above) and the
        // gathers' offsets fit in i32 (checked here).
        unsafe { avx512::transpose(m, t) };
        return;
    }
    transpose_scalar(m, t);
}

/// [`transpose_into`] one value at a time.
fn transpose_scalar(m: Matrix, t: &mut [f32]) {
    for i in 0..m.rows {
        let row = &m.data[i * m.stride..][..m.cols];
        for (j, &v) in row.iter().enumerate() {
            t[j * m.rows + i] = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Matrix, TILE_COLS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Lanes of a vector.
    const LANES: usize = 16;
    /// Row pointers of a tile: one per three rows.
    const GROUPS: usize = TILE_ROWS.div_ceil(3);

    /// [`super::product_raw`] in tiles: column panels of [`WIDE_COLS`] while whole ones
    /// remain, then of [`TILE_COLS`] (the last one masked); rows in blocks of as many as
    /// the panel's tile holds (the last one shorter).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, and the contract of [`super::product_raw`] holds.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn product(a: Matrix, b: Matrix, scale: f32, c: *mut f32, c_stride: usize) {
        let cols = b.cols;
        let tile = |i0: usize, j0: usize| Tile {
            a: a.data.as_ptr().add(i0 * a.stride),
            a_stride: a.stride,
            b: b.data.as_ptr().add(j0),
            b_stride: b.stride,
            k: a.cols,
            scale,
            c: c.add(i0 * c_stride + j0),
            c_stride,
            cols_left: cols - j0,
        };
        let mut j0 = 0;
        while cols - j0 >= WIDE_COLS {
            panel::<WIDE_ROWS, { WIDE_COLS / LANES }>(a.rows, |i0| tile(i0, j0));
            j0 += WIDE_COLS;
        }
        while j0 < cols {
            panel::<TILE_ROWS, { TILE_COLS / LANES }>(a.rows, |i0| tile(i0, j0));
            j0 += TILE_COLS;
        }
    }

    /// Columns of a wide panel: four vectors, whose tile of [`WIDE_ROWS`] rows needs only
    /// six broadcasts for its 24 multiply-adds per step.
    const WIDE_COLS: usize = 4 * LANES;
    /// Rows of a wide panel's tile (6 × 4 accumulators).
    const WIDE_ROWS: usize = 6;

    /// Every row of one column panel: blocks of `R` rows of `V` vectors, then the rest.
    #[target_feature(enable = "avx512f")]
    unsafe fn panel<const R: usize, const V: usize>(rows: usize, tile: impl Fn(usize) -> Tile) {
        let full = rows / R;
        for block in 0..full {
            tile(block * R).run::<R, V>();
        }
        let t = tile(full * R);
        match rows % R {
            0 => {}
            1 => t.run::<1, V>(),
            2 => t.run::<2, V>(),
            3 => t.run::<3, V>(),
            4 => t.run::<4, V>(),
            5 => t.run::<5, V>(),
            6 => t.run::<6, V>(),
            7 => t.run::<7, V>(),
            8 => t.run::<8, V>(),
            9 => t.run::<9, V>(),
            10 => t.run::<10, V>(),
            _ => t.run::<11, V>(),
        }
    }

    /// [`super::transpose_into`]: sixteen rows at a time, each column of them gathered
    /// into one vector and stored as a run of the output row.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `t` holds `m.rows × m.cols` values and `16 · m.stride`
    /// fits in an i32.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose(m: Matrix, t: &mut [f32]) {
        let stride = m.stride as i32;
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride),
        );
        for i0 in (0..m.rows).step_by(LANES) {
            let mask = lanes(m.rows - i0);
            let rows = m.data.as_ptr().add(i0 * m.stride);
            for j in 0..m.cols {
                // Masked lanes (rows past the matrix) are not read.
                let column = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, rows.add(j));
                _mm512_mask_storeu_ps(t.as_mut_ptr().add(j * m.rows + i0), mask, column);
            }
        }
    }

    /// Lanes holding columns when `left` columns remain.
    fn lanes(left: usize) -> u16 {
        if left >= LANES {
            u16::MAX
        } else {
            ((1u32 << left) - 1) as u16
        }
    }

    /// One register tile's operands: rows of `a` from `a`, the panel's columns of `b`
    /// from `b` (`cols_left` of them from there to the matrix's edge), the output tile
    /// at `c`.
    struct Tile {
        a: *const f32,
        a_stride: usize,
        b: *const f32,
        b_stride: usize,
        k: usize,
        scale: f32,
        c: *mut f32,
        c_stride: usize,
        cols_left: usize,
    }

    impl Tile {
        /// The tile's `R × 16V` sums in registers, along `k`, then scaled and stored
        /// (lanes past the matrix's edge are neither read from `b` nor written).
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const R: usize, const V: usize>(&self) {
            let mut masks = [0u16; V];
            for (v, mask) in masks.iter_mut().enumerate() {
                *mask = lanes(self.cols_left.saturating_sub(v * LANES));
            }
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            let mut b = self.b;
            // Rows in groups of three from one pointer each: `[group + stride · i]` is one
            // addressing mode, where a pointer per row needed more registers than x86 has
            // and one stepped row by row made a chain of dependent adds.
            let stride = self.a_stride;
            let mut groups = [self.a; GROUPS];
            for (g, p) in groups.iter_mut().enumerate() {
                *p = self.a.wrapping_add(3 * g * stride);
            }
            for _ in 0..self.k {
                let mut bv = [_mm512_setzero_ps(); V];
                for (v, (bv, &mask)) in bv.iter_mut().zip(&masks).enumerate() {
                    *bv = _mm512_maskz_loadu_ps(mask, b.wrapping_add(v * LANES));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*groups[r / 3].add((r % 3) * stride));
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm512_fmadd_ps(x, bv, *acc);
                    }
                }
                for p in groups.iter_mut() {
                    *p = p.wrapping_add(1);
                }
                b = b.wrapping_add(self.b_stride);
            }
            let scale = _mm512_set1_ps(self.scale);
            for (r, acc) in acc.iter().enumerate() {
                let c = self.c.add(r * self.c_stride);
                for (v, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
                    _mm512_mask_storeu_ps(c.wrapping_add(v * LANES), mask, _mm512_mul_ps(acc, scale));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::test_values;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn tiles_give_the_reference_bits_at_every_edge() {
        // Rows around the tile height, columns around the panel width, strides wider
        // than the matrices.
        for (rows, k, cols) in
            [(1, 1, 1), (12, 32, 32), (13, 7, 33), (128, 32, 128), (25, 128, 64), (11, 5, 17)]
        {
            let (a_stride, b_stride, c_stride) = (k + 3, cols + 5, cols + 2);
            let (a, b) = (test_values(rows * a_stride, 1), test_values(k * b_stride, 2));
            let (a, b) = (Matrix::new(&a, rows, k, a_stride), Matrix::new(&b, k, cols, b_stride));
            let want = product_reference(a, b, 0.17);
            let mut c = vec![f32::NAN; rows * c_stride];
            product(a, b, 0.17, &mut c, c_stride);
            for i in 0..rows {
                let row = &c[i * c_stride..][..c_stride];
                assert_eq!(bits(&row[..cols]), bits(&want[i * cols..][..cols]), "{rows}×{k}×{cols}, row {i}");
                assert!(row[cols..].iter().all(|v| v.is_nan()), "wrote past column {cols}");
            }
        }
    }

    #[test]
    fn the_reference_is_the_plain_product() {
        let (rows, k, cols) = (5, 9, 7);
        let (a, b) = (test_values(rows * k, 3), test_values(k * cols, 4));
        let got = product_reference(Matrix::new(&a, rows, k, k), Matrix::new(&b, k, cols, cols), 1.0);
        for i in 0..rows {
            for j in 0..cols {
                let want: f64 = (0..k).map(|kk| a[i * k + kk] as f64 * b[kk * cols + j] as f64).sum();
                assert!((got[i * cols + j] as f64 - want).abs() < 1e-5, "({i}, {j})");
            }
        }
    }

    #[test]
    fn transposing_swaps_indices() {
        let m = test_values(3 * 5, 5);
        let mut t = vec![0.0; 6];
        transpose_into(Matrix::new(&m, 3, 2, 5), &mut t);
        assert_eq!(t, vec![m[0], m[5], m[10], m[1], m[6], m[11]]);
        // Around the vector width, on every path.
        for (rows, cols, stride) in [(16, 32, 40), (17, 3, 3), (128, 32, 384), (5, 1, 9)] {
            let data = test_values((rows - 1) * stride + cols, 6);
            let m = Matrix::new(&data, rows, cols, stride);
            let (mut fast, mut plain) = (vec![f32::NAN; rows * cols + 1], vec![f32::NAN; rows * cols + 1]);
            transpose_into(m, &mut fast);
            transpose_scalar(m, &mut plain);
            assert_eq!(bits(&fast), bits(&plain), "{rows} × {cols}");
            assert!(fast[rows * cols].is_nan(), "wrote past the output");
        }
    }

    #[test]
    #[should_panic(expected = "a 5 × 2 matrix at row stride 3 does not fit in 10 values")]
    fn a_matrix_outside_its_slice_is_refused() {
        Matrix::new(&[0.0; 10], 5, 2, 3);
    }

    #[test]
    #[should_panic(expected = "tile product: the output is not 2 × 3 at stride 3")]
    fn a_short_output_is_refused() {
        let a = [1.0; 6];
        product(Matrix::new(&a, 2, 2, 2), Matrix::new(&a, 2, 3, 3), 1.0, &mut [0.0; 5], 3);
    }
}
