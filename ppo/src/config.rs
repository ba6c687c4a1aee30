//! PPO settings under trl's `PPOConfig` names (a TOML file of these keys reads as trl's
//! config would), with trl 0.11.4's defaults except where the seed's script set its own.

use serde::{Deserialize, Serialize};

use crate::math::{KlController, KlPenalty};
use crate::{Error, Result};

/// The settings of a PPO trainer, under trl's `PPOConfig` names and with its defaults; the
/// keys of a PPO config file. [`validate`](PpoConfig::validate) checks them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Adam's learning rate.
    pub learning_rate: f32,
    /// Samples per PPO step (rollouts scored together).
    pub batch_size: usize,
    /// Samples per forward/backward in the PPO epochs.
    pub mini_batch_size: usize,
    /// Minibatches whose gradients are summed before one optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Passes over the batch per step.
    pub ppo_epochs: usize,
    /// The KL penalty's coefficient at the start (the fixed one without `adap_kl_ctrl`).
    pub init_kl_coef: f32,
    /// Adaptive KL controller (else fixed at init_kl_coef).
    pub adap_kl_ctrl: bool,
    /// The adaptive controller's target KL.
    pub target: f32,
    /// The adaptive controller's horizon, in samples: how fast the coefficient moves.
    pub horizon: f32,
    /// Discount factor of the returns.
    pub gamma: f32,
    /// GAE's λ: the bias-variance trade-off of the advantages.
    pub lam: f32,
    /// The policy ratio's clip range: the ratio is clipped to 1 ± cliprange.
    pub cliprange: f32,
    /// The value prediction's clip range around the rollout's values.
    pub cliprange_value: f32,
    /// Weight of the value loss in the total loss.
    pub vf_coef: f32,
    /// How the per-token KL is estimated from the log-probs.
    pub kl_penalty: KlPenalty,
    /// Whiten the per-token rewards (zero mean, unit variance) before GAE.
    pub whiten_rewards: bool,
    /// Skip a minibatch's update when its mean ratio exceeds this.
    pub ratio_threshold: f32,
    /// Stop the epochs of a step once policykl > 1.5 target_kl.
    pub early_stopping: bool,
    /// The policy KL at which `early_stopping` stops a step's epochs.
    pub target_kl: f32,
    /// Clip the gradients' global norm (None: no clipping, trl's default).
    pub max_grad_norm: Option<f32>,
    /// Seed of the minibatch shuffles and the adapters' dropout and init.
    pub seed: u64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            learning_rate: 1.41e-5,
            batch_size: 128,
            mini_batch_size: 128,
            gradient_accumulation_steps: 1,
            ppo_epochs: 4,
            init_kl_coef: 0.2,
            adap_kl_ctrl: true,
            target: 6.0,
            horizon: 10000.0,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            kl_penalty: KlPenalty::Kl,
            whiten_rewards: false,
            ratio_threshold: 10.0,
            early_stopping: false,
            target_kl: 1.0,
            max_grad_norm: None,
            seed: 0,
        }
    }
}

/// The largest batch, minibatch, accumulation or epoch count accepted (2^20): far above
/// what fits one GPU, and low enough that products of two never overflow.
pub const MAX_COUNT: usize = 1 << 20;

impl PpoConfig {
    /// Checks every setting against its meaning; the error names the key and its range.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("mini_batch_size", self.mini_batch_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("ppo_epochs", self.ppo_epochs),
        ] {
            if !(1..=MAX_COUNT).contains(&v) {
                return fail(format!("{name} must be in 1..={MAX_COUNT}, got {v}"));
            }
        }
        let backward = self.mini_batch_size * self.gradient_accumulation_steps; // <= 2^40
        if !self.batch_size.is_multiple_of(backward) {
            return fail(format!(
                "batch_size {} must be a multiple of mini_batch_size * gradient_accumulation_steps = {backward} (as trl requires)",
                self.batch_size
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return fail(format!(
                "learning_rate must be finite and > 0, got {}",
                self.learning_rate
            ));
        }
        let at_least_zero = [
            ("init_kl_coef", self.init_kl_coef),
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("vf_coef", self.vf_coef),
            ("target_kl", self.target_kl),
        ];
        for (name, v) in at_least_zero {
            if !(v.is_finite() && v >= 0.0) {
                return fail(format!("{name} must be finite and >= 0, got {v}"));
            }
        }
        for (name, v) in [("gamma", self.gamma), ("lam", self.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return fail(format!("{name} must be in [0, 1], got {v}"));
            }
        }
        if self.ratio_threshold.is_nan() || self.ratio_threshold <= 0.0 {
            return fail(format!(
                "ratio_threshold must be > 0 (inf: never skip a minibatch), got {}",
                self.ratio_threshold
            ));
        }
        if let Some(norm) = self.max_grad_norm {
            if norm.is_nan() || norm <= 0.0 {
                return fail(format!(
                    "max_grad_norm must be > 0 (leave it out for no clipping, trl's default), \
                     got {norm}"
                ));
            }
        }
        if self.adap_kl_ctrl {
            for (name, v) in [("target", self.target), ("horizon", self.horizon)] {
                if !(v.is_finite() && v > 0.0) {
                    return fail(format!(
                        "the adaptive KL controller needs {name} finite and > 0, got {v}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The KL controller these settings start with: adaptive (`target`, `horizon`) with
    /// `adap_kl_ctrl`, else fixed, both at `init_kl_coef`.
    pub fn kl_controller(&self) -> KlController {
        if self.adap_kl_ctrl {
            KlController::Adaptive {
                value: self.init_kl_coef,
                target: self.target,
                horizon: self.horizon,
            }
        } else {
            KlController::Fixed {
                value: self.init_kl_coef,
            }
        }
    }
}
