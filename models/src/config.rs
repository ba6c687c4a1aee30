//! Model configurations read from a HF `config.json`.
//!
//! The fields are the ones transformers' `GPTNeoXConfig` and `LlamaConfig` use, under the same
//! names and with the same defaults, so a config written by `save_pretrained` reads as it is.
//! Fields lathe does not use (dropouts, initializer ranges, `architectures`, ...) are kept in
//! `extra`, so a config read and written back loses nothing. Values lathe cannot honour
//! (an unknown activation, RoPE scaling) are errors at load time, not surprises later.

use std::path::Path;

use lathe_core::ops::unary::GeluKind;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// A token id or a list of them: Llama 3 style configs list several end-of-sequence ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// Every id, in order.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Reads `null` as `None` for a field that has a non-null default in transformers.
fn nullable<'de, D, T>(deserializer: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer)
}

fn default_true() -> bool {
    true
}

/// GPT-NeoX (transformers `GPTNeoXConfig`, model_type "gpt_neox"): Pythia, GPT-NeoX-20B.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GptNeoxConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Fraction of each head's dims that rotate (pythia and 20B: 0.25).
    #[serde(default = "GptNeoxConfig::default_rotary_pct")]
    pub rotary_pct: f64,
    #[serde(default = "GptNeoxConfig::default_rotary_emb_base")]
    pub rotary_emb_base: f64,
    #[serde(default = "GptNeoxConfig::default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// x + attn(ln1(x)) + mlp(ln2(x)) when true; sequential residuals when false.
    #[serde(default = "default_true")]
    pub use_parallel_residual: bool,
    /// "gelu" (exact erf form) or "gelu_fast" / "gelu_new" (tanh form).
    #[serde(default = "GptNeoxConfig::default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "GptNeoxConfig::default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether query_key_value and dense carry biases (transformers >= 4.41; default true).
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// Every other key of config.json (model_type included), kept for writing it back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl GptNeoxConfig {
    fn default_rotary_pct() -> f64 {
        0.25
    }
    fn default_rotary_emb_base() -> f64 {
        10000.0
    }
    fn default_layer_norm_eps() -> f64 {
        1e-5
    }
    fn default_hidden_act() -> String {
        "gelu".to_string()
    }
    fn default_max_position_embeddings() -> usize {
        2048
    }

    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// int(head_size * rotary_pct), as transformers truncates it.
    pub fn rotary_ndims(&self) -> usize {
        (self.head_size() as f64 * self.rotary_pct) as usize
    }

    /// The GELU form of `hidden_act`.
    pub fn gelu_kind(&self) -> Result<GeluKind> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(GeluKind::Erf),
            "gelu_fast" | "gelu_new" | "gelu_pytorch_tanh" => Ok(GeluKind::Tanh),
            other => Err(Error::Config(format!(
                "gpt_neox: hidden_act {other:?} is not supported (expected \"gelu\", \"gelu_fast\", \"gelu_new\" or \"gelu_pytorch_tanh\")"
            ))),
        }
    }

    /// Checks the values a model needs to be built.
    pub fn validate(&self) -> Result<()> {
        check_sizes(
            "gpt_neox",
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        check_heads("gpt_neox", self.hidden_size, self.num_attention_heads)?;
        if !(self.rotary_pct > 0.0 && self.rotary_pct <= 1.0) {
            return Err(Error::Config(format!(
                "gpt_neox: rotary_pct {} is not in (0, 1]",
                self.rotary_pct
            )));
        }
        let rotary = self.rotary_ndims();
        if rotary == 0 || !rotary.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "gpt_neox: rotary dims int({} * {}) = {rotary} must be even and positive",
                self.head_size(),
                self.rotary_pct
            )));
        }
        check_rope_scaling("gpt_neox", &self.rope_scaling)?;
        self.gelu_kind().map(|_| ())
    }
}

/// Llama (transformers `LlamaConfig`, model_type "llama"): SmolLM2, TinyLlama, Llama 2/3.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: key/value heads shared by groups of query heads. Absent means
    /// as many as the query heads.
    #[serde(default, deserialize_with = "nullable")]
    pub num_key_value_heads: Option<usize>,
    pub intermediate_size: usize,
    /// Per-head dims; absent means hidden_size / num_attention_heads.
    #[serde(default, deserialize_with = "nullable")]
    pub head_dim: Option<usize>,
    #[serde(default = "LlamaConfig::default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "LlamaConfig::default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "LlamaConfig::default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "LlamaConfig::default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// Every other key of config.json (model_type included), kept for writing it back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl LlamaConfig {
    fn default_rope_theta() -> f64 {
        10000.0
    }
    fn default_rms_norm_eps() -> f64 {
        1e-6
    }
    fn default_hidden_act() -> String {
        "silu".to_string()
    }
    fn default_max_position_embeddings() -> usize {
        2048
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks the values a model needs to be built.
    pub fn validate(&self) -> Result<()> {
        check_sizes(
            "llama",
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.kv_heads()),
                ("intermediate_size", self.intermediate_size),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        if self.head_dim.is_none() {
            check_heads("llama", self.hidden_size, self.num_attention_heads)?;
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(Error::Config(format!(
                "llama: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(Error::Config(format!(
                "llama: head_dim {} must be even and positive for rotary embeddings",
                self.head_dim()
            )));
        }
        if self.hidden_act != "silu" {
            return Err(Error::Config(format!(
                "llama: hidden_act {:?} is not supported (expected \"silu\")",
                self.hidden_act
            )));
        }
        check_rope_scaling("llama", &self.rope_scaling)
    }
}

fn check_sizes(arch: &str, sizes: &[(&str, usize)]) -> Result<()> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(Error::Config(format!("{arch}: {name} must be positive"))),
        None => Ok(()),
    }
}

fn check_heads(arch: &str, hidden: usize, heads: usize) -> Result<()> {
    if !hidden.is_multiple_of(heads) {
        return Err(Error::Config(format!(
            "{arch}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )));
    }
    Ok(())
}

/// RoPE scaling changes the rotary frequencies; lathe implements only the plain form.
fn check_rope_scaling(arch: &str, scaling: &Option<Value>) -> Result<()> {
    match scaling {
        None | Some(Value::Null) => Ok(()),
        Some(v) => Err(Error::Config(format!(
            "{arch}: rope_scaling {v} is not supported (only plain rotary embeddings)"
        ))),
    }
}

/// A model configuration, by architecture (`model_type` of config.json).
#[derive(Clone, Debug)]
pub enum ModelConfig {
    GptNeox(GptNeoxConfig),
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Parses config.json text; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<ModelConfig> {
        let file_error = |detail: String| Error::File {
            path: origin.to_string(),
            detail,
        };
        let value: Value =
            serde_json::from_str(text).map_err(|e| file_error(format!("invalid JSON: {e}")))?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| file_error("no \"model_type\" string".to_string()))?
            .to_string();
        let config = match model_type.as_str() {
            "gpt_neox" => serde_json::from_value(value).map(ModelConfig::GptNeox),
            "llama" => serde_json::from_value(value).map(ModelConfig::Llama),
            other => {
                return Err(file_error(format!(
                    "unknown model_type {other:?} (supported: \"gpt_neox\", \"llama\")"
                )))
            }
        }
        .map_err(|e| file_error(format!("{model_type} config: {e}")))?;
        config.validate().map_err(|e| file_error(e.to_string()))?;
        Ok(config)
    }

    /// Reads and parses a config.json file.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::File {
            path: origin.clone(),
            detail: e.to_string(),
        })?;
        ModelConfig::from_json_str(&text, &origin)
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::GptNeox(c) => c.validate(),
            ModelConfig::Llama(c) => c.validate(),
        }
    }

    /// The config.json text (pretty, with `model_type`).
    pub fn to_json_string(&self) -> Result<String> {
        let (mut value, model_type) = match self {
            ModelConfig::GptNeox(c) => (serde_json::to_value(c), "gpt_neox"),
            ModelConfig::Llama(c) => (serde_json::to_value(c), "llama"),
        };
        if let Ok(Value::Object(map)) = &mut value {
            map.insert("model_type".into(), Value::String(model_type.into()));
        }
        value
            .and_then(|v| serde_json::to_string_pretty(&v))
            .map_err(|e| Error::Config(format!("cannot write config.json: {e}")))
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::GptNeox(_) => "gpt_neox",
            ModelConfig::Llama(_) => "llama",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::GptNeox(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::GptNeox(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.hidden_size,
        }
    }

    pub fn num_hidden_layers(&self) -> usize {
        match self {
            ModelConfig::GptNeox(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::GptNeox(c) => c.bos_token_id,
            ModelConfig::Llama(c) => c.bos_token_id,
        }
    }

    /// Every end-of-sequence id (empty when the config names none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let ids = match self {
            ModelConfig::GptNeox(c) => &c.eos_token_id,
            ModelConfig::Llama(c) => &c.eos_token_id,
        };
        ids.as_ref().map(TokenIds::ids).unwrap_or_default()
    }
}
