//! Every op, one file per family. Each file holds the CPU kernel, the GPU dispatch and the
//! backward (written with other ops, so it runs on whichever device the tensors are on).

pub mod binary;
pub mod cast;
pub mod dropout;
pub mod embedding;
pub mod layout;
pub mod linear_loss;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod rotary;
mod skinny;
pub mod softmax;
pub mod unary;
mod vexp;

use lathe_shaders::{GpuBuffer, GpuContext, Launch, MemCategory, Shader};

use crate::Result;

/// Minimum elements per rayon task in CPU elementwise loops: below this, threads cost more
/// than they save.
pub(crate) const CPU_CHUNK: usize = 1 << 14;

/// Launches one kernel whose parameters are a Pod struct.
pub(crate) fn launch<P: bytemuck::Pod>(
    ctx: &GpuContext,
    shader: Shader,
    entry: &'static str,
    inputs: &[&GpuBuffer],
    outputs: &[&GpuBuffer],
    params: &P,
    workgroups: [u32; 3],
) -> Result<()> {
    ctx.launch(&Launch {
        shader,
        entry,
        inputs,
        outputs,
        params: bytemuck::bytes_of(params),
        workgroups,
    })?;
    Ok(())
}

/// A new f32 activation buffer of `n` elements.
pub(crate) fn alloc_f32(ctx: &GpuContext, n: usize) -> Result<GpuBuffer> {
    Ok(ctx.alloc((n.max(1) * 4) as u64, MemCategory::Activations)?)
}
