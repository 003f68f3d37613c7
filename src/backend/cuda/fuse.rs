//! The fused decode kernels' host wrappers: [`Fuse`] (defined beside the kernels that take
//! it), the epilogue every product kernel can apply (an activation, the residual add);
//! [`dense_gemv`] for f32, f16 and bf16
//! weights; [`bias_act_rows`] for the products that have no epilogue of their own (cuBLAS);
//! and the launches that merge a decode step's data movement: [`split_qkv_append`] and
//! [`kv_append_pair`]. Why: a decode step on small shapes is bound by launches (each at
//! least a few microseconds however little it moves), not by bytes.

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::kernels::{DENSE_GEMV_BY_ROWS, LINEAR, OPS};
pub use super::ops::Fuse;
use super::ops::{
    append_start, grid_stride, int, launch, need, opt_arg, push_dims_and_start, CacheShape, Start,
    GEMV_MAX_ROWS, NULL,
};
use super::{CudaError, Gpu};

/// A dense weight `[rows, cols]` for [`dense_gemv`].
#[derive(Debug, Clone, Copy)]
pub enum DenseWeight<'a> {
    /// f32 values.
    F32(&'a CudaSlice<f32>),
    /// f16 (`bf16: false`) or bf16 bits; activations are rounded to the same type.
    Half(&'a CudaSlice<u16>, bool),
}

impl DenseWeight<'_> {
    fn len(&self) -> usize {
        match self {
            DenseWeight::F32(w) => w.len(),
            DenseWeight::Half(w, _) => w.len(),
        }
    }

    /// Values per 16-byte load (`V` of the kernel).
    fn per_load(&self) -> usize {
        match self {
            DenseWeight::F32(_) => 4,
            DenseWeight::Half(..) => 8,
        }
    }

    fn kind(&self) -> i32 {
        match self {
            DenseWeight::F32(_) => 0,
            DenseWeight::Half(_, false) => 1,
            DenseWeight::Half(_, true) => 2,
        }
    }
}

/// Output rows per block of [`dense_gemv`] (`DG_THREADS / 32 · DG_ROWS`).
const DENSE_GEMV_ROWS: usize = 16;

/// The most activation rows [`CudaLinear`](super::linear::CudaLinear) sends to
/// [`dense_gemv`]: at one row it moves weights as fast as cuBLAS's GEMV (H200: 54–94% of
/// copy bandwidth against cuBLAS's 64–95%, shape by shape) and saves the launches of the
/// activation rounding, bias and residual add; at eight rows cuBLAS reads each weight once
/// for all rows at 64–98% where this kernel falls to 21–36%.
pub const DENSE_GEMV_MAX_ROWS: usize = 1;

/// Whether [`dense_gemv`] takes a weight of `cols` inputs: whole 16-byte loads per row.
pub fn dense_gemv_fits(w: &DenseWeight, cols: usize) -> bool {
    cols > 0 && cols.is_multiple_of(w.per_load())
}

/// `out[m, rows] = x[m, cols] · Wᵀ (+ bias)` then `fuse`, for `m` ≤ [`GEMV_MAX_ROWS`]
/// and a shape [`dense_gemv_fits`] takes. 16-bit weights multiply the activations rounded
/// to their type, exactly, summed in f32 (as `cublasGemmEx` on rounded activations).
#[allow(clippy::too_many_arguments)]
pub fn dense_gemv(
    gpu: &Gpu,
    w: DenseWeight,
    (rows, cols): (usize, usize),
    x: &CudaSlice<f32>,
    m: usize,
    bias: Option<&CudaSlice<f32>>,
    fuse: Fuse,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "dense_gemv";
    if m == 0 || m > GEMV_MAX_ROWS || !dense_gemv_fits(&w, cols) {
        return Err(CudaError::Shape {
            op: OP,
            message: format!(
                "m = {m}, cols = {cols}, expected 1 ..= {GEMV_MAX_ROWS} rows and cols a multiple of {}",
                w.per_load()
            ),
        });
    }
    need(OP, "w", w.len(), rows * cols)?;
    need(OP, "x", x.len(), m * cols)?;
    need(OP, "out", out.len(), m * rows)?;
    if let Some(b) = bias {
        need(OP, "bias", b.len(), rows)?;
    }
    let (ri, ci, kind) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?, w.kind());
    let (act, accumulate) = fuse.codes();
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(DENSE_GEMV_ROWS).max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        DENSE_GEMV_BY_ROWS[m - 1],
        cfg,
        |b| {
            match w {
                DenseWeight::F32(w) => b.arg(w),
                DenseWeight::Half(w, _) => b.arg(w),
            };
            b.arg(x);
            opt_arg!(b, bias);
            b.arg(out).arg(&ri).arg(&ci).arg(&kind).arg(&act).arg(&accumulate);
        },
        &mut f,
    )
}

/// `out[i, j] = raw[i, j] + bias[j]` then `fuse`, for `rows` rows of `n` values: the
/// epilogue of a product computed without one.
pub fn bias_act_rows(
    gpu: &Gpu,
    raw: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    fuse: Fuse,
    out: &mut CudaSlice<f32>,
    (rows, n): (usize, usize),
) -> Result<(), CudaError> {
    const OP: &str = "bias_act_rows";
    need(OP, "raw", raw.len(), rows * n)?;
    need(OP, "out", out.len(), rows * n)?;
    if let Some(b) = bias {
        need(OP, "bias", b.len(), n)?;
    }
    let (ri, ni) = (int(OP, "rows", rows)?, int(OP, "n", n)?);
    let (act, accumulate) = fuse.codes();
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(rows * n),
        |b| {
            b.arg(raw);
            opt_arg!(b, bias);
            b.arg(out).arg(&ri).arg(&ni).arg(&act).arg(&accumulate);
        },
        &mut f,
    )
}

/// Where the appends find the cache length: on the host, or `start[0]` on the device (a
/// decode graph's inputs; the kernels then skip positions past the capacity).
#[derive(Clone, Copy)]
pub enum AppendAt<'a> {
    /// A kernel argument, checked on the host.
    Host(usize),
    /// `start[0]` on the device.
    Device(&'a CudaView<'a, i32>),
}

impl<'a> AppendAt<'a> {
    fn start(self) -> Start<'a> {
        match self {
            AppendAt::Host(s) => Start::Host(s),
            AppendAt::Device(d) => Start::Device(d),
        }
    }
}

/// Append a layer's new keys and values (`k` and `v` each `[batch, seq, kv_heads ·
/// head_dim]`) to its caches in one launch: [`super::ops::kv_append`] twice.
pub fn kv_append_pair(
    gpu: &Gpu,
    (k, v): (&CudaSlice<f32>, &CudaSlice<f32>),
    (k_cache, v_cache): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
    shape: CacheShape,
    seq: usize,
    at: AppendAt,
) -> Result<(), CudaError> {
    const OP: &str = "kv_append_pair";
    let CacheShape { batch, kv_heads, head_dim, capacity, .. } = shape;
    let n = batch * seq * kv_heads * head_dim;
    need(OP, "k", k.len(), n)?;
    need(OP, "v", v.len(), n)?;
    need(OP, "k cache", k_cache.len(), shape.len())?;
    need(OP, "v cache", v_cache.len(), shape.len())?;
    let start = at.start();
    let host_start = append_start(OP, shape, seq, start)?;
    let dims: Vec<i32> = [batch, seq, kv_heads, head_dim, capacity, host_start]
        .into_iter()
        .map(|d| int(OP, "dimension", d))
        .collect::<Result<_, _>>()?;
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(n),
        |b| {
            b.arg(k).arg(v).arg(k_cache).arg(v_cache);
            push_dims_and_start(b, &dims, start);
        },
        &mut f,
    )
}

/// Split a fused projection (`[batch · seq, 3 · heads · head_dim]`, runs of `run` values
/// of q, k, v in turn) into `q` and append its keys and values to the caches, in one
/// launch: [`super::ops::split_qkv`] then [`kv_append_pair`]. Keys and values have as
/// many heads as queries.
#[allow(clippy::too_many_arguments)]
pub fn split_qkv_append(
    gpu: &Gpu,
    fused: &CudaSlice<f32>,
    run: usize,
    q: &mut CudaSlice<f32>,
    (k_cache, v_cache): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
    shape: CacheShape,
    seq: usize,
    at: AppendAt,
) -> Result<(), CudaError> {
    const OP: &str = "split_qkv_append";
    let CacheShape { batch, heads, kv_heads, head_dim, capacity } = shape;
    let width = heads * head_dim;
    if kv_heads != heads || run == 0 || !width.is_multiple_of(run) {
        return Err(CudaError::Shape {
            op: OP,
            message: format!(
                "{heads} query and {kv_heads} key/value heads, runs of {run} over a width of {width}, expected as many key/value heads as query heads and runs dividing the width"
            ),
        });
    }
    let rows = batch * seq;
    need(OP, "fused", fused.len(), rows * 3 * width)?;
    need(OP, "q", q.len(), rows * width)?;
    need(OP, "k cache", k_cache.len(), shape.len())?;
    need(OP, "v cache", v_cache.len(), shape.len())?;
    let start = at.start();
    let host_start = append_start(OP, shape, seq, start)?;
    let dims: Vec<i32> = [batch, seq, heads, head_dim, run, capacity, host_start]
        .into_iter()
        .map(|d| int(OP, "dimension", d))
        .collect::<Result<_, _>>()?;
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(rows * width),
        |b| {
            b.arg(fused).arg(q).arg(k_cache).arg(v_cache);
            push_dims_and_start(b, &dims, start);
        },
        &mut f,
    )
}
