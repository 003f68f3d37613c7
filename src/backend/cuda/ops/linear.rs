//! Launchers of `kernels/linear.cu`: the fused device linear layers (LLM.int8, static
//! and torch-compatible int8, the 16-level codebooks).

use super::*;

/// LLM.int8's decode split in one launch (`rows` ≤ [`GEMV_MAX_ROWS`], one block): the
/// outlier mask, the ordered outlier columns in `idx` and their number in `count[0]`, the
/// inliers quantized per row into `q` / `scales` (outliers as 0), and `observed[0] +=
/// count`, `observed[1] += 1`.
#[allow(clippy::too_many_arguments)]
pub fn llm_int8_prepare(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    (rows, cols): (usize, usize),
    threshold: f32,
    q: &mut CudaSlice<i8>,
    scales: &mut CudaSlice<f32>,
    mask: &mut CudaSlice<u8>,
    idx: &mut CudaSlice<i32>,
    count: &mut CudaSlice<i32>,
    observed: &mut CudaSlice<u64>,
) -> Result<(), CudaError> {
    const OP: &str = "llm_int8_prepare";
    if rows > GEMV_MAX_ROWS {
        return Err(CudaError::Shape {
            op: OP,
            message: format!("{rows} rows, expected at most {GEMV_MAX_ROWS}"),
        });
    }
    need(OP, "x", x.len(), rows * cols)?;
    need(OP, "q", q.len(), rows * cols)?;
    need(OP, "scales", scales.len(), rows)?;
    need(OP, "mask", mask.len(), cols)?;
    need(OP, "idx", idx.len(), cols)?;
    need(OP, "count", count.len(), 1)?;
    need(OP, "observed", observed.len(), 2)?;
    let (r, c) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        OP,
        one,
        |b| {
            b.arg(x)
                .arg(&r)
                .arg(&c)
                .arg(&threshold)
                .arg(q)
                .arg(scales)
                .arg(mask)
                .arg(idx)
                .arg(count)
                .arg(observed);
        },
        &mut f,
    )
}

/// `observed[0] += count[0]`, `observed[1] += 1` (the prefill path's outlier record).
pub fn record_outliers(
    gpu: &Gpu,
    count: &CudaSlice<i32>,
    observed: &mut CudaSlice<u64>,
) -> Result<(), CudaError> {
    const OP: &str = "record_outliers";
    need(OP, "count", count.len(), 1)?;
    need(OP, "observed", observed.len(), 2)?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        OP,
        one,
        |b| {
            b.arg(count).arg(observed);
        },
        &mut f,
    )
}

/// The LLM.int8 decode GEMV (`m` ≤ [`GEMV_MAX_ROWS`]): the rescaled int8 product plus bias,
/// then the 16-bit (`bf16`: bfloat16, else f16) product of the outlier columns `idx[..count]`
/// of `x` and of the dequantized weight, summed in f32 in column order.
#[allow(clippy::too_many_arguments)]
pub fn gemv_i8_outlier(
    gpu: &Gpu,
    (qx, sx): (&CudaSlice<i8>, &CudaSlice<f32>),
    (w, sw): (&CudaSlice<i8>, &CudaSlice<f32>),
    bias: Option<&CudaSlice<f32>>,
    x: &CudaSlice<f32>,
    (idx, count): (&CudaSlice<i32>, &CudaSlice<i32>),
    bf16: bool,
    fuse: Fuse,
    out: &mut CudaSlice<f32>,
    (m, n, k): (usize, usize, usize),
) -> Result<(), CudaError> {
    const OP: &str = "gemv_i8_outlier";
    if m > GEMV_MAX_ROWS {
        return Err(CudaError::Shape {
            op: OP,
            message: format!("m = {m}, expected at most {GEMV_MAX_ROWS}"),
        });
    }
    need(OP, "qx", qx.len(), m * k)?;
    need(OP, "sx", sx.len(), m)?;
    need(OP, "w", w.len(), n * k)?;
    need(OP, "sw", sw.len(), n)?;
    need(OP, "x", x.len(), m * k)?;
    need(OP, "idx", idx.len(), k)?;
    need(OP, "count", count.len(), 1)?;
    need(OP, "out", out.len(), m * n)?;
    if let Some(b) = bias {
        need(OP, "bias", b.len(), n)?;
    }
    let (mi, ni, ki, kind) = (int(OP, "m", m)?, int(OP, "n", n)?, int(OP, "k", k)?, i32::from(bf16));
    let (act, accumulate) = fuse.codes();
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        OP,
        warp_per_row(n),
        |b| {
            b.arg(qx).arg(sx).arg(w).arg(sw);
            opt_arg!(b, bias);
            b.arg(x).arg(idx).arg(count).arg(&kind).arg(out).arg(&mi).arg(&ni).arg(&ki);
            b.arg(&act).arg(&accumulate);
        },
        &mut f,
    )
}

/// int8-static's input codes: `clamp(rint(x · inv) + zp, 0, 255) − 128` as int8 for the
/// first `n` values (`inv` = the f32 `1 / s_x`).
pub fn quantize_static_i8(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    (inv, zero_point): (f32, i32),
    q: &mut CudaSlice<i8>,
) -> Result<(), CudaError> {
    const OP: &str = "quantize_static_i8";
    need(OP, "x", x.len(), n)?;
    need(OP, "q", q.len(), n)?;
    let nl = long(OP, "values", n)?;
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        OP,
        grid_stride(n),
        |b| {
            b.arg(x).arg(&nl).arg(&inv).arg(&zero_point).arg(q);
        },
        &mut f,
    )
}

/// The epilogue of an int8 layer that is not the default per-row rescale.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// int8-static: `(acc + corr[j]) · out_scales[j] + bias[j]`.
    Static {
        /// `(128 − zp) · Σ_k w[j, k]` per output row.
        corr: &'a CudaSlice<i32>,
        /// `s_x · s_w[j]`.
        out_scales: &'a CudaSlice<f32>,
    },
    /// torch mode: `fma(acc, sx[i] · sw[j], bias[j])`.
    Torch {
        /// Activation scale per row.
        sx: &'a CudaSlice<f32>,
        /// Weight scale per output row.
        sw: &'a CudaSlice<f32>,
    },
}

impl Epilogue<'_> {
    pub(super) fn check(&self, op: &'static str, m: usize, n: usize) -> Result<(), CudaError> {
        match self {
            Epilogue::Static { corr, out_scales } => {
                need(op, "corr", corr.len(), n)?;
                need(op, "out_scales", out_scales.len(), n)
            }
            Epilogue::Torch { sx, sw } => {
                need(op, "sx", sx.len(), m)?;
                need(op, "sw", sw.len(), n)
            }
        }
    }
}

/// The decode GEMV (`m` ≤ [`GEMV_MAX_ROWS`]) of `qx[m, k] · w[n, k]ᵀ` with `epilogue`.
#[allow(clippy::too_many_arguments)]
pub fn gemv_i8_with(
    gpu: &Gpu,
    qx: &CudaSlice<i8>,
    w: &CudaSlice<i8>,
    epilogue: Epilogue,
    bias: Option<&CudaSlice<f32>>,
    fuse: Fuse,
    out: &mut CudaSlice<f32>,
    (m, n, k): (usize, usize, usize),
) -> Result<(), CudaError> {
    let op = match epilogue {
        Epilogue::Static { .. } => "gemv_i8_static",
        Epilogue::Torch { .. } => "gemv_i8_torch",
    };
    if m > GEMV_MAX_ROWS {
        return Err(CudaError::Shape { op, message: format!("m = {m}, expected at most {GEMV_MAX_ROWS}") });
    }
    need(op, "qx", qx.len(), m * k)?;
    need(op, "w", w.len(), n * k)?;
    need(op, "out", out.len(), m * n)?;
    epilogue.check(op, m, n)?;
    if let Some(b) = bias {
        need(op, "bias", b.len(), n)?;
    }
    let (mi, ni, ki) = (int(op, "m", m)?, int(op, "n", n)?, int(op, "k", k)?);
    let (act, accumulate) = fuse.codes();
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        op,
        warp_per_row(n),
        |b| {
            match epilogue {
                Epilogue::Static { corr, out_scales } => {
                    b.arg(qx).arg(w).arg(corr).arg(out_scales);
                }
                Epilogue::Torch { sx, sw } => {
                    b.arg(qx).arg(sx).arg(w).arg(sw);
                }
            }
            opt_arg!(b, bias);
            b.arg(out).arg(&mi).arg(&ni).arg(&ki).arg(&act).arg(&accumulate);
        },
        &mut f,
    )
}

/// `out[m, n]` from an int32 product `acc[m, n]` with `epilogue`.
pub fn rescale_with(
    gpu: &Gpu,
    acc: &CudaSlice<i32>,
    epilogue: Epilogue,
    bias: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<f32>,
    (m, n): (usize, usize),
) -> Result<(), CudaError> {
    let op = match epilogue {
        Epilogue::Static { .. } => "rescale_static",
        Epilogue::Torch { .. } => "rescale_torch",
    };
    need(op, "acc", acc.len(), m * n)?;
    need(op, "out", out.len(), m * n)?;
    epilogue.check(op, m, n)?;
    if let Some(b) = bias {
        need(op, "bias", b.len(), n)?;
    }
    let (mi, ni) = (int(op, "m", m)?, int(op, "n", n)?);
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        op,
        grid_stride(m * n),
        |b| {
            b.arg(acc);
            match epilogue {
                Epilogue::Static { corr, out_scales } => {
                    b.arg(corr).arg(out_scales);
                }
                Epilogue::Torch { sx, sw } => {
                    b.arg(sx).arg(sw);
                }
            }
            opt_arg!(b, bias);
            b.arg(out).arg(&mi).arg(&ni);
        },
        &mut f,
    )
}

/// torch's dynamic input quantization of the first `rows · cols` values of `x` (one
/// block): the codes minus the zero point into `q`, the scale into `scales[..rows]`.
pub fn torch_quantize_i8(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    (rows, cols): (usize, usize),
    q: &mut CudaSlice<i8>,
    scales: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "torch_quantize_i8";
    need(OP, "x", x.len(), rows * cols)?;
    need(OP, "q", q.len(), rows * cols)?;
    need(OP, "scales", scales.len(), rows)?;
    let (nl, r) = (long(OP, "values", rows * cols)?, int(OP, "rows", rows)?);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        OP,
        one,
        |b| {
            b.arg(x).arg(&nl).arg(&r).arg(q).arg(scales);
        },
        &mut f,
    )
}

/// The first `n` values of `x` rounded to 16-bit bits (`bf16`: bfloat16, else f16).
pub fn round_to_16(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    bf16: bool,
    out: &mut CudaSlice<u16>,
) -> Result<(), CudaError> {
    const OP: &str = "round_to_16";
    need(OP, "x", x.len(), n)?;
    need(OP, "out", out.len(), n)?;
    let (nl, kind) = (long(OP, "values", n)?, i32::from(bf16));
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        OP,
        grid_stride(n),
        |b| {
            b.arg(x).arg(out).arg(&nl).arg(&kind);
        },
        &mut f,
    )
}

/// `out[i] = codebook[index i]` for `n` indices of `bits` bits packed most significant
/// bit first (kmeans).
pub fn codebook_dequant(
    gpu: &Gpu,
    (indices, bits): (&CudaSlice<u8>, u32),
    codebook: &CudaSlice<f32>,
    n: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "codebook_dequant";
    if !(1..=16).contains(&bits) {
        return Err(CudaError::Shape { op: OP, message: format!("{bits} bits per index, expected 1 to 16") });
    }
    need(OP, "indices", indices.len(), (n * bits as usize).div_ceil(8))?;
    need(OP, "codebook", codebook.len(), 1)?;
    need(OP, "out", out.len(), n)?;
    let (nl, b32) = (long(OP, "values", n)?, bits as i32);
    let mut f = None;
    launch(
        gpu,
        &LINEAR,
        OP,
        grid_stride(n),
        |b| {
            b.arg(indices).arg(&b32).arg(codebook).arg(out).arg(&nl);
        },
        &mut f,
    )
}

/// Fake quantization of the first `n` values of `x` (rows of `cols`) with the one scale
/// `scale[0]` (the `fake_quant` kernel, per-tensor).
pub fn fake_quant_tensor(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    (n, cols): (usize, usize),
    scale: &CudaSlice<f32>,
    params: FakeQuant,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "fake_quant";
    need(OP, "x", x.len(), n)?;
    need(OP, "out", out.len(), n)?;
    need(OP, "scales", scale.len(), 1)?;
    launch_fake_quant(gpu, x, (n, cols), scale, false, params, out)
}
