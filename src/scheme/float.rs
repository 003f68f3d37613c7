//! The float baselines `fp32`, `fp16` and `bf16`: weights stored in the storage type (16-bit
//! weights stay 16-bit in memory), computed in f32.

use half::{bf16, f16};
use safetensors::tensor::Dtype;

use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, Scheme, SchemeInfo, SchemeParams,
    StoredSource, StoredTensor, TensorRole, WeightParts,
};
use crate::error::Result;
use crate::tensor::half::{matmul_nt_half, HalfType};

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
    /// Every precision a reference can be held at.
    pub const ALL: [FloatStorage; 3] = [FloatStorage::F32, FloatStorage::F16, FloatStorage::BF16];

    /// A reference precision as a suite's `dtype:` or the `--dtype` option names it:
    /// `Some(None)` for `auto` (the checkpoint's own precision), `None` for an unknown
    /// name.
    pub fn parse_dtype(name: &str) -> Option<Option<FloatStorage>> {
        if name == "auto" {
            return Some(None);
        }
        Self::ALL.into_iter().find(|p| p.name() == name).map(Some)
    }

    /// The names [`FloatStorage::parse_dtype`] accepts, for messages: `auto, f32, f16, bf16`.
    pub fn dtype_names() -> String {
        std::iter::once("auto").chain(Self::ALL.iter().map(|p| p.name())).collect::<Vec<_>>().join(", ")
    }

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

    /// The 16-bit format of `F16` and `BF16`; `None` for `F32`.
    pub fn half(self) -> Option<HalfType> {
        match self {
            FloatStorage::F32 => None,
            FloatStorage::F16 => Some(HalfType::F16),
            FloatStorage::BF16 => Some(HalfType::Bf16),
        }
    }

    /// The element type a tensor held at this precision is saved as.
    pub fn dtype(self) -> Dtype {
        match self {
            FloatStorage::F32 => Dtype::F32,
            FloatStorage::F16 => Dtype::F16,
            FloatStorage::BF16 => Dtype::BF16,
        }
    }

    fn kernel(self) -> &'static str {
        match self {
            FloatStorage::F32 => "f32-gemm",
            FloatStorage::F16 => "f16-weights/f32-compute",
            FloatStorage::BF16 => "bf16-weights/f32-compute",
        }
    }
}

/// A linear layer whose weights are floats of some storage type: f32, or 16-bit values
/// widened inside the product ([`matmul_nt_half`]).
pub struct FloatLinear {
    rows: usize,
    cols: usize,
    weight: FloatValues,
    bias: Option<Vec<f32>>,
    storage: FloatStorage,
    role: TensorRole,
}

/// A float matrix as held: f32 values, or 16-bit ones widened where they are used (a
/// float layer's weights, a token embedding table).
pub enum FloatValues {
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 or f16 bits.
    Half(Vec<u16>, HalfType),
}

impl FloatValues {
    /// `values` held at `storage` (rounded to it when it is 16-bit).
    pub fn new(values: Vec<f32>, storage: FloatStorage) -> Self {
        match storage.half() {
            None => FloatValues::F32(values),
            Some(ty) => FloatValues::Half(ty.encode(&values), ty),
        }
    }

    /// Bytes held.
    pub fn byte_len(&self) -> usize {
        match self {
            FloatValues::F32(v) => 4 * v.len(),
            FloatValues::Half(bits, _) => 2 * bits.len(),
        }
    }

    /// The values as stored in a file: little-endian, at their own width.
    pub fn le_bytes(&self) -> Vec<u8> {
        match self {
            FloatValues::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            FloatValues::Half(bits, _) => bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
        }
    }

    /// Values `range` widened into `dst` (same length).
    pub fn widen_into(&self, range: std::ops::Range<usize>, dst: &mut [f32]) {
        match self {
            FloatValues::F32(v) => dst.copy_from_slice(&v[range]),
            FloatValues::Half(bits, ty) => ty.widen(&bits[range], dst),
        }
    }

    /// `out[m, n] = x[m, k] · selfᵀ`, the matrix being `[n, k]`.
    pub fn matmul_nt(&self, x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
        match self {
            FloatValues::F32(w) => crate::tensor::matmul_nt(x, m, k, w, n, out),
            FloatValues::Half(bits, ty) => matmul_nt_half(x, m, k, bits, *ty, n, out),
        }
    }
}

impl FloatLinear {
    /// A layer from `weight` (`[rows, cols]`), rounded to `storage` and held in it.
    pub fn new(weight: DenseWeight, bias: Option<Vec<f32>>, storage: FloatStorage) -> Self {
        let (rows, cols) = (weight.rows, weight.cols);
        let weight = FloatValues::new(weight.data, storage);
        FloatLinear { rows, cols, weight, bias, storage, role: TensorRole::PackedWeights }
    }

    /// A layer outside the quantization boundary (an unquantized head), held at `storage`
    /// (the model's precision).
    pub fn unquantized(weight: DenseWeight, bias: Option<Vec<f32>>, storage: FloatStorage) -> Self {
        FloatLinear { role: TensorRole::Unquantized, ..Self::new(weight, bias, storage) }
    }

    /// The weight values (`[rows, cols]`) when held as f32.
    pub fn f32_weight(&self) -> Option<&[f32]> {
        match &self.weight {
            FloatValues::F32(w) => Some(w),
            FloatValues::Half(..) => None,
        }
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
        self.weight.matmul_nt(x, rows, self.cols, self.rows, out);
        super::add_bias(out, self.bias.as_deref());
    }

    fn kernel(&self) -> &'static str {
        self.storage.kernel()
    }

    fn parts(&self) -> LayerParts<'_> {
        let weights = match &self.weight {
            FloatValues::F32(weight) => WeightParts::Dense { weight, pruned: false },
            FloatValues::Half(bits, _) => WeightParts::Half { bits, storage: self.storage },
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
            bytes: self.weight.le_bytes(),
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

/// The float scheme that holds weights at `storage` (`fp32`, `fp16` or `bf16`): the
/// reference model of a model whose `dtype` is `storage`.
pub fn float_scheme(storage: FloatStorage) -> Box<dyn Scheme> {
    Box::new(FloatScheme(storage))
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
    devices: DeviceSupport::CpuAndCuda,
    params: &[],
    build: build_f32,
};

pub(super) const FP16: SchemeInfo = SchemeInfo {
    name: "fp16",
    summary: "weights held in IEEE half precision, widened to f32 inside the product",
    bits_per_weight: 16.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
    params: &[],
    build: build_f16,
};

pub(super) const BF16: SchemeInfo = SchemeInfo {
    name: "bf16",
    summary: "weights held in bfloat16, widened to f32 inside the product",
    bits_per_weight: 16.0,
    block_size: None,
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
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
