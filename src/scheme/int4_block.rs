//! The `int4-block` scheme: exactly the source article's INT4 block layout (digest 004).
//!
//! The weight is flattened row-major and cut into blocks of `block_size` (default 128)
//! consecutive values, so a block may span two rows. Symmetric (the article):
//! `scale = max|x| / 7` per block (a zero max becomes 1), rounded to bf16 to nearest
//! even, and `q = clamp(round(x / scale), -8, 7)` with the *bf16* scale — the article
//! converts the scales to bf16 before dividing. `round` is half-to-even, as
//! `torch.round`. One difference: the article divides a bf16 weight by the bf16 scale in
//! bf16 arithmetic; here the weight is f32 and the quotient is computed in f32, which can
//! differ only where bf16 rounding of the quotient would cross a .5 boundary. Codes are
//! stored as the low nibble `q & 0x0F`, two per byte, the first value in the high nibble,
//! an odd count padded with a zero nibble; a nibble `u` dequantizes to
//! `((u + 8) % 16 - 8) · scale`.
//!
//! Asymmetric option: per block `min`, `max`, a code `0..=15`,
//! `x ≈ min + q · scale`. The minimum is stored as bf16 (role zero points) rounded
//! *down*, and `scale = (max − min_bf16) / 15` rounded *up* to bf16 (a zero range gives
//! 1), so the stored grid covers the whole block and the round-trip error stays within
//! `scale / 2`; `q = clamp(round((x − min_bf16) / scale), 0, 15)`.

use half::bf16;
use safetensors::tensor::Dtype;

use super::packed4::{block_count, pack_nibbles, quantize_blocks, Packed4, EXACT_GEMV_PARAM};
use super::{
    Calibration, DenseWeight, DeviceSupport, LayerParts, Linear, ParamInfo, ParamKind, Scheme, SchemeInfo,
    SchemeParams, StoredSource, StoredTensor, TensorRole, WeightParts,
};
use crate::error::{Error, Result};

/// The article's block size.
const DEFAULT_BLOCK: usize = 128;

/// Code values of the symmetric format: nibble `u` means `(u + 8) % 16 - 8`.
const SIGNED_TABLE: [f32; 16] = [0., 1., 2., 3., 4., 5., 6., 7., -8., -7., -6., -5., -4., -3., -2., -1.];

/// Code values of the asymmetric format: nibble `u` means `u`.
const UNSIGNED_TABLE: [f32; 16] = [0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.];

/// A configured `int4-block` scheme.
#[derive(Debug, Clone, Copy)]
struct Int4Block {
    block: usize,
    asymmetric: bool,
    /// Keep the fused GEMV's activations in f32 (see `packed4_gemv`).
    exact_gemv: bool,
}

/// Per-block quantization of a flattened weight: the codes and the stored (bf16)
/// scales and minima.
struct Quantized {
    codes: Vec<u8>,
    scales: Vec<bf16>,
    minima: Option<Vec<bf16>>,
}

/// `v` rounded to bf16 towards −∞.
fn bf16_down(v: f32) -> bf16 {
    let r = bf16::from_f32(v);
    if r.to_f32() > v {
        bf16::from_f32(next_down(r.to_f32()))
    } else {
        r
    }
}

/// `v` rounded to bf16 towards +∞.
fn bf16_up(v: f32) -> bf16 {
    let r = bf16::from_f32(v);
    if r.to_f32() < v {
        bf16::from_f32(next_up(r.to_f32()))
    } else {
        r
    }
}

/// The next bf16 above a bf16 value `v` (finite).
fn next_up(v: f32) -> f32 {
    step_bf16(v, 1)
}

/// The next bf16 below a bf16 value `v` (finite).
fn next_down(v: f32) -> f32 {
    step_bf16(v, -1)
}

/// Move a bf16 value by one unit in the last place in direction `dir` (±1).
fn step_bf16(v: f32, dir: i32) -> f32 {
    let bits = bf16::from_f32(v).to_bits();
    let toward_larger_magnitude = (v > 0.0) == (dir > 0) && v != 0.0;
    let next = if v == 0.0 {
        if dir > 0 {
            0x0001
        } else {
            0x8001
        }
    } else if toward_larger_magnitude {
        bits + 1
    } else {
        bits - 1
    };
    bf16::from_bits(next).to_f32()
}

/// Symmetric quantization (the article's).
fn quantize_symmetric(data: &[f32], block: usize) -> Quantized {
    let (codes, scales) = quantize_blocks(data, block, |chunk, codes| {
        let max = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max = if max == 0.0 { 1.0 } else { max };
        let scale = bf16::from_f32(max / 7.0);
        let s = scale.to_f32();
        for (code, &x) in codes.iter_mut().zip(chunk) {
            *code = ((x / s).round_ties_even().clamp(-8.0, 7.0) as i8 as u8) & 0x0F;
        }
        scale
    });
    Quantized { codes, scales, minima: None }
}

/// Asymmetric quantization: minimum rounded down, scale rounded up (see the module doc).
fn quantize_asymmetric(data: &[f32], block: usize) -> Quantized {
    let (codes, params) = quantize_blocks(data, block, |chunk, codes| {
        let min = chunk.iter().copied().fold(f32::INFINITY, f32::min);
        let max = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = bf16_down(min);
        let m = min.to_f32();
        let range = max - m;
        let scale = if range > 0.0 { bf16_up(range / 15.0) } else { bf16::ONE };
        let s = scale.to_f32();
        for (code, &x) in codes.iter_mut().zip(chunk) {
            *code = ((x - m) / s).round_ties_even().clamp(0.0, 15.0) as u8;
        }
        (scale, min)
    });
    let (scales, minima) = params.into_iter().unzip();
    Quantized { codes, scales, minima: Some(minima) }
}

impl Int4Block {
    /// The packed weight from stored codes, scales and minima.
    fn packed(
        &self,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
        scales: &[bf16],
        minima: Option<&[bf16]>,
    ) -> Packed4 {
        Packed4 {
            rows,
            cols,
            block: self.block,
            bytes,
            table: if minima.is_some() { UNSIGNED_TABLE } else { SIGNED_TABLE },
            scales: scales.iter().map(|s| s.to_f32()).collect(),
            offsets: minima.map(|m| m.iter().map(|v| v.to_f32()).collect()),
            exact_gemv: self.exact_gemv,
        }
    }
}

/// An `int4-block` linear layer.
struct Int4Linear {
    packed: Packed4,
    scales: Vec<bf16>,
    minima: Option<Vec<bf16>>,
    bias: Option<Vec<f32>>,
}

impl Linear for Int4Linear {
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
        let p = &self.packed;
        let mut out = vec![
            packed_weights(name, p),
            bf16_tensor(format!("{name}.scale"), TensorRole::Scales, &self.scales),
        ];
        if let Some(minima) = &self.minima {
            out.push(bf16_tensor(format!("{name}.zero_point"), TensorRole::ZeroPoints, minima));
        }
        out.extend(super::bias_tensor(name, self.bias.as_deref()));
        out
    }
}

/// The `{name}.weight` tensor of a nibble-packed layer: U8 `[ceil(rows·cols/2)]`.
pub(super) fn packed_weights(name: &str, p: &Packed4) -> StoredTensor {
    StoredTensor {
        name: format!("{name}.weight"),
        role: TensorRole::PackedWeights,
        dtype: Dtype::U8,
        shape: vec![p.bytes.len()],
        bytes: p.bytes.clone(),
        represents: p.rows * p.cols,
    }
}

/// A bf16 tensor of one dimension.
fn bf16_tensor(name: String, role: TensorRole, values: &[bf16]) -> StoredTensor {
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    StoredTensor { name, role, dtype: Dtype::BF16, shape: vec![values.len()], bytes, represents: 0 }
}

/// Read a tensor of the expected dtype, or say which dtype was found.
pub(super) fn read_raw(
    source: &dyn StoredSource,
    name: &str,
    shape: &[usize],
    dtype: Dtype,
) -> Result<Vec<u8>> {
    let (found, bytes) = source.raw(name, shape)?;
    if found != dtype {
        return Err(Error::Scheme {
            scheme: "load".to_string(),
            message: format!("tensor `{name}` is {found:?}, expected {dtype:?}"),
        });
    }
    Ok(bytes)
}

/// Decode little-endian bf16 bytes.
fn bf16_values(bytes: &[u8]) -> Vec<bf16> {
    bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect()
}

impl Scheme for Int4Block {
    fn quantize(
        &self,
        weight: DenseWeight,
        bias: Option<Vec<f32>>,
        _: Option<Calibration>,
    ) -> Result<Box<dyn Linear>> {
        let q = if self.asymmetric {
            quantize_asymmetric(&weight.data, self.block)
        } else {
            quantize_symmetric(&weight.data, self.block)
        };
        let packed =
            self.packed(weight.rows, weight.cols, pack_nibbles(&q.codes), &q.scales, q.minima.as_deref());
        Ok(Box::new(Int4Linear { packed, scales: q.scales, minima: q.minima, bias }))
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
        let scales = bf16_values(&read_raw(source, &format!("{name}.scale"), &[nb], Dtype::BF16)?);
        let minima = if self.asymmetric {
            Some(bf16_values(&read_raw(source, &format!("{name}.zero_point"), &[nb], Dtype::BF16)?))
        } else {
            None
        };
        let packed = self.packed(rows, cols, bytes, &scales, minima.as_deref());
        Ok(Box::new(Int4Linear { packed, scales, minima, bias }))
    }
}

/// Read a positive `block_size` parameter.
pub(super) fn block_size(scheme: &str, params: &SchemeParams, default: usize) -> Result<usize> {
    let block = params.integer("block_size", default as u64);
    if block == 0 || block > u32::MAX as u64 {
        return Err(Error::Scheme {
            scheme: scheme.to_string(),
            message: format!("parameter `block_size` is {block}, expected a positive integer below 2^32"),
        });
    }
    Ok(block as usize)
}

fn build(params: &SchemeParams) -> Result<Box<dyn Scheme>> {
    let block = block_size(INT4_BLOCK.name, params, DEFAULT_BLOCK)?;
    Ok(Box::new(Int4Block {
        block,
        asymmetric: params.bool("asymmetric", false),
        exact_gemv: params.bool(EXACT_GEMV_PARAM.name, false),
    }))
}

pub(super) const INT4_BLOCK: SchemeInfo = SchemeInfo {
    name: "int4-block",
    summary:
        "4-bit blocks of 128 over the flattened weight, scale absmax/7 in bf16 (the source article's layout)",
    // 4 bits + one bf16 scale per 128 weights (asymmetric adds a bf16 minimum: 4.25).
    bits_per_weight: 4.0 + 16.0 / DEFAULT_BLOCK as f64,
    block_size: Some(DEFAULT_BLOCK),
    needs_calibration: false,
    devices: DeviceSupport::CpuAndCuda,
    params: &[
        ParamInfo {
            name: "block_size",
            kind: ParamKind::Integer,
            default: "128",
            help: "values per block over the flattened weight (blocks may span rows)",
        },
        ParamInfo {
            name: "asymmetric",
            kind: ParamKind::Bool,
            default: "false",
            help: "per-block min/max with codes 0..15 and a bf16 minimum (zero point)",
        },
        EXACT_GEMV_PARAM,
    ],
    build,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SeededRng;

    fn layer(data: Vec<f32>, rows: usize, cols: usize, block: usize, asymmetric: bool) -> Box<dyn Linear> {
        let w = DenseWeight { name: "w".into(), rows, cols, data };
        Int4Block { block, asymmetric, exact_gemv: false }.quantize(w, None, None).unwrap()
    }

    #[test]
    fn five_values_make_three_bytes_high_nibble_first() {
        // max|x| = 7 → scale 1 (exact in bf16); codes 1, -2 (0xE), 7, -7 (0x9), and
        // 2.5 → 2 (half to even); the fifth value's byte is padded with a zero nibble.
        let q = quantize_symmetric(&[1.0, -2.0, 7.0, -7.0, 2.5], 128);
        assert_eq!(q.codes, vec![0x1, 0xE, 0x7, 0x9, 0x2]);
        assert_eq!(q.scales, vec![bf16::ONE]);
        assert_eq!(pack_nibbles(&q.codes), vec![0x1E, 0x79, 0x20]);
        let l = layer(vec![1.0, -2.0, 7.0, -7.0, 2.5], 1, 5, 128, false);
        let t = l.export("l");
        assert_eq!(t[0].bytes, vec![0x1E, 0x79, 0x20]);
        assert_eq!((t[0].shape.clone(), t[0].represents), (vec![3], 5));
        assert_eq!(t[1].bytes, bf16::ONE.to_le_bytes().to_vec());
    }

    #[test]
    fn zero_block_gets_scale_one_and_halves_round_to_even() {
        let q = quantize_symmetric(&[0.0; 4], 4);
        assert_eq!(q.scales, vec![bf16::from_f32(1.0 / 7.0)]);
        assert_eq!(q.codes, vec![0; 4]);
        // scale 14/7 = 2: 1 → 0.5 → 0, 3 → 1.5 → 2, -5 → -2.5 → -2, 14 → 7.
        let q = quantize_symmetric(&[1.0, 3.0, -5.0, 14.0], 4);
        assert_eq!(q.codes, vec![0, 2, 0xE, 7]);
    }

    #[test]
    fn dequantization_maps_nibbles_back_to_signed_values() {
        let p = Int4Block { block: 16, asymmetric: false, exact_gemv: false }.packed(
            1,
            16,
            pack_nibbles(&(0..16).collect::<Vec<u8>>()),
            &[bf16::from_f32(0.5)],
            None,
        );
        let expected: Vec<f32> = (0..16).map(|u| ((u + 8) % 16 - 8) as f32 * 0.5).collect();
        assert_eq!(p.dequantize(), expected);
    }

    /// |x − deq(q(x))| ≤ scale/2 over many seeds, shapes and both variants.
    #[test]
    fn round_trip_error_is_within_half_a_step() {
        for seed in 0..40u64 {
            let (rows, cols) = (1 + seed as usize % 5, 3 + (seed as usize * 7) % 70);
            let block = [4, 7, 32, 128][seed as usize % 4];
            let mut data = SeededRng::new(seed).normal_vec(rows * cols, 1.0 + seed as f64);
            data.iter_mut().step_by(5).for_each(|v| *v += seed as f32); // shifted blocks
            for asymmetric in [false, true] {
                let s = Int4Block { block, asymmetric, exact_gemv: false };
                let q = if asymmetric {
                    quantize_asymmetric(&data, block)
                } else {
                    quantize_symmetric(&data, block)
                };
                let p = s.packed(rows, cols, pack_nibbles(&q.codes), &q.scales, q.minima.as_deref());
                for (i, (&x, &d)) in data.iter().zip(&p.dequantize()).enumerate() {
                    let scale = q.scales[i / block].to_f32();
                    // f32 rounding of x/scale and of the dequantized product.
                    let slack = 4.0 * f32::EPSILON * x.abs().max(scale * 15.0);
                    assert!(
                        (x - d).abs() <= scale / 2.0 + slack,
                        "seed {seed} asym {asymmetric} i {i}: {x} → {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn directed_bf16_rounding_brackets_the_value() {
        for &v in &[1.0f32, 0.1, -0.1, 3.3e-3, -7.77, 0.0, 1e30] {
            assert!(bf16_down(v).to_f32() <= v && bf16_up(v).to_f32() >= v, "{v}");
            assert!(bf16_up(v).to_f32() - bf16_down(v).to_f32() <= v.abs() / 64.0 + 1e-38, "{v}");
        }
    }

    #[test]
    fn fused_kernels_match_the_reference_with_blocks_spanning_rows() {
        for (seed, &(rows, cols, block)) in
            [(3, 50, 128), (7, 129, 128), (5, 33, 20), (16, 256, 128)].iter().enumerate()
        {
            for asymmetric in [false, true] {
                let data = SeededRng::new(seed as u64).normal_vec(rows * cols, 1.0);
                let q = if asymmetric {
                    quantize_asymmetric(&data, block)
                } else {
                    quantize_symmetric(&data, block)
                };
                let p = Int4Block { block, asymmetric, exact_gemv: false }.packed(
                    rows,
                    cols,
                    pack_nibbles(&q.codes),
                    &q.scales,
                    q.minima.as_deref(),
                );
                crate::scheme::kernels::packed4_gemv::testing::check_kernels(&p, seed as u64);
            }
        }
    }

    #[test]
    fn exports_scales_and_zero_points_with_roles() {
        let l = layer(SeededRng::new(1).normal_vec(3 * 100, 1.0), 3, 100, 128, true);
        let t = l.export("l");
        let roles: Vec<_> = t.iter().map(|t| (t.name.as_str(), t.role, t.dtype, t.shape.clone())).collect();
        assert_eq!(
            roles,
            vec![
                ("l.weight", TensorRole::PackedWeights, Dtype::U8, vec![150]),
                ("l.scale", TensorRole::Scales, Dtype::BF16, vec![3]),
                ("l.zero_point", TensorRole::ZeroPoints, Dtype::BF16, vec![3]),
            ]
        );
    }

    #[test]
    fn bad_block_size_is_an_error_naming_the_parameter() {
        let mut p = SchemeParams::default();
        p.0.insert("block_size".into(), serde_json::json!(0));
        let err = build(&p).err().unwrap().to_string();
        assert!(err.contains("block_size") && err.contains("is 0"), "{err}");
    }
}
