//! How `lathe ppo --reward DIR` turns a reward-model directory into a [`lathe_ppo::Reward`]:
//! lathe-ppo knows no reward model, lathe-reward no PPO; the binary joins them.

use std::path::Path;

use anyhow::{Context, Result};
use lathe_core::Device;
use lathe_reward::RewardModel;

/// A [`RewardModel`] as PPO's reward: the raw logit of its reward label per text.
pub struct ModelReward(pub RewardModel);

impl lathe_ppo::Reward for ModelReward {
    fn score(&mut self, texts: &[String]) -> lathe_ppo::Result<Vec<f32>> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.0
            .score_texts(&refs)
            .map_err(|e| lathe_ppo::Error::Reward(e.to_string()))
    }
}

/// Loads `dir` (`lathe reward-train`'s output, or a DistilBERT sequence classifier) onto
/// `device`.
pub fn load_reward(dir: &Path, device: &Device) -> Result<Box<dyn lathe_ppo::Reward>> {
    let model = RewardModel::load(dir, device)
        .with_context(|| format!("loading the reward model {}", dir.display()))?;
    eprintln!(
        "reward: {} (label {:?} of {:?})",
        dir.display(),
        model.reward_label(),
        model.labels()
    );
    Ok(Box::new(ModelReward(model)))
}
