//! Broadcasting binary ops: add, sub, mul, div (numpy broadcasting). `bias_add` is `add` with
//! a (H,) bias broadcast over the leading dims. Backwards sum the gradient back to each
//! operand's shape.

use lathe_shaders::{grid_1d, Shader, View};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::dispatch::{span, strided_tiles, window_at, window_budget, Tile};
use crate::ops::{alloc_f32, launch_views, CPU_CHUNK};
use crate::shape::{broadcast_shape, broadcast_strides, elem_count, strides};
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

/// Largest rank the GPU kernel handles.
pub(crate) const MAX_RANK: usize = 8;

/// An elementwise op of two tensors; the discriminant is the GPU kernel's op code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// a + b
    Add = 0,
    /// a - b
    Sub = 1,
    /// a * b
    Mul = 2,
    /// a / b
    Div = 3,
}

impl BinaryOp {
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }
    fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }
}

/// o[i] = op(a[i], b[i]) over equal-length slices, the op chosen outside the loop so each
/// arm vectorizes.
fn zip_map(op: BinaryOp, o: &mut [f32], a: &[f32], b: &[f32]) {
    #[inline(always)]
    fn each(o: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    }
    match op {
        BinaryOp::Add => each(o, a, b, |a, b| a + b),
        BinaryOp::Sub => each(o, a, b, |a, b| a - b),
        BinaryOp::Mul => each(o, a, b, |a, b| a * b),
        BinaryOp::Div => each(o, a, b, |a, b| a / b),
    }
}

fn cpu_binary(
    op: BinaryOp,
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    out_shape: &[usize],
) -> Vec<f32> {
    let n = elem_count(out_shape);
    let mut out = vec![0.0f32; n];
    if a_shape == b_shape {
        out.par_chunks_mut(CPU_CHUNK)
            .zip(a.par_chunks(CPU_CHUNK).zip(b.par_chunks(CPU_CHUNK)))
            .for_each(|(o, (a, b))| zip_map(op, o, a, b));
        return out;
    }
    // A trailing operand (bias over the last dims) repeats with period len(b): row by row.
    if a_shape == out_shape && out_shape.ends_with(b_shape) && !b.is_empty() {
        let period = b.len();
        out.par_chunks_mut(period)
            .zip(a.par_chunks(period))
            .with_min_len(CPU_CHUNK.div_ceil(period))
            .for_each(|(o, a)| zip_map(op, o, a, b));
        return out;
    }
    let a_strides = broadcast_strides(a_shape, out_shape);
    let b_strides = broadcast_strides(b_shape, out_shape);
    let out_strides = strides(out_shape);
    out.par_chunks_mut(CPU_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = c * CPU_CHUNK;
            for (i, o) in chunk.iter_mut().enumerate() {
                let mut rem = base + i;
                let (mut ai, mut bi) = (0, 0);
                for d in 0..out_shape.len() {
                    let idx = rem / out_strides[d];
                    rem %= out_strides[d];
                    ai += idx * a_strides[d];
                    bi += idx * b_strides[d];
                }
                *o = op.apply(a[ai], b[bi]);
            }
        });
    out
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BinaryParams {
    n: u32,
    rank: u32,
    op: u32,
    a_offset: u32,
    b_offset: u32,
    out_offset: u32,
    _pad: [u32; 2],
    out_shape: [u32; MAX_RANK],
    a_strides: [u32; MAX_RANK],
    b_strides: [u32; MAX_RANK],
    out_strides: [u32; MAX_RANK],
}

fn padded(v: &[usize]) -> [u32; MAX_RANK] {
    let mut out = [0u32; MAX_RANK];
    for (o, x) in out.iter_mut().zip(v) {
        *o = *x as u32;
    }
    out
}

/// Drops size-1 dimensions and merges neighbours that every operand walks contiguously (fewer
/// dimensions for the kernel to decode, and longer runs for a tiling to cut).
fn collapse(shape: &[usize], a: &[usize], b: &[usize]) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let (mut s, mut sa, mut sb) = (Vec::new(), Vec::new(), Vec::new());
    for d in (0..shape.len()).filter(|&d| shape[d] != 1) {
        let merges = !s.is_empty()
            && sa[s.len() - 1] == a[d] * shape[d]
            && sb[s.len() - 1] == b[d] * shape[d];
        if merges {
            let last = s.len() - 1;
            s[last] *= shape[d];
            sa[last] = a[d];
            sb[last] = b[d];
        } else {
            s.push(shape[d]);
            sa.push(a[d]);
            sb.push(b[d]);
        }
    }
    if s.is_empty() {
        (vec![1], vec![0], vec![0])
    } else {
        (s, sa, sb)
    }
}

fn gpu_binary(
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
) -> Result<crate::storage::Storage> {
    let ctx = a.device().gpu_operand_context()?;
    let n = elem_count(out_shape);
    let out = alloc_f32(ctx, n)?;
    let (shape, a_strides, b_strides) = collapse(
        out_shape,
        &broadcast_strides(a.shape(), out_shape),
        &broadcast_strides(b.shape(), out_shape),
    );
    let out_strides = strides(&shape);
    let (ab, bb) = (a.gpu_operand()?, b.gpu_operand()?);
    let all_strides = [a_strides, b_strides, out_strides];
    let budget = window_budget(ctx, 4);
    // One tile (whole buffers) when everything fits a binding, else tiles whose windows do.
    let whole = [&ab, &bb, &out]
        .iter()
        .all(|buffer| View::whole(buffer).size <= ctx.binding_limit());
    let tiles = if whole {
        vec![Tile {
            shape: shape.clone(),
            starts: vec![0; 3],
        }]
    } else {
        strided_tiles(&shape, &all_strides, vec![0; 3], &[budget; 3])
    };
    for tile in tiles {
        let mut views = Vec::with_capacity(3);
        let mut offsets = [0u32; 3];
        for (k, buffer) in [&ab, &bb, &out].into_iter().enumerate() {
            if whole {
                views.push(View::whole(buffer));
            } else {
                let reach = span(&tile.shape, &all_strides[k]);
                let (view, offset) = window_at(ctx, buffer, tile.starts[k], reach, 4);
                views.push(view);
                offsets[k] = offset as u32;
            }
        }
        let count = elem_count(&tile.shape);
        let params = BinaryParams {
            n: count as u32,
            rank: tile.shape.len() as u32,
            op: op as u32,
            a_offset: offsets[0],
            b_offset: offsets[1],
            out_offset: offsets[2],
            _pad: [0; 2],
            out_shape: padded(&tile.shape),
            a_strides: padded(&all_strides[0]),
            b_strides: padded(&all_strides[1]),
            out_strides: padded(&all_strides[2]),
        };
        let grid = grid_1d(count as u64, 256);
        launch_views(ctx, Shader::Binary, "binary", &views, 2, &params, grid)?;
    }
    Ok(crate::storage::Storage::Gpu(out))
}

impl Tensor {
    fn binary(&self, other: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let name = op.name();
        self.expect_dtype(name, DType::F32)?;
        other.expect_dtype(name, DType::F32)?;
        self.expect_same_device(name, other)?;
        let out_shape = broadcast_shape(name, self.shape(), other.shape())?;
        if out_shape.len() > MAX_RANK {
            return Err(Error::shape(
                name,
                format!("rank {} is over the supported {MAX_RANK}", out_shape.len()),
            ));
        }
        let storage = match self.device() {
            Device::Cpu => {
                let data = self.with_cpu_f32(name, |a| {
                    other.with_cpu_f32(name, |b| {
                        cpu_binary(op, a, self.shape(), b, other.shape(), &out_shape)
                    })
                })??;
                Tensor::cpu_f32(data, out_shape.clone())
            }
            Device::Gpu(_) => gpu_binary(op, self, other, &out_shape)?,
        };
        let (a_saved, b_saved) = (self.detach(), other.detach());
        let (a_shape, b_shape) = (self.shape().to_vec(), other.shape().to_vec());
        Ok(Tensor::from_op(
            storage,
            out_shape,
            DType::F32,
            self.device(),
            name,
            &[self, other],
            move |_, g| {
                let (ga, gb) = match op {
                    BinaryOp::Add => (g.clone(), g.clone()),
                    BinaryOp::Sub => (g.clone(), g.scale(-1.0)?),
                    BinaryOp::Mul => (g.mul(&b_saved)?, g.mul(&a_saved)?),
                    BinaryOp::Div => {
                        let ga = g.div(&b_saved)?;
                        // d(a/b)/db = -a / b^2 = -(a/b) / b
                        let gb = ga.mul(&a_saved)?.div(&b_saved)?.scale(-1.0)?;
                        (ga, gb)
                    }
                };
                Ok(vec![
                    Some(ga.sum_to_shape(&a_shape)?),
                    Some(gb.sum_to_shape(&b_shape)?),
                ])
            },
        ))
    }

    /// Elementwise a + b with broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Add)
    }
    /// Elementwise a - b with broadcasting.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Sub)
    }
    /// Elementwise a * b with broadcasting.
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Mul)
    }
    /// Elementwise a / b with broadcasting.
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, BinaryOp::Div)
    }

    /// x + bias, with bias (H,) over x (..., H).
    pub fn bias_add(&self, bias: &Tensor) -> Result<Tensor> {
        if bias.rank() != 1 || self.shape().last() != bias.shape().first() {
            return Err(Error::shape(
                "bias_add",
                format!(
                    "bias {:?} does not match the last dim of {:?}",
                    bias.shape(),
                    self.shape()
                ),
            ));
        }
        self.add(bias)
    }

    /// Sums a broadcast gradient back to `shape` (the inverse of broadcasting to self's shape).
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let rank = self.rank();
        if shape.len() > rank {
            return Err(Error::shape(
                "sum_to_shape",
                format!("{:?} cannot sum to {shape:?}", self.shape()),
            ));
        }
        let offset = rank - shape.len();
        let mut t = self.clone();
        for d in 0..rank {
            let target = if d < offset { 1 } else { shape[d - offset] };
            if target == 1 && self.shape()[d] != 1 {
                t = t.sum_keepdim(d)?;
            } else if target != self.shape()[d] {
                return Err(Error::shape(
                    "sum_to_shape",
                    format!("{:?} cannot sum to {shape:?}", self.shape()),
                ));
            }
        }
        t.reshape(shape)
    }
}
