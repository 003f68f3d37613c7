//! `int8-dynamic` with `torch_compat: true` against torch 2.15's
//! `quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)` on x86 (fbgemm), on the
//! article's MLP at half width (tests/fixtures/torch-dynamic/, made by
//! scripts/make_torch_dynamic_reference.py): the int8 weights and the activation
//! quantization parameters bit for bit, every quantized layer on the same float input, and
//! the chained model.

use std::collections::BTreeMap;

use quantbench::scheme::int8_dynamic::{
    torch_activation_params, torch_quantize_activations, Int8DynamicLinear, Int8DynamicOptions,
};
use quantbench::scheme::{self, DenseWeight, Linear};
use safetensors::{Dtype, SafeTensors};

use crate::support::fixture;

/// Largest |ours − torch| allowed on a layer output. Measured: 0 on every layer (int8
/// weights, weight scales, activation parameters and quantized activations agree exactly,
/// so the i32 sums are equal, and the rescale is the same fused multiply-add). A rescale
/// with two roundings (`acc · s + b`) measured 4.8e-7 here (≈ 1 ulp at |y| ≈ 4), which is
/// what this budget would have to allow; it stays at 0 so a change in the arithmetic
/// shows.
const TORCH_LAYER_BUDGET: f32 = 0.0;

/// The chained model: layers as above, then ReLU and the final sigmoid, whose `exp` is
/// Rust's libm and not torch's vectorised one. Measured: 6.0e-8 (1 ulp of outputs near
/// 0.5); budget 4 ulp at 1.0.
const TORCH_MODEL_BUDGET: f32 = 4.0 * f32::EPSILON;

struct Reference {
    bytes: Vec<u8>,
    meta: serde_json::Value,
}

impl Reference {
    fn load() -> Reference {
        let dir = fixture("torch-dynamic");
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let meta = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        Reference { bytes, meta }
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn i8(&self, name: &str) -> Vec<i8> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I8, "{name}");
        t.data().iter().map(|&b| b as i8).collect()
    }

    fn widths(&self) -> Vec<usize> {
        self.meta["widths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }

    fn layer_meta(&self, i: usize) -> &serde_json::Value {
        &self.meta["layers"][i]
    }

    fn dense(&self, i: usize) -> DenseWeight {
        let w = self.widths();
        DenseWeight {
            name: format!("layers.{i}.weight"),
            rows: w[i + 1],
            cols: w[i],
            data: self.f32(&format!("layers.{i}.weight")),
        }
    }

    /// Our layer i, built through the registry as a suite would.
    fn layer(&self, i: usize) -> Box<dyn Linear> {
        let info = scheme::lookup("int8-dynamic").unwrap();
        let mut raw = BTreeMap::new();
        raw.insert("torch_compat".to_string(), serde_json::json!(true));
        let params = info.validate_params(raw).unwrap();
        let scheme = (info.build)(&params).unwrap();
        scheme.quantize(self.dense(i), Some(self.f32(&format!("layers.{i}.bias"))), None).unwrap()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn weights_match_torch_bit_for_bit() {
    let r = Reference::load();
    for i in 0..r.widths().len() - 1 {
        let options = Int8DynamicOptions { torch_compat: true, ..Default::default() };
        let layer = Int8DynamicLinear::new(r.dense(i), None, options).unwrap();
        assert_eq!(layer.weight(), r.i8(&format!("layers.{i}.qweight")), "layer {i}");
        let scale = r.layer_meta(i)["weight_scale"].as_f64().unwrap() as f32;
        assert_eq!(layer.scales()[0], scale, "layer {i}");
        assert_eq!(r.layer_meta(i)["weight_zero_point"], 0);
    }
}

#[test]
fn activation_parameters_match_torch() {
    let r = Reference::load();
    for i in 0..r.widths().len() - 1 {
        let m = r.layer_meta(i);
        let x = r.f32(&format!("layers.{i}.input"));
        let (_, ours) = torch_quantize_activations(&x);
        assert_eq!(ours.scale, m["activation_scale"].as_f64().unwrap() as f32, "layer {i}");
        assert_eq!(ours.zero_point as i64, m["activation_zero_point"].as_i64().unwrap(), "layer {i}");
        let direct = torch_activation_params(
            m["activation_min"].as_f64().unwrap() as f32,
            m["activation_max"].as_f64().unwrap() as f32,
        );
        assert_eq!(direct, ours);
    }
}

#[test]
fn every_layer_matches_torch_within_budget() {
    let r = Reference::load();
    for (i, &cols) in r.widths().iter().enumerate().take(r.widths().len() - 1) {
        let x = r.f32(&format!("layers.{i}.input"));
        let expected = r.f32(&format!("layers.{i}.qoutput"));
        let mut out = vec![0.0; expected.len()];
        r.layer(i).forward(&x, x.len() / cols, &mut out);
        let diff = max_abs_diff(&out, &expected);
        eprintln!("layer {i}: max |ours - torch| = {diff:e}");
        assert!(diff <= TORCH_LAYER_BUDGET, "layer {i}: {diff}");
    }
}

#[test]
fn the_chained_model_matches_torch_within_budget() {
    let r = Reference::load();
    let w = r.widths();
    let mut h = r.f32("input");
    let rows = h.len() / w[0];
    for i in 0..w.len() - 1 {
        let mut out = vec![0.0; rows * w[i + 1]];
        r.layer(i).forward(&h, rows, &mut out);
        let last = i == w.len() - 2;
        out.iter_mut().for_each(|v| *v = if last { 1.0 / (1.0 + (-*v).exp()) } else { v.max(0.0) });
        h = out;
    }
    let expected = r.f32("output_quantized");
    let diff = max_abs_diff(&h, &expected);
    eprintln!(
        "model: max |ours - torch| = {diff:e}; float vs torch quantized = {:e}",
        max_abs_diff(&r.f32("output_float"), &expected)
    );
    assert!(diff <= TORCH_MODEL_BUDGET, "{diff}");
}
