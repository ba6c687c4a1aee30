//! lathe-train: training as a library.
//!
//! - [`sft`]: supervised LoRA fine-tuning: [`sft::pack`] cuts texts into blocks,
//!   [`sft::block_loss`] is the causal-LM loss of a batch, [`sft::SftTrainer::step`] one
//!   optimizer step (forward and loss, backward, clip, schedule, AdamW update), and
//!   [`sft::SftRun`] the same trainer in a run folder (metrics.jsonl, checkpoints, resume,
//!   the final adapter).
//! - [`dpo`]: Direct Preference Optimization as trl's `DPOTrainer` (sigmoid, IPO, hinge and
//!   robust losses; the reference is the model with its adapters off): [`dpo::DpoTrainer`]
//!   and [`dpo::DpoRun`], the same loop in a run folder.
//! - [`run_dir`]: the files a training run keeps in its folder (JSONL logs, optimizer
//!   moments, checkpoint folders swapped in by rename, trainer states), shared by SFT and PPO.
//! - `mpi` (feature `mpi`): `Mpi`, the [`lathe_core::Collective`] of a job started by
//!   `mpirun`; [`sft::SftRun::open_data_parallel`] trains on it.
//! - [`resume`]: fingerprints of a run's inputs and the check a resumed checkpoint must pass.
//!
//! A few steps of SFT on a tiny model, with no command-line crate involved:
//!
//! ```
//! use lathe_core::Device;
//! use lathe_models::pretrained::{Precision, Pretrained};
//! use lathe_train::sft::{pack, SftConfig, SftTrainer};
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tests/fixtures/gguf_model_tied.gguf");
//! let mut pretrained = Pretrained::load(dir.as_ref(), &Device::Cpu, Precision::F32)?;
//! let texts: Vec<String> = (0..40)
//!     .map(|i| format!("the film was great and the cast was fine {}", i % 3))
//!     .collect();
//! let config = SftConfig {
//!     block_size: 16,
//!     batch_size: 4,
//!     max_steps: Some(12),
//!     lr: 1e-2,
//!     lora_r: 4,
//!     target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
//!     eval_fraction: 0.0,
//!     ..SftConfig::default()
//! };
//! let blocks = pack(&texts, &pretrained.tokenizer, config.block_size, config.eval_fraction)?;
//! let mut trainer = SftTrainer::new(&mut pretrained.model, &blocks, &config, &Device::Cpu)?;
//! let mut losses = Vec::new();
//! while !trainer.done() {
//!     losses.push(trainer.step()?.loss);
//! }
//! assert_eq!(losses.len(), 12);
//! let (head, tail) = (losses[..3].iter().sum::<f32>(), losses[9..].iter().sum::<f32>());
//! assert!(tail < 0.9 * head, "loss {losses:?}");
//! # Ok::<(), lathe_train::Error>(())
//! ```
#![warn(missing_docs)]

pub mod dpo;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod resume;
pub mod run_dir;
pub mod sft;

/// Errors of lathe-train. Messages name the file, the checkpoint or the setting; a
/// `Context` or `Io` error names what was being done and keeps its cause as its source, so
/// `{:#}` through anyhow reads "what: why".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting out of its range, data that does not fit the settings, a checkpoint that
    /// does not belong to the run: the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// A training step produced NaN/inf; nothing of that step was saved.
    #[error(
        "step {step}: {what}; stopping without saving this step (the last checkpoint and \
         adapter are kept). The learning rate ({lr:e} at this step) is likely too high, or a \
         setting is NaN/inf"
    )]
    Diverged {
        /// The step that diverged (1-based).
        step: usize,
        /// What was not finite ("the loss is NaN", the gradient norm, a parameter).
        what: String,
        /// The learning rate of that step.
        lr: f32,
    },
    /// An I/O failure while doing `context` ("reading FILE", "creating DIR").
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file that does not parse, while doing `context`.
    #[error("{context}")]
    Json {
        /// What was being done.
        context: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// `source` while doing `context`.
    #[error("{context}")]
    Context {
        /// What was being done.
        context: String,
        /// The error it failed with.
        #[source]
        source: Box<Error>,
    },
    /// An I/O error with no context added.
    #[error(transparent)]
    PlainIo(#[from] std::io::Error),
    /// A JSON error with no context added.
    #[error(transparent)]
    PlainJson(#[from] serde_json::Error),
    /// A tensor, device or checkpoint-file error from lathe-core.
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
    /// An adapter error from lathe-lora (bad rank, target module not found).
    #[error(transparent)]
    Lora(#[from] lathe_lora::Error),
    /// A model, tokenizer or chat-template error from lathe-models.
    #[error(transparent)]
    Models(#[from] lathe_models::Error),
    /// An error of a caller's code run inside a library function (what a checkpoint folder
    /// is filled with).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// The result of every fallible function of lathe-train.
pub type Result<T> = std::result::Result<T, Error>;

/// An error and its causes, "what: why: ..." (anyhow's `{:#}`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `bail!` for [`Error::Invalid`].
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err($crate::Error::Invalid(format!($($arg)*)))
    };
}
pub(crate) use invalid;

/// Adds what was being done to an error (anyhow's `with_context`, for [`Error`]).
pub(crate) trait Context<T> {
    fn context_with(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context_with(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, serde_json::Error> {
    fn context_with(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Json {
            context: what(),
            source,
        })
    }
}

impl<T> Context<T> for Result<T> {
    fn context_with(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Context {
            context: what(),
            source: Box::new(source),
        })
    }
}
