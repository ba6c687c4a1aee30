//! trl 0.11.4's `trl.core` helpers and the PPOTrainer's reward and advantage computations, on
//! host values (a PPO batch's per-token quantities are B x T floats: tiny next to the model).
//! Sums accumulate in f64 and results round to f32, so they agree with torch's f32 to ~1e-7.

use crate::{Error, Result};

/// A row-major (rows, cols) grid of per-token values, e.g. (batch, response positions).
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// Number of rows (samples).
    pub rows: usize,
    /// Number of columns (token positions).
    pub cols: usize,
    /// `rows * cols` values, row after row.
    pub data: Vec<f32>,
}

impl Grid {
    /// A grid of `data`; an error unless it holds `rows * cols` values.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Grid> {
        if data.len() != rows * cols {
            return Err(Error::Shape(format!(
                "{} values for a ({rows}, {cols}) grid",
                data.len()
            )));
        }
        Ok(Grid { rows, cols, data })
    }

    /// A (rows, cols) grid of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Grid {
        Grid {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// The value at row `r`, column `c` (panics out of range).
    pub fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }

    /// Row `r`'s `cols` values (panics out of range).
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    fn map2(&self, other: &Grid, f: impl Fn(f32, f32) -> f32) -> Grid {
        Grid {
            rows: self.rows,
            cols: self.cols,
            data: self
                .data
                .iter()
                .zip(&other.data)
                .map(|(&a, &b)| f(a, b))
                .collect(),
        }
    }

    /// The rows listed, in order (a minibatch).
    pub fn select_rows(&self, rows: &[usize]) -> Grid {
        Grid {
            rows: rows.len(),
            cols: self.cols,
            data: rows
                .iter()
                .flat_map(|&r| self.row(r).iter().copied())
                .collect(),
        }
    }
}

fn check_same(a: &Grid, b: &Grid, what: &str) -> Result<()> {
    if (a.rows, a.cols) != (b.rows, b.cols) {
        return Err(Error::Shape(format!(
            "{what}: ({}, {}) and ({}, {}) differ",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    Ok(())
}

/// sum(values * mask) / sum(mask) (trl `masked_mean`, no axis).
pub fn masked_mean(values: &Grid, mask: &Grid) -> f32 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&v, &m) in values.data.iter().zip(&mask.data) {
        num += v as f64 * m as f64;
        den += m as f64;
    }
    (num / den) as f32
}

/// The masked variance, with Bessel's correction when `unbiased` (trl `masked_var`).
pub fn masked_var(values: &Grid, mask: &Grid, unbiased: bool) -> Result<f32> {
    let mean = masked_mean(values, mask) as f64;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&v, &m) in values.data.iter().zip(&mask.data) {
        let centered = (v as f64 - mean) as f32 as f64;
        num += ((centered * centered) as f32) as f64 * m as f64;
        den += m as f64;
    }
    let mut var = num / den;
    if unbiased {
        if den == 0.0 {
            return Err(Error::Shape(
                "masked_var: the mask is empty (no response tokens)".into(),
            ));
        }
        if den == 1.0 {
            // trl raises here too: one value has no unbiased variance.
            return Err(Error::Shape(
                "masked_var: one masked value has no unbiased variance".into(),
            ));
        }
        var *= den / (den - 1.0);
    }
    Ok(var as f32)
}

/// (values - mean) / sqrt(var + 1e-8) over the masked values (+ mean back when not
/// `shift_mean`): trl `masked_whiten`.
pub fn masked_whiten(values: &Grid, mask: &Grid, shift_mean: bool) -> Result<Grid> {
    let mean = masked_mean(values, mask);
    let var = masked_var(values, mask, true)?;
    let inv = 1.0 / (var + 1e-8).sqrt();
    Ok(Grid {
        rows: values.rows,
        cols: values.cols,
        data: values
            .data
            .iter()
            .map(|&v| {
                let w = (v - mean) * inv;
                if shift_mean {
                    w
                } else {
                    w + mean
                }
            })
            .collect(),
    })
}

/// How the per-token KL penalty is estimated from the two log-probs (trl `kl_penalty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlPenalty {
    /// logp - ref_logp
    Kl,
    /// |logp - ref_logp|
    Abs,
    /// (logp - ref_logp)^2 / 2
    Mse,
}

/// trl's names: kl, abs, mse.
impl std::str::FromStr for KlPenalty {
    type Err = crate::Error;

    fn from_str(name: &str) -> crate::Result<KlPenalty> {
        match name {
            "kl" => Ok(KlPenalty::Kl),
            "abs" => Ok(KlPenalty::Abs),
            "mse" => Ok(KlPenalty::Mse),
            other => Err(crate::Error::Config(format!(
                "kl_penalty {other:?} is not one of kl, abs, mse (\"full\" is not supported)"
            ))),
        }
    }
}

impl KlPenalty {
    /// The per-token penalty of a token with the policy's and the reference's log-probs.
    pub fn estimate(self, logprob: f32, ref_logprob: f32) -> f32 {
        let d = logprob - ref_logprob;
        match self {
            KlPenalty::Kl => d,
            KlPenalty::Abs => d.abs(),
            KlPenalty::Mse => 0.5 * d * d,
        }
    }
}

/// The per-token rewards of trl's `compute_rewards`: r_t = -kl_coef * kl_t, plus the score at
/// each row's last response token. Returns (rewards, non_score_rewards, kls).
pub fn compute_rewards(
    scores: &[f32],
    logprobs: &Grid,
    ref_logprobs: &Grid,
    mask: &Grid,
    kl_coef: f32,
    penalty: KlPenalty,
) -> Result<(Grid, Grid, Grid)> {
    check_same(
        logprobs,
        ref_logprobs,
        "compute_rewards logprobs / ref_logprobs",
    )?;
    check_same(logprobs, mask, "compute_rewards logprobs / mask")?;
    if scores.len() != logprobs.rows {
        return Err(Error::Shape(format!(
            "{} scores for {} sequences",
            scores.len(),
            logprobs.rows
        )));
    }
    let kls = logprobs.map2(ref_logprobs, |a, b| penalty.estimate(a, b));
    let non_score = Grid {
        rows: kls.rows,
        cols: kls.cols,
        data: kls.data.iter().map(|&k| -kl_coef * k).collect(),
    };
    let mut rewards = non_score.clone();
    for (r, &score) in scores.iter().enumerate() {
        let Some(last) = mask.row(r).iter().rposition(|&m| m != 0.0) else {
            return Err(Error::Shape(format!("sequence {r} has no response token")));
        };
        rewards.data[r * rewards.cols + last] += score;
    }
    Ok((rewards, non_score, kls))
}

/// GAE as trl's `compute_advantages`: values and rewards masked, delta_t = r_t + gamma
/// V_{t+1} - V_t (0 after the last position), A_t = delta_t + gamma lam A_{t+1};
/// returns = A + V; the advantages whitened over the mask. Returns (masked values,
/// advantages, returns).
pub fn compute_advantages(
    values: &Grid,
    rewards: &Grid,
    mask: &Grid,
    gamma: f32,
    lam: f32,
    whiten_rewards: bool,
) -> Result<(Grid, Grid, Grid)> {
    check_same(values, rewards, "compute_advantages values / rewards")?;
    check_same(values, mask, "compute_advantages values / mask")?;
    let values = values.map2(mask, |v, m| v * m);
    let mut rewards = rewards.map2(mask, |r, m| r * m);
    if whiten_rewards {
        rewards = masked_whiten(&rewards, mask, false)?;
    }
    let (rows, cols) = (values.rows, values.cols);
    let mut advantages = Grid::zeros(rows, cols);
    for r in 0..rows {
        let mut last = 0.0f32;
        for t in (0..cols).rev() {
            let next = if t + 1 < cols {
                values.at(r, t + 1)
            } else {
                0.0
            };
            let delta = rewards.at(r, t) + gamma * next - values.at(r, t);
            last = delta + gamma * lam * last;
            advantages.data[r * cols + t] = last;
        }
    }
    let returns = advantages.map2(&values, |a, v| a + v);
    let advantages = masked_whiten(&advantages, mask, true)?;
    Ok((values, advantages, returns))
}

/// Entropy of the softmax of one row of logits: logsumexp(l) - sum(softmax(l) * l)
/// (trl `entropy_from_logits`), in f64.
pub fn entropy_of_logits(row: &[f32]) -> f32 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let expected: f64 = row
        .iter()
        .map(|&x| (x as f64 - max).exp() / sum * x as f64)
        .sum();
    (lse - expected) as f32
}

/// trl's KL controllers: the coefficient of the KL penalty.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum KlController {
    /// A constant coefficient.
    Fixed {
        /// The coefficient.
        value: f32,
    },
    /// Ziegler et al.: value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon.
    Adaptive {
        /// The current coefficient.
        value: f32,
        /// The KL the controller steers towards.
        target: f32,
        /// In samples: how fast the coefficient moves.
        horizon: f32,
    },
}

impl KlController {
    /// Whether `other` is the same controller with its coefficient free: both fixed, or
    /// both adaptive with the same target and horizon.
    pub fn same_kind(&self, other: &KlController) -> bool {
        match (self, other) {
            (KlController::Fixed { .. }, KlController::Fixed { .. }) => true,
            (
                KlController::Adaptive {
                    target, horizon, ..
                },
                KlController::Adaptive {
                    target: t,
                    horizon: h,
                    ..
                },
            ) => target == t && horizon == h,
            _ => false,
        }
    }

    /// The current KL coefficient.
    pub fn value(&self) -> f32 {
        match self {
            KlController::Fixed { value } | KlController::Adaptive { value, .. } => *value,
        }
    }

    /// After a step whose mean KL was `current`, over `n_steps` samples.
    pub fn update(&mut self, current: f32, n_steps: usize) {
        if let KlController::Adaptive {
            value,
            target,
            horizon,
        } = self
        {
            let error = (current as f64 / *target as f64 - 1.0).clamp(-0.2, 0.2);
            let mult = 1.0 + error * n_steps as f64 / *horizon as f64;
            *value = (*value as f64 * mult) as f32;
        }
    }
}
