//! Unary elementwise ops: fill, affine scale (x * a + b).

use lathe_shaders::{grid_1d, GpuBuffer, GpuContext, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::{alloc_f32, launch, CPU_CHUNK};
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{Device, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AffineParams {
    n: u32,
    _pad: u32,
    mul: f32,
    add: f32,
}

/// Fills the first `n` f32 of a buffer with `value`.
pub(crate) fn gpu_fill(ctx: &GpuContext, buffer: &GpuBuffer, n: usize, value: f32) -> Result<()> {
    let params = AffineParams {
        n: n as u32,
        _pad: 0,
        mul: 0.0,
        add: value,
    };
    launch(
        ctx,
        Shader::Elementwise,
        "fill",
        &[],
        &[buffer],
        &params,
        grid_1d(n as u64, 256),
    )
}

impl Tensor {
    /// x * mul + add, elementwise.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        self.expect_dtype("affine", DType::F32)?;
        let n = self.elem_count();
        let storage = match self.device() {
            Device::Cpu => {
                let data = self.with_cpu_f32("affine", |x| {
                    let mut out = vec![0.0f32; n];
                    out.par_chunks_mut(CPU_CHUNK)
                        .zip(x.par_chunks(CPU_CHUNK))
                        .for_each(|(o, x)| {
                            for (o, x) in o.iter_mut().zip(x) {
                                *o = x * mul + add;
                            }
                        });
                    out
                })?;
                Tensor::cpu_f32(data, self.shape().to_vec())
            }
            Device::Gpu(ctx) => {
                let out = alloc_f32(ctx, n)?;
                let params = AffineParams {
                    n: n as u32,
                    _pad: 0,
                    mul,
                    add,
                };
                let x = self.gpu_buffer().expect("gpu");
                launch(
                    ctx,
                    Shader::Elementwise,
                    "affine",
                    &[&x],
                    &[&out],
                    &params,
                    grid_1d(n as u64, 256),
                )?;
                Storage::Gpu(out)
            }
        };
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            DType::F32,
            self.device(),
            "affine",
            &[self],
            move |_, g| Ok(vec![Some(g.affine(mul, 0.0)?)]),
        ))
    }

    /// x * s.
    pub fn scale(&self, s: f32) -> Result<Tensor> {
        self.affine(s, 0.0)
    }
}
