//! lathe-ppo: PPO in the formulation of trl's classic `PPOTrainer` (0.4 … 0.11.4), the
//! seed's step 3.
//!
//! - [`math`]: trl.core's masked statistics, the KL-penalised per-token rewards, GAE and the
//!   KL controllers, on host values.
//! - [`loss`]: the clipped policy and value losses of a minibatch, as tensors.
//! - [`trainer`]: `PpoTrainer::step` — rollout log-probs and values, reference log-probs from
//!   the same model with adapters off, rewards, advantages, PPO epochs over shuffled
//!   minibatches, the KL controller update, every statistic trl logs.
//! - [`rollout`]: queries and responses as the seed samples them, and the [`rollout::Reward`]
//!   trait through which any scorer plugs in (a closure is one).
//! - [`grpo`]: GRPO as trl's `GRPOTrainer`: group-relative advantages and its loss
//!   variants, on the same LoRA policy whose reference is its adapters off.
//! - [`run`]: [`PpoRun`], the trainer in a run folder (lathe-train's): queries drawn from
//!   texts, responses sampled and scored, metrics, samples, checkpoints, exact resume.
//!
//! This crate knows nothing of a particular reward model.

pub mod config;
pub mod grpo;
pub mod loss;
pub mod math;
pub mod rollout;
pub mod run;
pub mod trainer;

pub use config::PpoConfig;
pub use rollout::Reward;
pub use run::{PpoFile, PpoRun, PpoSummary, RunSettings};
pub use trainer::{PpoTrainer, StepStats};

/// Errors of lathe-ppo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("PPO config: {0}")]
    Config(String),
    #[error("PPO: {0}")]
    Shape(String),
    /// A non-finite loss, gradient norm or parameter: training stopped.
    #[error("PPO diverged: {0}")]
    Diverged(String),
    #[error("reward: {0}")]
    Reward(String),
    /// GRPO settings (or inputs) it cannot run on.
    #[error("GRPO config: {0}")]
    GrpoConfig(String),
    /// A non-finite GRPO loss, gradient norm or parameter: training stopped.
    #[error("GRPO diverged: {0}")]
    GrpoDiverged(String),
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
    #[error(transparent)]
    Models(#[from] lathe_models::Error),
    #[error(transparent)]
    Lora(#[from] lathe_lora::Error),
    /// The run folder: its files, checkpoints and resume checks.
    #[error(transparent)]
    Train(#[from] lathe_train::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Train(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
