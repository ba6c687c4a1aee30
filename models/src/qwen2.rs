//! Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`, model_type "qwen2").
//!
//! Matches transformers 5.x `modeling_qwen2.py` (and 4.46's, which computes the same): a
//! Llama block (RMSNorm, grouped-query attention with rotary over the whole head, SwiGLU
//! MLP, sequential residuals) whose q, k and v projections have biases and whose o_proj and
//! MLP have none; tied embeddings in the small sizes. So the model is lathe's Llama built
//! with those biases, under Qwen2's own config.
//!
//! Tensor names (HF) as Llama's: `model.embed_tokens.weight`, under `model.layers.{i}.`
//! `self_attn.{q,k,v}_proj.{weight,bias}`, `self_attn.o_proj.weight`,
//! `mlp.{gate,up,down}_proj.weight`, `{input,post_attention}_layernorm.weight`;
//! `model.norm.weight`, `lm_head.weight` (absent when tied).
//!
//! Sliding-window attention (`use_sliding_window`, `layer_types` with "sliding_attention")
//! is not implemented: a config that turns it on for any layer is refused. Qwen2.5's
//! released configs ship it off.

use lathe_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::arch::{ArchConfig, Architecture};
use crate::attention::TokenLayout;
use crate::config::{LlamaConfig, ModelConfig, Registration, TokenIds};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::llama::{llama_block_linears, Llama};
use crate::plan::{Dims, LinearShape};
use crate::weights::Weights;
use crate::{Error, Result};

/// q, k, v with biases, o without.
pub(crate) const BIASES: [bool; 4] = [true, true, true, false];

/// Qwen2's config.json (transformers `Qwen2Config`), defaults as transformers'.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Qwen2Config {
    /// Rows of the embedding matrix (token ids are below this).
    #[serde(default = "Qwen2Config::default_vocab_size")]
    pub vocab_size: usize,
    /// Width of the hidden states.
    #[serde(default = "Qwen2Config::default_hidden_size")]
    pub hidden_size: usize,
    /// Width of the gated MLP's inner layer.
    #[serde(default = "Qwen2Config::default_intermediate_size")]
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    #[serde(default = "Qwen2Config::default_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "Qwen2Config::default_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); `None`: as many as the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// The MLP's activation (default "silu").
    #[serde(default = "Qwen2Config::default_hidden_act")]
    pub hidden_act: String,
    /// The longest sequence the model's positions cover.
    #[serde(default = "Qwen2Config::default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// RMSNorm's epsilon.
    #[serde(default = "Qwen2Config::default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// The output head shares the embedding matrix (default false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// 4.46's rotary base; 5.x writes it in `rope_parameters` (copied here when absent).
    #[serde(default = "Qwen2Config::default_rope_theta")]
    pub rope_theta: f64,
    /// transformers 4.46's scaled-RoPE settings: only `null` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// transformers 5.x's rotary settings, as read (`rope_type` "default" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// Sliding-window attention: refused when on for any layer.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// The sliding window's width in tokens (read, not implemented).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Layers from this index on would slide (4.46's rule); `None`: 28, as transformers.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// 5.x's attention kind per layer: only "full_attention" is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// The beginning-of-sequence id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence id or ids.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Every other key of config.json, kept for writing it back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Qwen2Config {
    fn default_vocab_size() -> usize {
        151936
    }
    fn default_hidden_size() -> usize {
        4096
    }
    fn default_intermediate_size() -> usize {
        22016
    }
    fn default_layers() -> usize {
        32
    }
    fn default_heads() -> usize {
        32
    }
    fn default_hidden_act() -> String {
        "silu".into()
    }
    fn default_max_position_embeddings() -> usize {
        32768
    }
    fn default_rms_norm_eps() -> f64 {
        1e-6
    }
    fn default_rope_theta() -> f64 {
        10000.0
    }

    /// The Llama config the model is built from: the same sizes and settings (the biases
    /// are Qwen2's, passed apart); `extra` carries `model_type` "qwen2", so the checks the
    /// two share name this architecture.
    pub(crate) fn as_llama(&self) -> LlamaConfig {
        LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            intermediate_size: self.intermediate_size,
            head_dim: None,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            hidden_act: self.hidden_act.clone(),
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.clone(),
            rope_scaling: self.rope_scaling.clone(),
            rope_parameters: self.rope_parameters.clone(),
            extra: self.extra.clone(),
        }
    }

    /// The indices of the layers that would use sliding-window attention.
    fn sliding_layers(&self) -> Vec<usize> {
        match &self.layer_types {
            Some(types) => (0..types.len())
                .filter(|&i| types[i] != "full_attention")
                .collect(),
            None if self.use_sliding_window => {
                (self.max_window_layers.unwrap_or(28)..self.num_hidden_layers).collect()
            }
            None => Vec::new(),
        }
    }
}

/// config.json's `qwen2`: 4.46's `rope_theta` filled from 5.x's `rope_parameters`.
pub const REGISTRATION: Registration = Registration {
    model_type: "qwen2",
    rope_keys: &[("rope_theta", "rope_theta")],
    parse: |value| serde_json::from_value::<Qwen2Config>(value).map(ModelConfig::new),
};

impl ArchConfig for Qwen2Config {
    fn model_type(&self) -> &'static str {
        "qwen2"
    }
    /// Llama's checks (sizes, heads, RMSNorm eps, plain RoPE, silu), then Qwen2's own:
    /// `layer_types` one per layer, and no layer with sliding-window attention.
    fn validate(&self) -> Result<()> {
        self.as_llama().validate()?;
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(Error::Config(format!(
                    "qwen2: layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                )));
            }
        }
        let sliding = self.sliding_layers();
        if let Some(first) = sliding.first() {
            return Err(Error::Config(format!(
                "qwen2: sliding-window attention (window {:?}) on {} layer(s) from layer {first} \
                 is not supported; lathe's Qwen2 attends to every earlier token (set \
                 use_sliding_window false / every layer_types entry \"full_attention\")",
                self.sliding_window,
                sliding.len()
            )));
        }
        for key in ["attention_bias", "mlp_bias"] {
            if self
                .extra
                .get(key)
                .is_some_and(|v| v != &Value::Bool(false))
            {
                return Err(Error::Config(format!(
                    "qwen2: {key} is not a Qwen2 setting (its q/k/v biases are always on, \
                     o_proj and the MLP have none)"
                )));
            }
        }
        Ok(())
    }
    crate::standard_config_fields!();
    fn unknown_keys(&self) -> Vec<String> {
        self.as_llama().unknown_keys()
    }
    fn rope_keys(&self) -> Vec<(&'static str, &'static str, f64)> {
        vec![("rope_theta", "rope_theta", self.rope_theta)]
    }
    fn to_value(&self) -> serde_json::Result<Value> {
        serde_json::to_value(self)
    }
    fn default_lora_targets(&self) -> &'static [&'static str] {
        &["q_proj", "v_proj"]
    }
    fn block_linears(&self) -> Vec<LinearShape> {
        llama_block_linears(&self.as_llama(), BIASES, false)
    }
    fn plan_dims(&self) -> Dims {
        self.as_llama().plan_dims()
    }
    fn build(&self, weights: &mut Weights) -> Result<Box<dyn Architecture>> {
        Ok(Box::new(Qwen2::from_weights(self.clone(), weights)?))
    }
}

/// Qwen2 for causal language modelling: lathe's Llama with Qwen2's biases and config.
#[derive(Clone, Debug)]
pub struct Qwen2 {
    /// Boxed: `CausalLm`'s variants stay the size of a Llama.
    config: Box<Qwen2Config>,
    /// The network: a Llama with biases on q, k and v.
    pub model: Llama,
}

impl Qwen2 {
    /// Builds the model from HF-named weights (taken out of `weights`), on their device.
    pub fn from_weights(config: Qwen2Config, weights: &mut Weights) -> Result<Qwen2> {
        config.validate()?;
        let model = Llama::with_biases(config.as_llama(), BIASES, weights)?;
        Ok(Qwen2 {
            config: Box::new(config),
            model,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Qwen2Config {
        &self.config
    }
}

impl Architecture for Qwen2 {
    fn arch_config(&self) -> &dyn ArchConfig {
        &*self.config
    }
    fn model_config(&self) -> ModelConfig {
        ModelConfig::new((*self.config).clone())
    }
    fn forward_hidden(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.model.forward_hidden(ids, layout, cache)
    }
    fn head(&self) -> &Linear {
        self.model.head()
    }
    fn embedding_and_head(&mut self) -> (&mut Tensor, &mut Linear) {
        self.model.embedding_and_head()
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        self.model.linears()
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.model.linears_mut()
    }
    fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.model.named_weights()
    }
    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.model.gradient_checkpointing = on;
    }
    fn sample_vocab(&self) -> Option<usize> {
        self.model.sample_vocab
    }
    fn set_sample_vocab(&mut self, ids: Option<usize>) {
        self.model.sample_vocab = ids;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../tests/fixtures/models/qwen2_tiny/config.json");

    fn with(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ModelConfig> {
        let mut value: Value = serde_json::from_str(TINY).unwrap();
        edit(value.as_object_mut().unwrap());
        ModelConfig::from_json_str(&value.to_string(), "config.json")
    }

    #[test]
    fn transformers_5_config_reads_with_its_rope_parameters() {
        let config = with(|_| {}).unwrap();
        let c = config
            .downcast_ref::<Qwen2Config>()
            .expect("a qwen2 config");
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.num_key_value_heads, Some(2));
        assert!(c.tie_word_embeddings);
        let biased: Vec<_> = c.block_linears().iter().map(|l| (l.name, l.bias)).collect();
        assert_eq!(
            biased[..4],
            [
                ("q_proj", true),
                ("k_proj", true),
                ("v_proj", true),
                ("o_proj", false)
            ]
        );
    }

    #[test]
    fn sliding_window_and_foreign_settings_are_refused() {
        let cases: [(&str, Value, &str); 5] = [
            ("use_sliding_window", Value::Bool(true), "layer_types"),
            ("use_sliding_window", Value::Bool(true), "sliding-window"),
            (
                "layer_types",
                serde_json::json!(["full_attention"]),
                "1 entries for 2 layers",
            ),
            ("attention_bias", Value::Bool(true), "not a Qwen2 setting"),
            ("rope_theta", serde_json::json!(10000.0), "disagrees"),
        ];
        for (i, (key, value, expected)) in cases.into_iter().enumerate() {
            let err = with(|m| {
                m.insert(key.into(), value.clone());
                if i == 1 {
                    // 4.46's form: no layer_types, layers from max_window_layers slide.
                    m.remove("layer_types");
                    m.insert("max_window_layers".into(), serde_json::json!(1));
                }
                if i == 0 {
                    m.insert(
                        "layer_types".into(),
                        serde_json::json!(["full_attention", "sliding_attention"]),
                    );
                }
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(expected), "{key}: {err}");
        }
    }
}
