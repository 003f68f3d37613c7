//! Memory-mapped checkpoints (safetensors, single-file or sharded; or one GGUF file), read
//! tensor by tensor and converted to f32 on demand.
//!
//! The safetensors header is read here rather than by the `safetensors` crate, so that
//! every complaint names the file, the tensor, the value found and the value expected.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorInfo};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::gguf::{GgmlType, GgufFile};
use crate::error::dims_text;
use crate::error::{Error, Result};
use crate::scheme::{StoredTensor, TensorSink};

/// Prefixes that exporters put in front of tensor names (`model.`, `transformer.`, `bert.`);
/// lookups try the name with and without them.
const NAME_PREFIXES: &[&str] = &["model.", "transformer.", "bert.", ""];

/// One memory-mapped safetensors file with its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    header: SafetensorsHeader,
}

/// Every safetensors dtype name, for messages.
const DTYPE_NAMES: &str = "BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, \
                           F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64";

/// A safetensors header, checked against the file it came from.
#[derive(Debug, Clone)]
pub struct SafetensorsHeader {
    /// Byte offset of the data section (8 + the header's length).
    pub data_start: usize,
    /// Each tensor with its dtype, shape and byte range within the data section, in the
    /// order of their data.
    pub tensors: Vec<(String, TensorInfo)>,
    /// The `__metadata__` strings, if any.
    pub metadata: BTreeMap<String, String>,
}

/// A tensor's header entry as written, before it is checked.
#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The header's JSON object as written: tensors in file order, and `__metadata__`.
#[derive(Default)]
struct RawHeader {
    tensors: Vec<(String, RawTensor)>,
    metadata: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct HeaderVisitor;
        impl<'de> Visitor<'de> for HeaderVisitor {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of tensor name → {dtype, shape, data_offsets}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
                let mut header = RawHeader::default();
                while let Some(name) = map.next_key::<String>()? {
                    if name == "__metadata__" {
                        header.metadata = map.next_value::<Option<_>>()?.unwrap_or_default();
                    } else {
                        let tensor = map.next_value()?;
                        header.tensors.push((name, tensor));
                    }
                }
                Ok(header)
            }
        }
        deserializer.deserialize_map(HeaderVisitor)
    }
}

/// Parse and check the safetensors file `bytes` (`path` is named in errors): the header
/// length against the file, the JSON, every tensor's dtype, shape and data offsets, and
/// that the tensors' data tiles the data section exactly. Never panics; allocates about
/// the header's size.
pub fn parse_safetensors(bytes: &[u8], path: &Path) -> Result<SafetensorsHeader> {
    let bad = |message: String| Error::ModelFormat { path: path.to_path_buf(), message };
    let Some(len_field) = bytes.get(..8) else {
        return Err(bad(format!(
            "not a safetensors file: {} bytes, too short for the 8-byte header length",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(len_field.try_into().expect("8 bytes"));
    let data_start =
        usize::try_from(header_len).ok().and_then(|n| n.checked_add(8)).filter(|&s| s <= bytes.len());
    let Some(data_start) = data_start else {
        return Err(bad(format!(
            "corrupt safetensors header: its length field says {header_len} bytes, but only {} bytes follow \
             it (truncated, or not a safetensors file)",
            bytes.len() - 8
        )));
    };
    let json = &bytes[8..data_start];
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let raw: RawHeader = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let at = e.path().to_string();
        let at = if at == "." { String::new() } else { format!(" at {at}") };
        bad(format!("corrupt safetensors header{at}: {}", e.inner()))
    })?;
    deserializer.end().map_err(|e| bad(format!("corrupt safetensors header: {e}")))?;
    let data_len = bytes.len() - data_start;
    let mut tensors = Vec::with_capacity(raw.tensors.len());
    for (name, tensor) in raw.tensors {
        let info = check_tensor(tensor, data_len).map_err(|m| bad(format!("tensor {name}: {m}")))?;
        tensors.push((name, info));
    }
    tensors.sort_by(|(a, x), (b, y)| x.data_offsets.cmp(&y.data_offsets).then_with(|| a.cmp(b)));
    let mut names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(bad(format!("tensor {} appears twice in the header", pair[0])));
    }
    let mut end = 0;
    for (i, (name, info)) in tensors.iter().enumerate() {
        let (begin, stop) = info.data_offsets;
        if begin != end {
            let after = match i {
                0 => "the data section starts".to_string(),
                _ => format!("tensor {} ends", tensors[i - 1].0),
            };
            let what = if begin < end { "overlaps the tensor before it" } else { "leaves a gap" };
            return Err(bad(format!(
                "tensor {name}: data offsets [{begin}, {stop}] begin at {begin}, expected {end} (where {after}); \
                 it {what}"
            )));
        }
        end = stop;
    }
    if end != data_len {
        return Err(bad(format!(
            "the tensors' data ends at byte {end} of the data section, but the data section is {data_len} bytes \
             (the file is truncated or padded)"
        )));
    }
    Ok(SafetensorsHeader { data_start, tensors, metadata: raw.metadata })
}

/// One tensor's entry checked on its own: a known dtype, a shape whose bytes match its
/// data offsets, and offsets inside the data section of `data_len` bytes.
fn check_tensor(raw: RawTensor, data_len: usize) -> std::result::Result<TensorInfo, String> {
    let dtype: Dtype =
        serde_json::from_value(serde_json::Value::String(raw.dtype.clone())).map_err(|_| {
            format!("dtype \"{}\" is not a safetensors dtype, expected one of {DTYPE_NAMES}", raw.dtype)
        })?;
    let shape = raw.shape;
    let [begin, end] = raw.data_offsets;
    if begin > end {
        return Err(format!("data offsets [{begin}, {end}] end before they begin, expected begin ≤ end"));
    }
    if end > data_len as u64 {
        return Err(format!(
            "data offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes): the file \
             is truncated or the offsets are wrong"
        ));
    }
    // The product of the non-zero dimensions must fit: then no order of multiplying the
    // shape overflows, even when a zero dimension makes the element count 0.
    let nonzero = shape.iter().filter(|&&d| d != 0).try_fold(1usize, |n, &d| n.checked_mul(d));
    let elements = nonzero.map(|n| if shape.contains(&0) { 0 } else { n });
    let bits = elements.and_then(|n| n.checked_mul(dtype.bitsize()));
    let bits =
        bits.ok_or_else(|| format!("shape {} of dtype {dtype} overflows the byte count", dims_text(&shape)))?;
    if bits % 8 != 0 {
        return Err(format!(
            "shape {} of dtype {dtype} is {bits} bits, not a whole number of bytes",
            dims_text(&shape)
        ));
    }
    let size = (bits / 8) as u64;
    if end - begin != size {
        return Err(format!(
            "dtype {dtype} and shape {} take {size} bytes, but data offsets [{begin}, {end}] hold {}",
            dims_text(&shape),
            end - begin
        ));
    }
    Ok(TensorInfo { dtype, shape, data_offsets: (begin as usize, end as usize) })
}

/// The element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredType {
    /// A safetensors dtype.
    Safetensors(Dtype),
    /// A ggml type of a GGUF file (block-quantized types included).
    Ggml(GgmlType),
}

impl StoredType {
    /// The type's name as its format spells it (`F32`, `BF16`, `Q4_1`).
    pub fn name(self) -> String {
        match self {
            StoredType::Safetensors(d) => d.to_string(),
            StoredType::Ggml(g) => g.name().to_string(),
        }
    }

    /// The float storage a layer stored in this type keeps in memory: `F16` or `BF16` for
    /// a 16-bit safetensors float, else `F32` (f32, and GGUF types, which are dequantized).
    pub fn precision(self) -> crate::scheme::FloatStorage {
        use crate::scheme::FloatStorage;
        match self {
            StoredType::Safetensors(Dtype::F16) => FloatStorage::F16,
            StoredType::Safetensors(Dtype::BF16) => FloatStorage::BF16,
            _ => FloatStorage::F32,
        }
    }

    /// Whether the harness can turn it into f32 weights.
    pub fn is_computable(self) -> bool {
        match self {
            StoredType::Safetensors(d) => is_float(d),
            // GGUF files with other types are refused when opened.
            StoredType::Ggml(_) => true,
        }
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    location: Location,
    /// Element type as stored.
    pub stored: StoredType,
    /// Shape as stored (Hugging Face order: `[rows, cols]`).
    pub shape: Vec<usize>,
    /// Bytes as stored.
    pub bytes: u64,
}

#[derive(Debug, Clone)]
enum Location {
    Safetensors { file: usize, offsets: (usize, usize) },
    Gguf { name: String },
}

enum Backing {
    Safetensors(Vec<MappedFile>),
    Gguf(Box<GgufFile>),
}

/// Every tensor of a checkpoint, by name, across its shards.
pub struct WeightStore {
    backing: Backing,
    index: BTreeMap<String, TensorEntry>,
}

impl WeightStore {
    /// Open the checkpoint in a Hugging Face model directory: `model.safetensors`, or the
    /// shards listed by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            Self::open_files(&[single])
        } else if index.is_file() {
            Self::open_files(&shards_from_index(&index)?)
        } else {
            Err(Error::ModelMissing {
                what: "weights",
                path: dir.to_path_buf(),
                hint: "expected model.safetensors, or model.safetensors.index.json with its \
                       shards"
                    .into(),
            })
        }
    }

    /// Open the given safetensors files as one checkpoint. A name present in two files is
    /// an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for (file_no, path) in paths.iter().enumerate() {
            let mapped = map_file(path)?;
            for (name, info) in &mapped.header.tensors {
                let TensorInfo { dtype, shape, data_offsets } = info.clone();
                let entry = TensorEntry {
                    location: Location::Safetensors { file: file_no, offsets: data_offsets },
                    stored: StoredType::Safetensors(dtype),
                    bytes: (data_offsets.1 - data_offsets.0) as u64,
                    shape,
                };
                if index.insert(name.clone(), entry).is_some() {
                    return Err(Error::ModelFormat {
                        path: path.clone(),
                        message: format!("tensor {name} also appears in another shard"),
                    });
                }
            }
            files.push(mapped);
        }
        Ok(WeightStore { backing: Backing::Safetensors(files), index })
    }

    /// Open a GGUF file: its tensors under their Hugging Face names (others under their
    /// GGUF names, which no architecture asks for), dequantized on access.
    pub fn open_gguf(gguf: GgufFile) -> Self {
        let index = gguf
            .tensors()
            .into_iter()
            .map(|t| {
                let entry = TensorEntry {
                    location: Location::Gguf { name: t.name.clone() },
                    stored: StoredType::Ggml(t.ggml_type),
                    shape: t.shape.clone(),
                    bytes: t.bytes,
                };
                (t.hf_name.unwrap_or(t.name), entry)
            })
            .collect();
        WeightStore { backing: Backing::Gguf(Box::new(gguf)), index }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Every tensor with its entry, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.index.iter().map(|(n, e)| (n.as_str(), e))
    }

    /// The stored name of `name`, trying the exporters' prefixes.
    pub fn resolve(&self, name: &str) -> Option<&str> {
        let bare = NAME_PREFIXES.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        NAME_PREFIXES.iter().find_map(|prefix| {
            let candidate = format!("{prefix}{bare}");
            self.index.get_key_value(&candidate).map(|(k, _)| k.as_str())
        })
    }

    /// True when `name` (with or without a prefix) is present.
    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// The entry of `name`, or an error naming it.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        let stored = self.resolve(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            message: format!("missing from the checkpoint ({} tensors present)", self.index.len()),
        })?;
        Ok(&self.index[stored])
    }

    fn checked_entry(&self, name: &str, expected_shape: &[usize]) -> Result<&TensorEntry> {
        let entry = self.entry(name)?;
        if entry.shape != expected_shape {
            return Err(Error::Tensor {
                name: name.to_string(),
                message: format!(
                    "shape {} in {} does not match the config, expected {}",
                    dims_text(&entry.shape),
                    self.file_of(entry).display(),
                    dims_text(expected_shape)
                ),
            });
        }
        Ok(entry)
    }

    /// The file `entry` is stored in.
    fn file_of(&self, entry: &TensorEntry) -> &Path {
        match (&self.backing, &entry.location) {
            (Backing::Safetensors(files), Location::Safetensors { file, .. }) => &files[*file].path,
            (Backing::Gguf(gguf), _) => gguf.path(),
            (Backing::Safetensors(files), Location::Gguf { .. }) => {
                files.first().map_or(Path::new("?"), |f| f.path.as_path())
            }
        }
    }

    /// The stored dtype and bytes of `name` (safetensors only: saved quantized models),
    /// checked against `expected_shape`.
    pub fn raw(&self, name: &str, expected_shape: &[usize]) -> Result<(Dtype, Vec<u8>)> {
        let entry = self.checked_entry(name, expected_shape)?;
        match (&self.backing, &entry.location, entry.stored) {
            (
                Backing::Safetensors(files),
                Location::Safetensors { file, offsets },
                StoredType::Safetensors(d),
            ) => {
                let f = &files[*file];
                let start = f.header.data_start;
                let bytes = f.mmap[start + offsets.0..start + offsets.1].to_vec();
                super::pages::release(&f.mmap, start + offsets.0, offsets.1 - offsets.0);
                Ok((d, bytes))
            }
            _ => Err(Error::Tensor {
                name: name.to_string(),
                message: "is in a GGUF file; saved quantized models are safetensors".into(),
            }),
        }
    }

    /// The tensor `name` converted to f32, checked against `expected_shape`.
    pub fn f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let entry = self.checked_entry(name, expected_shape)?;
        match (&self.backing, &entry.location) {
            (Backing::Safetensors(files), Location::Safetensors { file, offsets }) => {
                let f = &files[*file];
                let start = f.header.data_start;
                let bytes = &f.mmap[start + offsets.0..start + offsets.1];
                let StoredType::Safetensors(dtype) = entry.stored else { unreachable!("safetensors entry") };
                let values = to_f32(bytes, dtype);
                super::pages::release(&f.mmap, start + offsets.0, offsets.1 - offsets.0);
                values.ok_or_else(|| not_float(name, dtype, &f.path))
            }
            (Backing::Gguf(gguf), Location::Gguf { name }) => gguf.dequantize(name),
            _ => unreachable!("entries always point into their own store's backing"),
        }
    }

    /// The tensor `name` converted to f32 in chunks of `rows` rows (of its first
    /// dimension), each handed to `visit` in order, checked against `expected_shape`: a
    /// large tensor is never held whole in f32.
    pub fn f32_chunks(
        &self,
        name: &str,
        expected_shape: &[usize],
        rows: usize,
        visit: &mut dyn FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let entry = self.checked_entry(name, expected_shape)?;
        let row_values = expected_shape.iter().skip(1).product::<usize>().max(1);
        match (&self.backing, &entry.location) {
            (Backing::Safetensors(files), Location::Safetensors { file, offsets }) => {
                let f = &files[*file];
                let StoredType::Safetensors(dtype) = entry.stored else { unreachable!("safetensors entry") };
                let start = f.header.data_start + offsets.0;
                let bytes = &f.mmap[start..f.header.data_start + offsets.1];
                if !is_float(dtype) {
                    return Err(not_float(name, dtype, &f.path));
                }
                let row_bytes = row_values * dtype.bitsize() / 8;
                for (i, chunk) in bytes.chunks(rows.max(1) * row_bytes).enumerate() {
                    visit(&to_f32(chunk, dtype).expect("a float dtype"))?;
                    super::pages::release(&f.mmap, start + i * rows.max(1) * row_bytes, chunk.len());
                }
                Ok(())
            }
            (Backing::Gguf(gguf), Location::Gguf { name }) => gguf.dequantize_chunks(name, rows, visit),
            _ => unreachable!("entries always point into their own store's backing"),
        }
    }

    /// The paths of the mapped files.
    pub fn paths(&self) -> Vec<&Path> {
        match &self.backing {
            Backing::Safetensors(files) => files.iter().map(|f| f.path.as_path()).collect(),
            Backing::Gguf(gguf) => vec![gguf.path()],
        }
    }
}

/// The error for tensor `name`, stored as `dtype` in `path`, read as floats.
fn not_float(name: &str, dtype: Dtype, path: &Path) -> Error {
    Error::Tensor {
        name: name.to_string(),
        message: format!(
            "dtype {dtype} in {} is not a float type, expected F32, F16 or BF16",
            path.display()
        ),
    }
}

/// True for the stored types a model may compute with.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Decode little-endian F32/F16/BF16 bytes; `None` for other types. Large tensors decode
/// in parallel (a 7B model's 6.7 billion values are otherwise most of its load time).
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        _ => return None,
    };
    let decode = |out: &mut [f32], bytes: &[u8]| {
        let words = bytes.chunks_exact(width);
        match dtype {
            Dtype::F32 => {
                out.iter_mut().zip(words).for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            }
            Dtype::F16 => {
                out.iter_mut().zip(words).for_each(|(o, c)| *o = f16::from_le_bytes([c[0], c[1]]).to_f32())
            }
            _ => out.iter_mut().zip(words).for_each(|(o, c)| *o = bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        }
    };
    let mut out = vec![0.0f32; bytes.len() / width];
    out.par_chunks_mut(DECODE_CHUNK)
        .zip(bytes.par_chunks(DECODE_CHUNK * width))
        .for_each(|(out, bytes)| decode(out, bytes));
    Some(out)
}

/// Values per parallel task of [`to_f32`].
const DECODE_CHUNK: usize = 1 << 16;

fn map_file(path: &Path) -> Result<MappedFile> {
    let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    // SAFETY: the map is read-only; a checkpoint modified while mapped is outside what we
    // can defend against (the same contract as every safetensors reader).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("cannot map", path, e))?;
    let header = parse_safetensors(&mmap, path)?;
    Ok(MappedFile { path: path.to_path_buf(), mmap, header })
}

/// The shard files named by a `model.safetensors.index.json`, in first-use order.
fn shards_from_index(index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io("cannot read", index_path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Json { path: index_path.to_path_buf(), source: e })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::ModelFormat {
        path: index_path.to_path_buf(),
        message: "missing object \"weight_map\" (tensor name → shard file)".into(),
    })?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| Error::ModelFormat {
            path: index_path.to_path_buf(),
            message: format!("weight_map entry for tensor {tensor} is {file}, expected a file name"),
        })?;
        let inside =
            Path::new(file).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !inside || Path::new(file).file_name().is_none() {
            return Err(Error::ModelFormat {
                path: index_path.to_path_buf(),
                message: format!(
                    "weight_map entry for tensor {tensor} is {file:?}, a path outside the model folder; \
                     expected the name of a shard file inside it"
                ),
            });
        }
        let path = dir.join(file);
        if !shards.contains(&path) {
            if !path.is_file() {
                return Err(Error::ModelMissing {
                    what: "shard",
                    path,
                    hint: format!("listed in {} for tensor {tensor}", index_path.display()),
                });
            }
            shards.push(path);
        }
    }
    shards.sort();
    Ok(shards)
}

/// Save the tensors `export` puts into its sink as one safetensors file at `path`,
/// atomically (a temporary file in the same directory, then a rename), with `metadata` in
/// the header, one tensor at a time: `export` runs twice, first to lay out the header (names, types, shapes, sizes),
/// then to write the bytes, and must give the same tensors in the same order both times.
/// Nothing but one tensor is ever held, so saving a model never doubles its memory.
/// Returns the file size.
pub fn save_streaming(
    path: &Path,
    export: &dyn Fn(&mut TensorSink),
    metadata: BTreeMap<String, String>,
) -> Result<u64> {
    let mut layout: Vec<(String, Dtype, Vec<usize>, usize)> = Vec::new();
    export(&mut |t: StoredTensor| layout.push((t.name, t.dtype, t.shape, t.bytes.len())));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(&metadata).expect("strings serialise"));
    }
    let mut offset = 0usize;
    for (name, dtype, shape, len) in &layout {
        let entry =
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len] });
        header.insert(name.clone(), entry);
        offset += len;
    }
    let mut json = serde_json::to_vec(&header).expect("header serialises");
    // The data section starts 8-byte aligned, as the format's own writer pads it.
    json.resize((8 + json.len()).next_multiple_of(8) - 8, b' ');
    let total = 8 + json.len() + offset;
    let mut index = 0;
    crate::files::write_atomic_with(path, &mut |w| {
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)?;
        let mut result = Ok(());
        export(&mut |t: StoredTensor| {
            let expected = layout.get(index).map(|(name, _, _, len)| (name.as_str(), *len));
            index += 1;
            if result.is_ok() && expected != Some((t.name.as_str(), t.bytes.len())) {
                result = Err(std::io::Error::other(format!(
                    "tensor {} ({} bytes) is not the one the header laid out ({expected:?}): the model \
                     exported differently the second time",
                    t.name,
                    t.bytes.len()
                )));
            }
            if result.is_ok() {
                result = w.write_all(&t.bytes);
            }
        });
        result
    })?;
    Ok(total as u64)
}

/// Write `tensors` as one safetensors file at `path`, atomically, with `metadata` in the
/// header (the format crate's own layout); returns the file size. A whole model is saved
/// with [`save_streaming`], which never holds it twice.
pub fn save(path: &Path, tensors: &[StoredTensor], metadata: BTreeMap<String, String>) -> Result<u64> {
    let views = tensors.iter().map(|t| (t.name.as_str(), StoredView(t)));
    let metadata = (!metadata.is_empty()).then(|| metadata.into_iter().collect());
    let bytes = safetensors::serialize(views, metadata).map_err(|e| Error::ModelFormat {
        path: path.to_path_buf(),
        message: format!("cannot serialise safetensors: {e}"),
    })?;
    crate::files::write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

struct StoredView<'a>(&'a StoredTensor);

impl safetensors::View for StoredView<'_> {
    fn dtype(&self) -> Dtype {
        self.0.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0.bytes)
    }
    fn data_len(&self) -> usize {
        self.0.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_each_float_type() {
        let v = [1.5f32, -2.25, 0.0];
        let f32_bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect();
        assert_eq!(to_f32(&f32_bytes, Dtype::F32).unwrap(), v);
        assert_eq!(to_f32(&f16_bytes, Dtype::F16).unwrap(), v);
        assert_eq!(to_f32(&bf16_bytes, Dtype::BF16).unwrap(), v);
        assert!(to_f32(&f32_bytes, Dtype::I64).is_none());
    }

    fn stored(name: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> StoredTensor {
        let role = crate::scheme::TensorRole::Unquantized;
        StoredTensor { name: name.into(), role, dtype, shape, bytes, represents: 0 }
    }

    /// A safetensors file of `header` (JSON) and `data_len` zero bytes of data.
    fn file_with(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn parse_err(header: &str, data_len: usize) -> String {
        parse_safetensors(&file_with(header, data_len), Path::new("m/model.safetensors"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn reads_what_the_safetensors_crate_writes() {
        let tensors =
            [stored("b", Dtype::F16, vec![3], vec![0; 6]), stored("a", Dtype::F32, vec![2, 2], vec![1; 16])];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        save(&path, &tensors, metadata.clone()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header = parse_safetensors(&bytes, &path).unwrap();
        let (len, reference) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.data_start, 8 + len);
        assert_eq!(header.metadata, metadata);
        assert_eq!(header.tensors.len(), 2);
        for (name, info) in &header.tensors {
            let want = reference.info(name).unwrap();
            assert_eq!(
                (info.dtype, &info.shape, info.data_offsets),
                (want.dtype, &want.shape, want.data_offsets)
            );
        }
        let store = WeightStore::open_files(&[path]).unwrap();
        assert_eq!(store.f32("a", &[2, 2]).unwrap().len(), 4);
    }

    /// Reading in chunks of rows gives the whole tensor in order, for 16-bit and f32
    /// tensors, and a tensor that is not floats is refused before any chunk.
    #[test]
    fn chunked_reads_give_the_whole_tensor_in_order() {
        let bf16: Vec<u8> = (0..15u16).flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes()).collect();
        let f32s: Vec<u8> = (0..8).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
        let tensors = [
            stored("h", Dtype::BF16, vec![5, 3], bf16),
            stored("f", Dtype::F32, vec![4, 2], f32s),
            stored("i", Dtype::I32, vec![2], vec![0; 8]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        save(&path, &tensors, BTreeMap::new()).unwrap();
        let store = WeightStore::open_files(&[path]).unwrap();
        for (name, shape) in [("h", [5, 3]), ("f", [4, 2])] {
            let (mut sizes, mut joined) = (Vec::new(), Vec::new());
            store
                .f32_chunks(name, &shape, 2, &mut |c| {
                    sizes.push(c.len());
                    joined.extend_from_slice(c);
                    Ok(())
                })
                .unwrap();
            assert_eq!(joined, store.f32(name, &shape).unwrap(), "{name}");
            let width = shape[1];
            let want: Vec<usize> = (0..shape[0]).step_by(2).map(|r| width * 2.min(shape[0] - r)).collect();
            assert_eq!(sizes, want, "{name}");
        }
        let err =
            store.f32_chunks("i", &[2], 1, &mut |_| panic!("no chunk of an integer tensor")).unwrap_err();
        assert!(err.to_string().contains("not a float type"), "{err}");
    }

    /// A model saved tensor by tensor reads back byte for byte through our reader and the
    /// format crate's, metadata included; an export that changes between the two passes is
    /// an error and leaves no file.
    #[test]
    fn streamed_saves_read_back_and_a_changing_export_is_refused() {
        let tensors = [
            stored("z.weight", Dtype::BF16, vec![2, 3], (0..12).collect()),
            stored("a.bias", Dtype::F32, vec![3], vec![7; 12]),
            stored("m.codes", Dtype::U8, vec![5], vec![1, 2, 3, 4, 5]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let metadata = BTreeMap::from([("quantbench.scheme".to_string(), "nf4".to_string())]);
        let export = |sink: &mut TensorSink| tensors.iter().cloned().for_each(&mut *sink);
        let size = save_streaming(&path, &export, metadata.clone()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(size, bytes.len() as u64);
        let header = parse_safetensors(&bytes, &path).unwrap();
        assert_eq!(header.metadata, metadata);
        assert_eq!(header.data_start % 8, 0, "the data section starts aligned");
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let store = WeightStore::open_files(std::slice::from_ref(&path)).unwrap();
        for t in &tensors {
            assert_eq!(reference.tensor(&t.name).unwrap().data(), t.bytes.as_slice(), "{}", t.name);
            assert_eq!(store.raw(&t.name, &t.shape).unwrap(), (t.dtype, t.bytes.clone()), "{}", t.name);
        }
        let calls = std::cell::Cell::new(0);
        let changing = |sink: &mut TensorSink| {
            calls.set(calls.get() + 1);
            let len = if calls.get() == 1 { 12 } else { 6 };
            sink(stored("w", Dtype::U8, vec![len], vec![0; len]));
        };
        let other = dir.path().join("other.safetensors");
        let err = save_streaming(&other, &changing, BTreeMap::new()).unwrap_err().chain_inline();
        assert!(err.contains("tensor w (6 bytes) is not the one the header laid out"), "{err}");
        assert!(!other.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("model.safetensors")], "no temporary left");
    }

    /// Regression: these used to say "invalid shape, data type, or offset for tensor" or
    /// "invalid offset for tensor `x`", naming neither the values nor what was expected.
    #[test]
    fn offset_size_and_dtype_errors_name_file_tensor_found_and_expected() {
        let one = |dtype: &str, shape: &str, offsets: &str| {
            format!(r#"{{"w":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}"#)
        };
        let cases = [
            (one("F33", "[2]", "[0, 8]"), 8, "tensor w: dtype \"F33\" is not a safetensors dtype, expected one of BOOL"),
            (one("F32", "[2, 3]", "[0, 20]"), 20, "tensor w: dtype F32 and shape [2, 3] take 24 bytes, but data offsets [0, 20] hold 20"),
            (one("F32", "[2]", "[8, 0]"), 8, "tensor w: data offsets [8, 0] end before they begin"),
            (one("F32", "[2]", "[0, 8]"), 4, "tensor w: data offsets [0, 8] run past the end of the data section (4 bytes)"),
            (one("F32", "[2]", "[4, 12]"), 12, "tensor w: data offsets [4, 12] begin at 4, expected 0 (where the data section starts); it leaves a gap"),
            (one("F32", "[2]", "[0, 8]"), 12, "the tensors' data ends at byte 8 of the data section, but the data section is 12 bytes"),
            (one("F32", "[4294967296, 4294967296, 4294967296]", "[0, 8]"), 8, "shape [4294967296, 4294967296, 4294967296] of dtype F32 overflows"),
            (one("F32", "[4294967296, 4294967296, 0]", "[0, 0]"), 0, "shape [4294967296, 4294967296, 0] of dtype F32 overflows"),
            (one("F4", "[3]", "[0, 2]"), 2, "shape [3] of dtype F4 is 12 bits, not a whole number of bytes"),
            (one("F32", "[-1]", "[0, 8]"), 8, "corrupt safetensors header at w.shape[0]: invalid value: integer `-1`"),
            (one("F32", "[2]", "[0]"), 8, "corrupt safetensors header at w.data_offsets: invalid length 1"),
            (r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.into(),
             8, "data offsets [0, 4] begin at 0, expected 4 (where tensor v ends); it overlaps the tensor before it"),
            (r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#.into(),
             8, "tensor w appears twice in the header"),
            ("[1, 2]".into(), 0, "corrupt safetensors header: invalid type: sequence, expected an object"),
            (r#"{"__metadata__":{"a":1}}"#.into(), 0, "corrupt safetensors header at __metadata__.a: invalid type: integer `1`, expected a string"),
        ];
        for (header, data_len, want) in cases {
            let err = parse_err(&header, data_len);
            assert!(
                err.contains("model file m/model.safetensors: ") && err.contains(want),
                "{header}: {err}"
            );
        }
        let mut bytes = file_with("{}", 0);
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse_safetensors(&bytes, Path::new("x.safetensors")).unwrap_err().to_string();
        assert!(
            err.contains("its length field says 18446744073709551615 bytes, but only 2 bytes follow"),
            "{err}"
        );
        let err = parse_safetensors(b"abc", Path::new("x.safetensors")).unwrap_err().to_string();
        assert!(
            err.contains("not a safetensors file: 3 bytes, too short for the 8-byte header length"),
            "{err}"
        );
    }

    #[test]
    fn wrong_shapes_and_dtypes_name_the_file_in_plain_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let tensors = [stored("i", Dtype::I64, vec![2], vec![0; 16])];
        save(&path, &tensors, BTreeMap::new()).unwrap();
        let store = WeightStore::open_files(std::slice::from_ref(&path)).unwrap();
        let err = store.f32("i", &[2]).unwrap_err().to_string();
        assert!(
            err.contains("tensor i: dtype I64 in ") && err.contains("model.safetensors is not a float type"),
            "{err}"
        );
        let err = store.f32("i", &[3, 1]).unwrap_err().to_string();
        assert!(
            err.contains("shape [2] in ") && err.contains("does not match the config, expected [3, 1]"),
            "{err}"
        );
        assert_eq!(store.entry("i").unwrap().stored.name(), "I64");
    }

    /// Regression: `../x` and absolute shard paths were joined to the model folder and
    /// opened, reading files outside it.
    #[test]
    fn shard_paths_that_leave_the_model_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("model.safetensors.index.json");
        for shard in ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "", "."] {
            let json = serde_json::json!({"weight_map": {"model.embed.weight": shard}});
            std::fs::write(&index, json.to_string()).unwrap();
            let err = shards_from_index(&index).unwrap_err().to_string();
            assert!(err.contains("model.safetensors.index.json"), "{shard}: {err}");
            assert!(
                err.contains(&format!(
                    "tensor model.embed.weight is {shard:?}, a path outside the model folder"
                )),
                "{err}"
            );
        }
        let json = serde_json::json!({"weight_map": {"model.embed.weight": 3}});
        std::fs::write(&index, json.to_string()).unwrap();
        let err = shards_from_index(&index).unwrap_err().to_string();
        assert!(
            err.contains("weight_map entry for tensor model.embed.weight is 3, expected a file name"),
            "{err}"
        );
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.safetensors"), b"").unwrap();
        let json = serde_json::json!({"weight_map": {"w": "./sub/a.safetensors"}});
        std::fs::write(&index, json.to_string()).unwrap();
        assert_eq!(shards_from_index(&index).unwrap(), [dir.path().join("./sub/a.safetensors")]);
    }
}
