//! The CPU kernels of LLM.int8(): the oracle for the GPU ones and the CPU fallback.
//!
//! int8 rows are kept as `i8` slices padded with zeros to a multiple of 4 elements: the same
//! bytes, on a little-endian host, as the packed u32 words of the GPU.
//!
//! By concern: [`quantize`] (rows to int8 with their absmax, outlier columns, bitsandbytes'
//! activation quantization), [`gemm`] (the int32 products: the GEMM and few-rows forms, the
//! portable path and its dispatch), [`vnni`] and [`avx2`] (the few-rows kernels of each
//! instruction set), [`epilogue`] (int32 sums to f32 outputs, with the 16-bit outlier path),
//! [`backward`] (the input gradient through the frozen weight).

use half::f16;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod backward;
mod epilogue;
mod gemm;
mod quantize;
#[cfg(target_arch = "x86_64")]
mod vnni;

pub(crate) use backward::backward_dx;
pub(crate) use epilogue::{epilogue, epilogue_bnb, Epilogue};
pub(crate) use gemm::{int8_matmul, int8_matmul_rows, Form, Path, GENERIC_ROWS_MAX};
pub(crate) use quantize::{
    bnb_quantize_activations, outlier_columns, quantize_rows, quantize_rows_with,
};

/// Rows whose absmax is below 2^-100 quantize to zeros: 127 / absmax would overflow for
/// subnormal maxima. The WGSL kernels use the same cut.
pub(crate) const MIN_SCALE: f32 = 7.888_609e-31;

/// Rows at or below this count take the GEMV form.
pub(crate) const GEMV_MAX_ROWS: usize = 4;

/// `n` rounded up to a multiple of 4 (the padded row length).
pub(crate) fn padded(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// x rounded to the nearest f16 (ties to even), as f32: the 16-bit path's operands.
pub(crate) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The dequantized weight value `(q * scale) / 127` (one f32 product, one f32 division).
pub(crate) fn dequant(q: i8, scale: f32) -> f32 {
    (f32::from(q) * scale) / 127.0
}
