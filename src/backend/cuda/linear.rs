//! Device-resident linear layers for `int8-dynamic` (per-token activations) and the
//! 4-bit block schemes (`int4-block`, `nf4`, `fp4`, `kmeans`): the pieces a CUDA forward
//! pass would call at the scheme boundary. **Unverified on hardware**: written against
//! the kernels' CPU references (compared in `tests/cuda` when a device is present) but
//! not yet run on a GPU, and not yet used by the runner.
//!
//! Paths (recorded as the layer's kernel): int8 — activation quantization, then the
//! `__dp4a` GEMV up to [`ops::GEMV_MAX_ROWS`] rows, cuBLASLt int8 above when the shape
//! allows, the tiled int8 kernel otherwise, then the f32 rescale (bit-identical to the
//! CPU); 4-bit — the fused GEMV up to [`ops::GEMV_MAX_ROWS`] rows, dequantization to f32
//! and the cuBLAS f32 GEMM above (f32, as the CPU path, so divergence is comparable).

use cudarc::driver::CudaSlice;

use super::blas::{lt_int8_supports, Blas};
use super::ops::{self, DevicePacked4, GEMV_MAX_ROWS};
use super::{CudaError, Gpu};
use crate::scheme::packed4::Packed4;

/// A linear layer resident on the device.
#[derive(Debug)]
pub enum CudaLinear {
    /// int8 weights with one f32 scale per output row.
    Int8 {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// `[rows, cols]` int8 weights.
        weight: CudaSlice<i8>,
        /// Row scales.
        scales: CudaSlice<f32>,
        /// Bias.
        bias: Option<CudaSlice<f32>>,
    },
    /// The shared 4-bit block format.
    Packed4 {
        /// The weight.
        weight: DevicePacked4,
        /// Bias.
        bias: Option<CudaSlice<f32>>,
    },
}

fn check_len(op: &'static str, what: &str, have: usize, want: usize) -> Result<(), CudaError> {
    if have != want {
        return Err(CudaError::Shape { op, message: format!("{what} holds {have} values, expected {want}") });
    }
    Ok(())
}

impl CudaLinear {
    /// An int8 layer from its CPU parts (`Int8DynamicLinear::weight` / `scales`).
    pub fn int8(
        gpu: &Gpu,
        (rows, cols): (usize, usize),
        weight: &[i8],
        scales: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<CudaLinear, CudaError> {
        const OP: &str = "int8 linear";
        check_len(OP, "weight", weight.len(), rows * cols)?;
        check_len(OP, "scales", scales.len(), rows)?;
        if let Some(b) = bias {
            check_len(OP, "bias", b.len(), rows)?;
        }
        Ok(CudaLinear::Int8 {
            rows,
            cols,
            weight: gpu.upload(weight)?,
            scales: gpu.upload(scales)?,
            bias: bias.map(|b| gpu.upload(b)).transpose()?,
        })
    }

    /// A 4-bit block layer.
    pub fn packed4(gpu: &Gpu, weight: &Packed4, bias: Option<&[f32]>) -> Result<CudaLinear, CudaError> {
        if let Some(b) = bias {
            check_len("packed4 linear", "bias", b.len(), weight.rows)?;
        }
        Ok(CudaLinear::Packed4 {
            weight: DevicePacked4::upload(gpu, weight)?,
            bias: bias.map(|b| gpu.upload(b)).transpose()?,
        })
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            CudaLinear::Int8 { cols, .. } => *cols,
            CudaLinear::Packed4 { weight, .. } => weight.cols,
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            CudaLinear::Int8 { rows, .. } => *rows,
            CudaLinear::Packed4 { weight, .. } => weight.rows,
        }
    }

    /// The kernel path `forward` takes for `m` activation rows.
    pub fn kernel(&self, m: usize) -> &'static str {
        match self {
            CudaLinear::Int8 { .. } if m <= GEMV_MAX_ROWS => "cuda-int8-dp4a-gemv",
            CudaLinear::Int8 { rows, cols, .. } if lt_int8_supports(*rows, *cols) => {
                "cuda-cublaslt-int8-gemm"
            }
            CudaLinear::Int8 { .. } => "cuda-int8-tiled-gemm",
            CudaLinear::Packed4 { .. } if m <= GEMV_MAX_ROWS => "cuda-packed4-fused-gemv",
            CudaLinear::Packed4 { .. } => "cuda-packed4-dequant-f32-cublas",
        }
    }

    /// `out[m, out_features] = x[m, in_features] · Wᵀ + b`, queued on `gpu`'s stream;
    /// returns the kernel path taken.
    pub fn forward(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        x: &CudaSlice<f32>,
        m: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<&'static str, CudaError> {
        let path = self.kernel(m);
        match self {
            CudaLinear::Int8 { rows, cols, weight, scales, bias } => {
                let (n, k) = (*rows, *cols);
                let mut q = gpu.zeros::<i8>(m * k)?;
                let mut sx = gpu.zeros::<f32>(m)?;
                ops::quantize_rows_i8(gpu, x, None, m, k, &mut q, &mut sx)?;
                if m <= GEMV_MAX_ROWS {
                    ops::gemv_i8(gpu, &q, &sx, weight, scales, bias.as_ref(), out, (m, n, k))?;
                } else {
                    let mut acc = gpu.zeros::<i32>(m * n)?;
                    if lt_int8_supports(n, k) {
                        blas.gemm_i8(&q, weight, &mut acc, (m, n, k))?;
                    } else {
                        ops::gemm_i8_tiled(gpu, &q, weight, &mut acc, (m, n, k))?;
                    }
                    ops::rescale_i32(gpu, &acc, &sx, scales, bias.as_ref(), out, (m, n))?;
                }
            }
            CudaLinear::Packed4 { weight, bias } => {
                if m <= GEMV_MAX_ROWS {
                    ops::packed4_gemv(gpu, weight, x, m, bias.as_ref(), out)?;
                } else {
                    let mut dense = gpu.zeros::<f32>(weight.rows * weight.cols)?;
                    ops::packed4_dequant(gpu, weight, Some(&mut dense), None)?;
                    blas.gemm(x, &dense, out, (m, weight.rows, weight.cols))?;
                    if let Some(b) = bias {
                        ops::add_bias_rows(gpu, out, b, m)?;
                    }
                }
            }
        }
        Ok(path)
    }
}
