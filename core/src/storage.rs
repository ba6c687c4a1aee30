//! Where a tensor's bytes are: host vectors, or a pooled GPU buffer.

use half::f16;
use lathe_shaders::GpuBuffer;

/// Host storage, one vector per dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    U32(Vec<u32>),
}

/// A tensor's storage. GPU f16 tensors are packed two per u32 word (odd counts padded).
#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Gpu(GpuBuffer),
}
