//! LayerNorm and RMSNorm over the last dim, with backwards to x, weight and bias.
//!
//! LayerNorm follows torch: y = (x - mean) / sqrt(var + eps) * w + b with the biased variance.
//! RMSNorm follows Llama: y = x / sqrt(mean(x^2) + eps) * w. Both are one kernel that treats
//! RMSNorm as LayerNorm with the mean fixed at 0. The backward kernel recomputes the row
//! statistics (cheaper than saving them) and writes dx and, when the weight needs a gradient,
//! the per-element products g * xhat, which a column sum turns into dweight.

use lathe_shaders::{grid_1d, GpuBuffer, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::vexp::dispatched;
use crate::ops::{alloc_f32, launch_rows, Arg, CPU_CHUNK};
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

/// Which normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NormKind {
    Layer,
    Rms,
}

impl NormKind {
    fn name(self) -> &'static str {
        match self {
            NormKind::Layer => "layer_norm",
            NormKind::Rms => "rms_norm",
        }
    }
}

const FLAG_RMS: u32 = 1;
const FLAG_WEIGHT: u32 = 2;
const FLAG_BIAS: u32 = 4;
const FLAG_GXHAT: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    d: u32,
    eps: f32,
    flags: u32,
}

/// The rows x d view of a tensor normalised over its last dim.
#[derive(Clone, Copy, Debug)]
struct RowsView {
    rows: usize,
    d: usize,
}

/// Σ f(a[i], b[i]) in 16 independent lanes (so it vectorizes), the lanes added at the end.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (ca, cb) in ac.zip(bc) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += f(x, y);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// (mean, 1/sqrt(var + eps)) of one row; mean is 0 for RMSNorm (var is then mean(x^2)).
/// Two passes, as the WGSL.
#[inline(always)]
fn row_stats(x: &[f32], layer: bool, eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = if layer {
        lane_sum(x, x, |v, _| v) / d
    } else {
        0.0
    };
    let var = lane_sum(x, x, |v, _| (v - mean) * (v - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// y = (x - mean) * rstd * w + b for each row of d in the block (w of ones and b of zeros
/// stand in for absent ones: exact).
#[inline(always)]
fn forward_rows_body(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], layer: bool, eps: f32) {
    let d = w.len();
    for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let (mean, rstd) = row_stats(x, layer, eps);
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = (x - mean) * rstd * w + b;
        }
    }
}

/// dx (and g * xhat into `gxhat` unless it is empty) for each row of d in the block (see
/// the WGSL `norm_backward` for the formulas).
#[inline(always)]
fn backward_rows_body(
    dx: &mut [f32],
    gxhat: &mut [f32],
    x: &[f32],
    g: &[f32],
    w: &[f32],
    layer: bool,
    eps: f32,
) {
    let d = w.len();
    let mut gh = vec![0f32; d];
    for (r, (dx, (x, g))) in dx
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d).zip(g.chunks_exact(d)))
        .enumerate()
    {
        let (mean, rstd) = row_stats(x, layer, eps);
        for ((h, &g), &w) in gh.iter_mut().zip(g).zip(w) {
            *h = g * w;
        }
        let sum_gh = lane_sum(&gh, &gh, |h, _| h);
        let sum_ghx = lane_sum(&gh, x, |h, x| h * ((x - mean) * rstd));
        let mean_gh = if layer { sum_gh / d as f32 } else { 0.0 };
        let mean_ghx = sum_ghx / d as f32;
        for ((dx, &x), &h) in dx.iter_mut().zip(x).zip(&gh) {
            *dx = rstd * (h - mean_gh - (x - mean) * rstd * mean_ghx);
        }
        if !gxhat.is_empty() {
            let p = &mut gxhat[r * d..(r + 1) * d];
            for ((p, &x), &g) in p.iter_mut().zip(x).zip(g) {
                *p = g * ((x - mean) * rstd);
            }
        }
    }
}

dispatched!(
    /// [`forward_rows_body`] in the widest SIMD build the CPU runs.
    fn forward_rows(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], layer: bool, eps: f32) -> () =
        forward_rows_body
);
dispatched!(
    /// [`backward_rows_body`] in the widest SIMD build the CPU runs.
    fn backward_rows(
        dx: &mut [f32],
        gxhat: &mut [f32],
        x: &[f32],
        g: &[f32],
        w: &[f32],
        layer: bool,
        eps: f32
    ) -> () = backward_rows_body
);

/// Rows per rayon task: about CPU_CHUNK elements.
fn rows_per_task(d: usize) -> usize {
    (CPU_CHUNK / d.max(1)).max(1)
}

fn cpu_forward(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    d: usize,
    kind: NormKind,
    eps: f32,
) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if d == 0 {
        return out;
    }
    let (ones, zeros) = (vec![1.0f32; d], vec![0.0f32; d]);
    let (w, b) = (w.unwrap_or(&ones), b.unwrap_or(&zeros));
    let layer = kind == NormKind::Layer;
    let block = rows_per_task(d) * d;
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(y, x)| forward_rows(y, x, w, b, layer, eps));
    out
}

/// dx, and g * xhat when `want_gxhat` (see the WGSL `norm_backward` for the formulas).
fn cpu_backward(
    x: &[f32],
    w: Option<&[f32]>,
    g: &[f32],
    d: usize,
    kind: NormKind,
    eps: f32,
    want_gxhat: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let mut dx = vec![0.0f32; x.len()];
    if d == 0 {
        return (dx, want_gxhat.then(Vec::new));
    }
    let ones = vec![1.0f32; d];
    let w = w.unwrap_or(&ones);
    let layer = kind == NormKind::Layer;
    let block = rows_per_task(d) * d;
    let inputs = x.par_chunks(block).zip(g.par_chunks(block));
    if want_gxhat {
        let mut gxhat = vec![0.0f32; x.len()];
        dx.par_chunks_mut(block)
            .zip(gxhat.par_chunks_mut(block))
            .zip(inputs)
            .for_each(|((dx, gx), (x, g))| backward_rows(dx, gx, x, g, w, layer, eps));
        (dx, Some(gxhat))
    } else {
        dx.par_chunks_mut(block)
            .zip(inputs)
            .for_each(|(dx, (x, g))| backward_rows(dx, &mut [], x, g, w, layer, eps));
        (dx, None)
    }
}

fn flags(kind: NormKind, has_w: bool, has_b: bool, want_gxhat: bool) -> u32 {
    let mut f = 0;
    if kind == NormKind::Rms {
        f |= FLAG_RMS;
    }
    if has_w {
        f |= FLAG_WEIGHT;
    }
    if has_b {
        f |= FLAG_BIAS;
    }
    if want_gxhat {
        f |= FLAG_GXHAT;
    }
    f
}

/// One workgroup per row: a grid of `rows` workgroups (split over x and y when large).
fn row_grid(rows: usize) -> [u32; 3] {
    grid_1d(rows as u64 * 256, 256)
}

fn forward(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    view: RowsView,
    kind: NormKind,
    eps: f32,
) -> Result<Storage> {
    let op = kind.name();
    match x.device() {
        Device::Cpu => {
            let data = x.with_cpu_f32(op, |xs| {
                with_opt_f32(op, w, |ws| {
                    with_opt_f32(op, b, |bs| cpu_forward(xs, ws, bs, view.d, kind, eps))
                })
            })???;
            Ok(Tensor::cpu_f32(data, x.shape().to_vec()))
        }
        Device::Gpu(ctx) => {
            let out = alloc_f32(ctx, view.rows * view.d)?;
            let xb = x.gpu_operand()?;
            let (wb, bb) = (
                w.map(Tensor::gpu_operand).transpose()?,
                b.map(Tensor::gpu_operand).transpose()?,
            );
            let row = view.d * 4;
            // Absent operands are bound to x's rows and never read.
            let flags = flags(kind, w.is_some(), b.is_some(), false);
            launch_rows(
                ctx,
                Shader::Norm,
                "norm_forward",
                &[
                    Arg::Rows(&xb, row),
                    wb.as_ref().map_or(Arg::Rows(&xb, row), Arg::Whole),
                    bb.as_ref().map_or(Arg::Rows(&xb, row), Arg::Whole),
                ],
                &[Arg::Rows(&out, row)],
                view.rows,
                |_, rows| {
                    let params = NormParams {
                        rows: rows as u32,
                        d: view.d as u32,
                        eps,
                        flags,
                    };
                    (params, row_grid(rows))
                },
            )?;
            Ok(Storage::Gpu(out))
        }
    }
}

/// Runs `f` on the CPU f32 values of an optional tensor.
fn with_opt_f32<R>(
    op: &'static str,
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> R,
) -> Result<R> {
    match t {
        Some(t) => t.with_cpu_f32(op, |v| f(Some(v))),
        None => Ok(f(None)),
    }
}

/// (dx, g * xhat if `want_gxhat`), both shaped like x, without history.
fn backward(
    x: &Tensor,
    w: Option<&Tensor>,
    g: &Tensor,
    view: RowsView,
    kind: NormKind,
    eps: f32,
    want_gxhat: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let op = kind.name();
    let shape = x.shape().to_vec();
    let wrap = |s: Storage| Tensor::from_storage(s, shape.clone(), DType::F32, x.device().clone());
    match x.device() {
        Device::Cpu => {
            let (dx, gxhat) = x.with_cpu_f32(op, |xs| {
                g.with_cpu_f32(op, |gs| {
                    with_opt_f32(op, w, |ws| {
                        cpu_backward(xs, ws, gs, view.d, kind, eps, want_gxhat)
                    })
                })
            })???;
            let gxhat = gxhat.map(|v| wrap(Tensor::cpu_f32(v, shape.clone())));
            Ok((wrap(Tensor::cpu_f32(dx, shape.clone())), gxhat))
        }
        Device::Gpu(ctx) => {
            let n = view.rows * view.d;
            let dx = alloc_f32(ctx, n)?;
            // Without a weight gradient the products go nowhere: a one-element stand-in.
            let gxhat = alloc_f32(ctx, if want_gxhat { n } else { 1 })?;
            let xb = x.gpu_operand()?;
            let wb: Option<GpuBuffer> = w.map(Tensor::gpu_operand).transpose()?;
            let gb = g.gpu_operand()?;
            let row = view.d * 4;
            let flags = flags(kind, w.is_some(), false, want_gxhat);
            launch_rows(
                ctx,
                Shader::Norm,
                "norm_backward",
                &[
                    Arg::Rows(&xb, row),
                    // An absent weight is bound to x's rows and never read.
                    wb.as_ref().map_or(Arg::Rows(&xb, row), Arg::Whole),
                    Arg::Rows(&gb, row),
                ],
                &[
                    Arg::Rows(&dx, row),
                    if want_gxhat {
                        Arg::Rows(&gxhat, row)
                    } else {
                        Arg::Whole(&gxhat)
                    },
                ],
                view.rows,
                |_, rows| {
                    let params = NormParams {
                        rows: rows as u32,
                        d: view.d as u32,
                        eps,
                        flags,
                    };
                    (params, row_grid(rows))
                },
            )?;
            let gxhat = want_gxhat.then(|| wrap(Storage::Gpu(gxhat)));
            Ok((wrap(Storage::Gpu(dx)), gxhat))
        }
    }
}

/// Checks x and the affine parameters; returns the rows view.
fn check_inputs(
    op: &'static str,
    x: &Tensor,
    params: &[(&str, Option<&Tensor>)],
) -> Result<RowsView> {
    x.expect_dtype(op, DType::F32)?;
    let Some(&d) = x.shape().last() else {
        return Err(Error::shape(
            op,
            "needs a tensor of rank >= 1, got a scalar",
        ));
    };
    if d == 0 {
        return Err(Error::shape(
            op,
            format!("cannot normalise empty rows of shape {:?}", x.shape()),
        ));
    }
    for (name, p) in params {
        let Some(p) = p else { continue };
        p.expect_dtype(op, DType::F32)?;
        x.expect_same_device(op, p)?;
        if p.shape() != [d] {
            return Err(Error::shape(
                op,
                format!(
                    "{name} has shape {:?} but must be [{d}] (the last dim of x {:?})",
                    p.shape(),
                    x.shape()
                ),
            ));
        }
    }
    Ok(RowsView {
        rows: x.elem_count() / d,
        d,
    })
}

/// The column sum of a (rows, d)-shaped-as-x tensor, as shape (d,).
fn column_sum(t: &Tensor, view: RowsView) -> Result<Tensor> {
    t.reshape(&[view.rows, view.d])?
        .sum_keepdim(0)?
        .reshape(&[view.d])
}

impl Tensor {
    fn norm(
        &self,
        kind: NormKind,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let view = check_inputs(kind.name(), self, &[("weight", weight), ("bias", bias)])?;
        let storage = forward(self, weight, bias, view, kind, eps)?;
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        let x_saved = self.detach();
        let w_saved = weight.map(Tensor::detach);
        let want_dw = weight.is_some_and(Tensor::tracks_grad);
        let want_db = bias.is_some_and(Tensor::tracks_grad);
        let has_bias = bias.is_some();
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            DType::F32,
            self.device(),
            kind.name(),
            &inputs,
            move |_, g| {
                let (dx, gxhat) =
                    backward(&x_saved, w_saved.as_ref(), g, view, kind, eps, want_dw)?;
                let mut grads = vec![Some(dx)];
                if w_saved.is_some() {
                    grads.push(gxhat.map(|p| column_sum(&p, view)).transpose()?);
                }
                if has_bias {
                    grads.push(want_db.then(|| column_sum(g, view)).transpose()?);
                }
                Ok(grads)
            },
        ))
    }

    /// LayerNorm over the last dim (torch semantics, biased variance):
    /// (x - mean) / sqrt(var + eps) * weight + bias, weight and bias of shape (D,).
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        self.norm(NormKind::Layer, weight, bias, eps)
    }

    /// RMSNorm over the last dim (Llama): x / sqrt(mean(x^2) + eps) * weight, weight (D,).
    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        self.norm(NormKind::Rms, weight, None, eps)
    }
}
