//! lathe-quant: LLM.int8() linear layers (docs/REFERENCE.md §3) and GGUF block dequantization.
//!
//! - [`int8`]: [`Int8Weight`] (row-wise absmax, int8 packed four per u32, f32 scales) and
//!   [`Int8Linear`] (vector-wise activation quantization, outlier columns through a 16-bit
//!   path, int8 GEMM/GEMV with int32 accumulation, the input gradient for training through a
//!   frozen weight) on CPU and GPU.
//! - [`gguf`]: dequantizers for the Q8_0, Q4_0 and Q4_1 blocks of llama.cpp's GGUF files.
//!
//! Quantize a weight and multiply with it, with this crate alone:
//!
//! ```
//! use lathe_core::{Device, Tensor};
//! use lathe_quant::Int8Linear;
//!
//! let w = Tensor::randn(&[64, 128], 0, &Device::Cpu)?; // (out, in), f32
//! let layer = Int8Linear::from_dense(&w, None, Int8Linear::DEFAULT_THRESHOLD)?;
//! assert!(layer.weight.bytes() < 64 * 128 + 64 * 4 + 64); // ~1 byte per parameter
//! let x = Tensor::randn(&[4, 128], 1, &Device::Cpu)?;
//! let y = layer.forward(&x)?; // (4, 64), close to x @ w^T
//! let exact = x.matmul_t(&w, false, true)?;
//! let (y, exact) = (y.to_vec_f32()?, exact.to_vec_f32()?);
//! let worst = y.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
//! let scale = exact.iter().fold(0.0f32, |m, v| m.max(v.abs()));
//! assert!(worst < 0.05 * scale);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod gguf;
pub mod int8;

pub use int8::{Int8Linear, Int8Variant, Int8Weight};

/// Errors of lathe-quant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Operands whose shapes or dtypes do not fit the op.
    #[error("{op}: {detail}")]
    Shape {
        /// The op.
        op: &'static str,
        /// What does not fit.
        detail: String,
    },
    /// GGUF tensor data that cannot be dequantized: an unsupported type, a wrong length.
    #[error("gguf {format}: {detail}")]
    Gguf {
        /// The GGML type ("Q4_0"), or "tensor type" for an unknown id.
        format: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A tensor or device error from lathe-core.
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
    /// A GPU error from lathe-shaders.
    #[error(transparent)]
    Gpu(#[from] lathe_shaders::Error),
}

/// The result of every fallible function of lathe-quant.
pub type Result<T> = std::result::Result<T, Error>;
