//! The ggml tensor types this reader decodes, block by block, to f32.

use super::*;

/// The ggml tensor types this reader dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: f16 scale d, 32 × i8; x = d·q.
    Q8_0,
    /// Blocks of 32: f16 scale d, 16 bytes of nibbles; x = d·(q − 8).
    Q4_0,
    /// Blocks of 32: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = d·q + m.
    Q4_1,
}

/// Every supported type, in the order messages list them.
pub(super) const SUPPORTED: [GgmlType; 6] =
    [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1];

impl GgmlType {
    /// The type with ggml id `id`, if supported.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        SUPPORTED.into_iter().find(|t| t.id() == id)
    }

    /// ggml's numeric id (the value stored in tensor infos).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name, e.g. `Q4_1`.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
        }
    }

    /// Decode one block (`block_bytes` long) into `out` (`block_size` long).
    pub(super) fn decode_block(self, block: &[u8], out: &mut [f32]) {
        match self {
            GgmlType::F32 => out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
            GgmlType::F16 => out[0] = f16::from_le_bytes([block[0], block[1]]).to_f32(),
            GgmlType::BF16 => out[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32(),
            GgmlType::Q8_0 => decode_q8_0(block, out),
            GgmlType::Q4_0 => {
                let d = half_at(block, 0);
                decode_nibbles(&block[2..18], out, |q| d * (f32::from(q) - 8.0))
            }
            GgmlType::Q4_1 => {
                let (d, m) = (half_at(block, 0), half_at(block, 2));
                decode_nibbles(&block[4..20], out, |q| d * f32::from(q) + m)
            }
        }
    }
}

/// ggml's name of any type id it has defined, for messages about unsupported types.
pub(super) fn ggml_type_name(id: u32) -> Option<&'static str> {
    const NAMES: &[(u32, &str)] = &[
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
        (29, "IQ1_M"),
        (30, "BF16"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
    ];
    NAMES.iter().find(|(i, _)| *i == id).map(|(_, name)| *name)
}

/// The f16 stored at `at` in `block`.
pub(super) fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

pub(super) fn decode_q8_0(block: &[u8], out: &mut [f32]) {
    let d = half_at(block, 0);
    for (x, &q) in out.iter_mut().zip(&block[2..34]) {
        *x = d * f32::from(q as i8);
    }
}

/// The 16 nibble bytes of a 4-bit block: byte j holds element j in its low nibble and
/// element j + 16 in its high nibble; `value(q)` applies the type's formula.
pub(super) fn decode_nibbles(nibbles: &[u8], out: &mut [f32], value: impl Fn(u8) -> f32) {
    let (low, high) = out.split_at_mut(16);
    for ((&byte, lo), hi) in nibbles.iter().zip(low).zip(high) {
        *lo = value(byte & 0x0f);
        *hi = value(byte >> 4);
    }
}

/// Decode `elements` values of type `ty` from `data` (whose length open() checked).
pub(super) fn decode(ty: GgmlType, data: &[u8], elements: usize) -> Vec<f32> {
    // Chunks of many blocks keep rayon's per-task cost negligible.
    const BLOCKS_PER_TASK: usize = 4096;
    let (block, bytes) = (ty.block_size(), ty.block_bytes());
    let mut out = vec![0f32; elements];
    out.par_chunks_mut(block * BLOCKS_PER_TASK).zip(data.par_chunks(bytes * BLOCKS_PER_TASK)).for_each(
        |(out, data)| {
            for (values, raw) in out.chunks_exact_mut(block).zip(data.chunks_exact(bytes)) {
                ty.decode_block(raw, values);
            }
        },
    );
    out
}
