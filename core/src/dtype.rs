//! Tensor element types.

/// Element types a tensor can hold. Arithmetic runs in f32; f16 is a storage type (weights,
/// activations to save memory) converted with [`crate::Tensor::to_dtype`]; u32 holds token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float (storage only).
    F16,
    /// 32-bit unsigned integer (token ids, positions).
    U32,
}

impl DType {
    /// Bytes of one element: 4 for f32 and u32, 2 for f16.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
}
