//! The `int8-outlier` scheme: LLM.int8() (Dettmers et al. 2022) mixed-precision
//! decomposition, computed the way bitsandbytes' inference path does.
//!
//! Per forward call on `x[rows, cols]`:
//! - outlier columns: every input feature `c` with some `|x[i, c]| > threshold` (strictly
//!   greater; default 6.0), found by [`split_columns`];
//! - 16-bit part: those columns of `x` and of the weight, both rounded to f16 (or bf16 with
//!   `outlier_dtype: bf16`), multiplied and accumulated in f32;
//! - int8 part: `x` with the outlier columns set to zero, quantized per row (token) with
//!   `scale = row absmax / 127` over the remaining columns; the int8 weight (per output row,
//!   `scale = absmax / 127`) through [`super::kernels::int8_gemm`]; rescaled `acc · s_x · s_w`;
//! - `y = int8 part + bias + 16-bit part`.
//!
//! What is stored, and why: the int8 weight `[rows, cols]` and one f32 scale per output
//! row, nothing else. The weight is quantized once, per output row over *all* columns,
//! because the outlier columns are only known when an input arrives (they change from call
//! to call); re-quantizing the weight per call over the inlier columns would need the
//! full-precision weight kept beside it (16 or 32 more bits per weight) and a pass over the
//! whole weight on every call. The weight columns of the 16-bit part are the int8 values
//! dequantized (`q · s_w`, then rounded to f16/bf16). This is what bitsandbytes does at
//! inference (`Linear8bitLt` with `has_fp16_weights=False`, the `load_in_8bit` default):
//! it keeps `CB` (int8) and `SCB` (row absmax) and builds the outlier weight columns as
//! `CB[:, idx] · SCB / 127`. So the weight bytes of this scheme are its int8 values and
//! scales, and no tensor has the `OutlierColumns` role: the 16-bit outlier weights are
//! derived at run time, not stored. (The paper's training-time variant, which keeps the
//! fp16 weight, would store it under that role.)

use std::sync::Mutex;

use half::{bf16, f16};

use super::int8_dynamic::{load_i8_weight, quantize_activations, quantize_weight_rows, rescale};
use super::kernels::int8_gemm::{gemm_i8, kernel_name};
use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, ParamInfo, ParamKind, Scheme, SchemeInfo,
    SchemeParams, StoredSource, StoredTensor, TensorRole, WeightParts,
};
use crate::error::{Error, Result};

/// The scheme's name as spelled in suites.
const NAME: &str = "int8-outlier";

/// The threshold of the paper and of bitsandbytes' `llm_int8_threshold`.
const DEFAULT_THRESHOLD: f64 = 6.0;

/// The 16-bit type of the outlier product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutlierDtype {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl OutlierDtype {
    fn round(self, v: f32) -> f32 {
        match self {
            OutlierDtype::F16 => f16::from_f32(v).to_f32(),
            OutlierDtype::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }
}

/// The input columns (features) of `x` (`cols` per row) in which some `|x| > threshold`,
/// in increasing order.
pub fn split_columns(x: &[f32], cols: usize, threshold: f32) -> Vec<usize> {
    if cols == 0 {
        return Vec::new();
    }
    let mut outlier = vec![false; cols];
    for row in x.chunks_exact(cols) {
        for (flag, v) in outlier.iter_mut().zip(row) {
            *flag |= v.abs() > threshold;
        }
    }
    outlier.iter().enumerate().filter(|(_, &o)| o).map(|(c, _)| c).collect()
}

/// A linear layer computed with LLM.int8()'s decomposition.
pub struct Int8OutlierLinear {
    rows: usize,
    cols: usize,
    weight: Vec<i8>,
    scales: Vec<f32>,
    bias: Option<Vec<f32>>,
    threshold: f32,
    dtype: OutlierDtype,
    kernel: &'static str,
    /// Sum of the per-call outlier column fractions, and the number of calls.
    observed: Mutex<(f64, u64)>,
}

impl Int8OutlierLinear {
    fn new(
        rows: usize,
        cols: usize,
        weight: Vec<i8>,
        scales: Vec<f32>,
        bias: Option<Vec<f32>>,
        config: Config,
    ) -> Self {
        // The integer product's path (detected at run time) and the outlier product's type.
        let kernel = match (kernel_name(), config.dtype) {
            ("int8-avx2", OutlierDtype::F16) => "int8-avx2+f16-outliers",
            ("int8-avx2", OutlierDtype::Bf16) => "int8-avx2+bf16-outliers",
            (_, OutlierDtype::F16) => "int8-scalar+f16-outliers",
            (_, OutlierDtype::Bf16) => "int8-scalar+bf16-outliers",
        };
        let observed = Mutex::new((0.0, 0));
        Int8OutlierLinear {
            rows,
            cols,
            weight,
            scales,
            bias,
            threshold: config.threshold,
            dtype: config.dtype,
            kernel,
            observed,
        }
    }

    /// `out += x[:, outliers] · W[:, outliers]ᵀ` in 16-bit inputs, f32 accumulation.
    fn add_outlier_product(&self, x: &[f32], rows: usize, outliers: &[usize], out: &mut [f32]) {
        let n_o = outliers.len();
        let xo: Vec<f32> = x
            .chunks_exact(self.cols)
            .flat_map(|row| outliers.iter().map(move |&c| self.dtype.round(row[c])))
            .collect();
        let wo: Vec<f32> = (0..self.rows)
            .flat_map(|j| {
                let (row, s) = (&self.weight[j * self.cols..(j + 1) * self.cols], self.scales[j]);
                outliers.iter().map(move |&c| self.dtype.round(row[c] as f32 * s))
            })
            .collect();
        for (orow, xrow) in out.chunks_exact_mut(self.rows).zip(xo.chunks_exact(n_o)).take(rows) {
            for (o, wrow) in orow.iter_mut().zip(wo.chunks_exact(n_o)) {
                *o += xrow.iter().zip(wrow).map(|(a, b)| a * b).sum::<f32>();
            }
        }
    }

    fn record(&self, outliers: usize) {
        let fraction = if self.cols == 0 { 0.0 } else { outliers as f64 / self.cols as f64 };
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        observed.0 += fraction;
        observed.1 += 1;
    }
}

impl Linear for Int8OutlierLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let outliers = split_columns(x, self.cols, self.threshold);
        self.record(outliers.len());
        let (q, row_scales) = if outliers.is_empty() {
            quantize_activations(x, rows, self.cols, false)
        } else {
            let mut inliers = x.to_vec();
            for row in inliers.chunks_exact_mut(self.cols) {
                outliers.iter().for_each(|&c| row[c] = 0.0);
            }
            quantize_activations(&inliers, rows, self.cols, false)
        };
        // The zeroed outlier columns contribute nothing to the integer product, so it runs
        // over the whole weight without gathering the inlier columns.
        let mut acc = vec![0i32; rows * self.rows];
        gemm_i8(&q, rows, self.cols, &self.weight, self.rows, &mut acc);
        rescale(&acc, &row_scales, &self.scales, self.bias.as_deref(), false, out);
        if !outliers.is_empty() {
            self.add_outlier_product(x, rows, &outliers, out);
        }
    }

    fn kernel(&self) -> &'static str {
        self.kernel
    }

    fn parts(&self) -> LayerParts<'_> {
        let weights = WeightParts::Int8Outlier {
            weight: &self.weight,
            scales: &self.scales,
            threshold: self.threshold,
            dtype: self.dtype,
        };
        LayerParts { weights, bias: self.bias.as_deref() }
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        let mut out = vec![
            StoredTensor {
                name: format!("{name}.weight"),
                role: TensorRole::PackedWeights,
                dtype: safetensors::tensor::Dtype::I8,
                shape: vec![self.rows, self.cols],
                bytes: self.weight.iter().map(|&v| v as u8).collect(),
                represents: self.rows * self.cols,
            },
            StoredTensor::f32(format!("{name}.scale"), TensorRole::Scales, vec![self.rows], &self.scales),
        ];
        out.extend(super::bias_tensor(name, self.bias.as_deref()));
        out
    }

    fn stats(&self) -> Vec<(&'static str, f64)> {
        let (sum, calls) = *self.observed.lock().unwrap_or_else(|e| e.into_inner());
        if calls == 0 {
            return Vec::new();
        }
        vec![("outlier_column_fraction", sum / calls as f64)]
    }
}

/// The validated parameters.
#[derive(Debug, Clone, Copy)]
struct Config {
    threshold: f32,
    dtype: OutlierDtype,
}

struct Int8OutlierScheme(Config);

impl Scheme for Int8OutlierScheme {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        _: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        let (q, scales) = quantize_weight_rows(&weight)?;
        Ok(Box::new(Int8OutlierLinear::new(weight.rows, weight.cols, q, scales, bias, self.0)))
    }

    fn load(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
        source: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>> {
        let (q, scales) = load_i8_weight(NAME, name, rows, cols, rows, source)?;
        Ok(Box::new(Int8OutlierLinear::new(rows, cols, q, scales, bias, self.0)))
    }
}

fn config(params: &SchemeParams) -> Result<Config> {
    let threshold = params.number("threshold", DEFAULT_THRESHOLD);
    if !(threshold.is_finite() && threshold > 0.0) {
        return Err(Error::Scheme {
            scheme: NAME.to_string(),
            message: format!("parameter `threshold` is {threshold}, expected a positive finite number"),
        });
    }
    let dtype = match params.text("outlier_dtype").unwrap_or("f16") {
        "f16" => OutlierDtype::F16,
        "bf16" => OutlierDtype::Bf16,
        other => {
            return Err(Error::Scheme {
                scheme: NAME.to_string(),
                message: format!("parameter `outlier_dtype` is \"{other}\", expected \"f16\" or \"bf16\""),
            })
        }
    };
    Ok(Config { threshold: threshold as f32, dtype })
}

/// Build the configured scheme.
pub fn build(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    Ok(Box::new(Int8OutlierScheme(config(params)?)))
}

pub(super) const INT8_OUTLIER: SchemeInfo = SchemeInfo {
    name: NAME,
    summary:
        "LLM.int8(): int8 weights per output row (+ one f32 scale per row), int8 activations per token; \
              input columns holding a magnitude above the threshold go through a 16-bit product",
    bits_per_weight: 8.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
    params: &[
        ParamInfo {
            name: "threshold",
            kind: ParamKind::Number,
            default: "6.0",
            help: "input columns with some |x| above this go through the 16-bit product",
        },
        ParamInfo {
            name: "outlier_dtype",
            kind: ParamKind::Text,
            default: "f16",
            help: "16-bit type of the outlier product: f16 or bf16",
        },
    ],
    build,
};

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::scheme::int8_dynamic::{Int8DynamicLinear, Int8DynamicOptions};
    use crate::tensor::SeededRng;

    fn weight(rows: usize, cols: usize) -> DenseWeight {
        DenseWeight { name: "w".into(), rows, cols, data: SeededRng::new(21).normal_vec(rows * cols, 0.3) }
    }

    fn layer(rows: usize, cols: usize, threshold: f32, dtype: OutlierDtype) -> Int8OutlierLinear {
        let w = weight(rows, cols);
        let (q, s) = quantize_weight_rows(&w).unwrap();
        Int8OutlierLinear::new(rows, cols, q, s, Some(vec![0.1; rows]), Config { threshold, dtype })
    }

    #[test]
    fn split_columns_is_strictly_greater_than_the_threshold() {
        let x = [0.0, 6.0, -6.5, 1.0, /* row 2 */ 2.0, -6.0, 0.0, 6.01];
        assert_eq!(split_columns(&x, 4, 6.0), vec![2, 3]);
        assert_eq!(split_columns(&x, 4, 7.0), Vec::<usize>::new());
        assert_eq!(split_columns(&x, 4, 5.9), vec![1, 2, 3]);
    }

    /// With no value above the threshold, the layer is exactly `int8-dynamic` per token.
    #[test]
    fn input_without_outliers_equals_the_int8_computation() {
        let (rows, cols, n) = (3, 21, 6);
        let ours = layer(n, cols, 6.0, OutlierDtype::F16);
        let dynamic =
            Int8DynamicLinear::new(weight(n, cols), Some(vec![0.1; n]), Int8DynamicOptions::default())
                .unwrap();
        let x = SeededRng::new(22).normal_vec(rows * cols, 1.0);
        assert!(x.iter().all(|v| v.abs() <= 6.0));
        let (mut a, mut b) = (vec![0.0; rows * n], vec![0.0; rows * n]);
        ours.forward(&x, rows, &mut a);
        dynamic.forward(&x, rows, &mut b);
        assert_eq!(a, b);
        assert_eq!(ours.stats(), vec![("outlier_column_fraction", 0.0)]);
    }

    /// One planted outlier column: it and no other takes the 16-bit path, and the result
    /// is the int8 product of the other columns plus the f16 product of that one.
    #[test]
    fn a_planted_outlier_column_takes_the_16_bit_path() {
        let (rows, cols, n) = (2, 8, 3);
        let ours = layer(n, cols, 6.0, OutlierDtype::F16);
        let mut x = SeededRng::new(23).normal_vec(rows * cols, 1.0);
        x[cols + 5] = 40.123; // row 1, column 5
        x[2] = 6.0; // at the threshold: not an outlier
        assert_eq!(split_columns(&x, cols, 6.0), vec![5]);
        let mut out = vec![0.0; rows * n];
        ours.forward(&x, rows, &mut out);

        let mut inliers = x.clone();
        inliers[5] = 0.0;
        inliers[cols + 5] = 0.0;
        let (q, sx) = quantize_activations(&inliers, rows, cols, false);
        for i in 0..rows {
            // Row 0 holds no large value, but column 5 is an outlier for the whole batch.
            let x16 = f16::from_f32(x[i * cols + 5]).to_f32();
            for j in 0..n {
                let acc: i32 =
                    (0..cols).map(|c| q[i * cols + c] as i32 * ours.weight[j * cols + c] as i32).sum();
                let w16 = f16::from_f32(ours.weight[j * cols + 5] as f32 * ours.scales[j]).to_f32();
                let expected = acc as f32 * (sx[i] * ours.scales[j]) + 0.1 + x16 * w16;
                assert_eq!(out[i * n + j], expected, "({i}, {j})");
            }
        }
        // The outlier did not inflate row 1's int8 scale.
        assert!(sx[1] < 4.0 / 127.0, "{}", sx[1]);
        assert_eq!(ours.stats(), vec![("outlier_column_fraction", 1.0 / 8.0)]);
        // And the result is close to the float product.
        let reference = crate::tensor::matmul_nt_reference(&x, rows, cols, &weight(n, cols).data, n);
        for (o, r) in out.iter().zip(&reference) {
            assert!((o - 0.1 - r).abs() < 0.1, "{o} {r}");
        }
    }

    #[test]
    fn fraction_is_averaged_over_calls() {
        let ours = layer(2, 4, 1.0, OutlierDtype::Bf16);
        let mut out = vec![0.0; 2];
        ours.forward(&[5.0, 0.0, 0.0, 0.0], 1, &mut out);
        ours.forward(&[5.0, 5.0, 5.0, 0.0], 1, &mut out);
        assert_eq!(ours.stats(), vec![("outlier_column_fraction", 0.5)]);
        assert!(ours.kernel().ends_with("+bf16-outliers"));
    }

    #[test]
    fn bf16_rounds_the_outlier_product_to_bfloat16() {
        let (f, b) = (layer(1, 2, 1.0, OutlierDtype::F16), layer(1, 2, 1.0, OutlierDtype::Bf16));
        let x = [3.3333, 0.0];
        let (mut yf, mut yb) = (vec![0.0], vec![0.0]);
        f.forward(&x, 1, &mut yf);
        b.forward(&x, 1, &mut yb);
        let w = f.weight[0] as f32 * f.scales[0];
        assert_eq!(yf[0], 0.1 + f16::from_f32(3.3333).to_f32() * f16::from_f32(w).to_f32());
        assert_eq!(yb[0], 0.1 + bf16::from_f32(3.3333).to_f32() * bf16::from_f32(w).to_f32());
    }

    #[test]
    fn bad_parameters_name_the_parameter_and_the_value() {
        let mut raw = BTreeMap::new();
        raw.insert("threshold".to_string(), serde_json::json!(-1.0));
        let err = build(&SchemeParams(raw)).err().unwrap().to_string();
        assert!(err.contains("`threshold` is -1") && err.contains("positive"), "{err}");
        let mut raw = BTreeMap::new();
        raw.insert("outlier_dtype".to_string(), serde_json::json!("fp8"));
        let err = build(&SchemeParams(raw)).err().unwrap().to_string();
        assert!(err.contains("`outlier_dtype` is \"fp8\"") && err.contains("bf16"), "{err}");
    }
}
