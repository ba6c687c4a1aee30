//! safetensors IO: loading checkpoints (F32, F16, BF16 widened to F32, U32) onto a device,
//! and saving tensors atomically.
//!
//! Every failure is an [`Error::Safetensors`] naming the file (or [`Error::Io`] for the
//! file system), never a panic: the header is validated by the `safetensors` crate (header
//! length within the file, JSON, contiguous offsets within the data, byte lengths matching
//! shapes) before any tensor is built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use lathe_shaders::MemCategory;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};

use crate::device::Device;
use crate::dtype::DType;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// The label `load_bytes` errors carry in place of a path.
const IN_MEMORY: &str = "<in-memory safetensors>";

fn st_error(path: &str, detail: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.to_string(),
        detail: detail.into(),
    }
}

/// A readable account of a header the crate rejected.
fn describe(e: SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            "file is shorter than the 8-byte header length (truncated or not safetensors)".into()
        }
        SafeTensorError::InvalidHeaderLength => {
            "the header length is larger than the file (truncated or not safetensors)".into()
        }
        SafeTensorError::HeaderTooLarge => "the header length is implausibly large".into(),
        SafeTensorError::InvalidHeader(e) => format!("the header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format!("malformed JSON header: {e}")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "the data section does not match the tensors' offsets (truncated file, or offsets \
             out of bounds)"
                .into()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name:?}: data offsets are not contiguous or are out of bounds")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's byte length does not match its shape and dtype".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows".into(),
        other => other.to_string(),
    }
}

/// One tensor's bytes decoded to host storage. BF16 is widened to F32 (lathe has no bf16).
fn decode(path: &str, name: &str, dtype: Dtype, data: &[u8]) -> Result<(CpuStorage, DType)> {
    fn words<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        data.chunks_exact(N)
            .map(|c| c.try_into().expect("chunks_exact"))
    }
    Ok(match dtype {
        Dtype::F32 => (
            CpuStorage::F32(words(data).map(f32::from_le_bytes).collect()),
            DType::F32,
        ),
        Dtype::U32 => (
            CpuStorage::U32(words(data).map(u32::from_le_bytes).collect()),
            DType::U32,
        ),
        Dtype::F16 => (
            CpuStorage::F16(
                words(data)
                    .map(|w| f16::from_bits(u16::from_le_bytes(w)))
                    .collect(),
            ),
            DType::F16,
        ),
        Dtype::BF16 => (
            CpuStorage::F32(
                words(data)
                    .map(|w| bf16::from_bits(u16::from_le_bytes(w)).to_f32())
                    .collect(),
            ),
            DType::F32,
        ),
        other => {
            return Err(st_error(
                path,
                format!(
                    "tensor {name:?} has dtype {other:?}, which lathe does not load \
                     (supported: F32, F16, BF16, U32)"
                ),
            ))
        }
    })
}

/// Parses a whole safetensors buffer; `path` only labels errors.
fn parse(bytes: &[u8], path: &str, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| st_error(path, describe(e)))?;
    let mut views = file.tensors();
    // File order (by data offset), so loading is deterministic.
    views.sort_by_key(|(_, view)| view.data().as_ptr() as usize);
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        out.push((
            name.clone(),
            build(path, &name, view.dtype(), view.shape(), view.data(), device)?,
        ));
    }
    Ok(out)
}

/// A tensor of `shape` from its stored bytes, on `device` (GPU bytes charged as weights).
fn build(
    path: &str,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    data: &[u8],
    device: &Device,
) -> Result<Tensor> {
    let (storage, dtype) = decode(path, name, dtype, data)?;
    Tensor::from_storage(
        crate::storage::Storage::cpu(storage),
        shape.to_vec(),
        dtype,
        Device::Cpu,
    )
    .to_device_as(device, MemCategory::Weights)
}

/// Loads every tensor of a safetensors file onto `device`, in file order. F32, F16 (kept as
/// F16) and U32 load as they are; BF16 is converted to F32; other dtypes are an error naming
/// the tensor. GPU bytes are charged to `MemCategory::Weights`. The file is read one tensor
/// at a time (see [`SafetensorsFile`]), never whole.
pub fn load(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let file = SafetensorsFile::open(path)?;
    file.names()
        .map(|name| Ok((name.to_string(), file.read(name, device)?)))
        .collect()
}

/// As [`load`], from bytes already in memory.
pub fn load_bytes(bytes: &[u8], device: &Device) -> Result<Vec<(String, Tensor)>> {
    parse(bytes, IN_MEMORY, device)
}

/// The element type a tensor is stored with, as far as lathe reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16 (read as f32).
    BF16,
    /// 32-bit unsigned integer.
    U32,
    /// Signed bytes: bitsandbytes' int8 weights.
    I8,
    /// Unsigned bytes: bitsandbytes' `weight_format` markers.
    U8,
    /// Anything else the format allows (lathe refuses to build a tensor of it).
    Other,
}

impl StoredDType {
    fn of(dtype: Dtype) -> StoredDType {
        match dtype {
            Dtype::F32 => StoredDType::F32,
            Dtype::F16 => StoredDType::F16,
            Dtype::BF16 => StoredDType::BF16,
            Dtype::U32 => StoredDType::U32,
            Dtype::I8 => StoredDType::I8,
            Dtype::U8 => StoredDType::U8,
            _ => StoredDType::Other,
        }
    }
}

/// Where one tensor lies in its file.
#[derive(Clone, Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte offsets from the start of the file.
    start: u64,
    end: u64,
}

/// A safetensors file opened for reading one tensor at a time: only its header is read at
/// open, and [`SafetensorsFile::read`] reads exactly one tensor's bytes. Peak host memory
/// while loading a checkpoint is then the model being built plus one tensor, not the file.
///
/// The header gets the same validation as a whole-file parse (length within the file, JSON,
/// contiguous offsets, byte lengths matching shapes, the data section exactly filling the
/// file), so a truncated or inconsistent file is an [`Error::Safetensors`] naming it at open.
#[derive(Debug)]
pub struct SafetensorsFile {
    label: String,
    file: std::sync::Mutex<std::fs::File>,
    /// Tensors in file order, and their index by name.
    entries: Vec<(String, Entry)>,
    by_name: HashMap<String, usize>,
}

impl SafetensorsFile {
    /// Opens `path` and reads and validates its header.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        use std::io::Read;
        let label = path.display().to_string();
        let io = |source: std::io::Error| Error::Io {
            path: label.clone(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut len_bytes = [0u8; 8];
        if file_len < 8 {
            return Err(st_error(&label, describe(SafeTensorError::HeaderTooSmall)));
        }
        file.read_exact(&mut len_bytes).map_err(io)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(st_error(&label, describe(SafeTensorError::HeaderTooLarge)));
        }
        if 8 + header_len > file_len {
            return Err(st_error(
                &label,
                describe(SafeTensorError::InvalidHeaderLength),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let text = std::str::from_utf8(&header)
            .map_err(|e| st_error(&label, describe(SafeTensorError::InvalidHeader(e))))?;
        let metadata = parse_header(text).map_err(|e| st_error(&label, describe(e)))?;
        let data_start = 8 + header_len;
        if data_start + metadata.data_len() as u64 != file_len {
            return Err(st_error(
                &label,
                describe(SafeTensorError::MetadataIncompleteBuffer),
            ));
        }
        let infos = metadata.tensors();
        let entries: Vec<(String, Entry)> = metadata
            .offset_keys()
            .into_iter()
            .map(|name| {
                let info = infos[&name];
                let (s, e) = info.data_offsets;
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s as u64,
                    end: data_start + e as u64,
                };
                (name, entry)
            })
            .collect();
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            label,
            file: std::sync::Mutex::new(file),
            entries,
            by_name,
        })
    }

    /// The path the file was opened from, for messages.
    pub fn path(&self) -> &str {
        &self.label
    }

    /// Tensor names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|(name, _)| name.as_str())
    }

    /// Whether the file has a tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The stored dtype and shape of `name`.
    pub fn info(&self, name: &str) -> Option<(StoredDType, &[usize])> {
        let (_, e) = &self.entries[*self.by_name.get(name)?];
        Some((StoredDType::of(e.dtype), &e.shape))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.by_name
            .get(name)
            .map(|&i| &self.entries[i].1)
            .ok_or_else(|| st_error(&self.label, format!("no tensor {name:?}")))
    }

    /// The stored little-endian bytes of `name`, read from the file.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let entry = self.entry(name)?;
        let len = usize::try_from(entry.end - entry.start).map_err(|_| {
            st_error(
                &self.label,
                format!("tensor {name:?} is larger than memory"),
            )
        })?;
        let mut bytes = vec![0u8; len];
        self.read_into(entry, &mut bytes)?;
        Ok(bytes)
    }

    /// Fills `out` with the stored bytes of `entry` (exactly its length).
    fn read_into(&self, entry: &Entry, out: &mut [u8]) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.seek(SeekFrom::Start(entry.start))
            .and_then(|_| file.read_exact(out))
            .map_err(|source| Error::Io {
                path: self.label.clone(),
                source,
            })
    }

    /// The tensor `name` on `device`, decoded as [`load`] does (BF16 widened to F32). On a
    /// little-endian host, F32, F16 and U32 are read straight into the tensor's storage (no
    /// second copy of a 1.2 GB embedding while it loads).
    pub fn read(&self, name: &str, device: &Device) -> Result<Tensor> {
        let entry = self.entry(name)?;
        let elems: usize = entry.shape.iter().product();
        let direct = |storage: CpuStorage, dtype| {
            Tensor::from_storage(
                crate::storage::Storage::cpu(storage),
                entry.shape.clone(),
                dtype,
                Device::Cpu,
            )
            .to_device_as(device, MemCategory::Weights)
        };
        if cfg!(target_endian = "little") {
            match entry.dtype {
                Dtype::F32 => {
                    let mut v = vec![0f32; elems];
                    self.read_into(entry, bytemuck::cast_slice_mut(&mut v))?;
                    return direct(CpuStorage::F32(v), DType::F32);
                }
                Dtype::F16 => {
                    let mut v = vec![f16::ZERO; elems];
                    self.read_into(entry, bytemuck::cast_slice_mut(&mut v))?;
                    return direct(CpuStorage::F16(v), DType::F16);
                }
                Dtype::U32 => {
                    let mut v = vec![0u32; elems];
                    self.read_into(entry, bytemuck::cast_slice_mut(&mut v))?;
                    return direct(CpuStorage::U32(v), DType::U32);
                }
                _ => {}
            }
        }
        let bytes = self.read_bytes(name)?;
        build(&self.label, name, entry.dtype, &entry.shape, &bytes, device)
    }
}

/// A header's JSON validated as the `safetensors` crate validates a whole file's (offsets
/// contiguous, byte lengths matching shapes), with the crate's own error kinds.
fn parse_header(text: &str) -> std::result::Result<Metadata, SafeTensorError> {
    let bad_json = SafeTensorError::InvalidHeaderDeserialization;
    let map: HashMap<String, serde_json::Value> = serde_json::from_str(text).map_err(bad_json)?;
    let mut user = None;
    let mut tensors = Vec::with_capacity(map.len());
    for (name, value) in map {
        if name == "__metadata__" {
            user = Some(serde_json::from_value(value).map_err(bad_json)?);
        } else {
            let info: TensorInfo = serde_json::from_value(value).map_err(bad_json)?;
            tensors.push((name, info));
        }
    }
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    Metadata::new(user, tensors)
}

/// The largest header lathe reads (the `safetensors` crate's own bound).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor ready to serialise. A host tensor is kept by reference and its bytes are
/// produced as the writer reaches it (borrowed as they are on a little-endian machine), so
/// saving a model holds no second copy of its weights; a GPU tensor is downloaded up front
/// (a failed read must be an error, and `View::data` cannot return one).
struct HostView {
    dtype: Dtype,
    shape: Vec<usize>,
    elems: usize,
    storage: Arc<CpuStorage>,
}

impl View for &HostView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        use std::borrow::Cow;
        let n = self.elems;
        match &*self.storage {
            CpuStorage::F32(v) if cfg!(target_endian = "little") => {
                Cow::Borrowed(bytemuck::cast_slice(&v[..n]))
            }
            CpuStorage::U32(v) if cfg!(target_endian = "little") => {
                Cow::Borrowed(bytemuck::cast_slice(&v[..n]))
            }
            CpuStorage::F32(v) => Cow::Owned(v[..n].iter().flat_map(|x| x.to_le_bytes()).collect()),
            CpuStorage::U32(v) => Cow::Owned(v[..n].iter().flat_map(|x| x.to_le_bytes()).collect()),
            CpuStorage::F16(v) => Cow::Owned(
                v[..n]
                    .iter()
                    .flat_map(|x| x.to_bits().to_le_bytes())
                    .collect(),
            ),
        }
    }
    fn data_len(&self) -> usize {
        let elem = match &*self.storage {
            CpuStorage::F32(_) | CpuStorage::U32(_) => 4,
            CpuStorage::F16(_) => 2,
        };
        self.elems * elem
    }
}

fn host_view(tensor: &Tensor) -> Result<HostView> {
    let storage = match &*tensor.storage() {
        Storage::Cpu(s) => Some(s.clone()),
        Storage::Gpu(_) => None,
    };
    let storage = match storage {
        Some(s) => s,
        None => Arc::new(tensor.to_cpu_storage()?),
    };
    let (dtype, len) = match &*storage {
        CpuStorage::F32(v) => (Dtype::F32, v.len()),
        CpuStorage::U32(v) => (Dtype::U32, v.len()),
        CpuStorage::F16(v) => (Dtype::F16, v.len()),
    };
    let elems = tensor.elem_count();
    if len < elems {
        return Err(Error::DataLength {
            len,
            shape: tensor.shape().to_vec(),
            expected: elems,
        });
    }
    Ok(HostView {
        dtype,
        shape: tensor.shape().to_vec(),
        elems,
        storage,
    })
}

/// A sibling of `path` to write into before renaming over it.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!(".{name}.{}.tmp", std::process::id());
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(tmp),
        _ => PathBuf::from(tmp),
    }
}

/// Writes `tensors` (any device, any dtype) with optional string metadata. The file is
/// written to a temporary sibling, synced, then renamed over `path`: a crash or an error
/// never leaves a half-written file under `path`. Names must be unique.
pub fn save(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let label = path.display().to_string();
    let mut seen = std::collections::HashSet::new();
    for (name, _) in tensors {
        if !seen.insert(*name) {
            return Err(st_error(
                &label,
                format!("tensor name {name:?} appears twice"),
            ));
        }
    }
    let views = tensors
        .iter()
        .map(|(name, t)| Ok((*name, host_view(t)?)))
        .collect::<Result<Vec<_>>>()?;
    let tmp = temp_path(path);
    let io = |source: std::io::Error| Error::Io {
        path: label.clone(),
        source,
    };
    let written = (|| {
        safetensors::serialize_to_file(views.iter().map(|(n, v)| (*n, v)), metadata, &tmp)
            .map_err(|e| match e {
                SafeTensorError::IoError(source) => io(source),
                other => st_error(&label, describe(other)),
            })?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
