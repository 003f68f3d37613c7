//! The GGUF byte layout: metadata values, the tensor directory and the checks that every
//! length and offset lies inside the file.

use super::*;

/// Alignment of the data section when `general.alignment` is absent.
pub(super) const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most this many dimensions.
pub(super) const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are treated as corrupt (real files nest at most once),
/// so a crafted file cannot exhaust the stack.
pub(super) const MAX_ARRAY_DEPTH: usize = 8;
/// The fewest bytes one tensor info takes: name length, dimension count, one dimension,
/// type and offset.
pub(super) const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 8 + 4 + 8;
/// The fewest bytes one metadata pair takes: key length, value type, a one-byte value.
pub(super) const MIN_METADATA_BYTES: usize = 8 + 4 + 1;
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
    pub(super) fn describe(&self) -> String {
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
pub(super) fn type_name(id: u32) -> &'static str {
    const NAMES: [&str; 13] =
        ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// Bytes one element of value type `id` takes at least (`None`: not a GGUF type).
pub(super) fn min_value_bytes(id: u32) -> Option<usize> {
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
    pub(super) element_type: u32,
    pub(super) len: usize,
    pub(super) raw: Vec<u8>,
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

/// What `parse` finds; errors are messages that `open` puts the path in front of.
pub(super) struct Parsed {
    pub(super) version: u32,
    pub(super) alignment: u64,
    pub(super) metadata: BTreeMap<String, GgufValue>,
    pub(super) tensors: Vec<GgufTensor>,
    pub(super) by_name: Vec<usize>,
}

/// A bounds-checked little-endian cursor over the mapped file.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

pub(super) type Parse<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(super) fn take(&mut self, n: u64, what: &str) -> Parse<&'a [u8]> {
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

    pub(super) fn array<const N: usize>(&mut self, what: &str) -> Parse<[u8; N]> {
        let slice = self.take(N as u64, what)?;
        Ok(slice.try_into().expect("take returned N bytes"))
    }

    pub(super) fn u8(&mut self, what: &str) -> Parse<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(super) fn u16(&mut self, what: &str) -> Parse<u16> {
        self.array(what).map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self, what: &str) -> Parse<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, what: &str) -> Parse<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A string, borrowed from the file.
    pub(super) fn str(&mut self, what: &str) -> Parse<&'a str> {
        let len = self.u64(&format!("{what} length"))?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|e| format!("{what} at offset {at} is not UTF-8 ({e})"))
    }

    pub(super) fn string(&mut self, what: &str) -> Parse<String> {
        self.str(what).map(str::to_owned)
    }

    /// A count of items that each take at least `min_bytes`: a count whose items cannot
    /// fit in the bytes left means corruption, and must not size an allocation.
    pub(super) fn count(&mut self, what: &str, min_bytes: usize) -> Parse<usize> {
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

    pub(super) fn value(&mut self, type_id: u32, depth: usize) -> Parse<GgufValue> {
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

    pub(super) fn bool(&mut self) -> Parse<bool> {
        let at = self.pos;
        match self.u8("bool value")? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("bool value at offset {at} is {other}, expected 0 or 1")),
        }
    }

    /// An array, checked element by element and kept as its bytes.
    pub(super) fn array_value(&mut self, depth: usize) -> Parse<GgufArray> {
        let (element_type, len) = self.array_header(depth)?;
        let start = self.pos;
        self.skip_elements(element_type, len, depth)?;
        Ok(GgufArray { element_type, len, raw: self.bytes[start..self.pos].to_vec() })
    }

    /// An array's element type and length, both checked.
    pub(super) fn array_header(&mut self, depth: usize) -> Parse<(u32, usize)> {
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
    pub(super) fn skip_elements(&mut self, element_type: u32, len: usize, depth: usize) -> Parse<()> {
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
    pub(super) fn skip_value(&mut self, type_id: u32, depth: usize) -> Parse<()> {
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

pub(super) fn parse(bytes: &[u8]) -> Parse<Parsed> {
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
pub(super) fn header(r: &mut Reader) -> Parse<u32> {
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

pub(super) fn metadata(r: &mut Reader, count: usize) -> Parse<BTreeMap<String, GgufValue>> {
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
pub(super) fn alignment(metadata: &BTreeMap<String, GgufValue>) -> Parse<u64> {
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(value) => match value.as_u64() {
            Some(a) if a.is_power_of_two() => Ok(a),
            _ => Err(format!("general.alignment is {}, expected a power of two", value.describe())),
        },
    }
}

/// `offset` rounded up to a multiple of `alignment` (a power of two); `None` on overflow.
pub(super) fn align(offset: u64, alignment: u64) -> Option<u64> {
    Some(offset.checked_add(alignment - 1)? & !(alignment - 1))
}

/// A tensor info as stored, before its data is located.
pub(super) struct TensorInfo {
    name: String,
    /// The first `n_dims` are the dimensions, fastest first.
    dims: [u64; MAX_DIMS as usize],
    n_dims: usize,
    type_id: u32,
    offset: u64,
}

pub(super) fn tensor_info(r: &mut Reader, index: usize) -> Parse<TensorInfo> {
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
pub(super) fn locate(info: TensorInfo, data_start: u64, alignment: u64, file_len: u64) -> Parse<GgufTensor> {
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
pub(super) fn sorted_by_name(tensors: &[GgufTensor]) -> Parse<Vec<usize>> {
    let mut by_name: Vec<usize> = (0..tensors.len()).collect();
    by_name.sort_unstable_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    match by_name.windows(2).find(|pair| tensors[pair[0]].name == tensors[pair[1]].name) {
        Some(pair) => Err(format!("tensor {} appears twice", tensors[pair[0]].name)),
        None => Ok(by_name),
    }
}
