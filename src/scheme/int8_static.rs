//! `int8-static`: static post-training quantization — int8 per-channel symmetric weights,
//! uint8 per-tensor affine activations whose parameters an observer fixes from
//! calibration inputs, and an integer u8×i8→i32 product with zero-point correction.
//!
//! The layer computes, for input row `x` and output `o`:
//!
//! ```text
//! qx[k]  = clamp(round(x[k] / s_x) + zp, 0, 255)               // the fixed input parameters
//! acc[o] = Σ_k qx[k]·w[o,k] − zp·Σ_k w[o,k]  = Σ_k (qx[k] − zp)·w[o,k]   (exact, i32)
//! y[o]   = acc[o] · (s_x · s_w[o]) + b[o]
//! ```
//!
//! with `Σ_k w[o,k]` precomputed per output row. The products are exact in i32 for up to
//! [`MAX_COLS`] inputs: `|qx − zp| ≤ 255`, `|w| ≤ 128`.

use safetensors::tensor::Dtype;

use super::kernels::int8_gemm::{gemm_i8, gemm_i8_reference};
use super::observer::{check_calibration, check_weight, AffineU8, ChannelInt8, Observer};
use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, ParamInfo, ParamKind, Scheme, SchemeInfo,
    SchemeParams, StoredSource, StoredTensor, TensorRole, WeightParts,
};
use crate::error::{Error, Result};

/// The widest layer whose i32 accumulators cannot overflow: `255 · 128 · k < 2³¹`.
pub const MAX_COLS: usize = 65536;

const NAME: &str = "int8-static";

/// The parameters `observer` and `percentile`, shared with `qat-sim`.
pub(super) const OBSERVER_PARAMS: [ParamInfo; 2] = [
    ParamInfo {
        name: "observer",
        kind: ParamKind::Text,
        default: "minmax",
        help: "activation range observer: minmax, moving-average, percentile or mse",
    },
    ParamInfo {
        name: "percentile",
        kind: ParamKind::Number,
        default: "99.99",
        help: "with observer percentile: clip the range at this percentile of |x|, in (0, 100]",
    },
];

/// Which integer dot product a layer runs, chosen once when it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DotKernel {
    /// Portable loop.
    Scalar,
    /// The shared AVX2 GEMM of [`super::kernels::int8_gemm`]: codes widened to i16, `vpmaddwd`
    /// into i32 (exact: a pair is at most 2·255·128), panels of packed weights for
    /// prefill.
    Avx2,
}

impl DotKernel {
    /// The fastest kernel this CPU runs.
    pub(super) fn detect() -> DotKernel {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            return DotKernel::Avx2;
        }
        DotKernel::Scalar
    }

    fn name(self) -> &'static str {
        match self {
            DotKernel::Scalar => "int8-scalar",
            DotKernel::Avx2 => "int8-avx2",
        }
    }
}

/// `Σ_k w[o,k]` for each output row: the zero-point correction term.
pub(super) fn row_sums(codes: &[i8], cols: usize) -> Vec<i32> {
    codes.chunks_exact(cols.max(1)).map(|row| row.iter().map(|&v| v as i32).sum()).collect()
}

/// The integer product with zero-point correction: `acc[r, o] = Σ_k qx[r,k]·w[o,k] −
/// zp·Σ_k w[o,k]` (`[m, n]`, exact). The one place the layer's integer arithmetic
/// happens, so a shared int8 GEMM can replace it.
fn zero_point_corrected_product(
    kernel: DotKernel,
    qx: &[u8],
    m: usize,
    k: usize,
    codes: &[i8],
    sums: &[i32],
    zp: i32,
) -> Vec<i32> {
    let n = sums.len();
    let mut acc = vec![0i32; m * n];
    if m == 0 || n == 0 {
        return acc;
    }
    match kernel {
        DotKernel::Scalar => gemm_i8_reference(qx, m, k, codes, n, &mut acc),
        DotKernel::Avx2 => gemm_i8(qx, m, k, codes, n, &mut acc),
    }
    for row in acc.chunks_exact_mut(n) {
        for (v, &s) in row.iter_mut().zip(sums) {
            *v = v.wrapping_sub(zp.wrapping_mul(s));
        }
    }
    acc
}

/// Calibrated int8 weights plus fixed uint8 input parameters: what `int8-static` and
/// `qat-sim` store.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CalibratedInt8 {
    /// Per-channel symmetric weights.
    pub weights: ChannelInt8,
    /// The input's uint8 parameters.
    pub input: AffineU8,
}

impl CalibratedInt8 {
    /// `{name}.weight` (I8), `{name}.scale` (F32 per row), `{name}.input_scale` (F32)
    /// and `{name}.input_zero_point` (U8).
    pub fn export(&self, name: &str, rows: usize, cols: usize) -> Vec<StoredTensor> {
        let weight = StoredTensor {
            name: format!("{name}.weight"),
            role: TensorRole::PackedWeights,
            dtype: Dtype::I8,
            shape: vec![rows, cols],
            bytes: self.weights.codes.iter().map(|&v| v as u8).collect(),
            represents: rows * cols,
        };
        let zero_point = StoredTensor {
            name: format!("{name}.input_zero_point"),
            role: TensorRole::ZeroPoints,
            dtype: Dtype::U8,
            shape: vec![1],
            bytes: vec![self.input.zero_point as u8],
            represents: 0,
        };
        vec![
            weight,
            StoredTensor::f32(format!("{name}.scale"), TensorRole::Scales, vec![rows], &self.weights.scales),
            StoredTensor::f32(
                format!("{name}.input_scale"),
                TensorRole::Scales,
                vec![1],
                &[self.input.scale],
            ),
            zero_point,
        ]
    }

    /// Read back what [`CalibratedInt8::export`] wrote.
    pub fn load(name: &str, rows: usize, cols: usize, source: &dyn StoredSource) -> Result<CalibratedInt8> {
        let codes = raw_of(source, &format!("{name}.weight"), &[rows, cols], Dtype::I8)?;
        let scales = source.f32(&format!("{name}.scale"), &[rows])?;
        let input_scale = source.f32(&format!("{name}.input_scale"), &[1])?[0];
        let zero_point = raw_of(source, &format!("{name}.input_zero_point"), &[1], Dtype::U8)?[0];
        Ok(CalibratedInt8 {
            weights: ChannelInt8 { codes: codes.into_iter().map(|b| b as i8).collect(), scales },
            input: AffineU8 { scale: input_scale, zero_point: zero_point as i32 },
        })
    }
}

/// The bytes of `name`, which must have dtype `dtype`.
fn raw_of(source: &dyn StoredSource, name: &str, shape: &[usize], dtype: Dtype) -> Result<Vec<u8>> {
    let (found, bytes) = source.raw(name, shape)?;
    if found != dtype {
        return Err(Error::Tensor {
            name: name.to_string(),
            message: format!("dtype {found:?}, expected {dtype:?}"),
        });
    }
    Ok(bytes)
}

/// A statically quantized linear layer.
pub struct StaticInt8Linear {
    rows: usize,
    cols: usize,
    params: CalibratedInt8,
    sums: Vec<i32>,
    /// `s_x · s_w[o]`, computed once so the quantized and the reloaded layer agree.
    out_scales: Vec<f32>,
    bias: Option<Vec<f32>>,
    kernel: DotKernel,
}

impl StaticInt8Linear {
    fn new(
        rows: usize,
        cols: usize,
        params: CalibratedInt8,
        bias: Option<Vec<f32>>,
        kernel: DotKernel,
    ) -> Self {
        let sums = row_sums(&params.weights.codes, cols);
        let out_scales = params.weights.scales.iter().map(|&s| params.input.scale * s).collect();
        StaticInt8Linear { rows, cols, params, sums, out_scales, bias, kernel }
    }

    /// The corrected i32 accumulators `[m, rows]` of input `x` (`[m, cols]`).
    fn accumulators(&self, x: &[f32], m: usize) -> Vec<i32> {
        let qx: Vec<u8> = x.iter().map(|&v| self.params.input.quantize(v)).collect();
        let zp = self.params.input.zero_point;
        zero_point_corrected_product(
            self.kernel,
            &qx,
            m,
            self.cols,
            &self.params.weights.codes,
            &self.sums,
            zp,
        )
    }
}

impl Linear for StaticInt8Linear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let acc = self.accumulators(x, rows);
        for (y_row, acc_row) in out.chunks_exact_mut(self.rows).zip(acc.chunks_exact(self.rows)) {
            for (o, (y, &a)) in y_row.iter_mut().zip(acc_row).enumerate() {
                *y = a as f32 * self.out_scales[o] + self.bias.as_ref().map_or(0.0, |b| b[o]);
            }
        }
    }

    fn kernel(&self) -> &'static str {
        self.kernel.name()
    }

    fn parts(&self) -> LayerParts<'_> {
        let weights = WeightParts::Int8Static {
            weight: &self.params.weights.codes,
            row_sums: &self.sums,
            out_scales: &self.out_scales,
            input: self.params.input,
        };
        LayerParts { weights, bias: self.bias.as_deref() }
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        let mut out = self.params.export(name, self.rows, self.cols);
        out.extend(super::bias_tensor(name, self.bias.as_deref()));
        out
    }
}

/// The error of a calibrated scheme handed no calibration inputs.
pub(super) fn missing_calibration(scheme: &str, layer: &str) -> Error {
    Error::Scheme {
        scheme: scheme.to_string(),
        message: format!(
            "layer `{layer}` got no calibration inputs, expected the inputs it saw on calibration text"
        ),
    }
}

/// Checks every calibrated scheme makes before quantizing a layer, and the calibration.
pub(super) fn checked_calibration<'a>(
    scheme: &str,
    weight: &DenseWeight,
    calibration: Option<Calibration<'a>>,
) -> Result<Calibration<'a>> {
    let calibration = calibration.ok_or_else(|| missing_calibration(scheme, &weight.name))?;
    if weight.cols > MAX_COLS {
        return Err(Error::Scheme {
            scheme: scheme.to_string(),
            message: format!(
                "weight `{}` has {} inputs, expected at most {MAX_COLS}",
                weight.name, weight.cols
            ),
        });
    }
    check_weight(scheme, &weight.name, &weight.data)?;
    check_calibration(scheme, &weight.name, calibration.inputs, calibration.rows, weight.cols)?;
    Ok(calibration)
}

struct StaticScheme {
    observer: Observer,
}

impl Scheme for StaticScheme {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        calibration: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        let calibration = checked_calibration(NAME, &weight, calibration)?;
        let params = CalibratedInt8 {
            weights: ChannelInt8::quantize(&weight.data, weight.cols),
            input: self.observer.qparams(calibration.inputs, weight.cols),
        };
        Ok(Box::new(StaticInt8Linear::new(weight.rows, weight.cols, params, bias, DotKernel::detect())))
    }

    fn load(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
        source: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>> {
        let params = CalibratedInt8::load(name, rows, cols, source)?;
        Ok(Box::new(StaticInt8Linear::new(rows, cols, params, bias, DotKernel::detect())))
    }
}

fn build(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    Ok(Box::new(StaticScheme { observer: Observer::from_params(NAME, params)? }))
}

pub(super) const INT8_STATIC: SchemeInfo = SchemeInfo {
    name: NAME,
    summary: "static PTQ: int8 per-channel symmetric weights, uint8 per-tensor affine activations fixed by calibration, u8×i8→i32 GEMM",
    bits_per_weight: 8.0,
    block_size: None,
    needs_calibration: true,
    devices: DeviceSupport::CpuAndCuda,
    params: &OBSERVER_PARAMS,
    build,
};

#[cfg(test)]
pub(super) mod tests {
    use super::super::observer::DEFAULT_PERCENTILE;
    use super::*;
    use crate::tensor::SeededRng;

    fn layer(
        weight: &[f32],
        rows: usize,
        cols: usize,
        calib: &[f32],
        observer: Observer,
    ) -> StaticInt8Linear {
        let params = CalibratedInt8 {
            weights: ChannelInt8::quantize(weight, cols),
            input: observer.qparams(calib, cols),
        };
        StaticInt8Linear::new(rows, cols, params, None, DotKernel::detect())
    }

    #[test]
    fn documented_defaults_are_the_ones_used() {
        assert_eq!(OBSERVER_PARAMS[0].default, "minmax");
        assert_eq!(OBSERVER_PARAMS[1].default.parse::<f64>().unwrap(), DEFAULT_PERCENTILE);
        let none = SchemeParams::default();
        assert_eq!(Observer::from_params(NAME, &none).unwrap(), Observer::MinMax);
    }

    #[test]
    fn hand_example_with_known_parameters() {
        // Weights row 0 = [1.27, −0.635]: scale 0.01, codes [127, −64] (−63.5 → −64, even).
        // Row 1 = [0, 0]: scale 1, codes [0, 0].
        // Calibration range [−1, 3]: s_x = 4/255, zp = 64.
        let w = [1.27, -0.635, 0.0, 0.0];
        let l = layer(&w, 2, 2, &[-1.0, 3.0], Observer::MinMax);
        assert_eq!(l.params.weights.codes, vec![127, -64, 0, 0]);
        assert_eq!(l.params.input, AffineU8 { scale: 4.0 / 255.0, zero_point: 64 });
        assert_eq!(l.sums, vec![63, 0]);
        // x = [0, 1]: qx = [64, round(63.75) + 64 = 128]; acc = 64·127 + 128·(−64) = −64;
        // corrected: −64 − 64·63 = −4096 = Σ (qx − zp)·w = 0·127 + 64·(−64).
        assert_eq!(l.accumulators(&[0.0, 1.0], 1), vec![-4096, 0]);
        let mut y = [0.0; 2];
        l.forward(&[0.0, 1.0], 1, &mut y);
        assert_eq!(y, [-4096.0 * ((4.0f32 / 255.0) * 0.01), 0.0]);
        assert!((y[0] - -0.635).abs() < 0.01, "{}", y[0]);
    }

    #[test]
    fn output_is_within_the_quantization_error_bound_of_the_float_product() {
        let (m, k, n) = (5, 37, 9);
        let x = SeededRng::new(1).normal_vec(m * k, 1.0);
        let w = SeededRng::new(2).normal_vec(n * k, 0.3);
        // Calibrated on x itself: every input is inside the range.
        let l = layer(&w, n, k, &x, Observer::MinMax);
        let mut y = vec![0.0; m * n];
        l.forward(&x, m, &mut y);
        let exact = crate::tensor::matmul_nt_reference(&x, m, k, &w, n);
        let sx = l.params.input.scale;
        for r in 0..m {
            for o in 0..n {
                let sw = l.params.weights.scales[o];
                // |xw − x̂ŵ| ≤ Σ |x|·|Δw| + |w|·|Δx| + |Δx|·|Δw| with |Δw| ≤ sw/2, |Δx| ≤ sx/2.
                let bound: f32 = (0..k)
                    .map(|j| x[r * k + j].abs() * sw / 2.0 + w[o * k + j].abs() * sx / 2.0 + sx * sw / 4.0)
                    .sum();
                let err = (y[r * n + o] - exact[r * n + o]).abs();
                assert!(err <= bound * 1.001 + 1e-5, "({r},{o}): {err} > {bound}");
            }
        }
    }

    /// `Σ_k (qx − zp)·w` evaluated in f64 (exact for these sizes).
    fn reference(qx: &[u8], m: usize, k: usize, codes: &[i8], n: usize, zp: i32) -> Vec<i32> {
        let mut out = vec![0; m * n];
        for r in 0..m {
            for o in 0..n {
                let s: f64 =
                    (0..k).map(|j| (qx[r * k + j] as f64 - zp as f64) * codes[o * k + j] as f64).sum();
                out[r * n + o] = s as i32;
            }
        }
        out
    }

    #[test]
    fn zero_point_correction_is_exact_for_every_kernel() {
        let mut rng = SeededRng::new(9);
        let kernels = [DotKernel::Scalar, DotKernel::detect()];
        for &(m, k, n) in
            &[(1, 1, 1), (3, 15, 7), (2, 16, 5), (4, 33, 17), (7, 100, 3), (1, 517, 40), (64, 64, 70)]
        {
            let qx: Vec<u8> = (0..m * k).map(|_| (rng.next_u64() % 256) as u8).collect();
            let codes: Vec<i8> = (0..n * k).map(|_| (rng.next_u64() % 256) as u8 as i8).collect();
            let zp = (rng.next_u64() % 256) as i32;
            let want = reference(&qx, m, k, &codes, n, zp);
            for kernel in kernels {
                let got = zero_point_corrected_product(kernel, &qx, m, k, &codes, &row_sums(&codes, k), zp);
                assert_eq!(got, want, "{kernel:?} m={m} k={k} n={n}");
            }
        }
        // Extremes: every product at its largest magnitude.
        let k = 1000;
        let (qx, codes) = (vec![255u8; k], vec![-128i8; k]);
        for kernel in kernels {
            let got = zero_point_corrected_product(kernel, &qx, 1, k, &codes, &row_sums(&codes, k), 0);
            assert_eq!(got, vec![-255 * 128 * k as i32], "{kernel:?}");
        }
    }

    #[test]
    fn large_products_run_in_parallel_and_agree_with_serial_blocks() {
        let (m, k, n) = (33, 300, 70); // above SERIAL_MACS
        let mut rng = SeededRng::new(21);
        let qx: Vec<u8> = (0..m * k).map(|_| (rng.next_u64() % 256) as u8).collect();
        let codes: Vec<i8> = (0..n * k).map(|_| (rng.next_u64() % 256) as u8 as i8).collect();
        let got =
            zero_point_corrected_product(DotKernel::detect(), &qx, m, k, &codes, &row_sums(&codes, k), 77);
        assert_eq!(got, reference(&qx, m, k, &codes, n, 77));
    }

    #[test]
    fn calibration_is_required_and_checked() {
        let scheme = build(&SchemeParams::default()).unwrap();
        let weight = DenseWeight { name: "l.w".into(), rows: 2, cols: 3, data: vec![0.1; 6] };
        let err = scheme.quantize(weight.clone(), None, None).err().unwrap().to_string();
        assert!(
            err.contains("int8-static") && err.contains("`l.w`") && err.contains("no calibration"),
            "{err}"
        );
        let calibration = Some(Calibration { inputs: &[1.0; 5], rows: 2 });
        let err = scheme.quantize(weight.clone(), None, calibration).err().unwrap().to_string();
        assert!(err.contains("hold 5 values for 2 rows"), "{err}");
        let calibration = Some(Calibration { inputs: &[1.0, f32::NAN, 0.0], rows: 1 });
        let err = scheme.quantize(weight, None, calibration).err().unwrap().to_string();
        assert!(err.contains("NaN") && err.contains("finite"), "{err}");
    }

    #[test]
    fn every_observer_reloads_bit_identically() {
        let w =
            DenseWeight { name: "w".into(), rows: 6, cols: 11, data: SeededRng::new(3).normal_vec(66, 1.0) };
        let calib = SeededRng::new(4).normal_vec(40 * 11, 2.0);
        let x = SeededRng::new(5).normal_vec(3 * 11, 3.0); // partly outside the range
        for observer in ["minmax", "moving-average", "percentile", "mse"] {
            let mut raw = std::collections::BTreeMap::new();
            raw.insert("observer".to_string(), serde_json::json!(observer));
            let scheme = build(&SchemeParams(raw)).unwrap();
            let layer = scheme
                .quantize(w.clone(), Some(vec![0.25; 6]), Some(Calibration { inputs: &calib, rows: 40 }))
                .unwrap();
            let stored = layer.export("l");
            let source = TestSource(stored.iter().map(|t| (t.name.clone(), t.clone())).collect());
            let reloaded = scheme.load("l", 6, 11, Some(vec![0.25; 6]), &source).unwrap();
            let (mut a, mut b) = (vec![0.0; 18], vec![0.0; 18]);
            layer.forward(&x, 3, &mut a);
            reloaded.forward(&x, 3, &mut b);
            assert_eq!(a, b, "{observer}");
            assert_eq!(stored.iter().map(|t| t.represents).sum::<usize>(), 66);
        }
    }

    /// Exported tensors read back by name.
    pub(in crate::scheme) struct TestSource(pub std::collections::BTreeMap<String, StoredTensor>);

    impl StoredSource for TestSource {
        fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
            let (dtype, bytes) = self.raw(name, shape)?;
            assert_eq!(dtype, Dtype::F32);
            Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        fn raw(&self, name: &str, shape: &[usize]) -> Result<(Dtype, Vec<u8>)> {
            let t = &self.0[name];
            assert_eq!(t.shape, shape, "{name}");
            Ok((t.dtype, t.bytes.clone()))
        }
    }
}
