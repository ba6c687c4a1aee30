//! PPO settings under trl's `PPOConfig` names (a TOML file of these keys reads as trl's
//! config would), with trl 0.11.4's defaults except where the seed's script set its own.

use serde::{Deserialize, Serialize};

use crate::math::{KlController, KlPenalty};
use crate::{Error, Result};

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
    pub init_kl_coef: f32,
    /// Adaptive KL controller (else fixed at init_kl_coef).
    pub adap_kl_ctrl: bool,
    /// The adaptive controller's target KL.
    pub target: f32,
    pub horizon: f32,
    pub gamma: f32,
    pub lam: f32,
    pub cliprange: f32,
    pub cliprange_value: f32,
    pub vf_coef: f32,
    pub kl_penalty: KlPenalty,
    pub whiten_rewards: bool,
    /// Skip a minibatch's update when its mean ratio exceeds this.
    pub ratio_threshold: f32,
    /// Stop the epochs of a step once policykl > 1.5 target_kl.
    pub early_stopping: bool,
    pub target_kl: f32,
    /// Clip the gradients' global norm (None: no clipping, trl's default).
    pub max_grad_norm: Option<f32>,
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

impl PpoConfig {
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        if self.batch_size == 0
            || self.mini_batch_size == 0
            || self.gradient_accumulation_steps == 0
        {
            return fail(
                "batch_size, mini_batch_size and gradient_accumulation_steps must be >= 1".into(),
            );
        }
        let backward = self.mini_batch_size * self.gradient_accumulation_steps;
        if !self.batch_size.is_multiple_of(backward) {
            return fail(format!(
                "batch_size {} must be a multiple of mini_batch_size * gradient_accumulation_steps = {backward} (as trl requires)",
                self.batch_size
            ));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return fail(format!(
                "learning_rate must be positive, got {}",
                self.learning_rate
            ));
        }
        if self.ppo_epochs == 0 {
            return fail("ppo_epochs must be >= 1".into());
        }
        if self.adap_kl_ctrl && !(self.target > 0.0 && self.horizon > 0.0) {
            return fail("the adaptive KL controller needs target > 0 and horizon > 0".into());
        }
        Ok(())
    }

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
