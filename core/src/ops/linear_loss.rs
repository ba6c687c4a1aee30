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
//!
//! `h.linear_log_softmax_gather(w, targets, ignore, entropy)` is the same pass for the
//! per-token log-probs a policy-gradient or preference loss is made of (PPO, GRPO, DPO):
//! log p(target) of each row, and the entropy of its softmax when asked. The loss over those
//! log-probs is only known after the forward, but each log-prob depends on its own row of h
//! alone, so the forward keeps d logp_r / d h_r (N, H) and the backward scales its rows by
//! the upstream gradient. Ignored rows (a prompt's positions) are left out of the GEMMs.

use rayon::prelude::*;

use crate::backprop;
use crate::dtype::DType;
use crate::ops::loss::check_targets;
use crate::ops::matmul::cpu_gemm;
use crate::ops::packed::PackedWeight;
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

/// logits (rows, V) = h (rows, H) @ wᵀ for w (V, H): through the head's packed copy when it
/// has one, else the gemm crate reading w transposed.
fn head_logits(
    logits: &mut [f32],
    h: &[f32],
    w: &[f32],
    packed: Option<&PackedWeight>,
    (rows, v, hd): (usize, usize, usize),
) {
    crate::flops::add_product(rows, v, hd);
    match packed {
        Some(p) => p.matmul_into(h, rows, logits),
        // SAFETY: h holds rows * hd elements, w holds v * hd, logits rows * v.
        None => unsafe { cpu_gemm(logits, h, (hd, 1), w, (1, hd), (rows, v, hd), false) },
    }
}

/// The CPU pass over row chunks of `chunk` rows; `kept` (> 0) rows have a target that is not
/// `ignore`, and every kept target is < v.
#[allow(clippy::too_many_arguments)]
fn cpu_fused(
    h: &[f32],
    w: &[f32],
    packed: Option<&PackedWeight>,
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
        head_logits(lc, hc, w, packed, (rows, v, hd));
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
            crate::flops::add_product(rows, hd, v);
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
            crate::flops::add_product(v, hd, rows);
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

/// What the per-token pass produces: log p(target) of each row (0 when ignored), the entropy
/// of each row's softmax when asked, and d logp_r / d h_r (N, H) when h tracks a gradient.
struct TokenPass {
    logps: Vec<f32>,
    entropy: Option<Vec<f32>>,
    dlogp_dh: Option<Vec<f32>>,
}

/// The CPU per-token pass: the rows whose target is not `ignore` (each < v) are gathered
/// and go through in chunks of `chunk` rows.
#[allow(clippy::too_many_arguments)]
fn cpu_token_pass(
    h: &[f32],
    w: &[f32],
    packed: Option<&PackedWeight>,
    targets: &[u32],
    ignore: Option<u32>,
    Dims { n, hd, v }: Dims,
    need_dh: bool,
    want_entropy: bool,
    chunk: usize,
) -> TokenPass {
    let kept: Vec<usize> = (0..n).filter(|&r| Some(targets[r]) != ignore).collect();
    let mut logps = vec![0f32; n];
    let mut entropy = want_entropy.then(|| vec![0f32; n]);
    let mut dlogp_dh = need_dh.then(|| vec![0f32; n * hd]);
    let mut logits = vec![0f32; chunk.min(kept.len()) * v];
    let mut hc = vec![0f32; chunk.min(kept.len()) * hd];
    let mut dhc = vec![0f32; if need_dh { hc.len() } else { 0 }];
    for rows in kept.chunks(chunk) {
        let m = rows.len();
        for (i, &r) in rows.iter().enumerate() {
            hc[i * hd..(i + 1) * hd].copy_from_slice(&h[r * hd..(r + 1) * hd]);
        }
        let lc = &mut logits[..m * v];
        head_logits(lc, &hc[..m * hd], w, packed, (m, v, hd));
        let stats: Vec<(f32, f32)> = lc
            .par_chunks_mut(v)
            .zip(rows.par_iter())
            .map(|(row, &r)| {
                let t = targets[r] as usize;
                let target_logit = row[t];
                let max = vexp::row_max(row);
                let (s, dot) = if want_entropy {
                    vexp::exp_shift_sum_dot(row, max)
                } else if need_dh {
                    (vexp::exp_shift_sum(row, max), 0.0)
                } else {
                    (vexp::sum_exp_shift(row, max), 0.0)
                };
                if need_dh {
                    // d logp / d logits = onehot - softmax, in place of exp(x - max).
                    vexp::scale(row, -1.0 / s);
                    row[t] += 1.0;
                }
                (target_logit - max - s.ln(), s.ln() - dot / s)
            })
            .collect();
        for (&r, (logp, ent)) in rows.iter().zip(stats) {
            logps[r] = logp;
            if let Some(e) = entropy.as_mut() {
                e[r] = ent;
            }
        }
        if let Some(out) = dlogp_dh.as_mut() {
            crate::flops::add_product(m, hd, v);
            // d logp / d h_c (m, H) = d logp / d logits (m, V) @ w (V, H).
            // SAFETY: as above; dhc holds >= m * hd elements.
            unsafe {
                cpu_gemm(
                    &mut dhc[..m * hd],
                    lc,
                    (v, 1),
                    w,
                    (hd, 1),
                    (m, hd, v),
                    false,
                )
            };
            for (i, &r) in rows.iter().enumerate() {
                out[r * hd..(r + 1) * hd].copy_from_slice(&dhc[i * hd..(i + 1) * hd]);
            }
        }
    }
    TokenPass {
        logps,
        entropy,
        dlogp_dh,
    }
}

impl Tensor {
    /// The sizes of an LM-head op: self h (N, H) f32 and weight (V, H) on its device, V > 0.
    fn head_dims(&self, op: &'static str, weight: &Tensor) -> Result<Dims> {
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
        Ok(Dims { n, hd, v })
    }

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
        let Dims { n, hd, v } = self.head_dims(op, weight)?;
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
                    weight.packed(),
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

impl Tensor {
    /// `log_softmax(self @ weight^T)[r, targets[r]]` for each row r, (N,), and, when
    /// `entropy`, the entropy of each row's softmax (N,) (a statistic: no gradient): the
    /// per-token log-probs of a language model through its LM head. self (N, H) f32, weight
    /// (V, H) (no bias), host `targets` (N) < V (they are known on the host wherever the
    /// ids were built, so no device read is needed); rows whose target is `ignore_index` are
    /// 0 (and their entropy 0) and get no gradient. On the CPU with an f32 weight that tracks
    /// no gradient (a frozen head) the (N, V) logits are never held and ignored rows cost
    /// nothing; otherwise the ops are composed (same values).
    pub fn linear_log_softmax_gather(
        &self,
        weight: &Tensor,
        targets: &[u32],
        ignore_index: Option<u32>,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let op = "linear_log_softmax_gather";
        let Dims { n, hd, v } = self.head_dims(op, weight)?;
        if targets.len() != n {
            return Err(Error::shape(
                op,
                format!("{} targets for {n} rows", targets.len()),
            ));
        }
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| Some(t) != ignore_index && t as usize >= v)
        {
            return Err(Error::IndexOutOfRange {
                op,
                index: bad as usize,
                size: v,
            });
        }
        let grad = backprop::grad_enabled();
        let fused = matches!(self.device(), Device::Cpu)
            && weight.dtype() == DType::F32
            && !(grad && weight.tracks_grad());
        if !fused {
            return self.composed_log_softmax_gather(weight, targets, ignore_index, entropy);
        }
        let need_dh = grad && self.tracks_grad();
        let kept = targets.iter().filter(|&&t| Some(t) != ignore_index).count();
        let pass = self.with_cpu_f32(op, |h| {
            weight.with_cpu_f32(op, |w| {
                cpu_token_pass(
                    h,
                    w,
                    weight.packed(),
                    targets,
                    ignore_index,
                    Dims { n, hd, v },
                    need_dh,
                    entropy,
                    chunk_rows(kept, v, CHUNK_ELEMS),
                )
            })
        })??;
        let entropy = pass
            .entropy
            .map(|e| Tensor::from_vec(e, &[n], &Device::Cpu))
            .transpose()?;
        let dlogp_dh = pass.dlogp_dh;
        let logps = Tensor::from_op(
            Tensor::cpu_f32(pass.logps, vec![n]),
            vec![n],
            DType::F32,
            self.device(),
            op,
            &[self, weight],
            move |_, g| {
                // Row r of dh is g[r] d logp_r / d h_r (held since the forward).
                let Some(unit) = dlogp_dh.as_ref() else {
                    return Ok(vec![None, None]);
                };
                let g = g.to_vec_f32()?;
                let mut dh = unit.clone();
                dh.par_chunks_mut(hd)
                    .zip(g.par_iter())
                    .for_each(|(row, &g)| vexp::scale(row, g));
                Ok(vec![
                    Some(Tensor::from_vec(dh, &[n, hd], &Device::Cpu)?),
                    None,
                ])
            },
        );
        Ok((logps, entropy))
    }

    /// [`Tensor::linear_log_softmax_gather`] as composed ops (the logits materialised).
    fn composed_log_softmax_gather(
        &self,
        weight: &Tensor,
        targets: &[u32],
        ignore_index: Option<u32>,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.matmul_t(weight, false, true)?
            .log_softmax_gather_masked(targets, ignore_index, entropy)
    }

    /// [`Tensor::log_softmax_gather`] of logits (N, V) at host `targets` (N), rows whose
    /// target is `ignore_index` zeroed (they gather class 0, then a mask), and the entropy
    /// of each row when asked (no gradient, ignored rows 0): the composed form of
    /// [`Tensor::linear_log_softmax_gather`] for logits some other layer built.
    pub fn log_softmax_gather_masked(
        &self,
        targets: &[u32],
        ignore_index: Option<u32>,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n = targets.len();
        let device = self.device();
        let (safe, mask): (Vec<u32>, Vec<f32>) = targets
            .iter()
            .map(|&t| {
                if Some(t) == ignore_index {
                    (0, 0.0)
                } else {
                    (t, 1.0)
                }
            })
            .unzip();
        let mask = Tensor::from_vec(mask, &[n], device)?;
        let logps = self
            .log_softmax_gather(&Tensor::from_vec(safe, &[n], device)?)?
            .mul(&mask)?;
        let entropy = entropy
            .then(|| self.detach().entropy_last()?.mul(&mask))
            .transpose()?;
        Ok((logps, entropy))
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
        let packed = PackedWeight::pack(&wv, v, hd);
        for (chunk, packed) in [1, 4, 13]
            .into_iter()
            .flat_map(|c| [(c, None), (c, packed.as_ref())])
        {
            let f = cpu_fused(
                &hv,
                &wv,
                packed,
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

    /// The per-token pass in small chunks against the composed ops: log-probs, entropy and
    /// the gradient of a weighted sum of the log-probs, with ignored rows.
    #[test]
    fn token_pass_matches_the_composed_ops() {
        let (n, hd, v) = (11, 6, 29);
        let h = Tensor::rand_uniform(-1.0, 1.0, &[n, hd], 3, &Device::Cpu)
            .unwrap()
            .into_variable();
        let w = Tensor::rand_uniform(-2.0, 2.0, &[v, hd], 4, &Device::Cpu).unwrap();
        let mut targets: Vec<u32> = (0..n as u32).map(|i| (i * 5 + 2) % v as u32).collect();
        targets[0] = u32::MAX;
        targets[7] = u32::MAX;
        let upstream: Vec<f32> = (0..n).map(|i| 0.3 * i as f32 - 1.0).collect();
        let upstream = Tensor::from_vec(upstream, &[n], &Device::Cpu).unwrap();
        let weighted = |logps: &Tensor| {
            let grads = logps
                .mul(&upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            grads.get(&h).unwrap().to_vec_f32().unwrap()
        };
        let (want, want_entropy) = h
            .composed_log_softmax_gather(&w, &targets, Some(u32::MAX), true)
            .unwrap();
        let want_dh = weighted(&want);
        let (hv, wv) = (h.to_vec_f32().unwrap(), w.to_vec_f32().unwrap());
        let tol = crate::testing::Tolerance::new(1e-5, 1e-6);
        let packed = PackedWeight::pack(&wv, v, hd);
        for (chunk, packed) in [1, 4, 9]
            .into_iter()
            .flat_map(|c| [(c, None), (c, packed.as_ref())])
        {
            let pass = cpu_token_pass(
                &hv,
                &wv,
                packed,
                &targets,
                Some(u32::MAX),
                Dims { n, hd, v },
                true,
                true,
                chunk,
            );
            crate::testing::assert_close(&pass.logps, &want.to_vec_f32().unwrap(), tol);
            crate::testing::assert_close(
                &pass.entropy.unwrap(),
                &want_entropy.as_ref().unwrap().to_vec_f32().unwrap(),
                tol,
            );
            assert_eq!(pass.logps[0], 0.0);
        }
        let (got, got_entropy) = h
            .linear_log_softmax_gather(&w, &targets, Some(u32::MAX), false)
            .unwrap();
        assert!(got_entropy.is_none());
        crate::testing::assert_close(&got.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap(), tol);
        let got_dh = weighted(&got);
        crate::testing::assert_close(&got_dh, &want_dh, tol);
        // Through the head's packed copy (where this CPU packs): the same values.
        let (got, _) = h
            .linear_log_softmax_gather(
                &w.packed_for_cpu_forward().unwrap(),
                &targets,
                Some(u32::MAX),
                false,
            )
            .unwrap();
        crate::testing::assert_close(&got.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap(), tol);
        crate::testing::assert_close(&weighted(&got), &want_dh, tol);
        assert!(
            got_dh[..hd].iter().all(|&g| g == 0.0),
            "an ignored row has no gradient"
        );
        assert!(h
            .linear_log_softmax_gather(&w, &[v as u32; 11], None, false)
            .is_err());
        assert!(h
            .linear_log_softmax_gather(&w, &targets[..3], None, false)
            .is_err());
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
