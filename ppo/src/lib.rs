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
//!
//! One PPO step on a tiny random Llama (from lathe-models' tests): a LoRA policy with a
//! value head, queries cut from texts, sampled responses, scores from a closure (any
//! [`Reward`]), then [`PpoTrainer::step`]:
//!
//! ```
//! use lathe_core::{Device, Rng};
//! use lathe_lora::{AdapterSwitch, LoraConfig};
//! use lathe_models::pretrained::{Precision, Pretrained};
//! use lathe_models::sampling::SamplingConfig;
//! use lathe_models::value_head::ValueHead;
//! use lathe_ppo::rollout::{make_queries, sample_responses, LengthRange};
//! use lathe_ppo::{PpoConfig, PpoTrainer, Reward};
//!
//! let device = Device::Cpu;
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tests/fixtures/gguf_model_tied.gguf");
//! let mut pretrained = Pretrained::load(path.as_ref(), &device, Precision::F32)?;
//! let switch = AdapterSwitch::new();
//! pretrained.model.add_lora(&LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]), &switch, 0)?;
//! let value_head = ValueHead::new(pretrained.model.config().hidden_size(), 0.1, 0, &device)?;
//! let config = PpoConfig { batch_size: 4, mini_batch_size: 2, ..PpoConfig::default() };
//! let tokenizer = pretrained.tokenizer;
//! let pad = tokenizer.eos_id().unwrap_or(0);
//! let mut trainer = PpoTrainer::new(pretrained.model, switch, value_head, config, pad, &device)?;
//! // Longer texts score higher.
//! let mut reward = |texts: &[String]| -> lathe_ppo::Result<Vec<f32>> {
//!     Ok(texts.iter().map(|t| t.len() as f32 / 16.0).collect())
//! };
//!
//! let texts = ["the film was great", "a slow plot", "actors did well", "bad"];
//! let tokenized = texts
//!     .iter()
//!     .map(|t| tokenizer.encode(t, true))
//!     .collect::<lathe_models::Result<Vec<_>>>()?;
//! let drawn: Vec<&[u32]> = tokenized.iter().map(Vec::as_slice).collect();
//! let mut rng = Rng::new(0);
//! let queries = make_queries(&drawn, LengthRange { min: 2, max: 4 }, &mut rng);
//! let responses = sample_responses(
//!     &trainer.model,
//!     &queries,
//!     LengthRange { min: 2, max: 6 },
//!     SamplingConfig::default(),
//!     pad,
//!     0,
//!     &mut rng,
//!     &device,
//! )?;
//! let mut full = Vec::new();
//! for (q, r) in queries.iter().zip(&responses) {
//!     full.push(format!("{}{}", tokenizer.decode(q, true)?, tokenizer.decode(r, true)?));
//! }
//! let scores = reward.score(&full)?;
//! let stats = trainer.step(&queries, &responses, &scores)?;
//! assert!(stats["objective/kl"].is_finite());
//! assert_eq!(trainer.steps_done(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod grpo;
pub mod loss;
pub mod math;
pub mod rollout;
pub mod run;
pub mod trainer;

pub use config::PpoConfig;
pub use rollout::{Prompts, Reward};
pub use run::{PpoFile, PpoRun, PpoSummary, RunSettings};
pub use trainer::{PpoTrainer, StepStats};

/// Errors of lathe-ppo.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// PPO settings out of their range, or inputs that do not fit them.
    #[error("PPO config: {0}")]
    Config(String),
    /// Inputs of the wrong size or value: grids, score counts, a non-finite score.
    #[error("PPO: {0}")]
    Shape(String),
    /// A non-finite loss, gradient norm or parameter: training stopped.
    #[error("PPO diverged: {0}")]
    Diverged(String),
    /// The reward function failed or returned the wrong number of scores.
    #[error("reward: {0}")]
    Reward(String),
    /// GRPO settings (or inputs) it cannot run on.
    #[error("GRPO config: {0}")]
    GrpoConfig(String),
    /// A non-finite GRPO loss, gradient norm or parameter: training stopped.
    #[error("GRPO diverged: {0}")]
    GrpoDiverged(String),
    /// A tensor or device error from lathe-core.
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
    /// A model, tokenizer or generation error from lathe-models.
    #[error(transparent)]
    Models(#[from] lathe_models::Error),
    /// An adapter error from lathe-lora.
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

/// The result of every fallible function of lathe-ppo.
pub type Result<T> = std::result::Result<T, Error>;
