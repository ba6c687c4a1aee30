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

use crate::attention::{attend, split_heads, TokenLayout};
use crate::blocks::{run_blocks, BlockStack};
use crate::config::LlamaConfig;
use crate::hf::Weights;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::Result;

/// One transformer block.
#[derive(Clone, Debug)]
pub struct LlamaLayer {
    /// (H,) RMSNorm weights.
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// Llama for causal language modelling.
#[derive(Clone, Debug)]
pub struct Llama {
    config: LlamaConfig,
    /// (V, H)
    pub embed_tokens: Tensor,
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
        config.validate()?;
        let (h, f, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let q_width = config.num_attention_heads * config.head_dim();
        let kv_width = config.kv_heads() * config.head_dim();
        let (ab, mb) = (config.attention_bias, config.mlp_bias);
        let embed_tokens = weights.take_embedding("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let mut linear = |name: &str, out: usize, input: usize, bias: bool| {
                    Linear::load_block(weights, &format!("{p}.{name}"), out, input, bias)
                };
                let q_proj = linear("self_attn.q_proj", q_width, h, ab)?;
                let k_proj = linear("self_attn.k_proj", kv_width, h, ab)?;
                let v_proj = linear("self_attn.v_proj", kv_width, h, ab)?;
                let o_proj = linear("self_attn.o_proj", h, q_width, ab)?;
                let gate_proj = linear("mlp.gate_proj", f, h, mb)?;
                let up_proj = linear("mlp.up_proj", f, h, mb)?;
                let down_proj = linear("mlp.down_proj", h, f, mb)?;
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

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits (B, T, V) of token ids u32 (B, T) laid out by `layout`. With a cache, the ids
    /// follow the cached tokens and their keys and values are appended to it.
    pub fn forward(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.lm_head(&self.forward_hidden(ids, layout, cache)?)
    }

    /// Logits (B, T, V) of a last hidden state (B, T, H).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }

    /// The last hidden state (B, T, H), after the final norm (transformers'
    /// `hidden_states[-1]`).
    pub fn forward_hidden(
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
        let context = attend(&q, &k, &v, mask, scale)?; // (B, T, heads * d)
        layer.o_proj.forward(&context)
    }

    /// SwiGLU: down(silu(gate(x)) * up(x)).
    fn mlp(&self, layer: &LlamaLayer, x: &Tensor) -> Result<Tensor> {
        let gate = layer.gate_proj.forward(x)?.silu()?;
        let up = layer.up_proj.forward(x)?;
        layer.down_proj.forward(&gate.mul(&up)?)
    }

    /// Every weight under its HF name (lm_head omitted when tied, as transformers saves).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
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

    /// Every linear layer of the blocks under its HF module name.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, linear) in layer.linears() {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        out
    }

    /// Every linear layer under its HF module name, for swapping (LoRA, int8).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, linear) in layer.linears_mut() {
                out.push((format!("model.layers.{i}.{name}"), linear));
            }
        }
        out
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

    fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.q_proj),
            ("self_attn.k_proj", &self.k_proj),
            ("self_attn.v_proj", &self.v_proj),
            ("self_attn.o_proj", &self.o_proj),
            ("mlp.gate_proj", &self.gate_proj),
            ("mlp.up_proj", &self.up_proj),
            ("mlp.down_proj", &self.down_proj),
        ]
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("self_attn.q_proj", &mut self.q_proj),
            ("self_attn.k_proj", &mut self.k_proj),
            ("self_attn.v_proj", &mut self.v_proj),
            ("self_attn.o_proj", &mut self.o_proj),
            ("mlp.gate_proj", &mut self.gate_proj),
            ("mlp.up_proj", &mut self.up_proj),
            ("mlp.down_proj", &mut self.down_proj),
        ]
    }
}
