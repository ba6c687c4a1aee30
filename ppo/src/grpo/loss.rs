//! GRPO's loss on per-token log-probs, as trl 1.16's `GRPOTrainer._compute_loss`: the
//! clipped surrogate of PPO without a value function (each completion's advantage on all
//! its tokens), plus β times the k3 estimate of the KL to the reference, normalised as the
//! `loss_type` says. Computed on the host with its gradient with respect to the policy's
//! log-probs, which flows into the model through the surrogate `Σ logp · ∂L/∂logp`.

use serde::{Deserialize, Serialize};

/// How the per-token losses are averaged (trl's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLoss {
    /// Each completion's mean over its tokens, then the mean over completions.
    Grpo,
    /// The mean over the micro-batch's tokens.
    Bnpo,
    /// The sum over tokens divided by B × max_completion_length (Dr. GRPO).
    DrGrpo,
    /// The sum over tokens divided by the generation batch's token count (DAPO; trl's
    /// default).
    Dapo,
}

/// The settings the loss reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSettings {
    /// How the per-token losses are reduced.
    pub loss_type: GrpoLoss,
    /// The KL term's weight (0: no reference needed).
    pub beta: f64,
    /// The ratio's lower clip: 1 - epsilon_low.
    pub epsilon_low: f64,
    /// The ratio's upper clip: 1 + epsilon_high.
    pub epsilon_high: f64,
    /// The longest completion in tokens (Dr. GRPO's denominator).
    pub max_completion_length: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Micro-batches per generation batch.
    pub steps_per_generation: usize,
    /// Completion tokens in the whole generation batch (dapo's denominator).
    pub num_items_in_batch: usize,
}

/// A micro-batch of B completions, T positions each (row-major B × T).
#[derive(Clone, Copy, Debug)]
pub struct TokenBatch<'a> {
    /// B: completions in the micro-batch.
    pub rows: usize,
    /// T: token positions per completion.
    pub cols: usize,
    /// The policy's current log-probs of the completion tokens (B × T).
    pub logps: &'a [f64],
    /// The log-probs at generation time (equal to `logps` when each batch is used once).
    pub old_logps: &'a [f64],
    /// The reference's; read only when β ≠ 0.
    pub ref_logps: &'a [f64],
    /// 1 on completion tokens, 0 on padding.
    pub mask: &'a [f64],
    /// One per completion.
    pub advantages: &'a [f64],
}

/// The loss of a micro-batch, its gradient (B × T) and trl's statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoLossOutput {
    /// The micro-batch's loss, reduced as `loss_type` says.
    pub loss: f64,
    /// ∂loss/∂logps.
    pub grad: Vec<f64>,
    /// (trl name, value): `kl` (β ≠ 0), `clip_ratio/low_mean`, `clip_ratio/high_mean`,
    /// `clip_ratio/region_mean`, `clip_ratio/low_min`, `clip_ratio/high_max`.
    pub metrics: Vec<(&'static str, f64)>,
}

/// trl's GRPO loss of `batch` with `s`.
pub fn grpo_loss(batch: TokenBatch<'_>, s: &LossSettings) -> GrpoLossOutput {
    let (b, t) = (batch.rows, batch.cols);
    let mut per_token = vec![0.0; b * t];
    let mut grad = vec![0.0; b * t];
    let mut kl = vec![0.0; b * t];
    let mut low = vec![0.0; b * t];
    let mut high = vec![0.0; b * t];
    let (lo, hi) = (1.0 - s.epsilon_low, 1.0 + s.epsilon_high);
    for i in 0..b * t {
        let a = batch.advantages[i / t];
        let ratio = (batch.logps[i] - batch.old_logps[i]).exp();
        let clamped = ratio.clamp(lo, hi);
        let (unclipped, clipped) = (ratio * a, clamped * a);
        // ∂ of each branch by logp: ratio·A, and ratio·A while the clamp passes it through
        // (its bounds included, as torch's clamp); torch's minimum splits a tie in halves.
        let d_unclipped = ratio * a;
        let d_clipped = if (lo..=hi).contains(&ratio) {
            ratio * a
        } else {
            0.0
        };
        let d_min = if unclipped < clipped {
            d_unclipped
        } else if clipped < unclipped {
            d_clipped
        } else {
            (d_unclipped + d_clipped) / 2.0
        };
        per_token[i] = -unclipped.min(clipped);
        grad[i] = -d_min;
        if s.beta != 0.0 {
            let delta = batch.ref_logps[i] - batch.logps[i];
            kl[i] = delta.exp() - delta - 1.0;
            per_token[i] += s.beta * kl[i];
            grad[i] += s.beta * (1.0 - delta.exp());
        }
        low[i] = f64::from(ratio < lo && a < 0.0);
        high[i] = f64::from(ratio > hi && a > 0.0);
    }
    let m = batch.mask;
    let row_tokens: Vec<f64> = m.chunks(t).map(|r| r.iter().sum::<f64>()).collect();
    let tokens: f64 = row_tokens.iter().sum();
    let accum = s.gradient_accumulation_steps as f64;
    // weight[i]: ∂loss/∂per_token[i] (0 on padding).
    let weight: Vec<f64> = (0..b * t)
        .map(|i| {
            m[i] * match s.loss_type {
                GrpoLoss::Grpo => 1.0 / (b as f64 * row_tokens[i / t].max(1.0) * accum),
                GrpoLoss::Bnpo => 1.0 / (tokens.max(1.0) * accum),
                GrpoLoss::DrGrpo => 1.0 / ((b * s.max_completion_length) as f64 * accum),
                GrpoLoss::Dapo => {
                    1.0 / (s.num_items_in_batch as f64 * accum / s.steps_per_generation as f64)
                }
            }
        })
        .collect();
    let loss = per_token.iter().zip(&weight).map(|(l, w)| l * w).sum();
    for (g, w) in grad.iter_mut().zip(&weight) {
        *g *= w;
    }
    let masked_mean = |v: &[f64]| v.iter().zip(m).map(|(x, k)| x * k).sum::<f64>() / tokens;
    let row_means = |v: &[f64]| -> Vec<f64> {
        v.chunks(t)
            .zip(m.chunks(t))
            .zip(&row_tokens)
            .map(|((x, k), n)| x.iter().zip(k).map(|(x, k)| x * k).sum::<f64>() / n)
            .collect()
    };
    let region: Vec<f64> = low.iter().zip(&high).map(|(l, h)| l.max(*h)).collect();
    let mut metrics = Vec::new();
    if s.beta != 0.0 {
        metrics.push(("kl", masked_mean(&kl)));
    }
    metrics.push(("clip_ratio/low_mean", masked_mean(&low)));
    metrics.push(("clip_ratio/high_mean", masked_mean(&high)));
    metrics.push(("clip_ratio/region_mean", masked_mean(&region)));
    metrics.push((
        "clip_ratio/low_min",
        row_means(&low).into_iter().fold(f64::INFINITY, f64::min),
    ));
    metrics.push((
        "clip_ratio/high_max",
        row_means(&high)
            .into_iter()
            .fold(f64::NEG_INFINITY, f64::max),
    ));
    GrpoLossOutput {
        loss,
        grad,
        metrics,
    }
}
