//! Softmax over the last dim, plain and with attention masks (causal, per-batch key ranges for
//! left or right padding), forward and backward on both devices.
//!
//! Every row's visible keys form one interval [lo, hi) (a key range intersected with a causal
//! prefix), so masking needs no mask tensor: the kernel computes the interval from the row
//! index, the batch's range and the causal flag. Masked entries are exactly 0; a row without
//! any visible key is all zeros, never NaN. The softmax subtracts the row max and works in f32.

use lathe_shaders::{grid_1d, MemCategory, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::{alloc_f32, launch_rows, vexp, Arg};
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

/// Which keys each query of an attention score tensor may see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttentionMask {
    /// Query row i (of Tq) is at absolute position Tk - Tq + i and sees keys at positions <=
    /// that: with a KV cache, a single new query (Tq = 1) sees every key.
    pub causal: bool,
    /// Per batch element, the half-open interval [start, end) of valid keys; keys outside are
    /// masked. Left padding: (pad count, Tk); right padding: (0, length). `None`: all keys.
    pub key_ranges: Option<Vec<(u32, u32)>>,
}

impl AttentionMask {
    /// No masking at all.
    pub fn none() -> AttentionMask {
        AttentionMask::default()
    }

    /// A causal mask without padding.
    pub fn causal() -> AttentionMask {
        AttentionMask {
            causal: true,
            key_ranges: None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SoftmaxParams {
    rows: u32,
    tk: u32,
    tq: u32,
    rows_per_batch: u32,
    causal: u32,
    /// The dispatch's first row (see softmax.wgsl).
    first_row: u32,
    _pad: [u32; 2],
}

/// The row structure of a softmax: `batch` groups of `rows_per_batch` rows of `tk` keys, row
/// r having query index r % tq.
#[derive(Clone, Copy, Debug)]
struct SoftmaxView {
    rows: usize,
    tk: usize,
    tq: usize,
    rows_per_batch: usize,
    causal: bool,
}

impl SoftmaxView {
    fn params(&self) -> SoftmaxParams {
        SoftmaxParams {
            rows: self.rows as u32,
            tk: self.tk as u32,
            tq: self.tq as u32,
            rows_per_batch: self.rows_per_batch as u32,
            causal: self.causal as u32,
            first_row: 0,
            _pad: [0; 2],
        }
    }

    /// The visible key interval [lo, hi) of row `r` (same arithmetic as the WGSL).
    fn visible(&self, r: usize, ranges: &[u32]) -> (usize, usize) {
        let b = r / self.rows_per_batch;
        let i = r % self.tq;
        let lo = ranges[2 * b] as usize;
        let mut hi = ranges[2 * b + 1] as usize;
        if self.causal {
            hi = hi.min((self.tk + i + 1).saturating_sub(self.tq));
        }
        (lo, hi)
    }
}

fn cpu_forward(x: &[f32], ranges: &[u32], view: SoftmaxView) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if view.tk == 0 {
        return out;
    }
    out.par_chunks_mut(view.tk)
        .zip(x.par_chunks(view.tk))
        .enumerate()
        .for_each(|(r, (y, x))| {
            let (lo, hi) = view.visible(r, ranges);
            if lo >= hi {
                return;
            }
            let (x, y) = (&x[lo..hi], &mut y[lo..hi]);
            let m = vexp::row_max(x).max(f32::MIN);
            y.copy_from_slice(x);
            let s = vexp::exp_shift_sum(y, m);
            vexp::scale(y, if s > 0.0 { 1.0 / s } else { 0.0 });
        });
    out
}

fn cpu_backward(y: &[f32], g: &[f32], tk: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; y.len()];
    if tk == 0 {
        return out;
    }
    out.par_chunks_mut(tk)
        .zip(y.par_chunks(tk).zip(g.par_chunks(tk)))
        .for_each(|(dx, (y, g))| {
            let s: f32 = y.iter().zip(g).map(|(y, g)| g * y).sum();
            for j in 0..tk {
                dx[j] = if y[j] == 0.0 { 0.0 } else { y[j] * (g[j] - s) };
            }
        });
    out
}

/// One workgroup per row.
fn row_grid(rows: usize) -> [u32; 3] {
    grid_1d(rows as u64 * 256, 256)
}

fn forward(x: &Tensor, ranges: &[u32], view: SoftmaxView) -> Result<Storage> {
    match x.device() {
        Device::Cpu => {
            let data = x.with_cpu_f32("softmax", |x| cpu_forward(x, ranges, view))?;
            Ok(Tensor::cpu_f32(data, x.shape().to_vec()))
        }
        Device::Gpu(ctx) => {
            let out = alloc_f32(ctx, x.elem_count())?;
            if x.elem_count() == 0 {
                return Ok(Storage::Gpu(out));
            }
            let rb = ctx.upload(bytemuck::cast_slice(ranges), MemCategory::Scratch)?;
            let xb = x.gpu_operand()?;
            let tk = view.tk * 4;
            launch_rows(
                ctx,
                Shader::Softmax,
                "softmax_forward",
                &[Arg::Rows(&xb, tk), Arg::Whole(&rb)],
                &[Arg::Rows(&out, tk)],
                view.rows,
                |first, rows| {
                    let params = SoftmaxParams {
                        rows: rows as u32,
                        first_row: first as u32,
                        ..view.params()
                    };
                    (params, row_grid(rows))
                },
            )?;
            Ok(Storage::Gpu(out))
        }
    }
}

/// dx = y * (g - sum(g * y)) per row, without history.
fn backward(y: &Tensor, g: &Tensor, view: SoftmaxView) -> Result<Tensor> {
    let storage = match y.device() {
        Device::Cpu => {
            let data = y.with_cpu_f32("softmax_backward", |ys| {
                g.with_cpu_f32("softmax_backward", |gs| cpu_backward(ys, gs, view.tk))
            })??;
            Tensor::cpu_f32(data, y.shape().to_vec())
        }
        Device::Gpu(ctx) => {
            let out = alloc_f32(ctx, y.elem_count())?;
            if y.elem_count() > 0 {
                let (yb, gb) = (y.gpu_operand()?, g.gpu_operand()?);
                let tk = view.tk * 4;
                launch_rows(
                    ctx,
                    Shader::Softmax,
                    "softmax_backward",
                    &[Arg::Rows(&yb, tk), Arg::Rows(&gb, tk)],
                    &[Arg::Rows(&out, tk)],
                    view.rows,
                    |first, rows| {
                        let params = SoftmaxParams {
                            rows: rows as u32,
                            first_row: first as u32,
                            ..view.params()
                        };
                        (params, row_grid(rows))
                    },
                )?;
            }
            Storage::Gpu(out)
        }
    };
    Ok(Tensor::from_storage(
        storage,
        y.shape().to_vec(),
        DType::F32,
        y.device().clone(),
    ))
}

/// Checks the key ranges (one per batch element, start <= end <= tk) and flattens them.
fn flat_ranges(
    op: &'static str,
    mask: &AttentionMask,
    batch: usize,
    tk: usize,
) -> Result<Vec<u32>> {
    let Some(ranges) = &mask.key_ranges else {
        return Ok([0, tk as u32].repeat(batch));
    };
    if ranges.len() != batch {
        return Err(Error::shape(
            op,
            format!(
                "{} key ranges for a batch of {batch} (one per batch element)",
                ranges.len()
            ),
        ));
    }
    let mut flat = Vec::with_capacity(2 * batch);
    for (b, &(start, end)) in ranges.iter().enumerate() {
        if start > end || end as usize > tk {
            return Err(Error::shape(
                op,
                format!(
                    "key range [{start}, {end}) of batch element {b} is not within [0, {tk}] with start <= end"
                ),
            ));
        }
        flat.extend([start, end]);
    }
    Ok(flat)
}

impl Tensor {
    fn softmax_with(&self, ranges: Vec<u32>, view: SoftmaxView) -> Result<Tensor> {
        let storage = forward(self, &ranges, view)?;
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            DType::F32,
            self.device(),
            "softmax",
            &[self],
            move |y, g| Ok(vec![Some(backward(&y.detach(), g, view)?)]),
        ))
    }

    /// Softmax over the last dim.
    pub fn softmax_last(&self) -> Result<Tensor> {
        self.expect_dtype("softmax_last", DType::F32)?;
        let Some(&tk) = self.shape().last() else {
            return Err(Error::shape(
                "softmax_last",
                "needs a tensor of rank >= 1, got a scalar",
            ));
        };
        let rows = self.elem_count().checked_div(tk).unwrap_or(0);
        let view = SoftmaxView {
            rows,
            tk,
            tq: 1,
            rows_per_batch: rows.max(1),
            causal: false,
        };
        self.softmax_with(vec![0, tk as u32], view)
    }

    /// Attention softmax over the keys of scores (B, heads, Tq, Tk) or (B, Tq, Tk), with the
    /// causal and key-range masks of `mask` (see [`AttentionMask`]).
    pub fn masked_softmax(&self, mask: &AttentionMask) -> Result<Tensor> {
        const OP: &str = "masked_softmax";
        self.expect_dtype(OP, DType::F32)?;
        let (batch, heads, tq, tk) = match *self.shape() {
            [b, h, tq, tk] => (b, h, tq, tk),
            [b, tq, tk] => (b, 1, tq, tk),
            _ => {
                return Err(Error::shape(
                    OP,
                    format!(
                        "scores must be (B, heads, Tq, Tk) or (B, Tq, Tk), got {:?}",
                        self.shape()
                    ),
                ))
            }
        };
        let ranges = flat_ranges(OP, mask, batch, tk)?;
        let view = SoftmaxView {
            rows: batch * heads * tq,
            tk,
            tq: tq.max(1),
            rows_per_batch: (heads * tq).max(1),
            causal: mask.causal,
        };
        self.softmax_with(ranges, view)
    }
}
