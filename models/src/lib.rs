//! lathe-models: GPT-NeoX (the seed's architecture) and Llama (SmolLM2), one file each;
//! configs from HF `config.json` or GGUF metadata; weights from HF safetensors (single or
//! sharded) and GGUF; tokenizers; KV cache and batched generation.

pub mod arch;
pub mod attention;
mod blocks;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod gguf_model;
pub mod gpt_neox;
pub mod hf;
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
pub enum Error {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("{path}: tensor {tensor}: {detail}")]
    Tensor {
        path: String,
        tensor: String,
        detail: String,
    },
    #[error("{0}")]
    Config(String),
    #[error("tokenizer {path}: {detail}")]
    Tokenizer { path: String, detail: String },
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
    #[error(transparent)]
    Quant(#[from] lathe_quant::Error),
    #[error(transparent)]
    Lora(#[from] lathe_lora::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
