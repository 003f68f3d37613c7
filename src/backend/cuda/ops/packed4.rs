//! Launchers of `kernels/packed4.cu`: the 4-bit block format on the device (its upload
//! and tiling), dequantization and the f32 and fixed-point GEMVs.

use super::*;

/// Scales or offsets of a [`DevicePacked4`].
#[derive(Debug)]
pub enum Params4 {
    /// f32 values.
    F32(CudaSlice<f32>),
    /// bf16 bits (int4-block's stored scales: half the bytes).
    Bf16(CudaSlice<u16>),
}

impl Params4 {
    pub(super) fn len(&self) -> usize {
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
pub(super) const TILE_WORDS: usize = 128;

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
pub(super) const FIXED_MAX_TABLE_BIAS: f32 = 64.0;

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

pub(super) fn bf16_bits(values: &[f32]) -> Vec<u16> {
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
pub(super) fn push_params<'a>(b: &mut LaunchArgs<'a>, w: &'a DevicePacked4, flag: &'a i32) {
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
pub(super) fn q16_quantize(
    gpu: &Gpu,
    x: &CudaView<f32>,
    rows: usize,
    cols: usize,
) -> Result<CudaSlice<u32>, CudaError> {
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
pub(super) const FIXED_GEMV_ROWS: usize = 16;

/// Output rows per block of the prequantized fixed-point GEMV (`Q4Q_ROWS`).
pub(super) const FIXEDQ_GEMV_ROWS: usize = 4;

/// u32 words per (activation row, 32-value chunk) of `q16_quantize_chunks`' buffer: 16 of
/// codes, then d, Σq and Σx.
pub(super) const Q16_WORDS_PER_CHUNK: usize = 19;
