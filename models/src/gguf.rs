//! GGUF (llama.cpp) file reading: header, metadata key-values, tensor infos and tensor data.
//!
//! Layout of a GGUF v2/v3 file (all little-endian; v1 used u32 counts and is not read):
//!
//! ```text
//! magic "GGUF" | version: u32 | tensor_count: u64 | kv_count: u64
//! kv_count × (key: string | value_type: u32 | value)
//! tensor_count × (name: string | n_dims: u32 | dims: [u64; n_dims] | ggml_type: u32 | offset: u64)
//! padding to `general.alignment` (default 32)
//! tensor data: each tensor at data_start + offset (offsets are aligned too)
//! string = len: u64 | UTF-8 bytes;  array = elem_type: u32 | len: u64 | len × value
//! ```
//!
//! GGUF dims are innermost-first (ggml's `ne[0]` is the contiguous one): a PyTorch weight of
//! shape [out, in] is stored with dims [in, out]. [`TensorInfo::shape`] is the row-major
//! shape (dims reversed), the one the HF checkpoint would have.
//!
//! Every malformed input (bad magic, unsupported version, truncation anywhere, an unknown
//! value type, counts larger than the file could hold, tensor data past the end) is an
//! [`Error::File`] naming the path; nothing here panics on file contents or allocates more
//! than the file size because a count in it says so.

use std::collections::HashMap;
use std::path::Path;

use lathe_quant::gguf::GgmlType;

use crate::{Error, Result};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The most dimensions a ggml tensor has (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// The type tag of a GGUF metadata value (`gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    /// Unsigned 8-bit integer (type id 0).
    U8,
    /// Signed 8-bit integer (1).
    I8,
    /// Unsigned 16-bit integer (2).
    U16,
    /// Signed 16-bit integer (3).
    I16,
    /// Unsigned 32-bit integer (4).
    U32,
    /// Signed 32-bit integer (5).
    I32,
    /// 32-bit float (6).
    F32,
    /// Boolean, one byte (7).
    Bool,
    /// UTF-8 string with a u64 length (8).
    String,
    /// Typed array with a u64 length (9).
    Array,
    /// Unsigned 64-bit integer (10).
    U64,
    /// Signed 64-bit integer (11).
    I64,
    /// 64-bit float (12).
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The smallest encoding of one value of this type, in bytes (strings and arrays: their
    /// length fields). Used to reject counts the remaining bytes cannot hold before
    /// allocating for them.
    fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An unsigned 8-bit integer.
    U8(u8),
    /// A signed 8-bit integer.
    I8(i8),
    /// An unsigned 16-bit integer.
    U16(u16),
    /// A signed 16-bit integer.
    I16(i16),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A signed 32-bit integer.
    I32(i32),
    /// A 32-bit float.
    F32(f32),
    /// A boolean.
    Bool(bool),
    /// A string.
    String(String),
    /// Elements all of type `elem_type` (nested arrays are allowed by the format).
    Array {
        /// The type of every element.
        elem_type: ValueType,
        /// The elements.
        values: Vec<Value>,
    },
    /// An unsigned 64-bit integer.
    U64(u64),
    /// A signed 64-bit integer.
    I64(i64),
    /// A 64-bit float.
    F64(f64),
}

impl Value {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array { .. } => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value as i128 (lossless for every GGUF integer type).
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// An integer value that fits u64 (any integer type, when non-negative).
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// An integer value that fits i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().and_then(|v| i64::try_from(v).ok())
    }

    /// A float value (f32 or f64) as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value of a `Bool` (no conversion from integers).
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The text of a `String`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an array value.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array { values, .. } => Some(values),
            _ => None,
        }
    }
}

/// One tensor's entry in the tensor-info table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape (GGUF dims reversed): `[out, in]` for a linear weight.
    pub shape: Vec<usize>,
    /// The raw GGML type id (see [`TensorInfo::ggml_type`]); kept raw so that files with
    /// tensor types lathe cannot dequantize still open and list.
    pub type_id: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The GGML type, when it is one lathe reads.
    pub fn ggml_type(&self) -> std::result::Result<GgmlType, lathe_quant::Error> {
        GgmlType::from_id(self.type_id)
    }
}

/// A GGUF file read into memory: metadata, tensor infos and the raw tensor data.
#[derive(Debug)]
pub struct GgufFile {
    path: String,
    version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: usize,
    bytes: Vec<u8>,
    /// Only the header was read ([`GgufFile::open_header`]): no tensor data.
    header_only: bool,
}

impl GgufFile {
    /// Reads and parses the file at `path` (the whole file is read into memory).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::File {
            path: shown.clone(),
            detail: format!("cannot read GGUF file: {e}"),
        })?;
        Self::from_bytes(shown, bytes)
    }

    /// Reads only the header of the file at `path` (metadata and tensor infos, from a prefix
    /// of the file grown until they parse): a model's config and shapes without reading its
    /// weights, for `lathe plan`. Tensor data cannot be read from the result.
    pub fn open_header(path: impl AsRef<Path>) -> Result<Self> {
        use std::io::Read;
        let path = path.as_ref();
        let shown = path.display().to_string();
        let io_error = |e: std::io::Error| Error::File {
            path: shown.clone(),
            detail: format!("cannot read GGUF file: {e}"),
        };
        let len = std::fs::metadata(path).map_err(io_error)?.len();
        let mut prefix = 8u64 << 20;
        loop {
            let take = prefix.min(len);
            let mut bytes = Vec::new();
            std::fs::File::open(path)
                .map_err(io_error)?
                .take(take)
                .read_to_end(&mut bytes)
                .map_err(io_error)?;
            match parse_header(&bytes) {
                Ok(p) => {
                    let mut file = Self::from_parsed(shown, p, Vec::new());
                    file.header_only = true;
                    return Ok(file);
                }
                Err(_) if take < len => prefix = prefix.saturating_mul(4),
                Err(detail) => {
                    return Err(Error::File {
                        path: shown,
                        detail,
                    })
                }
            }
        }
    }

    fn from_parsed(path: String, p: Parsed, bytes: Vec<u8>) -> Self {
        Self {
            path,
            version: p.version,
            meta_index: index(&p.metadata, |(k, _)| k),
            metadata: p.metadata,
            tensor_index: index(&p.tensors, |t| &t.name),
            tensors: p.tensors,
            alignment: p.alignment,
            data_offset: p.data_offset,
            bytes,
            header_only: false,
        }
    }

    /// Parses GGUF bytes; `path` is only used in error messages.
    pub fn from_bytes(path: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        let path = path.into();
        match parse(&bytes) {
            Ok(p) => Ok(Self {
                path,
                version: p.version,
                meta_index: index(&p.metadata, |(k, _)| k),
                metadata: p.metadata,
                tensor_index: index(&p.tensors, |t| &t.name),
                tensors: p.tensors,
                alignment: p.alignment,
                data_offset: p.data_offset,
                bytes,
                header_only: false,
            }),
            Err(detail) => Err(Error::File { path, detail }),
        }
    }

    /// The path given to [`GgufFile::open`] (as shown in errors).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the tensor data section in the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All metadata key-values, in file order.
    pub fn metadata_entries(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The metadata value of `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Tensor infos, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor info of `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// `general.architecture` ("llama", "gptneox", ...).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// A required metadata value; missing is an error naming the key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata(key)
            .ok_or_else(|| self.file_error(format!("missing metadata key `{key}`")))
    }

    /// An integer value as u64 (any integer type, when non-negative).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| self.type_error(key, v, "a non-negative integer"))
    }

    /// An integer value as u32 (any integer type, when it fits).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get(key)?;
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| self.type_error(key, v, "an integer in u32 range"))
    }

    /// An integer value as usize (any integer type, when it fits).
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| self.type_error(key, v, "an integer in usize range"))
    }

    /// An integer value as i64.
    pub fn get_i64(&self, key: &str) -> Result<i64> {
        let v = self.get(key)?;
        v.as_i64()
            .ok_or_else(|| self.type_error(key, v, "an integer"))
    }

    /// A float value (f32 or f64; integers are accepted too, as config writers vary).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64()
            .or_else(|| v.as_i64().map(|x| x as f64))
            .ok_or_else(|| self.type_error(key, v, "a number"))
    }

    /// A float value as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get_f64(key).map(|x| x as f32)
    }

    /// A bool value; an error when `key` is absent or holds another type.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        let v = self.get(key)?;
        v.as_bool().ok_or_else(|| self.type_error(key, v, "a bool"))
    }

    /// A string value; an error when `key` is absent or holds another type.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| self.type_error(key, v, "a string"))
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.get(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.type_error(key, v, "an array of strings"))
    }

    /// An array of integers as i64 (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.get(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.type_error(key, v, "an array of integers"))
    }

    /// The raw bytes of tensor `name` (its GGML encoding), checked against the file size at
    /// open for the types lathe reads.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, GgmlType, &[u8])> {
        if self.header_only {
            return Err(self.tensor_error(name, "only the file's header was read".into()));
        }
        let info = self
            .tensor_info(name)
            .ok_or_else(|| self.tensor_error(name, "no such tensor in the file".into()))?;
        let ty = info
            .ggml_type()
            .map_err(|e| self.tensor_error(name, e.to_string()))?;
        let len = ty
            .byte_len(info.n_elements())
            .map_err(|e| self.tensor_error(name, e.to_string()))?;
        let start = self.data_offset + info.offset as usize; // bounds checked in parse()
        Ok((info, ty, &self.bytes[start..start + len]))
    }

    /// Tensor `name` dequantized to f32, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (info, ty, bytes) = self.tensor_bytes(name)?;
        let values = lathe_quant::gguf::dequantize(ty, bytes, info.n_elements())
            .map_err(|e| self.tensor_error(name, e.to_string()))?;
        Ok((info.shape.clone(), values))
    }

    fn file_error(&self, detail: String) -> Error {
        Error::File {
            path: self.path.clone(),
            detail,
        }
    }

    fn type_error(&self, key: &str, v: &Value, expected: &str) -> Error {
        self.file_error(format!(
            "metadata key `{key}` is {}, expected {expected}",
            describe(v)
        ))
    }

    fn tensor_error(&self, name: &str, detail: String) -> Error {
        Error::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            detail,
        }
    }
}

/// "a U32 (7)", "an array of 3 STRING", ... for type errors.
fn describe(v: &Value) -> String {
    match v {
        Value::Array { elem_type, values } => {
            format!("an array of {} {:?}", values.len(), elem_type)
        }
        Value::String(s) if s.chars().count() > 40 => {
            format!("a String ({:?}...)", s.chars().take(40).collect::<String>())
        }
        other => format!("a {:?}", other),
    }
}

fn index<T>(items: &[T], key: impl Fn(&T) -> &String) -> HashMap<String, usize> {
    items
        .iter()
        .enumerate()
        .map(|(i, t)| (key(t).clone(), i))
        .collect()
}

/// What [`parse`] finds.
struct Parsed {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: usize,
}

/// Parses the whole file; errors are the detail text of an [`Error::File`].
fn parse(bytes: &[u8]) -> std::result::Result<Parsed, String> {
    let parsed = parse_header(bytes)?;
    let (alignment, data_offset) = (parsed.alignment, parsed.data_offset);
    if data_offset > bytes.len() {
        return Err(format!(
            "truncated: the tensor data section would start at byte {data_offset} (aligned to \
             {alignment}), past the end of the {}-byte file",
            bytes.len()
        ));
    }
    let data_len = (bytes.len() - data_offset) as u64;
    for t in &parsed.tensors {
        check_tensor_extent(t, alignment, data_offset, data_len)?;
    }
    Ok(parsed)
}

/// Parses the header (metadata and tensor infos) at the start of `bytes`; the tensor data
/// may lie beyond them.
fn parse_header(bytes: &[u8]) -> std::result::Result<Parsed, String> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(4).map_err(|_| {
        format!(
            "not a GGUF file: {} bytes, shorter than the 4-byte magic",
            bytes.len()
        )
    })?;
    if magic != GGUF_MAGIC {
        return Err(format!(
            "not a GGUF file: magic {magic:02x?}, expected \"GGUF\" {GGUF_MAGIC:02x?}"
        ));
    }
    let version = r.u32().map_err(|e| format!("header: {e}"))?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            " (a big-endian GGUF file; lathe reads little-endian ones)"
        } else if version == 1 {
            " (GGUF v1 is obsolete; re-convert the model with a current llama.cpp)"
        } else {
            ""
        };
        return Err(format!(
            "unsupported GGUF version {version}{hint}; lathe reads versions 2 and 3"
        ));
    }
    let tensor_count = r.u64().map_err(|e| format!("header: {e}"))?;
    let kv_count = r.u64().map_err(|e| format!("header: {e}"))?;

    // Each key-value takes at least 8 (key length) + 4 (type) + 1 bytes.
    let kv_count = r.check_count(kv_count, 13, "metadata key-values")?;
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(kv_count);
    let mut seen = HashMap::with_capacity(kv_count);
    for i in 0..kv_count {
        let key = r
            .string()
            .map_err(|e| format!("metadata key-value {i} of {kv_count}: key: {e}"))?;
        let value = r
            .typed_value(0)
            .map_err(|e| format!("metadata key `{key}`: {e}"))?;
        if seen.insert(key.clone(), i).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        metadata.push((key, value));
    }

    let alignment = match seen.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => {
            let v = &metadata[i].1;
            match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(format!(
                        "general.alignment is {}, expected a power of two",
                        describe(v)
                    ))
                }
            }
        }
    };

    // Each tensor info takes at least 8 (name length) + 4 + 4 + 8 bytes.
    let tensor_count = r.check_count(tensor_count, 24, "tensor infos")?;
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut names = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let t = r
            .tensor_info()
            .map_err(|e| format!("tensor info {i} of {tensor_count}: {e}"))?;
        if names.insert(t.name.clone(), i).is_some() {
            return Err(format!("tensor `{}` appears twice", t.name));
        }
        tensors.push(t);
    }

    let data_offset = align_up(r.pos as u64, alignment)
        .and_then(|o| usize::try_from(o).ok())
        .ok_or_else(|| format!("the tensor data offset after byte {} overflows", r.pos))?;
    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// A tensor's offset is aligned and (for the types lathe reads, whose byte size is known)
/// its data lies within the file.
fn check_tensor_extent(
    t: &TensorInfo,
    alignment: u64,
    data_offset: usize,
    data_len: u64,
) -> std::result::Result<(), String> {
    let name = &t.name;
    if !t.offset.is_multiple_of(alignment) {
        return Err(format!(
            "tensor `{name}`: data offset {} is not a multiple of the alignment {alignment}",
            t.offset
        ));
    }
    let Ok(ty) = t.ggml_type() else {
        // Unknown size; reading it is refused later with the type error.
        if t.offset > data_len {
            return Err(format!(
                "tensor `{name}`: data offset {} is past the end of the data section ({data_len} bytes)",
                t.offset
            ));
        }
        return Ok(());
    };
    let len = ty
        .byte_len(t.n_elements())
        .map_err(|e| format!("tensor `{name}` (shape {:?}): {e}", t.shape))?;
    let end = t.offset.checked_add(len as u64);
    if end.is_none_or(|end| end > data_len) {
        return Err(format!(
            "truncated: tensor `{name}` ({} {:?}, {len} bytes at data offset {}, file byte {}) \
             runs past the end of the data section ({data_len} bytes)",
            ty.name(),
            t.shape,
            t.offset,
            // u128: an offset near 2^64 (aligned, so past the checks above) must not
            // overflow the message.
            data_offset as u128 + t.offset as u128
        ));
    }
    Ok(())
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    x.checked_add(alignment - 1)
        .map(|v| v / alignment * alignment)
}

/// A little-endian cursor over the file bytes; errors say what was cut short and where.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// Nested arrays deeper than this are refused (the format allows nesting; real files use
/// none, and unbounded recursion on a crafted file would overflow the stack).
const MAX_ARRAY_DEPTH: usize = 8;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: needs {n} bytes at byte {}, the file has {} bytes",
                self.pos,
                self.bytes.len()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    /// A count of items each at least `min_size` bytes long, refused when the rest of the
    /// file cannot hold that many (so a corrupt count never drives a huge allocation).
    fn check_count(
        &self,
        count: u64,
        min_size: usize,
        what: &str,
    ) -> std::result::Result<usize, String> {
        let fits = (self.remaining() / min_size) as u64;
        if count > fits {
            return Err(format!(
                "truncated or corrupt: {count} {what} at byte {} cannot fit in the remaining {} bytes",
                self.pos,
                self.remaining()
            ));
        }
        Ok(count as usize)
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let len = self.u64()?;
        let at = self.pos;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| {
                format!(
                    "truncated: string of {len} bytes at byte {at}, only {} bytes remain",
                    self.remaining()
                )
            })?;
        let s = self.take(len)?;
        String::from_utf8(s.to_vec()).map_err(|e| format!("string at byte {at} is not UTF-8: {e}"))
    }

    fn value_type(&mut self) -> std::result::Result<ValueType, String> {
        let at = self.pos;
        let id = self.u32()?;
        ValueType::from_id(id).ok_or_else(|| {
            format!("unknown metadata value type {id} at byte {at} (GGUF types are 0..=12)")
        })
    }

    /// A type tag followed by a value of that type.
    fn typed_value(&mut self, depth: usize) -> std::result::Result<Value, String> {
        let ty = self.value_type()?;
        self.value(ty, depth)
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>()?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array()?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>()?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(format!("bool at byte {at} is {b}, expected 0 or 1")),
                }
            }
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let elem_type = self.value_type()?;
                let len = self.u64()?;
                let len = self.check_count(len, elem_type.min_size(), "array elements")?;
                let mut values = Vec::with_capacity(len);
                for i in 0..len {
                    let v = self
                        .value(elem_type, depth + 1)
                        .map_err(|e| format!("array element {i} of {len}: {e}"))?;
                    values.push(v);
                }
                Value::Array { elem_type, values }
            }
        })
    }

    fn tensor_info(&mut self) -> std::result::Result<TensorInfo, String> {
        let name = self.string().map_err(|e| format!("name: {e}"))?;
        let n_dims = self.u32().map_err(|e| format!("`{name}`: {e}"))?;
        if n_dims > MAX_DIMS {
            return Err(format!(
                "`{name}`: {n_dims} dimensions, ggml tensors have at most {MAX_DIMS}"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64().map_err(|e| format!("`{name}` dims: {e}"))?);
        }
        let type_id = self.u32().map_err(|e| format!("`{name}` type: {e}"))?;
        let offset = self.u64().map_err(|e| format!("`{name}` offset: {e}"))?;
        // GGUF dims are innermost-first; row-major shape is the reverse.
        let shape = dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<Vec<usize>>>()
            .filter(|s| {
                s.iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                    .is_some()
            })
            .ok_or_else(|| format!("`{name}`: dims {dims:?} overflow the element count"))?;
        Ok(TensorInfo {
            name,
            shape,
            type_id,
            offset,
        })
    }
}
