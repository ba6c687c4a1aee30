//! safetensors IO: loading checkpoints (F32, F16, BF16 widened to F32, U32) onto a device,
//! and saving tensors atomically.
//!
//! Every failure is an [`Error::Safetensors`] naming the file (or [`Error::Io`] for the
//! file system), never a panic: the header is validated by the `safetensors` crate (header
//! length within the file, JSON, contiguous offsets within the data, byte lengths matching
//! shapes) before any tensor is built.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use lathe_shaders::MemCategory;
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};

use crate::device::Device;
use crate::dtype::DType;
use crate::storage::CpuStorage;
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
        let (storage, dtype) = decode(path, &name, view.dtype(), view.data())?;
        let tensor = Tensor::from_storage(
            crate::storage::Storage::cpu(storage),
            view.shape().to_vec(),
            dtype,
            Device::Cpu,
        )
        .to_device_as(device, MemCategory::Weights)?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// Loads every tensor of a safetensors file onto `device`, in file order. F32, F16 (kept as
/// F16) and U32 load as they are; BF16 is converted to F32; other dtypes are an error naming
/// the tensor. GPU bytes are charged to `MemCategory::Weights`.
pub fn load(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&bytes, &path.display().to_string(), device)
}

/// As [`load`], from bytes already in memory.
pub fn load_bytes(bytes: &[u8], device: &Device) -> Result<Vec<(String, Tensor)>> {
    parse(bytes, IN_MEMORY, device)
}

/// One tensor's little-endian bytes, ready to serialise.
struct HostView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &HostView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn host_view(tensor: &Tensor) -> Result<HostView> {
    let (dtype, data) = match tensor.to_cpu_storage()? {
        CpuStorage::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        CpuStorage::U32(v) => (Dtype::U32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        CpuStorage::F16(v) => (
            Dtype::F16,
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        ),
    };
    Ok(HostView {
        dtype,
        shape: tensor.shape().to_vec(),
        data,
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
