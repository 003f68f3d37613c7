//! Launchers of `kernels/ops.cu`: norms, activations, bias and residual adds, softmax,
//! rotary embeddings, embedding lookup, the key/value cache and attention.

use super::*;

/// RMSNorm of every row of `x` (`rows × weight.len()`) into `out`.
pub fn rms_norm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    rows: usize,
    eps: f32,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "rms_norm";
    let dim = weight.len();
    need(OP, "x", x.len(), rows * dim)?;
    need(OP, "out", out.len(), rows * dim)?;
    let (r, d) = (int(OP, "rows", rows)?, int(OP, "dim", dim)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        per_row(rows)?,
        |b| {
            b.arg(x).arg(weight).arg(out).arg(&r).arg(&d).arg(&eps);
        },
        &mut f,
    )
}

/// LayerNorm of every row of `x` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rows: usize,
    eps: f32,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "layer_norm";
    let dim = weight.len();
    need(OP, "bias", bias.len(), dim)?;
    need(OP, "x", x.len(), rows * dim)?;
    need(OP, "out", out.len(), rows * dim)?;
    let (r, d) = (int(OP, "rows", rows)?, int(OP, "dim", dim)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        per_row(rows)?,
        |b| {
            b.arg(x).arg(weight).arg(bias).arg(out).arg(&r).arg(&d).arg(&eps);
        },
        &mut f,
    )
}

/// What a product kernel does with each value after its bias: the activation, then either
/// store it or add it to what the output holds (the residual add, `out = out + v`, as
/// [`add_in_place`]). The same arithmetic as the separate launches, so a
/// fused decode step computes what the unfused one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fuse {
    /// The activation applied to `product + bias`.
    pub act: Option<Unary>,
    /// Add to the output's values instead of overwriting them.
    pub accumulate: bool,
}

impl Fuse {
    /// Store `product + bias`.
    pub const NONE: Fuse = Fuse { act: None, accumulate: false };
    /// Add `product + bias` to the output (the residual stream).
    pub const RESIDUAL: Fuse = Fuse { act: None, accumulate: true };

    /// Store `act(product + bias)`.
    pub fn activation(act: Unary) -> Fuse {
        Fuse { act: Some(act), accumulate: false }
    }

    /// Whether the epilogue does nothing beyond the bias.
    pub fn is_none(self) -> bool {
        self == Fuse::NONE
    }

    /// The kernels' `(act, accumulate)` arguments (`ACT_*` of kernels/common.cuh).
    pub(in crate::backend::cuda) fn codes(self) -> (i32, i32) {
        let act = match self.act {
            None => 0,
            Some(Unary::GeluTanh) => 1,
            Some(Unary::GeluErf) => 2,
        };
        (act, i32::from(self.accumulate))
    }
}

/// An element-wise activation of [`unary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    /// GELU, tanh approximation.
    GeluTanh,
    /// GELU, exact error function.
    GeluErf,
}

/// `out = act(x)` element-wise.
pub fn unary(gpu: &Gpu, act: Unary, x: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<(), CudaError> {
    let op = match act {
        Unary::GeluTanh => "gelu_tanh",
        Unary::GeluErf => "gelu_erf",
    };
    let n = x.len();
    need(op, "out", out.len(), n)?;
    let nl = long(op, "values", n)?;
    let mut f = None;
    launch(
        gpu,
        &OPS,
        op,
        grid_stride(n),
        |b| {
            b.arg(x).arg(out).arg(&nl);
        },
        &mut f,
    )
}

/// `out = silu(gate) · up`.
pub fn silu_mul(
    gpu: &Gpu,
    gate: &CudaSlice<f32>,
    up: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "silu_mul";
    let n = gate.len();
    need(OP, "up", up.len(), n)?;
    need(OP, "out", out.len(), n)?;
    let nl = long(OP, "values", n)?;
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(n),
        |b| {
            b.arg(gate).arg(up).arg(out).arg(&nl);
        },
        &mut f,
    )
}

/// `dst += src` (the first `src.len()` values).
pub fn add_in_place(gpu: &Gpu, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) -> Result<(), CudaError> {
    const OP: &str = "add_in_place";
    let n = src.len();
    need(OP, "dst", dst.len(), n)?;
    let nl = long(OP, "values", n)?;
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(n),
        |b| {
            b.arg(dst).arg(src).arg(&nl);
        },
        &mut f,
    )
}

/// `x[i, j] += bias[j]` over `rows` rows of `bias.len()`.
pub fn add_bias_rows(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rows: usize,
) -> Result<(), CudaError> {
    const OP: &str = "add_bias_rows";
    let n = bias.len();
    need(OP, "x", x.len(), rows * n)?;
    let (r, ni) = (int(OP, "rows", rows)?, int(OP, "n", n)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(rows * n),
        |b| {
            b.arg(x).arg(bias).arg(&r).arg(&ni);
        },
        &mut f,
    )
}

/// Split a fused projection `fused` (`[rows, 3 · width]`, runs of `3 · run` values
/// `[q | k | v]`) into `q`, `k` and `v` (`[rows, width]` each).
pub fn split_qkv(
    gpu: &Gpu,
    fused: &CudaSlice<f32>,
    (rows, width, run): (usize, usize, usize),
    q: &mut CudaSlice<f32>,
    k: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "split_qkv";
    if run == 0 || width % run != 0 {
        return Err(CudaError::Shape { op: OP, message: format!("run {run} does not divide width {width}") });
    }
    need(OP, "fused", fused.len(), 3 * rows * width)?;
    for (what, out) in [("q", &*q), ("k", &*k), ("v", &*v)] {
        need(OP, what, out.len(), rows * width)?;
    }
    let (rl, w, r) = (long(OP, "rows", rows)?, int(OP, "width", width)?, int(OP, "run", run)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(rows * width),
        |b| {
            b.arg(fused).arg(q).arg(k).arg(v).arg(&rl).arg(&w).arg(&r);
        },
        &mut f,
    )
}

/// `out[b] = x[b · seq + seq − 1]` for rows of `width` values: the last position of each
/// of `batch` sequences.
pub fn last_rows(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    (batch, seq, width): (usize, usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "last_rows";
    need(OP, "x", x.len(), batch * seq * width)?;
    need(OP, "out", out.len(), batch * width)?;
    let (b, s, w) = (int(OP, "batch", batch)?, int(OP, "seq", seq)?, int(OP, "width", width)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(batch * width),
        |a| {
            a.arg(x).arg(out).arg(&b).arg(&s).arg(&w);
        },
        &mut f,
    )
}

/// Softmax of each row of `cols` values.
pub fn softmax_rows(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    (rows, cols): (usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "softmax_rows";
    need(OP, "x", x.len(), rows * cols)?;
    need(OP, "out", out.len(), rows * cols)?;
    let (r, c) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        per_row(rows)?,
        |b| {
            b.arg(x).arg(out).arg(&r).arg(&c);
        },
        &mut f,
    )
}

/// Rotary embedding in place on `x[tokens, heads · head_dim]`, token `t` at
/// `positions[t]`; `inv_freq` holds `head_dim / 2` f32 frequencies (as `tensor::Rope`).
pub fn rotary(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    positions: &CudaSlice<i32>,
    inv_freq: &CudaSlice<f32>,
    dims: (usize, usize, usize),
) -> Result<(), CudaError> {
    rotary_view(gpu, x, &positions.as_view(), inv_freq, dims)
}

/// [`rotary`] with the positions in part of a larger buffer (a decode graph's inputs).
pub fn rotary_view(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    positions: &CudaView<'_, i32>,
    inv_freq: &CudaSlice<f32>,
    (tokens, heads, head_dim): (usize, usize, usize),
) -> Result<(), CudaError> {
    const OP: &str = "rotary";
    need(OP, "x", x.len(), tokens * heads * head_dim)?;
    need(OP, "positions", positions.len(), tokens)?;
    need(OP, "inv_freq", inv_freq.len(), head_dim / 2)?;
    let (t, h, d) = (int(OP, "tokens", tokens)?, int(OP, "heads", heads)?, int(OP, "head_dim", head_dim)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(tokens * heads * (head_dim / 2)),
        |b| {
            b.arg(x).arg(positions).arg(inv_freq).arg(&t).arg(&h).arg(&d);
        },
        &mut f,
    )
}

/// `out[t] = table[tokens[t]]` (`table` is `[vocab, dim]`); `tokens_host` is checked
/// against the vocabulary here, before the launch.
pub fn embedding(
    gpu: &Gpu,
    table: &CudaSlice<f32>,
    (vocab, dim): (usize, usize),
    tokens_host: &[u32],
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "embedding";
    need(OP, "table", table.len(), vocab * dim)?;
    need(OP, "out", out.len(), tokens_host.len() * dim)?;
    if let Some(&bad) = tokens_host.iter().find(|&&t| t as usize >= vocab) {
        return Err(CudaError::Shape {
            op: OP,
            message: format!("token id {bad}, expected below the vocabulary size {vocab}"),
        });
    }
    let tokens = gpu.upload(tokens_host)?;
    let (n, v, d) = (int(OP, "tokens", tokens_host.len())?, int(OP, "vocab", vocab)?, int(OP, "dim", dim)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(tokens_host.len() * dim),
        |b| {
            b.arg(table).arg(&tokens).arg(out).arg(&n).arg(&v).arg(&d);
        },
        &mut f,
    )
}

/// [`embedding`] of ids already on the device (a decode graph's inputs, which change
/// between replays): `out[t] = table[ids[t]]` for every id of `ids`, read as unsigned. The
/// caller checks the ids against the vocabulary before it writes them; the kernel gives
/// NaN rows for any id outside it.
pub fn embedding_device(
    gpu: &Gpu,
    table: &CudaSlice<f32>,
    (vocab, dim): (usize, usize),
    ids: &CudaView<'_, i32>,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "embedding";
    need(OP, "table", table.len(), vocab * dim)?;
    need(OP, "out", out.len(), ids.len() * dim)?;
    let (n, v, d) = (int(OP, "tokens", ids.len())?, int(OP, "vocab", vocab)?, int(OP, "dim", dim)?);
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(ids.len() * dim),
        |b| {
            b.arg(table).arg(ids).arg(out).arg(&n).arg(&v).arg(&d);
        },
        &mut f,
    )
}

/// The shape of one layer's key/value cache on the device:
/// `[batch · kv_heads, capacity, head_dim]` for keys and for values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Positions the cache holds.
    pub capacity: usize,
}

impl CacheShape {
    /// Values of the key (or value) cache.
    pub fn len(&self) -> usize {
        self.batch * self.kv_heads * self.capacity * self.head_dim
    }

    /// True when the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where [`kv_append`] and [`attention`] find the cache length `start`.
#[derive(Clone, Copy)]
pub(in crate::backend::cuda) enum Start<'a> {
    /// A kernel argument, checked on the host.
    Host(usize),
    /// `start[0]` on the device, read by the kernel: a captured decode graph replays with
    /// a new cache length each step.
    Device(&'a CudaView<'a, i32>),
}

/// Push the `int` dimensions, then the device cache length (or null when the host passes
/// it among the dimensions): the cache kernels' trailing arguments.
/// Check an append of `seq` positions at `start` against the cache's capacity; the
/// host-side start (0 when the device holds it).
pub(in crate::backend::cuda) fn append_start(
    op: &'static str,
    shape: CacheShape,
    seq: usize,
    start: Start,
) -> Result<usize, CudaError> {
    let host_start = match start {
        Start::Host(s) => s,
        Start::Device(d) => {
            need(op, "start", d.len(), 1)?;
            0
        }
    };
    if host_start + seq > shape.capacity {
        return Err(CudaError::Shape {
            op,
            message: format!(
                "positions {host_start}..{} past the cache capacity {}",
                host_start + seq,
                shape.capacity
            ),
        });
    }
    Ok(host_start)
}

pub(in crate::backend::cuda) fn push_dims_and_start<'a>(
    b: &mut LaunchArgs<'a>,
    dims: &'a [i32],
    start: Start<'a>,
) {
    for d in dims {
        b.arg(d);
    }
    match start {
        Start::Host(_) => b.arg(&NULL),
        Start::Device(d) => b.arg(d),
    };
}

/// Append `seq` new positions (`src` is `[batch, seq, kv_heads · head_dim]`) at `start`.
pub fn kv_append(
    gpu: &Gpu,
    src: &CudaSlice<f32>,
    cache: &mut CudaSlice<f32>,
    shape: CacheShape,
    (start, seq): (usize, usize),
) -> Result<(), CudaError> {
    kv_append_from(gpu, src, cache, shape, seq, Start::Host(start))
}

/// [`kv_append`] at the position `start[0]` holds on the device (a decode graph's
/// inputs). The caller keeps `start[0] + seq` within the capacity; the kernel skips
/// positions past it.
pub fn kv_append_at(
    gpu: &Gpu,
    src: &CudaSlice<f32>,
    cache: &mut CudaSlice<f32>,
    shape: CacheShape,
    seq: usize,
    start: &CudaView<'_, i32>,
) -> Result<(), CudaError> {
    kv_append_from(gpu, src, cache, shape, seq, Start::Device(start))
}

pub(super) fn kv_append_from(
    gpu: &Gpu,
    src: &CudaSlice<f32>,
    cache: &mut CudaSlice<f32>,
    shape: CacheShape,
    seq: usize,
    start: Start,
) -> Result<(), CudaError> {
    const OP: &str = "kv_append";
    let CacheShape { batch, kv_heads, head_dim, capacity, .. } = shape;
    need(OP, "src", src.len(), batch * seq * kv_heads * head_dim)?;
    need(OP, "cache", cache.len(), shape.len())?;
    let host_start = append_start(OP, shape, seq, start)?;
    let dims: Vec<i32> = [batch, seq, kv_heads, head_dim, capacity, host_start]
        .into_iter()
        .map(|v| int(OP, "dimension", v))
        .collect::<Result<_, _>>()?;
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        grid_stride(batch * seq * kv_heads * head_dim),
        |b| {
            b.arg(src).arg(cache);
            push_dims_and_start(b, &dims, start);
        },
        &mut f,
    )
}

/// Masking of [`attention`], as `tensor::attention::Masking`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceMasking<'a> {
    /// Query `t` sees keys `0..=start + t` only.
    pub causal: bool,
    /// ALiBi slopes, one per head.
    pub alibi: Option<&'a CudaSlice<f32>>,
    /// `[batch, start + seq]`, 0 for padding keys.
    pub key_mask: Option<&'a CudaSlice<u8>>,
}

/// Attention of `seq` queries (`q` is `[batch, seq, heads · head_dim]`) at positions
/// `start..start + seq` against the caches (the new positions already appended).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    k_cache: &CudaSlice<f32>,
    v_cache: &CudaSlice<f32>,
    shape: CacheShape,
    (start, seq): (usize, usize),
    masking: DeviceMasking,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    attention_from(gpu, q, (k_cache, v_cache), shape, seq, Start::Host(start), masking, out)
}

/// [`attention`] after the `start[0]` positions the device holds (a decode graph's inputs):
/// the scores' shared memory is sized for the whole capacity, since the key count is not
/// known on the host. No key mask (its row length would be that count); the caller keeps
/// `start[0] + seq` within the capacity, and blocks past it write nothing.
#[allow(clippy::too_many_arguments)]
pub fn attention_at(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    k_cache: &CudaSlice<f32>,
    v_cache: &CudaSlice<f32>,
    shape: CacheShape,
    seq: usize,
    start: &CudaView<'_, i32>,
    masking: DeviceMasking,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    attention_from(gpu, q, (k_cache, v_cache), shape, seq, Start::Device(start), masking, out)
}

/// Dynamic shared memory a block may use without opting in.
pub(super) const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// The attention kernel's static shared memory: its reduction scratch (32 floats) and
/// the partial value sums of its 128 threads. The scores' dynamic memory shares the
/// block's budget with it.
pub(super) const ATTENTION_STATIC_SHARED: usize = (32 + 128) * 4;

/// Let the attention kernel use `bytes` of dynamic shared memory (above 48 KiB a kernel
/// must opt in), or an error naming the device's limit.
pub(super) fn opt_in_shared(gpu: &Gpu, op: &'static str, bytes: usize) -> Result<(), CudaError> {
    use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
    let limit = guard(op, || {
        gpu.context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver("cuDeviceGetAttribute"))
    })?;
    let limit = usize::try_from(limit).unwrap_or(0).saturating_sub(ATTENTION_STATIC_SHARED);
    if bytes > limit {
        return Err(CudaError::Shape {
            op,
            message: format!(
                "{bytes} bytes of shared memory for the scores, expected at most {limit} ({} keys) on this device",
                limit / 4
            ),
        });
    }
    let f = gpu.function(&OPS, "attention")?;
    guard(op, || {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
            .map_err(driver("cuFuncSetAttribute"))
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_from(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    (k_cache, v_cache): (&CudaSlice<f32>, &CudaSlice<f32>),
    shape: CacheShape,
    seq: usize,
    start: Start,
    masking: DeviceMasking,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "attention";
    let CacheShape { batch, heads, kv_heads, head_dim, capacity } = shape;
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(CudaError::Shape {
            op: OP,
            message: format!("{heads} heads over {kv_heads} kv heads, expected a multiple"),
        });
    }
    // The keys the scores must hold: known on the host, else as many as the cache can.
    let (host_start, keys) = match start {
        Start::Host(s) => (s, s + seq),
        Start::Device(d) => {
            need(OP, "start", d.len(), 1)?;
            if masking.key_mask.is_some() {
                return Err(CudaError::Shape {
                    op: OP,
                    message: "a key mask with the cache length on the device, expected none".into(),
                });
            }
            (0, capacity)
        }
    };
    if host_start + seq > capacity {
        return Err(CudaError::Shape {
            op: OP,
            message: format!("{} keys past the cache capacity {capacity}", host_start + seq),
        });
    }
    need(OP, "q", q.len(), batch * seq * heads * head_dim)?;
    need(OP, "out", out.len(), batch * seq * heads * head_dim)?;
    need(OP, "k_cache", k_cache.len(), shape.len())?;
    need(OP, "v_cache", v_cache.len(), shape.len())?;
    if let Some(a) = masking.alibi {
        need(OP, "alibi", a.len(), heads)?;
    }
    if let Some(m) = masking.key_mask {
        need(OP, "key_mask", m.len(), batch * keys)?;
    }
    let shared = keys * 4;
    let default_limit = DEFAULT_SHARED_BYTES - ATTENTION_STATIC_SHARED;
    match start {
        Start::Host(_) if shared > default_limit => {
            return Err(CudaError::Shape {
                op: OP,
                message: format!(
                    "{keys} keys need {shared} bytes of shared memory, expected at most {default_limit} ({} keys)",
                    default_limit / 4
                ),
            });
        }
        Start::Device(_) if shared > default_limit => opt_in_shared(gpu, OP, shared)?,
        _ => {}
    }
    let v: Vec<i32> = [batch, seq, heads, kv_heads, head_dim, capacity, host_start]
        .into_iter()
        .map(|v| int(OP, "dimension", v))
        .collect::<Result<_, _>>()?;
    let causal = i32::from(masking.causal);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let cfg = LaunchConfig {
        grid_dim: ((batch * seq).max(1) as u32, heads.max(1) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let mut f = None;
    launch(
        gpu,
        &OPS,
        OP,
        cfg,
        |b| {
            b.arg(q).arg(k_cache).arg(v_cache).arg(out);
            for d in &v {
                b.arg(d);
            }
            b.arg(&causal);
            opt_arg!(b, masking.alibi);
            opt_arg!(b, masking.key_mask);
            b.arg(&scale);
            match start {
                Start::Host(_) => b.arg(&NULL),
                Start::Device(d) => b.arg(d),
            };
        },
        &mut f,
    )
}
