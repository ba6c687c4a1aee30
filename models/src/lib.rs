//! lathe-models: causal language models, one file per architecture, and everything that
//! loads, converts, plans and runs them.
//!
//! - [`arch`]: the two traits an architecture implements, `ArchConfig` (its config.json:
//!   sizes, rope keys, default LoRA targets, planning shapes, `build`) and `Architecture`
//!   (the built model: hidden states, LM head, linears under HF names, named weights,
//!   checkpointing switch). [`config::ModelConfig`] and [`hf::CausalLm`] hold one `dyn` of
//!   each; [`config::ARCHITECTURES`] registers each `model_type`.
//! - The architectures: [`gpt_neox`] (the seed's), [`llama`] (SmolLM2), [`qwen2`] (Qwen2 and
//!   Qwen2.5: Llama's block with q/k/v biases). They share [`attention`] (per-row positions
//!   and key ranges for padded batches, GQA) and the block loop (`blocks.rs`: plain, or
//!   checkpointed per block); every projection is a [`linear::Linear`] (dense f32/f16,
//!   LLM.int8, LoRA over either), so int8, f16 and LoRA never touch a model file.
//! - [`config`]: configs as transformers writes them (4.46 and 5.x layouts), with the rule
//!   that a key changing the math is implemented or refused.
//! - [`weights`]: the weight store, tensors read one at a time from safetensors shards and
//!   built at once in their final form (int8 quantized a row at a time from the file's
//!   bytes; bitsandbytes 8-bit checkpoints loaded as stored); [`hf`]: HF directories as a
//!   `CausalLm` (load, convert, save); [`gguf`] and [`gguf_model`]: Llama from GGUF;
//!   [`pretrained`]: "the model the user named".
//! - [`plan`]: a job's peak memory by category from a config alone.
//! - [`lora`]: peft adapters on a model (add, load, save, merge, count); [`logprobs`];
//!   [`generate`], [`sampling`], [`sampling_gpu`]: batched generation with a seeded sampler
//!   on the host or the device; [`kv_cache`]; [`tokenizer`]; [`value_head`] (trl's).
//!
//! Invariants: model files import the weight store, never the loader; a model never holds a
//! second copy of a weight (quantization and LoRA swap the `Linear`); every tensor a model
//! takes is shape-checked against its config with an error naming the file and tensor.
//!
//! Loading a model (a HF directory or a GGUF file; here a tiny random Llama GGUF from the
//! tests), generating greedily, then putting LoRA adapters on it:
//!
//! ```
//! use lathe_core::Device;
//! use lathe_lora::{AdapterSwitch, LoraConfig};
//! use lathe_models::generate::{generate, GenerateConfig};
//! use lathe_models::pretrained::{Precision, Pretrained};
//! use lathe_models::sampling::SamplingConfig;
//!
//! let device = Device::Cpu;
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf_model_tied.gguf");
//! let mut pretrained = Pretrained::load(path.as_ref(), &device, Precision::F32)?;
//! let tokenizer = &pretrained.tokenizer;
//! let prompts = tokenizer.encode_batch(&["The film was", "I"], false)?;
//! let config = GenerateConfig {
//!     max_new_tokens: 8,
//!     eos_token_id: None, // always 8 new tokens
//!     pad_token_id: tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0),
//!     sampling: SamplingConfig::greedy(),
//!     ..GenerateConfig::default()
//! };
//! let new_tokens = generate(&pretrained.model, &prompts, &config, &device)?;
//! assert_eq!(new_tokens.len(), 2);
//! assert!(new_tokens.iter().all(|row| row.len() == 8));
//! let _text = tokenizer.decode(&new_tokens[0], true)?;
//!
//! let switch = AdapterSwitch::new();
//! pretrained.model.add_lora(&LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]), &switch, 0)?;
//! # Ok::<(), lathe_models::Error>(())
//! ```
#![warn(missing_docs)]

pub mod arch;
pub mod attention;
mod blocks;
pub mod chat;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod gguf_model;
pub mod gpt_neox;
pub mod hf;
pub mod hub_cache;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod logprobs;
pub mod lora;
pub mod plan;
pub mod pretrained;
pub mod qwen2;
pub mod sampling;
pub mod sampling_gpu;
pub mod tokenizer;
pub mod value_head;
pub mod weights;

/// Errors of lathe-models. Each names the file (and tensor) it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A model file that cannot be read or parsed.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A tensor of a weights file that is missing, of the wrong shape or dtype.
    #[error("{path}: tensor {tensor}: {detail}")]
    Tensor {
        /// The weights file.
        path: String,
        /// The tensor's name in it.
        tensor: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A config value, setting or input out of its range; the message names it.
    #[error("{0}")]
    Config(String),
    /// A tokenizer file that cannot be read, or text it cannot encode or decode.
    #[error("tokenizer {path}: {detail}")]
    Tokenizer {
        /// The tokenizer's file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// A chat template that does not parse or render, or a conversation it refuses.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A tensor or device error from lathe-core.
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
    /// An int8 quantization error from lathe-quant.
    #[error(transparent)]
    Quant(#[from] lathe_quant::Error),
    /// An adapter error from lathe-lora.
    #[error(transparent)]
    Lora(#[from] lathe_lora::Error),
}

/// The result of every fallible function of lathe-models.
pub type Result<T> = std::result::Result<T, Error>;
