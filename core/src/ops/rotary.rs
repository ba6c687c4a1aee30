//! Rotary position embedding (RoPE), split-half ("rotate_half") form as in HF GPT-NeoX and
//! Llama, on the first `rotary_dims` dims of each head; the remaining dims pass through
//! (GPT-NeoX / Pythia's `rotary_pct`).
//!
//! With `half = rotary_dims / 2`, `inv_freq[i] = 1 / base^(2i / rotary_dims)` and
//! `theta = pos * inv_freq[i]` (all f32, as HF computes them), for `k < half`:
//! `out[k] = x[k] cos - x[k + half] sin`, `out[k + half] = x[k + half] cos + x[k] sin`
//! (that is `x * cos + rotate_half(x) * sin` with `emb = cat(freqs, freqs)`).
//! The backward with respect to x is the transpose of the rotation: rotation by -theta, the
//! same kernel with sin negated. Positions come per (batch row, token), so left-padded
//! batches get the right angles.

use std::sync::{Arc, Mutex};

use lathe_shaders::{grid_1d, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::{alloc_f32, launch_rows, Arg};
use crate::storage::Storage;
use crate::tensor::{Tensor, TensorId};
use crate::{Device, Error, Result};

/// Host-computed cos and sin tables, each (max_positions, rotary_dims / 2), on one device.
#[derive(Clone, Debug)]
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
    rotary_dims: usize,
    /// The last GPU positions tensor checked against the table: models rotate every layer
    /// with the same positions, and checking them costs a readback (a GPU sync).
    validated: Arc<Mutex<Option<TensorId>>>,
}

impl RotaryTables {
    /// Tables for positions `0..max_positions` rotating the first `rotary_dims` (even, > 0)
    /// dims of each head, with frequency base `base` (10000 for GPT-NeoX / Llama 2).
    pub fn new(
        max_positions: usize,
        rotary_dims: usize,
        base: f32,
        device: &Device,
    ) -> Result<RotaryTables> {
        if rotary_dims == 0 || !rotary_dims.is_multiple_of(2) {
            return Err(Error::shape(
                "rotary",
                format!("rotary_dims must be even and positive, got {rotary_dims}"),
            ));
        }
        if max_positions > u32::MAX as usize {
            return Err(Error::shape(
                "rotary",
                format!("{max_positions} positions are over the limit of 2^32"),
            ));
        }
        let half = rotary_dims / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / rotary_dims as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in &inv_freq {
                let theta = pos as f32 * f;
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
        Ok(RotaryTables {
            cos: Tensor::from_vec(cos, &[max_positions, half], device)?,
            sin: Tensor::from_vec(sin, &[max_positions, half], device)?,
            rotary_dims,
            validated: Arc::new(Mutex::new(None)),
        })
    }

    /// (max_positions, rotary_dims / 2)
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }
    /// (max_positions, rotary_dims / 2)
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }
    /// How many of each head's dims rotate (even).
    pub fn rotary_dims(&self) -> usize {
        self.rotary_dims
    }
    /// The positions the tables cover: 0..max_positions.
    pub fn max_positions(&self) -> usize {
        self.cos.shape()[0]
    }

    /// Errors when a position is past the table. GPU positions are read back to check them
    /// (they are small: B * T values), once per positions tensor.
    fn check_positions(&self, positions: &Tensor) -> Result<()> {
        let gpu = positions.device().is_gpu();
        let mut validated = self.validated.lock().unwrap_or_else(|e| e.into_inner());
        if gpu && *validated == Some(positions.id()) {
            return Ok(());
        }
        let size = self.max_positions();
        if let Some(&bad) = positions
            .to_vec_u32()?
            .iter()
            .find(|&&p| p as usize >= size)
        {
            return Err(Error::IndexOutOfRange {
                op: "rotary (position past the table)",
                index: bad as usize,
                size,
            });
        }
        if gpu {
            *validated = Some(positions.id());
        }
        Ok(())
    }
}

/// Shape of a rotation: x (batch, heads, seq, head_dim) rotating 2 * half dims.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    seq: usize,
    head_dim: usize,
    half: usize,
}

fn cpu_rotary(
    x: &[f32],
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    dims: Dims,
    sign: f32,
) -> Vec<f32> {
    let Dims {
        heads,
        seq,
        head_dim,
        half,
    } = dims;
    let mut out = x.to_vec();
    out.par_chunks_mut(head_dim.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let (t, b) = (row % seq, row / (seq * heads));
            let pos = positions[b * seq + t] as usize;
            let x = &x[row * head_dim..(row + 1) * head_dim];
            for k in 0..half {
                let c = cos[pos * half + k];
                let s = sign * sin[pos * half + k];
                o[k] = x[k] * c - x[k + half] * s;
                o[k + half] = x[k + half] * c + x[k] * s;
            }
        });
    out
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RotaryParams {
    n: u32,
    head_dim: u32,
    half: u32,
    seq: u32,
    heads: u32,
    sign: f32,
    /// The dispatch's first head row (see rotary.wgsl).
    first_row: u32,
    _pad: u32,
}

impl Tensor {
    /// Rotary embedding of x (B, heads, T, head_dim) f32 at `positions` u32 (B, T): the first
    /// `tables.rotary_dims()` dims of each head are rotated, the rest pass through. Errors on
    /// bad shapes, `rotary_dims > head_dim`, and positions past the table.
    pub fn rotary(&self, tables: &RotaryTables, positions: &Tensor) -> Result<Tensor> {
        self.expect_dtype("rotary", DType::F32)?;
        positions.expect_dtype("rotary", DType::U32)?;
        self.expect_same_device("rotary", positions)?;
        self.expect_same_device("rotary", &tables.cos)?;
        let [b, heads, t, head_dim] = *self.shape() else {
            return Err(Error::shape(
                "rotary",
                format!("x must be (B, heads, T, head_dim), got {:?}", self.shape()),
            ));
        };
        if positions.shape() != [b, t] {
            return Err(Error::shape(
                "rotary",
                format!(
                    "positions {:?} do not match (B, T) = ({b}, {t}) of x {:?}",
                    positions.shape(),
                    self.shape()
                ),
            ));
        }
        if tables.rotary_dims > head_dim {
            return Err(Error::shape(
                "rotary",
                format!(
                    "rotary_dims {} is over head_dim {head_dim}",
                    tables.rotary_dims
                ),
            ));
        }
        tables.check_positions(positions)?;
        let dims = Dims {
            heads,
            seq: t,
            head_dim,
            half: tables.rotary_dims / 2,
        };
        self.rotary_signed(tables, &positions.detach(), dims, 1.0)
    }

    /// Rotation by sign * theta; the backward rotates by the opposite sign.
    fn rotary_signed(
        &self,
        tables: &RotaryTables,
        positions: &Tensor,
        dims: Dims,
        sign: f32,
    ) -> Result<Tensor> {
        let storage = match self.device() {
            Device::Cpu => {
                let data = self.with_cpu_f32("rotary", |x| {
                    positions.with_cpu_u32("rotary", |p| {
                        tables.cos.with_cpu_f32("rotary", |c| {
                            tables
                                .sin
                                .with_cpu_f32("rotary", |s| cpu_rotary(x, p, c, s, dims, sign))
                        })
                    })
                })????;
                Tensor::cpu_f32(data, self.shape().to_vec())
            }
            Device::Gpu(ctx) => {
                let n = self.elem_count();
                if n > u32::MAX as usize {
                    return Err(Error::shape(
                        "rotary",
                        format!("{n} elements are over the GPU limit of 2^32"),
                    ));
                }
                let out = alloc_f32(ctx, n)?;
                let buffers = [
                    self.gpu_operand()?,
                    positions.gpu_operand()?,
                    tables.cos.gpu_operand()?,
                    tables.sin.gpu_operand()?,
                ];
                let row = dims.head_dim * 4;
                launch_rows(
                    ctx,
                    Shader::Rotary,
                    "rotary",
                    &[
                        Arg::Rows(&buffers[0], row),
                        Arg::Whole(&buffers[1]),
                        Arg::Whole(&buffers[2]),
                        Arg::Whole(&buffers[3]),
                    ],
                    &[Arg::Rows(&out, row)],
                    n / dims.head_dim.max(1),
                    |first, rows| {
                        let params = RotaryParams {
                            n: (rows * dims.head_dim) as u32,
                            head_dim: dims.head_dim as u32,
                            half: dims.half as u32,
                            seq: dims.seq as u32,
                            heads: dims.heads as u32,
                            sign,
                            first_row: first as u32,
                            _pad: 0,
                        };
                        (params, grid_1d((rows * dims.head_dim) as u64, 256))
                    },
                )?;
                Storage::Gpu(out)
            }
        };
        let (tables, positions) = (tables.clone(), positions.clone());
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            DType::F32,
            self.device(),
            "rotary",
            &[self],
            move |_, g| {
                Ok(vec![Some(
                    g.rotary_signed(&tables, &positions, dims, -sign)?,
                )])
            },
        ))
    }
}
