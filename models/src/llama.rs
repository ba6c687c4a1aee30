//! Llama (SmolLM2, TinyLlama, Llama 2/3 without RoPE scaling).
//!
//! Matches transformers 4.46 `modeling_llama.py` (`LlamaForCausalLM`, eager attention).
//! Per layer: RMSNorm -> q/k/v projections (grouped-query: num_key_value_heads key/value
//! heads, each shared by heads / kv_heads query heads) -> rotary on the full head_dim
//! (rope_theta, split-half form) -> causal attention scaled by head_dim^-0.5 -> o_proj;
//! RMSNorm -> down(silu(gate(x)) * up(x)); sequential residuals. Then the final RMSNorm and
//! lm_head (the embedding matrix when tie_word_embeddings).
//!
//! Tensor names (HF): `model.embed_tokens.weight` (V, H); under `model.layers.{i}.`:
//! `input_layernorm.weight`, `post_attention_layernorm.weight` (H,),
//! `self_attn.q_proj.weight` (heads * d, H), `self_attn.{k,v}_proj.weight` (kv_heads * d, H),
//! `self_attn.o_proj.weight` (H, heads * d), `mlp.{gate,up}_proj.weight` (F, H),
//! `mlp.down_proj.weight` (H, F); biases only with attention_bias / mlp_bias;
//! `model.norm.weight` (H,); `lm_head.weight` (V, H), absent when tied.

use lathe_core::ops::rotary::RotaryTables;
use lathe_core::ops::softmax::AttentionMask;
use lathe_core::Tensor;

use crate::arch::{ArchConfig, Architecture};
use crate::attention::{attend, split_heads, TokenLayout};
use crate::blocks::{by_layer, run_blocks, BlockStack};
use crate::config::{LlamaConfig, ModelConfig, Registration};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::plan::{Dims, LinearShape};
use crate::weights::Weights;
use crate::Result;
use serde_json::Value;

/// The HF module names of a block's linears (under `model.layers.{i}.`), in the order of
/// [`LlamaLayer`]'s fields: the one place they are written.
const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One transformer block.
#[derive(Clone, Debug)]
pub struct LlamaLayer {
    /// (H,) RMSNorm weights.
    pub input_layernorm: Tensor,
    /// (H,) RMSNorm weights before the MLP.
    pub post_attention_layernorm: Tensor,
    /// (heads x head_dim, H): the query projection.
    pub q_proj: Linear,
    /// (kv_heads x head_dim, H): the key projection.
    pub k_proj: Linear,
    /// (kv_heads x head_dim, H): the value projection.
    pub v_proj: Linear,
    /// (H, heads x head_dim): attention's output projection.
    pub o_proj: Linear,
    /// (F, H): the MLP's gate, through SiLU.
    pub gate_proj: Linear,
    /// (F, H): the MLP's up projection, multiplied by the gate.
    pub up_proj: Linear,
    /// (H, F): the MLP's down projection.
    pub down_proj: Linear,
}

/// Llama for causal language modelling.
#[derive(Clone, Debug)]
pub struct Llama {
    config: LlamaConfig,
    /// (V, H)
    pub embed_tokens: Tensor,
    /// The transformer blocks, in order.
    pub layers: Vec<LlamaLayer>,
    /// (H,)
    pub norm: Tensor,
    /// (V, H); shares embed_tokens' storage when tie_word_embeddings.
    pub lm_head: Linear,
    rotary: RotaryTables,
    /// Recompute each block in the backward instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Ids at or above this are never sampled: the tokenizer cannot decode them (an
    /// embedding padded past the tokenizer, as GPT-NeoX-20B's 50432 rows for 50277 ids).
    pub sample_vocab: Option<usize>,
}

impl Llama {
    /// Builds the model from HF-named weights (taken out of `weights`), on their device.
    pub fn from_weights(config: LlamaConfig, weights: &mut Weights) -> Result<Llama> {
        let ab = config.attention_bias;
        Llama::with_biases(config, [ab, ab, ab, ab], weights)
    }

    /// As [`Llama::from_weights`], with a bias on each of q, k, v, o as `biases` says (Qwen2
    /// has them on q, k and v only).
    pub(crate) fn with_biases(
        config: LlamaConfig,
        [qb, kb, vb, ob]: [bool; 4],
        weights: &mut Weights,
    ) -> Result<Llama> {
        config.validate()?;
        let (h, f, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let q_width = config.num_attention_heads * config.head_dim();
        let kv_width = config.kv_heads() * config.head_dim();
        let mb = config.mlp_bias;
        let embed_tokens = weights.take_embedding("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let mut linear = |name: &str, out: usize, input: usize, bias: bool| {
                    Linear::load_block(weights, &format!("{p}.{name}"), out, input, bias)
                };
                let [q, k, v, o, gate, up, down] = LINEAR_NAMES;
                let q_proj = linear(q, q_width, h, qb)?;
                let k_proj = linear(k, kv_width, h, kb)?;
                let v_proj = linear(v, kv_width, h, vb)?;
                let o_proj = linear(o, h, q_width, ob)?;
                let gate_proj = linear(gate, f, h, mb)?;
                let up_proj = linear(up, f, h, mb)?;
                let down_proj = linear(down, h, f, mb)?;
                Ok(LlamaLayer {
                    input_layernorm: weights.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                    post_attention_layernorm: weights
                        .take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj,
                    gate_proj,
                    up_proj,
                    down_proj,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = weights.take("model.norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings {
            Linear::dense(embed_tokens.clone(), None)?
        } else {
            Linear::dense(weights.take_embedding("lm_head.weight", &[v, h])?, None)?
        };
        let rotary = RotaryTables::new(
            config.max_position_embeddings,
            config.head_dim(),
            config.rope_theta as f32,
            weights.device(),
        )?;
        Ok(Llama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            gradient_checkpointing: false,
            sample_vocab: None,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Self-attention of normed x (B, T, H) -> (B, T, H).
    fn attention(
        &self,
        layer: &LlamaLayer,
        index: usize,
        x: &Tensor,
        layout: &TokenLayout,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let positions = layout.positions();
        let heads = self.config.num_attention_heads;
        let kv_heads = self.config.kv_heads();
        let q = split_heads(&layer.q_proj.forward(x)?, heads)?.rotary(&self.rotary, positions)?; // (B, heads, T, d)
        let k =
            split_heads(&layer.k_proj.forward(x)?, kv_heads)?.rotary(&self.rotary, positions)?; // (B, kv_heads, T, d)
        let v = split_heads(&layer.v_proj.forward(x)?, kv_heads)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(index, &k, &v)?,
            None => (k, v),
        };
        let scale = (self.config.head_dim() as f32).powf(-0.5);
        let context = attend(&q, &k, &v, mask, layout.packing(), scale)?; // (B, T, heads * d)
        layer.o_proj.forward(&context)
    }

    /// SwiGLU: down(silu(gate(x)) * up(x)).
    fn mlp(&self, layer: &LlamaLayer, x: &Tensor) -> Result<Tensor> {
        let gate = layer.gate_proj.forward(x)?.silu()?;
        let up = layer.up_proj.forward(x)?;
        layer.down_proj.forward(&gate.mul(&up)?)
    }
}

impl BlockStack for Llama {
    type Layer = LlamaLayer;
    fn layers(&self) -> &[LlamaLayer] {
        &self.layers
    }
    fn checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }
    fn layer_variables(layer: &LlamaLayer) -> Vec<Tensor> {
        layer.variables()
    }

    /// One block: x + attn(norm x), then + mlp(norm h).
    fn block(
        &self,
        layer: &LlamaLayer,
        index: usize,
        x: &Tensor,
        layout: &TokenLayout,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        let normed = x.rms_norm(Some(&layer.input_layernorm), eps)?;
        let attn = self.attention(layer, index, &normed, layout, mask, cache)?;
        let h = x.add(&attn)?;
        let normed = h.rms_norm(Some(&layer.post_attention_layernorm), eps)?;
        Ok(h.add(&self.mlp(layer, &normed)?)?)
    }
}

impl LlamaLayer {
    /// The trainable tensors of the block (LoRA A and B, variables).
    pub fn variables(&self) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = [&self.input_layernorm, &self.post_attention_layernorm]
            .into_iter()
            .filter(|t| t.is_variable())
            .cloned()
            .collect();
        for (_, linear) in self.linears() {
            out.extend(linear.variables());
        }
        out
    }

    /// The block's linears in [`LINEAR_NAMES`] order, with their names.
    fn linears(&self) -> [(&'static str, &Linear); 7] {
        let layers = [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ];
        let mut names = LINEAR_NAMES.into_iter();
        layers.map(|l| (names.next().expect("seven names"), l))
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let layers = [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ];
        let mut names = LINEAR_NAMES.into_iter();
        layers.map(|l| (names.next().expect("seven names"), l))
    }
}

/// config.json's `llama`: 4.46's `rope_theta` filled from 5.x's `rope_parameters`.
pub const REGISTRATION: Registration = Registration {
    model_type: "llama",
    rope_keys: &[("rope_theta", "rope_theta")],
    parse: |value| serde_json::from_value::<LlamaConfig>(value).map(ModelConfig::new),
};

impl ArchConfig for LlamaConfig {
    fn model_type(&self) -> &'static str {
        "llama"
    }
    fn validate(&self) -> Result<()> {
        LlamaConfig::validate(self)
    }
    crate::standard_config_fields!();
    fn unknown_keys(&self) -> Vec<String> {
        LlamaConfig::unknown_keys(self)
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
        let (ab, mb) = (self.attention_bias, self.mlp_bias);
        llama_block_linears(self, [ab, ab, ab, ab], mb)
    }
    fn plan_dims(&self) -> Dims {
        Dims {
            hidden: self.hidden_size as u64,
            ffn: self.intermediate_size as u64,
            layers: self.num_hidden_layers as u64,
            heads: self.num_attention_heads as u64,
            kv_width: (self.kv_heads() * self.head_dim()) as u64,
            vocab: self.vocab_size as u64,
            tied: self.tie_word_embeddings,
            norm_floats: self.hidden_size as u64,
            rotary_floats: self.max_position_embeddings as u64 * self.head_dim() as u64,
        }
    }
    fn build(&self, weights: &mut Weights) -> Result<Box<dyn Architecture>> {
        Ok(Box::new(Llama::from_weights(self.clone(), weights)?))
    }
}

/// The linear layers of a Llama-style block: q, k, v, o with the given biases, then the
/// gated MLP's gate, up and down with `mlp_bias`.
pub(crate) fn llama_block_linears(
    c: &LlamaConfig,
    [qb, kb, vb, ob]: [bool; 4],
    mlp_bias: bool,
) -> Vec<LinearShape> {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim();
    let kv = c.kv_heads() * c.head_dim();
    vec![
        LinearShape::new("q_proj", q, h, qb),
        LinearShape::new("k_proj", kv, h, kb),
        LinearShape::new("v_proj", kv, h, vb),
        LinearShape::new("o_proj", h, q, ob),
        LinearShape::new("gate_proj", f, h, mlp_bias),
        LinearShape::new("up_proj", f, h, mlp_bias),
        LinearShape::new("down_proj", h, f, mlp_bias),
    ]
}

impl Architecture for Llama {
    fn arch_config(&self) -> &dyn ArchConfig {
        &self.config
    }
    fn model_config(&self) -> ModelConfig {
        ModelConfig::new(self.config.clone())
    }
    fn forward_hidden(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        layout.check_ids(ids)?;
        let past = match &cache {
            Some(c) => c.offset_for(self.layers.len())?,
            None => 0,
        };
        let mask = layout.mask(past + layout.seq_len())?;
        let eps = self.config.rms_norm_eps as f32;
        let x = Tensor::embedding(&self.embed_tokens, ids)?; // (B, T, H)
        let x = run_blocks(self, x, layout, &mask, cache)?;
        Ok(x.rms_norm(Some(&self.norm), eps)?)
    }
    fn head(&self) -> &Linear {
        &self.lm_head
    }
    fn embedding_and_head(&mut self) -> (&mut Tensor, &mut Linear) {
        (&mut self.embed_tokens, &mut self.lm_head)
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        by_layer("model.layers", self.layers.iter().map(LlamaLayer::linears))
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        by_layer(
            "model.layers",
            self.layers.iter_mut().map(LlamaLayer::linears_mut),
        )
    }
    fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.clone(),
            ));
            for (name, linear) in layer.linears() {
                linear.push_named(&format!("{p}.{name}"), &mut out)?;
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.config.tie_word_embeddings {
            self.lm_head.push_named("lm_head", &mut out)?;
        }
        Ok(out)
    }
    fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }
    fn sample_vocab(&self) -> Option<usize> {
        self.sample_vocab
    }
    fn set_sample_vocab(&mut self, ids: Option<usize>) {
        self.sample_vocab = ids;
    }
}
