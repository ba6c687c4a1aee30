//! BERT and DistilBERT encoders (transformers `BertModel` / `DistilBertModel`), inference
//! and training (LoRA on the encoder's linear layers).
//!
//! Both are the same post-LN stack: embeddings (word + learned position [+ token type 0])
//! -> LayerNorm; per block h = LN(x + attn(x)), out = LN(h + W2 gelu(W1 h)). Attention is
//! bidirectional. Texts of different lengths run packed back to back in one row (no FLOPs on
//! padding) and are laid out per text only for attention, where each text's padding keys
//! are masked through per-row key ranges `[0, length)` (no mask tensor). Dropout is not
//! applied (inference, and LoRA training without encoder dropout: documented difference
//! from transformers' train mode).

use lathe_core::{AttentionMask, Device, Tensor};
use lathe_lora::{AdapterSwitch, LoraAdapter, LoraConfig};
use lathe_models::attention::{Packing, TokenLayout};
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

/// Bidirectional attention over a forward's rows: `rows` sequences of up to `t` tokens,
/// each attending to its own tokens only (the mask's key ranges), either as a (B, T) batch
/// of equal rows or packed in one row of N tokens and laid out per sequence for attention.
struct Attention<'a> {
    rows: usize,
    t: usize,
    mask: AttentionMask,
    packing: Option<&'a Packing>,
}

impl Attention<'_> {
    /// softmax(q kᵀ / √d) v per head, for q, k, v (B, T, H) or packed (1, N, H); the context
    /// in the same layout.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let [.., h] = *q.shape() else {
            return Err(Error::Config("attention inputs need a hidden dim".into()));
        };
        let (s, t, d) = (self.rows, self.t, h / heads);
        // (S, heads, T, d): each sequence on its own row.
        let split = |y: &Tensor| -> Result<Tensor> {
            let padded = match self.packing {
                Some(packing) => packing.to_padded(&y.reshape(&[y.elem_count() / h, h])?)?,
                None => y.clone(),
            };
            Ok(padded.reshape(&[s, t, heads, d])?.permute(&[0, 2, 1, 3])?)
        };
        let probs = split(q)?
            .matmul_t(&split(k)?, false, true)? // (S, heads, T, T)
            .scale(1.0 / (d as f32).sqrt())?
            .masked_softmax(&self.mask)?;
        let context = probs
            .matmul(&split(v)?)? // (S, heads, T, d)
            .permute(&[0, 2, 1, 3])?
            .reshape(&[s, t, h])?;
        match self.packing {
            Some(packing) => {
                let tokens = packing.from_padded(&context)?;
                Ok(tokens.reshape(&[1, tokens.shape()[0], h])?)
            }
            None => Ok(context),
        }
    }
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

    /// Token states (B, T, H) of `rows` of token ids (each 1..=max positions long), right-padded
    /// to the longest row T: row b's states are its first `rows[b].len()` positions, those
    /// at padding positions are meaningless. Rows of different lengths run packed
    /// ([`TokenLayout::packed`]): only attention sees a padded batch, every other layer the
    /// real tokens alone, so padding costs no FLOPs.
    pub fn forward(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let max = self.config.max_positions;
        if rows.is_empty() {
            return Err(Error::Config("the encoder needs at least one row".into()));
        }
        if let Some((i, row)) = rows
            .iter()
            .enumerate()
            .find(|(_, row)| row.is_empty() || row.len() > max)
        {
            return Err(Error::Config(format!(
                "row {i} has {} tokens: the encoder takes 1 to {max}",
                row.len()
            )));
        }
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let t = lengths.iter().copied().max().unwrap_or(0);
        let h = self.config.hidden;
        let ids: Vec<u32> = rows.iter().flatten().copied().collect();
        let n = ids.len();
        let device = &self.device;
        let uniform = lengths.iter().all(|&l| l == t);
        let layout = if uniform {
            None
        } else {
            Some(TokenLayout::packed(&lengths, device)?)
        };
        let packing = layout.as_ref().and_then(TokenLayout::packing);
        // (B, T, H) rows of equal length, or (1, N, H) packed tokens.
        let (rows_shape, positions) = match &layout {
            None => ([rows.len(), t], self.position.narrow(0, 0, t)?),
            Some(layout) => (
                [1, n],
                Tensor::embedding_with_host_ids(
                    &self.position,
                    layout.positions(),
                    layout.positions_host().to_vec(),
                )?,
            ),
        };
        let ids_tensor = Tensor::from_vec(ids.clone(), &rows_shape, device)?;
        let mut x =
            Tensor::embedding_with_host_ids(&self.word, &ids_tensor, ids)?.add(&positions)?;
        if let Some(types) = &self.token_type {
            x = x.bias_add(&types.narrow(0, 0, 1)?.reshape(&[h])?)?;
        }
        x = self.embed_norm.forward(&x, self.config.layer_norm_eps)?;
        let attention = Attention {
            rows: rows.len(),
            t,
            mask: AttentionMask {
                causal: false,
                key_ranges: (!uniform).then(|| lengths.iter().map(|&l| (0, l as u32)).collect()),
            },
            packing,
        };
        for block in &self.blocks {
            x = self.block_forward(block, &x, &attention)?;
        }
        match packing {
            Some(packing) => Ok(packing.to_padded(&x.reshape(&[n, h])?)?),
            None => Ok(x),
        }
    }

    fn block_forward(&self, block: &Block, x: &Tensor, attention: &Attention) -> Result<Tensor> {
        let eps = self.config.layer_norm_eps;
        let [q, k, v, out, ffn_in, ffn_out] = &block.linears;
        let context = attention.attend(
            &q.forward(x)?,
            &k.forward(x)?,
            &v.forward(x)?,
            self.config.heads,
        )?;
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

    /// Gives every frozen f32 linear weight on the CPU a second copy packed for the forward
    /// product ([`Linear::pack_for_cpu`]: 4 bytes per weight, 42 MiB for MiniLM-L6), as the
    /// language models do once their base is final; returns the bytes added (0 on a GPU, on
    /// a CPU without the kernel, and for trainable weights).
    pub fn pack_frozen_weights(&mut self) -> Result<u64> {
        let mut added = 0;
        for block in &mut self.blocks {
            for linear in &mut block.linears {
                added += linear.pack_for_cpu()?;
            }
        }
        Ok(added)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::pool;
    use crate::Pooling;
    use lathe_core::testing::{assert_close, test_gpu, Tolerance};

    fn tiny_bert(device: &Device) -> (Encoder, AdapterSwitch) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_bert");
        let config = EncoderConfig::from_dir(&dir).unwrap();
        let mut weights = crate::model::read_weights(&dir, device).unwrap();
        let mut encoder = Encoder::load(&mut weights, &config).unwrap();
        let switch = AdapterSwitch::new();
        let lora = LoraConfig::new(4, 8.0, &["query", "value", "intermediate.dense"]);
        encoder.add_lora(&lora, &switch, 7).unwrap();
        // The frozen bases packed, as a loaded reward model's are.
        encoder.pack_frozen_weights().unwrap();
        (encoder, switch)
    }

    /// A fixed function of the mean-pooled states of `rows`: Σ_b,h pooled[b][h] · c[b][h].
    fn loss(encoder: &Encoder, rows: &[Vec<u32>], first_row: usize) -> Tensor {
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let states = encoder.forward(rows).unwrap();
        let pooled = pool(&states, &lengths, Pooling::Mean).unwrap();
        let h = encoder.config().hidden;
        let c: Vec<f32> = (first_row * h..(first_row + rows.len()) * h)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let c = Tensor::from_vec(c, &[rows.len(), h], encoder.device()).unwrap();
        pooled.mul(&c).unwrap().sum_all().unwrap()
    }

    /// Rows of different lengths run packed: their pooled states, and the LoRA gradients of
    /// a loss on them, equal each row's run alone (no padding anywhere).
    fn packed_rows_match_rows_alone(device: &Device) {
        let (encoder, _switch) = tiny_bert(device);
        let vocab = encoder.config().vocab_size as u32;
        // 78 tokens: more than the small-batch kernel takes, so the packed weights are read.
        let rows: Vec<Vec<u32>> = [17usize, 1, 24, 3, 24, 9]
            .iter()
            .enumerate()
            .map(|(r, &len)| {
                (0..len as u32)
                    .map(|t| (r as u32 * 31 + t * 7 + 1) % vocab)
                    .collect()
            })
            .collect();
        let variables = encoder.variables();
        let batch = loss(&encoder, &rows, 0);
        let batch_grads = batch.backward().unwrap();
        let mut alone = 0f32;
        let mut summed: Vec<Vec<f32>> = variables
            .iter()
            .map(|v| vec![0.0; v.elem_count()])
            .collect();
        for (r, row) in rows.iter().enumerate() {
            let one = loss(&encoder, std::slice::from_ref(row), r);
            alone += one.to_vec_f32().unwrap()[0];
            let grads = one.backward().unwrap();
            for (sum, v) in summed.iter_mut().zip(&variables) {
                let g = grads.get(v).unwrap().to_vec_f32().unwrap();
                sum.iter_mut().zip(g).for_each(|(s, g)| *s += g);
            }
        }
        let tol = Tolerance::new(1e-5, 1e-4);
        assert_close(&batch.to_vec_f32().unwrap(), &[alone], tol);
        let mut nonzero = 0;
        for (sum, v) in summed.iter().zip(&variables) {
            let got = batch_grads.get(v).unwrap().to_vec_f32().unwrap();
            assert_close(&got, sum, tol);
            nonzero += usize::from(got.iter().any(|&g| g != 0.0));
        }
        // The LoRA B factors (A's gradients are zero while B is).
        assert!(
            nonzero >= variables.len() / 2,
            "{nonzero} non-zero gradients"
        );
    }

    #[test]
    fn packed_rows_match_rows_alone_cpu() {
        packed_rows_match_rows_alone(&Device::Cpu);
    }

    #[test]
    fn packed_rows_match_rows_alone_gpu() {
        packed_rows_match_rows_alone(&test_gpu());
    }

    #[test]
    fn bad_rows_are_errors() {
        let (encoder, _switch) = tiny_bert(&Device::Cpu);
        let too_long = vec![1u32; encoder.config().max_positions + 1];
        assert!(encoder.forward(&[]).is_err());
        assert!(encoder.forward(&[vec![1, 2], vec![]]).is_err());
        assert!(encoder.forward(&[too_long]).is_err());
    }
}
