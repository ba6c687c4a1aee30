//! GPT-NeoX: the seed's architecture (GPT-NeoX-20B, Pythia).
//!
//! Matches transformers 4.46 `modeling_gpt_neox.py` (`GPTNeoXForCausalLM`, eager attention).
//! Per layer: LayerNorm -> fused query_key_value (per-head interleaved [heads, 3 * head_size]
//! layout) -> rotary on the first rotary_ndims dims of q and k -> causal attention scaled by
//! head_size^-0.5 -> dense; LayerNorm -> dense_h_to_4h -> GELU (erf or tanh by hidden_act) ->
//! dense_4h_to_h; parallel (x + attn(ln1 x) + mlp(ln2 x)) or sequential residuals. Then
//! final_layer_norm and embed_out (untied unless tie_word_embeddings).
//!
//! Tensor names (HF): `gpt_neox.embed_in.weight` (V, H); under `gpt_neox.layers.{i}.`:
//! `input_layernorm.{weight,bias}`, `post_attention_layernorm.{weight,bias}`,
//! `attention.query_key_value.{weight,bias}` (3H, H), `attention.dense.{weight,bias}` (H, H),
//! `mlp.dense_h_to_4h.{weight,bias}` (F, H), `mlp.dense_4h_to_h.{weight,bias}` (H, F);
//! `gpt_neox.final_layer_norm.{weight,bias}`; `embed_out.weight` (V, H).
//! Old checkpoints' `attention.bias`, `attention.masked_bias` and `rotary_emb.inv_freq`
//! buffers are ignored.

use lathe_core::ops::rotary::RotaryTables;
use lathe_core::ops::unary::GeluKind;
use lathe_core::Tensor;

use crate::attention::{attend, split_heads, TokenLayout};
use crate::blocks::{by_layer, run_blocks, BlockStack};
use serde_json::Value;

use crate::arch::{ArchConfig, Architecture};
use crate::config::{GptNeoxConfig, ModelConfig, Registration};
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::plan::{Dims, LinearShape};
use crate::weights::Weights;
use crate::Result;

/// A LayerNorm's affine parameters, (H,) each.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// The scale γ, (H,).
    pub weight: Tensor,
    /// The shift β, (H,).
    pub bias: Tensor,
    /// Added to the variance before the square root.
    pub eps: f32,
}

impl LayerNorm {
    fn load(weights: &mut Weights, prefix: &str, size: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: weights.take(&format!("{prefix}.weight"), &[size])?,
            bias: weights.take(&format!("{prefix}.bias"), &[size])?,
            eps,
        })
    }

    /// Normalises `x` (.., H) over its last dim, then scales and shifts it.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.layer_norm(Some(&self.weight), Some(&self.bias), self.eps)?)
    }

    fn named(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        out.push((format!("{prefix}.bias"), self.bias.clone()));
    }
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct GptNeoxLayer {
    /// The LayerNorm before attention.
    pub input_layernorm: LayerNorm,
    /// The LayerNorm before the MLP.
    pub post_attention_layernorm: LayerNorm,
    /// (3H, H): per head, rows [q | k | v] of head_size each.
    pub query_key_value: Linear,
    /// (H, H): attention's output projection.
    pub dense: Linear,
    /// (F, H): the MLP's up projection.
    pub dense_h_to_4h: Linear,
    /// (H, F): the MLP's down projection.
    pub dense_4h_to_h: Linear,
}

impl BlockStack for GptNeox {
    type Layer = GptNeoxLayer;
    fn layers(&self) -> &[GptNeoxLayer] {
        &self.layers
    }
    fn checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }
    fn layer_variables(layer: &GptNeoxLayer) -> Vec<Tensor> {
        layer.variables()
    }

    /// One block: attention and MLP with parallel or sequential residuals.
    fn block(
        &self,
        layer: &GptNeoxLayer,
        index: usize,
        x: &Tensor,
        layout: &TokenLayout,
        mask: &lathe_core::ops::softmax::AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let attn_in = layer.input_layernorm.forward(x)?;
        let attn = self.attention(layer, index, &attn_in, layout, mask, cache)?;
        if self.config.use_parallel_residual {
            let mlp = self.mlp(layer, &layer.post_attention_layernorm.forward(x)?)?;
            Ok(mlp.add(&attn)?.add(x)?)
        } else {
            let h = attn.add(x)?;
            let mlp = self.mlp(layer, &layer.post_attention_layernorm.forward(&h)?)?;
            Ok(mlp.add(&h)?)
        }
    }
}

impl GptNeoxLayer {
    /// The trainable tensors of the block (LoRA A and B, variables).
    pub fn variables(&self) -> Vec<Tensor> {
        let norms = [
            &self.input_layernorm.weight,
            &self.input_layernorm.bias,
            &self.post_attention_layernorm.weight,
            &self.post_attention_layernorm.bias,
        ];
        let mut out: Vec<Tensor> = norms
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
    fn linears(&self) -> [(&'static str, &Linear); 4] {
        let layers = [
            &self.query_key_value,
            &self.dense,
            &self.dense_h_to_4h,
            &self.dense_4h_to_h,
        ];
        let mut names = LINEAR_NAMES.into_iter();
        layers.map(|l| (names.next().expect("four names"), l))
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        let layers = [
            &mut self.query_key_value,
            &mut self.dense,
            &mut self.dense_h_to_4h,
            &mut self.dense_4h_to_h,
        ];
        let mut names = LINEAR_NAMES.into_iter();
        layers.map(|l| (names.next().expect("four names"), l))
    }
}

/// The HF module names of a block's linears (under `gpt_neox.layers.{i}.`), in the order of
/// [`GptNeoxLayer`]'s fields: the one place they are written.
const LINEAR_NAMES: [&str; 4] = [
    "attention.query_key_value",
    "attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
];

/// GPT-NeoX for causal language modelling.
#[derive(Clone, Debug)]
pub struct GptNeox {
    config: GptNeoxConfig,
    /// (V, H)
    pub embed_in: Tensor,
    /// The transformer blocks, in order.
    pub layers: Vec<GptNeoxLayer>,
    /// The LayerNorm after the last block.
    pub final_layer_norm: LayerNorm,
    /// (V, H); shares embed_in's storage when tie_word_embeddings.
    pub embed_out: Linear,
    rotary: RotaryTables,
    gelu: GeluKind,
    /// Recompute each block in the backward instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Ids at or above this are never sampled: the tokenizer cannot decode them (an
    /// embedding padded past the tokenizer, as GPT-NeoX-20B's 50432 rows for 50277 ids).
    pub sample_vocab: Option<usize>,
}

impl GptNeox {
    /// Builds the model from HF-named weights (taken out of `weights`), on their device.
    pub fn from_weights(config: GptNeoxConfig, weights: &mut Weights) -> Result<GptNeox> {
        config.validate()?;
        let gelu = config.gelu_kind()?;
        let (h, f, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let eps = config.layer_norm_eps as f32;
        let bias = config.attention_bias;
        let embed_in = weights.take_embedding("gpt_neox.embed_in.weight", &[v, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("gpt_neox.layers.{i}");
                let linear = |weights: &mut Weights, name: &str, out, input, bias| {
                    Linear::load_block(weights, &format!("{p}.{name}"), out, input, bias)
                };
                let [qkv, dense, up, down] = LINEAR_NAMES;
                Ok(GptNeoxLayer {
                    input_layernorm: LayerNorm::load(
                        weights,
                        &format!("{p}.input_layernorm"),
                        h,
                        eps,
                    )?,
                    post_attention_layernorm: LayerNorm::load(
                        weights,
                        &format!("{p}.post_attention_layernorm"),
                        h,
                        eps,
                    )?,
                    query_key_value: linear(weights, qkv, 3 * h, h, bias)?,
                    dense: linear(weights, dense, h, h, bias)?,
                    dense_h_to_4h: linear(weights, up, f, h, true)?,
                    dense_4h_to_h: linear(weights, down, h, f, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(weights, "gpt_neox.final_layer_norm", h, eps)?;
        let embed_out = if config.tie_word_embeddings {
            Linear::dense(embed_in.clone(), None)?
        } else {
            Linear::dense(weights.take_embedding("embed_out.weight", &[v, h])?, None)?
        };
        let rotary = RotaryTables::new(
            config.max_position_embeddings,
            config.rotary_ndims(),
            config.rotary_emb_base as f32,
            weights.device(),
        )?;
        Ok(GptNeox {
            config,
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            rotary,
            gelu,
            gradient_checkpointing: false,
            sample_vocab: None,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &GptNeoxConfig {
        &self.config
    }

    /// Self-attention of normed x (B, T, H) -> (B, T, H).
    fn attention(
        &self,
        layer: &GptNeoxLayer,
        index: usize,
        x: &Tensor,
        layout: &TokenLayout,
        mask: &lathe_core::ops::softmax::AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let heads = self.config.num_attention_heads;
        let hs = self.config.head_size();
        // (B, T, 3H) viewed as (B, heads, T, 3 * head_size): q, k, v interleaved per head.
        let qkv = split_heads(&layer.query_key_value.forward(x)?, heads)?;
        let parts = qkv.split(&[hs, hs, hs], 3)?;
        let positions = layout.positions();
        let q = parts[0].rotary(&self.rotary, positions)?; // (B, heads, T, hs)
        let k = parts[1].rotary(&self.rotary, positions)?;
        let v = parts[2].clone();
        let (k, v) = match cache {
            Some(cache) => cache.append(index, &k, &v)?,
            None => (k, v),
        };
        let context = attend(&q, &k, &v, mask, layout.packing(), (hs as f32).powf(-0.5))?; // (B, T, H)
        layer.dense.forward(&context)
    }

    fn mlp(&self, layer: &GptNeoxLayer, x: &Tensor) -> Result<Tensor> {
        let up = layer.dense_h_to_4h.forward(x)?.gelu(self.gelu)?;
        layer.dense_4h_to_h.forward(&up)
    }
}

/// config.json's `gpt_neox`: 4.46's `rotary_emb_base` / `rotary_pct` filled from 5.x's
/// `rope_parameters`.
pub const REGISTRATION: Registration = Registration {
    model_type: "gpt_neox",
    rope_keys: &[
        ("rotary_emb_base", "rope_theta"),
        ("rotary_pct", "partial_rotary_factor"),
    ],
    parse: |value| serde_json::from_value::<GptNeoxConfig>(value).map(ModelConfig::new),
};

impl ArchConfig for GptNeoxConfig {
    fn model_type(&self) -> &'static str {
        "gpt_neox"
    }
    fn validate(&self) -> Result<()> {
        GptNeoxConfig::validate(self)
    }
    crate::standard_config_fields!();
    fn unknown_keys(&self) -> Vec<String> {
        GptNeoxConfig::unknown_keys(self)
    }
    fn rope_keys(&self) -> Vec<(&'static str, &'static str, f64)> {
        vec![
            ("rotary_emb_base", "rope_theta", self.rotary_emb_base),
            ("rotary_pct", "partial_rotary_factor", self.rotary_pct),
        ]
    }
    fn to_value(&self) -> serde_json::Result<Value> {
        serde_json::to_value(self)
    }
    fn default_lora_targets(&self) -> &'static [&'static str] {
        &["query_key_value"]
    }
    fn block_linears(&self) -> Vec<LinearShape> {
        let (h, f, ab) = (
            self.hidden_size,
            self.intermediate_size,
            self.attention_bias,
        );
        vec![
            LinearShape::new("query_key_value", 3 * h, h, ab),
            LinearShape::new("dense", h, h, ab),
            LinearShape::new("dense_h_to_4h", f, h, true),
            LinearShape::new("dense_4h_to_h", h, f, true),
        ]
    }
    fn plan_dims(&self) -> Dims {
        Dims {
            hidden: self.hidden_size as u64,
            ffn: self.intermediate_size as u64,
            layers: self.num_hidden_layers as u64,
            heads: self.num_attention_heads as u64,
            kv_width: self.hidden_size as u64,
            vocab: self.vocab_size as u64,
            tied: self.tie_word_embeddings,
            norm_floats: 2 * self.hidden_size as u64,
            rotary_floats: self.max_position_embeddings as u64 * self.rotary_ndims() as u64,
        }
    }
    fn build(&self, weights: &mut Weights) -> Result<Box<dyn Architecture>> {
        Ok(Box::new(GptNeox::from_weights(self.clone(), weights)?))
    }
}

impl Architecture for GptNeox {
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
        let x = Tensor::embedding(&self.embed_in, ids)?; // (B, T, H)
        let x = run_blocks(self, x, layout, &mask, cache)?;
        self.final_layer_norm.forward(&x)
    }
    fn head(&self) -> &Linear {
        &self.embed_out
    }
    fn embedding_and_head(&mut self) -> (&mut Tensor, &mut Linear) {
        (&mut self.embed_in, &mut self.embed_out)
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        by_layer(
            "gpt_neox.layers",
            self.layers.iter().map(GptNeoxLayer::linears),
        )
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        by_layer(
            "gpt_neox.layers",
            self.layers.iter_mut().map(GptNeoxLayer::linears_mut),
        )
    }
    fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "gpt_neox.embed_in.weight".to_string(),
            self.embed_in.clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("gpt_neox.layers.{i}");
            layer
                .input_layernorm
                .named(&format!("{p}.input_layernorm"), &mut out);
            layer
                .post_attention_layernorm
                .named(&format!("{p}.post_attention_layernorm"), &mut out);
            for (name, linear) in layer.linears() {
                linear.push_named(&format!("{p}.{name}"), &mut out)?;
            }
        }
        self.final_layer_norm
            .named("gpt_neox.final_layer_norm", &mut out);
        if !self.config.tie_word_embeddings {
            self.embed_out.push_named("embed_out", &mut out)?;
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
