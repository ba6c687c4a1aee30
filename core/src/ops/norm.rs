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
use crate::ops::{alloc_f32, launch};
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

/// (mean, 1/sqrt(var + eps)) of one row; mean is 0 for RMSNorm (var is then mean(x^2)).
/// Same two-pass order as the WGSL.
fn row_stats(x: &[f32], kind: NormKind, eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = match kind {
        NormKind::Layer => x.iter().sum::<f32>() / d,
        NormKind::Rms => 0.0,
    };
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
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
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(y, x)| {
            let (mean, rstd) = row_stats(x, kind, eps);
            for (j, (y, x)) in y.iter_mut().zip(x).enumerate() {
                let mut v = (x - mean) * rstd;
                if let Some(w) = w {
                    v *= w[j];
                }
                if let Some(b) = b {
                    v += b[j];
                }
                *y = v;
            }
        });
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
    let mut gxhat = vec![0.0f32; if want_gxhat { x.len() } else { 0 }];
    let gh_at = |g: &[f32], j: usize| w.map_or(g[j], |w| g[j] * w[j]);
    let row = |(r, dx): (usize, &mut [f32]), gxhat: Option<&mut [f32]>| {
        let x = &x[r * d..(r + 1) * d];
        let g = &g[r * d..(r + 1) * d];
        let (mean, rstd) = row_stats(x, kind, eps);
        let xhat = |j: usize| (x[j] - mean) * rstd;
        let (mut sum_gh, mut sum_ghx) = (0.0f32, 0.0f32);
        for j in 0..d {
            let gh = gh_at(g, j);
            sum_gh += gh;
            sum_ghx += gh * xhat(j);
        }
        let mean_gh = match kind {
            NormKind::Layer => sum_gh / d as f32,
            NormKind::Rms => 0.0,
        };
        let mean_ghx = sum_ghx / d as f32;
        for (j, dx) in dx.iter_mut().enumerate() {
            *dx = rstd * (gh_at(g, j) - mean_gh - xhat(j) * mean_ghx);
        }
        if let Some(gxhat) = gxhat {
            for (j, p) in gxhat.iter_mut().enumerate() {
                *p = g[j] * xhat(j);
            }
        }
    };
    if want_gxhat {
        dx.par_chunks_mut(d)
            .enumerate()
            .zip(gxhat.par_chunks_mut(d))
            .for_each(|(r, gx)| row(r, Some(gx)));
        (dx, Some(gxhat))
    } else {
        dx.par_chunks_mut(d).enumerate().for_each(|r| row(r, None));
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
            let xb = x.gpu_buffer().expect("gpu");
            // Absent operands are bound to x and never read.
            let wb = w.map_or(xb.clone(), |w| w.gpu_buffer().expect("gpu"));
            let bb = b.map_or(xb.clone(), |b| b.gpu_buffer().expect("gpu"));
            let params = NormParams {
                rows: view.rows as u32,
                d: view.d as u32,
                eps,
                flags: flags(kind, w.is_some(), b.is_some(), false),
            };
            launch(
                ctx,
                Shader::Norm,
                "norm_forward",
                &[&xb, &wb, &bb],
                &[&out],
                &params,
                row_grid(view.rows),
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
            let xb = x.gpu_buffer().expect("gpu");
            let wb: GpuBuffer = w.map_or(xb.clone(), |w| w.gpu_buffer().expect("gpu"));
            let gb = g.gpu_buffer().expect("gpu");
            let params = NormParams {
                rows: view.rows as u32,
                d: view.d as u32,
                eps,
                flags: flags(kind, w.is_some(), false, want_gxhat),
            };
            launch(
                ctx,
                Shader::Norm,
                "norm_backward",
                &[&xb, &wb, &gb],
                &[&dx, &gxhat],
                &params,
                row_grid(view.rows),
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
