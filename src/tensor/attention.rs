//! Multi-head attention over a key/value cache (grouped-query aware, causal), shared by
//! every decoder architecture.

use super::tile::{self, Matrix};
use super::DisjointOut;
use rayon::prelude::*;
use std::ops::Range;

/// The shape of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` for multi-head, fewer for grouped-query attention).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

/// Which keys each query sees, beyond the plain scaled dot product.
#[derive(Debug, Clone, Copy)]
pub struct Masking<'a> {
    /// Query `t` sees keys `0..=start + t` only (decoders); otherwise every key (encoders).
    pub causal: bool,
    /// ALiBi: `slope[h] · key_position` added to head `h`'s scores (BLOOM).
    pub alibi: Option<&'a [f32]>,
    /// `[batch, keys]`, 0 for padding keys that no query may see (padded encoder batches).
    pub key_mask: Option<&'a [u8]>,
}

impl Masking<'_> {
    /// Causal, no bias, no padding: Llama, Qwen2, GPT-2.
    pub const CAUSAL: Masking<'static> = Masking { causal: true, alibi: None, key_mask: None };

    /// Head `h`'s scaled scores of the visible keys `0..scores.len()`: the ALiBi bias
    /// added, and padding keys (`mask`: this sequence's flags of those keys) set to the
    /// most negative float, as transformers does, so a fully padded row stays finite
    /// (uniform) instead of turning into NaN.
    fn apply(&self, scores: &mut [f32], h: usize, mask: Option<&[u8]>) {
        if let Some(slopes) = self.alibi {
            scores.iter_mut().enumerate().for_each(|(p, s)| *s += slopes[h] * p as f32);
        }
        if let Some(mask) = mask {
            mask_keys(scores, mask);
        }
    }
}

/// `scores[p] = f32::MIN` wherever `mask[p]` is 0.
///
/// Why vectorised: in a padded encoder batch every row of every head is masked, and the
/// scalar loop (a branch per key) cost 0.8 ms of a MiniLM layer's 3.9 ms of attention on
/// one thread, nearly half of the softmax it feeds.
fn mask_keys(scores: &mut [f32], mask: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU has AVX2.
        unsafe { mask_keys_avx2(scores, mask) };
        return;
    }
    mask_keys_scalar(scores, mask);
}

fn mask_keys_scalar(scores: &mut [f32], mask: &[u8]) {
    scores.iter_mut().zip(mask).filter(|(_, &m)| m == 0).for_each(|(s, _)| *s = f32::MIN);
}

/// [`mask_keys`] eight keys at a time: the flags widened to 32 bits, compared with zero
/// and used to blend in `f32::MIN`.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mask_keys_avx2(scores: &mut [f32], mask: &[u8]) {
    use std::arch::x86_64::*;
    let n = scores.len().min(mask.len());
    let (scores, mask) = (&mut scores[..n], &mask[..n]);
    let (zero, min) = (_mm256_setzero_si256(), _mm256_set1_ps(f32::MIN));
    let mut s_chunks = scores.chunks_exact_mut(8);
    let mut m_chunks = mask.chunks_exact(8);
    for (s, m) in (&mut s_chunks).zip(&mut m_chunks) {
        let flags = _mm256_cvtepu8_epi32(_mm_loadl_epi64(m.as_ptr() as *const __m128i));
        let masked = _mm256_castsi256_ps(_mm256_cmpeq_epi32(flags, zero));
        let v = _mm256_blendv_ps(_mm256_loadu_ps(s.as_ptr()), min, masked);
        _mm256_storeu_ps(s.as_mut_ptr(), v);
    }
    mask_keys_scalar(s_chunks.into_remainder(), m_chunks.remainder());
}

/// Keys and values of every layer for a batch of sequences that advance together.
#[derive(Debug)]
pub struct KvCache {
    batch: usize,
    shape: AttentionShape,
    /// Per layer, per `(sequence, kv head)`: keys then values, `len × head_dim` each.
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
    len: usize,
    /// Keys and values held by a device backend instead (the host vectors stay empty).
    device: Option<DeviceKv>,
}

/// A device backend's own key/value storage, carried by a [`KvCache`].
pub struct DeviceKv(Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for DeviceKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKv")
    }
}

impl KvCache {
    /// An empty cache for `layers` layers and `batch` sequences, with room reserved for
    /// `capacity` positions.
    pub fn new(layers: usize, batch: usize, shape: AttentionShape, capacity: usize) -> Self {
        let per_layer = || {
            (0..batch * shape.kv_heads)
                .map(|_| Vec::with_capacity(capacity * shape.head_dim))
                .collect::<Vec<_>>()
        };
        KvCache {
            batch,
            shape,
            keys: (0..layers).map(|_| per_layer()).collect(),
            values: (0..layers).map(|_| per_layer()).collect(),
            len: 0,
            device: None,
        }
    }

    /// An empty cache for `batch` sequences whose keys and values live in `storage`, a
    /// device backend's own type (see [`KvCache::device_mut`]).
    pub fn on_device<T: std::any::Any + Send + Sync>(
        batch: usize,
        shape: AttentionShape,
        storage: T,
    ) -> Self {
        KvCache { device: Some(DeviceKv(Box::new(storage))), ..KvCache::new(0, batch, shape, 0) }
    }

    /// The device storage of a cache made by [`KvCache::on_device`] with a `T`.
    pub fn device_mut<T: std::any::Any>(&mut self) -> Option<&mut T> {
        self.device.as_mut().and_then(|d| d.0.downcast_mut())
    }

    /// Positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Mark `seq` new positions as cached; called once per forward pass after every layer
    /// appended its keys and values.
    pub fn advance(&mut self, seq: usize) {
        self.len += seq;
    }

    /// Append `seq` new positions of layer `layer`; `k` and `v` are
    /// `[batch, seq, kv_heads · head_dim]`.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], seq: usize) {
        let (kvh, hd) = (self.shape.kv_heads, self.shape.head_dim);
        for b in 0..self.batch {
            for t in 0..seq {
                let row = (b * seq + t) * kvh * hd;
                for h in 0..kvh {
                    let src = row + h * hd..row + (h + 1) * hd;
                    self.keys[layer][b * kvh + h].extend_from_slice(&k[src.clone()]);
                    self.values[layer][b * kvh + h].extend_from_slice(&v[src]);
                }
            }
        }
    }

    /// Attention of `seq` new queries `q` (`[batch, seq, heads · head_dim]`, already
    /// rotated) against everything cached for `layer` (the new positions included), into
    /// `out` (same layout as `q`). Query `t` sits at position `self.len + t`.
    pub fn attend(&self, layer: usize, q: &[f32], seq: usize, masking: Masking, out: &mut [f32]) {
        let row_width = self.shape.heads * self.shape.head_dim;
        let path = if seq >= HEAD_GEMM_MIN_QUERIES { "per-head products" } else { "rows" };
        let _span = crate::profile::span("attention", path, || {
            // Scores and the weighted sum: two multiply-adds per query, key and value.
            let (queries, keys) = (out.len() / row_width.max(1), self.len + seq);
            let kv_bytes = 8 * self.batch * self.shape.kv_heads * keys * self.shape.head_dim;
            crate::profile::Work {
                ops: 4.0 * (queries * keys * row_width) as f64,
                bytes: (kv_bytes + 8 * out.len()) as f64,
            }
        });
        if seq >= HEAD_GEMM_MIN_QUERIES {
            self.attend_heads(layer, q, seq, masking, out);
            return;
        }
        let avx2 = super::has_avx2();
        let head_dim = self.shape.head_dim;
        let attend_heads = |row: usize, heads: Range<usize>, out: &mut [f32]| {
            if avx2 {
                // SAFETY: the CPU has AVX2.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    self.attend_row_avx2(layer, q, seq, masking, row, heads, out)
                };
            } else {
                self.attend_row(layer, q, seq, masking, row, heads, out);
            }
        };
        let rows = out.len() / row_width.max(1);
        if rows >= 2 {
            out.par_chunks_mut(row_width)
                .enumerate()
                .for_each(|(row, out_row)| attend_heads(row, 0..self.shape.heads, out_row));
            return;
        }
        // One query row (a decode step of one sequence): its heads go to the pool once
        // they read enough keys; below that, waking it costs more than it saves.
        let keys = self.len + seq;
        if self.shape.heads * keys * head_dim < PARALLEL_ROW_MACS || super::threads() == 1 {
            attend_heads(0, 0..self.shape.heads, out);
            return;
        }
        let per_task =
            super::balanced_task_len(self.shape.heads, self.shape.heads.div_ceil(super::threads()));
        out.par_chunks_mut(per_task * head_dim).enumerate().for_each(|(t, out_heads)| {
            let first = t * per_task;
            attend_heads(0, first..first + out_heads.len() / head_dim, out_heads)
        });
    }

    /// [`KvCache::attend`] for many queries (prefill): [`head_products`] over the cached
    /// keys and values of each sequence and head.
    fn attend_heads(&self, layer: usize, q: &[f32], seq: usize, masking: Masking, out: &mut [f32]) {
        let kv = |job: usize| {
            let (keys, values) = (&self.keys[layer][job], &self.values[layer][job]);
            KvRows { keys, values, stride: self.shape.head_dim }
        };
        head_products(self.shape, self.batch, q, seq, self.len, masking, &kv, out);
    }

    /// [`KvCache::attend_row`] compiled for AVX2: the same operations in the same order
    /// (no fused multiply-adds), so both give the same bits; eight lanes at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_row_avx2(
        &self,
        layer: usize,
        q: &[f32],
        seq: usize,
        masking: Masking,
        row: usize,
        heads: Range<usize>,
        out: &mut [f32],
    ) {
        self.attend_row(layer, q, seq, masking, row, heads, out)
    }

    /// Heads `heads` of query row `row` into `out` (those heads' columns of the row).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn attend_row(
        &self,
        layer: usize,
        q: &[f32],
        seq: usize,
        masking: Masking,
        row: usize,
        heads: Range<usize>,
        out: &mut [f32],
    ) {
        let AttentionShape { heads: all_heads, kv_heads, head_dim } = self.shape;
        let group = all_heads / kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let start = self.len;
        let row_width = all_heads * head_dim;
        let (b, t) = (row / seq, row % seq);
        let visible = if masking.causal { start + t + 1 } else { start + seq };
        let keys_total = start + seq;
        let mut scores = vec![0.0f32; visible];
        let first = heads.start;
        for h in heads {
            let kv = b * kv_heads + h / group;
            let keys = &self.keys[layer][kv];
            let values = &self.values[layer][kv];
            let qh = &q[row * row_width + h * head_dim..][..head_dim];
            for (s, kp) in scores.iter_mut().zip(keys.chunks_exact(head_dim)) {
                *s = dot_lanes(qh, kp) * scale;
            }
            masking.apply(&mut scores, h, masking.key_mask.map(|m| &m[b * keys_total..][..visible]));
            super::softmax_in_place(&mut scores);
            weighted_sum(&scores, values, head_dim, &mut out[(h - first) * head_dim..][..head_dim]);
        }
    }
}

/// Where [`head_products`] reads one sequence's keys and values for one key/value head:
/// row `p` (position `p`) of each starts at `p · stride`, `head_dim` values.
#[derive(Clone, Copy)]
struct KvRows<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    stride: usize,
}

/// Attention for many queries (prefills, encoders): per sequence and head, the scores of
/// all queries against all keys as one matrix product, the masks and the softmax row by
/// row, then the values as a second product written straight into the head's columns of
/// `out`; sequences × heads in parallel. Rows of the scores past a query's causal horizon
/// are zero after the softmax, so they add nothing. `kv(b · kv_heads + g)` gives sequence
/// `b`'s keys and values for key/value head `g`, `start + seq` positions of them; query
/// `t` sits at position `start + t`.
#[allow(clippy::too_many_arguments)]
fn head_products<'a>(
    shape: AttentionShape,
    batch: usize,
    q: &[f32],
    seq: usize,
    start: usize,
    masking: Masking,
    kv: &(dyn Fn(usize) -> KvRows<'a> + Sync),
    out: &mut [f32],
) {
    let AttentionShape { heads, kv_heads, head_dim } = shape;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let row_width = heads * head_dim;
    let keys_total = start + seq;
    assert!(q.len() >= batch * seq * row_width && out.len() >= batch * seq * row_width);
    let dst = DisjointOut::new(out);
    let head = |job: usize| {
        let (b, h) = (job / heads, job % heads);
        let KvRows { keys, values, stride } = kv(b * kv_heads + h / group);
        assert!(keys_total == 0 || keys.len().min(values.len()) >= (keys_total - 1) * stride + head_dim);
        let qh = &q[b * seq * row_width + h * head_dim..];
        let mut scores = super::scratch::take(seq * keys_total);
        let queries = Matrix::new(qh, seq, head_dim, row_width);
        head_scores(queries, Matrix::new(keys, keys_total, head_dim, stride), scale, &mut scores);
        // A sequence without padding needs no mask pass (it would change nothing): in an
        // unpadded MiniLM batch the passes were 4% of the attention's time.
        let padding = masking.key_mask.map(|m| &m[b * keys_total..][..keys_total]).filter(|m| m.contains(&0));
        for (t, row) in scores.chunks_exact_mut(keys_total).enumerate() {
            let visible = if masking.causal { start + t + 1 } else { keys_total };
            let (seen, unseen) = row.split_at_mut(visible);
            masking.apply(seen, h, padding.map(|m| &m[..visible]));
            if masking.causal {
                super::softmax_in_place(seen);
            }
            unseen.fill(0.0);
        }
        if !masking.causal {
            // Every row sees every key: rows of one length, which go two at a time.
            super::softmax::softmax_rows_in_place(&mut scores, keys_total);
        }
        let weights = Matrix::new(&scores, seq, keys_total, keys_total);
        // SAFETY: the output is this head's columns h·head_dim.. of sequence b's rows of
        // out (row stride row_width), inside out by the assert above and written by no
        // other head.
        unsafe {
            head_weighted_sum(
                weights,
                Matrix::new(values, keys_total, head_dim, stride),
                dst.at(b * seq * row_width + h * head_dim),
                row_width,
            )
        };
        super::scratch::recycle(scores);
    };
    (0..batch * heads).into_par_iter().for_each(head);
}

/// `scores = scale · queries · keysᵀ` (`queries.rows() × keys.rows()`, row-major): with
/// AVX-512 the keys transposed once and a register-tile product, else the `gemm` crate.
fn head_scores(queries: Matrix, keys: Matrix, scale: f32, scores: &mut [f32]) {
    if tile::has_tiles() {
        head_scores_tiles(queries, keys, scale, scores);
    } else {
        head_scores_gemm(queries, keys, scale, scores);
    }
}

/// [`head_scores`] by register tiles (on any CPU: the scalar loop without AVX-512).
fn head_scores_tiles(queries: Matrix, keys: Matrix, scale: f32, scores: &mut [f32]) {
    let (keys_total, head_dim) = (keys.rows(), keys.cols());
    let mut keys_t = super::scratch::take(head_dim * keys_total);
    tile::transpose_into(keys, &mut keys_t);
    let keys_t_view = Matrix::new(&keys_t, head_dim, keys_total, keys_total);
    tile::product(queries, keys_t_view, scale, scores, keys_total);
    super::scratch::recycle(keys_t);
}

/// [`head_scores`] by the `gemm` crate.
fn head_scores_gemm(queries: Matrix, keys: Matrix, scale: f32, scores: &mut [f32]) {
    let (seq, keys_total) = (queries.rows(), keys.rows());
    assert!(queries.cols() == keys.cols(), "attention scores: queries and keys differ in width");
    assert!(
        scores.len() >= seq * keys_total,
        "attention scores: {} values cannot hold {seq} × {keys_total}",
        scores.len()
    );
    // SAFETY: the shapes agree and `scores` holds the output (checked above).
    unsafe { crate_product(queries, Rhs::Transposed(keys), scale, scores.as_mut_ptr(), keys_total) };
}

/// `out = weights · values` (`weights.rows() × values.cols()` at row stride
/// `out_stride`): register tiles with AVX-512, else the `gemm` crate.
///
/// # Safety
/// `out` must be valid for writes of that matrix, written by no one else meanwhile.
unsafe fn head_weighted_sum(weights: Matrix, values: Matrix, out: *mut f32, out_stride: usize) {
    assert_eq!(weights.cols(), values.rows(), "attention weighted sum: shapes differ");
    // SAFETY (both arms): the caller's contract; the shapes agree (checked above).
    if tile::has_tiles() {
        unsafe { tile::product_raw(weights, values, 1.0, out, out_stride) };
    } else {
        unsafe { crate_product(weights, Rhs::AsIs(values), 1.0, out, out_stride) };
    }
}

/// The right-hand matrix of [`crate_product`]: read as it lies, or transposed.
#[derive(Clone, Copy)]
enum Rhs<'a> {
    AsIs(Matrix<'a>),
    Transposed(Matrix<'a>),
}

/// `out = scale · lhs · rhs` by the `gemm` crate, on one thread (the heads run in
/// parallel), `out` at row stride `out_stride`.
///
/// # Safety
/// `lhs`'s columns must be `rhs`'s rows (as read); `out` must be valid for writes of the
/// `lhs.rows() × n` output, written by no one else meanwhile.
unsafe fn crate_product(lhs: Matrix, rhs: Rhs, scale: f32, out: *mut f32, out_stride: usize) {
    // The k × n view of rhs: its pointer, n, and the strides of its rows and columns.
    let (data, n, row_stride, col_stride) = match rhs {
        Rhs::AsIs(m) => (m.data(), m.cols(), m.stride(), 1),
        Rhs::Transposed(m) => (m.data(), m.rows(), 1, m.stride()),
    };
    // SAFETY: both matrices lie inside their slices (checked when made); the caller's
    // contract covers the shapes and the output.
    unsafe {
        gemm::gemm(
            lhs.rows(),
            n,
            lhs.cols(),
            out,
            1,
            out_stride as isize,
            false,
            lhs.data().as_ptr(),
            1,
            lhs.stride() as isize,
            data.as_ptr(),
            col_stride as isize,
            row_stride as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Self-attention of a one-pass encoder over its own projections, read in place: `q`
/// (`[batch, seq, heads · head_dim]`), `k` and `v` (`[batch, seq, kv_heads · head_dim]`),
/// every query against every key of its sequence (`masking` says which it may see), into
/// `out` (laid out as `q`). The same values as appending `k` and `v` to an empty
/// [`KvCache`] and attending, without copying them into one.
#[allow(clippy::too_many_arguments)]
pub fn self_attention(
    shape: AttentionShape,
    batch: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seq: usize,
    masking: Masking,
    out: &mut [f32],
) {
    if seq < HEAD_GEMM_MIN_QUERIES {
        let mut cache = KvCache::new(1, batch, shape, seq);
        cache.append(0, k, v, seq);
        cache.attend(0, q, seq, masking, out);
        return;
    }
    let kv_width = shape.kv_heads * shape.head_dim;
    let row_width = shape.heads * shape.head_dim;
    let _span = crate::profile::span("attention", "per-head products", || crate::profile::Work {
        ops: 4.0 * (batch * seq * seq * row_width) as f64,
        bytes: (8 * batch * seq * kv_width + 8 * out.len()) as f64,
    });
    let kv = |job: usize| {
        let (b, g) = (job / shape.kv_heads, job % shape.kv_heads);
        let at = b * seq * kv_width + g * shape.head_dim;
        KvRows { keys: &k[at..], values: &v[at..], stride: kv_width }
    };
    head_products(shape, batch, q, seq, 0, masking, &kv, out);
}

/// `out = Σ_p w[p] · values[p]` over rows of `values` (`head_dim` each), every output
/// element summed over `p` in order, as a plain loop would; the output is walked in pieces
/// of [`OUT_PIECE`] values held in registers across all rows, instead of loaded and stored
/// once per row.
#[inline(always)]
fn weighted_sum(w: &[f32], values: &[f32], head_dim: usize, out: &mut [f32]) {
    for (piece, o) in out.chunks_mut(OUT_PIECE).enumerate() {
        let at = piece * OUT_PIECE;
        if o.len() == OUT_PIECE {
            let mut acc = [0.0f32; OUT_PIECE];
            for (&wp, vp) in w.iter().zip(values.chunks_exact(head_dim)) {
                let vp = &vp[at..at + OUT_PIECE];
                for i in 0..OUT_PIECE {
                    acc[i] += wp * vp[i];
                }
            }
            o.copy_from_slice(&acc);
        } else {
            o.fill(0.0);
            for (&wp, vp) in w.iter().zip(values.chunks_exact(head_dim)) {
                o.iter_mut().zip(&vp[at..]).for_each(|(x, v)| *x += wp * v);
            }
        }
    }
}

/// Multiply-adds of one query row's scores (heads × keys × head dimension) from which its
/// heads run on the pool. SmolLM2-135M after 64 tokens (9 × 65 × 64 = 37 Ki) took about
/// 20 µs a layer on one thread of the Xeon; on two, its decode step's attention went
/// 0.62 → 0.38 ms.
const PARALLEL_ROW_MACS: usize = 16 * 1024;

/// Queries from which [`KvCache::attend`] computes each head as two matrix products rather
/// than row by row (a decode step's one query per sequence stays on the row path).
const HEAD_GEMM_MIN_QUERIES: usize = 4;

/// Output values [`weighted_sum`] keeps in registers at a time (four AVX2 registers).
const OUT_PIECE: usize = 32;

/// `Σ a·b` in eight interleaved partial sums (lane `i` takes elements `i, i + 8, …`),
/// then the lanes pairwise and the tail: one order on every CPU, which the compiler
/// turns into SIMD (a strict left-to-right sum cannot be vectorised).
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in a.chunks_exact(8).remainder().iter().zip(b.chunks_exact(8).remainder()) {
        tail += x * y;
    }
    (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encoder's attention read in place gives what the cache path gives, bit for bit,
    /// with padding, grouped heads, and too few queries for the per-head products.
    #[test]
    fn self_attention_in_place_matches_the_cache_path() {
        for (batch, seq, heads, kv_heads) in [(3, 9, 4, 2), (2, 16, 3, 3), (2, 3, 2, 1)] {
            let shape = AttentionShape { heads, kv_heads, head_dim: 8 };
            let (qw, kw) = (heads * 8, kv_heads * 8);
            let q = crate::tensor::test_values(batch * seq * qw, 1);
            let k = crate::tensor::test_values(batch * seq * kw, 2);
            let v = crate::tensor::test_values(batch * seq * kw, 3);
            let mask: Vec<u8> = (0..batch * seq).map(|i| u8::from(i % seq < seq - i / seq)).collect();
            let masking = Masking { causal: false, alibi: None, key_mask: Some(&mask) };
            let mut cache = KvCache::new(1, batch, shape, seq);
            cache.append(0, &k, &v, seq);
            let mut want = vec![0.0; q.len()];
            cache.attend(0, &q, seq, masking, &mut want);
            let mut got = vec![f32::NAN; q.len()];
            self_attention(shape, batch, &q, &k, &v, seq, masking, &mut got);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "batch {batch} seq {seq} heads {heads}/{kv_heads}");
        }
    }

    #[test]
    fn masked_keys_are_the_same_on_every_path() {
        for len in [0, 3, 8, 13, 128] {
            let scores = crate::tensor::test_values(len, 9);
            let mask: Vec<u8> = (0..len).map(|i| u8::from(i % 3 != 1)).collect();
            let (mut fast, mut plain) = (scores.clone(), scores);
            mask_keys(&mut fast, &mask);
            mask_keys_scalar(&mut plain, &mask);
            assert_eq!(fast, plain, "length {len}");
            assert!(plain.iter().zip(&mask).all(|(&s, &m)| (m == 0) == (s == f32::MIN)), "length {len}");
        }
    }
    use crate::tensor::SeededRng;

    /// The per-head matrix-product path (many queries) against the row path, with every
    /// mask: causal after a cached prefix, ALiBi, padding keys, grouped heads.
    #[test]
    fn head_products_match_the_row_path_under_every_mask() {
        let shape = AttentionShape { heads: 4, kv_heads: 2, head_dim: 40 };
        let (batch, prefix, seq) = (2, 3, 9);
        let (width, kv_width) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
        let mut rng = SeededRng::new(12);
        let slopes = crate::tensor::alibi_slopes(shape.heads);
        let mut key_mask = vec![1u8; batch * (prefix + seq)];
        key_mask[1] = 0;
        key_mask[(prefix + seq) + 4] = 0;
        let mut cache = KvCache::new(1, batch, shape, prefix + seq);
        cache.append(
            0,
            &rng.normal_vec(batch * prefix * kv_width, 1.0),
            &rng.normal_vec(batch * prefix * kv_width, 1.0),
            prefix,
        );
        cache.advance(prefix);
        cache.append(
            0,
            &rng.normal_vec(batch * seq * kv_width, 1.0),
            &rng.normal_vec(batch * seq * kv_width, 1.0),
            seq,
        );
        let q = rng.normal_vec(batch * seq * width, 1.0);
        let maskings = [
            Masking::CAUSAL,
            Masking { causal: true, alibi: Some(&slopes), key_mask: None },
            Masking { causal: false, alibi: None, key_mask: Some(&key_mask) },
        ];
        for masking in maskings {
            let mut heads = vec![f32::NAN; q.len()];
            cache.attend_heads(0, &q, seq, masking, &mut heads);
            let mut rows = vec![f32::NAN; q.len()];
            for (row, out_row) in rows.chunks_mut(width).enumerate() {
                cache.attend_row(0, &q, seq, masking, row, 0..cache.shape.heads, out_row);
            }
            for (i, (a, b)) in heads.iter().zip(&rows).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{masking:?} value {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn one_query_row_on_the_pool_gives_the_serial_bits() {
        // Enough keys that the row's heads go to the pool; grouped key/value heads.
        let shape = AttentionShape { heads: 6, kv_heads: 2, head_dim: 32 };
        let (prefix, width, kv_width) = (200, 6 * 32, 2 * 32);
        assert!(shape.heads * (prefix + 1) * shape.head_dim >= PARALLEL_ROW_MACS);
        let mut rng = crate::tensor::SeededRng::new(11);
        let mut cache = KvCache::new(1, 1, shape, prefix + 1);
        let (k, v) = (rng.normal_vec(prefix * kv_width, 1.0), rng.normal_vec(prefix * kv_width, 1.0));
        cache.append(0, &k, &v, prefix);
        cache.advance(prefix);
        cache.append(0, &rng.normal_vec(kv_width, 1.0), &rng.normal_vec(kv_width, 1.0), 1);
        let q = rng.normal_vec(width, 1.0);
        let mut pooled = vec![f32::NAN; width];
        crate::tensor::on_pool(|| cache.attend(0, &q, 1, Masking::CAUSAL, &mut pooled));
        let mut serial = vec![f32::NAN; width];
        cache.attend_row(0, &q, 1, Masking::CAUSAL, 0, 0..shape.heads, &mut serial);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&pooled), bits(&serial));
    }

    /// The lane-parallel dot product against an f64 sum, for lengths around the lanes.
    /// The register tiles (here or in their scalar form) and the `gemm` crate, which CPUs
    /// without AVX-512 run, agree on a head's scores and weighted sum.
    #[test]
    fn both_head_product_paths_agree() {
        let (seq, keys_total, head_dim, stride) = (37, 45, 24, 40);
        let q = crate::tensor::test_values(seq * stride, 1);
        let kv = crate::tensor::test_values(keys_total * stride, 2);
        let (queries, keys) =
            (Matrix::new(&q, seq, head_dim, stride), Matrix::new(&kv, keys_total, head_dim, stride));
        let (mut tiles, mut gemm) = (vec![0.0; seq * keys_total], vec![0.0; seq * keys_total]);
        head_scores_tiles(queries, keys, 0.3, &mut tiles);
        head_scores_gemm(queries, keys, 0.3, &mut gemm);
        let close =
            |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0));
        assert!(close(&tiles, &gemm), "scores differ");
        let weights = Matrix::new(&tiles, seq, keys_total, keys_total);
        let values = Matrix::new(&kv, keys_total, head_dim, stride);
        let (mut by_tiles, mut by_gemm) = (vec![f32::NAN; seq * stride], vec![f32::NAN; seq * stride]);
        // SAFETY: each output holds seq rows of head_dim at stride `stride`.
        unsafe {
            tile::product_raw(weights, values, 1.0, by_tiles.as_mut_ptr(), stride);
            crate_product(weights, Rhs::AsIs(values), 1.0, by_gemm.as_mut_ptr(), stride);
        }
        let written = |v: &[f32]| v.chunks(stride).flat_map(|r| r[..head_dim].to_vec()).collect::<Vec<f32>>();
        assert!(close(&written(&by_tiles), &written(&by_gemm)), "weighted sums differ");
    }

    #[test]
    fn lane_dot_products_match_an_f64_sum() {
        let mut rng = SeededRng::new(13);
        for n in [0, 1, 7, 8, 9, 32, 63, 128] {
            let (a, b) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let scale: f64 = a.iter().zip(&b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum();
            assert!((dot_lanes(&a, &b) as f64 - want).abs() <= 1e-6 * scale.max(1.0), "n = {n}");
        }
    }

    /// Attention computed position by position must equal one pass over all positions:
    /// the property the decode loop relies on.
    #[test]
    fn incremental_attention_equals_full_prefill() {
        let shape = AttentionShape { heads: 4, kv_heads: 2, head_dim: 8 };
        let (batch, seq, width, kv_width) = (2, 5, 32, 16);
        let mut rng = SeededRng::new(11);
        let q = rng.normal_vec(batch * seq * width, 1.0);
        let k = rng.normal_vec(batch * seq * kv_width, 1.0);
        let v = rng.normal_vec(batch * seq * kv_width, 1.0);

        let mut full = KvCache::new(1, batch, shape, seq);
        full.append(0, &k, &v, seq);
        let mut out_full = vec![f32::NAN; q.len()];
        full.attend(0, &q, seq, Masking::CAUSAL, &mut out_full);

        let mut step = KvCache::new(1, batch, shape, seq);
        for t in 0..seq {
            let pick = |x: &[f32], w: usize| -> Vec<f32> {
                (0..batch).flat_map(|b| x[(b * seq + t) * w..][..w].to_vec()).collect()
            };
            step.append(0, &pick(&k, kv_width), &pick(&v, kv_width), 1);
            let mut out = vec![f32::NAN; batch * width];
            step.attend(0, &pick(&q, width), 1, Masking::CAUSAL, &mut out);
            step.advance(1);
            for b in 0..batch {
                let expect = &out_full[(b * seq + t) * width..][..width];
                let got = &out[b * width..][..width];
                for (e, g) in expect.iter().zip(got) {
                    assert!((e - g).abs() < 1e-6, "position {t} batch {b}: {e} vs {g}");
                }
            }
        }
    }
}
