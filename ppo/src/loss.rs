//! trl 0.11.4's `PPOTrainer.loss`: the clipped policy loss and the clipped value loss of one
//! minibatch, as tensors that back-propagate into the policy's log-probs and the value
//! head's predictions, and the statistics trl logs with them (computed on the host from
//! the same values).

use lathe_core::{no_grad, Device, Tensor};

use crate::config::PpoConfig;
use crate::math::{masked_mean, masked_var, Grid};
use crate::{Error, Result};

/// The rollout-time quantities of a minibatch, (rows, response positions) each.
pub struct RolloutBatch<'a> {
    /// The policy's log-probs of the response tokens at rollout time.
    pub old_logprobs: &'a Grid,
    /// The value head's predictions at rollout time (masked).
    pub values: &'a Grid,
    /// GAE advantages (whitened over the batch).
    pub advantages: &'a Grid,
    /// The value head's targets: the (unwhitened) advantages plus the rollout values.
    pub returns: &'a Grid,
    /// 1 at a response token, 0 at padding.
    pub mask: &'a Grid,
}

/// The scalars trl's loss reports (names as in its stats dict, without the `ppo/` prefix).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LossStats {
    /// The clipped policy-gradient loss.
    pub loss_policy: f32,
    /// The clipped value loss (before `vf_coef`).
    pub loss_value: f32,
    /// `loss_policy + vf_coef * loss_value` (0 when `skipped`).
    pub loss_total: f32,
    /// Mean entropy of the policy's next-token distributions.
    pub policy_entropy: f32,
    /// `0.5 * mean((logp - old_logp)²)`.
    pub policy_approxkl: f32,
    /// `mean(old_logp - logp)`.
    pub policy_policykl: f32,
    /// Fraction of tokens whose policy loss the clip changed.
    pub policy_clipfrac: f32,
    /// Mean advantage.
    pub policy_advantages_mean: f32,
    /// Mean ratio `exp(logp - old_logp)`.
    pub policy_ratio_mean: f32,
    /// Mean return.
    pub returns_mean: f32,
    /// Variance of the returns.
    pub returns_var: f32,
    /// Mean of the value head's current predictions.
    pub val_vpred: f32,
    /// Mean squared error of the predictions against the returns.
    pub val_error: f32,
    /// Fraction of tokens whose value loss the clip changed.
    pub val_clipfrac: f32,
    /// Mean of the rollout-time values.
    pub val_mean: f32,
    /// Variance of the rollout-time values.
    pub val_var: f32,
    /// Whether the ratio threshold zeroed this minibatch's loss.
    pub skipped: bool,
}

impl LossStats {
    /// (trl name, value) pairs, e.g. ("ppo/loss/policy", ..).
    pub fn named(&self) -> Vec<(&'static str, f32)> {
        vec![
            ("ppo/loss/policy", self.loss_policy),
            ("ppo/loss/value", self.loss_value),
            ("ppo/loss/total", self.loss_total),
            ("ppo/policy/entropy", self.policy_entropy),
            ("ppo/policy/approxkl", self.policy_approxkl),
            ("ppo/policy/policykl", self.policy_policykl),
            ("ppo/policy/clipfrac", self.policy_clipfrac),
            ("ppo/policy/advantages_mean", self.policy_advantages_mean),
            ("ppo/policy/ratio_mean", self.policy_ratio_mean),
            ("ppo/returns/mean", self.returns_mean),
            ("ppo/returns/var", self.returns_var),
            ("ppo/val/vpred", self.val_vpred),
            ("ppo/val/error", self.val_error),
            ("ppo/val/clipfrac", self.val_clipfrac),
            ("ppo/val/mean", self.val_mean),
            ("ppo/val/var", self.val_var),
        ]
    }

    /// The statistics as 17 numbers (the 16 of [`named`](LossStats::named), then `skipped`
    /// as 0 or 1): what ranks exchange.
    pub fn to_values(&self) -> [f32; 17] {
        let mut values = [0.0; 17];
        for (v, (_, x)) in values.iter_mut().zip(self.named()) {
            *v = x;
        }
        values[16] = f32::from(u8::from(self.skipped));
        values
    }

    /// The statistics of [`to_values`](LossStats::to_values)' numbers.
    pub fn from_values(v: &[f32; 17]) -> LossStats {
        LossStats {
            loss_policy: v[0],
            loss_value: v[1],
            loss_total: v[2],
            policy_entropy: v[3],
            policy_approxkl: v[4],
            policy_policykl: v[5],
            policy_clipfrac: v[6],
            policy_advantages_mean: v[7],
            policy_ratio_mean: v[8],
            returns_mean: v[9],
            returns_var: v[10],
            val_vpred: v[11],
            val_error: v[12],
            val_clipfrac: v[13],
            val_mean: v[14],
            val_var: v[15],
            skipped: v[16] != 0.0,
        }
    }
}

fn tensor(grid: &Grid, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        grid.data.clone(),
        &[grid.rows, grid.cols],
        device,
    )?)
}

/// min(x, hi) then max(., lo): torch's `clip_by_value` with tensor bounds.
fn clip_by_value(x: &Tensor, lo: &Tensor, hi: &Tensor) -> Result<Tensor> {
    let below_hi = x.sub(&x.sub(hi)?.relu()?)?;
    Ok(below_hi.maximum(lo)?)
}

/// The minibatch loss `pg_loss + vf_coef * vf_loss` (a (1,) tensor; zero when the mean
/// ratio exceeds `ratio_threshold`, as trl) and its statistics. `logprobs` and `vpreds` are
/// (rows, positions) tensors of the current policy and value head; `entropy` the per
/// position entropy of the policy's distribution (rows, positions), for the statistics.
pub fn ppo_loss(
    config: &PpoConfig,
    batch: &RolloutBatch<'_>,
    logprobs: &Tensor,
    vpreds: &Tensor,
    entropy: &Grid,
) -> Result<(Tensor, LossStats)> {
    let shape = [batch.mask.rows, batch.mask.cols];
    for (name, t) in [("logprobs", logprobs), ("vpreds", vpreds)] {
        if t.shape() != shape {
            return Err(Error::Shape(format!(
                "{name} {:?} for a minibatch of {shape:?}",
                t.shape()
            )));
        }
    }
    let device = logprobs.device();
    let mask_sum: f64 = batch.mask.data.iter().map(|&m| m as f64).sum();
    if mask_sum == 0.0 {
        return Err(Error::Shape("the minibatch has no response tokens".into()));
    }
    let mask = tensor(batch.mask, device)?;
    let masked_mean_t = |x: &Tensor| -> Result<Tensor> {
        Ok(x.mul(&mask)?
            .sum_all()?
            .affine((1.0 / mask_sum) as f32, 0.0)?)
    };
    let old = tensor(batch.old_logprobs, device)?;
    let values = tensor(batch.values, device)?;
    let returns = tensor(batch.returns, device)?;
    let neg_advantages = tensor(batch.advantages, device)?.affine(-1.0, 0.0)?;

    let c = config.cliprange_value;
    let vpred_clipped = clip_by_value(vpreds, &values.affine(1.0, -c)?, &values.affine(1.0, c)?)?;
    let square = |x: Tensor| -> Result<Tensor> { Ok(x.mul(&x)?) };
    let vf1 = square(vpreds.sub(&returns)?)?;
    let vf2 = square(vpred_clipped.sub(&returns)?)?;
    let vf_loss = masked_mean_t(&vf1.maximum(&vf2)?)?.affine(0.5, 0.0)?;

    let ratio = logprobs.sub(&old)?.exp()?;
    let pg1 = ratio.mul(&neg_advantages)?;
    let pg2 = ratio
        .clamp(1.0 - config.cliprange, 1.0 + config.cliprange)?
        .mul(&neg_advantages)?;
    let pg_loss = masked_mean_t(&pg1.maximum(&pg2)?)?;
    let loss = pg_loss.add(&vf_loss.affine(config.vf_coef, 0.0)?)?;

    // The statistics, from the same values on the host.
    let _no_grad = no_grad();
    let host =
        |t: &Tensor| -> Result<Grid> { Grid::new(shape[0], shape[1], t.detach().to_vec_f32()?) };
    let (lp, vp) = (host(logprobs)?, host(vpreds)?);
    let m = batch.mask;
    let mut ratio_h = Grid::zeros(shape[0], shape[1]);
    let mut pg_clipped = Grid::zeros(shape[0], shape[1]);
    let mut vf_clipped = Grid::zeros(shape[0], shape[1]);
    let mut log_diff_sq = Grid::zeros(shape[0], shape[1]);
    let mut old_minus_new = Grid::zeros(shape[0], shape[1]);
    let mut vf_error = Grid::zeros(shape[0], shape[1]);
    for i in 0..lp.data.len() {
        let d = lp.data[i] - batch.old_logprobs.data[i];
        let r = d.exp();
        ratio_h.data[i] = r;
        let a = batch.advantages.data[i];
        let (p1, p2) = (
            -a * r,
            -a * r.clamp(1.0 - config.cliprange, 1.0 + config.cliprange),
        );
        pg_clipped.data[i] = (p2 > p1) as u8 as f32;
        let (v, old_v, ret) = (vp.data[i], batch.values.data[i], batch.returns.data[i]);
        let vc = v.min(old_v + c).max(old_v - c);
        vf_clipped.data[i] = ((vc - ret).powi(2) > (v - ret).powi(2)) as u8 as f32;
        log_diff_sq.data[i] = d * d;
        old_minus_new.data[i] = -d;
        vf_error.data[i] = (v - ret).powi(2);
    }
    let mut stats = LossStats {
        loss_policy: pg_loss.to_scalar()?,
        loss_value: vf_loss.to_scalar()?,
        loss_total: loss.to_scalar()?,
        policy_entropy: masked_mean(entropy, m),
        policy_approxkl: 0.5 * masked_mean(&log_diff_sq, m),
        policy_policykl: masked_mean(&old_minus_new, m),
        policy_clipfrac: masked_mean(&pg_clipped, m),
        policy_advantages_mean: masked_mean(batch.advantages, m),
        policy_ratio_mean: masked_mean(&ratio_h, m),
        returns_mean: masked_mean(batch.returns, m),
        returns_var: masked_var(batch.returns, m, true)?,
        val_vpred: masked_mean(&vp, m),
        val_error: masked_mean(&vf_error, m),
        val_clipfrac: masked_mean(&vf_clipped, m),
        val_mean: masked_mean(batch.values, m),
        val_var: masked_var(batch.values, m, true)?,
        skipped: false,
    };
    stats.loss_value *= 1.0; // trl reports vf_loss before vf_coef in the stats dict
    if stats.policy_ratio_mean > config.ratio_threshold {
        stats.skipped = true;
        stats.loss_policy = 0.0;
        stats.loss_value = 0.0;
        stats.loss_total = 0.0;
        return Ok((loss.affine(0.0, 0.0)?, stats));
    }
    Ok((loss, stats))
}
