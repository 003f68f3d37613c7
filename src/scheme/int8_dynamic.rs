//! The `int8-dynamic` scheme: int8 weights quantized ahead of time, activations quantized
//! at run time, an int8×int8→int32 product ([`super::kernels::int8_gemm`]) rescaled to f32.
//!
//! Default numerics (ours):
//! - weights: per output row, symmetric, `scale = absmax / 127`,
//!   `q = clamp(round_half_even(w / scale), −127, 127)`; a row of zeros gets scale 1 (any
//!   scale represents it exactly, and 1 keeps the rescale free of 0·∞).
//! - activations: per token (row) symmetric the same way, or one scale for the whole input
//!   with `per_tensor_activations: true`; an all-zero row gets scale 1.
//! - `y[i, j] = acc[i, j] · (s_x[i] · s_w[j]) + b[j]` in f32.
//!
//! `torch_compat: true` reproduces `torch.ao.quantization.quantize_dynamic(model,
//! {nn.Linear}, dtype=torch.qint8)` on x86 (engine `x86`, which runs dynamic Linear
//! through fbgemm), as checked against torch 2.15 by `tests/integration/torch_dynamic.rs`:
//! - weights: `default_dynamic_qconfig.weight` is `MinMaxObserver(qint8,
//!   per_tensor_symmetric)`: one scale for the whole tensor,
//!   `scale = max(−min(w, 0), max(w, 0)) / 127.5` in f32 (`(quant_max − quant_min) / 2`),
//!   floored at f32 ε, zero point 0; `q = clamp(round_half_even(w · (1/scale)), −128, 127)`
//!   (fbgemm's `Quantize` multiplies by the f32 reciprocal), so −128 can occur.
//! - activations: `linear_dynamic(x, packed, reduce_range=True)` quantizes the whole input
//!   per tensor, affine, to quint8 with the reduced range 0..127 (7 bits, which keeps
//!   fbgemm's u8×i8 `vpmaddubsw` pair sums from saturating): fbgemm's
//!   `ChooseQuantizationParams(min, max, 0, 255, reduce_range)` — range widened to contain
//!   0, `scale = (max − min) / 127` in f64 then stored as f32 (0.1 when that is 0 or its
//!   reciprocal overflows; raised to 6.1e-5 with min/max stretched when smaller), zero point
//!   from whichever end has the smaller error (`|qmin| − |min/scale|` against
//!   `|qmax| − |max/scale|`, in f64 with the unrounded scale), clamped to 0..127, rounded
//!   half to even (`nearbyint`). Values: `clamp(round_half_even(x · (1/scale) + zp), 0, 255)`
//!   (fbgemm's legacy AVX2 quantizer is one fused multiply-add, then a round).
//! - `y = fma(acc, s_x · s_w, b)` (one rounding, like fbgemm's AVX2 `ReQuantizeForFloat`)
//!   with `acc = Σ (q_x − zp) · q_w`, the value fbgemm gets from its raw u8×i8 sum minus
//!   `zp · Σ q_w`.
//!
//! Measured against torch 2.15 (tests/integration/torch_dynamic.rs): int8 weights, weight
//! scales and activation parameters bit-identical, every layer output bit-identical.
//! Where we may still differ: fbgemm quantizes the last `len % 8` activations with a
//! scalar routine (`nearbyint(x / scale) + zp`, division instead of the fused
//! multiply-add) and its output stage handles the last `n % 8` columns with scalar code,
//! which can round a tie or a product differently (one quantization step, or 1 ulp of
//! the output); the input of the fixture's layers did not hit such a case.

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use std::borrow::Cow;

use super::kernels::int8_gemm::{gemm_i8, kernel_name};
#[cfg(target_arch = "x86_64")]
use super::kernels::int8_panels;
use super::kernels::int8_quant::{absmax, quantize_symmetric, symmetric_scale};
use super::Int8Panels;
use super::{
    Calibration, DenseWeight, DeviceSupport, Int8Codes, LayerParts, Linear, ParamInfo, ParamKind, Scheme,
    SchemeInfo, SchemeParams, StoredSource, StoredTensor, TensorRole, WeightParts,
};
use crate::error::{Error, Result};

/// The scheme's name as spelled in suites.
const NAME: &str = "int8-dynamic";

/// Weights quantized per output row, symmetric: `q` is `[rows, cols]`, one scale per row.
pub(super) fn quantize_weight_rows(weight: &DenseWeight) -> Result<(Vec<i8>, Vec<f32>)> {
    if let Some((bad, _)) = crate::tensor::first_non_finite(&weight.data) {
        return Err(Error::Scheme {
            scheme: NAME.to_string(),
            message: format!("weight `{}` holds a non-finite value at index {bad}", weight.name),
        });
    }
    let mut q = vec![0i8; weight.data.len()];
    let cols = weight.cols.max(1);
    // Rows are independent: the thread pool takes them (same values as a serial loop).
    let mut scales: Vec<f32> = weight
        .data
        .par_chunks_exact(cols)
        .zip(q.par_chunks_exact_mut(cols))
        .with_min_len(64)
        .map(|(row, qrow)| {
            let scale = symmetric_scale(absmax(row));
            quantize_symmetric(row, scale, qrow);
            scale
        })
        .collect();
    scales.resize(weight.rows, 1.0);
    Ok((q, scales))
}

/// Fewest activation values [`quantize_activations`] hands to the thread pool.
const PARALLEL_QUANTIZE_ELEMENTS: usize = 1 << 15;

/// Activations `x[rows, cols]` quantized symmetric per row (or with one scale for all
/// when `per_tensor`): the int8 values and one scale per row.
pub(super) fn quantize_activations(
    x: &[f32],
    rows: usize,
    cols: usize,
    per_tensor: bool,
) -> (Vec<i8>, Vec<f32>) {
    let _span = crate::profile::span("activation quantization", "int8 symmetric", || crate::profile::Work {
        ops: 3.0 * x.len() as f64,
        bytes: 5.0 * x.len() as f64,
    });
    let mut q = vec![0i8; rows * cols];
    if cols == 0 {
        return (q, vec![1.0; rows]);
    }
    let tensor_scale = per_tensor.then(|| symmetric_scale(absmax(x)));
    // Each row's scale, then its values, while the row is in cache; rows on the thread
    // pool when there are enough of them (prefill), the same values as a serial loop.
    let row = |(row, qrow): (&[f32], &mut [i8])| {
        let s = tensor_scale.unwrap_or_else(|| symmetric_scale(absmax(row)));
        quantize_symmetric(row, s, qrow);
        s
    };
    let pairs = x.chunks_exact(cols).zip(q.chunks_exact_mut(cols));
    let scales: Vec<f32> = if x.len() >= PARALLEL_QUANTIZE_ELEMENTS {
        x.par_chunks_exact(cols).zip(q.par_chunks_exact_mut(cols)).with_min_len(8).map(row).collect()
    } else {
        pairs.map(row).collect()
    };
    (q, scales)
}

/// `out[i, j] = acc[i, j] · (row_scale[i] · col_scale[j]) + bias[j]`, the multiply and
/// the add rounded once (`fused`, as fbgemm's AVX2 output stage does: torch mode) or
/// twice (default: `f32::mul_add` is a library call without `-C target-feature=+fma`).
pub(super) fn rescale(
    acc: &[i32],
    row_scales: &[f32],
    col_scales: &[f32],
    bias: Option<&[f32]>,
    fused: bool,
    out: &mut [f32],
) {
    let n = col_scales.len();
    for ((orow, arow), &sx) in out.chunks_exact_mut(n.max(1)).zip(acc.chunks_exact(n.max(1))).zip(row_scales)
    {
        for (j, (o, &a)) in orow.iter_mut().zip(arow).enumerate() {
            let (scale, b) = (sx * col_scales[j], bias.map_or(0.0, |b| b[j]));
            *o = if fused { (a as f32).mul_add(scale, b) } else { a as f32 * scale + b };
        }
    }
}

/// Quantization parameters torch (fbgemm) picks for a dynamically quantized input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TorchActivationParams {
    /// The f32 scale.
    pub scale: f32,
    /// The zero point, in 0..=127.
    pub zero_point: i32,
}

/// fbgemm's `ChooseQuantizationParams(min, max, qmin = 0, qmax = 255,
/// preserve_sparsity = false, force_scale_power_of_two = false, reduce_range = true)`.
pub fn torch_activation_params(min: f32, max: f32) -> TorchActivationParams {
    // reduce_range halves the range: 0..127.
    const QMIN: i32 = 0;
    const QMAX: i32 = 255 / 2;
    const SMALL_SCALE_THRESHOLD: f32 = 6.1e-5;
    let (mut min, mut max) = (min.min(0.0), max.max(0.0));
    let mut scale = (max as f64 - min as f64) / (QMAX - QMIN) as f64;
    if scale as f32 == 0.0 || (1.0f32 / scale as f32).is_infinite() {
        scale = 0.1;
    }
    if scale < SMALL_SCALE_THRESHOLD as f64 {
        let org_scale = scale as f32;
        scale = SMALL_SCALE_THRESHOLD as f64;
        let span = SMALL_SCALE_THRESHOLD * (QMAX - QMIN) as f32;
        if min == 0.0 {
            max = span;
        } else if max == 0.0 {
            min = -span;
        } else {
            let amplifier = SMALL_SCALE_THRESHOLD / org_scale;
            min *= amplifier;
            max *= amplifier;
        }
    }
    let from_min = QMIN as f64 - min as f64 / scale;
    let from_max = QMAX as f64 - max as f64 / scale;
    let min_error = (QMIN as f64).abs() - (min as f64 / scale).abs();
    let max_error = (QMAX as f64).abs() - (max as f64 / scale).abs();
    let initial = if min_error < max_error { from_min } else { from_max };
    let zero_point = if initial < QMIN as f64 {
        QMIN
    } else if initial > QMAX as f64 {
        QMAX
    } else {
        initial.round_ties_even() as i32
    };
    TorchActivationParams { scale: scale as f32, zero_point }
}

/// The input quantized as torch does (per tensor, affine, 7-bit quint8), returned as the
/// signed differences `q − zp` (in −127..=127) the integer product needs.
pub fn torch_quantize_activations(x: &[f32]) -> (Vec<i8>, TorchActivationParams) {
    let (min, max) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let params =
        if x.is_empty() { torch_activation_params(0.0, 0.0) } else { torch_activation_params(min, max) };
    let inverse = 1.0f32 / params.scale;
    let zp = params.zero_point as f32;
    let q = x
        .iter()
        .map(|&v| {
            let u = v.mul_add(inverse, zp).round_ties_even().clamp(0.0, 255.0) as i32;
            // u ≤ 127 + rounding for inputs inside [min, max], and zp ≥ 0: the clamp only
            // guards the i8 conversion.
            (u - params.zero_point).clamp(-128, 127) as i8
        })
        .collect();
    (q, params)
}

/// torch's per-tensor symmetric qint8 weight: `(q, scale)`.
pub fn torch_quantize_weight(data: &[f32]) -> (Vec<i8>, f32) {
    let (min, max) = data.iter().fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let scale = ((-min).max(max) / 127.5).max(f32::EPSILON);
    let inverse = 1.0f32 / scale;
    let q = data.iter().map(|&v| (v * inverse).round_ties_even().clamp(-128.0, 127.0) as i8).collect();
    (q, scale)
}

/// The scheme's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Int8DynamicOptions {
    /// One activation scale for the whole input instead of one per row.
    pub per_tensor_activations: bool,
    /// Reproduce torch's `quantize_dynamic` (see the module documentation).
    pub torch_compat: bool,
}

/// A linear layer with int8 weights and activations quantized at run time.
pub struct Int8DynamicLinear {
    rows: usize,
    cols: usize,
    codes: Codes,
    /// One scale per output row; in torch mode one value repeated for every row (stored
    /// once).
    scales: Vec<f32>,
    bias: Option<Vec<f32>>,
    options: Int8DynamicOptions,
}

impl Int8DynamicLinear {
    /// Quantize `weight` (`[rows, cols]` f32).
    pub fn new(weight: DenseWeight, bias: Option<Vec<f32>>, options: Int8DynamicOptions) -> Result<Self> {
        let (rows, cols) = (weight.rows, weight.cols);
        let (q, scales) = if options.torch_compat {
            if let Some(bad) = weight.data.iter().position(|v| !v.is_finite()) {
                return Err(Error::Scheme {
                    scheme: NAME.to_string(),
                    message: format!("weight `{}` holds a non-finite value at index {bad}", weight.name),
                });
            }
            let (q, s) = torch_quantize_weight(&weight.data);
            (q, vec![s; rows])
        } else {
            quantize_weight_rows(&weight)?
        };
        Ok(Self::from_codes(rows, cols, q, scales, bias, options))
    }

    /// A layer from its row-major codes, packed for the VNNI product where the CPU has it.
    fn from_codes(
        rows: usize,
        cols: usize,
        q: Vec<i8>,
        scales: Vec<f32>,
        bias: Option<Vec<f32>>,
        options: Int8DynamicOptions,
    ) -> Self {
        Int8DynamicLinear { rows, cols, codes: Codes::new(q, rows, cols), scales, bias, options }
    }

    /// The int8 weights (`[rows, cols]`, row-major).
    pub fn weight(&self) -> Cow<'_, [i8]> {
        self.codes.view().row_major()
    }

    /// The weight scale of each output row.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    fn stored_scales(&self) -> &[f32] {
        if self.options.torch_compat {
            &self.scales[..self.scales.len().min(1)]
        } else {
            &self.scales
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Int8DynamicLinear {
    /// [`Linear::forward`] through the packed VNNI product: activations quantized straight
    /// into the kernel's unsigned rows, the rescale inside the kernel.
    fn forward_packed(&self, panels: &Int8Panels, x: &[f32], rows: usize, out: &mut [f32]) {
        let (acts, row_scales) = if self.options.torch_compat {
            let (q, params) = torch_quantize_activations(x);
            (int8_panels::unsigned(&q, rows, self.cols), vec![params.scale; rows])
        } else {
            int8_panels::quantize_rows(x, rows, self.cols, self.options.per_tensor_activations)
        };
        let rescale = int8_panels::Rescale {
            row_scales: &row_scales,
            col_scales: &self.scales,
            bias: self.bias.as_deref(),
            fused: self.options.torch_compat,
        };
        int8_panels::matmul_f32(panels, &acts, rows, rescale, out);
    }
}

/// A layer's codes: packed where the CPU runs the VNNI product, else row-major.
enum Codes {
    RowMajor(Vec<i8>),
    #[cfg(target_arch = "x86_64")]
    Panels(Int8Panels),
}

impl Codes {
    fn new(q: Vec<i8>, rows: usize, cols: usize) -> Codes {
        #[cfg(target_arch = "x86_64")]
        if let Some(panels) = Int8Panels::pack(&q, rows, cols) {
            return Codes::Panels(panels);
        }
        Codes::RowMajor(q)
    }

    fn view(&self) -> Int8Codes<'_> {
        match self {
            Codes::RowMajor(q) => Int8Codes::RowMajor(q),
            #[cfg(target_arch = "x86_64")]
            Codes::Panels(panels) => Int8Codes::Panels(panels),
        }
    }
}

impl Linear for Int8DynamicLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let weight = match &self.codes {
            #[cfg(target_arch = "x86_64")]
            Codes::Panels(panels) => return self.forward_packed(panels, x, rows, out),
            Codes::RowMajor(weight) => weight,
        };
        let (q, row_scales) = if self.options.torch_compat {
            let (q, params) = torch_quantize_activations(x);
            (q, vec![params.scale; rows])
        } else {
            quantize_activations(x, rows, self.cols, self.options.per_tensor_activations)
        };
        let mut acc = vec![0i32; rows * self.rows];
        gemm_i8(&q, rows, self.cols, weight, self.rows, &mut acc);
        rescale(&acc, &row_scales, &self.scales, self.bias.as_deref(), self.options.torch_compat, out);
    }

    fn kernel(&self) -> &'static str {
        match self.codes {
            #[cfg(target_arch = "x86_64")]
            Codes::Panels(_) => int8_panels::KERNEL,
            Codes::RowMajor(_) => kernel_name(),
        }
    }

    fn parts(&self) -> LayerParts<'_> {
        let weights = WeightParts::Int8Dynamic {
            weight: self.codes.view(),
            scales: &self.scales,
            options: self.options,
        };
        LayerParts { weights, bias: self.bias.as_deref() }
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        let scales = self.stored_scales();
        let mut out = vec![
            StoredTensor {
                name: format!("{name}.weight"),
                role: TensorRole::PackedWeights,
                dtype: Dtype::I8,
                shape: vec![self.rows, self.cols],
                bytes: self.codes.view().row_major().iter().map(|&v| v as u8).collect(),
                represents: self.rows * self.cols,
            },
            StoredTensor::f32(format!("{name}.scale"), TensorRole::Scales, vec![scales.len()], scales),
        ];
        out.extend(super::bias_tensor(name, self.bias.as_deref()));
        out
    }
}

/// Read back an I8 `[rows, cols]` weight and its f32 scales (`scale_count` of them).
pub(super) fn load_i8_weight(
    scheme: &str,
    name: &str,
    rows: usize,
    cols: usize,
    scale_count: usize,
    source: &dyn StoredSource,
) -> Result<(Vec<i8>, Vec<f32>)> {
    let weight_name = format!("{name}.weight");
    let (dtype, bytes) = source.raw(&weight_name, &[rows, cols])?;
    if dtype != Dtype::I8 || bytes.len() != rows * cols {
        return Err(Error::Scheme {
            scheme: scheme.to_string(),
            message: format!(
                "`{weight_name}` is {dtype:?} with {} bytes, expected I8 [{rows}, {cols}]",
                bytes.len()
            ),
        });
    }
    let scales = source.f32(&format!("{name}.scale"), &[scale_count])?;
    Ok((bytes.into_iter().map(|b| b as i8).collect(), scales))
}

struct Int8DynamicScheme(Int8DynamicOptions);

impl Scheme for Int8DynamicScheme {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        _: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        Ok(Box::new(Int8DynamicLinear::new(weight, bias, self.0)?))
    }

    fn load(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
        source: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>> {
        let scale_count = if self.0.torch_compat { rows.min(1) } else { rows };
        let (weight, stored) = load_i8_weight(NAME, name, rows, cols, scale_count, source)?;
        let scales =
            if self.0.torch_compat { vec![stored.first().copied().unwrap_or(1.0); rows] } else { stored };
        Ok(Box::new(Int8DynamicLinear::from_codes(rows, cols, weight, scales, bias, self.0)))
    }
}

/// Build the configured scheme.
pub fn build(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    Ok(Box::new(Int8DynamicScheme(options(params))))
}

fn options(params: &SchemeParams) -> Int8DynamicOptions {
    Int8DynamicOptions {
        per_tensor_activations: params.bool("per_tensor_activations", false),
        torch_compat: params.bool("torch_compat", false),
    }
}

pub(super) const INT8_DYNAMIC: SchemeInfo = SchemeInfo {
    name: NAME,
    summary: "int8 weights per output row (symmetric, + one f32 scale per row), activations int8 per token \
              at run time, int8×int8→int32 GEMM",
    bits_per_weight: 8.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
    params: &[
        ParamInfo {
            name: "per_tensor_activations",
            kind: ParamKind::Bool,
            default: "false",
            help: "one activation scale for the whole input instead of one per token",
        },
        ParamInfo {
            name: "torch_compat",
            kind: ParamKind::Bool,
            default: "false",
            help:
                "reproduce torch quantize_dynamic on x86: per-tensor weights, 7-bit affine uint8 activations",
        },
    ],
    build,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::kernels::int8_quant::quantize_symmetric_lanes;
    use crate::tensor::SeededRng;

    /// The AVX2 activation quantization gives the portable loop's codes bit for bit
    /// (ties, clamping, signed zero, NaN), and the lane maximum the sequential one.
    #[test]
    fn vectorised_activation_quantization_matches_the_portable_loop() {
        let mut x = SeededRng::new(21).normal_vec(1003, 3.0);
        x[..6].copy_from_slice(&[0.5, -0.5, 1.5, -2.5, -0.0, f32::NAN]);
        x[7] = 1e30;
        x[8] = f32::INFINITY;
        x[9] = f32::NEG_INFINITY;
        let sequential = |x: &[f32]| x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert_eq!(absmax(&x).to_bits(), sequential(&x).to_bits());
        // Every length around the 32-value steps, a NaN in the vector part and the tail.
        let mut finite = SeededRng::new(5).normal_vec(200, 2.0);
        finite[40] = f32::NAN;
        finite[197] = f32::NAN;
        for len in 0..finite.len() {
            assert_eq!(absmax(&finite[..len]).to_bits(), sequential(&finite[..len]).to_bits(), "{len}");
        }
        for scale in [1.0f32, 0.37, symmetric_scale(10.0)] {
            let mut fast = vec![0i8; x.len()];
            quantize_symmetric(&x, scale, &mut fast);
            let mut plain = vec![0i8; x.len()];
            quantize_symmetric_lanes(&x, scale, &mut plain);
            assert_eq!(fast, plain, "scale {scale}");
        }
    }

    fn dense(rows: usize, cols: usize, seed: u64) -> DenseWeight {
        DenseWeight { name: "w".into(), rows, cols, data: SeededRng::new(seed).normal_vec(rows * cols, 0.5) }
    }

    #[test]
    fn weights_round_to_the_row_scale_and_zero_rows_get_scale_one() {
        let mut w = dense(3, 4, 1);
        w.data[4..8].fill(0.0);
        w.data[0] = -2.54;
        let (q, s) = quantize_weight_rows(&w).unwrap();
        assert_eq!(s[1], 1.0);
        assert_eq!(&q[4..8], &[0; 4]);
        assert_eq!(s[0], 2.54 / 127.0);
        assert_eq!(q[0], -127);
        for (row, (qr, &sr)) in w.data.chunks(4).zip(q.chunks(4).zip(&s)) {
            for (&v, &qv) in row.iter().zip(qr) {
                assert!((v - qv as f32 * sr).abs() <= sr / 2.0 * 1.0001, "{v} {qv} {sr}");
            }
        }
    }

    #[test]
    fn forward_equals_the_float_formula_on_the_integer_values() {
        let (rows, cols, n) = (3, 37, 5);
        let layer =
            Int8DynamicLinear::new(dense(n, cols, 2), Some(vec![0.25; n]), Int8DynamicOptions::default())
                .unwrap();
        let x = SeededRng::new(3).normal_vec(rows * cols, 1.0);
        let mut out = vec![0.0; rows * n];
        layer.forward(&x, rows, &mut out);
        let (q, sx) = quantize_activations(&x, rows, cols, false);
        let w = layer.weight();
        for i in 0..rows {
            for j in 0..n {
                let acc: i32 = (0..cols).map(|c| q[i * cols + c] as i32 * w[j * cols + c] as i32).sum();
                assert_eq!(out[i * n + j], acc as f32 * (sx[i] * layer.scales[j]) + 0.25);
            }
        }
        // And it is close to the float product.
        let reference = crate::tensor::matmul_nt_reference(&x, rows, cols, &dense(n, cols, 2).data, n);
        for (o, r) in out.iter().zip(&reference) {
            assert!((o - 0.25 - r).abs() < 0.05, "{o} {r}");
        }
    }

    #[test]
    fn per_tensor_activations_share_one_scale() {
        let x = [1.0, -2.0, 0.5, 4.0];
        let (q, s) = quantize_activations(&x, 2, 2, true);
        assert_eq!(s, vec![4.0 / 127.0; 2]);
        assert_eq!(q, vec![32, -64, 16, 127]);
        let (q, s) = quantize_activations(&x, 2, 2, false);
        assert_eq!(s, vec![2.0 / 127.0, 4.0 / 127.0]);
        assert_eq!(q, vec![64, -127, 16, 127]);
    }

    #[test]
    fn zero_input_row_gives_the_bias() {
        let layer =
            Int8DynamicLinear::new(dense(2, 3, 4), Some(vec![1.5, -0.5]), Int8DynamicOptions::default())
                .unwrap();
        let mut out = vec![9.0; 2];
        layer.forward(&[0.0; 3], 1, &mut out);
        assert_eq!(out, vec![1.5, -0.5]);
    }

    /// Values worked by hand from fbgemm's formula.
    #[test]
    fn torch_activation_params_follow_fbgemm() {
        // Range [-1, 3]: scale 4/127, zero point from the min side: 0 + 1/(4/127) = 31.75 → 32.
        let p = torch_activation_params(-1.0, 3.0);
        assert_eq!(p.scale, (4.0f64 / 127.0) as f32);
        assert_eq!(p.zero_point, 32);
        // All positive: the range is widened to contain 0, zero point 0.
        assert_eq!(torch_activation_params(0.5, 2.0).zero_point, 0);
        // All zero: scale 0 becomes 0.1.
        assert_eq!(torch_activation_params(0.0, 0.0), TorchActivationParams { scale: 0.1, zero_point: 0 });
        // A tiny range is raised to the 6.1e-5 floor.
        assert_eq!(torch_activation_params(0.0, 1e-6).scale, 6.1e-5);
    }

    /// The values torch 2.15 gives for this tensor (`MinMaxObserver(qint8,
    /// per_tensor_symmetric)` then `quantize_per_tensor`): the end of the range lands on
    /// 127.49999 (the f32 reciprocal of 1/127.5), so −1 becomes −127, not −128.
    #[test]
    fn torch_weights_use_127_5() {
        let (q, s) = torch_quantize_weight(&[-1.0, 0.5, 0.999]);
        assert_eq!(s, 1.0 / 127.5);
        assert_eq!(s.to_bits(), 0x3c00_8081, "{s:e}");
        assert_eq!(q, vec![-127, 64, 127]);
    }

    /// The registry test reloads the default options; the other two modes store
    /// different scale shapes.
    #[test]
    fn every_mode_reloads_bit_identically() {
        let modes = [
            (Int8DynamicOptions { torch_compat: true, ..Default::default() }, 1),
            (Int8DynamicOptions { per_tensor_activations: true, ..Default::default() }, 4),
        ];
        let x = SeededRng::new(8).normal_vec(3 * 6, 2.0);
        for (options, scale_count) in modes {
            let scheme = Int8DynamicScheme(options);
            let layer = scheme.quantize(dense(4, 6, 5), Some(vec![0.5; 4]), None).unwrap();
            let exported = layer.export("l");
            assert_eq!(exported[1].shape, vec![scale_count], "{options:?}");
            let source = Exported(exported);
            let reloaded = scheme.load("l", 4, 6, Some(vec![0.5; 4]), &source).unwrap();
            let (mut a, mut b) = (vec![0.0; 12], vec![1.0; 12]);
            layer.forward(&x, 3, &mut a);
            reloaded.forward(&x, 3, &mut b);
            assert_eq!(a, b, "{options:?}");
        }
    }

    /// Test double for [`StoredSource`] over exported tensors.
    struct Exported(Vec<StoredTensor>);

    impl StoredSource for Exported {
        fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
            let (_, bytes) = self.raw(name, shape)?;
            Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        }
        fn raw(&self, name: &str, shape: &[usize]) -> Result<(Dtype, Vec<u8>)> {
            let t = self.0.iter().find(|t| t.name == name).unwrap();
            assert_eq!(t.shape, shape);
            Ok((t.dtype, t.bytes.clone()))
        }
    }

    #[test]
    fn non_finite_weights_are_an_error() {
        let mut w = dense(2, 2, 6);
        w.data[3] = f32::NAN;
        let err = Int8DynamicLinear::new(w, None, Int8DynamicOptions::default()).err().unwrap().to_string();
        assert!(err.contains("non-finite") && err.contains("index 3"), "{err}");
    }
}
