//! GGUF v3 (and v2) reader: metadata, tensor directory, dequantization of the float and
//! legacy block types to f32 in Hugging Face layout, and the config.json / tokenizer.json
//! equivalents of a Llama checkpoint, so a llama.cpp file loads like a Hugging Face one.
//!
//! Layout read here (little-endian): magic `GGUF`, version (u32), tensor count (u64),
//! metadata count (u64), metadata key/value pairs, tensor infos, padding to
//! `general.alignment` (default 32), then the tensor data. Every length and offset is
//! checked against the file size before it is used.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::error::dims_text;
use crate::error::{Error, Result};

/// Alignment of the data section when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions.
const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are treated as corrupt (real files nest at most once),
/// so a crafted file cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 8;
/// The fewest bytes one tensor info takes: name length, dimension count, one dimension,
/// type and offset.
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 8 + 4 + 8;
/// The fewest bytes one metadata pair takes: key length, value type, a one-byte value.
const MIN_METADATA_BYTES: usize = 8 + 4 + 1;
/// Token-id keys of the tokenizer metadata, each checked against the vocabulary.
const TOKEN_ID_KEYS: [&str; 5] = [
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.seperator_token_id",
];

/// One metadata value, of any GGUF value type.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    String(String),
    /// Type 9: elements all of one type, possibly arrays themselves.
    Array(GgufArray),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any integer type holding a value ≥ 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }

    /// Any integer type that fits in an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number. An f32 converts through its shortest decimal form, so 1e-5 stored as
    /// f32 reads back as 1e-5 rather than 9.99999974e-6.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => v.to_string().parse().ok(),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF type id of the value (0 to 12).
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// Append the value as a GGUF file stores it (without its type id).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            GgufValue::U8(v) => out.push(*v),
            GgufValue::I8(v) => out.push(*v as u8),
            GgufValue::U16(v) => out.extend(v.to_le_bytes()),
            GgufValue::I16(v) => out.extend(v.to_le_bytes()),
            GgufValue::U32(v) => out.extend(v.to_le_bytes()),
            GgufValue::I32(v) => out.extend(v.to_le_bytes()),
            GgufValue::F32(v) => out.extend(v.to_le_bytes()),
            GgufValue::Bool(v) => out.push(u8::from(*v)),
            GgufValue::String(s) => {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s.as_bytes());
            }
            GgufValue::Array(array) => {
                out.extend(array.element_type.to_le_bytes());
                out.extend((array.len as u64).to_le_bytes());
                out.extend(&array.raw);
            }
            GgufValue::U64(v) => out.extend(v.to_le_bytes()),
            GgufValue::I64(v) => out.extend(v.to_le_bytes()),
            GgufValue::F64(v) => out.extend(v.to_le_bytes()),
        }
    }

    /// A short description for messages: the value (strings quoted, arrays by length)
    /// and its type.
    fn describe(&self) -> String {
        match self {
            GgufValue::String(s) => format!("{s:?} (string)"),
            GgufValue::Array(items) => {
                format!("an array of {} {} elements", items.len(), type_name(items.element_type))
            }
            GgufValue::U8(v) => format!("{v} (u8)"),
            GgufValue::I8(v) => format!("{v} (i8)"),
            GgufValue::U16(v) => format!("{v} (u16)"),
            GgufValue::I16(v) => format!("{v} (i16)"),
            GgufValue::U32(v) => format!("{v} (u32)"),
            GgufValue::I32(v) => format!("{v} (i32)"),
            GgufValue::U64(v) => format!("{v} (u64)"),
            GgufValue::I64(v) => format!("{v} (i64)"),
            GgufValue::F32(v) => format!("{v} (f32)"),
            GgufValue::F64(v) => format!("{v} (f64)"),
            GgufValue::Bool(v) => format!("{v} (bool)"),
        }
    }
}

/// The GGUF name of value type `id`, for messages.
fn type_name(id: u32) -> &'static str {
    const NAMES: [&str; 13] =
        ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// Bytes one element of value type `id` takes at least (`None`: not a GGUF type).
fn min_value_bytes(id: u32) -> Option<usize> {
    Some(match id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        // A string's length; an array's element type and length.
        8 => 8,
        9 => 4 + 8,
        _ => return None,
    })
}

/// A metadata array as the file stores it: the element type, the count, and the elements'
/// bytes (checked when the file was opened). It costs its size in the file whatever the
/// element type (a `Vec<GgufValue>` would cost 32 bytes per u8), and its elements decode
/// on access.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufArray {
    element_type: u32,
    len: usize,
    raw: Vec<u8>,
}

impl GgufArray {
    /// An array of `items`, which must all have the same type (an empty array is of u32,
    /// as llama.cpp writes it). `None` when the types differ.
    pub fn from_values(items: &[GgufValue]) -> Option<GgufArray> {
        let element_type = items.first().map_or(4, GgufValue::type_id);
        if items.iter().any(|v| v.type_id() != element_type) {
            return None;
        }
        let mut raw = Vec::new();
        items.iter().for_each(|v| v.write_to(&mut raw));
        Some(GgufArray { element_type, len: items.len(), raw })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The GGUF name of the elements' type.
    pub fn element_type_name(&self) -> &'static str {
        type_name(self.element_type)
    }

    /// The elements, decoded one by one.
    pub fn iter(&self) -> impl Iterator<Item = GgufValue> + '_ {
        let mut reader = Reader { bytes: &self.raw, pos: 0 };
        // The bytes were checked at open, so decoding cannot fail; stopping at a failure
        // keeps this total anyway.
        (0..self.len).map_while(move |_| reader.value(self.element_type, 0).ok())
    }

    /// The elements as strings, borrowed; `None` unless the elements are strings (an
    /// empty array of any type is an empty list of strings).
    pub fn strs(&self) -> Option<Vec<&str>> {
        if self.element_type != 8 && self.len > 0 {
            return None;
        }
        let mut reader = Reader { bytes: &self.raw, pos: 0 };
        (0..self.len).map(|_| reader.str("string").ok()).collect()
    }
}

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
const SUPPORTED: [GgmlType; 6] =
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
    fn decode_block(self, block: &[u8], out: &mut [f32]) {
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
fn ggml_type_name(id: u32) -> Option<&'static str> {
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
fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

fn decode_q8_0(block: &[u8], out: &mut [f32]) {
    let d = half_at(block, 0);
    for (x, &q) in out.iter_mut().zip(&block[2..34]) {
        *x = d * f32::from(q as i8);
    }
}

/// The 16 nibble bytes of a 4-bit block: byte j holds element j in its low nibble and
/// element j + 16 in its high nibble; `value(q)` applies the type's formula.
fn decode_nibbles(nibbles: &[u8], out: &mut [f32], value: impl Fn(u8) -> f32) {
    let (low, high) = out.split_at_mut(16);
    for ((&byte, lo), hi) in nibbles.iter().zip(low).zip(high) {
        *lo = value(byte & 0x0f);
        *hi = value(byte >> 4);
    }
}

/// One tensor of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// Name as stored in the GGUF file (llama.cpp's naming).
    pub name: String,
    /// The Hugging Face name, where [`hf_name`] knows one.
    pub hf_name: Option<String>,
    /// Element type as stored.
    pub ggml_type: GgmlType,
    /// Shape in Hugging Face (row-major) order: `[rows, cols]` = `[ne1, ne0]`; `[n]` for
    /// 1-D tensors. GGUF lists dimensions fastest-first, so this is that list reversed.
    pub shape: Vec<usize>,
    /// Absolute offset of the tensor's data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub bytes: u64,
}

impl GgufTensor {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The bytes of a GGUF file: mapped from disk, or handed over in memory.
enum Data {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Data {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Data::Mapped(map) => map,
            Data::Owned(bytes) => bytes,
        }
    }
}

/// A memory-mapped GGUF file, its metadata and tensor directory parsed once at `open`.
pub struct GgufFile {
    path: PathBuf,
    data: Data,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensor>,
    /// Indices of `tensors` sorted by name, for lookups.
    by_name: Vec<usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Map and parse the file at `path`. Fails on anything that is not a well-formed GGUF
    /// v2/v3 file, and on tensors of types [`GgmlType`] does not cover.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
        // SAFETY: the map is read-only; a file modified while mapped is outside what we can
        // defend against (the same contract as the safetensors reader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("cannot map", path, e))?;
        Self::from_data(Data::Mapped(mmap), path)
    }

    /// Parse a GGUF file held in memory; `path` is what messages name. Checks the same as
    /// [`GgufFile::open`], and costs about the input's size again at most (metadata arrays
    /// are kept as stored, every count is bounded by the bytes left before anything is
    /// allocated).
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<GgufFile> {
        Self::from_data(Data::Owned(bytes), path)
    }

    fn from_data(data: Data, path: &Path) -> Result<GgufFile> {
        let parsed =
            parse(&data).map_err(|message| Error::ModelFormat { path: path.to_path_buf(), message })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            data,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            by_name: parsed.by_name,
        })
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the tensor data, in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Every metadata key and value.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> Vec<GgufTensor> {
        self.tensors.clone()
    }

    /// The tensor stored as `gguf_name`, if present.
    pub fn tensor(&self, gguf_name: &str) -> Option<&GgufTensor> {
        let at = self.by_name.binary_search_by(|&i| self.tensors[i].name.as_str().cmp(gguf_name)).ok()?;
        self.tensors.get(self.by_name[at])
    }

    /// The tensor `gguf_name` as f32, row-major in its [`GgufTensor::shape`]. In a Llama
    /// file the rows of `blk.N.attn_q.weight` and `blk.N.attn_k.weight` are returned in
    /// Hugging Face order (llama.cpp's converter interleaves them for its RoPE; see
    /// [`unpermute_qk_rows`]).
    pub fn dequantize(&self, gguf_name: &str) -> Result<Vec<f32>> {
        let tensor = self.tensor(gguf_name).ok_or_else(|| Error::Tensor {
            name: gguf_name.to_string(),
            message: format!("not in {} ({} tensors present)", self.path.display(), self.tensors.len()),
        })?;
        // open() checked offset + bytes against the file length.
        let start = tensor.offset as usize;
        let data = &self.data[start..start + tensor.bytes as usize];
        let values = decode(tensor.ggml_type, data, tensor.elements());
        if let Data::Mapped(map) = &self.data {
            super::pages::release(map, start, tensor.bytes as usize);
        }
        match self.rope_heads(tensor)? {
            Some(heads) => unpermute_tensor(tensor, &values, heads),
            None => Ok(values),
        }
    }

    /// The tensor `gguf_name` as f32 in chunks of `rows` rows (of its first dimension),
    /// each handed to `visit` in order: a tensor of block-aligned rows that needs no
    /// permutation is decoded a chunk at a time, so the whole f32 tensor is never held.
    pub fn dequantize_chunks(
        &self,
        gguf_name: &str,
        rows: usize,
        visit: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let tensor = self.tensor(gguf_name).ok_or_else(|| Error::Tensor {
            name: gguf_name.to_string(),
            message: format!("not in {} ({} tensors present)", self.path.display(), self.tensors.len()),
        })?;
        let width = tensor.elements() / tensor.shape.first().copied().unwrap_or(1).max(1);
        let ty = tensor.ggml_type;
        if width == 0 || !width.is_multiple_of(ty.block_size()) || self.rope_heads(tensor)?.is_some() {
            let values = self.dequantize(gguf_name)?;
            return values.chunks(rows.max(1) * width.max(1)).try_for_each(visit);
        }
        let row_bytes = width / ty.block_size() * ty.block_bytes();
        let start = tensor.offset as usize;
        let data = &self.data[start..start + tensor.bytes as usize];
        for chunk in data.chunks(rows.max(1) * row_bytes) {
            visit(&decode(ty, chunk, chunk.len() / row_bytes * width))?;
            if let Data::Mapped(map) = &self.data {
                let offset = chunk.as_ptr() as usize - map.as_ptr() as usize;
                super::pages::release(map, offset, chunk.len());
            }
        }
        Ok(())
    }

    /// The head count whose permutation llama.cpp applied to `tensor`, or `None` when the
    /// tensor is stored as Hugging Face has it. Only the `llama` architecture is permuted
    /// by the converter (qwen2, for one, is not).
    fn rope_heads(&self, tensor: &GgufTensor) -> Result<Option<usize>> {
        if self.str_key("general.architecture") != Some("llama") {
            return Ok(None);
        }
        let key = match layer_part(&tensor.name) {
            Some((_, "attn_q.weight")) => "llama.attention.head_count",
            // Without head_count_kv there is no grouped-query attention: k has every head.
            Some((_, "attn_k.weight")) if self.metadata.contains_key("llama.attention.head_count_kv") => {
                "llama.attention.head_count_kv"
            }
            Some((_, "attn_k.weight")) => "llama.attention.head_count",
            _ => return Ok(None),
        };
        self.positive(key).map(Some)
    }

    /// A Hugging Face `config.json` equivalent of the file's metadata (Llama only).
    pub fn hf_config(&self) -> Result<Value> {
        let arch = self.str_key("general.architecture").unwrap_or("");
        if arch != "llama" {
            let found = self.metadata.get("general.architecture").map(GgufValue::describe);
            return Err(self.format_error(format!(
                "general.architecture is {}, but only llama is supported from GGUF",
                found.unwrap_or_else(|| "missing".into())
            )));
        }
        let heads = self.positive("llama.attention.head_count")?;
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size()?,
            "hidden_size": self.positive("llama.embedding_length")?,
            "intermediate_size": self.positive("llama.feed_forward_length")?,
            "num_hidden_layers": self.positive("llama.block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.positive_or("llama.attention.head_count_kv", heads)?,
            "rms_norm_eps": self.number("llama.attention.layer_norm_rms_epsilon")?,
            "rope_theta": self.number_or("llama.rope.freq_base", 10000.0)?,
            "max_position_embeddings": self.positive("llama.context_length")?,
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let fields = config.as_object_mut().expect("a json! object literal");
        if self.metadata.contains_key("llama.rope.dimension_count") {
            fields.insert("head_dim".into(), json!(self.positive("llama.rope.dimension_count")?));
        }
        let ids = self.token_ids()?;
        for (key, field) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some((_, id)) = ids.iter().find(|(k, _)| *k == key) {
                fields.insert(field.into(), json!(id));
            }
        }
        if let Some(scaling) = self.rope_scaling()? {
            fields.insert("rope_scaling".into(), scaling);
        }
        Ok(config)
    }

    /// `rope_scaling` when the file declares a scaling other than none, so the model
    /// loader can refuse what it does not implement instead of running it unscaled.
    fn rope_scaling(&self) -> Result<Option<Value>> {
        let kind = match self.metadata.get("llama.rope.scaling.type") {
            None => return Ok(None),
            Some(v) => v.as_str().ok_or_else(|| self.expected("llama.rope.scaling.type", v, "a string"))?,
        };
        if kind == "none" {
            return Ok(None);
        }
        let factor = self.number_or("llama.rope.scaling.factor", 1.0)?;
        Ok(Some(json!({ "rope_type": kind, "factor": factor })))
    }

    /// The special token ids the file sets (bos, eos, unknown, padding, separator), each
    /// checked to be an id of the vocabulary.
    fn token_ids(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut ids = Vec::new();
        for key in TOKEN_ID_KEYS {
            let Some(value) = self.metadata.get(key) else { continue };
            let id = value.as_u64().ok_or_else(|| self.expected(key, value, "a token id"))?;
            let vocab = self.vocab_size()?;
            if id >= vocab as u64 {
                return Err(self.tokenizer_error(format!(
                    "metadata key {key} is {id}, outside the vocabulary of {vocab} tokens (expected 0 to {})",
                    vocab as i64 - 1
                )));
            }
            ids.push((key, id));
        }
        Ok(ids)
    }

    /// Tokens in the vocabulary, else rows of the embedding.
    fn vocab_size(&self) -> Result<usize> {
        if let Some(tokens) = self.metadata.get("tokenizer.ggml.tokens") {
            let items = tokens
                .as_array()
                .ok_or_else(|| self.expected("tokenizer.ggml.tokens", tokens, "an array of strings"))?;
            return Ok(items.len());
        }
        match self.tensor("token_embd.weight") {
            Some(t) if t.shape.len() == 2 => Ok(t.shape[0]),
            Some(t) => Err(Error::Tensor {
                name: t.name.clone(),
                message: format!("shape {}, expected [vocab, hidden]", dims_text(&t.shape)),
            }),
            None => Err(self.format_error(
                "no tokenizer.ggml.tokens and no token_embd.weight: cannot tell the vocabulary size".into(),
            )),
        }
    }

    /// A `tokenizers`-crate `tokenizer.json` equivalent of the file's tokenizer metadata
    /// (byte-level BPE, `tokenizer.ggml.model` = `gpt2`, only).
    pub fn tokenizer_json(&self) -> Result<Value> {
        let model = self.str_key("tokenizer.ggml.model");
        if model != Some("gpt2") {
            let found = self.metadata.get("tokenizer.ggml.model").map(GgufValue::describe);
            return Err(self.tokenizer_error(format!(
                "tokenizer.ggml.model is {}, but only \"gpt2\" (byte-level BPE) is supported from GGUF",
                found.unwrap_or_else(|| "missing".into())
            )));
        }
        let pre_tokenizer = self.pre_tokenizer()?;
        self.token_ids()?;
        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        let merges = self.string_array("tokenizer.ggml.merges")?;
        let added = added_tokens(&tokens, &self.token_types(tokens.len())?);
        let vocab = self.bpe_vocab(&tokens)?;
        self.check_merges(&merges)?;
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges
            }
        }))
    }

    /// Token → id; a token listed twice is an error, since a BPE vocabulary maps each
    /// token to one id and the second id would silently never be produced.
    fn bpe_vocab(&self, tokens: &[&str]) -> Result<serde_json::Map<String, Value>> {
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            if let Some(first) = vocab.insert((*token).to_string(), json!(id)) {
                return Err(self.tokenizer_error(format!(
                    "tokenizer.ggml.tokens holds {token:?} twice (ids {first} and {id}); a BPE vocabulary \
                     needs each token once"
                )));
            }
        }
        Ok(vocab)
    }

    /// Each merge must be `left right`, the form tokenizer.json's BPE reads.
    fn check_merges(&self, merges: &[&str]) -> Result<()> {
        match merges.iter().enumerate().find(|(_, m)| m.split(' ').count() != 2) {
            Some((i, merge)) => Err(self.tokenizer_error(format!(
                "tokenizer.ggml.merges element {i} is {merge:?}, expected two tokens separated by one space"
            ))),
            None => Ok(()),
        }
    }

    /// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, written the way Hugging
    /// Face's tokenizer.json for the same models writes it.
    fn pre_tokenizer(&self) -> Result<Value> {
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                                "use_regex": true});
        match self.str_key("tokenizer.ggml.pre") {
            None | Some("gpt2") | Some("default") => Ok(byte_level),
            // llama.cpp splits every digit (\p{N}) before GPT-2's regex; SmolLM2's own
            // tokenizer.json says the same with Digits(individual_digits) then ByteLevel.
            Some("smollm") => Ok(json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]})),
            Some(other) => Err(self.tokenizer_error(format!(
                "tokenizer.ggml.pre is {other:?}; the supported pre-tokenizers are \"gpt2\", \"default\" \
                 and \"smollm\""
            ))),
        }
    }

    /// `tokenizer.ggml.token_type`, one per token; all normal when absent.
    fn token_types(&self, tokens: usize) -> Result<Vec<i64>> {
        let key = "tokenizer.ggml.token_type";
        let Some(value) = self.metadata.get(key) else {
            return Ok(vec![1; tokens]);
        };
        let items = value.as_array().ok_or_else(|| self.expected(key, value, "an array of integers"))?;
        if items.len() != tokens {
            return Err(self.tokenizer_error(format!(
                "{key} has {} entries but tokenizer.ggml.tokens has {tokens}",
                items.len()
            )));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| self.expected(&format!("{key}[{i}]"), &v, "an integer token type"))
            })
            .collect()
    }

    /// The array of strings at `key`, required.
    fn string_array(&self, key: &str) -> Result<Vec<&str>> {
        let value = self
            .metadata
            .get(key)
            .ok_or_else(|| self.tokenizer_error(format!("{key} is missing, expected an array of strings")))?;
        let items = value.as_array().ok_or_else(|| self.expected(key, value, "an array of strings"))?;
        items.strs().ok_or_else(|| self.expected(key, value, "an array of strings"))
    }

    fn str_key(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(GgufValue::as_str)
    }

    /// A required positive integer.
    fn positive(&self, key: &str) -> Result<usize> {
        let value = self.metadata.get(key).ok_or_else(|| {
            self.format_error(format!("metadata key {key} is missing, expected a positive integer"))
        })?;
        value
            .as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.expected(key, value, "a positive integer"))
    }

    /// An optional positive integer.
    fn positive_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.metadata.contains_key(key) {
            self.positive(key)
        } else {
            Ok(default)
        }
    }

    /// A required number.
    fn number(&self, key: &str) -> Result<f64> {
        let value = self
            .metadata
            .get(key)
            .ok_or_else(|| self.format_error(format!("metadata key {key} is missing, expected a number")))?;
        value.as_f64().ok_or_else(|| self.expected(key, value, "a number"))
    }

    /// An optional number.
    fn number_or(&self, key: &str, default: f64) -> Result<f64> {
        if self.metadata.contains_key(key) {
            self.number(key)
        } else {
            Ok(default)
        }
    }

    fn format_error(&self, message: String) -> Error {
        Error::ModelFormat { path: self.path.clone(), message }
    }

    fn tokenizer_error(&self, message: String) -> Error {
        Error::Tokenizer { path: self.path.clone(), message }
    }

    /// A metadata value of the wrong kind.
    fn expected(&self, key: &str, found: &GgufValue, expected: &str) -> Error {
        let message = format!("metadata key {key} is {}, expected {expected}", found.describe());
        if key.starts_with("tokenizer.") {
            self.tokenizer_error(message)
        } else {
            self.format_error(message)
        }
    }
}

/// `tokenizer.ggml.token_type` of control tokens (added tokens, special).
const TOKEN_CONTROL: i64 = 3;
/// `tokenizer.ggml.token_type` of user-defined tokens (added tokens, not special).
const TOKEN_USER_DEFINED: i64 = 4;

/// Control and user-defined tokens as tokenizer.json added tokens, matched before
/// pre-tokenization; only control tokens are special (skipped when decoding).
fn added_tokens(tokens: &[&str], types: &[i64]) -> Vec<Value> {
    let added = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &kind))| kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED);
    added
        .map(|(id, (token, &kind))| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": kind == TOKEN_CONTROL})
        })
        .collect()
}

/// Decode `elements` values of type `ty` from `data` (whose length open() checked).
fn decode(ty: GgmlType, data: &[u8], elements: usize) -> Vec<f32> {
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

fn unpermute_tensor(tensor: &GgufTensor, values: &[f32], heads: usize) -> Result<Vec<f32>> {
    let rows = tensor.shape.first().copied().unwrap_or(0);
    if values.is_empty() && tensor.shape.len() == 2 {
        // No elements (a zero dimension): nothing to permute, whatever the row count says.
        return Ok(Vec::new());
    }
    if tensor.shape.len() != 2 {
        return Err(Error::Tensor {
            name: tensor.name.clone(),
            message: format!(
                "shape {}, expected [rows, cols] for a query/key projection",
                dims_text(&tensor.shape)
            ),
        });
    }
    unpermute_qk_rows(values, rows, heads).ok_or_else(|| Error::Tensor {
        name: tensor.name.clone(),
        message: format!(
            "{rows} rows do not split into {heads} heads of an even size; cannot undo llama.cpp's \
             rotary permutation"
        ),
    })
}

/// For each output row of llama.cpp's permutation, the input row it takes.
///
/// The converter reshapes the rows as `[n_head, 2, head_dim / 2]` and swaps the last two
/// axes, so within a head output row `2i + j` is input row `j·head_dim/2 + i`: the two
/// rotary halves of Hugging Face's layout become interleaved pairs. `None` when the rows
/// do not split into `n_head` heads of an even size.
fn rope_source_rows(rows: usize, n_head: usize) -> Option<Vec<usize>> {
    // A head count near usize::MAX (a corrupt file) must not overflow the doubling.
    if n_head.checked_mul(2).is_none_or(|pair_rows| n_head == 0 || !rows.is_multiple_of(pair_rows)) {
        return None;
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    Some(
        (0..rows)
            .map(|r| {
                let (head, within) = (r / head_dim, r % head_dim);
                head * head_dim + (within % 2) * half + within / 2
            })
            .collect(),
    )
}

/// llama.cpp's permutation of a query/key weight `[rows, cols]` (Hugging Face rotate-half
/// layout → interleaved pairs). `None` when the shape does not fit `n_head`.
pub fn permute_qk_rows(data: &[f32], rows: usize, n_head: usize) -> Option<Vec<f32>> {
    let cols = row_len(data, rows)?;
    let source = rope_source_rows(rows, n_head)?;
    Some(source.iter().flat_map(|&src| &data[src * cols..(src + 1) * cols]).copied().collect())
}

/// The inverse of [`permute_qk_rows`]: a weight as llama.cpp stores it, back in Hugging
/// Face's layout.
pub fn unpermute_qk_rows(data: &[f32], rows: usize, n_head: usize) -> Option<Vec<f32>> {
    let cols = row_len(data, rows)?;
    let source = rope_source_rows(rows, n_head)?;
    let mut out = vec![0f32; data.len()];
    for (row, &dst) in data.chunks_exact(cols.max(1)).zip(&source) {
        out[dst * cols..(dst + 1) * cols].copy_from_slice(row);
    }
    Some(out)
}

/// Columns of a `rows`-row matrix held in `data`, if it divides evenly (an empty `data`
/// has no rows: `rows` must not size anything it does not hold).
fn row_len(data: &[f32], rows: usize) -> Option<usize> {
    (rows > 0 && rows <= data.len() && data.len().is_multiple_of(rows)).then(|| data.len() / rows)
}

/// Per-layer tensors: llama.cpp's suffix after `blk.N.` → Hugging Face's after
/// `model.layers.N.`.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Tensors outside the layers.
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// `blk.N.rest` → (N, rest).
fn layer_part(gguf_name: &str) -> Option<(usize, &str)> {
    let (layer, rest) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
    // parse() accepts a leading '+', which no llama.cpp name has.
    if !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((layer.parse().ok()?, rest))
}

/// The Hugging Face name of llama.cpp's Llama tensor `gguf_name`; `None` for tensors with
/// no Hugging Face counterpart (e.g. `rope_freqs.weight`).
pub fn hf_name(gguf_name: &str) -> Option<String> {
    if let Some((layer, rest)) = layer_part(gguf_name) {
        let (_, hf) = LAYER_NAMES.iter().find(|(gguf, _)| *gguf == rest)?;
        return Some(format!("model.layers.{layer}.{hf}"));
    }
    GLOBAL_NAMES.iter().find(|(gguf, _)| *gguf == gguf_name).map(|(_, hf)| hf.to_string())
}

// ---- parsing ---------------------------------------------------------------------------

/// What `parse` finds; errors are messages that `open` puts the path in front of.
struct Parsed {
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensor>,
    by_name: Vec<usize>,
}

/// A bounds-checked little-endian cursor over the mapped file.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type Parse<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> Parse<&'a [u8]> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let slice = &self.bytes[self.pos..self.pos + n];
                self.pos += n;
                Ok(slice)
            }
            _ => Err(format!(
                "{what} at offset {} needs {n} bytes, but the file ends at byte {} (truncated?)",
                self.pos,
                self.bytes.len()
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parse<[u8; N]> {
        let slice = self.take(N as u64, what)?;
        Ok(slice.try_into().expect("take returned N bytes"))
    }

    fn u8(&mut self, what: &str) -> Parse<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Parse<u16> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Parse<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Parse<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A string, borrowed from the file.
    fn str(&mut self, what: &str) -> Parse<&'a str> {
        let len = self.u64(&format!("{what} length"))?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|e| format!("{what} at offset {at} is not UTF-8 ({e})"))
    }

    fn string(&mut self, what: &str) -> Parse<String> {
        self.str(what).map(str::to_owned)
    }

    /// A count of items that each take at least `min_bytes`: a count whose items cannot
    /// fit in the bytes left means corruption, and must not size an allocation.
    fn count(&mut self, what: &str, min_bytes: usize) -> Parse<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let needed = usize::try_from(n).ok().and_then(|n| n.checked_mul(min_bytes));
        match needed {
            Some(needed) if needed <= self.remaining() => Ok(n as usize),
            _ => Err(format!(
                "{what} at offset {at} is {n}; at {min_bytes} bytes each at least, more than the {} \
                 bytes left in the file",
                self.remaining()
            )),
        }
    }

    fn value(&mut self, type_id: u32, depth: usize) -> Parse<GgufValue> {
        use GgufValue as V;
        Ok(match type_id {
            0 => V::U8(self.u8("u8 value")?),
            1 => V::I8(self.u8("i8 value")? as i8),
            2 => V::U16(self.u16("u16 value")?),
            3 => V::I16(self.u16("i16 value")? as i16),
            4 => V::U32(self.u32("u32 value")?),
            5 => V::I32(self.u32("i32 value")? as i32),
            6 => V::F32(f32::from_bits(self.u32("f32 value")?)),
            7 => V::Bool(self.bool()?),
            8 => V::String(self.string("string value")?),
            9 => V::Array(self.array_value(depth)?),
            10 => V::U64(self.u64("u64 value")?),
            11 => V::I64(self.u64("i64 value")? as i64),
            12 => V::F64(f64::from_bits(self.u64("f64 value")?)),
            other => return Err(format!("value type {other} is not a GGUF type (expected 0 to 12)")),
        })
    }

    fn bool(&mut self) -> Parse<bool> {
        let at = self.pos;
        match self.u8("bool value")? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("bool value at offset {at} is {other}, expected 0 or 1")),
        }
    }

    /// An array, checked element by element and kept as its bytes.
    fn array_value(&mut self, depth: usize) -> Parse<GgufArray> {
        let (element_type, len) = self.array_header(depth)?;
        let start = self.pos;
        self.skip_elements(element_type, len, depth)?;
        Ok(GgufArray { element_type, len, raw: self.bytes[start..self.pos].to_vec() })
    }

    /// An array's element type and length, both checked.
    fn array_header(&mut self, depth: usize) -> Parse<(u32, usize)> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels"));
        }
        let element_type = self.u32("array element type")?;
        let min_bytes = min_value_bytes(element_type).ok_or_else(|| {
            format!("array element type {element_type} is not a GGUF type (expected 0 to 12)")
        })?;
        Ok((element_type, self.count("array length", min_bytes)?))
    }

    /// Check `len` elements of `element_type` and move past them, allocating nothing.
    fn skip_elements(&mut self, element_type: u32, len: usize, depth: usize) -> Parse<()> {
        match element_type {
            7..=9 => (0..len).try_for_each(|i| {
                self.skip_value(element_type, depth + 1).map_err(|m| format!("element {i}: {m}"))
            }),
            _ => {
                // array_header checked len × size against the bytes left.
                let size = min_value_bytes(element_type).unwrap_or(1);
                self.take((len * size) as u64, "array elements").map(drop)
            }
        }
    }

    /// Check one value and move past it, allocating nothing.
    fn skip_value(&mut self, type_id: u32, depth: usize) -> Parse<()> {
        match type_id {
            7 => self.bool().map(drop),
            8 => self.str("string value").map(drop),
            9 => {
                let (element_type, len) = self.array_header(depth)?;
                self.skip_elements(element_type, len, depth)
            }
            _ => {
                let size = min_value_bytes(type_id)
                    .ok_or_else(|| format!("value type {type_id} is not a GGUF type (expected 0 to 12)"))?;
                self.take(size as u64, type_name(type_id)).map(drop)
            }
        }
    }
}

fn parse(bytes: &[u8]) -> Parse<Parsed> {
    let mut r = Reader { bytes, pos: 0 };
    let version = header(&mut r)?;
    let tensor_count = r.count("tensor count", MIN_TENSOR_INFO_BYTES)?;
    let kv_count = r.count("metadata count", MIN_METADATA_BYTES)?;
    let metadata = metadata(&mut r, kv_count)?;
    let alignment = alignment(&metadata)?;
    // Two passes over the tensor infos: the first finds where the data starts (and checks
    // every info), the second locates each tensor; only the tensors themselves are kept.
    let infos_start = r.pos;
    for i in 0..tensor_count {
        tensor_info(&mut r, i)?;
    }
    let data_start =
        align(r.pos as u64, alignment).filter(|&start| start <= bytes.len() as u64).ok_or_else(|| {
            format!("the tensor data section (aligned to {alignment} bytes) starts past the end of the file")
        })?;
    let mut r = Reader { bytes, pos: infos_start };
    let mut tensors = Vec::with_capacity(tensor_count);
    for i in 0..tensor_count {
        tensors.push(locate(tensor_info(&mut r, i)?, data_start, alignment, bytes.len() as u64)?);
    }
    let by_name = sorted_by_name(&tensors)?;
    Ok(Parsed { version, alignment, metadata, tensors, by_name })
}

/// Magic and version; returns the version.
fn header(r: &mut Reader) -> Parse<u32> {
    let magic = r.array::<4>("magic").map_err(|_| {
        format!("not a GGUF file: {} bytes, too short for the 4-byte magic \"GGUF\"", r.bytes.len())
    })?;
    if &magic != b"GGUF" {
        return Err(format!("not a GGUF file: starts with {magic:02x?}, expected the magic \"GGUF\""));
    }
    match r.u32("version")? {
        v @ (2 | 3) => Ok(v),
        v if (1..=3).contains(&v.swap_bytes()) => Err(format!(
            "version field {v:#x} looks byte-swapped: a big-endian GGUF file, expected little-endian"
        )),
        v => Err(format!("GGUF version {v} is not supported, expected 2 or 3")),
    }
}

fn metadata(r: &mut Reader, count: usize) -> Parse<BTreeMap<String, GgufValue>> {
    let mut map = BTreeMap::new();
    for i in 0..count {
        let key = r.string(&format!("metadata key {i}"))?;
        let value = r
            .u32("value type")
            .and_then(|type_id| r.value(type_id, 0))
            .map_err(|m| format!("metadata key {key}: {m}"))?;
        if map.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key {key} appears twice"));
        }
    }
    Ok(map)
}

/// `general.alignment`, checked: ggml requires a power of two.
fn alignment(metadata: &BTreeMap<String, GgufValue>) -> Parse<u64> {
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(value) => match value.as_u64() {
            Some(a) if a.is_power_of_two() => Ok(a),
            _ => Err(format!("general.alignment is {}, expected a power of two", value.describe())),
        },
    }
}

/// `offset` rounded up to a multiple of `alignment` (a power of two); `None` on overflow.
fn align(offset: u64, alignment: u64) -> Option<u64> {
    Some(offset.checked_add(alignment - 1)? & !(alignment - 1))
}

/// A tensor info as stored, before its data is located.
struct TensorInfo {
    name: String,
    /// The first `n_dims` are the dimensions, fastest first.
    dims: [u64; MAX_DIMS as usize],
    n_dims: usize,
    type_id: u32,
    offset: u64,
}

fn tensor_info(r: &mut Reader, index: usize) -> Parse<TensorInfo> {
    let name = r.string(&format!("name of tensor {index}"))?;
    let context = |m: String| format!("tensor {name}: {m}");
    let n_dims = r.u32("dimension count").map_err(context)?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(context(format!("{n_dims} dimensions, expected 1 to {MAX_DIMS}")));
    }
    let mut dims = [0; MAX_DIMS as usize];
    for dim in &mut dims[..n_dims as usize] {
        *dim = r.u64("dimension").map_err(context)?;
    }
    let type_id = r.u32("type").map_err(context)?;
    let offset = r.u64("data offset").map_err(context)?;
    Ok(TensorInfo { name, dims, n_dims: n_dims as usize, type_id, offset })
}

/// Check a tensor's type, shape and data range against the file.
fn locate(info: TensorInfo, data_start: u64, alignment: u64, file_len: u64) -> Parse<GgufTensor> {
    let TensorInfo { name, dims, n_dims, type_id, offset } = info;
    let dims = &dims[..n_dims];
    let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
        let known = ggml_type_name(type_id).map(|n| format!("{n} (type {type_id})"));
        let supported: Vec<_> = SUPPORTED.iter().map(|t| t.name()).collect();
        format!(
            "tensor {name}: type {} is not supported; supported types: {}",
            known.unwrap_or_else(|| format!("{type_id} (unknown to ggml)")),
            supported.join(", ")
        )
    })?;
    // The product of the non-zero dimensions must fit: then no order of multiplying the
    // shape overflows, even when a zero dimension makes the element count 0.
    let nonzero = dims.iter().filter(|&&d| d != 0).try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let elements = nonzero
        .filter(|&n| usize::try_from(n).is_ok())
        .map(|n| if dims.contains(&0) { 0 } else { n })
        .ok_or_else(|| format!("tensor {name}: dimensions {} overflow the element count", dims_text(dims)))?;
    let block = ggml_type.block_size() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(format!(
            "tensor {name}: rows of {} elements are not whole {} blocks of {block}",
            dims[0],
            ggml_type.name()
        ));
    }
    if !offset.is_multiple_of(alignment) {
        return Err(format!(
            "tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}"
        ));
    }
    // elements ≤ usize::MAX and block_bytes ≤ 34, so only the product can overflow.
    let bytes = (elements / block).checked_mul(ggml_type.block_bytes() as u64);
    let start = data_start.checked_add(offset);
    let end = start.zip(bytes).and_then(|(s, b)| s.checked_add(b));
    match (start, bytes, end) {
        (Some(start), Some(bytes), Some(end)) if end <= file_len => Ok(GgufTensor {
            hf_name: hf_name(&name),
            name,
            ggml_type,
            shape: dims.iter().rev().map(|&d| d as usize).collect(),
            offset: start,
            bytes,
        }),
        _ => Err(format!(
            "tensor {name}: data runs past the end of the file (offset {} + {} bytes > {file_len})",
            start.map_or("overflow".into(), |s| s.to_string()),
            bytes.map_or("overflow".into(), |b| b.to_string()),
        )),
    }
}

/// Indices of `tensors` sorted by name; a name that appears twice is an error.
fn sorted_by_name(tensors: &[GgufTensor]) -> Parse<Vec<usize>> {
    let mut by_name: Vec<usize> = (0..tensors.len()).collect();
    by_name.sort_unstable_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    match by_name.windows(2).find(|pair| tensors[pair[0]].name == tensors[pair[1]].name) {
        Some(pair) => Err(format!("tensor {} appears twice", tensors[pair[0]].name)),
        None => Ok(by_name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GGUF writer: metadata of any type, tensors given as raw bytes.
    struct Writer {
        version: u32,
        alignment: usize,
        metadata: Vec<(String, GgufValue)>,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl Writer {
        fn new() -> Self {
            Writer { version: 3, alignment: 32, metadata: Vec::new(), tensors: Vec::new() }
        }

        fn kv(mut self, key: &str, value: GgufValue) -> Self {
            if key == "general.alignment" {
                self.alignment = value.as_u64().unwrap() as usize;
            }
            self.metadata.push((key.into(), value));
            self
        }

        /// `dims` in GGUF order (ne0 first).
        fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
            self.tensors.push((name.into(), dims.to_vec(), type_id, data));
            self
        }

        fn f32_tensor(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
            self.tensor(name, dims, 0, values.iter().flat_map(|v| v.to_le_bytes()).collect())
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.metadata.len() as u64).to_le_bytes());
            for (key, value) in &self.metadata {
                put_string(&mut out, key);
                out.extend(value.type_id().to_le_bytes());
                value.write_to(&mut out);
            }
            let mut offset = 0usize;
            let mut placed = Vec::new();
            for (name, dims, ty, data) in &self.tensors {
                put_string(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
                out.extend(ty.to_le_bytes());
                out.extend((offset as u64).to_le_bytes());
                placed.push(offset);
                offset = (offset + data.len()).next_multiple_of(self.alignment);
            }
            out.resize(out.len().next_multiple_of(self.alignment), 0);
            let data_start = out.len();
            for ((_, _, _, data), at) in self.tensors.iter().zip(placed) {
                out.resize(data_start + at, 0);
                out.extend(data);
            }
            out
        }

        fn open(&self) -> (tempfile::TempDir, Result<GgufFile>) {
            open_bytes(&self.bytes())
        }
    }

    fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<GgufFile>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).unwrap();
        let file = GgufFile::open(&path);
        (dir, file)
    }

    fn put_string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// An array value of `items` (all of one type).
    fn arr(items: Vec<GgufValue>) -> GgufValue {
        GgufValue::Array(GgufArray::from_values(&items).unwrap())
    }

    fn s(text: &str) -> GgufValue {
        GgufValue::String(text.into())
    }

    fn strings(items: &[&str]) -> GgufValue {
        arr(items.iter().map(|t| s(t)).collect())
    }

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// A Q8_0 block with scale `d` and quants `q`.
    fn q8_0_block(d: f32, q: &[i8; 32]) -> Vec<u8> {
        let mut block = f16_bytes(d).to_vec();
        block.extend(q.iter().map(|&v| v as u8));
        block
    }

    /// A 4-bit block's nibble bytes: element j in the low nibble of byte j, element
    /// j + 16 in its high nibble.
    fn nibbles(q: &[u8; 32]) -> Vec<u8> {
        (0..16).map(|j| q[j] | (q[j + 16] << 4)).collect()
    }

    fn err_text<T: std::fmt::Debug>(result: Result<T>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn metadata_of_every_type_reads_back() {
        let values = [
            ("t.u8", GgufValue::U8(200)),
            ("t.i8", GgufValue::I8(-100)),
            ("t.u16", GgufValue::U16(60000)),
            ("t.i16", GgufValue::I16(-30000)),
            ("t.u32", GgufValue::U32(4_000_000_000)),
            ("t.i32", GgufValue::I32(-2_000_000_000)),
            ("t.f32", GgufValue::F32(1e-5)),
            ("t.bool", GgufValue::Bool(true)),
            ("t.string", s("héllo wörld")),
            ("t.u64", GgufValue::U64(u64::MAX)),
            ("t.i64", GgufValue::I64(i64::MIN)),
            ("t.f64", GgufValue::F64(-2.5e300)),
            ("t.strings", strings(&["a", "", "ü c"])),
            (
                "t.nested",
                arr(vec![arr(vec![GgufValue::I32(1), GgufValue::I32(-2)]), arr(vec![GgufValue::I32(3)])]),
            ),
            ("t.empty", arr(vec![])),
        ];
        let mut writer = Writer::new().kv("general.alignment", GgufValue::U32(64));
        for (key, value) in &values {
            writer = writer.kv(key, value.clone());
        }
        writer = writer.f32_tensor("a", &[3], &[1.0, 2.0, 3.0]).f32_tensor("b", &[5], &[0.5; 5]);
        let (_dir, file) = writer.open();
        let file = file.unwrap();
        assert_eq!(file.version(), 3);
        assert_eq!(file.alignment(), 64);
        for (key, value) in &values {
            assert_eq!(file.metadata().get(*key), Some(value), "{key}");
        }
        assert_eq!(file.metadata()["t.f32"].as_f64(), Some(1e-5), "f32 converts via its decimal form");
        let tensors = file.tensors();
        assert_eq!(tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(tensors.iter().all(|t| t.offset % 64 == 0), "data aligned to general.alignment");
        assert_eq!(tensors[1].offset - tensors[0].offset, 64, "12 bytes of `a` padded to 64");
        assert_eq!(file.dequantize("b").unwrap(), [0.5; 5]);
    }

    #[test]
    fn version_2_is_accepted_and_others_are_not() {
        let mut writer = Writer::new().f32_tensor("x", &[1], &[7.0]);
        writer.version = 2;
        let (_dir, file) = writer.open();
        assert_eq!(file.unwrap().dequantize("x").unwrap(), [7.0]);
        writer.version = 1;
        let err = err_text(writer.open().1);
        assert!(err.contains("GGUF version 1 is not supported, expected 2 or 3"), "{err}");
        writer.version = 3u32.swap_bytes();
        let err = err_text(writer.open().1);
        assert!(err.contains("big-endian"), "{err}");
    }

    #[test]
    fn float_types_decode_exactly() {
        let v = [1.5f32, -2.25, 0.0, 65504.0];
        let f16: Vec<u8> = v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
        let bf16: Vec<u8> = v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
        let writer = Writer::new().f32_tensor("f32", &[2, 2], &v).tensor("f16", &[4], 1, f16).tensor(
            "bf16",
            &[4],
            30,
            bf16,
        );
        let (_dir, file) = writer.open();
        let file = file.unwrap();
        assert_eq!(file.tensor("f32").unwrap().shape, [2, 2]);
        assert_eq!(file.dequantize("f32").unwrap(), v);
        assert_eq!(file.dequantize("f16").unwrap(), v);
        assert_eq!(file.dequantize("bf16").unwrap(), [1.5, -2.25, 0.0, 65536.0], "bf16 rounds 65504 up");
    }

    #[test]
    fn q8_0_blocks_decode_to_scale_times_quant() {
        let q0: [i8; 32] = std::array::from_fn(|i| i as i8 * 4 - 64);
        let q1: [i8; 32] = std::array::from_fn(|i| if i % 2 == 0 { 127 } else { -128 });
        let mut data = q8_0_block(0.25, &q0);
        data.extend(q8_0_block(-0.5, &q1));
        // One row of 64: both blocks in the same row, so the shape is [1, 64].
        let (_dir, file) = Writer::new().tensor("q", &[64, 1], 8, data).open();
        let file = file.unwrap();
        let t = file.tensor("q").unwrap();
        assert_eq!((t.ggml_type, t.shape.clone(), t.bytes), (GgmlType::Q8_0, vec![1, 64], 68));
        let x = file.dequantize("q").unwrap();
        for i in 0..32 {
            assert_eq!(x[i], 0.25 * (i as f32 * 4.0 - 64.0), "element {i}");
            assert_eq!(x[32 + i], if i % 2 == 0 { -63.5 } else { 64.0 }, "element {}", 32 + i);
        }
    }

    /// Decoding a chunk of rows at a time gives the whole tensor's values, in order, for
    /// block rows (Q8_0, 5 rows of 64 in chunks of 2) and element rows (F32).
    #[test]
    fn chunked_dequantization_gives_the_whole_tensor_in_order() {
        let mut q8 = Vec::new();
        for b in 0..10 {
            q8.extend(q8_0_block(0.125 * (b + 1) as f32, &std::array::from_fn(|i| (i as i8) - b as i8)));
        }
        let f32s: Vec<f32> = (0..15).map(|i| i as f32 * 0.5).collect();
        let writer = Writer::new().tensor("q", &[64, 5], 8, q8).f32_tensor("f", &[3, 5], &f32s);
        let (_dir, file) = writer.open();
        let file = file.unwrap();
        for (name, rows, width) in [("q", 5, 64), ("f", 5, 3)] {
            let mut chunks = Vec::new();
            file.dequantize_chunks(name, 2, &mut |c| {
                chunks.push(c.len());
                Ok(())
            })
            .unwrap();
            assert_eq!(chunks, [2 * width, 2 * width, width], "{name}");
            let mut joined = Vec::new();
            file.dequantize_chunks(name, 2, &mut |c| {
                joined.extend_from_slice(c);
                Ok(())
            })
            .unwrap();
            assert_eq!(joined, file.dequantize(name).unwrap(), "{name}");
            assert_eq!(joined.len(), rows * width);
        }
    }

    #[test]
    fn q4_0_block_puts_low_nibbles_first_and_centres_on_8() {
        let q: [u8; 32] = std::array::from_fn(|i| if i < 16 { i as u8 } else { 31 - i as u8 });
        let mut data = f16_bytes(0.5).to_vec();
        data.extend(nibbles(&q));
        assert_eq!(data[2], 0xf0, "element 0 (q=0) low, element 16 (q=15) high");
        let (_dir, file) = Writer::new().tensor("q", &[32], 2, data).open();
        let x = file.unwrap().dequantize("q").unwrap();
        // Elements 0..16 are 0.5·(i − 8); elements 16..32 are 0.5·(15 − (i − 16) − 8).
        let expected: Vec<f32> = (0..32)
            .map(|i| if i < 16 { 0.5 * (i as f32 - 8.0) } else { 0.5 * (31.0 - i as f32 - 8.0) })
            .collect();
        assert_eq!(x, expected);
        assert_eq!((x[0], x[15], x[16], x[31]), (-4.0, 3.5, 3.5, -4.0));
    }

    #[test]
    fn q4_1_block_applies_scale_and_minimum() {
        // d = 0.5, m = −1: x = 0.5·q − 1, so q = 0 → −1, q = 15 → 6.5.
        let q: [u8; 32] = std::array::from_fn(|i| (i * 7 % 16) as u8);
        let mut data = f16_bytes(0.5).to_vec();
        data.extend(f16_bytes(-1.0));
        data.extend(nibbles(&q));
        let (_dir, file) = Writer::new().tensor("q", &[32], 3, data).open();
        let x = file.unwrap().dequantize("q").unwrap();
        let expected: Vec<f32> = q.iter().map(|&q| 0.5 * q as f32 - 1.0).collect();
        assert_eq!(x, expected);
        assert_eq!((x[0], x[16], x[17]), (-1.0, -1.0, 2.5), "q[16] = 112 % 16 = 0, q[17] = 119 % 16 = 7");
    }

    #[test]
    fn permutation_of_a_tiny_matrix_interleaves_the_halves() {
        // Two heads of 4 rows, one column holding the row number: each head's rotary
        // halves [0 1 | 2 3] become the pairs (0 2) (1 3).
        let rows: Vec<f32> = (0..8).map(|r| r as f32).collect();
        let forward = permute_qk_rows(&rows, 8, 2).unwrap();
        assert_eq!(forward, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        // Head dimension 6: halves [0 1 2 | 3 4 5] → 0 3 1 4 2 5.
        let rows: Vec<f32> = (0..6).map(|r| r as f32).collect();
        assert_eq!(permute_qk_rows(&rows, 6, 1).unwrap(), [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert!(permute_qk_rows(&rows, 6, 2).is_none(), "heads of 3 rows cannot pair up");
        assert!(unpermute_qk_rows(&rows, 4, 1).is_none(), "6 values are not 4 whole rows");
    }

    #[test]
    fn unpermute_inverts_permute_on_a_random_matrix() {
        let mut rng = crate::tensor::SeededRng::new(7);
        let (rows, cols, heads) = (48, 5, 3);
        let w = rng.normal_vec(rows * cols, 1.0);
        let permuted = permute_qk_rows(&w, rows, heads).unwrap();
        assert_ne!(permuted, w);
        assert_eq!(unpermute_qk_rows(&permuted, rows, heads).unwrap(), w);
        assert_eq!(permute_qk_rows(&unpermute_qk_rows(&w, rows, heads).unwrap(), rows, heads).unwrap(), w);
    }

    /// A small Llama file: 2 layers' worth of metadata, q/k stored permuted as llama.cpp
    /// does, 8-token byte-free vocabulary.
    fn llama_writer(q: &[f32], k: &[f32]) -> Writer {
        let (hidden, heads, kv_heads) = (8u64, 2, 1);
        let q_stored = permute_qk_rows(q, 8, heads).unwrap();
        let k_stored = permute_qk_rows(k, 4, kv_heads).unwrap();
        Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("llama.embedding_length", GgufValue::U32(hidden as u32))
            .kv("llama.feed_forward_length", GgufValue::U32(24))
            .kv("llama.block_count", GgufValue::U32(2))
            .kv("llama.attention.head_count", GgufValue::U32(heads as u32))
            .kv("llama.attention.head_count_kv", GgufValue::U32(kv_heads as u32))
            .kv("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5))
            .kv("llama.rope.freq_base", GgufValue::F32(100000.0))
            .kv("llama.context_length", GgufValue::U32(2048))
            .kv("llama.rope.dimension_count", GgufValue::U32(4))
            .kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
            .f32_tensor("token_embd.weight", &[hidden, 10], &[0.0; 80])
            .f32_tensor("blk.0.attn_q.weight", &[hidden, 8], &q_stored)
            .f32_tensor("blk.0.attn_k.weight", &[hidden, 4], &k_stored)
            .f32_tensor("blk.0.attn_v.weight", &[hidden, 4], k)
    }

    #[test]
    fn dequantize_undoes_the_rotary_permutation_of_q_and_k_only() {
        let q: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let k: Vec<f32> = (0..32).map(|i| -(i as f32)).collect();
        let (_dir, file) = llama_writer(&q, &k).open();
        let file = file.unwrap();
        assert_eq!(file.dequantize("blk.0.attn_q.weight").unwrap(), q, "q uses head_count");
        assert_eq!(file.dequantize("blk.0.attn_k.weight").unwrap(), k, "k uses head_count_kv");
        assert_eq!(file.dequantize("blk.0.attn_v.weight").unwrap(), k, "v is stored as is");
        let err = err_text(file.dequantize("blk.9.attn_q.weight"));
        assert!(err.contains("tensor blk.9.attn_q.weight: not in"), "{err}");
    }

    #[test]
    fn hf_config_maps_llama_metadata() {
        let (_dir, file) = llama_writer(&[0.0; 64], &[0.0; 32]).open();
        let config = file.unwrap().hf_config().unwrap();
        let expected = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10,
            "hidden_size": 8, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "max_position_embeddings": 2048, "head_dim": 4,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "torch_dtype": "float32",
        });
        assert_eq!(config, expected);
        // The built config is one the Llama loader accepts.
        let parsed = crate::model::ConfigJson::from_value("x.gguf".into(), config);
        crate::model::llama::LlamaConfig::parse(&parsed).unwrap();
    }

    #[test]
    fn hf_config_names_missing_keys_and_other_architectures() {
        let (_dir, file) = Writer::new().kv("general.architecture", s("qwen2")).open();
        let err = err_text(file.unwrap().hf_config());
        assert!(
            err.contains("general.architecture is \"qwen2\" (string), but only llama is supported"),
            "{err}"
        );
        let writer = Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("llama.attention.head_count", GgufValue::I32(-4));
        let err = err_text(writer.open().1.unwrap().hf_config());
        assert!(err.contains("llama.attention.head_count is -4 (i32), expected a positive integer"), "{err}");
        let writer = Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("llama.attention.head_count", GgufValue::U32(4));
        let err = err_text(writer.open().1.unwrap().hf_config());
        assert!(err.contains("no tokenizer.ggml.tokens and no token_embd.weight"), "{err}");
    }

    #[test]
    fn hf_names_follow_the_llama_table() {
        let cases = [
            ("token_embd.weight", Some("model.embed_tokens.weight")),
            ("blk.0.attn_norm.weight", Some("model.layers.0.input_layernorm.weight")),
            ("blk.12.attn_q.weight", Some("model.layers.12.self_attn.q_proj.weight")),
            ("blk.3.attn_k.weight", Some("model.layers.3.self_attn.k_proj.weight")),
            ("blk.3.attn_v.weight", Some("model.layers.3.self_attn.v_proj.weight")),
            ("blk.3.attn_output.weight", Some("model.layers.3.self_attn.o_proj.weight")),
            ("blk.3.ffn_norm.weight", Some("model.layers.3.post_attention_layernorm.weight")),
            ("blk.3.ffn_gate.weight", Some("model.layers.3.mlp.gate_proj.weight")),
            ("blk.3.ffn_up.weight", Some("model.layers.3.mlp.up_proj.weight")),
            ("blk.3.ffn_down.weight", Some("model.layers.3.mlp.down_proj.weight")),
            ("output_norm.weight", Some("model.norm.weight")),
            ("output.weight", Some("lm_head.weight")),
            ("rope_freqs.weight", None),
            ("blk.3.attn_q.bias", None),
            ("blk.x.attn_q.weight", None),
            ("blk.+1.attn_q.weight", None),
            ("blk.1", None),
        ];
        for (gguf, hf) in cases {
            assert_eq!(hf_name(gguf).as_deref(), hf, "{gguf}");
        }
    }

    #[test]
    fn unsupported_tensor_types_are_rejected_at_open() {
        let (_dir, file) = Writer::new().tensor("blk.0.ffn_down.weight", &[256], 14, vec![0; 210]).open();
        let err = err_text(file);
        assert!(err.contains("model.gguf"), "{err}");
        assert!(err.contains("tensor blk.0.ffn_down.weight: type Q6_K (type 14) is not supported"), "{err}");
        assert!(err.contains("supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1"), "{err}");
        let (_dir, file) = Writer::new().tensor("x", &[4], 99, vec![0; 4]).open();
        let err = err_text(file);
        assert!(err.contains("type 99 (unknown to ggml) is not supported"), "{err}");
    }

    #[test]
    fn bad_magic_and_short_files_are_named() {
        let err = err_text(open_bytes(b"PK\x03\x04 not gguf at all").1);
        assert!(err.contains("not a GGUF file: starts with [50, 4b, 03, 04]"), "{err}");
        let err = err_text(open_bytes(b"GG").1);
        assert!(err.contains("not a GGUF file: 2 bytes, too short"), "{err}");
        let err = err_text(open_bytes(b"").1);
        assert!(err.contains("not a GGUF file: 0 bytes"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let q: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let writer = llama_writer(&q, &q[..32]).kv("tokenizer.ggml.tokens", strings(&["a", "b"]));
        let bytes = writer.bytes();
        assert!(open_bytes(&bytes).1.is_ok());
        for len in 0..bytes.len() {
            let result = open_bytes(&bytes[..len]).1;
            assert!(result.is_err(), "a file cut to {len} of {} bytes opened", bytes.len());
        }
        let err = err_text(open_bytes(&bytes[..bytes.len() - 1]).1);
        assert!(
            err.contains("tensor blk.0.attn_v.weight: data runs past the end of the file (offset"),
            "{err}"
        );
        assert!(err.contains(&format!("+ 128 bytes > {})", bytes.len() - 1)), "{err}");
    }

    #[test]
    fn corrupt_lengths_and_values_are_errors() {
        // A string length far beyond the file.
        let mut bytes = Writer::new().kv("general.name", s("tiny")).bytes();
        let len_at = 24 + 8 + "general.name".len() + 4;
        bytes[len_at..len_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = err_text(open_bytes(&bytes).1);
        assert!(err.contains("metadata key general.name: string value at offset"), "{err}");
        // An array length beyond the file must not allocate.
        let mut bytes = Writer::new().kv("a", arr(vec![GgufValue::U8(1)])).bytes();
        let count_at = 24 + 8 + 1 + 4 + 4;
        bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let err = err_text(open_bytes(&bytes).1);
        assert!(err.contains("metadata key a: array length at offset 41 is 1152921504606846976"), "{err}");
        // A bool that is neither 0 nor 1, and an unknown value type.
        let mut bytes = Writer::new().kv("b", GgufValue::Bool(true)).bytes();
        bytes[37] = 2;
        assert!(err_text(open_bytes(&bytes).1).contains("bool value at offset 37 is 2, expected 0 or 1"));
        let mut bytes = Writer::new().kv("b", GgufValue::Bool(true)).bytes();
        bytes[33..37].copy_from_slice(&13u32.to_le_bytes());
        assert!(err_text(open_bytes(&bytes).1).contains("value type 13 is not a GGUF type"));
        // Alignment, block multiples, dimensions, duplicate names.
        let err = err_text(Writer::new().kv("general.alignment", GgufValue::U32(24)).open().1);
        assert!(err.contains("general.alignment is 24 (u32), expected a power of two"), "{err}");
        let err = err_text(Writer::new().tensor("q", &[16], 8, vec![0; 34]).open().1);
        assert!(err.contains("tensor q: rows of 16 elements are not whole Q8_0 blocks of 32"), "{err}");
        let err = err_text(Writer::new().f32_tensor("x", &[1, 1, 1, 1, 1], &[1.0]).open().1);
        assert!(err.contains("tensor x: 5 dimensions, expected 1 to 4"), "{err}");
        let err =
            err_text(Writer::new().f32_tensor("x", &[1], &[1.0]).f32_tensor("x", &[1], &[1.0]).open().1);
        assert!(err.contains("tensor x appears twice"), "{err}");
        let huge = Writer::new().f32_tensor("x", &[1 << 40, 1 << 40], &[1.0]);
        assert!(
            err_text(huge.open().1).contains("tensor x: dimensions [1099511627776, 1099511627776] overflow")
        );
        // Regression (found by fuzzing): a zero dimension made the checked product 0, but
        // multiplying the shape in Hugging Face order overflowed before reaching it.
        let zero = Writer::new().f32_tensor("z", &[0, 1 << 40, 1 << 40], &[]);
        assert!(err_text(zero.open().1)
            .contains("tensor z: dimensions [0, 1099511627776, 1099511627776] overflow"));
        let (_dir, file) = Writer::new().f32_tensor("z", &[0, 1 << 20, 1 << 20], &[]).open();
        assert_eq!(file.unwrap().tensors()[0].elements(), 0, "zero elements, and no overflow");
        // Regression (found by fuzzing): an empty query projection of 2^40 rows sized the
        // row permutation by its row count (capacity overflow).
        let mut writer = llama_writer(&[0.0; 64], &[0.0; 32]);
        writer.tensors.retain(|(name, ..)| name != "blk.0.attn_q.weight");
        let (_dir, file) = writer.f32_tensor("blk.0.attn_q.weight", &[0, 1 << 40], &[]).open();
        assert_eq!(file.unwrap().dequantize("blk.0.attn_q.weight").unwrap(), Vec::<f32>::new());
        assert_eq!(unpermute_qk_rows(&[], 1 << 40, 2), None);
        assert_eq!(permute_qk_rows(&[1.0; 4], 8, 2), None, "more rows than values");
        // Regression (found by fuzzing): a head count above usize::MAX / 2 overflowed.
        let mut writer = llama_writer(&[0.0; 64], &[0.0; 32]);
        writer.metadata.retain(|(key, _)| key != "llama.attention.head_count");
        let writer = writer.kv("llama.attention.head_count", GgufValue::U64(u64::MAX));
        let err = err_text(writer.open().1.unwrap().dequantize("blk.0.attn_q.weight"));
        assert!(err.contains("8 rows do not split into 18446744073709551615 heads"), "{err}");
    }

    /// Regression: a u8 array was held as one 32-byte `GgufValue` per element, so a file
    /// of one big array cost 32× its size. Arrays are now kept as stored.
    #[test]
    fn arrays_are_kept_as_stored_and_decode_on_access() {
        let bytes: Vec<GgufValue> = (0..1000).map(|i| GgufValue::U8(i as u8)).collect();
        let (_dir, file) = Writer::new().kv("blob", arr(bytes.clone())).open();
        let file = file.unwrap();
        let array = file.metadata()["blob"].as_array().unwrap();
        assert_eq!((array.len(), array.element_type_name()), (1000, "u8"));
        assert_eq!(array.raw.len(), 1000, "one byte per u8 element");
        assert_eq!(array.iter().collect::<Vec<_>>(), bytes);
        assert_eq!(array.strs(), None);
        assert_eq!(GgufArray::from_values(&[]).unwrap().strs(), Some(vec![]), "empty: no strings");
        assert_eq!(GgufArray::from_values(&[GgufValue::U8(1), GgufValue::I8(1)]), None, "mixed types");
    }

    #[test]
    fn bad_elements_of_nested_and_string_arrays_are_found_at_open() {
        // A bool element that is 2, inside an array of arrays.
        let mut bytes = Writer::new().kv("n", arr(vec![arr(vec![GgufValue::Bool(true)])])).bytes();
        let last = bytes.iter().rposition(|&b| b == 1).unwrap();
        bytes[last] = 2;
        let err = err_text(open_bytes(&bytes).1);
        assert!(err.contains("metadata key n: element 0: element 0: bool value at offset"), "{err}");
        // A string element that is not UTF-8.
        let mut bytes = Writer::new().kv("t", strings(&["ok", "bad"])).bytes();
        let at = bytes.windows(3).position(|w| w == b"bad").unwrap();
        bytes[at] = 0xff;
        let err = err_text(open_bytes(&bytes).1);
        assert!(
            err.contains("metadata key t: element 1: string value at offset") && err.contains("UTF-8"),
            "{err}"
        );
        // An unknown element type, and counts that cannot fit in the file.
        let mut bytes = Writer::new().kv("a", arr(vec![GgufValue::U32(1)])).bytes();
        bytes[37..41].copy_from_slice(&13u32.to_le_bytes());
        let err = err_text(open_bytes(&bytes).1);
        assert!(err.contains("array element type 13 is not a GGUF type"), "{err}");
        let mut bytes = Writer::new().kv("a", arr(vec![GgufValue::U64(1)])).bytes();
        bytes[41..49].copy_from_slice(&2u64.to_le_bytes());
        let err = err_text(open_bytes(&bytes).1);
        assert!(err.contains("array length at offset 41 is 2; at 8 bytes each at least"), "{err}");
        let mut bytes = Writer::new().bytes();
        bytes[8..16].copy_from_slice(&1u64.to_le_bytes());
        let err = err_text(open_bytes(&bytes).1);
        assert!(err.contains("tensor count at offset 8 is 1; at 32 bytes each at least"), "{err}");
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_refused() {
        for key in TOKEN_ID_KEYS {
            let mut writer = llama_writer(&[0.0; 64], &[0.0; 32]).kv("tokenizer.ggml.model", s("gpt2"));
            writer.metadata.retain(|(k, _)| k != key);
            let writer = writer.kv(key, GgufValue::U32(10));
            let (_dir, file) = writer.open();
            let file = file.unwrap();
            for err in [err_text(file.hf_config()), err_text(file.tokenizer_json())] {
                let want = format!(
                    "metadata key {key} is 10, outside the vocabulary of 10 tokens (expected 0 to 9)"
                );
                assert!(err.contains(&want) && err.contains("model.gguf"), "{err}");
            }
        }
        let writer =
            llama_writer(&[0.0; 64], &[0.0; 32]).kv("tokenizer.ggml.padding_token_id", GgufValue::I32(-1));
        let err = err_text(writer.open().1.unwrap().hf_config());
        assert!(err.contains("tokenizer.ggml.padding_token_id is -1 (i32), expected a token id"), "{err}");
    }

    #[test]
    fn from_bytes_reads_what_open_reads() {
        let q: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let bytes = llama_writer(&q, &q[..32]).bytes();
        let file = GgufFile::from_bytes(bytes, Path::new("memory.gguf")).unwrap();
        assert_eq!(file.dequantize("blk.0.attn_q.weight").unwrap(), q);
        assert_eq!(file.path(), Path::new("memory.gguf"));
        let err = err_text(GgufFile::from_bytes(b"GGUF".to_vec(), Path::new("memory.gguf")));
        assert!(err.contains("memory.gguf"), "{err}");
    }

    /// A GGUF tokenizer from the built-in byte-level BPE, with `<|endoftext|>` as a control
    /// token and `<tool>` as a user-defined one.
    /// Returns the writer, the reference tokenizer.json and the id of `<|endoftext|>`.
    fn tokenizer_writer(pre: &str) -> (Writer, Value, u32) {
        let corpus = "the cat sat on the mat; 1234 cats sat on 56 mats. The end, the end!";
        let reference = crate::model::builtin::tokenizer_json(corpus, 300);
        let vocab = reference["model"]["vocab"].as_object().unwrap();
        let mut tokens = vec![String::new(); vocab.len()];
        for (token, id) in vocab {
            tokens[id.as_u64().unwrap() as usize] = token.clone();
        }
        let mut types = vec![GgufValue::I32(1); tokens.len()];
        let end_of_text = tokens.len() as u32;
        tokens.push("<|endoftext|>".into());
        types.push(GgufValue::I32(3));
        tokens.push("<tool>".into());
        types.push(GgufValue::I32(4));
        let merges: Vec<&str> =
            reference["model"]["merges"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let writer = Writer::new()
            .kv("tokenizer.ggml.model", s("gpt2"))
            .kv("tokenizer.ggml.pre", s(pre))
            .kv("tokenizer.ggml.tokens", strings(&token_refs))
            .kv("tokenizer.ggml.token_type", arr(types))
            .kv("tokenizer.ggml.merges", strings(&merges));
        (writer, reference, end_of_text)
    }

    fn load_tokenizer(json: &Value) -> tokenizers::Tokenizer {
        use std::str::FromStr;
        tokenizers::Tokenizer::from_str(&json.to_string()).unwrap()
    }

    #[test]
    fn gpt2_tokenizer_matches_the_byte_level_reference_and_round_trips() {
        let (writer, reference, end_of_text) = tokenizer_writer("gpt2");
        let (_dir, file) = writer.open();
        let built = load_tokenizer(&file.unwrap().tokenizer_json().unwrap());
        let reference = load_tokenizer(&reference);
        let text = "The cat sat on 1234 mats — ünïcode too.";
        let ids = built.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids, reference.encode(text, false).unwrap().get_ids());
        assert!(ids.len() < text.len(), "merges apply: {ids:?}");
        assert_eq!(built.decode(&ids, true).unwrap(), text);
        let special = built.encode("the end<|endoftext|>", false).unwrap();
        assert_eq!(special.get_ids().last(), Some(&end_of_text));
        assert_eq!(built.decode(special.get_ids(), true).unwrap(), "the end", "control tokens are special");
        let tool = built.encode("<tool>", false).unwrap();
        assert_eq!(tool.get_ids(), [end_of_text + 1]);
        assert_eq!(built.decode(tool.get_ids(), true).unwrap(), "<tool>", "user-defined tokens are not");
    }

    #[test]
    fn smollm_pre_tokenizer_splits_every_digit() {
        let (writer, _, _) = tokenizer_writer("smollm");
        let (_dir, file) = writer.open();
        let json = file.unwrap().tokenizer_json().unwrap();
        assert_eq!(
            json["pre_tokenizer"]["pretokenizers"][0],
            json!({"type": "Digits", "individual_digits": true})
        );
        let tokenizer = load_tokenizer(&json);
        let encoding = tokenizer.encode("1234 cats", false).unwrap();
        assert_eq!(&encoding.get_tokens()[..4], ["1", "2", "3", "4"]);
        assert_eq!(tokenizer.decode(encoding.get_ids(), true).unwrap(), "1234 cats");
    }

    #[test]
    fn unsupported_tokenizers_are_named() {
        let (_dir, file) = Writer::new().kv("tokenizer.ggml.model", s("llama")).open();
        let err = err_text(file.unwrap().tokenizer_json());
        assert!(err.contains("tokenizer.ggml.model is \"llama\" (string), but only \"gpt2\""), "{err}");
        let (writer, _, _) = tokenizer_writer("qwen2");
        let err = err_text(writer.open().1.unwrap().tokenizer_json());
        assert!(err.contains("tokenizer.ggml.pre is \"qwen2\"; the supported pre-tokenizers are"), "{err}");
        let writer = Writer::new()
            .kv("tokenizer.ggml.model", s("gpt2"))
            .kv("tokenizer.ggml.tokens", strings(&["a", "b", "a"]))
            .kv("tokenizer.ggml.merges", strings(&[]));
        let err = err_text(writer.open().1.unwrap().tokenizer_json());
        assert!(err.contains("holds \"a\" twice (ids 0 and 2)"), "{err}");
        let writer = Writer::new()
            .kv("tokenizer.ggml.model", s("gpt2"))
            .kv("tokenizer.ggml.tokens", strings(&["a", "b", "ab"]))
            .kv("tokenizer.ggml.merges", strings(&["a b", "ab"]));
        let err = err_text(writer.open().1.unwrap().tokenizer_json());
        assert!(err.contains("tokenizer.ggml.merges element 1 is \"ab\", expected two tokens"), "{err}");
    }
}
