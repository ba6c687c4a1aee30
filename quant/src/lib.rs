//! lathe-quant: LLM.int8() linear layers (docs/REFERENCE.md §3) and GGUF block dequantization.
//!
//! - [`int8`]: [`Int8Weight`] (row-wise absmax, int8 packed four per u32, f32 scales) and
//!   [`Int8Linear`] (vector-wise activation quantization, outlier columns through a 16-bit
//!   path, int8 GEMM/GEMV with int32 accumulation, the input gradient for training through a
//!   frozen weight) on CPU and GPU.
//! - [`gguf`]: dequantizers for the Q8_0, Q4_0 and Q4_1 blocks of llama.cpp's GGUF files.

pub mod gguf;
pub mod int8;

pub use int8::{Int8Linear, Int8Weight};

/// Errors of lathe-quant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("gguf {format}: {detail}")]
    Gguf {
        format: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
    #[error(transparent)]
    Gpu(#[from] lathe_shaders::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
