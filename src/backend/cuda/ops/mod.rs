//! Host wrappers: one function per kernel of `kernels/*.cu`, one file per `.cu` file
//! (`ops.cu`'s in `layer_ops.rs`). Each checks that the buffers
//! hold the values the shape needs (an error naming the op and the buffer, never an
//! out-of-bounds launch), then launches on the [`Gpu`]'s stream without synchronising.
//!
//! Layouts are the CPU paths': row-major `[rows, cols]` f32 activations, weights
//! `[out_features, in_features]`, outputs `[rows, out_features]`.

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};

use super::kernels::{
    KernelFile, CAST, GEMV_I8_BY_ROWS, LINEAR, OPS, PACKED4, PACKED4_GEMV_BY_ROWS,
    PACKED4_GEMV_FIXEDQ_BY_ROWS, PACKED4_GEMV_FIXED_BY_ROWS, QUANT, ROW_VARIANTS,
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

mod cast;
mod layer_ops;
mod linear;
mod packed4;
mod quant;

pub use cast::*;
pub use layer_ops::*;
pub use linear::*;
pub use packed4::*;
pub use quant::*;

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
