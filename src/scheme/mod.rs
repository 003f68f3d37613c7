//! The quantization boundary (a linear layer) and the one registry table of schemes.
//!
//! Every scheme is one row of [`SCHEMES`]: its name as spelled in a suite, a summary,
//! its nominal bits per weight, its parameters and how to build it. Suite parsing,
//! `bench list schemes`, error hints and the README table all read this table.

mod float;
mod int4_block;
pub mod int8_dynamic;
pub mod int8_outlier;
mod int8_static;
pub mod kernels;
mod kmeans;
mod nf4;

pub use nf4::NF4_CODE;
pub mod observer;
pub mod packed4;
mod parts;
mod prune;
mod qat_sim;

use std::collections::BTreeMap;

use safetensors::tensor::Dtype;
use serde::Serialize;

use crate::error::{Error, Result};

pub use float::{float_scheme, FloatLinear, FloatStorage, FloatValues};
#[cfg(target_arch = "x86_64")]
pub use kernels::int8_panels::Int8Panels;
pub use parts::{Int8Codes, LayerParts, WeightParts};

/// What a stored tensor is for, in the memory and disk accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorRole {
    /// The weights of quantized linear layers, in the scheme's storage format.
    PackedWeights,
    /// Per-channel or per-block scales.
    Scales,
    /// Zero points of asymmetric formats.
    ZeroPoints,
    /// Full-precision outlier columns (LLM.int8()).
    OutlierColumns,
    /// Biases of linear layers (kept in full precision).
    Biases,
    /// Tensors outside the quantization boundary (embeddings, norms, an unquantized head).
    Unquantized,
}

impl TensorRole {
    /// Every role, in report order.
    pub const ALL: [TensorRole; 6] = [
        TensorRole::PackedWeights,
        TensorRole::Scales,
        TensorRole::ZeroPoints,
        TensorRole::OutlierColumns,
        TensorRole::Biases,
        TensorRole::Unquantized,
    ];

    /// The role's name in results and reports.
    pub fn name(self) -> &'static str {
        match self {
            TensorRole::PackedWeights => "packed_weights",
            TensorRole::Scales => "scales",
            TensorRole::ZeroPoints => "zero_points",
            TensorRole::OutlierColumns => "outlier_columns",
            TensorRole::Biases => "biases",
            TensorRole::Unquantized => "unquantized",
        }
    }

    /// True for the parts of a quantized linear layer's weight representation (what
    /// "bits per weight" counts).
    pub fn is_weight_representation(self) -> bool {
        matches!(
            self,
            TensorRole::PackedWeights
                | TensorRole::Scales
                | TensorRole::ZeroPoints
                | TensorRole::OutlierColumns
        )
    }
}

/// Where exported tensors go, one at a time: the byte account, a file being written.
pub type TensorSink<'a> = dyn FnMut(StoredTensor) + 'a;

/// One tensor as a scheme stores it: the unit of saving, reloading and byte accounting.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// Full tensor name in the saved file.
    pub name: String,
    /// What it is for.
    pub role: TensorRole,
    /// Element type in the file.
    pub dtype: Dtype,
    /// Shape in the file.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub bytes: Vec<u8>,
    /// Logical weights this tensor holds the values of (the `rows × cols` of a linear
    /// layer's packed weights; 0 for scales, norms and everything else): the denominator
    /// of bits per weight, whatever the packing.
    pub represents: usize,
}

impl StoredTensor {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, role: TensorRole, shape: Vec<usize>, data: &[f32]) -> Self {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        StoredTensor { name: name.into(), role, dtype: Dtype::F32, shape, bytes, represents: 0 }
    }
}

/// `{name}.bias` as every scheme stores it (f32, role `Biases`), when the layer has a bias.
pub(crate) fn bias_tensor(name: &str, bias: Option<&[f32]>) -> Option<StoredTensor> {
    bias.map(|b| StoredTensor::f32(format!("{name}.bias"), TensorRole::Biases, vec![b.len()], b))
}

/// Add `bias` to every row of `out` (`[rows, bias.len()]`).
pub(crate) fn add_bias(out: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        let _span = crate::profile::span("bias", "add", || crate::profile::elementwise(out.len(), 1.0));
        crate::tensor::add_bias_rows(out, bias);
    }
}

/// A linear layer `y = x·Wᵀ + b` in some scheme's representation: the only place where
/// schemes and architectures meet.
pub trait Linear: Send + Sync {
    /// Input features (columns of W).
    fn in_features(&self) -> usize;
    /// Output features (rows of W).
    fn out_features(&self) -> usize;
    /// `out[rows, out_features] = x[rows, in_features] · Wᵀ + b`, every value of `out`
    /// written: its previous contents are arbitrary (a recycled buffer) and never read.
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]);
    /// The kernel path this layer runs (recorded per case), e.g. `f32-gemm`.
    fn kernel(&self) -> &'static str;
    /// The tensors that represent this layer, named under `name`.
    fn export(&self, name: &str) -> Vec<StoredTensor>;
    /// The layer's weight representation and bias, borrowed (what a device copy is built
    /// from). Every layer type implements it: no default, so a new scheme must say what it
    /// is made of.
    fn parts(&self) -> LayerParts<'_>;
    /// What the layer observed while running, since it was built: e.g. LLM.int8()'s
    /// `outlier_column_fraction`. Empty for most schemes.
    fn stats(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
}

/// Inputs a layer saw when the full-precision model ran on the calibration data:
/// `rows × cols` values, one row per token (a sample of at most the suite's
/// `calibration.samples` tokens).
#[derive(Debug, Clone, Copy)]
pub struct Calibration<'a> {
    /// Row-major `[rows, cols]`.
    pub inputs: &'a [f32],
    /// Number of rows.
    pub rows: usize,
}

/// A weight handed to a scheme: row-major `[out_features, in_features]` f32.
#[derive(Debug, Clone)]
pub struct DenseWeight {
    /// Tensor name in the checkpoint (for messages).
    pub name: String,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Values.
    pub data: Vec<f32>,
}

/// Reads back the tensors a scheme exported, by full name.
pub trait StoredSource {
    /// The tensor `name` as f32, checked against `shape`.
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// The raw bytes and dtype of `name`, checked against `shape`.
    fn raw(&self, name: &str, shape: &[usize]) -> Result<(Dtype, Vec<u8>)>;
}

/// A configured scheme: turns full-precision weights into linear layers and back.
pub trait Scheme: Send + Sync {
    /// Quantize one layer. `calibration` is given to schemes whose registry row says they
    /// need calibration (and only to them).
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        calibration: Option<Calibration>,
    ) -> Result<Box<dyn Linear>>;
    /// Rebuild a layer from what [`Linear::export`] wrote under `name`.
    fn load(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
        source: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>>;
}

/// The kind of value a scheme parameter takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `true` / `false`.
    Bool,
    /// A non-negative integer.
    Integer,
    /// Free text.
    Text,
    /// Any number.
    Number,
}

impl ParamKind {
    fn name(self) -> &'static str {
        match self {
            ParamKind::Bool => "a boolean",
            ParamKind::Integer => "a non-negative integer",
            ParamKind::Text => "a string",
            ParamKind::Number => "a number",
        }
    }

    fn accepts(self, value: &serde_json::Value) -> bool {
        match self {
            ParamKind::Bool => value.is_boolean(),
            ParamKind::Integer => value.is_u64(),
            ParamKind::Text => value.is_string(),
            ParamKind::Number => value.is_number(),
        }
    }
}

/// One parameter a scheme accepts in a suite.
#[derive(Debug, Clone, Copy)]
pub struct ParamInfo {
    /// Key in the suite.
    pub name: &'static str,
    /// Value type.
    pub kind: ParamKind,
    /// Default, as written in a suite.
    pub default: &'static str,
    /// What it does.
    pub help: &'static str,
}

/// Parameters every scheme accepts.
pub const COMMON_PARAMS: &[ParamInfo] = &[
    ParamInfo {
        name: "label",
        kind: ParamKind::Text,
        default: "the scheme name",
        help: "name of this case in reports (to run one scheme with several settings)",
    },
    ParamInfo {
        name: "quantize_head",
        kind: ParamKind::Bool,
        default: "false",
        help: "also quantize the output head (reported explicitly)",
    },
];

/// Validated parameters of one scheme entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SchemeParams(pub BTreeMap<String, serde_json::Value>);

impl SchemeParams {
    /// A boolean parameter, or its default.
    pub fn bool(&self, name: &str, default: bool) -> bool {
        self.0.get(name).and_then(|v| v.as_bool()).unwrap_or(default)
    }

    /// An integer parameter, or its default.
    pub fn integer(&self, name: &str, default: u64) -> u64 {
        self.0.get(name).and_then(|v| v.as_u64()).unwrap_or(default)
    }

    /// A number parameter, or its default.
    pub fn number(&self, name: &str, default: f64) -> f64 {
        self.0.get(name).and_then(|v| v.as_f64()).unwrap_or(default)
    }

    /// A text parameter, if given.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.as_str())
    }
}

/// Which devices run a scheme (checked against the CUDA backend's uploads by
/// `backend::cuda::linear`'s tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DeviceSupport {
    /// CPU only.
    #[serde(rename = "cpu")]
    Cpu,
    /// CPU and CUDA.
    #[serde(rename = "cpu, cuda")]
    CpuAndCuda,
}

impl DeviceSupport {
    /// As listed: `cpu` or `cpu, cuda`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceSupport::Cpu => "cpu",
            DeviceSupport::CpuAndCuda => "cpu, cuda",
        }
    }
}

/// One row of the scheme table.
pub struct SchemeInfo {
    /// Name as spelled in suites.
    pub name: &'static str,
    /// One line for `bench list`.
    pub summary: &'static str,
    /// Nominal bits per quantized weight, scales and zero points included.
    pub bits_per_weight: f64,
    /// Quantization block size, if block-wise.
    pub block_size: Option<usize>,
    /// Whether the scheme needs calibration data.
    pub needs_calibration: bool,
    /// Devices that run it.
    pub devices: DeviceSupport,
    /// Parameters beyond [`COMMON_PARAMS`].
    pub params: &'static [ParamInfo],
    /// Build the configured scheme from validated parameters.
    pub build: fn(&SchemeParams) -> Result<Box<dyn Scheme>>,
}

/// Every scheme the harness knows, in the order `bench list` shows them.
pub static SCHEMES: &[SchemeInfo] = &[
    float::FP32,
    float::FP16,
    float::BF16,
    int8_dynamic::INT8_DYNAMIC,
    int8_static::INT8_STATIC,
    int8_outlier::INT8_OUTLIER,
    qat_sim::QAT_SIM,
    int4_block::INT4_BLOCK,
    nf4::NF4,
    nf4::FP4,
    prune::PRUNE,
    kmeans::KMEANS,
];

/// The table row of `name`, or an error listing the known names.
pub fn lookup(name: &str) -> Result<&'static SchemeInfo> {
    SCHEMES.iter().find(|s| s.name == name).ok_or_else(|| Error::Scheme {
        scheme: name.to_string(),
        message: format!("unknown scheme, expected one of: {}", names().join(", ")),
    })
}

/// The scheme names, in table order.
pub fn names() -> Vec<&'static str> {
    SCHEMES.iter().map(|s| s.name).collect()
}

impl SchemeInfo {
    /// Every parameter this scheme accepts: its own, then the common ones.
    pub fn all_params(&self) -> impl Iterator<Item = &'static ParamInfo> {
        self.params.iter().chain(COMMON_PARAMS)
    }

    /// Check raw suite parameters against this scheme's parameter list.
    pub fn validate_params(&self, raw: BTreeMap<String, serde_json::Value>) -> Result<SchemeParams> {
        for (key, value) in &raw {
            let Some(info) = self.all_params().find(|p| p.name == key) else {
                let allowed: Vec<_> = self.all_params().map(|p| p.name).collect();
                return Err(Error::Scheme {
                    scheme: self.name.to_string(),
                    message: format!("unknown parameter `{key}`, expected one of: {}", allowed.join(", ")),
                });
            };
            if !info.kind.accepts(value) {
                return Err(Error::Scheme {
                    scheme: self.name.to_string(),
                    message: format!("parameter `{key}` is {value}, expected {}", info.kind.name()),
                });
            }
        }
        let params = SchemeParams(raw);
        (self.build)(&params)?;
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_lookup_finds_each() {
        let mut seen = std::collections::HashSet::new();
        for s in SCHEMES {
            assert!(seen.insert(s.name), "duplicate scheme {}", s.name);
            assert_eq!(lookup(s.name).unwrap().name, s.name);
        }
    }

    #[test]
    fn unknown_scheme_error_lists_known_names() {
        let err = lookup("int3").err().unwrap().to_string();
        assert!(err.contains("int3") && err.contains("fp16") && err.contains("bf16"), "{err}");
    }

    #[test]
    fn parameters_are_checked_by_name_and_type() {
        let fp16 = lookup("fp16").unwrap();
        let mut raw = BTreeMap::new();
        raw.insert("blocksize".to_string(), serde_json::json!(64));
        let err = fp16.validate_params(raw).err().unwrap().to_string();
        assert!(err.contains("unknown parameter `blocksize`") && err.contains("label"), "{err}");

        let mut raw = BTreeMap::new();
        raw.insert("quantize_head".to_string(), serde_json::json!("yes"));
        let err = fp16.validate_params(raw).err().unwrap().to_string();
        assert!(err.contains("expected a boolean"), "{err}");

        let mut raw = BTreeMap::new();
        raw.insert("quantize_head".to_string(), serde_json::json!(true));
        assert!(fp16.validate_params(raw).unwrap().bool("quantize_head", false));
    }

    /// Every scheme round-trips a layer through export and load bit-identically.
    #[test]
    fn every_scheme_reloads_what_it_exports() {
        let weight = DenseWeight {
            name: "w".into(),
            rows: 5,
            cols: 7,
            data: crate::tensor::SeededRng::new(3).normal_vec(35, 1.0),
        };
        let x = crate::tensor::SeededRng::new(4).normal_vec(2 * 7, 1.0);
        for info in SCHEMES {
            let scheme = (info.build)(&SchemeParams::default()).unwrap();
            let layer = scheme.quantize(weight.clone(), Some(vec![0.5; 5]), calibration(info)).unwrap();
            let exported = layer.export("layer");
            let source = MapSource(exported.iter().map(|t| (t.name.clone(), t.clone())).collect());
            let reloaded = scheme.load("layer", 5, 7, Some(vec![0.5; 5]), &source).unwrap();
            let (mut a, mut b) = (vec![0.0; 10], vec![0.0; 10]);
            layer.forward(&x, 2, &mut a);
            reloaded.forward(&x, 2, &mut b);
            assert_eq!(a, b, "scheme {}", info.name);
        }
    }

    /// `forward` writes every output value and reads none (run_linear hands it recycled
    /// buffers): filled with NaN or with zeros beforehand, the same bits come out, for
    /// every scheme at decode, skinny and prefill row counts and at shapes that reach the
    /// vectorised paths (64 and 576 columns) as well as odd ones.
    #[test]
    fn every_scheme_overwrites_the_whole_output() {
        for &(n, k) in &[(5usize, 7usize), (64, 64), (40, 576)] {
            let mut rng = crate::tensor::SeededRng::new(9);
            let weight = DenseWeight { name: "w".into(), rows: n, cols: k, data: rng.normal_vec(n * k, 1.0) };
            let calibration_rows = rng.normal_vec(16 * k, 1.0);
            for info in SCHEMES {
                let scheme = (info.build)(&SchemeParams::default()).unwrap();
                let calibration =
                    info.needs_calibration.then_some(Calibration { inputs: &calibration_rows, rows: 16 });
                let layer = scheme.quantize(weight.clone(), Some(vec![0.5; n]), calibration).unwrap();
                for m in [1, 3, 9, 40] {
                    let x = rng.normal_vec(m * k, 1.0);
                    let (mut zeros, mut nans) = (vec![0.0f32; m * n], vec![f32::NAN; m * n]);
                    layer.forward(&x, m, &mut zeros);
                    layer.forward(&x, m, &mut nans);
                    let same = zeros.iter().zip(&nans).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "scheme {} n {n} k {k} m {m}", info.name);
                }
            }
        }
    }

    /// Calibration inputs for the schemes that need them: 16 rows of 7 normal values.
    fn calibration(info: &SchemeInfo) -> Option<Calibration<'static>> {
        static INPUTS: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
        let inputs = INPUTS.get_or_init(|| crate::tensor::SeededRng::new(5).normal_vec(16 * 7, 1.0));
        info.needs_calibration.then_some(Calibration { inputs, rows: 16 })
    }

    /// Test double for [`StoredSource`] over exported tensors.
    struct MapSource(BTreeMap<String, StoredTensor>);

    impl StoredSource for MapSource {
        fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
            let (dtype, bytes) = self.raw(name, shape)?;
            // The float types the schemes export (a local decode: scheme/ sits below model/).
            let halves = bytes.chunks_exact(2).map(|c| [c[0], c[1]]);
            Ok(match dtype {
                Dtype::F32 => {
                    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                }
                Dtype::F16 => halves.map(|b| half::f16::from_le_bytes(b).to_f32()).collect(),
                Dtype::BF16 => halves.map(|b| half::bf16::from_le_bytes(b).to_f32()).collect(),
                other => panic!("the test source holds no {other:?} floats"),
            })
        }
        fn raw(&self, name: &str, shape: &[usize]) -> Result<(Dtype, Vec<u8>)> {
            let t = &self.0[name];
            assert_eq!(t.shape, shape);
            Ok((t.dtype, t.bytes.clone()))
        }
    }
}
