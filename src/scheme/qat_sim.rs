//! `qat-sim`: quantization-aware numerics simulated in f32 — fake-quantized (quantize →
//! dequantize) int8 per-channel weights and uint8 per-tensor activations, with optional
//! layer-wise learned-step-size tuning (LSQ) of the scales on the calibration inputs.
//!
//! Forward: `y = fq_x(x) · fq_w(W)ᵀ + b` in f32, where `fq_w` rounds each weight row to
//! int8 codes under its scale (`clamp(round(w/s), −128, 127)·s`) and `fq_x` rounds the
//! input to uint8 codes under the observer's `(s_x, zp)` (`(clamp(round(x/s_x) + zp, 0,
//! 255) − zp)·s_x`).
//!
//! Tuning (`steps > 0`) minimises the MSE between the layer's float output `x·Wᵀ + b`
//! and its fake-quantized output over all calibration rows (full batch), by Adam on the
//! per-channel weight scales and the activation scale; the weights themselves and the
//! activation zero point stay fixed. See [`lsq_scale_grad`] for the gradient.

use super::int8_static::{checked_calibration, CalibratedInt8, OBSERVER_PARAMS};
use super::observer::{AffineU8, ChannelInt8, Observer, I8_MAX, I8_MIN, U8_MAX, U8_MIN};
use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, ParamInfo, ParamKind, Scheme, SchemeInfo,
    SchemeParams, StoredSource, StoredTensor, WeightParts,
};
use crate::error::{Error, Result};
use crate::tensor::matmul_nt;

const NAME: &str = "qat-sim";

/// Default number of LSQ tuning steps (0: plain fake quantization).
pub const DEFAULT_STEPS: u64 = 0;
/// Default Adam learning rate, the source article's.
pub const DEFAULT_LR: f64 = 0.01;
/// Adam's moment decay rates and epsilon (torch's defaults).
const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;

const PARAMS: [ParamInfo; 4] = [
    OBSERVER_PARAMS[0],
    OBSERVER_PARAMS[1],
    ParamInfo {
        name: "steps",
        kind: ParamKind::Integer,
        default: "0",
        help: "Adam steps of layer-wise LSQ tuning of the weight and activation scales on the calibration inputs",
    },
    ParamInfo {
        name: "lr",
        kind: ParamKind::Number,
        default: "0.01",
        help: "Adam learning rate of the tuning, applied to log-scales (0.01 ≈ 1% per step)",
    },
];

/// LSQ's straight-through gradient (Esser et al. 2020, eq. 3) of the fake-quantized value
/// `v̂ = s · clamp(round(v/s), qn, qp)` with respect to the step size `s`:
///
/// ```text
/// ∂v̂/∂s = round(v/s) − v/s   if qn < v/s < qp   (∂round(u)/∂u taken as 1: v̂ ≈ s·round(v/s),
///                                               d/ds = round(v/s) + s·(−v/s²))
///        = qn                 if v/s ≤ qn        (v̂ = s·qn)
///        = qp                 if v/s ≥ qp        (v̂ = s·qp)
/// ```
///
/// Weights use `qn = −128, qp = 127`. The affine activation
/// `x̂ = s·(clamp(round(x/s) + zp, 0, 255) − zp) = s·clamp(round(x/s), −zp, 255 − zp)`
/// is the same form with `qn = −zp, qp = 255 − zp` (the zero point is held fixed).
pub fn lsq_scale_grad(v: f32, s: f32, qn: f32, qp: f32) -> f32 {
    let u = v / s;
    if u <= qn {
        qn
    } else if u >= qp {
        qp
    } else {
        u.round_ties_even() - u
    }
}

/// A layer computing in f32 on fake-quantized weights and inputs.
pub struct QatLinear {
    rows: usize,
    cols: usize,
    params: CalibratedInt8,
    /// `code · scale`, the weights the f32 GEMM multiplies.
    fake_weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// Calibration NMSE before and after tuning (absent on a reloaded layer).
    nmse: Option<(f64, f64)>,
}

impl QatLinear {
    fn new(rows: usize, cols: usize, params: CalibratedInt8, bias: Option<Vec<f32>>) -> Self {
        let fake_weight = params.weights.dequantize(cols);
        QatLinear { rows, cols, params, fake_weight, bias, nmse: None }
    }
}

impl Linear for QatLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let fake_x: Vec<f32> = x.iter().map(|&v| self.params.input.fake(v)).collect();
        matmul_nt(&fake_x, rows, self.cols, &self.fake_weight, self.rows, out);
        super::add_bias(out, self.bias.as_deref());
    }

    fn kernel(&self) -> &'static str {
        "fake-quant/f32-gemm"
    }

    fn parts(&self) -> LayerParts<'_> {
        let weights = WeightParts::FakeQuant { weight: &self.fake_weight, input: self.params.input };
        LayerParts { weights, bias: self.bias.as_deref() }
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        let mut out = self.params.export(name, self.rows, self.cols);
        out.extend(super::bias_tensor(name, self.bias.as_deref()));
        out
    }

    fn stats(&self) -> Vec<(&'static str, f64)> {
        match self.nmse {
            Some((before, after)) => vec![("nmse_before", before), ("nmse_after", after)],
            None => Vec::new(),
        }
    }
}

/// `[rows, cols]` row-major → `[cols, rows]`.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; a.len()];
    for (r, row) in a.chunks_exact(cols.max(1)).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// The layer-wise tuning problem: one layer's float weights, its calibration inputs and
/// the float outputs the fake-quantized layer should reproduce.
struct Tuning<'a> {
    weight: &'a [f32],
    /// Output features.
    n: usize,
    /// Input features.
    k: usize,
    x: &'a [f32],
    /// Calibration rows.
    m: usize,
    bias: Option<&'a [f32]>,
    /// `x·Wᵀ + b` in f32.
    target: Vec<f32>,
    /// Mean square of the target: the NMSE's denominator.
    target_power: f64,
}

/// The fake-quantized operands of one evaluation.
struct FakeOperands {
    x: Vec<f32>,
    w: Vec<f32>,
}

impl<'a> Tuning<'a> {
    fn new(weight: &'a [f32], n: usize, k: usize, x: &'a [f32], m: usize, bias: Option<&'a [f32]>) -> Self {
        let mut target = vec![0.0; m * n];
        matmul_nt(x, m, k, weight, n, &mut target);
        super::add_bias(&mut target, bias);
        let target_power = mean_square(&target);
        Tuning { weight, n, k, x, m, bias, target, target_power }
    }

    fn operands(&self, w_scales: &[f32], input: &AffineU8) -> FakeOperands {
        let w = ChannelInt8::with_scales(self.weight, self.k, w_scales.to_vec()).dequantize(self.k);
        let x = self.x.iter().map(|&v| input.fake(v)).collect();
        FakeOperands { x, w }
    }

    /// The fake-quantized layer's output on the calibration inputs.
    fn output(&self, ops: &FakeOperands) -> Vec<f32> {
        let mut y = vec![0.0; self.m * self.n];
        matmul_nt(&ops.x, self.m, self.k, &ops.w, self.n, &mut y);
        super::add_bias(&mut y, self.bias);
        y
    }

    /// Output MSE relative to the output's mean square (plain MSE for an all-zero output).
    fn nmse(&self, mse: f64) -> f64 {
        if self.target_power > 0.0 {
            mse / self.target_power
        } else {
            mse
        }
    }

    /// The NMSE of the given scales.
    fn evaluate(&self, w_scales: &[f32], input: &AffineU8) -> f64 {
        let y = self.output(&self.operands(w_scales, input));
        self.nmse(mse_and_output_grad(&y, &self.target).0)
    }

    /// The NMSE at the given scales and the MSE's LSQ gradients with respect to each
    /// weight scale and the activation scale.
    fn gradients(&self, w_scales: &[f32], input: &AffineU8) -> (f64, Vec<f32>, f32) {
        let ops = self.operands(w_scales, input);
        let y = self.output(&ops);
        let (mse, g_out) = mse_and_output_grad(&y, &self.target);
        let (g_w, g_x) = operand_grads(&ops, &g_out, self.m, self.k, self.n);
        let (qn_w, qp_w) = (I8_MIN as f32, I8_MAX as f32);
        let d_w_scales = g_w
            .chunks_exact(self.k)
            .zip(self.weight.chunks_exact(self.k))
            .zip(w_scales)
            .map(|((g, w), &s)| g.iter().zip(w).map(|(&g, &w)| g * lsq_scale_grad(w, s, qn_w, qp_w)).sum())
            .collect();
        let zp = input.zero_point as f32;
        let (qn_x, qp_x) = (U8_MIN as f32 - zp, U8_MAX as f32 - zp);
        let d_x_scale = g_x
            .iter()
            .zip(self.x)
            .map(|(&g, &x)| (g * lsq_scale_grad(x, input.scale, qn_x, qp_x)) as f64)
            .sum::<f64>();
        (self.nmse(mse), d_w_scales, d_x_scale as f32)
    }
}

fn mean_square(v: &[f32]) -> f64 {
    v.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() / v.len().max(1) as f64
}

/// `mean((y − t)²)` and its gradient with respect to `y`, `2(y − t)/len`.
fn mse_and_output_grad(y: &[f32], target: &[f32]) -> (f64, Vec<f32>) {
    let len = y.len().max(1);
    let diff: Vec<f32> = y.iter().zip(target).map(|(a, b)| a - b).collect();
    let grad = diff.iter().map(|d| 2.0 * d / len as f32).collect();
    (mean_square(&diff), grad)
}

/// Back through `y = x̂·Ŵᵀ`: `∂L/∂Ŵ = Gᵀ·x̂` (`[n, k]`) and `∂L/∂x̂ = G·Ŵ` (`[m, k]`), for
/// `G = ∂L/∂y` (`[m, n]`).
fn operand_grads(ops: &FakeOperands, g_out: &[f32], m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut g_w = vec![0.0; n * k];
    matmul_nt(&transpose(g_out, m, n), n, m, &transpose(&ops.x, m, k), k, &mut g_w);
    let mut g_x = vec![0.0; m * k];
    matmul_nt(g_out, m, n, &transpose(&ops.w, n, k), k, &mut g_x);
    (g_w, g_x)
}

/// Adam over log-scales: a step of `lr` is a relative change of about `lr` (the scales of
/// a layer span orders of magnitude, and stay positive).
struct Adam {
    lr: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Adam {
    fn new(lr: f64, len: usize) -> Self {
        Adam { lr, m: vec![0.0; len], v: vec![0.0; len], t: 0 }
    }

    /// Update `scales` given `∂L/∂s` (turned into `∂L/∂log s = s·∂L/∂s`).
    fn step(&mut self, scales: &mut [f32], grads: &[f32]) {
        self.t += 1;
        let (b1, b2) = ADAM_BETAS;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (i, (s, &g)) in scales.iter_mut().zip(grads).enumerate() {
            let g = *s as f64 * g as f64;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let update = self.lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + ADAM_EPS);
            *s = ((*s as f64).ln() - update).exp() as f32;
        }
    }
}

/// Tuned scales and the calibration NMSE before and after.
struct Tuned {
    w_scales: Vec<f32>,
    input: AffineU8,
    nmse_before: f64,
    nmse_after: f64,
}

/// `steps` Adam steps from the observer's scales. Keeps the best scales seen (the initial
/// ones included), so tuning never leaves the calibration error worse than it found it.
fn tune(problem: &Tuning, w_scales: Vec<f32>, input: AffineU8, steps: usize, lr: f64) -> Tuned {
    let n = w_scales.len();
    let mut adam = Adam::new(lr, n + 1);
    // The activation scale rides as the last parameter.
    let mut params: Vec<f32> = w_scales.iter().copied().chain([input.scale]).collect();
    let with_scale = |s: f32| AffineU8 { scale: s, ..input };
    let mut nmse_before = None;
    let mut best = (f64::INFINITY, params.clone());
    for _ in 0..steps {
        let (nmse, mut grads, d_x_scale) = problem.gradients(&params[..n], &with_scale(params[n]));
        nmse_before.get_or_insert(nmse);
        if nmse < best.0 {
            best = (nmse, params.clone());
        }
        grads.push(d_x_scale);
        adam.step(&mut params, &grads);
    }
    let last = problem.evaluate(&params[..n], &with_scale(params[n]));
    let nmse_before = nmse_before.unwrap_or(last);
    if last < best.0 {
        best = (last, params);
    }
    let (nmse_after, mut scales) = best;
    let input = with_scale(scales.pop().expect("the activation scale is the last parameter"));
    Tuned { w_scales: scales, input, nmse_before, nmse_after }
}

struct QatScheme {
    observer: Observer,
    steps: usize,
    lr: f64,
}

impl Scheme for QatScheme {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        calibration: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        let calibration = checked_calibration(NAME, &weight, calibration)?;
        let (n, k) = (weight.rows, weight.cols);
        let initial = ChannelInt8::quantize(&weight.data, k);
        let input = self.observer.qparams(calibration.inputs, k);
        let problem = Tuning::new(&weight.data, n, k, calibration.inputs, calibration.rows, bias.as_deref());
        let tuned = tune(&problem, initial.scales, input, self.steps, self.lr);
        let params = CalibratedInt8 {
            weights: ChannelInt8::with_scales(&weight.data, k, tuned.w_scales),
            input: tuned.input,
        };
        let mut layer = QatLinear::new(n, k, params, bias);
        layer.nmse = Some((tuned.nmse_before, tuned.nmse_after));
        Ok(Box::new(layer))
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
        Ok(Box::new(QatLinear::new(rows, cols, params, bias)))
    }
}

fn build(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    let observer = Observer::from_params(NAME, params)?;
    let lr = params.number("lr", DEFAULT_LR);
    if !(lr.is_finite() && lr > 0.0) {
        return Err(Error::Scheme {
            scheme: NAME.to_string(),
            message: format!("parameter `lr` is {lr}, expected a positive number"),
        });
    }
    let steps = params.integer("steps", DEFAULT_STEPS) as usize;
    Ok(Box::new(QatScheme { observer, steps, lr }))
}

pub(super) const QAT_SIM: SchemeInfo = SchemeInfo {
    name: NAME,
    summary: "QAT numerics in f32: fake-quantized int8 per-channel weights and calibrated uint8 activations; optional LSQ tuning of the scales",
    bits_per_weight: 8.0,
    block_size: None,
    needs_calibration: true,
    devices: DeviceSupport::CpuAndCuda,
    params: &PARAMS,
    build,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    fn scheme(pairs: &[(&str, serde_json::Value)]) -> Box<dyn Scheme> {
        build(&SchemeParams(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())).unwrap()
    }

    fn stats(layer: &dyn Linear) -> (f64, f64) {
        let s = layer.stats();
        assert_eq!(s[0].0, "nmse_before");
        assert_eq!(s[1].0, "nmse_after");
        (s[0].1, s[1].1)
    }

    #[test]
    fn documented_defaults_are_the_ones_used() {
        assert_eq!(PARAMS[2].default.parse::<u64>().unwrap(), DEFAULT_STEPS);
        assert_eq!(PARAMS[3].default.parse::<f64>().unwrap(), DEFAULT_LR);
        let err = build(&SchemeParams([("lr".to_string(), serde_json::json!(0))].into())).err().unwrap();
        assert!(err.to_string().contains("parameter `lr` is 0, expected a positive number"), "{err}");
    }

    #[test]
    fn steps_zero_is_plain_fake_quantization() {
        let (m, k, n) = (4, 13, 6);
        let w = SeededRng::new(1).normal_vec(n * k, 0.5);
        let calib = SeededRng::new(2).normal_vec(20 * k, 1.0);
        let x = SeededRng::new(3).normal_vec(m * k, 1.5);
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
        let weight = DenseWeight { name: "w".into(), rows: n, cols: k, data: w.clone() };
        let layer = scheme(&[])
            .quantize(weight, Some(bias.clone()), Some(Calibration { inputs: &calib, rows: 20 }))
            .unwrap();
        let mut got = vec![0.0; m * n];
        layer.forward(&x, m, &mut got);

        // By hand: per-row absmax/127 weight codes, min-max uint8 input parameters.
        let input = AffineU8::from_range(
            calib.iter().copied().fold(f32::INFINITY, f32::min),
            calib.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        );
        let mut fw = Vec::new();
        for row in w.chunks_exact(k) {
            let s = row.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
            fw.extend(row.iter().map(|&v| (v / s).round_ties_even().clamp(-128.0, 127.0) * s));
        }
        let fx: Vec<f32> =
            x.iter().map(|&v| (input.quantize(v) as i32 - input.zero_point) as f32 * input.scale).collect();
        let mut want = vec![0.0; m * n];
        matmul_nt(&fx, m, k, &fw, n, &mut want);
        want.chunks_exact_mut(n).for_each(|r| crate::tensor::add_in_place(r, &bias));
        assert_eq!(got, want);
        let (before, after) = stats(layer.as_ref());
        assert_eq!(before, after);
        assert!(before > 0.0 && before < 1e-3, "{before}");
    }

    #[test]
    fn tuning_repairs_a_badly_chosen_range() {
        let (k, n, rows) = (24, 8, 64);
        let w = SeededRng::new(5).normal_vec(n * k, 0.5);
        let calib = SeededRng::new(6).normal_vec(rows * k, 1.0);
        let weight = DenseWeight { name: "w".into(), rows: n, cols: k, data: w };
        let calibration = Some(Calibration { inputs: &calib, rows });
        // The 40th percentile of |x| clips most inputs hard.
        let bad = [("observer", "percentile".into()), ("percentile", 40.0.into())];
        let untuned = scheme(&bad).quantize(weight.clone(), None, calibration).unwrap();
        let tuned_params = [bad[0].clone(), bad[1].clone(), ("steps", 60.into()), ("lr", 0.05.into())];
        let tuned = scheme(&tuned_params).quantize(weight, None, calibration).unwrap();
        let (before, after) = stats(tuned.as_ref());
        assert_eq!(stats(untuned.as_ref()), (before, before));
        assert!(after < before * 0.5, "nmse {before} → {after}");
    }

    #[test]
    fn lsq_gradient_on_hand_values() {
        // Inside: v/s = 1.4 → round 1, gradient 1 − 1.4 = −0.4.
        assert!((lsq_scale_grad(0.7, 0.5, -128.0, 127.0) - -0.4).abs() < 1e-6);
        // Inside, rounding up: v/s = −2.6 → −3 − (−2.6) = −0.4.
        assert!((lsq_scale_grad(-1.3, 0.5, -128.0, 127.0) - -0.4).abs() < 1e-6);
        // Clipped above and below: the bound itself.
        assert_eq!(lsq_scale_grad(100.0, 0.5, -128.0, 127.0), 127.0);
        assert_eq!(lsq_scale_grad(-100.0, 0.5, -128.0, 127.0), -128.0);
        // Affine activation with zp = 64: qn = −64, qp = 191.
        assert_eq!(lsq_scale_grad(-1.0, 0.01, -64.0, 191.0), -64.0);
        assert_eq!(lsq_scale_grad(5.0, 0.01, -64.0, 191.0), 191.0);
        // Exactly on a code: no gradient.
        assert_eq!(lsq_scale_grad(1.5, 0.5, -128.0, 127.0), 0.0);
        // Clipped codes: the slope matches a finite difference of s·qp exactly.
        let f = |s: f32| s * (100.0f32 / s).round().clamp(-128.0, 127.0);
        let fd = (f(0.51) - f(0.49)) / 0.02;
        assert!((fd - lsq_scale_grad(100.0, 0.5, -128.0, 127.0)).abs() < 1e-3, "{fd}");
    }

    #[test]
    fn operand_gradients_match_finite_differences() {
        let (m, k, n) = (3, 5, 4);
        let ops = FakeOperands {
            x: SeededRng::new(7).normal_vec(m * k, 1.0),
            w: SeededRng::new(8).normal_vec(n * k, 1.0),
        };
        let target = SeededRng::new(9).normal_vec(m * n, 1.0);
        let loss = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; m * n];
            matmul_nt(x, m, k, w, n, &mut y);
            mse_and_output_grad(&y, &target).0
        };
        let mut y = vec![0.0; m * n];
        matmul_nt(&ops.x, m, k, &ops.w, n, &mut y);
        let (_, g_out) = mse_and_output_grad(&y, &target);
        let (g_w, g_x) = operand_grads(&ops, &g_out, m, k, n);
        let h = 1e-2f32;
        for i in 0..n * k {
            let (mut up, mut down) = (ops.w.clone(), ops.w.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&ops.x, &up) - loss(&ops.x, &down)) / (2.0 * h as f64);
            assert!((fd - g_w[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()), "w[{i}]: {fd} vs {}", g_w[i]);
        }
        for i in 0..m * k {
            let (mut up, mut down) = (ops.x.clone(), ops.x.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&up, &ops.w) - loss(&down, &ops.w)) / (2.0 * h as f64);
            assert!((fd - g_x[i] as f64).abs() < 1e-3 * (1.0 + fd.abs()), "x[{i}]: {fd} vs {}", g_x[i]);
        }
    }

    #[test]
    fn tuned_scales_are_stored_and_reload_bit_identically() {
        let (k, n, rows) = (9, 5, 30);
        let weight = DenseWeight {
            name: "w".into(),
            rows: n,
            cols: k,
            data: SeededRng::new(11).normal_vec(n * k, 1.0),
        };
        let calib = SeededRng::new(12).normal_vec(rows * k, 1.0);
        // A clipped start, so that tuning moves the scales away from the observer's.
        let s =
            scheme(&[("steps", 5.into()), ("observer", "percentile".into()), ("percentile", 50.0.into())]);
        let layer = s
            .quantize(weight.clone(), Some(vec![0.1; n]), Some(Calibration { inputs: &calib, rows }))
            .unwrap();
        let stored = layer.export("q");
        let initial = ChannelInt8::quantize(&weight.data, k);
        let scales = stored.iter().find(|t| t.name == "q.scale").unwrap();
        assert_ne!(
            scales.bytes,
            StoredTensor::f32("", crate::scheme::TensorRole::Scales, vec![n], &initial.scales).bytes
        );
        let source = super::super::int8_static::tests::TestSource(
            stored.iter().map(|t| (t.name.clone(), t.clone())).collect(),
        );
        let reloaded = s.load("q", n, k, Some(vec![0.1; n]), &source).unwrap();
        let x = SeededRng::new(13).normal_vec(4 * k, 1.0);
        let (mut a, mut b) = (vec![0.0; 4 * n], vec![0.0; 4 * n]);
        layer.forward(&x, 4, &mut a);
        reloaded.forward(&x, 4, &mut b);
        assert_eq!(a, b);
        assert!(reloaded.stats().is_empty());
    }
}
