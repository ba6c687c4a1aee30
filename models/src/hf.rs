//! HF model directories as a [`CausalLm`]: `config.json` plus the weights (read through
//! [`Weights`], one tensor at a time), loaded in the precision asked and saved back.

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lathe_core::{DType, Device, Tensor};

use crate::arch::Architecture;
use crate::attention::TokenLayout;
use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::linear::{Linear, Precision};
pub use crate::weights::{Deferred, LoadOptions, Weights, CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE};
use crate::{Error, Result};

/// A causal language model of any supported architecture: its model behind
/// [`Architecture`].
pub struct CausalLm(Box<dyn Architecture>);

impl CausalLm {
    /// Wraps an architecture's model.
    pub fn new(model: impl Architecture) -> CausalLm {
        CausalLm(Box::new(model))
    }

    /// The architecture's model.
    pub fn arch(&self) -> &dyn Architecture {
        &*self.0
    }

    /// The architecture's model, mutable.
    pub fn arch_mut(&mut self) -> &mut dyn Architecture {
        &mut *self.0
    }

    /// The concrete model, when it is an `M` (e.g. `lm.downcast_ref::<Llama>()`).
    pub fn downcast_ref<M: Architecture>(&self) -> Option<&M> {
        let any: &dyn Any = &*self.0;
        any.downcast_ref()
    }

    /// The concrete model, mutable, when it is an `M`.
    pub fn downcast_mut<M: Architecture>(&mut self) -> Option<&mut M> {
        let any: &mut dyn Any = &mut *self.0;
        any.downcast_mut()
    }

    /// Replaces every linear layer of the transformer blocks with its LLM.int8 form (the
    /// embeddings, norms and LM head stay as they are, as with transformers'
    /// `load_in_8bit`, which keeps `lm_head` in 16-bit).
    pub fn quantize_int8(&mut self, threshold: f32) -> Result<()> {
        for (_, linear) in self.linears_mut() {
            *linear = linear.to_int8(threshold)?;
        }
        Ok(())
    }

    /// Replaces the LM head with its LLM.int8 form (a tied head keeps the f32 or f16
    /// embedding for the lookup beside an int8 copy for the head). Beyond transformers'
    /// `load_in_8bit`, which keeps the head 16-bit: an option for decoding, where the head's
    /// weight is read once per token and, at SmolLM2's 49152 x 576, is a third of the token.
    pub fn quantize_head_int8(&mut self, threshold: f32) -> Result<()> {
        let (_, head) = self.arch_mut().embedding_and_head();
        *head = head.to_int8(threshold)?;
        Ok(())
    }

    /// Packs every frozen f32 linear weight on the CPU (the blocks' and the LM head's) once
    /// for the forward product ([`Linear::pack_for_cpu`]): a trainer calls this when the
    /// base's weights are final (after loading and any merge), so that no forward packs
    /// them again. Returns the bytes the packed copies add (the memory plan's `packed`).
    pub fn pack_frozen_weights(&mut self) -> Result<u64> {
        let mut added = 0;
        for (_, linear) in self.linears_mut() {
            added += linear.pack_for_cpu()?;
        }
        added += self.0.embedding_and_head().1.pack_for_cpu()?;
        Ok(added)
    }

    /// Gradient checkpointing per transformer block (transformers'
    /// `gradient_checkpointing_enable()`): activations of a block are recomputed in the
    /// backward instead of kept. Inference (no gradient recording, or a KV cache) is unchanged.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.arch_mut().set_gradient_checkpointing(on);
    }

    /// Rounds every linear weight of the transformer blocks to f16 (embeddings, norms and
    /// the LM head stay f32, the same layers `quantize_int8` leaves alone).
    pub fn to_f16(&mut self) -> Result<()> {
        for (_, linear) in self.linears_mut() {
            *linear = linear.to_f16()?;
        }
        Ok(())
    }

    /// Keeps the token embedding and the LM head in f16 (a tied head keeps sharing the
    /// embedding), as [`LoadOptions::embeddings_f16`] does at load time.
    pub fn embeddings_to_f16(&mut self) -> Result<()> {
        let tied = self.arch().arch_config().plan_dims().tied;
        let (embed, head) = self.arch_mut().embedding_and_head();
        *embed = embed.to_dtype(DType::F16)?;
        let head_weight = match head {
            Linear::Dense { .. } if tied => embed.clone(),
            Linear::Dense { weight, .. } => weight.to_dtype(DType::F16)?,
            _ => return Err(Error::Config("the LM head is not a dense layer".into())),
        };
        if let Linear::Dense { weight, .. } = head {
            *weight = head_weight;
        }
        Ok(())
    }

    /// Never samples ids at or above `ids` (the tokenizer's size, when the embedding is
    /// padded past it); `None` samples the whole vocabulary.
    pub fn limit_sampling_to(&mut self, ids: Option<usize>) {
        self.arch_mut().set_sample_vocab(ids);
    }

    /// Builds the model of `config` from `weights` (tensor names as in HF checkpoints).
    pub fn from_weights(config: ModelConfig, weights: &mut Weights) -> Result<CausalLm> {
        Ok(CausalLm(config.arch().build(weights)?))
    }

    /// Logits (B, T, V) of token ids (B, T); see [`Architecture::forward_hidden`].
    pub fn forward(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.lm_head(&self.forward_hidden(ids, layout, cache)?)
    }

    /// The last hidden state (B, T, H), after the final norm.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.arch().forward_hidden(ids, layout, cache)
    }

    /// Logits (B, T, V) of a last hidden state (B, T, H).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.arch().head().forward(hidden)
    }

    /// log p(`targets[r]`) of last hidden states (N, H) through the LM head and, when
    /// `entropy`, each row's entropy: see [`crate::linear::Linear::token_logprobs`].
    pub fn lm_head_logprobs(
        &self,
        hidden: &Tensor,
        targets: &[u32],
        ignore_index: Option<u32>,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.arch()
            .head()
            .token_logprobs(hidden, targets, ignore_index, entropy)
    }

    /// The mean next-token loss of last hidden states (N, H) against targets (N,) (rows
    /// whose target is `ignore_index` drop out), through the LM head without holding its
    /// (N, V) logits where the head allows (see [`crate::linear::Linear::cross_entropy`]).
    pub fn lm_head_loss(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        ignore_index: Option<u32>,
    ) -> Result<Tensor> {
        self.arch()
            .head()
            .cross_entropy(hidden, targets, ignore_index)
    }

    /// An empty KV cache with one slot per layer.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.arch().arch_config().num_hidden_layers())
    }

    /// The model's config (a cheap, shared clone).
    pub fn config(&self) -> ModelConfig {
        self.arch().model_config()
    }

    /// Every weight under its HF name (tied weights once, as transformers saves them).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.arch().named_weights()
    }
}

/// Loads a HF model directory (config.json + safetensors weights) onto `device`, in f32.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<CausalLm> {
    load_hf_dir_with(dir, device, LoadOptions::default())
}

/// Loads a HF model directory onto `device`, each tensor read from its shard and built in
/// the form `options` asks for as it is read (int8 block weights never exist in f32 whole).
pub fn load_hf_dir_with(dir: &Path, device: &Device, options: LoadOptions) -> Result<CausalLm> {
    let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
    let mut weights = Weights::from_hf_dir(dir, device)?;
    weights.set_options(options);
    weights.set_bnb_int8(config.bnb_int8()?);
    CausalLm::from_weights(config, &mut weights)
}

/// A note for the user when `config` is a bitsandbytes 8-bit checkpoint's and `options` ask
/// for another precision: the block linears load as int8 anyway (see [`LoadOptions`]), as
/// transformers does. `None` otherwise. The library never prints; the loader's caller does.
pub fn bnb_int8_note(config: &ModelConfig, options: &LoadOptions) -> Result<Option<String>> {
    let Some(bnb) = config.bnb_int8()? else {
        return Ok(None);
    };
    let asked = match options.precision {
        Precision::Int8 { threshold } if threshold == bnb.threshold => return Ok(None),
        Precision::Int8 { threshold } => format!("int8 with threshold {threshold}"),
        Precision::F16 => "f16".to_string(),
        Precision::F32 => "f32".to_string(),
    };
    Ok(Some(format!(
        "note: a bitsandbytes 8-bit checkpoint: its block linear layers load as stored, LLM.int8 \
         with the checkpoint's outlier threshold {}, not {asked} as asked (as transformers loads \
         it); embeddings, norms, the LM head and llm_int8_skip_modules stay dense",
        bnb.threshold
    )))
}

/// Writes a HF model directory: config.json and one model.safetensors, each through a
/// temporary file renamed into place, so a failure never leaves a half-written file.
pub fn save_hf_dir(dir: &Path, config: &ModelConfig, tensors: &[(String, Tensor)]) -> Result<()> {
    let dir_error = |detail: String| Error::File {
        path: dir.display().to_string(),
        detail,
    };
    std::fs::create_dir_all(dir).map_err(|e| dir_error(e.to_string()))?;
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let weights_path = dir.join(WEIGHTS_FILE);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    lathe_core::safetensors::save(&weights_path, &named, Some(metadata)).map_err(|e| {
        Error::File {
            path: weights_path.display().to_string(),
            detail: e.to_string(),
        }
    })?;
    write_atomically(&dir.join(CONFIG_FILE), config.to_json_string()?.as_bytes())
}

/// Writes `bytes` to a temporary sibling of `path`, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_error = |e: std::io::Error| Error::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(file_error)
}
