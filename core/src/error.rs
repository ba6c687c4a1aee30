use crate::dtype::DType;

/// Errors of lathe-core. Every bad input maps to one of these; none panics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType {
        op: &'static str,
        expected: DType,
        got: DType,
    },
    #[error("{op}: tensors are on different devices ({a} and {b})")]
    DeviceMismatch {
        op: &'static str,
        a: String,
        b: String,
    },
    #[error("{op}: index {index} out of range for size {size}")]
    IndexOutOfRange {
        op: &'static str,
        index: usize,
        size: usize,
    },
    #[error("{op}: dimension {dim} out of range for a tensor of rank {rank}")]
    DimOutOfRange {
        op: &'static str,
        dim: usize,
        rank: usize,
    },
    #[error("{len} values do not fill shape {shape:?} ({expected} elements)")]
    DataLength {
        len: usize,
        shape: Vec<usize>,
        expected: usize,
    },
    #[error("backward: {0}")]
    Backward(String),
    #[error("safetensors file {path}: {detail}")]
    Safetensors { path: String, detail: String },
    #[error("io error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gpu(#[from] lathe_shaders::Error),
}

/// The result of every fallible function of lathe-core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Error {
        Error::Shape {
            op,
            detail: detail.into(),
        }
    }
}
