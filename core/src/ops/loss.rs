//! Losses over logits: log-softmax over the last dim, the fused log-softmax + gather that
//! RLHF needs for per-token log-probabilities, and cross-entropy with an ignore index.
//!
//! The fused op never materialises the (N, V) softmax: the forward keeps only the per-row
//! log-sum-exp (N values), and the backward recomputes softmax from the saved logits and
//! that log-sum-exp, element by element.

use lathe_shaders::{grid_1d, Shader};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::ops::{alloc_f32, launch_rows, vexp, Arg};
use crate::storage::Storage;
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

/// Threads per workgroup of the row kernels (one workgroup per row).
const ROW_WORKGROUP: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LossParams {
    rows: u32,
    v: u32,
    _pad: [u32; 2],
}

impl LossParams {
    fn new(rows: usize, v: usize) -> Self {
        LossParams {
            rows: rows as u32,
            v: v as u32,
            _pad: [0; 2],
        }
    }
}

/// One workgroup per row, split over x and y when there are more than 65,535 rows.
fn row_grid(rows: usize) -> [u32; 3] {
    grid_1d(rows as u64 * ROW_WORKGROUP as u64, ROW_WORKGROUP)
}

/// (rows, v) of a tensor whose last dim is the class dim.
fn rows_and_classes(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    x.expect_dtype(op, DType::F32)?;
    let Some(&v) = x.shape().last() else {
        return Err(Error::shape(op, "logits must have at least one dim"));
    };
    if v == 0 {
        return Err(Error::shape(
            op,
            format!("logits {:?} have no classes", x.shape()),
        ));
    }
    if v > u32::MAX as usize || x.elem_count() > u32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("logits {:?} are too large for u32 indexing", x.shape()),
        ));
    }
    Ok((x.elem_count() / v, v))
}

/// Checks ids (u32, shape = logits' leading dims) and that each is a valid class (ids equal to
/// `ignore` are exempt). GPU ids are read back: they are small.
fn check_ids(
    op: &'static str,
    logits: &Tensor,
    ids: &Tensor,
    ignore: Option<u32>,
) -> Result<Vec<u32>> {
    let lead = &logits.shape()[..logits.rank() - 1];
    let v = logits.shape()[logits.rank() - 1];
    check_targets(op, lead, v, ids, ignore, logits.device())
}

/// Checks that `ids` are u32 of shape `lead` on `device`, each a class below `v` unless equal
/// to `ignore`, and returns them on the host.
pub(crate) fn check_targets(
    op: &'static str,
    lead: &[usize],
    v: usize,
    ids: &Tensor,
    ignore: Option<u32>,
    device: &Device,
) -> Result<Vec<u32>> {
    ids.expect_dtype(op, DType::U32)?;
    if ids.device() != device {
        return Err(Error::DeviceMismatch {
            op,
            a: device.name(),
            b: ids.device().name(),
        });
    }
    if ids.shape() != lead {
        return Err(Error::shape(
            op,
            format!(
                "ids {:?} do not match the leading dims {lead:?} of the logits",
                ids.shape(),
            ),
        ));
    }
    let host = ids.to_vec_u32()?;
    if let Some(&bad) = host
        .iter()
        .find(|&&id| Some(id) != ignore && id as usize >= v)
    {
        return Err(Error::IndexOutOfRange {
            op,
            index: bad as usize,
            size: v,
        });
    }
    Ok(host)
}

/// dlogits of the fused op: g[r] * (onehot(ids[r]) - exp(x[r, :] - lse[r])).
fn log_softmax_gather_backward(
    x: &Tensor,
    ids: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    v: usize,
) -> Result<Tensor> {
    let rows = lse.elem_count();
    let storage = match x.device() {
        Device::Cpu => {
            let op = "log_softmax_gather_backward";
            let dx = x.with_cpu_f32(op, |x| {
                ids.with_cpu_u32(op, |ids| {
                    lse.with_cpu_f32(op, |lse| {
                        g.with_cpu_f32(op, |g| {
                            let mut dx = vec![0.0f32; rows * v];
                            dx.par_chunks_mut(v)
                                .zip(x.par_chunks(v))
                                .enumerate()
                                .for_each(|(r, (d, x))| {
                                    // x - lse <= 0: the softmax's domain.
                                    let (gr, lr) = (g[r], lse[r]);
                                    for (d, &x) in d.iter_mut().zip(x) {
                                        *d = -gr * vexp::exp_nonpositive(x - lr);
                                    }
                                    d[ids[r] as usize] += g[r];
                                });
                            dx
                        })
                    })
                })
            })????;
            Tensor::cpu_f32(dx, x.shape().to_vec())
        }
        Device::Gpu(ctx) => {
            let dx = alloc_f32(ctx, rows * v)?;
            let [xb, ib, lb, gb] = [x, ids, lse, g].map(Tensor::gpu_operand);
            let (xb, ib, lb, gb) = (&xb?, &ib?, &lb?, &gb?);
            launch_rows(
                ctx,
                Shader::Loss,
                "log_softmax_gather_backward",
                &[
                    Arg::Rows(xb, v * 4),
                    Arg::Rows(ib, 4),
                    Arg::Rows(lb, 4),
                    Arg::Rows(gb, 4),
                ],
                &[Arg::Rows(&dx, v * 4)],
                rows,
                |_, rows| (LossParams::new(rows, v), grid_1d((rows * v) as u64, 256)),
            )?;
            Storage::Gpu(dx)
        }
    };
    Ok(Tensor::from_storage(
        storage,
        x.shape().to_vec(),
        DType::F32,
        x.device().clone(),
    ))
}

/// dx of log-softmax from its output y: g - exp(y) * sum(g) per row.
fn log_softmax_last_backward(y: &Tensor, g: &Tensor, v: usize) -> Result<Tensor> {
    let rows = y.elem_count() / v;
    let storage = match y.device() {
        Device::Cpu => {
            let op = "log_softmax_backward";
            let dx = y.with_cpu_f32(op, |y| {
                g.with_cpu_f32(op, |g| {
                    let mut dx = vec![0.0f32; rows * v];
                    dx.par_chunks_mut(v)
                        .zip(y.par_chunks(v).zip(g.par_chunks(v)))
                        .for_each(|(d, (y, g))| {
                            let total: f32 = g.iter().sum();
                            // y is a log-probability, <= 0.
                            for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                                *d = g - vexp::exp_nonpositive(y) * total;
                            }
                        });
                    dx
                })
            })??;
            Tensor::cpu_f32(dx, y.shape().to_vec())
        }
        Device::Gpu(ctx) => {
            let dx = alloc_f32(ctx, rows * v)?;
            let (yb, gb) = (y.gpu_operand()?, g.gpu_operand()?);
            launch_rows(
                ctx,
                Shader::Loss,
                "log_softmax_rows_backward",
                &[Arg::Rows(&yb, v * 4), Arg::Rows(&gb, v * 4)],
                &[Arg::Rows(&dx, v * 4)],
                rows,
                |_, rows| (LossParams::new(rows, v), row_grid(rows)),
            )?;
            Storage::Gpu(dx)
        }
    };
    Ok(Tensor::from_storage(
        storage,
        y.shape().to_vec(),
        DType::F32,
        y.device().clone(),
    ))
}

impl Tensor {
    /// `log_softmax(logits)[r, ids[r]]` for each row r: logits (..., V) f32, ids (...) u32,
    /// result (...) f32. Fused: per row a max, a log-sum-exp and a gather, without the (N, V)
    /// softmax. An id >= V is `Error::IndexOutOfRange`. Gradients flow to the logits only.
    pub fn log_softmax_gather(&self, ids: &Tensor) -> Result<Tensor> {
        let op = "log_softmax_gather";
        let (rows, v) = rows_and_classes(op, self)?;
        check_ids(op, self, ids, None)?;
        let (out, lse) = match self.device() {
            Device::Cpu => {
                let (out, lse): (Vec<f32>, Vec<f32>) = self.with_cpu_f32(op, |x| {
                    ids.with_cpu_u32(op, |ids| {
                        x.par_chunks(v)
                            .zip(ids.par_iter())
                            .map(|(row, &id)| {
                                let lse = vexp::row_log_sum_exp(row);
                                (row[id as usize] - lse, lse)
                            })
                            .unzip()
                    })
                })??;
                (
                    Tensor::cpu_f32(out, vec![rows]),
                    Tensor::cpu_f32(lse, vec![rows]),
                )
            }
            Device::Gpu(ctx) => {
                let (out, lse) = (alloc_f32(ctx, rows)?, alloc_f32(ctx, rows)?);
                let (xb, ib) = (self.gpu_operand()?, ids.gpu_operand()?);
                launch_rows(
                    ctx,
                    Shader::Loss,
                    "log_softmax_gather",
                    &[Arg::Rows(&xb, v * 4), Arg::Rows(&ib, 4)],
                    &[Arg::Rows(&out, 4), Arg::Rows(&lse, 4)],
                    rows,
                    |_, rows| (LossParams::new(rows, v), row_grid(rows)),
                )?;
                (Storage::Gpu(out), Storage::Gpu(lse))
            }
        };
        let lse = Tensor::from_storage(lse, vec![rows], DType::F32, self.device().clone());
        let (x_saved, ids_saved) = (self.detach(), ids.detach());
        Ok(Tensor::from_op(
            out,
            ids.shape().to_vec(),
            DType::F32,
            self.device(),
            op,
            &[self, ids],
            move |_, g| {
                let dx = log_softmax_gather_backward(&x_saved, &ids_saved, &lse, g, v)?;
                Ok(vec![Some(dx), None])
            },
        ))
    }

    /// Entropy of the softmax over the last dim, (..., V) -> (...): log(s) - sum(e d) / s
    /// with d = x - max, e = exp(d), s = sum(e) (no cancellation of large terms). One pass
    /// over the logits instead of log-softmax, exp, product and sum; a statistic, so the
    /// result records no gradient.
    pub fn entropy_last(&self) -> Result<Tensor> {
        let op = "entropy_last";
        let (rows, v) = rows_and_classes(op, self)?;
        let out_shape = self.shape()[..self.rank() - 1].to_vec();
        let storage = match self.device() {
            Device::Cpu => {
                let h = self.with_cpu_f32(op, |x| {
                    let mut h = vec![0.0f32; rows];
                    h.par_iter_mut().zip(x.par_chunks(v)).for_each(|(h, x)| {
                        let m = vexp::row_max(x);
                        let (mut s, mut t) = (0.0f32, 0.0f32);
                        for &xi in x {
                            let d = xi - m;
                            let e = vexp::exp_nonpositive(d);
                            s += e;
                            t += e * d;
                        }
                        *h = s.ln() - t / s;
                    });
                    h
                })?;
                Tensor::cpu_f32(h, out_shape.clone())
            }
            Device::Gpu(ctx) => {
                let h = alloc_f32(ctx, rows)?;
                let xb = self.gpu_operand()?;
                launch_rows(
                    ctx,
                    Shader::Loss,
                    "entropy_rows",
                    &[Arg::Rows(&xb, v * 4)],
                    &[Arg::Rows(&h, 4)],
                    rows,
                    |_, rows| (LossParams::new(rows, v), row_grid(rows)),
                )?;
                Storage::Gpu(h)
            }
        };
        Ok(Tensor::from_storage(
            storage,
            out_shape,
            DType::F32,
            self.device().clone(),
        ))
    }

    /// Log-softmax over the last dim (any leading dims), with its backward.
    pub fn log_softmax_last(&self) -> Result<Tensor> {
        let op = "log_softmax_last";
        let (rows, v) = rows_and_classes(op, self)?;
        let storage = match self.device() {
            Device::Cpu => {
                let y = self.with_cpu_f32(op, |x| {
                    let mut y = vec![0.0f32; rows * v];
                    y.par_chunks_mut(v).zip(x.par_chunks(v)).for_each(|(y, x)| {
                        let lse = vexp::row_log_sum_exp(x);
                        for (y, x) in y.iter_mut().zip(x) {
                            *y = x - lse;
                        }
                    });
                    y
                })?;
                Tensor::cpu_f32(y, self.shape().to_vec())
            }
            Device::Gpu(ctx) => {
                let y = alloc_f32(ctx, rows * v)?;
                let xb = self.gpu_operand()?;
                launch_rows(
                    ctx,
                    Shader::Loss,
                    "log_softmax_rows",
                    &[Arg::Rows(&xb, v * 4)],
                    &[Arg::Rows(&y, v * 4)],
                    rows,
                    |_, rows| (LossParams::new(rows, v), row_grid(rows)),
                )?;
                Storage::Gpu(y)
            }
        };
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            DType::F32,
            self.device(),
            op,
            &[self],
            move |y, g| Ok(vec![Some(log_softmax_last_backward(&y.detach(), g, v)?)]),
        ))
    }

    /// Cross-entropy of logits (..., V) against u32 targets (...), averaged over the rows
    /// whose target is not `ignore_index`, as `torch.nn.functional.cross_entropy` with
    /// reduction "mean": the result has shape (1,). When every row is ignored (or there are
    /// no rows) the mean is 0/0 and the result is NaN, as in torch (its gradient is zero). A target >= V that is not
    /// ignored is `Error::IndexOutOfRange`.
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: Option<u32>) -> Result<Tensor> {
        let op = "cross_entropy";
        rows_and_classes(op, self)?;
        let host = check_ids(op, self, targets, ignore_index)?;
        let kept = host.iter().filter(|&&t| Some(t) != ignore_index).count();
        // Ignored rows gather class 0 (always valid) with weight 0; kept rows weigh -1/kept.
        let (safe_ids, weights): (Vec<u32>, Vec<f32>) = host
            .iter()
            .map(|&t| {
                if Some(t) == ignore_index {
                    (0, 0.0)
                } else {
                    (t, -1.0 / kept as f32)
                }
            })
            .unzip();
        let shape = targets.shape();
        let safe_ids = if kept == host.len() {
            targets.clone()
        } else {
            Tensor::from_vec(safe_ids, shape, self.device())?
        };
        let weights = Tensor::from_vec(weights, shape, self.device())?;
        let loss = self
            .log_softmax_gather(&safe_ids)?
            .mul(&weights)?
            .sum_all()?;
        if kept == 0 {
            // 0/0, as torch: the value is NaN (the gradient is zero).
            return loss.affine(1.0, f32::NAN);
        }
        Ok(loss)
    }
}
