//! Launchers of `kernels/quant.cu`: int8 quantization of activations, the int8 GEMV and
//! tiled GEMM, their rescale, LLM.int8's outlier split and fake quantization.

use super::*;

/// Per-row (token) symmetric int8 quantization of `x[rows, cols]` into `q` and `scales`;
/// columns flagged in `skip` (LLM.int8's outliers) count as zeros.
pub fn quantize_rows_i8(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    skip: Option<&CudaSlice<u8>>,
    rows: usize,
    cols: usize,
    q: &mut CudaSlice<i8>,
    scales: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "quantize_rows_i8";
    need(OP, "x", x.len(), rows * cols)?;
    need(OP, "q", q.len(), rows * cols)?;
    need(OP, "scales", scales.len(), rows)?;
    if let Some(s) = skip {
        need(OP, "skip", s.len(), cols)?;
    }
    let (r, c) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        OP,
        per_row(rows)?,
        |b| {
            b.arg(x);
            opt_arg!(b, skip);
            b.arg(q).arg(scales).arg(&r).arg(&c);
        },
        &mut f,
    )
}

/// One symmetric int8 scale for all of `x[rows, cols]` (per-tensor activations).
pub fn quantize_tensor_i8(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    q: &mut CudaSlice<i8>,
    scales: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "quantize_tensor_i8";
    need(OP, "x", x.len(), rows * cols)?;
    need(OP, "q", q.len(), rows * cols)?;
    need(OP, "scales", scales.len(), rows)?;
    let n = long(OP, "values", rows * cols)?;
    let (r, c) = (int(OP, "rows", rows)?, int(OP, "cols", cols.max(1))?);
    let mut absmax = gpu.zeros::<u32>(1)?;
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        "absmax_bits",
        grid_stride(rows * cols),
        |b| {
            b.arg(x).arg(&n).arg(&mut absmax);
        },
        &mut f,
    )?;
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        OP,
        grid_stride(rows * cols),
        |b| {
            b.arg(x).arg(&absmax).arg(q).arg(scales).arg(&r).arg(&c);
        },
        &mut f,
    )
}

/// The decode GEMV `out[m, n] = (qx[m, k] · w[n, k]ᵀ) · (sx ⊗ sw) + bias`, in launches
/// of at most [`GEMV_MAX_ROWS`] activation rows.
#[allow(clippy::too_many_arguments)]
pub fn gemv_i8(
    gpu: &Gpu,
    qx: &CudaSlice<i8>,
    sx: &CudaSlice<f32>,
    w: &CudaSlice<i8>,
    sw: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    fuse: Fuse,
    out: &mut CudaSlice<f32>,
    (m, n, k): (usize, usize, usize),
) -> Result<(), CudaError> {
    const OP: &str = "gemv_i8";
    need(OP, "qx", qx.len(), m * k)?;
    need(OP, "sx", sx.len(), m)?;
    need(OP, "w", w.len(), n * k)?;
    need(OP, "sw", sw.len(), n)?;
    need(OP, "out", out.len(), m * n)?;
    if let Some(b) = bias {
        need(OP, "bias", b.len(), n)?;
    }
    let (ni, ki) = (int(OP, "n", n)?, int(OP, "k", k)?);
    let (act, accumulate) = fuse.codes();
    for i0 in (0..m).step_by(GEMV_MAX_ROWS) {
        let rows = GEMV_MAX_ROWS.min(m - i0);
        let mi = rows as i32;
        let qv = qx.slice(i0 * k..(i0 + rows) * k);
        let sv = sx.slice(i0..i0 + rows);
        let mut ov = out.slice_mut(i0 * n..(i0 + rows) * n);
        let mut f = None;
        if k.is_multiple_of(16) && n > 0 {
            // The fast kernel: 16-byte rows, several output rows per block.
            launch(
                gpu,
                &QUANT,
                GEMV_I8_BY_ROWS[rows - 1],
                fast_gemv_blocks(n),
                |b| {
                    b.arg(&qv).arg(&sv).arg(w).arg(sw);
                    opt_arg!(b, bias);
                    b.arg(&mut ov).arg(&ni).arg(&ki).arg(&act).arg(&accumulate);
                },
                &mut f,
            )?;
            continue;
        }
        launch(
            gpu,
            &QUANT,
            OP,
            warp_per_row(n),
            |b| {
                b.arg(&qv).arg(&sv).arg(w).arg(sw);
                opt_arg!(b, bias);
                b.arg(&mut ov).arg(&mi).arg(&ni).arg(&ki).arg(&act).arg(&accumulate);
            },
            &mut f,
        )?;
    }
    Ok(())
}

/// Output rows per block of the fast GEMVs (`I8_ROWS` and `P4_ROWS` of the kernels).
pub(super) const FAST_GEMV_ROWS: usize = 4;

/// Threads per block of the fast GEMVs (`I8_THREADS`, `P4_THREADS`).
pub(super) const FAST_GEMV_THREADS: u32 = 128;

/// One block of [`FAST_GEMV_THREADS`] per [`FAST_GEMV_ROWS`] output rows.
pub(super) fn fast_gemv_blocks(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(FAST_GEMV_ROWS).max(1) as u32, 1, 1),
        block_dim: (FAST_GEMV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `acc[m, n] = qx[m, k] · w[n, k]ᵀ` in int32 with the tiled kernel (shapes cuBLASLt's
/// int8 path refuses).
pub fn gemm_i8_tiled(
    gpu: &Gpu,
    qx: &CudaSlice<i8>,
    w: &CudaSlice<i8>,
    acc: &mut CudaSlice<i32>,
    (m, n, k): (usize, usize, usize),
) -> Result<(), CudaError> {
    const OP: &str = "gemm_i8_tiled";
    need(OP, "qx", qx.len(), m * k)?;
    need(OP, "w", w.len(), n * k)?;
    need(OP, "acc", acc.len(), m * n)?;
    let (mi, ni, ki) = (int(OP, "m", m)?, int(OP, "n", n)?, int(OP, "k", k)?);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(16).max(1) as u32, m.div_ceil(16).max(1) as u32, 1),
        block_dim: (16, 16, 1),
        shared_mem_bytes: 0,
    };
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        OP,
        cfg,
        |b| {
            b.arg(qx).arg(w).arg(acc).arg(&mi).arg(&ni).arg(&ki);
        },
        &mut f,
    )
}

/// `out[m, n] = acc · (sx[i] · sw[j]) + bias[j]`, rounded as the CPU's `rescale`.
pub fn rescale_i32(
    gpu: &Gpu,
    acc: &CudaSlice<i32>,
    sx: &CudaSlice<f32>,
    sw: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    (m, n): (usize, usize),
) -> Result<(), CudaError> {
    const OP: &str = "rescale_i32";
    need(OP, "acc", acc.len(), m * n)?;
    need(OP, "sx", sx.len(), m)?;
    need(OP, "sw", sw.len(), n)?;
    need(OP, "out", out.len(), m * n)?;
    if let Some(b) = bias {
        need(OP, "bias", b.len(), n)?;
    }
    let (mi, ni) = (int(OP, "m", m)?, int(OP, "n", n)?);
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        OP,
        grid_stride(m * n),
        |b| {
            b.arg(acc).arg(sx).arg(sw);
            opt_arg!(b, bias);
            b.arg(out).arg(&mi).arg(&ni);
        },
        &mut f,
    )
}

/// LLM.int8 split: `mask[c] = 1` where some `|x[i, c]| > threshold`, then the flagged
/// columns in increasing order into `idx` and their number into `count[0]` (on the
/// device: nothing waits for the host).
pub fn outlier_columns(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    (rows, cols): (usize, usize),
    threshold: f32,
    mask: &mut CudaSlice<u8>,
    idx: &mut CudaSlice<i32>,
    count: &mut CudaSlice<i32>,
) -> Result<(), CudaError> {
    const OP: &str = "outlier_mask";
    need(OP, "x", x.len(), rows * cols)?;
    need(OP, "mask", mask.len(), cols)?;
    need("compact_mask", "idx", idx.len(), cols)?;
    need("compact_mask", "count", count.len(), 1)?;
    let (r, c) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        OP,
        cfg,
        |b| {
            b.arg(x).arg(&r).arg(&c).arg(&threshold).arg(&mut *mask);
        },
        &mut f,
    )?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        "compact_mask",
        one,
        |b| {
            b.arg(&*mask).arg(&c).arg(idx).arg(count);
        },
        &mut f,
    )
}

/// `out[rows, n] += x[:, idx] · dequant(w)[:, idx]ᵀ` in 16-bit inputs (`bf16`: bfloat16,
/// else f16), f32 sums: LLM.int8's outlier product.
#[allow(clippy::too_many_arguments)]
pub fn outlier_product(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    (rows, cols, n): (usize, usize, usize),
    idx: &CudaSlice<i32>,
    count: &CudaSlice<i32>,
    w: &CudaSlice<i8>,
    sw: &CudaSlice<f32>,
    bf16: bool,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "outlier_product";
    need(OP, "x", x.len(), rows * cols)?;
    need(OP, "idx", idx.len(), cols)?;
    need(OP, "count", count.len(), 1)?;
    need(OP, "w", w.len(), n * cols)?;
    need(OP, "sw", sw.len(), n)?;
    need(OP, "out", out.len(), rows * n)?;
    let (r, c, ni, kind) =
        (int(OP, "rows", rows)?, int(OP, "cols", cols)?, int(OP, "n", n)?, i32::from(bf16));
    let cfg = LaunchConfig {
        grid_dim: ((rows * n).div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        OP,
        cfg,
        |b| {
            b.arg(x).arg(&r).arg(&c).arg(idx).arg(count).arg(w).arg(sw).arg(out).arg(&ni).arg(&kind);
        },
        &mut f,
    )
}

/// How [`fake_quant`] quantizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FakeQuant {
    /// Zero point (0 for symmetric weights).
    pub zero_point: f32,
    /// Smallest code.
    pub qmin: f32,
    /// Largest code.
    pub qmax: f32,
    /// `x · (1/s)` (uint8 activations, as the observer) instead of `x / s` (weights).
    pub reciprocal: bool,
}

/// Fake quantization of `x` (rows of `cols`) into `out`: one scale per row when
/// `scales` holds one per row, else `scales[0]` for all.
pub fn fake_quant(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    cols: usize,
    scales: &CudaSlice<f32>,
    params: FakeQuant,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "fake_quant";
    let n = x.len();
    need(OP, "out", out.len(), n)?;
    need(OP, "scales", scales.len(), 1)?;
    let rows = n.checked_div(cols).unwrap_or(0);
    if cols == 0 || rows * cols != n {
        return Err(CudaError::Shape { op: OP, message: format!("x holds {n} values, not rows of {cols}") });
    }
    let per_row = scales.len() >= rows && rows > 1;
    launch_fake_quant(gpu, x, (n, cols), scales, per_row, params, out)
}

/// The `fake_quant` kernel over the first `n` values of `x` (rows of `cols`): one scale
/// per row when `per_row`, else `scales[0]` for all. Shapes checked by the caller.
pub(super) fn launch_fake_quant(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    (n, cols): (usize, usize),
    scales: &CudaSlice<f32>,
    per_row: bool,
    params: FakeQuant,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "fake_quant";
    let (nl, c, recip) =
        (long(OP, "values", n)?, int(OP, "cols", cols.max(1))?, i32::from(params.reciprocal));
    let per_row = i32::from(per_row);
    let mut f = None;
    launch(
        gpu,
        &QUANT,
        OP,
        grid_stride(n),
        |b| {
            b.arg(x)
                .arg(out)
                .arg(&nl)
                .arg(&c)
                .arg(scales)
                .arg(&per_row)
                .arg(&params.zero_point)
                .arg(&params.qmin)
                .arg(&params.qmax)
                .arg(&recip);
        },
        &mut f,
    )
}
