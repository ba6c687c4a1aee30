use crate::dtype::DType;

/// Errors of lathe-core. Every bad input maps to one of these; none panics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Operands whose shapes do not fit the op.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The shapes and what was expected of them.
        detail: String,
    },
    /// An operand of the wrong element type.
    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType {
        /// The op.
        op: &'static str,
        /// The dtype the op needs.
        expected: DType,
        /// The operand's dtype.
        got: DType,
    },
    /// Operands on different devices (or a GPU kernel given a CPU tensor).
    #[error("{op}: tensors are on different devices ({a} and {b})")]
    DeviceMismatch {
        /// The op.
        op: &'static str,
        /// One operand's device name.
        a: String,
        /// The other's.
        b: String,
    },
    /// An index at or past the end of a dimension.
    #[error("{op}: index {index} out of range for size {size}")]
    IndexOutOfRange {
        /// The op.
        op: &'static str,
        /// The index given.
        index: usize,
        /// The dimension's size.
        size: usize,
    },
    /// A dimension number at or past the tensor's rank.
    #[error("{op}: dimension {dim} out of range for a tensor of rank {rank}")]
    DimOutOfRange {
        /// The op.
        op: &'static str,
        /// The dimension given.
        dim: usize,
        /// The tensor's rank.
        rank: usize,
    },
    /// Host data whose length is not the shape's element count.
    #[error("{len} values do not fill shape {shape:?} ({expected} elements)")]
    DataLength {
        /// Values given.
        len: usize,
        /// The shape asked for.
        shape: Vec<usize>,
        /// Its element count.
        expected: usize,
    },
    /// A backward pass or optimizer that cannot run: no variable reached, a seed of the
    /// wrong shape, a parameter that is not a variable.
    #[error("backward: {0}")]
    Backward(String),
    /// A safetensors file that cannot be parsed or lacks a tensor.
    #[error("safetensors file {path}: {detail}")]
    Safetensors {
        /// The file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// An I/O failure on a file.
    #[error("io error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A collective operation between the processes of a data-parallel job failed, or the
    /// ranks disagree on what they exchange.
    #[error("collective: {0}")]
    Collective(String),
    /// A GPU failure from lathe-shaders: no adapter, a device or kernel error.
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
