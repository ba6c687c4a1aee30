//! BERT and DistilBERT encoders (transformers `BertModel` / `DistilBertModel`), inference
//! and training (LoRA on the encoder's linear layers).
//!
//! Both are the same post-LN stack: embeddings (word + learned position [+ token type 0])
//! -> LayerNorm; per block h = LN(x + attn(x)), out = LN(h + W2 gelu(W1 h)). Attention is
//! bidirectional; a right-padded batch masks each row's padding keys through per-row key
//! ranges `[0, length)` (no mask tensor). Dropout is not applied (inference, and LoRA
//! training without encoder dropout: documented difference from transformers' train mode).

use lathe_core::{AttentionMask, Device, Tensor};
use lathe_lora::{AdapterSwitch, LoraAdapter, LoraConfig};
use lathe_models::hf::Weights;
use lathe_models::linear::Linear;

use crate::config::{Architecture, EncoderConfig};
use crate::{Error, Result};

/// A LayerNorm's weight and bias (H,).
#[derive(Clone, Debug)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn load(weights: &mut Weights, prefix: &str, hidden: usize) -> Result<Norm> {
        Ok(Norm {
            weight: weights.take(&format!("{prefix}.weight"), &[hidden])?,
            bias: weights.take(&format!("{prefix}.bias"), &[hidden])?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(x.layer_norm(Some(&self.weight), Some(&self.bias), eps)?)
    }
}

/// The HF names of one block's modules, per architecture (without the block prefix).
struct BlockNames {
    query: &'static str,
    key: &'static str,
    value: &'static str,
    out: &'static str,
    attn_norm: &'static str,
    ffn_in: &'static str,
    ffn_out: &'static str,
    ffn_norm: &'static str,
}

const BERT_NAMES: BlockNames = BlockNames {
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    ffn_in: "intermediate.dense",
    ffn_out: "output.dense",
    ffn_norm: "output.LayerNorm",
};

const DISTILBERT_NAMES: BlockNames = BlockNames {
    query: "attention.q_lin",
    key: "attention.k_lin",
    value: "attention.v_lin",
    out: "attention.out_lin",
    attn_norm: "sa_layer_norm",
    ffn_in: "ffn.lin1",
    ffn_out: "ffn.lin2",
    ffn_norm: "output_layer_norm",
};

/// One post-LN transformer block.
#[derive(Clone, Debug)]
struct Block {
    /// q, k, v, out, ffn_in, ffn_out in that order (the order of [`Encoder::LINEAR_SLOTS`]).
    linears: [Linear; 6],
    attn_norm: Norm,
    ffn_norm: Norm,
}

/// Block `i`'s module path without a task prefix: `encoder.layer.{i}` (BERT) or
/// `transformer.layer.{i}` (DistilBERT).
fn block_path(architecture: Architecture, i: usize) -> String {
    match architecture {
        Architecture::Bert => format!("encoder.layer.{i}"),
        Architecture::DistilBert => format!("transformer.layer.{i}"),
    }
}

/// Block `i`'s six linear layers in the block's order (query, key, value, attention output,
/// FFN in, FFN out): module name without a task prefix, and (out, in).
pub(crate) fn block_linears(config: &EncoderConfig, i: usize) -> [(String, usize, usize); 6] {
    let n = match config.architecture {
        Architecture::Bert => &BERT_NAMES,
        Architecture::DistilBert => &DISTILBERT_NAMES,
    };
    let p = block_path(config.architecture, i);
    let (h, f) = (config.hidden, config.intermediate);
    [
        (n.query, h, h),
        (n.key, h, h),
        (n.value, h, h),
        (n.out, h, h),
        (n.ffn_in, f, h),
        (n.ffn_out, h, f),
    ]
    .map(|(name, out, input)| (format!("{p}.{name}"), out, input))
}

/// A BERT or DistilBERT encoder.
#[derive(Clone, Debug)]
pub struct Encoder {
    config: EncoderConfig,
    /// Weight-name prefix: "bert." / "distilbert." for HF task models, "" for bare encoders.
    prefix: String,
    word: Tensor,
    position: Tensor,
    /// BERT's token-type table (types, H); row 0 is added to every token.
    token_type: Option<Tensor>,
    embed_norm: Norm,
    blocks: Vec<Block>,
    device: Device,
}

impl Encoder {
    fn names(&self) -> &'static BlockNames {
        match self.config.architecture {
            Architecture::Bert => &BERT_NAMES,
            Architecture::DistilBert => &DISTILBERT_NAMES,
        }
    }

    fn embeddings_prefix(&self) -> String {
        format!("{}embeddings", self.prefix)
    }

    fn block_prefix(&self, i: usize) -> String {
        format!("{}{}", self.prefix, block_path(self.config.architecture, i))
    }

    /// Takes the encoder's tensors out of `weights`. The prefix ("bert." / "distilbert.")
    /// is detected from the word-embedding name.
    pub fn load(weights: &mut Weights, config: &EncoderConfig) -> Result<Encoder> {
        let task_prefix = match config.architecture {
            Architecture::Bert => "bert.",
            Architecture::DistilBert => "distilbert.",
        };
        let prefix = if weights.contains(&format!("{task_prefix}embeddings.word_embeddings.weight"))
        {
            task_prefix.to_string()
        } else {
            String::new()
        };
        let h = config.hidden;
        let mut encoder = Encoder {
            config: config.clone(),
            prefix,
            word: Tensor::zeros(&[0], &Device::Cpu)?,
            position: Tensor::zeros(&[0], &Device::Cpu)?,
            token_type: None,
            embed_norm: Norm {
                weight: Tensor::zeros(&[0], &Device::Cpu)?,
                bias: Tensor::zeros(&[0], &Device::Cpu)?,
            },
            blocks: Vec::new(),
            device: weights.device().clone(),
        };
        let emb = encoder.embeddings_prefix();
        encoder.word = weights.take(
            &format!("{emb}.word_embeddings.weight"),
            &[config.vocab_size, h],
        )?;
        encoder.position = weights.take(
            &format!("{emb}.position_embeddings.weight"),
            &[config.max_positions, h],
        )?;
        if config.architecture == Architecture::Bert {
            encoder.token_type = Some(weights.take(
                &format!("{emb}.token_type_embeddings.weight"),
                &[config.type_vocab_size, h],
            )?);
        }
        encoder.embed_norm = Norm::load(weights, &format!("{emb}.LayerNorm"), h)?;
        let names = encoder.names();
        for i in 0..config.layers {
            let p = encoder.block_prefix(i);
            let f = config.intermediate;
            let lin = |w: &mut Weights, name: &str, out, input| {
                Linear::load(w, &format!("{p}.{name}"), out, input, true)
            };
            let linears = [
                lin(weights, names.query, h, h)?,
                lin(weights, names.key, h, h)?,
                lin(weights, names.value, h, h)?,
                lin(weights, names.out, h, h)?,
                lin(weights, names.ffn_in, f, h)?,
                lin(weights, names.ffn_out, h, f)?,
            ];
            encoder.blocks.push(Block {
                linears,
                attn_norm: Norm::load(weights, &format!("{p}.{}", names.attn_norm), h)?,
                ffn_norm: Norm::load(weights, &format!("{p}.{}", names.ffn_norm), h)?,
            });
        }
        Ok(encoder)
    }

    /// The config the encoder was built from.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weight-name prefix ("bert.", "distilbert." or "").
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Token states (B, T, H) of right-padded ids (B, T) u32: row b's tokens are its first
    /// `lengths[b]` ids (1 <= length <= T <= max positions); states at padding positions are
    /// computed but meaningless.
    pub fn forward(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let [b, t] = *ids.shape() else {
            return Err(Error::Config(format!(
                "token ids must be (B, T), got {:?}",
                ids.shape()
            )));
        };
        if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
            return Err(Error::Config(format!(
                "lengths {lengths:?} do not fit a batch of {b} rows of {t} tokens"
            )));
        }
        if t > self.config.max_positions {
            return Err(Error::Config(format!(
                "{t} tokens exceed the {} positions of the encoder",
                self.config.max_positions
            )));
        }
        let h = self.config.hidden;
        let eps = self.config.layer_norm_eps;
        let positions = self.position.narrow(0, 0, t)?; // (T, H)
        let mut x = Tensor::embedding(&self.word, ids)?.add(&positions)?; // (B, T, H)
        if let Some(types) = &self.token_type {
            x = x.bias_add(&types.narrow(0, 0, 1)?.reshape(&[h])?)?;
        }
        x = self.embed_norm.forward(&x, eps)?;
        let mask = AttentionMask {
            causal: false,
            key_ranges: lengths
                .iter()
                .any(|&l| l < t)
                .then(|| lengths.iter().map(|&l| (0, l as u32)).collect()),
        };
        for block in &self.blocks {
            x = self.block_forward(block, &x, &mask, b, t, h)?;
        }
        Ok(x)
    }

    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        mask: &AttentionMask,
        b: usize,
        t: usize,
        h: usize,
    ) -> Result<Tensor> {
        let heads = self.config.heads;
        let d = h / heads;
        let eps = self.config.layer_norm_eps;
        let [q, k, v, out, ffn_in, ffn_out] = &block.linears;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape(&[b, t, heads, d])?.permute(&[0, 2, 1, 3])?) // (B, heads, T, d)
        };
        let q = split(q.forward(x)?)?;
        let k = split(k.forward(x)?)?;
        let v = split(v.forward(x)?)?;
        let probs = q
            .matmul_t(&k, false, true)? // (B, heads, T, T)
            .scale(1.0 / (d as f32).sqrt())?
            .masked_softmax(mask)?;
        let context = probs
            .matmul(&v)? // (B, heads, T, d)
            .permute(&[0, 2, 1, 3])?
            .reshape(&[b, t, h])?;
        let attn = out.forward(&context)?;
        let hidden = block.attn_norm.forward(&attn.add(x)?, eps)?;
        let ffn = ffn_out.forward(&ffn_in.forward(&hidden)?.gelu(self.config.gelu)?)?;
        block.ffn_norm.forward(&ffn.add(&hidden)?, eps)
    }

    /// The module names (HF, with prefix) of each block's six linear layers, in the order
    /// of the block's `linears`.
    fn linear_names(&self, i: usize) -> [String; 6] {
        block_linears(&self.config, i).map(|(name, _, _)| format!("{}{name}", self.prefix))
    }

    /// Wraps every linear layer whose module name `config` targets (peft matching: the name
    /// or a `.`-suffix; e.g. "query", "value" for BERT, "q_lin", "v_lin" for DistilBERT) in a
    /// fresh LoRA adapter (A seeded from `seed` and the layer index, B zero). Returns how
    /// many layers got one; none is an error (a typo in the targets).
    pub fn add_lora(
        &mut self,
        config: &LoraConfig,
        switch: &AdapterSwitch,
        seed: u64,
    ) -> Result<usize> {
        config.validate()?;
        let mut count = 0;
        for i in 0..self.blocks.len() {
            let names = self.linear_names(i);
            for (j, name) in names.iter().enumerate() {
                if !config.matches(name) {
                    continue;
                }
                let linear = &mut self.blocks[i].linears[j];
                if matches!(linear, Linear::Lora { .. }) {
                    return Err(Error::Config(format!("{name} already has a LoRA adapter")));
                }
                let adapter = LoraAdapter::new(
                    name,
                    linear.in_features(),
                    linear.out_features(),
                    config,
                    switch,
                    seed.wrapping_add((i * 6 + j) as u64),
                    &self.device,
                )?;
                *linear = Linear::Lora {
                    base: Box::new(linear.clone()),
                    adapter,
                    merged: false,
                };
                count += 1;
            }
        }
        if count == 0 {
            return Err(Error::Config(format!(
                "no linear layer of the encoder matches the LoRA targets {:?} (module names look like {:?})",
                config.targets(),
                self.linear_names(0)
            )));
        }
        Ok(count)
    }

    /// The trainable tensors of the encoder (LoRA A and B).
    pub fn variables(&self) -> Vec<Tensor> {
        self.blocks
            .iter()
            .flat_map(|b| b.linears.iter().flat_map(Linear::variables))
            .collect()
    }

    /// The LoRA adapters of the encoder, in block and layer order.
    pub fn adapters_mut(&mut self) -> Vec<&mut LoraAdapter> {
        self.blocks
            .iter_mut()
            .flat_map(|b| b.linears.iter_mut())
            .filter_map(|l| match l {
                Linear::Lora { adapter, .. } => Some(adapter),
                _ => None,
            })
            .collect()
    }

    /// Folds every LoRA adapter into its base weight and drops it.
    pub fn merge_lora(&mut self) -> Result<()> {
        for block in &mut self.blocks {
            for linear in &mut block.linears {
                linear.merge_and_unload()?;
            }
        }
        Ok(())
    }

    /// Every tensor under its HF name (LoRA layers as their base; merge first to save the
    /// adapted weights), for saving a directory transformers and lathe both load.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let emb = self.embeddings_prefix();
        let mut out = vec![
            (format!("{emb}.word_embeddings.weight"), self.word.clone()),
            (
                format!("{emb}.position_embeddings.weight"),
                self.position.clone(),
            ),
            (
                format!("{emb}.LayerNorm.weight"),
                self.embed_norm.weight.clone(),
            ),
            (
                format!("{emb}.LayerNorm.bias"),
                self.embed_norm.bias.clone(),
            ),
        ];
        if let Some(types) = &self.token_type {
            out.push((format!("{emb}.token_type_embeddings.weight"), types.clone()));
        }
        let names = self.names();
        for (i, block) in self.blocks.iter().enumerate() {
            let p = self.block_prefix(i);
            for (name, linear) in self.linear_names(i).iter().zip(&block.linears) {
                linear.push_named(name, &mut out)?;
            }
            for (suffix, norm) in [
                (names.attn_norm, &block.attn_norm),
                (names.ffn_norm, &block.ffn_norm),
            ] {
                out.push((format!("{p}.{suffix}.weight"), norm.weight.clone()));
                out.push((format!("{p}.{suffix}.bias"), norm.bias.clone()));
            }
        }
        Ok(out)
    }
}
