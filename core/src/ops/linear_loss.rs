//! Cross-entropy through a linear layer without materialising its logits: the LM head's
//! training loss.
//!
//! `h.linear_cross_entropy(w, targets, ignore)` is `h.matmul_t(w, false, true)?
//! .cross_entropy(targets, ignore)`. For a language model the (N, V) logits are the largest
//! tensor of a training step (SmolLM2, 16 x 24 tokens: 384 x 49152 f32 = 75 MB); built whole
//! they are written, exponentiated in the forward and again in the backward, and the
//! gradient of the same size is allocated, filled and read back.
//!
//! On the CPU the rows go through in chunks whose logits fit one reused buffer. Each chunk's
//! softmax is turned into its gradient in place, `(softmax - onehot) / kept`, and fed straight
//! into the two products that need it (dh = dlogits @ W, and dW += dlogits^T @ h when the
//! weight trains), so the backward only scales gradients the forward already holds. Nothing
//! is computed for gradients when no operand tracks one. Other devices and f16 weights
//! compose the two ops (same values, the logits materialised).

use rayon::prelude::*;

use crate::backprop;
use crate::dtype::DType;
use crate::ops::loss::check_targets;
use crate::ops::matmul::cpu_gemm;
use crate::ops::vexp;
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

/// f32 elements of the per-chunk logits buffer (24 MiB): under glibc's largest mmap
/// threshold, so after the first step the buffer is recycled from the heap instead of being
/// mapped and faulted in again.
const CHUNK_ELEMS: usize = 6 << 20;

/// Rows per chunk: as many as fit the buffer, a multiple of 64 (the GEMM's row tile) when
/// there is room for one.
fn chunk_rows(n: usize, v: usize, budget: usize) -> usize {
    let rows = (budget / v.max(1)).max(1);
    let rows = if rows >= 64 { rows / 64 * 64 } else { rows };
    rows.min(n.max(1))
}

/// What one fused pass produces: the mean loss, and the gradients of the mean loss for the
/// operands that track one.
struct Fused {
    loss: f32,
    dh: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
}

/// The sizes of one problem: h (n, hd), w (v, hd).
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    hd: usize,
    v: usize,
}

/// The CPU pass over row chunks of `chunk` rows; `kept` (> 0) rows have a target that is not
/// `ignore`, and every kept target is < v.
#[allow(clippy::too_many_arguments)]
fn cpu_fused(
    h: &[f32],
    w: &[f32],
    targets: &[u32],
    ignore: Option<u32>,
    Dims { n, hd, v }: Dims,
    kept: usize,
    (need_dh, need_dw): (bool, bool),
    chunk: usize,
) -> Fused {
    let need_grad = need_dh || need_dw;
    let inv_kept = 1.0 / kept as f32;
    let mut logits = vec![0f32; chunk * v];
    let mut dh = need_dh.then(|| vec![0f32; n * hd]);
    let mut dw = need_dw.then(|| vec![0f32; v * hd]);
    let mut total = 0f64;
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let hc = &h[r0 * hd..(r0 + rows) * hd];
        let lc = &mut logits[..rows * v];
        // logits (rows, V) = h_c (rows, H) @ w^T, w (V, H) read transposed.
        // SAFETY: hc holds rows * hd elements, w holds v * hd, lc holds rows * v.
        unsafe { cpu_gemm(lc, hc, (hd, 1), w, (1, hd), (rows, v, hd), false) };
        total += lc
            .par_chunks_mut(v)
            .zip(&targets[r0..r0 + rows])
            .map(|(row, &t)| {
                if Some(t) == ignore {
                    row.fill(0.0);
                    return 0.0;
                }
                let target_logit = row[t as usize];
                let m = vexp::row_max(row);
                let sum = if need_grad {
                    // exp once: the row becomes exp(x - m), then (softmax - onehot) / kept.
                    let s = vexp::exp_shift_sum(row, m);
                    vexp::scale(row, inv_kept / s);
                    row[t as usize] -= inv_kept;
                    s
                } else {
                    vexp::sum_exp_shift(row, m)
                };
                f64::from(m + sum.ln() - target_logit)
            })
            .sum::<f64>();
        if let Some(dh) = dh.as_mut() {
            // dh_c (rows, H) = dlogits (rows, V) @ w (V, H).
            // SAFETY: as above; dh's rows r0..r0 + rows hold rows * hd elements.
            unsafe {
                cpu_gemm(
                    &mut dh[r0 * hd..(r0 + rows) * hd],
                    lc,
                    (v, 1),
                    w,
                    (hd, 1),
                    (rows, hd, v),
                    false,
                )
            };
        }
        if let Some(dw) = dw.as_mut() {
            // dw (V, H) += dlogits^T (V, rows) @ h_c (rows, H).
            // SAFETY: as above; dw holds v * hd elements.
            unsafe { cpu_gemm(dw, lc, (1, v), hc, (hd, 1), (v, hd, rows), true) };
        }
    }
    Fused {
        loss: (total / kept as f64) as f32,
        dh,
        dw,
    }
}

impl Tensor {
    /// Cross-entropy of the logits `self @ weight^T` against u32 `targets`, as
    /// [`Tensor::cross_entropy`] (mean over rows whose target is not `ignore_index`; NaN when
    /// every row is ignored), without materialising the logits on the CPU. self (N, H) f32,
    /// weight (V, H) f32 or f16 (torch's `nn.Linear` layout, no bias), targets (N,); the
    /// result has shape (1,). Gradients flow to both operands.
    pub fn linear_cross_entropy(
        &self,
        weight: &Tensor,
        targets: &Tensor,
        ignore_index: Option<u32>,
    ) -> Result<Tensor> {
        let op = "linear_cross_entropy";
        self.expect_dtype(op, DType::F32)?;
        self.expect_same_device(op, weight)?;
        let (&[n, hd], &[v, hw]) = (self.shape(), weight.shape()) else {
            return Err(Error::shape(
                op,
                format!(
                    "needs h (N, H) and weight (V, H), got {:?} and {:?}",
                    self.shape(),
                    weight.shape()
                ),
            ));
        };
        if hd != hw || v == 0 {
            return Err(Error::shape(
                op,
                format!(
                    "h {:?} and weight {:?} do not make (N, H) @ (V, H)^T with V > 0",
                    self.shape(),
                    weight.shape()
                ),
            ));
        }
        let host = check_targets(op, &[n], v, targets, ignore_index, self.device())?;
        let kept = host.iter().filter(|&&t| Some(t) != ignore_index).count();
        if !matches!(self.device(), Device::Cpu) || weight.dtype() != DType::F32 || kept == 0 {
            return self
                .matmul_t(weight, false, true)?
                .cross_entropy(targets, ignore_index);
        }
        let grad = backprop::grad_enabled();
        let need = (grad && self.tracks_grad(), grad && weight.tracks_grad());
        let fused = self.with_cpu_f32(op, |h| {
            weight.with_cpu_f32(op, |w| {
                cpu_fused(
                    h,
                    w,
                    &host,
                    ignore_index,
                    Dims { n, hd, v },
                    kept,
                    need,
                    chunk_rows(n, v, CHUNK_ELEMS),
                )
            })
        })??;
        let dh = fused
            .dh
            .map(|d| Tensor::from_vec(d, &[n, hd], &Device::Cpu))
            .transpose()?;
        let dw = fused
            .dw
            .map(|d| Tensor::from_vec(d, &[v, hd], &Device::Cpu))
            .transpose()?;
        Ok(Tensor::from_op(
            Tensor::cpu_f32(vec![fused.loss], vec![1]),
            vec![1],
            DType::F32,
            self.device(),
            op,
            &[self, weight],
            move |_, g| {
                // The gradients of the mean loss, held since the forward, times dloss.
                let g = g.to_scalar()?;
                let scaled = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
                    t.as_ref()
                        .map(|t| {
                            if g == 1.0 {
                                Ok(t.clone())
                            } else {
                                t.affine(g, 0.0)
                            }
                        })
                        .transpose()
                };
                Ok(vec![scaled(&dh)?, scaled(&dw)?])
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small chunks (so several run) against the composed ops, with ignored rows and both
    /// gradients.
    #[test]
    fn chunked_pass_matches_the_composed_ops() {
        let (n, hd, v) = (13, 5, 37);
        let h = Tensor::rand_uniform(-1.0, 1.0, &[n, hd], 1, &Device::Cpu)
            .unwrap()
            .into_variable();
        let w = Tensor::rand_uniform(-2.0, 2.0, &[v, hd], 2, &Device::Cpu)
            .unwrap()
            .into_variable();
        let mut targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        targets[4] = 999;
        targets[11] = 999;
        let kept = n - 2;
        let composed = h
            .matmul_t(&w, false, true)
            .unwrap()
            .cross_entropy(
                &Tensor::from_slice(&targets, &[n], &Device::Cpu).unwrap(),
                Some(999),
            )
            .unwrap();
        let grads = composed.backward().unwrap();
        let want_dh = grads.get(&h).unwrap().to_vec_f32().unwrap();
        let want_dw = grads.get(&w).unwrap().to_vec_f32().unwrap();
        let want_loss = composed.to_scalar().unwrap();
        let (hv, wv) = (h.to_vec_f32().unwrap(), w.to_vec_f32().unwrap());
        let tol = crate::testing::Tolerance::new(1e-5, 1e-6);
        for chunk in [1, 4, 13] {
            let f = cpu_fused(
                &hv,
                &wv,
                &targets,
                Some(999),
                Dims { n, hd, v },
                kept,
                (true, true),
                chunk,
            );
            crate::testing::assert_close(&[f.loss], &[want_loss], tol);
            crate::testing::assert_close(&f.dh.unwrap(), &want_dh, tol);
            crate::testing::assert_close(&f.dw.unwrap(), &want_dw, tol);
        }
    }

    #[test]
    fn chunks_fill_the_buffer_in_row_tiles() {
        assert_eq!(chunk_rows(384, 49152, CHUNK_ELEMS), 128);
        assert_eq!(chunk_rows(10, 49152, CHUNK_ELEMS), 10);
        assert_eq!(chunk_rows(384, 1 << 30, CHUNK_ELEMS), 1);
        assert_eq!(chunk_rows(384, 100_000, CHUNK_ELEMS), 62);
        assert_eq!(chunk_rows(0, 10, CHUNK_ELEMS), 1);
    }
}
