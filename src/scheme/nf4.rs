//! The `nf4` and `fp4` schemes: bitsandbytes' 4-bit code books (QLoRA), absmax scaling
//! per block of 64 consecutive values of the flattened weight, and optional double
//! quantization of the absmax scales.
//!
//! Code values. NF4 is the table of bitsandbytes' `get_4bit_type("nf4")` (the output of
//! `create_normal_map`, also the `nf4_data` constant of its `csrc/kernels.cu` and
//! Appendix E of the QLoRA paper, arXiv:2305.14314). FP4 is `get_4bit_type("fp4")`:
//! `[0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3] / 12`, a sign bit
//! (bit 3), two exponent bits and one mantissa bit with bias 3 (the layout its tests
//! decode); index order is bitsandbytes', so saved codes mean the same thing there.
//!
//! Quantization, as bitsandbytes' `kQuantizeBlockwise`: `absmax` per block (f32),
//! `x / absmax` to the nearest code (its decision trees compare against the midpoints
//! with `>`, so a value exactly on a midpoint takes the smaller code; FP4 takes the sign
//! from `x < 0` and the nearest magnitude). Two codes per byte, the first value in the
//! high nibble (`packed = q[2j] << 4 | q[2j+1]` in its kernel). A block whose absmax is 0
//! stores codes for 0 (bitsandbytes would divide by zero there).
//!
//! Double quantization (bitsandbytes' `compress_statistics=True`): `offset = mean(absmax)`
//! and `absmax − offset` quantized with `quantize_blockwise` in blocks of 256: an f32
//! absmax per block of 256 scales, each scale the nearest of the 256-value signed dynamic
//! map of `create_dynamic_map` (8 bits). The weights are quantized with the original
//! absmax; dequantization uses `code[q]·absmax₂ + offset`. Simplification: the dynamic
//! map's values are computed here in f64 and rounded to f32 once, where torch computes the
//! `linspace` and midpoints in f32, so a value may differ from torch's in its last bit.

use safetensors::tensor::Dtype;

use super::int4_block::{block_size, packed_weights, read_raw};
use super::packed4::{block_count, pack_nibbles, quantize_blocks, Packed4, EXACT_GEMV_PARAM};
use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, ParamInfo, ParamKind, Scheme, SchemeInfo,
    SchemeParams, StoredSource, StoredTensor, TensorRole, WeightParts,
};
use crate::error::Result;

/// bitsandbytes' NF4 code values, in code order.
// The digits are bitsandbytes' as published (f64 prints of the f32 values), kept verbatim
// so they can be compared with the source.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' FP4 code values, in code order (its table divided by its maximum, 12).
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// bitsandbytes' default 4-bit block size.
const DEFAULT_BLOCK: usize = 64;

/// Scales per block of the double quantization (bitsandbytes' `blocksize=256`).
const DQ_BLOCK: usize = 256;

/// Which code book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Nf4,
    Fp4,
}

impl Format {
    fn table(self) -> &'static [f32; 16] {
        match self {
            Format::Nf4 => &NF4_CODE,
            Format::Fp4 => &FP4_CODE,
        }
    }

    /// The code of a normalised value `v` in [-1, 1]: nearest code value, a tie going to
    /// the smaller value (FP4: sign bit from `v < 0`, then the nearest magnitude).
    fn encode(self, v: f32) -> u8 {
        match self {
            Format::Nf4 => nearest(&NF4_CODE, 0..16, v),
            Format::Fp4 => {
                let sign = if v < 0.0 { 8 } else { 0 };
                sign | nearest(&FP4_CODE, 0..8, v.abs())
            }
        }
    }
}

/// The index in `candidates` whose `table` value is nearest `v`; a tie takes the smaller
/// value.
fn nearest(table: &[f32; 16], candidates: std::ops::Range<u8>, v: f32) -> u8 {
    let mut best = candidates.start;
    for i in candidates {
        let (d, db) = ((table[i as usize] - v).abs(), (table[best as usize] - v).abs());
        if d < db || (d == db && table[i as usize] < table[best as usize]) {
            best = i;
        }
    }
    best
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`,
/// sorted: for each exponent `i` in 0..7, the midpoints of `linspace(0.1, 1, 2^i + 1)`
/// times `10^(i−6)`, both signs; then 0 and 1.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..7 {
        let items = (1usize << i) + 1;
        let bounds: Vec<f64> = (0..items).map(|j| 0.1 + 0.9 * j as f64 / (items - 1) as f64).collect();
        let scale = 10f64.powi(i - 6);
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f64::total_cmp);
    let mut out = [0.0f32; 256];
    out.iter_mut().zip(&data).for_each(|(o, d)| *o = *d as f32);
    out
}

/// The index of the value of sorted `map` nearest `v` (a tie takes the smaller value).
fn nearest_sorted(map: &[f32], v: f32) -> u8 {
    let hi = map.partition_point(|&m| m < v).min(map.len() - 1);
    let lo = hi.saturating_sub(1);
    if (v - map[lo]).abs() <= (map[hi] - v).abs() {
        lo as u8
    } else {
        hi as u8
    }
}

/// Double-quantized absmax scales.
#[derive(Debug, Clone, PartialEq)]
struct DoubleQuant {
    codes: Vec<u8>,
    absmax: Vec<f32>,
    offset: f32,
}

impl DoubleQuant {
    /// Quantize the per-block scales.
    fn new(scales: &[f32]) -> Self {
        let map = dynamic_map();
        let offset = (scales.iter().map(|&s| s as f64).sum::<f64>() / scales.len().max(1) as f64) as f32;
        let mut codes = Vec::with_capacity(scales.len());
        let mut absmax = Vec::with_capacity(block_count(scales.len(), DQ_BLOCK));
        for chunk in scales.chunks(DQ_BLOCK) {
            let m = chunk.iter().fold(0.0f32, |m, &s| m.max((s - offset).abs()));
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            codes.extend(chunk.iter().map(|&s| nearest_sorted(&map, (s - offset) * inv)));
            absmax.push(m);
        }
        DoubleQuant { codes, absmax, offset }
    }

    /// The reconstructed per-block scales.
    fn scales(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.absmax[i / DQ_BLOCK] + self.offset)
            .collect()
    }
}

/// A configured `nf4` / `fp4` scheme.
#[derive(Debug, Clone, Copy)]
struct CodeBook4 {
    format: Format,
    block: usize,
    double_quant: bool,
    /// Keep the fused GEMV's activations in f32 (see `packed4_gemv`).
    exact_gemv: bool,
}

/// An `nf4` / `fp4` linear layer.
struct CodeBookLinear {
    packed: Packed4,
    /// The stored scales: f32 absmax, or their double quantization.
    stored: Scales,
    bias: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
enum Scales {
    Plain(Vec<f32>),
    Double(DoubleQuant),
}

impl Scales {
    fn values(&self) -> Vec<f32> {
        match self {
            Scales::Plain(s) => s.clone(),
            Scales::Double(dq) => dq.scales(),
        }
    }
}

impl CodeBook4 {
    /// Codes and f32 absmax per block of the flattened weight.
    fn quantize_codes(&self, data: &[f32]) -> (Vec<u8>, Vec<f32>) {
        quantize_blocks(data, self.block, |chunk, codes| {
            let m = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            for (code, &x) in codes.iter_mut().zip(chunk) {
                *code = self.format.encode(x * inv);
            }
            m
        })
    }

    fn layer(
        &self,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
        stored: Scales,
        bias: Option<Vec<f32>>,
    ) -> CodeBookLinear {
        let packed = Packed4 {
            rows,
            cols,
            block: self.block,
            bytes,
            table: *self.format.table(),
            scales: stored.values(),
            offsets: None,
            exact_gemv: self.exact_gemv,
        };
        CodeBookLinear { packed, stored, bias }
    }
}

impl Linear for CodeBookLinear {
    fn in_features(&self) -> usize {
        self.packed.cols
    }

    fn out_features(&self) -> usize {
        self.packed.rows
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        self.packed.matmul(x, rows, out);
        super::add_bias(out, self.bias.as_deref());
    }

    fn kernel(&self) -> &'static str {
        self.packed.kernel()
    }

    fn parts(&self) -> LayerParts<'_> {
        LayerParts { weights: WeightParts::Packed4(&self.packed), bias: self.bias.as_deref() }
    }

    fn export(&self, name: &str) -> Vec<StoredTensor> {
        let mut out = vec![packed_weights(name, &self.packed)];
        match &self.stored {
            Scales::Plain(s) => {
                out.push(StoredTensor::f32(format!("{name}.scale"), TensorRole::Scales, vec![s.len()], s))
            }
            Scales::Double(dq) => {
                out.push(StoredTensor {
                    name: format!("{name}.scale"),
                    role: TensorRole::Scales,
                    dtype: Dtype::U8,
                    shape: vec![dq.codes.len()],
                    bytes: dq.codes.clone(),
                    represents: 0,
                });
                let absmax = format!("{name}.scale_absmax");
                out.push(StoredTensor::f32(absmax, TensorRole::Scales, vec![dq.absmax.len()], &dq.absmax));
                out.push(StoredTensor::f32(
                    format!("{name}.scale_offset"),
                    TensorRole::Scales,
                    vec![1],
                    &[dq.offset],
                ));
            }
        }
        out.extend(super::bias_tensor(name, self.bias.as_deref()));
        out
    }
}

impl Scheme for CodeBook4 {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        _: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        let (codes, absmax) = self.quantize_codes(&weight.data);
        let stored =
            if self.double_quant { Scales::Double(DoubleQuant::new(&absmax)) } else { Scales::Plain(absmax) };
        Ok(Box::new(self.layer(weight.rows, weight.cols, pack_nibbles(&codes), stored, bias)))
    }

    fn load(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        bias: Option<Vec<f32>>,
        source: &dyn StoredSource,
    ) -> Result<Box<dyn Linear>> {
        let n = rows * cols;
        let nb = block_count(n, self.block);
        let bytes = read_raw(source, &format!("{name}.weight"), &[n.div_ceil(2)], Dtype::U8)?;
        let stored = if self.double_quant {
            let codes = read_raw(source, &format!("{name}.scale"), &[nb], Dtype::U8)?;
            let absmax = source.f32(&format!("{name}.scale_absmax"), &[block_count(nb, DQ_BLOCK)])?;
            let offset = source.f32(&format!("{name}.scale_offset"), &[1])?[0];
            Scales::Double(DoubleQuant { codes, absmax, offset })
        } else {
            Scales::Plain(source.f32(&format!("{name}.scale"), &[nb])?)
        };
        Ok(Box::new(self.layer(rows, cols, bytes, stored, bias)))
    }
}

fn build(name: &str, format: Format, params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    let block = block_size(name, params, DEFAULT_BLOCK)?;
    Ok(Box::new(CodeBook4 {
        format,
        block,
        double_quant: params.bool("double_quant", false),
        exact_gemv: params.bool(EXACT_GEMV_PARAM.name, false),
    }))
}

fn build_nf4(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    build(NF4.name, Format::Nf4, params)
}

fn build_fp4(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    build(FP4.name, Format::Fp4, params)
}

const PARAMS: &[ParamInfo] = &[
    ParamInfo {
        name: "block_size",
        kind: ParamKind::Integer,
        default: "64",
        help: "values per absmax block over the flattened weight",
    },
    ParamInfo {
        name: "double_quant",
        kind: ParamKind::Bool,
        default: "false",
        help: "quantize the absmax scales to 8 bits in blocks of 256 (bitsandbytes' compress_statistics)",
    },
    EXACT_GEMV_PARAM,
];

/// 4 bits + an f32 absmax per 64 weights (double quantization: 4 + 8/64 + 32/(64·256)).
const BITS: f64 = 4.0 + 32.0 / DEFAULT_BLOCK as f64;

pub(super) const NF4: SchemeInfo = SchemeInfo {
    name: "nf4",
    summary: "bitsandbytes NormalFloat4 code book, absmax per block of 64, optional double quantization",
    bits_per_weight: BITS,
    block_size: Some(DEFAULT_BLOCK),
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
    params: PARAMS,
    build: build_nf4,
};

pub(super) const FP4: SchemeInfo = SchemeInfo {
    name: "fp4",
    summary: "bitsandbytes FP4 (e2m1) code book, absmax per block of 64, optional double quantization",
    bits_per_weight: BITS,
    block_size: Some(DEFAULT_BLOCK),
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
    params: PARAMS,
    build: build_fp4,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    #[test]
    fn code_books_equal_the_published_tables() {
        // QLoRA appendix E / bitsandbytes `nf4_data`, as printed (f32 values).
        let nf4: [f32; 16] = [
            -1.0,
            -0.696_192_8,
            -0.525_073_05,
            -0.394_917_5,
            -0.284_441_38,
            -0.184_773_43,
            -0.091_050_036,
            0.0,
            0.079_580_3,
            0.160_930_2,
            0.246_112_3,
            0.337_915_24,
            0.440_709_83,
            0.562_617,
            0.722_956_84,
            1.0,
        ];
        assert_eq!(NF4_CODE.map(f32::to_bits), nf4.map(f32::to_bits));
        // bitsandbytes' kernel constants `dDequantizeFP4Tree` (to its printed precision).
        let fp4 = [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25];
        for (i, &v) in fp4.iter().enumerate() {
            assert!((FP4_CODE[i] - v as f32).abs() < 1e-7 && FP4_CODE[i + 8] == -FP4_CODE[i], "{i}");
        }
        assert!(FP4_CODE[8].is_sign_negative());
    }

    #[test]
    fn nearest_code_on_hand_inputs() {
        assert_eq!(Format::Nf4.encode(1.0), 15);
        assert_eq!(Format::Nf4.encode(-1.0), 0);
        assert_eq!(Format::Nf4.encode(0.01), 7);
        assert_eq!(Format::Nf4.encode(0.05), 8); // nearer 0.0796 than 0
        assert_eq!(Format::Nf4.encode(-0.6), 2); // −0.525 is 0.075 away, −0.696 is 0.096
        assert_eq!(Format::Fp4.encode(0.9), 3); // 1.0
        assert_eq!(Format::Fp4.encode(-0.3), 12); // −4/12
        assert_eq!(Format::Fp4.encode(0.2), 6); // 2/12
        assert_eq!(Format::Fp4.encode(-0.0), 0);
        // A midpoint takes the smaller magnitude: (0.25 + 1/3)/2.
        assert_eq!(Format::Fp4.encode((0.25f64 + 1.0 / 3.0) as f32 / 2.0), 7);
    }

    /// Half the largest gap between neighbouring code values.
    fn half_max_gap(table: &[f32; 16]) -> f32 {
        let mut v = table.to_vec();
        v.sort_by(f32::total_cmp);
        v.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0
    }

    #[test]
    fn round_trip_error_is_within_half_the_largest_gap() {
        for format in [Format::Nf4, Format::Fp4] {
            let bound = half_max_gap(format.table());
            for seed in 0..10 {
                let s = CodeBook4 {
                    format,
                    block: [64, 7, 128][seed % 3],
                    double_quant: false,
                    exact_gemv: false,
                };
                let data = SeededRng::new(seed as u64).normal_vec(3 * 91, 0.5);
                let (codes, absmax) = s.quantize_codes(&data);
                let layer = s.layer(3, 91, pack_nibbles(&codes), Scales::Plain(absmax.clone()), None);
                for (i, (&x, d)) in data.iter().zip(layer.packed.dequantize()).enumerate() {
                    let a = absmax[i / s.block];
                    assert!((x - d).abs() <= bound * a * (1.0 + 1e-5), "{format:?} {i}: {x} → {d}");
                }
            }
        }
    }

    #[test]
    fn dynamic_map_has_256_sorted_values_from_minus_one_to_one() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((map[0], map[255]), (-0.992_968_75, 1.0));
        assert!(map.contains(&0.0) && map.contains(&0.55e-6));
    }

    #[test]
    fn double_quant_reconstructs_scales_within_its_bound() {
        let map = dynamic_map();
        let half_gap = map.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0;
        let scales: Vec<f32> =
            SeededRng::new(9).normal_vec(1000, 1.0).iter().map(|v| v.abs() + 0.1).collect();
        let dq = DoubleQuant::new(&scales);
        for (i, (&s, r)) in scales.iter().zip(dq.scales()).enumerate() {
            let bound = half_gap * dq.absmax[i / DQ_BLOCK] * (1.0 + 1e-5) + 1e-6;
            assert!((s - r).abs() <= bound, "{i}: {s} → {r} (bound {bound})");
        }
        assert_eq!((dq.codes.len(), dq.absmax.len()), (1000, 4));
    }

    #[test]
    fn bits_per_weight_accounting() {
        let n = 256 * 64 * 4;
        let data = SeededRng::new(2).normal_vec(n, 1.0);
        for (dq, expected) in [(false, 4.5), (true, 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0))] {
            let s = CodeBook4 { format: Format::Nf4, block: 64, double_quant: dq, exact_gemv: false };
            let w = DenseWeight { name: "w".into(), rows: 64, cols: n / 64, data: data.clone() };
            let t = s.quantize(w, None, None).unwrap().export("l");
            let bits: usize =
                t.iter().filter(|t| t.role.is_weight_representation()).map(|t| t.bytes.len() * 8).sum();
            let bpw = bits as f64 / t[0].represents as f64;
            // The one f32 offset of double quantization adds 32 bits per tensor.
            let extra = if dq { 32.0 / n as f64 } else { 0.0 };
            assert!((bpw - expected - extra).abs() < 1e-12, "dq {dq}: {bpw}");
        }
        assert_eq!(NF4.bits_per_weight, 4.5);
    }

    #[test]
    fn packs_the_first_value_in_the_high_nibble() {
        let s = CodeBook4 { format: Format::Nf4, block: 64, double_quant: false, exact_gemv: false };
        let w = DenseWeight { name: "w".into(), rows: 1, cols: 3, data: vec![1.0, -1.0, 0.0] };
        let t = s.quantize(w, None, None).unwrap().export("l");
        assert_eq!(t[0].bytes, vec![0xF0, 0x70]);
    }

    #[test]
    fn fused_kernels_match_the_reference() {
        for (seed, format) in [Format::Nf4, Format::Fp4].into_iter().enumerate() {
            for dq in [false, true] {
                let s = CodeBook4 { format, block: 64, double_quant: dq, exact_gemv: false };
                let w = DenseWeight {
                    name: "w".into(),
                    rows: 9,
                    cols: 77,
                    data: SeededRng::new(seed as u64).normal_vec(9 * 77, 1.0),
                };
                let (codes, absmax) = s.quantize_codes(&w.data);
                let stored =
                    if dq { Scales::Double(DoubleQuant::new(&absmax)) } else { Scales::Plain(absmax) };
                let layer = s.layer(9, 77, pack_nibbles(&codes), stored, None);
                crate::scheme::kernels::packed4_gemv::testing::check_kernels(&layer.packed, seed as u64);
            }
        }
    }
}
