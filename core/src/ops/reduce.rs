//! Reductions along one dim: sum, mean (sum then scale) and max (values plus the argmax the
//! backward routes the gradient to). A tensor is viewed as (outer, axis, inner); one output
//! per (outer, inner).

use lathe_shaders::{grid_1d, MemCategory, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::dispatch::gcd;
use crate::ops::{alloc_f32, launch_rows, Arg};
use crate::shape::check_dim;
use crate::storage::{CpuStorage, Storage};
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

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

impl ReduceParams {
    /// A (rows, axis, inner) view: `rows` of the outer dim in this dispatch.
    fn new(rows: usize, axis: usize, inner: usize) -> ReduceParams {
        ReduceParams {
            outer: rows as u32,
            axis: axis as u32,
            inner: inner as u32,
            _pad: 0,
        }
    }
}

impl Tensor {
    /// Sum over `dim`, keeping it with size 1.
    pub fn sum_keepdim(&self, dim: usize) -> Result<Tensor> {
        self.expect_dtype("sum", DType::F32)?;
        check_dim("sum", dim, self.rank())?;
        let (outer, axis, inner) = split_at_dim(self.shape(), dim);
        if slab_over_a_binding(self.device(), axis, inner) {
            return self.reduce_in_pieces(dim, &|t| t.sum_keepdim(1), &|parts| {
                parts
                    .into_iter()
                    .try_fold(None::<Tensor>, |acc, p| {
                        Ok::<_, Error>(Some(match acc {
                            Some(acc) => acc.add(&p)?,
                            None => p,
                        }))
                    })?
                    .ok_or_else(|| Error::shape("sum", "no pieces"))
            });
        }
        let mut out_shape = self.shape().to_vec();
        out_shape[dim] = 1;
        let storage = match self.device() {
            Device::Cpu => {
                let data = self.with_cpu_f32("sum", |x| cpu_sum(x, outer, axis, inner))?;
                Tensor::cpu_f32(data, out_shape.clone())
            }
            Device::Gpu(ctx) => {
                let out = alloc_f32(ctx, outer * inner)?;
                let x = self.gpu_operand()?;
                launch_rows(
                    ctx,
                    Shader::Reduce,
                    "sum_axis",
                    &[Arg::Rows(&x, axis * inner * 4)],
                    &[Arg::Rows(&out, inner * 4)],
                    outer,
                    |_, rows| {
                        let params = ReduceParams::new(rows, axis, inner);
                        (params, grid_1d((rows * inner) as u64, 256))
                    },
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

/// Max over the axis and the index of its first occurrence; NaN counts as the largest value
/// (as in torch). `axis` must be at least 1.
fn cpu_max(x: &[f32], outer: usize, axis: usize, inner: usize) -> (Vec<f32>, Vec<u32>) {
    let mut values = vec![0.0f32; outer * inner];
    let mut argmax = vec![0u32; outer * inner];
    values
        .par_chunks_mut(inner.max(1))
        .zip(argmax.par_chunks_mut(inner.max(1)))
        .enumerate()
        .for_each(|(o, (vals, idx))| {
            let block = &x[o * axis * inner..(o + 1) * axis * inner];
            vals.copy_from_slice(&block[..inner]);
            idx.fill(0);
            for a in 1..axis {
                let row = &block[a * inner..(a + 1) * inner];
                for ((best, best_a), &v) in vals.iter_mut().zip(idx.iter_mut()).zip(row) {
                    if v > *best || (v.is_nan() && !best.is_nan()) {
                        *best = v;
                        *best_a = a as u32;
                    }
                }
            }
        });
    (values, argmax)
}

/// dx (outer, axis, inner) with g (outer, inner) at each saved argmax and zeros elsewhere.
fn cpu_max_backward(
    g: &[f32],
    argmax: &[u32],
    outer: usize,
    axis: usize,
    inner: usize,
) -> Vec<f32> {
    let mut dx = vec![0.0f32; outer * axis * inner];
    dx.par_chunks_mut((axis * inner).max(1))
        .enumerate()
        .for_each(|(o, block)| {
            for j in 0..inner {
                let r = o * inner + j;
                block[argmax[r] as usize * inner + j] = g[r];
            }
        });
    dx
}

/// Whether a GPU reduction's (axis, inner) slab is over one binding (and worth splitting).
fn slab_over_a_binding(device: &Device, axis: usize, inner: usize) -> bool {
    device
        .gpu_context()
        .is_some_and(|ctx| axis * inner * 4 > ctx.binding_limit() as usize && axis * inner > 1)
}

/// The gradient of `max_keepdim`: `g` (keepdim shape) scattered to the saved argmax.
fn max_backward(g: &Tensor, argmax: &Tensor, in_shape: &[usize], dim: usize) -> Result<Tensor> {
    let (outer, axis, inner) = split_at_dim(in_shape, dim);
    let storage = match g.device() {
        Device::Cpu => {
            let dx = g.with_cpu_f32("max_backward", |g| {
                argmax.with_cpu_u32("max_backward", |idx| {
                    cpu_max_backward(g, idx, outer, axis, inner)
                })
            })??;
            Tensor::cpu_f32(dx, in_shape.to_vec())
        }
        Device::Gpu(ctx) => {
            let dx = alloc_f32(ctx, outer * axis * inner)?;
            let (gb, ib) = (g.gpu_operand()?, argmax.gpu_operand()?);
            launch_rows(
                ctx,
                Shader::Reduce,
                "max_backward",
                &[Arg::Rows(&gb, inner * 4), Arg::Rows(&ib, inner * 4)],
                &[Arg::Rows(&dx, axis * inner * 4)],
                outer,
                |_, rows| {
                    let params = ReduceParams::new(rows, axis, inner);
                    (params, grid_1d((rows * axis * inner) as u64, 256))
                },
            )?;
            Storage::Gpu(dx)
        }
    };
    Ok(Tensor::from_storage(
        storage,
        in_shape.to_vec(),
        DType::F32,
        g.device().clone(),
    ))
}

impl Tensor {
    /// Mean over `dim`, keeping it with size 1 (an empty dim gives NaN, as in torch).
    pub fn mean_keepdim(&self, dim: usize) -> Result<Tensor> {
        check_dim("mean", dim, self.rank())?;
        let axis = self.shape()[dim];
        self.sum_keepdim(dim)?.scale(1.0 / axis as f32)
    }

    /// Mean over `dim`, removing it.
    pub fn mean(&self, dim: usize) -> Result<Tensor> {
        let mut shape = self.shape().to_vec();
        let out = self.mean_keepdim(dim)?;
        shape.remove(dim);
        out.reshape(&shape)
    }

    /// Mean of every element, as a tensor of shape (1,).
    pub fn mean_all(&self) -> Result<Tensor> {
        let n = self.elem_count();
        self.reshape(&[n])?.mean_keepdim(0)
    }

    /// Max over `dim`, keeping it with size 1. The backward sends the whole gradient to the
    /// first index of the maximum (ties are not split), so it is a valid subgradient.
    pub fn max_keepdim(&self, dim: usize) -> Result<Tensor> {
        self.expect_dtype("max", DType::F32)?;
        check_dim("max", dim, self.rank())?;
        let (outer, axis, inner) = split_at_dim(self.shape(), dim);
        if axis == 0 {
            return Err(Error::shape(
                "max",
                format!("dim {dim} of {:?} is empty", self.shape()),
            ));
        }
        if slab_over_a_binding(self.device(), axis, inner) {
            // The first piece holding the maximum, at its first index, is the first index
            // overall; gradients route through the pieces by autodiff.
            return self.reduce_in_pieces(dim, &|t| t.max_keepdim(1), &|parts| {
                Tensor::cat(&parts.iter().collect::<Vec<_>>(), 1)?.max_keepdim(1)
            });
        }
        let mut out_shape = self.shape().to_vec();
        out_shape[dim] = 1;
        let (storage, argmax) = match self.device() {
            Device::Cpu => {
                let (values, idx) = self.with_cpu_f32("max", |x| cpu_max(x, outer, axis, inner))?;
                (
                    Tensor::cpu_f32(values, out_shape.clone()),
                    Storage::cpu(CpuStorage::U32(idx)),
                )
            }
            Device::Gpu(ctx) => {
                let n = outer * inner;
                let values = alloc_f32(ctx, n)?;
                let idx = ctx.alloc((n.max(1) * 4) as u64, MemCategory::Activations)?;
                let x = self.gpu_operand()?;
                // Rows of the outer dim are split over bindings; one (axis, inner) slab must
                // fit one.
                launch_rows(
                    ctx,
                    Shader::Reduce,
                    "max_axis",
                    &[Arg::Rows(&x, axis * inner * 4)],
                    &[Arg::Rows(&values, inner * 4), Arg::Rows(&idx, inner * 4)],
                    outer,
                    |_, rows| {
                        let params = ReduceParams::new(rows, axis, inner);
                        (params, grid_1d((rows * inner) as u64, 256))
                    },
                )?;
                (Storage::Gpu(values), Storage::Gpu(idx))
            }
        };
        let argmax =
            Tensor::from_storage(argmax, out_shape.clone(), DType::U32, self.device().clone());
        let in_shape = self.shape().to_vec();
        Ok(Tensor::from_op(
            storage,
            out_shape,
            DType::F32,
            self.device(),
            "max",
            &[self],
            move |_, g| Ok(vec![Some(max_backward(g, &argmax, &in_shape, dim)?)]),
        ))
    }

    /// A GPU reduction over `dim` whose (axis, inner) slab exceeds one binding, as reductions
    /// of pieces that fit, with autodiff through the pieces: pieces of the inner run when one
    /// axis entry's run is over half a binding (their results side by side), else pieces of
    /// the axis, whose results `join` combines.
    fn reduce_in_pieces(
        &self,
        dim: usize,
        reduce: &dyn Fn(&Tensor) -> Result<Tensor>,
        join: &dyn Fn(Vec<Tensor>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let ctx = self
            .device()
            .gpu_context()
            .expect("only GPU slabs are split");
        let (outer, axis, inner) = split_at_dim(self.shape(), dim);
        let x = self.reshape(&[outer, axis, inner])?;
        let half = ctx.binding_limit() as usize / 2;
        let pieces = |len: usize, row: usize| {
            let align = ctx.binding_alignment().max(4) as usize;
            let unit = align / gcd(row, align);
            let piece = half / row;
            if piece >= unit {
                piece / unit * unit
            } else {
                piece.max(1)
            }
            .min(len)
        };
        let reduced = if inner * 4 > half {
            let piece = pieces(inner, 4);
            let parts = (0..inner)
                .step_by(piece)
                .map(|s| reduce(&x.narrow(2, s, piece.min(inner - s))?))
                .collect::<Result<Vec<Tensor>>>()?;
            Tensor::cat(&parts.iter().collect::<Vec<_>>(), 2)?
        } else {
            let piece = pieces(axis, inner * 4);
            let parts = (0..axis)
                .step_by(piece)
                .map(|s| reduce(&x.narrow(1, s, piece.min(axis - s))?))
                .collect::<Result<Vec<Tensor>>>()?;
            join(parts)?
        };
        let mut out_shape = self.shape().to_vec();
        out_shape[dim] = 1;
        reduced.reshape(&out_shape)
    }

    /// Max over `dim`, removing it.
    pub fn max(&self, dim: usize) -> Result<Tensor> {
        let mut shape = self.shape().to_vec();
        let out = self.max_keepdim(dim)?;
        shape.remove(dim);
        out.reshape(&shape)
    }
}
