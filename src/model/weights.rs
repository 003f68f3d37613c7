//! Memory-mapped checkpoints (safetensors, single-file or sharded; or one GGUF file), read
//! tensor by tensor and converted to f32 on demand.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensorError, TensorInfo};
use safetensors::SafeTensors;

use super::gguf::{GgmlType, GgufFile};
use crate::error::{Error, Result};
use crate::scheme::StoredTensor;

/// Prefixes that exporters put in front of tensor names (`model.`, `transformer.`, `bert.`);
/// lookups try the name with and without them.
const NAME_PREFIXES: &[&str] = &["model.", "transformer.", "bert.", ""];

/// One memory-mapped safetensors file with its parsed header.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
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
            StoredType::Safetensors(d) => format!("{d:?}"),
            StoredType::Ggml(g) => g.name().to_string(),
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
            for (name, info) in mapped.metadata.tensors() {
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
                    "shape {:?} does not match the config, expected {:?}",
                    entry.shape, expected_shape
                ),
            });
        }
        Ok(entry)
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
                Ok((d, f.mmap[f.data_start + offsets.0..f.data_start + offsets.1].to_vec()))
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
                let bytes = &f.mmap[f.data_start + offsets.0..f.data_start + offsets.1];
                let StoredType::Safetensors(dtype) = entry.stored else { unreachable!("safetensors entry") };
                to_f32(bytes, dtype).ok_or_else(|| Error::Tensor {
                    name: name.to_string(),
                    message: format!("dtype {dtype:?} is not a float type, expected F32, F16 or BF16"),
                })
            }
            (Backing::Gguf(gguf), Location::Gguf { name }) => gguf.dequantize(name),
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

/// True for the stored types a model may compute with.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Decode little-endian F32/F16/BF16 bytes; `None` for other types.
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    Some(match dtype {
        Dtype::F32 => words(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => words(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => words(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

fn map_file(path: &Path) -> Result<MappedFile> {
    let file = File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    // SAFETY: the map is read-only; a checkpoint modified while mapped is outside what we
    // can defend against (the same contract as every safetensors reader).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("cannot map", path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::ModelFormat {
        path: path.to_path_buf(),
        message: explain_safetensors_error(&e, mmap.len()),
    })?;
    Ok(MappedFile { path: path.to_path_buf(), data_start: 8 + header_len, mmap, metadata })
}

fn explain_safetensors_error(error: &SafeTensorError, file_len: usize) -> String {
    match error {
        SafeTensorError::HeaderTooSmall => {
            format!("not a safetensors file: {file_len} bytes, too short for the 8-byte header length")
        }
        SafeTensorError::InvalidHeaderLength => format!(
            "corrupt safetensors header: its declared length runs past the end of the file \
             ({file_len} bytes); the file is truncated or not safetensors"
        ),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "truncated or padded safetensors file: the header's tensor offsets do not end at \
             the file's end ({file_len} bytes)"
        ),
        other => format!("corrupt safetensors header: {other}"),
    }
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
            message: format!("weight_map entry for {tensor} is not a file name"),
        })?;
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

/// Write `tensors` as one safetensors file at `path`, atomically (a temporary file in the
/// same directory, then a rename), with `metadata` in the header. Returns the file size.
pub fn save(path: &Path, tensors: &[StoredTensor], metadata: BTreeMap<String, String>) -> Result<u64> {
    let views = tensors.iter().map(|t| (t.name.as_str(), StoredView(t)));
    let metadata = (!metadata.is_empty()).then(|| metadata.into_iter().collect());
    let bytes = safetensors::serialize(views, metadata).map_err(|e| Error::ModelFormat {
        path: path.to_path_buf(),
        message: format!("cannot serialise safetensors: {e}"),
    })?;
    crate::report::write_atomic(path, &bytes)?;
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
}
