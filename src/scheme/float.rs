//! The float baselines `fp32`, `fp16` and `bf16`: weights rounded to the storage type,
//! computed in f32.

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, Scheme, SchemeInfo, SchemeParams,
    StoredSource, StoredTensor, TensorRole, WeightParts,
};
use crate::error::Result;

/// The storage type of a float linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatStorage {
    /// IEEE single precision.
    F32,
    /// IEEE half precision (1 sign, 5 exponent, 10 mantissa bits).
    F16,
    /// bfloat16 (1 sign, 8 exponent, 7 mantissa bits).
    BF16,
}

impl FloatStorage {
    /// The name a suite's `dtype:` and results.json use.
    pub fn name(self) -> &'static str {
        match self {
            FloatStorage::F32 => "f32",
            FloatStorage::F16 => "f16",
            FloatStorage::BF16 => "bf16",
        }
    }

    /// Round `v` to this type (and back to f32 for compute).
    pub fn round(self, v: f32) -> f32 {
        match self {
            FloatStorage::F32 => v,
            FloatStorage::F16 => f16::from_f32(v).to_f32(),
            FloatStorage::BF16 => bf16::from_f32(v).to_f32(),
        }
    }

    fn dtype(self) -> Dtype {
        match self {
            FloatStorage::F32 => Dtype::F32,
            FloatStorage::F16 => Dtype::F16,
            FloatStorage::BF16 => Dtype::BF16,
        }
    }

    fn encode(self, data: &[f32]) -> Vec<u8> {
        match self {
            FloatStorage::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatStorage::F16 => data.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            FloatStorage::BF16 => data.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
        }
    }

    fn kernel(self) -> &'static str {
        match self {
            FloatStorage::F32 => "f32-gemm",
            FloatStorage::F16 => "f16-weights/f32-gemm",
            FloatStorage::BF16 => "bf16-weights/f32-gemm",
        }
    }
}

/// A linear layer whose weights are floats of some storage type, kept as f32 for compute.
pub struct FloatLinear {
    rows: usize,
    cols: usize,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    storage: FloatStorage,
    role: TensorRole,
}

impl FloatLinear {
    /// A layer from `weight` (`[rows, cols]`), rounded to `storage`.
    pub fn new(weight: DenseWeight, bias: Option<Vec<f32>>, storage: FloatStorage) -> Self {
        let data = weight.data.par_iter().with_min_len(1 << 16).map(|&v| storage.round(v)).collect();
        let (rows, cols) = (weight.rows, weight.cols);
        FloatLinear { rows, cols, weight: data, bias, storage, role: TensorRole::PackedWeights }
    }

    /// A full-precision layer outside the quantization boundary (an unquantized head).
    pub fn unquantized(weight: DenseWeight, bias: Option<Vec<f32>>) -> Self {
        FloatLinear { role: TensorRole::Unquantized, ..Self::new(weight, bias, FloatStorage::F32) }
    }

    /// The f32 weight values (`[rows, cols]`).
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }
}

impl Linear for FloatLinear {
    fn in_features(&self) -> usize {
        self.cols
    }

    fn out_features(&self) -> usize {
        self.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        crate::tensor::matmul_nt(x, rows, self.cols, &self.weight, self.rows, out);
        super::add_bias(out, self.bias.as_deref());
    }

    fn kernel(&self) -> &'static str {
        self.storage.kernel()
    }

    fn parts(&self) -> LayerParts<'_> {
        let weights = match self.storage {
            FloatStorage::F32 => WeightParts::Dense { weight: &self.weight, pruned: false },
            storage => WeightParts::Half { weight: &self.weight, storage },
        };
        LayerParts { weights, bias: self.bias.as_deref() }
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        // The fp32 baseline's "packed" weights are its f32 values: a quantizable layer's
        // weights are always accounted as the scheme's weights.
        let mut out = vec![StoredTensor {
            name: format!("{name}.weight"),
            role: self.role,
            dtype: self.storage.dtype(),
            shape: vec![self.rows, self.cols],
            bytes: self.storage.encode(&self.weight),
            represents: self.rows * self.cols,
        }];
        out.extend(super::bias_tensor(name, self.bias.as_deref()));
        out
    }
}

struct FloatScheme(FloatStorage);

impl Scheme for FloatScheme {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        _: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        Ok(Box::new(FloatLinear::new(weight, bias, self.0)))
    }

    fn load(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
        source: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>> {
        let data = source.f32(&format!("{name}.weight"), &[rows, cols])?;
        let weight = DenseWeight { name: name.to_string(), rows, cols, data };
        Ok(Box::new(FloatLinear::new(weight, bias, self.0)))
    }
}

fn build_f32(_: &SchemeParams) -> Result<Box<dyn Scheme>> {
    Ok(Box::new(FloatScheme(FloatStorage::F32)))
}
fn build_f16(_: &SchemeParams) -> Result<Box<dyn Scheme>> {
    Ok(Box::new(FloatScheme(FloatStorage::F16)))
}
fn build_bf16(_: &SchemeParams) -> Result<Box<dyn Scheme>> {
    Ok(Box::new(FloatScheme(FloatStorage::BF16)))
}

pub(super) const FP32: SchemeInfo = SchemeInfo {
    name: "fp32",
    summary: "full-precision baseline: f32 weights, f32 compute",
    bits_per_weight: 32.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::Cpu,
    params: &[],
    build: build_f32,
};

pub(super) const FP16: SchemeInfo = SchemeInfo {
    name: "fp16",
    summary: "weights rounded to IEEE half precision, f32 compute",
    bits_per_weight: 16.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::Cpu,
    params: &[],
    build: build_f16,
};

pub(super) const BF16: SchemeInfo = SchemeInfo {
    name: "bf16",
    summary: "weights rounded to bfloat16, f32 compute",
    bits_per_weight: 16.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::Cpu,
    params: &[],
    build: build_bf16,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_the_half_crate_and_is_idempotent() {
        for &v in &[0.1f32, -2.71875e3, 65504.0, 1e-8, 70000.0] {
            for s in [FloatStorage::F16, FloatStorage::BF16] {
                let r = s.round(v);
                assert_eq!(s.round(r), r, "{s:?} {v}");
            }
        }
        assert_eq!(FloatStorage::F16.round(70000.0), f32::INFINITY);
        assert_eq!(FloatStorage::BF16.round(1.0 + 1.0 / 256.0), 1.0);
    }
}
