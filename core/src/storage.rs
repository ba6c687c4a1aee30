//! Where a tensor's bytes are: host vectors, or a pooled GPU buffer.

use std::sync::Arc;

use half::f16;
use lathe_shaders::GpuBuffer;

/// Host storage, one vector per dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    U32(Vec<u32>),
}

/// A tensor's storage. Cloning is cheap on both devices: host vectors are shared behind an
/// `Arc` (reshape, detach and saved-for-backward tensors copy nothing) and written
/// copy-on-write by the optimizers. GPU f16 tensors are packed two per u32 word.
#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(Arc<CpuStorage>),
    Gpu(GpuBuffer),
}

impl Storage {
    pub fn cpu(storage: CpuStorage) -> Storage {
        Storage::Cpu(Arc::new(storage))
    }
}
