//! GGUF v3 (and v2) reader: metadata, tensor directory, dequantization of the float and
//! legacy block types to f32 in Hugging Face layout, and the config.json / tokenizer.json
//! equivalents of a Llama checkpoint, so a llama.cpp file loads like a Hugging Face one.
//!
//! Layout read here (little-endian): magic `GGUF`, version (u32), tensor count (u64),
//! metadata count (u64), metadata key/value pairs, tensor infos, padding to
//! `general.alignment` (default 32), then the tensor data. Every length and offset is
//! checked against the file size before it is used.
//!
//! Here: the open file, its tensors and their dequantization in Hugging Face layout.
//! `parse.rs` reads the byte layout (metadata values, tensor directory), `blocks.rs`
//! decodes the ggml block types, `translate.rs` makes config.json and tokenizer.json,
//! maps tensor names and undoes llama.cpp's RoPE permutation.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::error::dims_text;
use crate::error::{Error, Result};

mod blocks;
mod parse;
mod translate;

pub use blocks::*;
pub use parse::*;
pub use translate::*;

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

    /// The tensor `gguf_name`, or an error naming it and the file.
    fn present(&self, gguf_name: &str) -> Result<&GgufTensor> {
        self.tensor(gguf_name).ok_or_else(|| Error::Tensor {
            name: gguf_name.to_string(),
            message: format!("not in {} ({} tensors present)", self.path.display(), self.tensors.len()),
        })
    }

    /// The tensor `gguf_name` as f32, row-major in its [`GgufTensor::shape`]. In a Llama
    /// file the rows of `blk.N.attn_q.weight` and `blk.N.attn_k.weight` are returned in
    /// Hugging Face order (llama.cpp's converter interleaves them for its RoPE; see
    /// [`unpermute_qk_rows`]).
    pub fn dequantize(&self, gguf_name: &str) -> Result<Vec<f32>> {
        let tensor = self.present(gguf_name)?;
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
        let tensor = self.present(gguf_name)?;
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

    /// `general.architecture`, the model type the file says it holds (the architecture
    /// table, `model::ARCHS`, decides whether it can be read).
    pub fn architecture(&self) -> Option<&str> {
        self.str_key("general.architecture")
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
}

impl GgufFile {
    /// The array of strings at `key`, required.
    pub(super) fn string_array(&self, key: &str) -> Result<Vec<&str>> {
        let value = self
            .metadata
            .get(key)
            .ok_or_else(|| self.tokenizer_error(format!("{key} is missing, expected an array of strings")))?;
        let items = value.as_array().ok_or_else(|| self.expected(key, value, "an array of strings"))?;
        items.strs().ok_or_else(|| self.expected(key, value, "an array of strings"))
    }

    pub(super) fn str_key(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(GgufValue::as_str)
    }

    /// A required positive integer.
    pub(super) fn positive(&self, key: &str) -> Result<usize> {
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
    pub(super) fn positive_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.metadata.contains_key(key) {
            self.positive(key)
        } else {
            Ok(default)
        }
    }

    /// A required number.
    pub(super) fn number(&self, key: &str) -> Result<f64> {
        let value = self
            .metadata
            .get(key)
            .ok_or_else(|| self.format_error(format!("metadata key {key} is missing, expected a number")))?;
        value.as_f64().ok_or_else(|| self.expected(key, value, "a number"))
    }

    /// An optional number.
    pub(super) fn number_or(&self, key: &str, default: f64) -> Result<f64> {
        if self.metadata.contains_key(key) {
            self.number(key)
        } else {
            Ok(default)
        }
    }

    pub(super) fn format_error(&self, message: String) -> Error {
        Error::ModelFormat { path: self.path.clone(), message }
    }

    pub(super) fn tokenizer_error(&self, message: String) -> Error {
        Error::Tokenizer { path: self.path.clone(), message }
    }

    /// A metadata value of the wrong kind.
    pub(super) fn expected(&self, key: &str, found: &GgufValue, expected: &str) -> Error {
        let message = format!("metadata key {key} is {}, expected {expected}", found.describe());
        if key.starts_with("tokenizer.") {
            self.tokenizer_error(message)
        } else {
            self.format_error(message)
        }
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
        // The architecture table decides which files are read: qwen2 has no translation.
        let (_dir, file) = Writer::new().kv("general.architecture", s("qwen2")).open();
        let err = err_text(crate::model::ModelFiles::open(file.unwrap().path()).map(|_| ()));
        assert!(
            err.contains(
                "general.architecture is \"qwen2\", expected one this reader translates from GGUF: llama"
            ),
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
