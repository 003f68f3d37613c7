//! Device-resident linear layers for every scheme: [`CudaLinear::from_linear`] copies a CPU
//! layer's weight representation ([`Linear::parts`]) to the device, and
//! [`CudaLinear::forward`] computes what the scheme computes, recording the kernel path.
//!
//! Paths, per representation (`m` activation rows; "GEMV" means `m ≤` [`GEMV_MAX_ROWS`]):
//! - f32 (`fp32`, the unquantized head, `prune` on its dense pruned weight, `kmeans` with
//!   other than 4-bit indices after dequantizing its code book): at one row the dense GEMV
//!   with its epilogue ([`fuse::dense_gemv`]), else cuBLAS f32 GEMM (no TF32), then the
//!   bias.
//! - `fp16` / `bf16`: weights resident as 16-bit values (half the bytes), activations rounded
//!   to the same type, `cublasGemmEx` with f32 accumulation and f32 output. The CPU layer
//!   multiplies the rounded weights by *unrounded* f32 activations, so the two differ by the
//!   activations' rounding (about 2⁻⁹ relative for bf16, 2⁻¹² for f16). At one row the
//!   dense GEMV does the same rounding in registers.
//! - `int8-dynamic`: activations quantized per row, per tensor, or as torch does
//!   (`torch_compat`), then the `__dp4a` GEMV, or cuBLASLt int8 (the tiled kernel for
//!   shapes it refuses) and a rescale: bit-identical to the CPU.
//! - `int8-static`: the calibrated uint8 input codes (shifted by −128 into int8), the int8
//!   product, the zero-point correction `(128 − zp)·Σ_k w` precomputed per row, the rescale
//!   by the CPU's own `s_x · s_w` values: bit-identical to the CPU.
//! - `int8-outlier` (LLM.int8()): for a GEMV, two launches — one block flags the outlier
//!   columns, lists them in order, quantizes the inliers per row and counts the outliers;
//!   then the int8 GEMV adds the 16-bit outlier product in its epilogue, driven by the
//!   device-side list (no copy to the host, no allocation). Above, the outlier mask and
//!   list, per-row quantization, cuBLASLt / tiled int8, rescale and the outlier product
//!   kernel. Bit-identical to the CPU. The outlier fraction is counted on the device:
//!   [`CudaLinear::stats`] reads it as the CPU layer's `stats` does.
//! - `qat-sim`: activations fake-quantized with the calibrated parameters, then cuBLAS f32
//!   on the fake-quantized weights.
//! - `int4-block`, `nf4`, `fp4`, `kmeans` (4-bit indices): the fused 4-bit GEMV (for
//!   int4-block without `exact_gemv`, the fixed-point one: the CPU's default numerics), or
//!   dequantization to f32 and cuBLAS f32 above.
//!
//! [`CudaLinear::forward_fused`] adds an epilogue (an activation, or the residual add) to
//! any of these: in the GEMV kernels themselves, after the others in one launch.

use std::sync::Mutex;

use cudarc::driver::{CudaSlice, DeviceRepr};

use super::blas::{lt_int8_supports, Blas};
use super::fuse::{self, dense_gemv_fits, DenseWeight, Fuse, DENSE_GEMV_MAX_ROWS};
use super::ops::{self, DevicePacked4, Epilogue, FakeQuant, GEMV_MAX_ROWS};
use super::{driver, guard, CudaError, Gpu};
use crate::scheme::int8_dynamic::Int8DynamicOptions;
use crate::scheme::int8_outlier::OutlierDtype;
use crate::scheme::packed4::Packed4;
use crate::scheme::{FloatStorage, Linear, WeightParts};

/// How an int8-dynamic layer quantizes its activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activations {
    PerRow,
    PerTensor,
    Torch,
}

/// A weight representation on the device.
#[derive(Debug)]
enum Repr {
    Dense {
        weight: CudaSlice<f32>,
        pruned: bool,
    },
    Half {
        weight: CudaSlice<u16>,
        bf16: bool,
    },
    Int8 {
        weight: CudaSlice<i8>,
        scales: CudaSlice<f32>,
        activations: Activations,
    },
    Static {
        weight: CudaSlice<i8>,
        /// `(128 − zp) · Σ_k w[o, k]`.
        corr: CudaSlice<i32>,
        out_scales: CudaSlice<f32>,
        /// The f32 `1 / s_x` and the zero point.
        input: (f32, i32),
    },
    Outlier {
        weight: CudaSlice<i8>,
        scales: CudaSlice<f32>,
        threshold: f32,
        bf16: bool,
    },
    FakeQuant {
        weight: CudaSlice<f32>,
        input_scale: CudaSlice<f32>,
        params: FakeQuant,
    },
    Packed4 {
        weight: DevicePacked4,
    },
    Codebook {
        bits: u32,
        indices: CudaSlice<u8>,
        codebook: CudaSlice<f32>,
    },
}

/// Buffers the GEMV paths reuse from call to call (sized for [`GEMV_MAX_ROWS`] rows), and
/// LLM.int8's device-side outlier record.
#[derive(Debug, Default)]
struct Scratch {
    q: Option<CudaSlice<i8>>,
    sx: Option<CudaSlice<f32>>,
    mask: Option<CudaSlice<u8>>,
    idx: Option<CudaSlice<i32>>,
    count: Option<CudaSlice<i32>>,
    /// `[Σ outlier columns, calls]`.
    observed: Option<CudaSlice<u64>>,
}

/// A linear layer resident on the device.
#[derive(Debug)]
pub struct CudaLinear {
    rows: usize,
    cols: usize,
    repr: Repr,
    bias: Option<CudaSlice<f32>>,
    scratch: Mutex<Scratch>,
}

fn check_len(op: &'static str, what: &str, have: usize, want: usize) -> Result<(), CudaError> {
    if have != want {
        return Err(CudaError::Shape { op, message: format!("{what} holds {have} values, expected {want}") });
    }
    Ok(())
}

/// `len` (at least 1) uninitialised elements: for buffers a kernel writes in full before
/// anything reads them (no memset launch).
fn uninit<T: DeviceRepr>(gpu: &Gpu, len: usize) -> Result<CudaSlice<T>, CudaError> {
    guard("alloc", || {
        // SAFETY: every caller's buffer is written by a kernel before it is read.
        unsafe { gpu.stream().alloc::<T>(len.max(1)) }.map_err(driver(format!("allocate {len} elements")))
    })
}

/// The slot's buffer, allocated (uninitialised) on first use.
fn slot<'a, T: DeviceRepr>(
    gpu: &Gpu,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>, CudaError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(uninit(gpu, len)?);
    }
    slot.as_mut().ok_or(CudaError::Shape { op: "scratch", message: "buffer missing after allocation".into() })
}

/// int8 product `acc[m, n] = q[m, k] · w[n, k]ᵀ` for more than [`GEMV_MAX_ROWS`] rows.
fn int8_gemm(
    gpu: &Gpu,
    blas: &Blas,
    q: &CudaSlice<i8>,
    w: &CudaSlice<i8>,
    (m, n, k): (usize, usize, usize),
) -> Result<CudaSlice<i32>, CudaError> {
    let mut acc = uninit::<i32>(gpu, m * n)?;
    if lt_int8_supports(n, k) {
        blas.gemm_i8(q, w, &mut acc, (m, n, k))?;
    } else {
        ops::gemm_i8_tiled(gpu, q, w, &mut acc, (m, n, k))?;
    }
    Ok(acc)
}

/// Kernel path names of the int8 layers: `[gemv, cublaslt, tiled]`.
fn int8_names(repr: &Repr) -> [&'static str; 3] {
    match repr {
        Repr::Int8 { activations: Activations::PerRow, .. } => {
            ["cuda-int8-dp4a-gemv", "cuda-cublaslt-int8-gemm", "cuda-int8-tiled-gemm"]
        }
        Repr::Int8 { activations: Activations::PerTensor, .. } => [
            "cuda-int8-per-tensor-dp4a-gemv",
            "cuda-int8-per-tensor-cublaslt-gemm",
            "cuda-int8-per-tensor-tiled-gemm",
        ],
        Repr::Int8 { activations: Activations::Torch, .. } => {
            ["cuda-int8-torch-dp4a-gemv", "cuda-int8-torch-cublaslt-gemm", "cuda-int8-torch-tiled-gemm"]
        }
        Repr::Static { .. } => {
            ["cuda-int8-static-dp4a-gemv", "cuda-int8-static-cublaslt-gemm", "cuda-int8-static-tiled-gemm"]
        }
        Repr::Outlier { bf16: false, .. } => [
            "cuda-llm-int8-fused-gemv+f16-outliers",
            "cuda-llm-int8-cublaslt+f16-outliers",
            "cuda-llm-int8-tiled+f16-outliers",
        ],
        Repr::Outlier { bf16: true, .. } => [
            "cuda-llm-int8-fused-gemv+bf16-outliers",
            "cuda-llm-int8-cublaslt+bf16-outliers",
            "cuda-llm-int8-tiled+bf16-outliers",
        ],
        _ => ["", "", ""],
    }
}

/// Whether [`CudaLinear::from_linear`] has a CUDA path for this weight representation:
/// every one today. The match has no wildcard, so a new representation does not compile
/// until it is decided here, and the scheme table's `devices` must then agree (tested).
pub fn uploads(weights: &WeightParts) -> bool {
    match weights {
        WeightParts::Dense { .. }
        | WeightParts::Half { .. }
        | WeightParts::Int8Dynamic { .. }
        | WeightParts::Int8Static { .. }
        | WeightParts::Int8Outlier { .. }
        | WeightParts::FakeQuant { .. }
        | WeightParts::Packed4(_)
        | WeightParts::Codebook { .. } => true,
    }
}

impl CudaLinear {
    /// A device copy of any scheme's layer, from its [`Linear::parts`]. Every
    /// representation and option has a CUDA path; errors are shape mismatches between the
    /// parts and the layer's features, and device failures.
    pub fn from_linear(gpu: &Gpu, layer: &dyn Linear) -> Result<CudaLinear, CudaError> {
        const OP: &str = "cuda linear";
        let (rows, cols) = (layer.out_features(), layer.in_features());
        if rows == 0 || cols == 0 {
            return Err(CudaError::Shape {
                op: OP,
                message: format!("layer of {cols} inputs and {rows} outputs, expected at least 1 of each"),
            });
        }
        let parts = layer.parts();
        let n = rows * cols;
        if let Some(b) = parts.bias {
            check_len(OP, "bias", b.len(), rows)?;
        }
        let repr = match parts.weights {
            WeightParts::Dense { weight, pruned } => {
                check_len(OP, "weight", weight.len(), n)?;
                Repr::Dense { weight: gpu.upload(weight)?, pruned }
            }
            WeightParts::Half { bits, storage } => {
                check_len(OP, "weight", bits.len(), n)?;
                let bf16 = match storage {
                    FloatStorage::F16 => false,
                    FloatStorage::BF16 => true,
                    FloatStorage::F32 => {
                        return Err(CudaError::Shape {
                            op: OP,
                            message: "16-bit weights with f32 storage, expected F16 or BF16".into(),
                        })
                    }
                };
                Repr::Half { weight: gpu.upload(bits)?, bf16 }
            }
            WeightParts::Int8Dynamic { weight, scales, options } => {
                check_len(OP, "weight", weight.len(), n)?;
                check_len(OP, "scales", scales.len(), rows)?;
                let activations = match options {
                    Int8DynamicOptions { torch_compat: true, .. } => Activations::Torch,
                    Int8DynamicOptions { per_tensor_activations: true, .. } => Activations::PerTensor,
                    _ => Activations::PerRow,
                };
                Repr::Int8 {
                    weight: gpu.upload(&weight.row_major())?,
                    scales: gpu.upload(scales)?,
                    activations,
                }
            }
            WeightParts::Int8Static { weight, row_sums, out_scales, input } => {
                check_len(OP, "weight", weight.len(), n)?;
                check_len(OP, "row_sums", row_sums.len(), rows)?;
                check_len(OP, "out_scales", out_scales.len(), rows)?;
                let shift = 128 - i64::from(input.zero_point);
                let corr: Vec<i32> = row_sums
                    .iter()
                    .map(|&s| {
                        i32::try_from(shift * i64::from(s)).map_err(|_| CudaError::Shape {
                            op: OP,
                            message: format!(
                                "zero-point correction {shift} · {s} overflows i32, expected a row sum within ±2²³ (int8-static takes at most 65536 inputs)"
                            ),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Repr::Static {
                    weight: gpu.upload(weight)?,
                    corr: gpu.upload(&corr)?,
                    out_scales: gpu.upload(out_scales)?,
                    input: (1.0f32 / input.scale, input.zero_point),
                }
            }
            WeightParts::Int8Outlier { weight, scales, threshold, dtype } => {
                check_len(OP, "weight", weight.len(), n)?;
                check_len(OP, "scales", scales.len(), rows)?;
                Repr::Outlier {
                    weight: gpu.upload(weight)?,
                    scales: gpu.upload(scales)?,
                    threshold,
                    bf16: dtype == OutlierDtype::Bf16,
                }
            }
            WeightParts::FakeQuant { weight, input } => {
                check_len(OP, "weight", weight.len(), n)?;
                let params = FakeQuant {
                    zero_point: input.zero_point as f32,
                    qmin: 0.0,
                    qmax: 255.0,
                    reciprocal: true,
                };
                Repr::FakeQuant {
                    weight: gpu.upload(weight)?,
                    input_scale: gpu.upload(&[input.scale])?,
                    params,
                }
            }
            WeightParts::Packed4(p) => {
                check_len(OP, "packed4 rows", p.rows, rows)?;
                check_len(OP, "packed4 cols", p.cols, cols)?;
                Repr::Packed4 { weight: DevicePacked4::upload(gpu, p)? }
            }
            WeightParts::Codebook { bits, indices, codebook } => {
                check_len(OP, "indices (bytes)", indices.len(), (n * bits as usize).div_ceil(8))?;
                Repr::Codebook { bits, indices: gpu.upload(indices)?, codebook: gpu.upload(codebook)? }
            }
        };
        let mut scratch = Scratch::default();
        if let Repr::Outlier { .. } = repr {
            scratch.observed = Some(gpu.zeros::<u64>(2)?);
        }
        Ok(CudaLinear {
            rows,
            cols,
            repr,
            bias: parts.bias.map(|b| gpu.upload(b)).transpose()?,
            scratch: Mutex::new(scratch),
        })
    }

    /// An `int8-dynamic` layer (per-row activations) from its CPU parts
    /// (`Int8DynamicLinear::weight` / `scales`).
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
        Ok(CudaLinear {
            rows,
            cols,
            repr: Repr::Int8 {
                weight: gpu.upload(weight)?,
                scales: gpu.upload(scales)?,
                activations: Activations::PerRow,
            },
            bias: bias.map(|b| gpu.upload(b)).transpose()?,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// A 4-bit block layer.
    pub fn packed4(gpu: &Gpu, weight: &Packed4, bias: Option<&[f32]>) -> Result<CudaLinear, CudaError> {
        if let Some(b) = bias {
            check_len("packed4 linear", "bias", b.len(), weight.rows)?;
        }
        Ok(CudaLinear {
            rows: weight.rows,
            cols: weight.cols,
            repr: Repr::Packed4 { weight: DevicePacked4::upload(gpu, weight)? },
            bias: bias.map(|b| gpu.upload(b)).transpose()?,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.cols
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.rows
    }

    /// Bytes of the device-resident weight representation: codes or values, scales,
    /// offsets, tables and precomputed per-row terms (not the bias, not scratch buffers).
    pub fn device_bytes(&self) -> usize {
        fn b<T>(s: &CudaSlice<T>) -> usize {
            s.len() * std::mem::size_of::<T>()
        }
        match &self.repr {
            Repr::Dense { weight, .. } => b(weight),
            Repr::Half { weight, .. } => b(weight),
            Repr::Int8 { weight, scales, .. } | Repr::Outlier { weight, scales, .. } => b(weight) + b(scales),
            Repr::Static { weight, corr, out_scales, .. } => b(weight) + b(corr) + b(out_scales),
            Repr::FakeQuant { weight, input_scale, .. } => b(weight) + b(input_scale),
            Repr::Packed4 { weight } => {
                let params = |p: &ops::Params4| match p {
                    ops::Params4::F32(s) => b(s),
                    ops::Params4::Bf16(s) => b(s),
                };
                b(&weight.bytes)
                    + b(&weight.table)
                    + params(&weight.scales)
                    + weight.offsets.as_ref().map_or(0, params)
            }
            Repr::Codebook { indices, codebook, .. } => b(indices) + b(codebook),
        }
    }

    /// The kernel path `forward` takes for `m` activation rows.
    pub fn kernel(&self, m: usize) -> &'static str {
        let gemv = m <= GEMV_MAX_ROWS;
        let dense_gemv =
            m <= DENSE_GEMV_MAX_ROWS && self.dense_weight().is_some_and(|w| dense_gemv_fits(&w, self.cols));
        match &self.repr {
            Repr::Dense { pruned: false, .. } if dense_gemv => "cuda-f32-gemv",
            Repr::Dense { pruned: true, .. } if dense_gemv => "cuda-f32-gemv-dense-pruned",
            Repr::Half { bf16: false, .. } if dense_gemv => "cuda-f16-gemv-f32-acc",
            Repr::Half { bf16: true, .. } if dense_gemv => "cuda-bf16-gemv-f32-acc",
            Repr::Dense { pruned: false, .. } => "cuda-cublas-f32",
            Repr::Dense { pruned: true, .. } => "cuda-cublas-f32-dense-pruned",
            Repr::Half { bf16: false, .. } => "cuda-cublas-f16-gemm-f32-acc",
            Repr::Half { bf16: true, .. } => "cuda-cublas-bf16-gemm-f32-acc",
            Repr::FakeQuant { .. } => "cuda-fake-quant-cublas-f32",
            Repr::Codebook { .. } => "cuda-kmeans-dequant-cublas-f32",
            Repr::Packed4 { weight } if gemv && weight.fixed_point => "cuda-packed4-fixed-point-gemv",
            Repr::Packed4 { .. } if gemv => "cuda-packed4-fused-gemv",
            Repr::Packed4 { .. } => "cuda-packed4-dequant-f32-cublas",
            repr => {
                let [g, lt, tiled] = int8_names(repr);
                if gemv {
                    g
                } else if lt_int8_supports(self.rows, self.cols) {
                    lt
                } else {
                    tiled
                }
            }
        }
    }

    /// What the layer observed since it was built, as the CPU layer's `Linear::stats`:
    /// LLM.int8's `outlier_column_fraction` (mean over calls of outlier columns / input
    /// features), read from the device (waits for the stream). Empty for other layers or
    /// before the first call.
    pub fn stats(&self, gpu: &Gpu) -> Result<Vec<(&'static str, f64)>, CudaError> {
        let scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let Some(observed) = scratch.observed.as_ref() else { return Ok(Vec::new()) };
        let v = gpu.download(observed)?;
        if v[1] == 0 {
            return Ok(Vec::new());
        }
        Ok(vec![("outlier_column_fraction", v[0] as f64 / (v[1] as f64 * self.cols as f64))])
    }

    /// The weight [`fuse::dense_gemv`] reads, for the dense and 16-bit representations.
    fn dense_weight(&self) -> Option<DenseWeight<'_>> {
        match &self.repr {
            Repr::Dense { weight, .. } => Some(DenseWeight::F32(weight)),
            Repr::Half { weight, bf16 } => Some(DenseWeight::Half(weight, *bf16)),
            _ => None,
        }
    }

    /// `out[m, out_features] = x[m, in_features] · Wᵀ + b`, queued on `gpu`'s stream
    /// (nothing waits for the device); returns the kernel path taken. `x` and `out` may be
    /// longer than `m` rows.
    pub fn forward(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        x: &CudaSlice<f32>,
        m: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<&'static str, CudaError> {
        self.forward_fused(gpu, blas, x, m, Fuse::NONE, out)
    }

    /// [`CudaLinear::forward`] then `fuse` on each output (an activation, or adding to
    /// what `out` holds: the residual add). The GEMV paths apply it in their epilogue;
    /// the others in one [`fuse::bias_act_rows`] launch after the product.
    pub fn forward_fused(
        &self,
        gpu: &Gpu,
        blas: &Blas,
        x: &CudaSlice<f32>,
        m: usize,
        fuse: Fuse,
        out: &mut CudaSlice<f32>,
    ) -> Result<&'static str, CudaError> {
        const OP: &str = "cuda linear forward";
        let path = self.kernel(m);
        let (n, k) = (self.rows, self.cols);
        if x.len() < m * k || out.len() < m * n {
            return Err(CudaError::Shape {
                op: OP,
                message: format!(
                    "x holds {} and out {} values, expected at least {} and {} ({m} rows)",
                    x.len(),
                    out.len(),
                    m * k,
                    m * n
                ),
            });
        }
        if m == 0 {
            return Ok(path);
        }
        let bias = self.bias.as_ref();
        let gemv = m <= GEMV_MAX_ROWS;
        if let Some(w) = self.dense_weight().filter(|w| m <= DENSE_GEMV_MAX_ROWS && dense_gemv_fits(w, k)) {
            fuse::dense_gemv(gpu, w, (n, k), x, m, bias, fuse, out)?;
            return Ok(path);
        }
        match &self.repr {
            Repr::Dense { weight, .. } => {
                self.product(gpu, m, fuse, out, |o| blas.gemm(x, weight, o, (m, n, k)))?;
            }
            Repr::Half { weight, bf16 } => {
                let mut xh = uninit::<u16>(gpu, m * k)?;
                ops::round_to_16(gpu, x, m * k, *bf16, &mut xh)?;
                self.product(gpu, m, fuse, out, |o| blas.gemm_16_f32(&xh, weight, *bf16, o, (m, n, k)))?;
            }
            Repr::FakeQuant { weight, input_scale, params } => {
                let mut fx = uninit::<f32>(gpu, m * k)?;
                ops::fake_quant_tensor(gpu, x, (m * k, k), input_scale, *params, &mut fx)?;
                self.product(gpu, m, fuse, out, |o| blas.gemm(&fx, weight, o, (m, n, k)))?;
            }
            Repr::Codebook { bits, indices, codebook } => {
                let mut dense = uninit::<f32>(gpu, n * k)?;
                ops::codebook_dequant(gpu, (indices, *bits), codebook, n * k, &mut dense)?;
                self.product(gpu, m, fuse, out, |o| blas.gemm(x, &dense, o, (m, n, k)))?;
            }
            Repr::Packed4 { weight } => {
                if gemv {
                    ops::packed4_gemv(gpu, weight, x, m, bias, fuse, out)?;
                } else {
                    let mut dense = uninit::<f32>(gpu, n * k)?;
                    ops::packed4_dequant(gpu, weight, Some(&mut dense), None)?;
                    self.product(gpu, m, fuse, out, |o| blas.gemm(x, &dense, o, (m, n, k)))?;
                }
            }
            Repr::Int8 { weight, scales, activations } => {
                let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                let Scratch { q: q_slot, sx: sx_slot, .. } = &mut *guard;
                let (mut q_call, mut sx_call);
                let (q, sx) = if gemv {
                    (slot(gpu, q_slot, GEMV_MAX_ROWS * k)?, slot(gpu, sx_slot, GEMV_MAX_ROWS)?)
                } else {
                    q_call = uninit::<i8>(gpu, m * k)?;
                    sx_call = uninit::<f32>(gpu, m)?;
                    (&mut q_call, &mut sx_call)
                };
                match activations {
                    Activations::PerRow => ops::quantize_rows_i8(gpu, x, None, m, k, q, sx)?,
                    Activations::PerTensor => ops::quantize_tensor_i8(gpu, x, m, k, q, sx)?,
                    Activations::Torch => ops::torch_quantize_i8(gpu, x, (m, k), q, sx)?,
                }
                let torch = *activations == Activations::Torch;
                match (gemv, torch) {
                    (true, false) => ops::gemv_i8(gpu, q, sx, weight, scales, bias, fuse, out, (m, n, k))?,
                    (true, true) => {
                        let epilogue = Epilogue::Torch { sx, sw: scales };
                        ops::gemv_i8_with(gpu, q, weight, epilogue, bias, fuse, out, (m, n, k))?
                    }
                    (false, false) => {
                        let acc = int8_gemm(gpu, blas, q, weight, (m, n, k))?;
                        Self::then(gpu, (m, n), fuse, out, |o| {
                            ops::rescale_i32(gpu, &acc, sx, scales, bias, o, (m, n))
                        })?
                    }
                    (false, true) => {
                        let acc = int8_gemm(gpu, blas, q, weight, (m, n, k))?;
                        let epilogue = Epilogue::Torch { sx, sw: scales };
                        Self::then(gpu, (m, n), fuse, out, |o| {
                            ops::rescale_with(gpu, &acc, epilogue, bias, o, (m, n))
                        })?
                    }
                }
            }
            Repr::Static { weight, corr, out_scales, input } => {
                let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                let mut q_call;
                let q = if gemv {
                    slot(gpu, &mut guard.q, GEMV_MAX_ROWS * k)?
                } else {
                    q_call = uninit::<i8>(gpu, m * k)?;
                    &mut q_call
                };
                ops::quantize_static_i8(gpu, x, m * k, *input, q)?;
                let epilogue = Epilogue::Static { corr, out_scales };
                if gemv {
                    ops::gemv_i8_with(gpu, q, weight, epilogue, bias, fuse, out, (m, n, k))?;
                } else {
                    let acc = int8_gemm(gpu, blas, q, weight, (m, n, k))?;
                    Self::then(gpu, (m, n), fuse, out, |o| {
                        ops::rescale_with(gpu, &acc, epilogue, bias, o, (m, n))
                    })?;
                }
            }
            Repr::Outlier { weight, scales, threshold, bf16 } => {
                let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
                let Scratch { q, sx, mask, idx, count, observed } = &mut *guard;
                let observed = observed.as_mut().ok_or(CudaError::Shape {
                    op: OP,
                    message: "LLM.int8 layer without its outlier record, expected one from from_linear"
                        .into(),
                })?;
                if gemv {
                    let q = slot(gpu, q, GEMV_MAX_ROWS * k)?;
                    let sx = slot(gpu, sx, GEMV_MAX_ROWS)?;
                    let mask = slot(gpu, mask, k)?;
                    let idx = slot(gpu, idx, k)?;
                    let count = slot(gpu, count, 1)?;
                    ops::llm_int8_prepare(gpu, x, (m, k), *threshold, q, sx, mask, idx, count, observed)?;
                    ops::gemv_i8_outlier(
                        gpu,
                        (q, sx),
                        (weight, scales),
                        bias,
                        x,
                        (idx, count),
                        *bf16,
                        fuse,
                        out,
                        (m, n, k),
                    )?;
                } else {
                    let mut mask = uninit::<u8>(gpu, k)?;
                    let mut idx = uninit::<i32>(gpu, k)?;
                    let mut count = uninit::<i32>(gpu, 1)?;
                    ops::outlier_columns(gpu, x, (m, k), *threshold, &mut mask, &mut idx, &mut count)?;
                    ops::record_outliers(gpu, &count, observed)?;
                    let mut q = uninit::<i8>(gpu, m * k)?;
                    let mut sx = uninit::<f32>(gpu, m)?;
                    ops::quantize_rows_i8(gpu, x, Some(&mask), m, k, &mut q, &mut sx)?;
                    let acc = int8_gemm(gpu, blas, &q, weight, (m, n, k))?;
                    Self::then(gpu, (m, n), fuse, out, |o| {
                        ops::rescale_i32(gpu, &acc, &sx, scales, bias, o, (m, n))?;
                        ops::outlier_product(gpu, x, (m, k, n), &idx, &count, weight, scales, *bf16, o)
                    })?;
                }
            }
        }
        Ok(path)
    }

    /// A product without bias written by `write`, then the bias and `fuse`: into `out`
    /// with the bias added in place when there is nothing to fuse, else into a scratch
    /// buffer that one [`fuse::bias_act_rows`] launch carries into `out`.
    fn product(
        &self,
        gpu: &Gpu,
        m: usize,
        fuse: Fuse,
        out: &mut CudaSlice<f32>,
        write: impl FnOnce(&mut CudaSlice<f32>) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let n = self.rows;
        if fuse.is_none() {
            write(out)?;
            return match &self.bias {
                Some(b) => ops::add_bias_rows(gpu, out, b, m),
                None => Ok(()),
            };
        }
        let mut raw = uninit::<f32>(gpu, m * n)?;
        write(&mut raw)?;
        fuse::bias_act_rows(gpu, &raw, self.bias.as_ref(), fuse, out, (m, n))
    }

    /// A finished output (bias included) written by `write`, then `fuse`: straight into
    /// `out` when there is nothing to fuse.
    fn then(
        gpu: &Gpu,
        (m, n): (usize, usize),
        fuse: Fuse,
        out: &mut CudaSlice<f32>,
        write: impl FnOnce(&mut CudaSlice<f32>) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        if fuse.is_none() {
            return write(out);
        }
        let mut done = uninit::<f32>(gpu, m * n)?;
        write(&mut done)?;
        fuse::bias_act_rows(gpu, &done, None, fuse, out, (m, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::{Calibration, DeviceSupport, SchemeParams, SCHEMES};

    /// The scheme table's `devices` says CUDA exactly for the schemes whose layers this
    /// backend uploads (no GPU needed: only the representation is looked at).
    #[test]
    fn scheme_table_devices_match_what_the_backend_uploads() {
        let (rows, cols) = (8, 64);
        let mut rng = crate::tensor::SeededRng::new(2);
        let data = rng.normal_vec(rows * cols, 1.0);
        let inputs = rng.normal_vec(16 * cols, 1.0);
        for info in SCHEMES {
            let scheme = (info.build)(&SchemeParams::default()).unwrap();
            let calibration = info.needs_calibration.then_some(Calibration { inputs: &inputs, rows: 16 });
            let weight = crate::scheme::DenseWeight { name: "w".into(), rows, cols, data: data.clone() };
            let layer = scheme.quantize(weight, None, calibration).unwrap();
            let on_cuda = info.devices == DeviceSupport::CpuAndCuda;
            assert_eq!(uploads(&layer.parts().weights), on_cuda, "scheme {}", info.name);
        }
    }
}
