//! Reductions along one dim: sum (and mean, max built with the same kernel shape).
//! A tensor is viewed as (outer, axis, inner); one output per (outer, inner).

use lathe_shaders::{grid_1d, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::{alloc_f32, launch};
use crate::shape::check_dim;
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{Device, Result};

/// (outer, axis, inner) sizes of a tensor around `dim`.
pub(crate) fn split_at_dim(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product();
    (outer, shape[dim], inner)
}

fn cpu_sum(x: &[f32], outer: usize, axis: usize, inner: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; outer * inner];
    out.par_chunks_mut(inner.max(1))
        .enumerate()
        .for_each(|(o, row)| {
            for a in 0..axis {
                let src = &x[(o * axis + a) * inner..(o * axis + a + 1) * inner];
                for (r, s) in row.iter_mut().zip(src) {
                    *r += s;
                }
            }
        });
    out
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ReduceParams {
    pub outer: u32,
    pub axis: u32,
    pub inner: u32,
    pub _pad: u32,
}

impl Tensor {
    /// Sum over `dim`, keeping it with size 1.
    pub fn sum_keepdim(&self, dim: usize) -> Result<Tensor> {
        self.expect_dtype("sum", DType::F32)?;
        check_dim("sum", dim, self.rank())?;
        let (outer, axis, inner) = split_at_dim(self.shape(), dim);
        let mut out_shape = self.shape().to_vec();
        out_shape[dim] = 1;
        let storage = match self.device() {
            Device::Cpu => {
                let data = self.with_cpu_f32("sum", |x| cpu_sum(x, outer, axis, inner))?;
                Tensor::cpu_f32(data, out_shape.clone())
            }
            Device::Gpu(ctx) => {
                let out = alloc_f32(ctx, outer * inner)?;
                let params = ReduceParams {
                    outer: outer as u32,
                    axis: axis as u32,
                    inner: inner as u32,
                    _pad: 0,
                };
                let x = self.gpu_buffer().expect("gpu");
                launch(
                    ctx,
                    Shader::Reduce,
                    "sum_axis",
                    &[&x],
                    &[&out],
                    &params,
                    grid_1d((outer * inner) as u64, 256),
                )?;
                Storage::Gpu(out)
            }
        };
        let in_shape = self.shape().to_vec();
        Ok(Tensor::from_op(
            storage,
            out_shape,
            DType::F32,
            self.device(),
            "sum",
            &[self],
            move |_, g| Ok(vec![Some(g.broadcast_as(&in_shape)?)]),
        ))
    }

    /// Sum over `dim`, removing it.
    pub fn sum(&self, dim: usize) -> Result<Tensor> {
        let mut shape = self.shape().to_vec();
        let out = self.sum_keepdim(dim)?;
        shape.remove(dim);
        out.reshape(&shape)
    }

    /// Sum of every element, as a tensor of shape (1,).
    pub fn sum_all(&self) -> Result<Tensor> {
        let n = self.elem_count();
        self.reshape(&[n])?.sum_keepdim(0)
    }

    /// Broadcasts to `shape` (materialised: x + zeros). Gradients sum back.
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let zeros = Tensor::zeros(shape, self.device())?;
        zeros.add(self)
    }
}
