//! What a linear layer is made of, as another backend needs it: [`Linear::parts`] returns
//! the layer's weight representation ([`WeightParts`], one variant per representation,
//! borrowed from the layer) and its bias, so a device copy can be built from any scheme's
//! layer without the scheme knowing about the device.
//!
//! [`Linear::parts`]: super::Linear::parts

use super::int8_dynamic::Int8DynamicOptions;
use super::int8_outlier::OutlierDtype;
use super::observer::AffineU8;
use super::packed4::Packed4;
use super::FloatStorage;
#[cfg(target_arch = "x86_64")]
use super::Int8Panels;
use std::borrow::Cow;

/// A layer's weight representation and bias (`y = x·Wᵀ + b`).
#[derive(Debug, Clone, Copy)]
pub struct LayerParts<'a> {
    /// The weight, in the scheme's representation.
    pub weights: WeightParts<'a>,
    /// The f32 bias, one value per output feature.
    pub bias: Option<&'a [f32]>,
}

/// The weight representation of a layer; every slice is row-major `[out, in]` where it
/// holds one value per weight.
#[derive(Debug, Clone, Copy)]
pub enum WeightParts<'a> {
    /// f32 weights multiplied in f32: `fp32`, an unquantized head, and `prune` (`pruned`:
    /// the dense weight holding the pruned zeros).
    Dense {
        /// The weight values.
        weight: &'a [f32],
        /// True for a pruned layer.
        pruned: bool,
    },
    /// `fp16` / `bf16` (and an unquantized head of a 16-bit model): 16-bit weights, which
    /// the CPU widens to f32 inside the product with f32 activations.
    Half {
        /// The weights' bits.
        bits: &'a [u16],
        /// `F16` or `BF16`.
        storage: FloatStorage,
    },
    /// `int8-dynamic`: int8 codes with one f32 scale per output row (in `torch_compat` mode
    /// the one tensor scale repeated per row), activations quantized at run time.
    Int8Dynamic {
        /// Codes.
        weight: Int8Codes<'a>,
        /// One scale per output row.
        scales: &'a [f32],
        /// The scheme's options.
        options: Int8DynamicOptions,
    },
    /// `int8-static`: per-channel int8 codes, the calibrated uint8 input parameters, the
    /// precomputed `Σ_k w[o, k]` and output scales `s_x · s_w[o]`.
    Int8Static {
        /// Codes.
        weight: &'a [i8],
        /// `Σ_k w[o, k]` per output row.
        row_sums: &'a [i32],
        /// `s_x · s_w[o]` per output row, as the CPU rounds it.
        out_scales: &'a [f32],
        /// The fixed input parameters.
        input: AffineU8,
    },
    /// `int8-outlier` (LLM.int8()): int8 codes with one scale per output row, the outlier
    /// threshold and the 16-bit type of the outlier product.
    Int8Outlier {
        /// Codes.
        weight: &'a [i8],
        /// One scale per output row.
        scales: &'a [f32],
        /// Columns with some `|x| > threshold` are outliers.
        threshold: f32,
        /// The outlier product's 16-bit type.
        dtype: OutlierDtype,
    },
    /// `qat-sim`: fake-quantized f32 weights (`code · scale`) and the uint8 parameters
    /// the input is fake-quantized with before an f32 product.
    FakeQuant {
        /// The fake-quantized weight values.
        weight: &'a [f32],
        /// The input's parameters.
        input: AffineU8,
    },
    /// The shared 4-bit block format: `int4-block`, `nf4`, `fp4`, and `kmeans` with 4-bit
    /// indices (9 to 16 clusters).
    Packed4(&'a Packed4),
    /// `kmeans` with indices of other than 4 bits: `bits`-bit indices into the code book,
    /// packed most significant bit first, dequantized to f32 for an f32 product.
    Codebook {
        /// Bits per index.
        bits: u32,
        /// The packed indices.
        indices: &'a [u8],
        /// The centroids.
        codebook: &'a [f32],
    },
}

/// int8 codes as a layer holds them: row-major, or packed for the AVX-512 VNNI product.
#[derive(Debug, Clone, Copy)]
pub enum Int8Codes<'a> {
    /// Row-major `[out, in]`.
    RowMajor(&'a [i8]),
    /// Packed panels ([`Int8Panels`]), on CPUs with AVX-512 VNNI.
    #[cfg(target_arch = "x86_64")]
    Panels(&'a Int8Panels),
}

impl<'a> Int8Codes<'a> {
    /// The codes as row-major `[out, in]` (unpacked when packed).
    pub fn row_major(&self) -> Cow<'a, [i8]> {
        match *self {
            Int8Codes::RowMajor(codes) => Cow::Borrowed(codes),
            #[cfg(target_arch = "x86_64")]
            Int8Codes::Panels(panels) => Cow::Owned(panels.row_major()),
        }
    }

    /// How many codes: one per weight.
    pub fn len(&self) -> usize {
        match self {
            Int8Codes::RowMajor(codes) => codes.len(),
            #[cfg(target_arch = "x86_64")]
            Int8Codes::Panels(panels) => panels.rows() * panels.cols(),
        }
    }

    /// True for a layer without weights.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Int8Codes::RowMajor(codes) => codes.len(),
            #[cfg(target_arch = "x86_64")]
            Int8Codes::Panels(panels) => panels.bytes(),
        }
    }
}

impl WeightParts<'_> {
    /// Bytes of the representation as this process holds it (what a product reads):
    /// values, codes, scales, offsets and per-row terms.
    pub fn bytes(&self) -> usize {
        use std::mem::size_of_val;
        match self {
            WeightParts::Dense { weight, .. } | WeightParts::FakeQuant { weight, .. } => size_of_val(*weight),
            WeightParts::Half { bits, .. } => size_of_val(*bits),
            WeightParts::Int8Dynamic { weight, scales, .. } => weight.bytes() + size_of_val(*scales),
            WeightParts::Int8Outlier { weight, scales, .. } => size_of_val(*weight) + size_of_val(*scales),
            WeightParts::Int8Static { weight, row_sums, out_scales, .. } => {
                size_of_val(*weight) + size_of_val(*row_sums) + size_of_val(*out_scales)
            }
            WeightParts::Packed4(p) => {
                size_of_val(p.bytes.as_slice())
                    + size_of_val(p.scales.as_slice())
                    + p.offsets.as_deref().map_or(0, size_of_val)
            }
            WeightParts::Codebook { indices, codebook, .. } => size_of_val(*indices) + size_of_val(*codebook),
        }
    }
}
