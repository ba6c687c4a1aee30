//! What an architecture implements: [`ArchConfig`] for its config.json, [`Architecture`] for
//! the built model. Everything else in lathe (loading, int8/f16 conversion, LoRA, generation,
//! planning, saving, the CLI's defaults) works through these two traits: [`ModelConfig`] holds
//! a `dyn ArchConfig`, [`crate::hf::CausalLm`] a `dyn Architecture`. So a new architecture is
//! its model file (config struct, both impls, a [`crate::config::Registration`]) plus two
//! lines: `pub mod` in lib.rs and its registration in [`crate::config::ARCHITECTURES`]. The
//! model files import the weight store ([`crate::weights`]), never the loader (`hf.rs`).

use std::any::Any;

use lathe_core::Tensor;
use serde_json::{Map, Value};

use crate::attention::TokenLayout;
use crate::config::{BnbInt8Config, ModelConfig};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::plan::{Dims, LinearShape};
use crate::weights::Weights;
use crate::Result;

/// An architecture's config.json, as read (see `config.rs` for the rules on keys).
pub trait ArchConfig: Any + std::fmt::Debug + Send + Sync {
    /// config.json's `model_type`.
    fn model_type(&self) -> &'static str;
    /// Checks every value a model needs to be built.
    fn validate(&self) -> Result<()>;
    /// Rows of the embedding matrix (token ids are below this).
    fn vocab_size(&self) -> usize;
    /// Width of the hidden states.
    fn hidden_size(&self) -> usize;
    /// Number of transformer blocks.
    fn num_hidden_layers(&self) -> usize;
    /// The longest sequence the model's positions cover.
    fn max_position_embeddings(&self) -> usize;
    /// The beginning-of-sequence id, when the config names one.
    fn bos_token_id(&self) -> Option<u32>;
    /// Every end-of-sequence id (empty when the config names none).
    fn eos_token_ids(&self) -> Vec<u32>;
    /// The keys serde did not map to a field (kept to write them back).
    fn extra(&self) -> &Map<String, Value>;
    /// Keys lathe does not know (sorted; `rope_parameters.` keys prefixed).
    fn unknown_keys(&self) -> Vec<String>;
    /// The rotary settings lathe uses, as (4.46's top-level key, 5.x's `rope_parameters`
    /// key, value), so that a config written back says the same to both versions.
    fn rope_keys(&self) -> Vec<(&'static str, &'static str, f64)>;
    /// The config as a JSON object (without `model_type`).
    fn to_value(&self) -> serde_json::Result<Value>;
    /// peft `target_modules` lathe's commands adapt when none are given.
    fn default_lora_targets(&self) -> &'static [&'static str];
    /// The linear layers of one transformer block, for memory planning.
    fn block_linears(&self) -> Vec<LinearShape>;
    /// The other shape facts memory planning needs.
    fn plan_dims(&self) -> Dims;
    /// Builds the model from HF-named weights (taken out of `weights`), on their device.
    fn build(&self, weights: &mut Weights) -> Result<Box<dyn Architecture>>;
    /// The bitsandbytes 8-bit quantization of the checkpoint, `None` for a plain one.
    fn bnb_int8(&self) -> Result<Option<BnbInt8Config>> {
        BnbInt8Config::from_extra(self.model_type(), self.extra())
    }
}

/// The [`ArchConfig`] getters of a config struct with transformers' standard field names
/// (`vocab_size`, `hidden_size`, `num_hidden_layers`, `max_position_embeddings`,
/// `bos_token_id`, `eos_token_id: Option<TokenIds>`, `extra`), written once for every
/// architecture: `impl ArchConfig for C { standard_config_fields!(); ... }`.
#[macro_export]
macro_rules! standard_config_fields {
    () => {
        fn vocab_size(&self) -> usize {
            self.vocab_size
        }
        fn hidden_size(&self) -> usize {
            self.hidden_size
        }
        fn num_hidden_layers(&self) -> usize {
            self.num_hidden_layers
        }
        fn max_position_embeddings(&self) -> usize {
            self.max_position_embeddings
        }
        fn bos_token_id(&self) -> Option<u32> {
            self.bos_token_id
        }
        fn eos_token_ids(&self) -> Vec<u32> {
            self.eos_token_id
                .as_ref()
                .map($crate::config::TokenIds::ids)
                .unwrap_or_default()
        }
        fn extra(&self) -> &serde_json::Map<String, serde_json::Value> {
            &self.extra
        }
    };
}

/// A built causal language model of one architecture.
pub trait Architecture: Any + Send + Sync {
    /// Its config.
    fn arch_config(&self) -> &dyn ArchConfig;
    /// Its config as a [`ModelConfig`] (a copy).
    fn model_config(&self) -> ModelConfig;
    /// The last hidden state (B, T, H) of token ids u32 (B, T) laid out by `layout`, after
    /// the final norm (transformers' `hidden_states[-1]`). With a cache, the ids follow the
    /// cached tokens and their keys and values are appended to it.
    fn forward_hidden(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;
    /// The LM head (V, H).
    fn head(&self) -> &Linear;
    /// The token embedding (V, H) and the LM head, for converting both (a tied head shares
    /// the embedding's storage).
    fn embedding_and_head(&mut self) -> (&mut Tensor, &mut Linear);
    /// Every linear layer of the blocks under its HF module name.
    fn linears(&self) -> Vec<(String, &Linear)>;
    /// The same, mutable (for swapping a layer's form: LoRA, int8, f16).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;
    /// Every weight under its HF name (tied weights once, as transformers saves them).
    fn named_weights(&self) -> Result<Vec<(String, Tensor)>>;
    /// Recompute each block in the backward instead of keeping its activations.
    fn set_gradient_checkpointing(&mut self, on: bool);
    /// Ids at or above this are never sampled (`None`: the whole vocabulary).
    fn sample_vocab(&self) -> Option<usize>;
    /// Sets the bound [`sample_vocab`](Self::sample_vocab) returns.
    fn set_sample_vocab(&mut self, ids: Option<usize>);
}
