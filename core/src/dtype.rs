/// Element types a tensor can hold. Arithmetic runs in f32; f16 is a storage type (weights,
/// activations to save memory) converted with [`crate::Tensor::to_dtype`]; u32 holds token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    U32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
}
