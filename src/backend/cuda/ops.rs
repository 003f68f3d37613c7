//! Host wrappers: one function per kernel of `kernels/*.cu`. Each checks that the buffers
//! hold the values the shape needs (an error naming the op and the buffer, never an
//! out-of-bounds launch), then launches on the [`Gpu`]'s stream without synchronising.
//!
//! Layouts are the CPU paths': row-major `[rows, cols]` f32 activations, weights
//! `[out_features, in_features]`, outputs `[rows, out_features]`.

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};

use super::kernels::{
    KernelFile, CAST, GEMV_I8_BY_ROWS, OPS, PACKED4, PACKED4_GEMV_BY_ROWS, PACKED4_GEMV_FIXEDQ_BY_ROWS,
    PACKED4_GEMV_FIXED_BY_ROWS, QUANT, ROW_VARIANTS,
};
use super::{driver, guard, CudaError, Gpu};
use crate::scheme::packed4::Packed4;

/// Threads per block of the row kernels and grid-stride kernels.
const THREADS: u32 = 256;

/// Activation rows one GEMV launch takes (`GEMV_MAX_M` / the `acc[8]` of the kernels).
pub const GEMV_MAX_ROWS: usize = ROW_VARIANTS;

/// `value` as a kernel `int`, or an error naming the op and the dimension.
pub(super) fn int(op: &'static str, what: &str, value: usize) -> Result<i32, CudaError> {
    i32::try_from(value).map_err(|_| CudaError::Shape {
        op,
        message: format!("{what} = {value}, expected at most {}", i32::MAX),
    })
}

/// `value` as a kernel `long`.
pub(super) fn long(op: &'static str, what: &str, value: usize) -> Result<i64, CudaError> {
    i64::try_from(value)
        .map_err(|_| CudaError::Shape { op, message: format!("{what} = {value} does not fit in i64") })
}

/// Check that buffer `what` holds at least `want` values.
pub(super) fn need(op: &'static str, what: &str, have: usize, want: usize) -> Result<(), CudaError> {
    if have < want {
        return Err(CudaError::Shape {
            op,
            message: format!("{what} holds {have} values, expected at least {want}"),
        });
    }
    Ok(())
}

/// One block per row.
fn per_row(rows: usize) -> Result<LaunchConfig, CudaError> {
    let grid = u32::try_from(rows.max(1)).map_err(|_| CudaError::Shape {
        op: "launch",
        message: format!("{rows} rows, expected at most {}", u32::MAX),
    })?;
    Ok(LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Grid-stride launch over `n` elements.
pub(super) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per output row, 8 warps a block.
fn warp_per_row(rows: usize) -> LaunchConfig {
    let warps = THREADS as usize / 32;
    LaunchConfig {
        grid_dim: (rows.div_ceil(warps).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Load `name` from `file`, let `args` push the arguments, launch.
pub(super) fn launch<'a>(
    gpu: &'a Gpu,
    file: &'static KernelFile,
    name: &'static str,
    cfg: LaunchConfig,
    args: impl FnOnce(&mut LaunchArgs<'a>),
    func: &'a mut Option<CudaFunction>,
) -> Result<(), CudaError> {
    *func = Some(gpu.function(file, name)?);
    let f = func.as_ref().ok_or(CudaError::Shape { op: name, message: "kernel not loaded".into() })?;
    guard(name, move || {
        let mut b = gpu.stream().launch_builder(f);
        args(&mut b);
        // SAFETY: the caller checked every buffer against the shape the kernel reads and
        // writes, and pushed the arguments in the kernel's order and types.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver(format!("launch {name}")))
    })
}

/// A null device pointer for an optional kernel argument.
pub(super) static NULL: u64 = 0;

macro_rules! opt_arg {
    ($b:expr, $opt:expr) => {
        match $opt {
            Some(s) => {
                $b.arg(s);
            }
            None => {
                $b.arg(&NULL);
            }
        }
    };
}
pub(super) use opt_arg;

// ---- int8 ------------------------------------------------------------------------------

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
const FAST_GEMV_ROWS: usize = 4;

/// Threads per block of the fast GEMVs (`I8_THREADS`, `P4_THREADS`).
const FAST_GEMV_THREADS: u32 = 128;

/// One block of [`FAST_GEMV_THREADS`] per [`FAST_GEMV_ROWS`] output rows.
fn fast_gemv_blocks(rows: usize) -> LaunchConfig {
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
fn launch_fake_quant(
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

// ---- 4-bit block format ----------------------------------------------------------------

/// Scales or offsets of a [`DevicePacked4`].
#[derive(Debug)]
pub enum Params4 {
    /// f32 values.
    F32(CudaSlice<f32>),
    /// bf16 bits (int4-block's stored scales: half the bytes).
    Bf16(CudaSlice<u16>),
}

impl Params4 {
    fn len(&self) -> usize {
        match self {
            Params4::F32(s) => s.len(),
            Params4::Bf16(s) => s.len(),
        }
    }
}

/// How the codes of a [`DevicePacked4`] are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout4 {
    /// The [`Packed4`] order: two codes per byte over the flattened `[rows, cols]` weight.
    Plain,
    /// The fast GEMV's order (shapes with `cols % 8 == 0` and a power-of-two block of at
    /// least 8): per row, chunks of 128 8-value words (u32) interleaved so that a lane's
    /// 16-byte load holds 4 words 32 apart, then every row's last `words % 128` words in
    /// order ([`tiled_word_offset`]; kernels/packed4.cu explains why). Same size as plain.
    Tiled,
}

/// Words (u32 of 8 codes) per interleaved chunk of [`Layout4::Tiled`] (`P4_CHUNK`).
const TILE_WORDS: usize = 128;

/// Byte offset of word `w` (codes `8w .. 8w + 8`) of row `r` in the [`Layout4::Tiled`]
/// layout of a `[rows, cols]` weight (`cols % 8 == 0`). The word's 4 bytes stay in order.
pub fn tiled_word_offset(rows: usize, cols: usize, r: usize, w: usize) -> usize {
    let words = cols / 8;
    let (chunks, tail) = (words / TILE_WORDS, words % TILE_WORDS);
    if w < chunks * TILE_WORDS {
        // Component (w / 32) % 4 of uint4 w % 32 of chunk w / 128 of row r.
        ((r * chunks + w / TILE_WORDS) * 32 + w % 32) * 16 + (w / 32 % 4) * 4
    } else {
        (rows * chunks * TILE_WORDS + r * tail + (w - chunks * TILE_WORDS)) * 4
    }
}

/// Reorder plain nibble-packed `bytes` of a `[rows, cols]` weight (`cols % 8 == 0`) into
/// the [`Layout4::Tiled`] layout (the same length).
pub fn tile_bytes(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let words = cols / 8;
    let mut out = vec![0u8; rows * words * 4];
    for r in 0..rows {
        for w in 0..words {
            let src = (r * words + w) * 4;
            let dst = tiled_word_offset(rows, cols, r, w);
            out[dst..dst + 4].copy_from_slice(&bytes[src..src + 4]);
        }
    }
    out
}

/// The integer decode of the fast GEMV: `(xor, magic)` when `table[c] == (c ^ X) - B`
/// exactly for every code `c`, with `X` 0 or 8 and `B` an integer of magnitude at most
/// 2¹⁶ (int4-block's `[0..7, -8..-1]`: `X = 8`, `B = 8`); `xor = X · 0x11111111` and
/// `magic = 2²³ + B`, so that `f32(2²³ + (c ^ X)) − magic` is `table[c]`.
pub fn integer_table(table: &[f32; 16]) -> Option<(u32, f32)> {
    [0u32, 8].into_iter().find_map(|x| {
        let b = -table[x as usize]; // code x decodes to (x ^ X) − B = −B
        let exact = b.fract() == 0.0
            && b.abs() <= 65536.0
            && (0..16u32).all(|c| ((c ^ x) as f32 - b).to_bits() == table[c as usize].to_bits());
        exact.then(|| (x * 0x1111_1111, 8_388_608.0 + b))
    })
}

/// Largest `|B|` of an integer table `(c ^ X) − B` the fixed-point GEMV takes, so that
/// `B · Σ q` over a chunk (at most `32 · 32767` in magnitude) stays far inside i32.
const FIXED_MAX_TABLE_BIAS: f32 = 64.0;

/// Whether the fixed-point GEMV (`packed4_gemv_fixed_m*`) computes `p`: the CPU's default
/// GEMV numerics (16-bit activations per 32-value chunk; not `exact_gemv`), an integer
/// table `(c ^ X) − B` with `|B|` ≤ 64 (int4-block's), rows of whole 32-value chunks and a
/// power-of-two block of whole chunks (each chunk in one block; int4-block's 128).
pub fn fixed_point_fits(p: &Packed4) -> bool {
    let small_table =
        integer_table(&p.table).is_some_and(|(_, magic)| (magic - 8_388_608.0).abs() <= FIXED_MAX_TABLE_BIAS);
    !p.exact_gemv
        && small_table
        && p.rows > 0
        && p.cols.is_multiple_of(32)
        && p.block.is_multiple_of(32)
        && p.block.is_power_of_two()
}

/// A [`Packed4`] weight resident on the device.
#[derive(Debug)]
pub struct DevicePacked4 {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Values per block.
    pub block: usize,
    /// Nibble-packed codes, in [`DevicePacked4::layout`] order, then 16 to 31 bytes of
    /// zero padding.
    pub bytes: CudaSlice<u8>,
    /// The order of `bytes`: [`Layout4::Tiled`] exactly when the fast GEMV takes the shape.
    pub layout: Layout4,
    /// [`integer_table`] of the table.
    pub int_table: Option<(u32, f32)>,
    /// Whether the fixed-point GEMV takes the weight ([`fixed_point_fits`]; its codes are
    /// then in the plain layout).
    pub fixed_point: bool,
    /// The 16 code values.
    pub table: CudaSlice<f32>,
    /// One scale per block.
    pub scales: Params4,
    /// One offset per block (asymmetric formats).
    pub offsets: Option<Params4>,
}

/// True when every value is a bf16 value (so bf16 storage loses nothing).
pub fn all_bf16(values: &[f32]) -> bool {
    values.iter().all(|&v| half::bf16::from_f32(v).to_f32().to_bits() == v.to_bits())
}

fn bf16_bits(values: &[f32]) -> Vec<u16> {
    values.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}

impl DevicePacked4 {
    /// Upload `p`. Scales and offsets go as bf16 when every one of them is a bf16 value
    /// (int4-block's are), else as f32.
    pub fn upload(gpu: &Gpu, p: &Packed4) -> Result<DevicePacked4, CudaError> {
        const OP: &str = "packed4 upload";
        let n = p.rows * p.cols;
        need(OP, "bytes", p.bytes.len(), n.div_ceil(2))?;
        if p.block == 0 {
            return Err(CudaError::Shape { op: OP, message: "block is 0, expected at least 1".into() });
        }
        need(OP, "scales", p.scales.len(), n.div_ceil(p.block))?;
        if let Some(o) = &p.offsets {
            need(OP, "offsets", o.len(), n.div_ceil(p.block))?;
        }
        let bf16 = all_bf16(&p.scales) && p.offsets.as_deref().is_none_or(all_bf16);
        let params = |v: &[f32]| -> Result<Params4, CudaError> {
            Ok(if bf16 { Params4::Bf16(gpu.upload(&bf16_bits(v))?) } else { Params4::F32(gpu.upload(v)?) })
        };
        // The fixed-point GEMV reads the plain layout; the fast f32 GEMV's shapes (every
        // 8-value word in one row and one block) the tiled one.
        let fixed_point = fixed_point_fits(p);
        let tiled = !fixed_point
            && p.rows > 0
            && p.cols.is_multiple_of(8)
            && p.block >= 8
            && p.block.is_power_of_two();
        let (layout, mut bytes) = if tiled {
            (Layout4::Tiled, tile_bytes(&p.bytes, p.rows, p.cols))
        } else {
            (Layout4::Plain, p.bytes.clone())
        };
        // A 16-byte load of the general GEMV may read up to 15 bytes past the last
        // value's byte; pad so it stays inside the allocation.
        bytes.resize(bytes.len().next_multiple_of(16) + 16, 0);
        Ok(DevicePacked4 {
            rows: p.rows,
            cols: p.cols,
            block: p.block,
            bytes: gpu.upload(&bytes)?,
            layout,
            int_table: integer_table(&p.table),
            fixed_point,
            table: gpu.upload(&p.table)?,
            scales: params(&p.scales)?,
            offsets: p.offsets.as_deref().map(params).transpose()?,
        })
    }

    /// Bytes of the weight on the device (codes, scales, offsets; the 64-byte table and
    /// the 16 to 31 bytes of trailing padding not counted; the tiled layout has no other
    /// padding).
    pub fn weight_bytes(&self) -> usize {
        let per = |p: &Params4| match p {
            Params4::F32(s) => s.len() * 4,
            Params4::Bf16(s) => s.len() * 2,
        };
        (self.rows * self.cols).div_ceil(2) + per(&self.scales) + self.offsets.as_ref().map_or(0, per)
    }

    /// `"bf16"` or `"f32"`: how scales are stored.
    pub fn param_type(&self) -> &'static str {
        match self.scales {
            Params4::Bf16(_) => "bf16",
            Params4::F32(_) => "f32",
        }
    }
}

/// Push the scales, offsets and their type flag of `w`.
fn push_params<'a>(b: &mut LaunchArgs<'a>, w: &'a DevicePacked4, flag: &'a i32) {
    match &w.scales {
        Params4::F32(s) => b.arg(s),
        Params4::Bf16(s) => b.arg(s),
    };
    match &w.offsets {
        Some(Params4::F32(s)) => b.arg(s),
        Some(Params4::Bf16(s)) => b.arg(s),
        None => b.arg(&NULL),
    };
    b.arg(flag);
}

/// Dequantize the whole weight into `out_f32` (`[rows, cols]` f32) or `out_bf16` (bf16
/// bits): exactly one of them.
pub fn packed4_dequant(
    gpu: &Gpu,
    w: &DevicePacked4,
    out_f32: Option<&mut CudaSlice<f32>>,
    out_bf16: Option<&mut CudaSlice<half::bf16>>,
) -> Result<(), CudaError> {
    const OP: &str = "packed4_dequant";
    let n = w.rows * w.cols;
    match (&out_f32, &out_bf16) {
        (Some(o), None) => need(OP, "out", o.len(), n)?,
        (None, Some(o)) => need(OP, "out", o.len(), n)?,
        _ => return Err(CudaError::Shape { op: OP, message: "expected exactly one output buffer".into() }),
    }
    need(OP, "scales", w.scales.len(), n.div_ceil(w.block))?;
    let (nl, block) = (long(OP, "values", n)?, int(OP, "block", w.block)?);
    let (ri, ci) = (int(OP, "rows", w.rows)?, int(OP, "cols", w.cols)?);
    let tiled = i32::from(w.layout == Layout4::Tiled);
    let flag = i32::from(matches!(w.scales, Params4::Bf16(_)));
    let mut f = None;
    launch(
        gpu,
        &PACKED4,
        OP,
        grid_stride(n),
        |b| {
            b.arg(&w.bytes).arg(&w.table);
            push_params(b, w, &flag);
            b.arg(&nl).arg(&block).arg(&tiled).arg(&ri).arg(&ci);
            opt_arg!(b, out_f32);
            opt_arg!(b, out_bf16);
        },
        &mut f,
    )
}

/// The fused GEMV `out[m, rows] = x[m, cols] · Wᵀ (+ bias)` then `fuse`, dequantizing in
/// registers, in launches of at most [`GEMV_MAX_ROWS`] activation rows: the fixed-point
/// kernel when [`DevicePacked4::fixed_point`], else the f32 ones.
pub fn packed4_gemv(
    gpu: &Gpu,
    w: &DevicePacked4,
    x: &CudaSlice<f32>,
    m: usize,
    bias: Option<&CudaSlice<f32>>,
    fuse: Fuse,
    out: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    packed4_gemv_using(gpu, w, x, m, bias, fuse, out, FixedPointKernel::chosen())
}

/// The two kernels of the fixed-point 4-bit GEMV, same numerics (the benchmark and the
/// tests run both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixedPointKernel {
    /// `q16_quantize_chunks` once, then `packed4_gemv_fixedq_m*`, 4 rows per block.
    Prequantized,
    /// `packed4_gemv_fixed_m*`: one launch, every block quantizes x into shared memory (the
    /// default, see [`FIXED_POINT_KERNEL_VAR`]).
    Slab,
}

/// Environment variable that picks the fixed-point kernel the models use, for A/B runs
/// of whole suites on one GPU: `prequantized` ([`FixedPointKernel::Prequantized`]); unset
/// or anything else, the one-launch kernel. The one-launch kernel stays the default until
/// the prequantized one has passed the CUDA tests and out-run it on a GPU (it was written
/// in a session without one; reports/cuda/README.md).
pub const FIXED_POINT_KERNEL_VAR: &str = "QUANTBENCH_FIXED_POINT_GEMV";

impl FixedPointKernel {
    /// The kernel the models use: [`FIXED_POINT_KERNEL_VAR`] read once.
    pub fn chosen() -> FixedPointKernel {
        static CHOSEN: std::sync::OnceLock<FixedPointKernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| match std::env::var(FIXED_POINT_KERNEL_VAR).as_deref() {
            Ok("prequantized") => FixedPointKernel::Prequantized,
            _ => FixedPointKernel::Slab,
        })
    }
}

/// [`packed4_gemv`] with the fixed-point kernel named (the f32 kernels ignore it).
#[allow(clippy::too_many_arguments)]
pub fn packed4_gemv_using(
    gpu: &Gpu,
    w: &DevicePacked4,
    x: &CudaSlice<f32>,
    m: usize,
    bias: Option<&CudaSlice<f32>>,
    fuse: Fuse,
    out: &mut CudaSlice<f32>,
    fixed: FixedPointKernel,
) -> Result<(), CudaError> {
    const OP: &str = "packed4_gemv";
    need(OP, "x", x.len(), m * w.cols)?;
    need(OP, "out", out.len(), m * w.rows)?;
    if let Some(b) = bias {
        need(OP, "bias", b.len(), w.rows)?;
    }
    let (ri, ci, block) = (int(OP, "rows", w.rows)?, int(OP, "cols", w.cols)?, int(OP, "block", w.block)?);
    let flag = i32::from(matches!(w.scales, Params4::Bf16(_)));
    // The fast kernel (whole 8-value words of one row and one block each) reads the tiled
    // layout, which upload chose for exactly its shapes.
    let fast = w.layout == Layout4::Tiled;
    let shift = w.block.trailing_zeros() as i32;
    let (int_xor, int_magic) = w.int_table.unwrap_or((0, 0.0));
    // B of the table (c ^ X) − B, exact: fixed_point_fits bounds it by 64.
    let int_bias = (int_magic - 8_388_608.0) as i32;
    let (act, accumulate) = fuse.codes();
    for i0 in (0..m).step_by(GEMV_MAX_ROWS) {
        let rows = GEMV_MAX_ROWS.min(m - i0);
        let mi = rows as i32;
        let xv = x.slice(i0 * w.cols..(i0 + rows) * w.cols);
        let mut ov = out.slice_mut(i0 * w.rows..(i0 + rows) * w.rows);
        let mut f = None;
        if w.fixed_point {
            // The prequantized kernel reads x quantized once per call (q16_quantize_chunks),
            // the one-launch kernel x itself; the arguments are otherwise the same.
            let xq = match fixed {
                FixedPointKernel::Prequantized => Some(q16_quantize(gpu, &xv, rows, w.cols)?),
                FixedPointKernel::Slab => None,
            };
            let (name, rows_per_block) = match fixed {
                FixedPointKernel::Prequantized => (PACKED4_GEMV_FIXEDQ_BY_ROWS[rows - 1], FIXEDQ_GEMV_ROWS),
                FixedPointKernel::Slab => (PACKED4_GEMV_FIXED_BY_ROWS[rows - 1], FIXED_GEMV_ROWS),
            };
            launch(
                gpu,
                &PACKED4,
                name,
                LaunchConfig {
                    grid_dim: (w.rows.div_ceil(rows_per_block).max(1) as u32, 1, 1),
                    block_dim: (FAST_GEMV_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                |b| {
                    b.arg(&w.bytes);
                    push_params(b, w, &flag);
                    match &xq {
                        Some(q) => b.arg(q),
                        None => b.arg(&xv),
                    };
                    opt_arg!(b, bias);
                    b.arg(&mut ov).arg(&ri).arg(&ci).arg(&shift).arg(&int_xor).arg(&int_bias);
                    b.arg(&act).arg(&accumulate);
                },
                &mut f,
            )?;
            continue;
        }
        if fast {
            launch(
                gpu,
                &PACKED4,
                PACKED4_GEMV_BY_ROWS[rows - 1],
                fast_gemv_blocks(w.rows),
                |b| {
                    b.arg(&w.bytes).arg(&w.table);
                    push_params(b, w, &flag);
                    b.arg(&xv);
                    opt_arg!(b, bias);
                    b.arg(&mut ov).arg(&ri).arg(&ci).arg(&shift).arg(&int_xor).arg(&int_magic);
                    b.arg(&act).arg(&accumulate);
                },
                &mut f,
            )?;
            continue;
        }
        launch(
            gpu,
            &PACKED4,
            OP,
            warp_per_row(w.rows),
            |b| {
                b.arg(&w.bytes).arg(&w.table);
                push_params(b, w, &flag);
                b.arg(&xv);
                opt_arg!(b, bias);
                b.arg(&mut ov).arg(&ri).arg(&ci).arg(&block).arg(&mi).arg(&act).arg(&accumulate);
            },
            &mut f,
        )?;
    }
    Ok(())
}

/// `rows` activation rows of `x` (`cols` each, a multiple of 32) quantized for the
/// prequantized fixed-point GEMV: 16-bit codes per 32-value chunk, with each chunk's d,
/// Σq and Σx ([`Q16_WORDS_PER_CHUNK`] words per row and chunk).
fn q16_quantize(gpu: &Gpu, x: &CudaView<f32>, rows: usize, cols: usize) -> Result<CudaSlice<u32>, CudaError> {
    const OP: &str = "q16_quantize_chunks";
    let chunks = cols / 32;
    let mut xq = gpu.uninit::<u32>(Q16_WORDS_PER_CHUNK * rows * chunks)?;
    let (mi, ci) = (int(OP, "rows", rows)?, int(OP, "cols", cols)?);
    let config = LaunchConfig {
        grid_dim: ((rows * chunks).div_ceil(THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut f = None;
    launch(
        gpu,
        &PACKED4,
        OP,
        config,
        |b| {
            b.arg(x).arg(&mi).arg(&ci).arg(&mut xq);
        },
        &mut f,
    )?;
    Ok(xq)
}

/// Output rows per block of the fixed-point GEMV (`Q4_WARPS · Q4_ROWS`).
const FIXED_GEMV_ROWS: usize = 16;

/// Output rows per block of the prequantized fixed-point GEMV (`Q4Q_ROWS`).
const FIXEDQ_GEMV_ROWS: usize = 4;

/// u32 words per (activation row, 32-value chunk) of `q16_quantize_chunks`' buffer: 16 of
/// codes, then d, Σq and Σx.
const Q16_WORDS_PER_CHUNK: usize = 19;

// ---- model ops -------------------------------------------------------------------------

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
    pub(super) fn codes(self) -> (i32, i32) {
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
pub(super) enum Start<'a> {
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
pub(super) fn append_start(
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

pub(super) fn push_dims_and_start<'a>(b: &mut LaunchArgs<'a>, dims: &'a [i32], start: Start<'a>) {
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

fn kv_append_from(
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
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// The attention kernel's static shared memory: its reduction scratch (32 floats) and
/// the partial value sums of its 128 threads. The scores' dynamic memory shares the
/// block's budget with it.
const ATTENTION_STATIC_SHARED: usize = (32 + 128) * 4;

/// Let the attention kernel use `bytes` of dynamic shared memory (above 48 KiB a kernel
/// must opt in), or an error naming the device's limit.
fn opt_in_shared(gpu: &Gpu, op: &'static str, bytes: usize) -> Result<(), CudaError> {
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
fn attention_from(
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

// ---- conversions -----------------------------------------------------------------------

/// A 16-bit float type of the cuBLAS products.
pub trait Half16: cudarc::driver::DeviceRepr {
    /// The kernel converting f32 to it.
    const FROM_F32: &'static str;
    /// The kernel converting it to f32.
    const TO_F32: &'static str;
}

impl Half16 for half::f16 {
    const FROM_F32: &'static str = "f32_to_f16_kernel";
    const TO_F32: &'static str = "f16_to_f32_kernel";
}

impl Half16 for half::bf16 {
    const FROM_F32: &'static str = "f32_to_bf16_kernel";
    const TO_F32: &'static str = "bf16_to_f32_kernel";
}

/// `out = x` rounded to `T` (nearest even).
pub fn to_half<T: Half16>(gpu: &Gpu, x: &CudaSlice<f32>, out: &mut CudaSlice<T>) -> Result<(), CudaError> {
    cast(gpu, T::FROM_F32, x, out)
}

/// `out = x` widened to f32.
pub fn from_half<T: Half16>(gpu: &Gpu, x: &CudaSlice<T>, out: &mut CudaSlice<f32>) -> Result<(), CudaError> {
    cast(gpu, T::TO_F32, x, out)
}

/// One element-wise conversion kernel `op` of the cast module over `x` into `out`.
fn cast<A: cudarc::driver::DeviceRepr, B: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    op: &'static str,
    x: &CudaSlice<A>,
    out: &mut CudaSlice<B>,
) -> Result<(), CudaError> {
    need(op, "out", out.len(), x.len())?;
    let n = long(op, "values", x.len())?;
    let mut f = None;
    launch(
        gpu,
        &CAST,
        op,
        grid_stride(x.len()),
        |b| {
            b.arg(x).arg(out).arg(&n);
        },
        &mut f,
    )
}

// ---- device linear layers (kernels/linear.cu) ------------------------------------------

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
        &super::kernels::LINEAR,
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
        &super::kernels::LINEAR,
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
        &super::kernels::LINEAR,
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
        &super::kernels::LINEAR,
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
    fn check(&self, op: &'static str, m: usize, n: usize) -> Result<(), CudaError> {
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
        &super::kernels::LINEAR,
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
        &super::kernels::LINEAR,
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
        &super::kernels::LINEAR,
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
        &super::kernels::LINEAR,
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
        &super::kernels::LINEAR,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shapes_cover_every_element() {
        assert_eq!(grid_stride(0).grid_dim.0, 1);
        assert_eq!(grid_stride(257).grid_dim.0, 2);
        assert_eq!(grid_stride(usize::MAX / 2).grid_dim.0, 1 << 16);
        assert_eq!(warp_per_row(9).grid_dim.0, 2);
        assert_eq!(per_row(3).unwrap().grid_dim.0, 3);
    }

    #[test]
    fn dimension_and_buffer_checks_name_the_op_and_the_value() {
        let e = int("gemv_i8", "k", 1 << 40).unwrap_err().to_string();
        assert!(e.starts_with("cuda op gemv_i8: k = 1099511627776, expected at most"), "{e}");
        let e = need("rms_norm", "x", 3, 4).unwrap_err().to_string();
        assert_eq!(e, "cuda op rms_norm: x holds 3 values, expected at least 4");
    }

    #[test]
    fn bf16_storage_is_chosen_only_when_lossless() {
        assert!(all_bf16(&[1.0, 0.5, -3.0, half::bf16::from_f32(0.1).to_f32()]));
        assert!(!all_bf16(&[0.1]));
    }

    #[test]
    fn the_tiled_layout_permutes_whole_words_as_the_fast_gemv_reads_them() {
        // Words per row: 3 (all tail), 128 (one chunk), 513 and 391 (chunks and a tail).
        for (rows, cols) in [(5, 24), (3, 1024), (2, 4104), (3, 3128)] {
            let (words, n) = (cols / 8, rows * cols / 2);
            let (chunks, tail) = (words / 128, words % 128);
            let mut seen = vec![false; n / 4];
            for r in 0..rows {
                for w in 0..words {
                    let o = tiled_word_offset(rows, cols, r, w);
                    assert_eq!(o % 4, 0);
                    assert!(!std::mem::replace(&mut seen[o / 4], true), "{rows}×{cols}: word {w} of row {r}");
                }
                // The kernel: lane l's uint4 of chunk c of row r holds words c·128 + 32q + l.
                for c in 0..chunks {
                    for l in 0..32 {
                        for q in 0..4 {
                            let o = ((r * chunks + c) * 32 + l) * 16 + q * 4;
                            assert_eq!(tiled_word_offset(rows, cols, r, c * 128 + 32 * q + l), o);
                        }
                    }
                }
                for t in 0..tail {
                    let o = (rows * chunks * 128 + r * tail + t) * 4;
                    assert_eq!(tiled_word_offset(rows, cols, r, chunks * 128 + t), o);
                }
            }
            assert!(seen.iter().all(|&s| s));
            let plain: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
            let tiled = tile_bytes(&plain, rows, cols);
            assert_eq!(tiled.len(), plain.len());
            for r in 0..rows {
                for w in 0..words {
                    let (o, p) = (tiled_word_offset(rows, cols, r, w), (r * words + w) * 4);
                    assert_eq!(tiled[o..o + 4], plain[p..p + 4]);
                }
            }
        }
    }

    #[test]
    fn only_exact_integer_tables_take_the_integer_decode() {
        let int4 = [0., 1., 2., 3., 4., 5., 6., 7., -8., -7., -6., -5., -4., -3., -2., -1.];
        let unsigned: [f32; 16] = std::array::from_fn(|c| c as f32);
        let offset: [f32; 16] = std::array::from_fn(|c| c as f32 - 8.0);
        for (table, want) in [
            (int4, Some((0x8888_8888, 8_388_616.0))),
            (unsigned, Some((0, 8_388_608.0))),
            (offset, Some((0, 8_388_616.0))),
            (int4.map(|v| v / 8.0 + 0.01), None),
            (int4.map(|v| v * 2.0), None),
            (unsigned.map(|v| if v == 0.0 { -0.0 } else { v }), None),
        ] {
            assert_eq!(integer_table(&table), want, "{table:?}");
            if let Some((xor, magic)) = want {
                for c in 0..16u32 {
                    let bits = 0x4b00_0000 | ((c ^ xor) & 15);
                    assert_eq!((f32::from_bits(bits) - magic).to_bits(), table[c as usize].to_bits());
                }
            }
        }
    }
}
