//! Every op, one file per family. Each file holds the CPU kernel, the GPU dispatch and the
//! backward (written with other ops, so it runs on whichever device the tensors are on).

pub mod binary;
pub mod cast;
pub mod dispatch;
pub mod dropout;
pub mod embedding;
pub mod layout;
pub mod linear_loss;
pub mod loss;
pub mod matmul;
mod matmul_gpu;
pub mod norm;
pub mod packed;
pub mod reduce;
pub mod rotary;
mod skinny;
pub mod softmax;
pub mod unary;
mod vexp;

use lathe_shaders::{GpuBuffer, GpuContext, MemCategory};

pub(crate) use dispatch::{launch_rows, launch_views, rows_fitting_or_err, Arg};

use crate::Result;

/// Minimum elements per rayon task in CPU elementwise loops: below this, threads cost more
/// than they save.
pub(crate) const CPU_CHUNK: usize = 1 << 14;

/// A new f32 activation buffer of `n` elements.
pub(crate) fn alloc_f32(ctx: &GpuContext, n: usize) -> Result<GpuBuffer> {
    Ok(ctx.alloc((n.max(1) * 4) as u64, MemCategory::Activations)?)
}
