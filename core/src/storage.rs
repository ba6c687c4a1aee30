//! Where a tensor's bytes are: host vectors, or a pooled GPU buffer.

use std::sync::Arc;

use half::f16;
use lathe_shaders::GpuBuffer;

/// Host storage, one vector per dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    /// f32 values.
    F32(Vec<f32>),
    /// f16 values.
    F16(Vec<f16>),
    /// u32 values.
    U32(Vec<u32>),
}

/// A tensor's storage. Cloning is cheap on both devices: host vectors are shared behind an
/// `Arc` (reshape, detach and saved-for-backward tensors copy nothing) and written
/// copy-on-write by the optimizers. GPU f16 tensors are packed two per u32 word.
#[derive(Clone, Debug)]
pub enum Storage {
    /// Host memory, shared.
    Cpu(Arc<CpuStorage>),
    /// A GPU buffer.
    Gpu(GpuBuffer),
}

impl Storage {
    /// Host storage of `storage`.
    pub fn cpu(storage: CpuStorage) -> Storage {
        Storage::Cpu(Arc::new(storage))
    }
}
