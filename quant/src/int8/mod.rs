//! LLM.int8() (docs/REFERENCE.md §3, bitsandbytes' `Linear8bitLt`): int8 weights with
//! row-wise absmax scales, vector-wise activation quantization with outlier columns through a
//! 16-bit path, int8 GEMM/GEMV with int32 accumulation, and the input gradient through the
//! frozen weight. The same algorithm on CPU (`cpu.rs`) and GPU (`int8.wgsl`, `gpu.rs`); the
//! quantized activations and int32 accumulations agree bit for bit between them. Two
//! arithmetics of the forward ([`Int8Variant`]): lathe's own, and bitsandbytes 0.50.2's, for
//! layers loaded from a bitsandbytes checkpoint.

mod cpu;
mod gpu;
mod linear;
mod weight;

pub use linear::{Int8Form, Int8Linear, Int8Trace, Int8Variant};
pub use weight::Int8Weight;
