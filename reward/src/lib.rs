//! lathe-reward: sentiment reward models for RLHF.
//!
//! - [`encoder`]: BERT and DistilBERT encoders loaded from HF directories (post-LN blocks,
//!   right-padded batches with per-row key ranges, no causal mask).
//! - [`head`]: classification heads: DistilBERT's `pre_classifier -> ReLU -> classifier` on
//!   the first token, and lathe's own linear head on mean-pooled or first-token states.
//! - [`model`]: [`RewardModel`], texts in, one f32 each (the raw logit of the reward label,
//!   no softmax, as the seed's `pipeline(function_to_apply="none")`), batched with padding
//!   on CPU or GPU; and the [`Reward`] trait PPO takes rewards through.
//! - [`train`]: training a reward model (head only, or LoRA on the encoder too) on labelled
//!   text, with a held-out split, per-epoch loss/accuracy and early stopping; [`data`] reads
//!   the labelled text through lathe-data (JSON / JSONL, Parquet, Arrow IPC such as HF
//!   datasets' files);
//!   [`run`] is that training as a run: trained, measured on test files, written to a
//!   folder whole with its metrics.jsonl and train_report.json.
//!
//! The directory [`RewardModel::save`] writes (documented in the crate README) is a HF
//! encoder directory plus a `classifier` and a `lathe_reward` section in `config.json`.
//!
//! Scoring texts with a reward model (here a tiny random DistilBERT from the tests):
//!
//! ```
//! use lathe_core::Device;
//! use lathe_reward::{Reward, RewardModel};
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny_distilbert");
//! let model = RewardModel::load(dir, &Device::Cpu)?;
//! assert_eq!(model.reward_label(), "POSITIVE");
//! let texts = vec!["What a wonderful film".to_string(), "Dull and far too long".to_string()];
//! let rewards: Vec<f32> = model.score(&texts)?; // one raw logit per text
//! assert_eq!(rewards.len(), 2);
//! # Ok::<(), lathe_reward::Error>(())
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod encoder;
pub mod head;
pub mod model;
pub mod plan;
pub mod run;
pub mod train;

pub use config::{Architecture, EncoderConfig, Pooling};
pub use data::Example;
pub use model::{LoadOptions, RewardModel};
pub use train::{EpochStats, LoraSettings, TrainConfig, TrainReport};

/// Errors of lathe-reward; each names the file, record or setting it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting or config value out of its range; the message names it.
    #[error("{0}")]
    Config(String),
    /// A model or data file that cannot be read or does not fit (a non-binary label).
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Reading labelled data (lathe-data names the file and the record).
    #[error(transparent)]
    Read(#[from] lathe_data::DataError),
    /// A tensor or device error from lathe-core.
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
    /// A weights, tokenizer or config error from lathe-models.
    #[error(transparent)]
    Models(#[from] lathe_models::Error),
    /// An adapter error from lathe-lora.
    #[error(transparent)]
    Lora(#[from] lathe_lora::Error),
    /// Writing the run's folder.
    #[error(transparent)]
    Train(#[from] lathe_train::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Train(e.into())
    }
}

/// The result of every fallible function of lathe-reward.
pub type Result<T> = std::result::Result<T, Error>;

/// Anything that scores texts: one reward per text, higher is better. PPO takes its rewards
/// through this trait, so a reward model, a rule or a remote service are interchangeable.
/// [`RewardModel`] implements it with the raw logit of its reward label.
pub trait Reward {
    /// One score per text, in order. Texts may be empty.
    fn score(&self, texts: &[String]) -> Result<Vec<f32>>;
}

/// The README's examples run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
