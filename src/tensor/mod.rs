//! The CPU math the forward passes need: matrix products, norms, softmax, rotary
//! embeddings and activations, on plain row-major `f32` slices.
//!
//! Every fast path here has a plain scalar reference beside it (`*_reference`) that the
//! tests compare against with a named error budget.

pub mod attention;
pub mod awake;
pub mod exp;
pub mod fma_peak;
pub mod gelu;
pub mod gemv;
pub mod half;
pub mod scratch;
pub mod silu;
pub mod skinny;
pub mod softmax;
pub mod tile;

pub use softmax::softmax_in_place;

use gemm::Parallelism;

/// Whether the CPU has AVX2 and FMA: the kernels that fuse multiply-adds (exp, GELU,
/// SiLU, the small-row product), whose scalar twins use `mul_add` for the same bits.
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Seeded values in [−2, 2) for the kernel tests (xorshift; no dependency).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 4.0
        })
        .collect()
}

/// Eight lane sums added pairwise, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): the
/// order of an AVX2 horizontal add, used by the scalar twins of the eight-lane kernels.
pub fn sum_lanes(l: [f32; 8]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Whether the CPU has AVX2 (the standard library caches the answer). Kernels compiled
/// for it with `#[target_feature(enable = "avx2")]` run the same operations as their
/// portable twins, eight lanes at a time.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Number of threads used by the matrix products (rayon's global pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Items per task when `items` are split into tasks of at most `most` that the pool's
/// threads share evenly: the fewest tasks of at most `most` in a multiple of the thread
/// count, as equal as whole items allow.
///
/// Why: a fixed task size leaves a remainder. SmolLM2's 576-row projections in tasks of
/// 64 made 9 tasks, 5 on one thread and 4 on the other, and the second thread waited.
pub fn balanced_task_len(items: usize, most: usize) -> usize {
    let per_thread = items.div_ceil(threads().max(1)).max(1);
    per_thread.div_ceil(per_thread.div_ceil(most.max(1)))
}

/// An output shared by parallel tasks that each write their own elements of it (a head's
/// columns, a block of weight rows' columns).
#[derive(Clone, Copy)]
pub(crate) struct DisjointOut(*mut f32);

// SAFETY: the tasks write disjoint sets of elements, and the code that made the wrapper
// holds the `&mut` borrow of the whole output until every task is done.
unsafe impl Send for DisjointOut {}
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    /// The wrapper of `out`, which the caller keeps borrowed while tasks write to it.
    pub(crate) fn new(out: &mut [f32]) -> Self {
        DisjointOut(out.as_mut_ptr())
    }

    /// The element `offset` places in (a method, so closures capture the whole wrapper
    /// rather than its raw pointer field).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Run `f` on a thread of the pool, waiting for it here.
///
/// Why: a parallel loop started from a thread outside the pool hands its work over and
/// sleeps until a pool thread finishes it, about 20 µs of wake-ups per loop on the 2-core
/// machine this crate is developed on; started from a pool thread it costs well under a
/// microsecond. A decode step runs hundreds of such loops (every linear layer's GEMV), so
/// the CLI and the runner run their whole work through here. Inside the pool it just
/// calls `f`.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Products below this many multiply-adds run on one thread: waking the pool costs more
/// than it saves (measured on the built-in model's decode steps, 65k–176k MACs each).
const SERIAL_MACS: usize = 256 * 1024;

/// `out[m, n] = a[m, k] · w[n, k]ᵀ`: a linear layer with PyTorch's `[out, in]` weight
/// layout. Uses the `gemm` crate (AVX-512 kernels when the CPU has them).
pub fn matmul_nt(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(a.len(), m * k, "matmul_nt: lhs is not [m, k]");
    assert_eq!(w.len(), n * k, "matmul_nt: weight is not [n, k]");
    assert_eq!(out.len(), m * n, "matmul_nt: output is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // One row (decode): fused dot products read each weight once, at the speed of memory.
    if m == 1 {
        gemv::matmul_nt_dots(a, m, k, w, n, out);
        return;
    }
    if (2..=skinny::SKINNY_MAX_ROWS).contains(&m) {
        skinny::matmul_nt_skinny(a, m, k, w, n, out);
        return;
    }
    let parallelism = if m * n * k < SERIAL_MACS { Parallelism::None } else { Parallelism::Rayon(threads()) };
    // SAFETY: the asserts above guarantee every index the strides reach is in bounds:
    // dst is m×n row-major (row stride n, column stride 1); lhs is m×k row-major;
    // rhs is the k×n view of w[n, k] (element (kk, j) at j*k + kk: row stride 1,
    // column stride k).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Scalar reference for [`matmul_nt`], accumulating in f64.
pub fn matmul_nt_reference(a: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|kk| a[i * k + kk] as f64 * w[j * k + kk] as f64).sum();
            out[i * n + j] = dot as f32;
        }
    }
    out
}

/// RMSNorm of every row of `x` (`rows × weight.len()`), in place:
/// `x / sqrt(mean(x²) + eps) * weight`, the mean taken in f64 as PyTorch's f32 path
/// accumulates with more care than a naive f32 sum.
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    let _span = crate::profile::span("norm", "rms norm", || crate::profile::elementwise(x.len(), 4.0));
    let wide = has_avx2_fma();
    map_rows(x, weight.len(), |row| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { norms_avx2::rms_norm_row(row, weight, eps) };
            return;
        }
        let _ = wide;
        rms_norm_row(row, weight, eps);
    });
}

#[inline(always)]
fn rms_norm_row(row: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = sum_f64_lanes(row, |v| v * v) / weight.len() as f64;
    let inv = 1.0 / ((mean_sq as f32) + eps).sqrt();
    for (v, w) in row.iter_mut().zip(weight) {
        *v = *v * inv * w;
    }
}

/// LayerNorm of every row of `x` (`rows × weight.len()`), in place:
/// `(x − mean) / sqrt(var + eps) · weight + bias`, statistics in f64.
pub fn layer_norm_rows(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let _span = crate::profile::span("norm", "layer norm", || crate::profile::elementwise(x.len(), 7.0));
    let wide = has_avx2_fma();
    map_rows(x, weight.len(), |row| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { norms_avx2::layer_norm_row(row, weight, bias, eps) };
            return;
        }
        let _ = wide;
        layer_norm_row(row, weight, bias, eps);
    });
}

#[inline(always)]
fn layer_norm_row(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let dim = weight.len() as f64;
    let mean = sum_f64_lanes(row, |v| v) / dim;
    let var = sum_f64_lanes(row, |v| (v - mean) * (v - mean)) / dim;
    let inv = 1.0 / (var + eps as f64).sqrt();
    for ((v, w), b) in row.iter_mut().zip(weight).zip(bias) {
        *v = ((*v as f64 - mean) * inv) as f32 * w + b;
    }
}

/// The norms compiled for AVX2: the same operations in the same order (the lane sums
/// are explicit, and Rust never contracts a multiply and an add into one rounding), so
/// the same bits, four f64 lanes per instruction instead of the baseline target's two:
/// the 13 layer norms of a MiniLM pass (8 × 128 tokens) took 2.7 ms, now 1.7 ms on the
/// 2-core Xeon.
#[cfg(target_arch = "x86_64")]
mod norms_avx2 {
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rms_norm_row(row: &mut [f32], weight: &[f32], eps: f32) {
        super::rms_norm_row(row, weight, eps)
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn layer_norm_row(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        super::layer_norm_row(row, weight, bias, eps)
    }
}

/// Running sums a row statistic keeps: independent chains the compiler vectorises, where
/// one f64 sum is a chain of dependent adds (a LayerNorm row took 7 cycles per value).
const SUM_LANES: usize = 8;

/// `Σ f(v)` over `row` in f64, accumulated in [`SUM_LANES`] interleaved partial sums (a
/// fixed order, the same on every CPU and thread count).
#[inline(always)]
fn sum_f64_lanes(row: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0.0f64; SUM_LANES];
    let chunks = row.chunks_exact(SUM_LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    for c in chunks {
        for (lane, &v) in lanes.iter_mut().zip(c) {
            *lane += f(v as f64);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Values below which an element-wise pass stays on the calling thread (waking the pool
/// costs more than a pass over a decode step's few thousand values).
const PARALLEL_ELEMENTS: usize = 1 << 15;

/// Values per task of a parallel element-wise pass.
const ELEMENT_CHUNK: usize = 1 << 13;

/// `f` over `x` in pieces, on the thread pool when `x` is large: the same values in any
/// case, since `f` treats each element on its own.
fn map_chunks(x: &mut [f32], f: impl Fn(&mut [f32]) + Sync) {
    use rayon::prelude::*;
    if x.len() < PARALLEL_ELEMENTS {
        f(x);
    } else {
        x.par_chunks_mut(ELEMENT_CHUNK).for_each(&f);
    }
}

/// `f` on every row of `dim` values of `x`, rows in parallel when `x` is large (each row
/// computed as on one thread).
fn map_rows(x: &mut [f32], dim: usize, f: impl Fn(&mut [f32]) + Sync) {
    use rayon::prelude::*;
    if dim == 0 {
        return;
    }
    if x.len() < PARALLEL_ELEMENTS {
        x.chunks_exact_mut(dim).for_each(f);
    } else {
        let rows = (ELEMENT_CHUNK / dim).max(1);
        x.par_chunks_mut(rows * dim).for_each(|piece| piece.chunks_exact_mut(dim).for_each(&f));
    }
}

/// GELU, tanh approximation (GPT-2's `gelu_new`, BLOOM's `bloom_gelu_forward`), in place.
pub fn gelu_tanh_in_place(x: &mut [f32]) {
    let _span =
        crate::profile::span("activation", "gelu (tanh)", || crate::profile::elementwise(x.len(), 10.0));
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    map_chunks(x, |x| {
        for v in x.iter_mut() {
            let u = *v;
            *v = 0.5 * u * (1.0 + (SQRT_2_OVER_PI * (u + 0.044715 * u * u * u)).tanh());
        }
    });
}

/// GELU with the error function (BERT's `gelu`), in place: f32, within
/// [`gelu`]'s budget of the f64 function.
pub fn gelu_erf_in_place(x: &mut [f32]) {
    let _span =
        crate::profile::span("activation", "gelu (erf)", || crate::profile::elementwise(x.len(), 10.0));
    map_chunks(x, gelu::gelu_erf);
}

/// ALiBi slopes for `heads` attention heads, as BLOOM defines them: a geometric sequence
/// for the largest power of two ≤ `heads`, then every other slope of the next power's
/// sequence for the remaining heads.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let base = |n: usize| 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
    let first = base(closest);
    let mut slopes: Vec<f32> = (1..=closest).map(|i| first.powi(i as i32) as f32).collect();
    if closest != heads {
        let extra = base(2 * closest);
        let remaining = (heads - closest).min(closest);
        slopes.extend((0..remaining).map(|i| extra.powi((2 * i + 1) as i32) as f32));
    }
    slopes
}

/// Log-softmax of one row into `out` (f64 for the sums, so perplexity and KL stay exact
/// to the last digit that matters).
pub fn log_softmax(row: &[f32], out: &mut Vec<f64>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_norm = max + sum.ln();
    out.clear();
    out.extend(row.iter().map(|&v| v as f64 - log_norm));
}

/// SiLU (`x · sigmoid(x)`) of `gate`, multiplied element-wise by `up`, written to `gate`.
pub fn silu_mul_in_place(gate: &mut [f32], up: &[f32]) {
    let _span =
        crate::profile::span("activation", "silu · up", || crate::profile::elementwise(gate.len(), 5.0));
    use rayon::prelude::*;
    let pass = |(gate, up): (&mut [f32], &[f32])| silu::silu_mul(gate, up);
    if gate.len() < PARALLEL_ELEMENTS {
        pass((gate, up));
    } else {
        gate.par_chunks_mut(ELEMENT_CHUNK).zip(up.par_chunks(ELEMENT_CHUNK)).for_each(pass);
    }
}

/// `bias` added to every row of `x` (rows of `bias.len()`), in place; the rows of large
/// outputs on the thread pool.
///
/// Why parallel: a linear layer's bias add is a pass over its whole output, and MiniLM's
/// 36 of them took 3.9 ms of a 97 ms encoder pass on one thread (2-core Xeon).
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    map_rows(x, bias.len(), |row| add_in_place(row, bias));
}

/// Element-wise `dst += src` (over the shorter of the two); large slices in pieces on the
/// thread pool (a residual add over a 1024-token batch is a 1.5 MB pass).
pub fn add_in_place(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    let add = |(d, s): (&mut [f32], &[f32])| d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    if dst.len() < PARALLEL_ELEMENTS {
        add((dst, src));
    } else {
        dst.par_chunks_mut(ELEMENT_CHUNK).zip(src.par_chunks(ELEMENT_CHUNK)).for_each(add);
    }
}

/// The first value of `values` that is NaN or infinite, with its index: outputs are
/// checked with it before any statistic is taken of them, so a NaN never scores.
pub fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    // A sum is finite only when every term is (and nothing overflows): one cheap pass
    // over the common, all-finite case (in parallel over large tensors), the index search
    // only when it fails.
    use rayon::prelude::*;
    let all_finite = |part: &[f32]| part.iter().map(|v| v * 0.0).sum::<f32>() == 0.0;
    let finite = if values.len() < PARALLEL_ELEMENTS {
        all_finite(values)
    } else {
        values.par_chunks(PARALLEL_ELEMENTS).all(all_finite)
    };
    if finite {
        return None;
    }
    values.iter().position(|v| !v.is_finite()).map(|i| (i, values[i]))
}

/// An error naming `tensor` and the place of its first NaN or infinity, when it has one.
/// `values` is laid out in rows of `width`; `row` says which row is which
/// (`"evaluation chunk 2, position 17"`), and the column is named as `column`
/// (`"vocabulary entry"`, `"channel"`).
pub fn check_finite(
    tensor: &str,
    values: &[f32],
    width: usize,
    row: impl Fn(usize) -> String,
    column: &str,
) -> crate::error::Result<()> {
    match first_non_finite(values) {
        None => Ok(()),
        Some((i, value)) => Err(crate::error::Error::NonFinite {
            tensor: tensor.to_string(),
            position: format!("{}, {column} {}", row(i / width.max(1)), i % width.max(1)),
            value,
        }),
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Relative L2 distance `‖a − b‖ / ‖b‖`, accumulated in f64.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Rotary position embedding tables (`cos`, `sin` per position and frequency), in the
/// "rotate half" layout Hugging Face Llama uses: dimension `i` pairs with `i + half`.
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    inv_freq: Vec<f64>,
}

impl Rope {
    /// Tables for heads of `head_dim` with base `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        Rope { head_dim, inv_freq }
    }

    /// The inverse frequencies rounded to f32, as [`Rope::angles`] uses them.
    pub fn inv_freq_f32(&self) -> Vec<f32> {
        self.inv_freq.iter().map(|&f| f as f32).collect()
    }

    /// The cosines and sines of positions `positions`, for every head and layer of a
    /// forward pass: computed once there instead of once per head per layer (SmolLM2's
    /// 64-token prefill called `sin_cos` 737,280 times, most of what it spent outside
    /// products, norms and attention).
    pub fn angles(&self, positions: std::ops::Range<usize>) -> RopeAngles {
        let half = self.head_dim / 2;
        let mut cos_sin = Vec::with_capacity(positions.len() * half * 2);
        for pos in positions.clone() {
            for f in &self.inv_freq[..half] {
                // torch computes the angle in f32 (position · inv_freq as f32), then cos/sin.
                let (sin, cos) = ((pos as f32) * (*f as f32)).sin_cos();
                cos_sin.extend([cos, sin]);
            }
        }
        RopeAngles { first: positions.start, half, cos_sin }
    }
}

/// [`Rope::angles`]: `(cos, sin)` of each frequency at each of a run of positions.
#[derive(Debug, Clone)]
pub struct RopeAngles {
    first: usize,
    half: usize,
    cos_sin: Vec<f32>,
}

impl RopeAngles {
    /// Rotate one head vector `x` for position `pos` (inside the table's run), in place.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.half;
        let table = &self.cos_sin[(pos - self.first) * 2 * half..][..2 * half];
        for (i, cs) in table.chunks_exact(2).enumerate() {
            let (cos, sin) = (cs[0], cs[1]);
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos - b * sin;
            x[i + half] = b * cos + a * sin;
        }
    }
}

/// A small deterministic random source (SplitMix64), so built-in models and test data
/// are identical on every machine without depending on a crate's stream stability.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Two independent standard normals (Marsaglia's polar method: no trigonometry, one
    /// logarithm per pair; about 1.27 pairs of uniforms per call).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let f = (-2.0 * s.ln() / s).sqrt();
                return (u * f, v * f);
            }
        }
    }

    /// `n` normal values with standard deviation `std`, as f32.
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element-wise passes (GELU, SiLU · up) and row norms give the same bits on the pool (large inputs) as
    /// one element or row at a time.
    #[test]
    fn parallel_passes_equal_the_serial_loops() {
        let dim = 384;
        let x = SeededRng::new(5).normal_vec(PARALLEL_ELEMENTS * 3 + dim * 7, 2.0);
        assert!(x.len().is_multiple_of(dim) && x.len() > PARALLEL_ELEMENTS);
        let (w, b) = (SeededRng::new(6).normal_vec(dim, 1.0), SeededRng::new(7).normal_vec(dim, 1.0));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        let mut erf = x.clone();
        gelu_erf_in_place(&mut erf);
        let mut tanh = x.clone();
        gelu_tanh_in_place(&mut tanh);
        let mut ln = x.clone();
        layer_norm_rows(&mut ln, &w, &b, 1e-5);
        let mut rms = x.clone();
        rms_norm_rows(&mut rms, &w, 1e-6);
        let up: Vec<f32> = x.iter().rev().copied().collect();
        let mut silu = x.clone();
        silu_mul_in_place(&mut silu, &up);
        let mut biased = x.clone();
        add_bias_rows(&mut biased, &b);
        let mut summed = x.clone();
        add_in_place(&mut summed, &up);
        for (i, row) in x.chunks_exact(dim).enumerate() {
            let at = i * dim..(i + 1) * dim;
            let mut one = row.to_vec();
            gelu_erf_in_place(&mut one);
            assert_eq!(bits(&one), bits(&erf[at.clone()]), "gelu_erf row {i}");
            let mut one = row.to_vec();
            gelu_tanh_in_place(&mut one);
            assert_eq!(bits(&one), bits(&tanh[at.clone()]), "gelu_tanh row {i}");
            let mut one = row.to_vec();
            layer_norm_rows(&mut one, &w, &b, 1e-5);
            assert_eq!(bits(&one), bits(&ln[at.clone()]), "layer_norm row {i}");
            let mut one = row.to_vec();
            rms_norm_rows(&mut one, &w, 1e-6);
            assert_eq!(bits(&one), bits(&rms[at.clone()]), "rms_norm row {i}");
            let mut one = row.to_vec();
            silu_mul_in_place(&mut one, &up[at.clone()]);
            assert_eq!(bits(&one), bits(&silu[at.clone()]), "silu_mul row {i}");
            let with_bias: Vec<f32> = row.iter().zip(&b).map(|(x, b)| x + b).collect();
            assert_eq!(bits(&with_bias), bits(&biased[at.clone()]), "bias row {i}");
            let with_up: Vec<f32> = row.iter().zip(&up[at.clone()]).map(|(x, u)| x + u).collect();
            assert_eq!(bits(&with_up), bits(&summed[at]), "add row {i}");
        }
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        SeededRng::new(seed).normal_vec(n, 1.0)
    }

    /// f32 GEMM against an f64 reference: the error budget is f32 rounding over k terms.
    const GEMM_REL_L2_BUDGET: f64 = 1e-5;

    #[test]
    fn balanced_tasks_share_the_threads_evenly() {
        let threads = threads();
        for (items, most) in [(192, 64), (576, 64), (1536, 64), (576, 455), (1, 64), (100, 1), (7, 3)] {
            let len = balanced_task_len(items, most);
            let tasks = items.div_ceil(len);
            assert!((1..=most).contains(&len), "{items} by {most}: tasks of {len}");
            // Even: every thread gets the same number of tasks, bar the last one or two
            // short ones, so no thread holds more than a task's worth over its share.
            let per_thread = tasks.div_ceil(threads) * len;
            assert!(per_thread <= items.div_ceil(threads) + len, "{items} by {most}: {tasks} tasks of {len}");
            assert!(tasks >= items.div_ceil(most), "{items} by {most}: tasks larger than {most}");
        }
    }

    #[test]
    fn matmul_matches_reference_on_odd_shapes() {
        for &(m, k, n) in &[(1, 7, 5), (3, 64, 33), (17, 129, 65), (64, 256, 300)] {
            let a = random(m * k, 1);
            let w = random(n * k, 2);
            let mut out = vec![f32::NAN; m * n];
            matmul_nt(&a, m, k, &w, n, &mut out);
            let reference = matmul_nt_reference(&a, m, k, &w, n);
            let err = relative_l2(&out, &reference);
            assert!(err < GEMM_REL_L2_BUDGET, "shape {m}x{k}x{n}: rel l2 {err}");
        }
    }

    #[test]
    fn rms_norm_gives_unit_rms_with_unit_weight() {
        let mut x = random(3 * 16, 3);
        rms_norm_rows(&mut x, &[1.0; 16], 0.0);
        for row in x.chunks(16) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 16.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-5, "rms {rms}");
        }
    }

    /// The AVX2 norms give the portable rows' bits.
    #[test]
    fn norms_give_the_same_bits_on_every_path() {
        for dim in [1, 7, 64, 384, 577] {
            let x = random(4 * dim, dim as u64);
            let (w, b) = (random(dim, 3), random(dim, 4));
            let (mut fast, mut plain) = (x.clone(), x.clone());
            layer_norm_rows(&mut fast, &w, &b, 1e-12);
            plain.chunks_exact_mut(dim).for_each(|r| layer_norm_row(r, &w, &b, 1e-12));
            assert_eq!(
                fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let (mut fast, mut plain) = (x.clone(), x);
            rms_norm_rows(&mut fast, &w, 1e-6);
            plain.chunks_exact_mut(dim).for_each(|r| rms_norm_row(r, &w, 1e-6));
            assert_eq!(
                fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn layer_norm_centres_and_scales() {
        let mut x = random(2 * 8, 6);
        layer_norm_rows(&mut x, &[2.0; 8], &[0.5; 8], 0.0);
        for row in x.chunks(8) {
            let mean = row.iter().sum::<f32>() / 8.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 8.0;
            assert!((mean - 0.5).abs() < 1e-5 && (var - 4.0).abs() < 1e-4, "mean {mean} var {var}");
        }
    }

    #[test]
    fn gelu_forms_agree_with_known_values() {
        let mut exact = vec![-3.0, -1.0, 0.0, 0.5, 2.0];
        let mut approx = exact.clone();
        gelu_erf_in_place(&mut exact);
        gelu_tanh_in_place(&mut approx);
        // torch.nn.functional.gelu of the same inputs.
        let torch = [-0.0040496, -0.1586553, 0.0, 0.3457312, 1.9544997];
        for ((e, a), t) in exact.iter().zip(&approx).zip(torch) {
            assert!((e - t).abs() < 1e-6, "erf form {e} vs {t}");
            assert!((a - t).abs() < 1e-3, "tanh form {a} vs {t}");
        }
    }

    #[test]
    fn alibi_slopes_match_bloom_for_powers_of_two_and_others() {
        let eight = alibi_slopes(8);
        let expect: Vec<f32> = (1..=8).map(|i| 0.5f32.powi(i)).collect();
        assert_eq!(eight, expect);
        // 6 heads: 4 from the 4-head sequence (2^-2i), then 2^-1 and 2^-3 from the 8-head one.
        let six = alibi_slopes(6);
        let expect = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        assert_eq!(six, expect);
    }

    #[test]
    fn softmax_and_log_softmax_agree() {
        let mut row = random(50, 4);
        let mut logp = Vec::new();
        log_softmax(&row, &mut logp);
        softmax_in_place(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        for (p, lp) in row.iter().zip(&logp) {
            assert!((*p as f64 - lp.exp()).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        let rope = Rope::new(8, 10000.0);
        let x = random(8, 5);
        let mut at_zero = x.clone();
        rope.angles(0..1).apply(&mut at_zero, 0);
        assert_eq!(at_zero, x);
        let mut rotated = x.clone();
        rope.angles(30..40).apply(&mut rotated, 37);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&rotated) - norm(&x)).abs() < 1e-4);
        assert_ne!(rotated, x);
    }

    #[test]
    fn seeded_rng_is_deterministic_and_roughly_normal() {
        let a = SeededRng::new(7).normal_vec(10_000, 1.0);
        assert_eq!(a, SeededRng::new(7).normal_vec(10_000, 1.0));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}
