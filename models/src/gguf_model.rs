//! Llama and Qwen2 models from GGUF files (llama.cpp's format): config from the `llama.*` /
//! `qwen2.*` metadata (`general.architecture` picks), weights dequantized to f32 and renamed
//! to their HF names, the tokenizer from the `tokenizer.ggml.*` metadata. [`load_gguf`]
//! returns either as a [`CausalLm`]; the two share one reader and one tensor map, an
//! `Arch` entry holding what differs (the key prefix, the q/k permutation), Qwen2 adding
//! its q/k/v biases (`blk.N.attn_{q,k,v}.bias`).
//!
//! llama.cpp's `convert_hf_to_gguf.py` permutes the rows of a Llama's q_proj and k_proj so
//! that its rotary kernel can rotate adjacent pairs: per head, HF row `i * d/2 + j` (half `i`
//! of the split-half layout, `j < d/2`) becomes GGUF row `2 * j + i`. [`unpermute_rows`]
//! undoes it, as transformers' `reverse_permute_weights` does (k with the kv head count). Its
//! `Qwen2Model` writes q/k (and their biases) as HF has them (llama.cpp runs Qwen2 with
//! NeoX-style rotary instead), and transformers reads them back unchanged: nothing to undo.
//!
//! A GGUF without `output.weight` ties the lm head to `token_embd` (SmolLM2, Qwen2.5-0.5B):
//! llama.cpp falls back to the embedding. transformers 4.46 does not for Llama (its
//! LlamaConfig defaults to untied, leaving lm_head random) unless given
//! `tie_word_embeddings=True`.
//!
//! Refused, with an error naming the file and the key or tensor: other architectures, RoPE
//! scaling (`{arch}.rope.scaling.type` other than "none", `rope_freqs.weight`),
//! sliding-window attention (`{arch}.attention.sliding_window`), partial rotary, a Qwen2
//! head_dim other than hidden / heads, and any tensor the model would not take (an o_proj or
//! MLP bias in a Qwen2 file, say), besides missing and misshapen ones.

use std::path::Path;
use std::sync::Arc;

use lathe_core::{Device, Tensor};

use crate::arch::ArchConfig;
use crate::config::{LlamaConfig, ModelConfig, TokenIds};
use crate::gguf::GgufFile;
use crate::hf::CausalLm;
use crate::llama::Llama;
use crate::qwen2::{self, Qwen2Config};
use crate::tokenizer::Tokenizer;
use crate::weights::{LoadOptions, Weights};
use crate::{Error, Result};

/// What differs between the GGUF architectures read here.
struct Arch {
    /// `general.architecture`, also the prefix of the model's metadata keys.
    name: &'static str,
    /// Whether convert_hf_to_gguf.py permuted the q/k rows (`LlamaModel.permute`).
    permuted_qk: bool,
}

const LLAMA: Arch = Arch {
    name: "llama",
    permuted_qk: true,
};
/// `Qwen2Model` writes q/k as HF has them (its `modify_tensors` only renames).
const QWEN2: Arch = Arch {
    name: "qwen2",
    permuted_qk: false,
};

impl LlamaConfig {
    /// The config of a Llama GGUF file; see [`llama_config_from_gguf`].
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
        llama_config_from_gguf(file)
    }
}

impl Qwen2Config {
    /// The config of a Qwen2 GGUF file: the `qwen2.*` metadata read as
    /// [`llama_config_from_gguf`] reads `llama.*`; head_dim is hidden / heads.
    pub fn from_gguf(file: &GgufFile) -> Result<Qwen2Config> {
        check_architecture(file, &QWEN2)?;
        let c = read_config(file, &QWEN2)?;
        if c.head_dim.is_some() {
            return Err(file_error(
                file,
                format!(
                    "qwen2.attention.key_length {} differs from embedding_length / head_count: \
                     lathe's Qwen2 has head_dim = hidden_size / heads",
                    c.head_dim()
                ),
            ));
        }
        let config = Qwen2Config {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            hidden_act: c.hidden_act,
            max_position_embeddings: c.max_position_embeddings,
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            rope_theta: c.rope_theta,
            rope_scaling: None,
            rope_parameters: None,
            use_sliding_window: false,
            sliding_window: None,
            max_window_layers: None,
            layer_types: None,
            bos_token_id: c.bos_token_id,
            eos_token_id: c.eos_token_id,
            extra: Default::default(),
        };
        config
            .validate()
            .map_err(|e| file_error(file, e.to_string()))?;
        Ok(config)
    }
}

/// The config of a GGUF file of any architecture read here ("llama", "qwen2").
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    match file.architecture()? {
        "qwen2" => Ok(ModelConfig::new(Qwen2Config::from_gguf(file)?)),
        _ => Ok(ModelConfig::new(llama_config_from_gguf(file)?)),
    }
}

fn check_architecture(file: &GgufFile, arch: &Arch) -> Result<()> {
    let found = file.architecture()?;
    let detail = if found == arch.name {
        return Ok(());
    } else if [LLAMA.name, QWEN2.name].contains(&found) {
        format!(
            "general.architecture is {found:?}, not {:?} (gguf_model::load_gguf reads either)",
            arch.name
        )
    } else {
        format!(
            "general.architecture is {found:?}; lathe loads \"llama\" and \"qwen2\" GGUF \
             models only"
        )
    };
    Err(file_error(file, detail))
}

/// Builds a [`LlamaConfig`] from a GGUF file's `llama.*` metadata (names as transformers'
/// GGUF loader maps them: context_length, block_count, feed_forward_length, ...).
///
/// vocab_size is the embedding's row count (`token_embd.weight`), else `llama.vocab_size`,
/// else the token list's length; when both the embedding and `llama.vocab_size` are present
/// they must agree. tie_word_embeddings is true when `output.weight` is absent.
pub fn llama_config_from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
    check_architecture(file, &LLAMA)?;
    let config = read_config(file, &LLAMA)?;
    config
        .validate()
        .map_err(|e| file_error(file, e.to_string()))?;
    Ok(config)
}

/// The `{arch}.*` metadata as a [`LlamaConfig`], not yet validated.
fn read_config(file: &GgufFile, arch: &Arch) -> Result<LlamaConfig> {
    let prefix = arch.name;
    let key = |k: &str| format!("{prefix}.{k}");
    let optional_usize = |k: &str| -> Result<Option<usize>> {
        match file.metadata(&key(k)) {
            Some(_) => file.get_usize(&key(k)).map(Some),
            None => Ok(None),
        }
    };
    check_unsupported(file, prefix)?;

    let hidden_size = file.get_usize(&key("embedding_length"))?;
    let num_attention_heads = file.get_usize(&key("attention.head_count"))?;
    let num_key_value_heads =
        optional_usize("attention.head_count_kv")?.unwrap_or(num_attention_heads);
    let default_head_dim = hidden_size / num_attention_heads.max(1);
    let head_dim = optional_usize("attention.key_length")?.unwrap_or(default_head_dim);
    if let Some(v) = optional_usize("attention.value_length")? {
        if v != head_dim {
            return Err(file_error(
                file,
                format!(
                    "{prefix}.attention.value_length {v} differs from the key length {head_dim}"
                ),
            ));
        }
    }
    if let Some(rot) = optional_usize("rope.dimension_count")? {
        if rot != head_dim {
            return Err(file_error(
                file,
                format!(
                    "{prefix}.rope.dimension_count {rot} differs from head_dim {head_dim}: partial \
                     rotary embeddings are not supported"
                ),
            ));
        }
    }
    let optional_f64 = |k: &str, default: f64| -> Result<f64> {
        match file.metadata(&key(k)) {
            Some(_) => file.get_f64(&key(k)),
            None => Ok(default),
        }
    };
    // Checked here to name the GGUF keys; validate() checks them again as rope_theta and
    // rms_norm_eps. A NaN or non-positive value would give NaN logits, not an error.
    let rope_theta = optional_f64("rope.freq_base", 10000.0)?;
    let rms_norm_eps = optional_f64("attention.layer_norm_rms_epsilon", 1e-6)?;
    for (k, value, typical) in [
        ("rope.freq_base", rope_theta, "typically 10000 to 500000"),
        (
            "attention.layer_norm_rms_epsilon",
            rms_norm_eps,
            "typically 1e-5 or 1e-6",
        ),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err(file_error(
                file,
                format!(
                    "{} {value} is out of range: must be a finite number > 0 ({typical})",
                    key(k)
                ),
            ));
        }
    }
    let token_id = |k: &str| -> Result<Option<u32>> {
        match file.metadata(k) {
            Some(_) => file.get_u32(k).map(Some),
            None => Ok(None),
        }
    };
    let config = LlamaConfig {
        vocab_size: vocab_size(file, prefix)?,
        hidden_size,
        num_hidden_layers: file.get_usize(&key("block_count"))?,
        num_attention_heads,
        num_key_value_heads: Some(num_key_value_heads),
        intermediate_size: file.get_usize(&key("feed_forward_length"))?,
        head_dim: (head_dim != default_head_dim).then_some(head_dim),
        rope_theta,
        rms_norm_eps,
        hidden_act: "silu".to_string(),
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        max_position_embeddings: optional_usize("context_length")?.unwrap_or(2048),
        attention_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
        mlp_bias: file.tensor_info("blk.0.ffn_up.bias").is_some(),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token_id("tokenizer.ggml.eos_token_id")?.map(TokenIds::One),
        rope_scaling: None,
        rope_parameters: None,
        extra: Default::default(),
    };
    Ok(config)
}

/// RoPE scaling (Llama 3.1's `rope_freqs`, linear/yarn `rope.scaling.*`) changes the
/// rotary frequencies, sliding-window attention what each token sees; lathe implements
/// neither.
fn check_unsupported(file: &GgufFile, prefix: &str) -> Result<()> {
    let scaling_key = format!("{prefix}.rope.scaling.type");
    let scaling = match file.metadata(&scaling_key) {
        Some(_) => Some(file.get_str(&scaling_key)?),
        None => None,
    };
    if let Some(kind) = scaling.filter(|k| *k != "none") {
        return Err(file_error(
            file,
            format!("{scaling_key} {kind:?} is not supported (plain rotary only)"),
        ));
    }
    let window_key = format!("{prefix}.attention.sliding_window");
    if file.metadata(&window_key).is_some() {
        return Err(file_error(
            file,
            format!(
                "{window_key} is set: sliding-window attention is not supported (lathe attends \
                 to every earlier token)"
            ),
        ));
    }
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err(tensor_error(
            file,
            "rope_freqs.weight",
            "rotary frequency factors (Llama 3.1 RoPE scaling) are not supported".into(),
        ));
    }
    Ok(())
}

fn vocab_size(file: &GgufFile, prefix: &str) -> Result<usize> {
    let key = format!("{prefix}.vocab_size");
    let declared = match file.metadata(&key) {
        Some(_) => Some(file.get_usize(&key)?),
        None => None,
    };
    let rows = file
        .tensor_info("token_embd.weight")
        .and_then(|t| t.shape.first().copied());
    match (rows, declared) {
        (Some(r), Some(d)) if r != d => Err(tensor_error(
            file,
            "token_embd.weight",
            format!("{r} rows but {key} is {d}"),
        )),
        (Some(n), _) | (None, Some(n)) => Ok(n),
        (None, None) => Ok(file.get_str_array("tokenizer.ggml.tokens")?.len()),
    }
}

/// Loads a GGUF file of any architecture read here ("llama", "qwen2") onto `device`: the
/// model (f32 weights, every quantized tensor dequantized) and its tokenizer (checked to fit
/// the embedding).
pub fn load_gguf(path: impl AsRef<Path>, device: &Device) -> Result<(CausalLm, Tokenizer)> {
    load_gguf_with(path, device, LoadOptions::default())
}

/// As [`load_gguf`], with the load options of [`load_llama_gguf_with`].
pub fn load_gguf_with(
    path: impl AsRef<Path>,
    device: &Device,
    options: LoadOptions,
) -> Result<(CausalLm, Tokenizer)> {
    let file = Arc::new(GgufFile::open(path)?);
    let (config, tensors) = match file.architecture()? {
        "qwen2" => {
            let c = Qwen2Config::from_gguf(&file)?;
            let tensors = tensor_map(&c.as_llama(), qwen2::BIASES, QWEN2.permuted_qk);
            (ModelConfig::new(c), tensors)
        }
        _ => {
            let c = llama_config_from_gguf(&file)?;
            let tensors = llama_tensors(&c);
            (ModelConfig::new(c), tensors)
        }
    };
    let tokenizer = Tokenizer::from_gguf(&file)?;
    tokenizer.check_fits(config.vocab_size())?;
    let mut weights = hf_weights(&file, tensors, device)?;
    weights.set_options(options);
    Ok((CausalLm::from_weights(config, &mut weights)?, tokenizer))
}

/// Loads a Llama GGUF file onto `device`: the model (f32 weights, every quantized tensor
/// dequantized), its config and its tokenizer (checked to fit the embedding).
pub fn load_llama_gguf(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<(Llama, LlamaConfig, Tokenizer)> {
    load_llama_gguf_with(path, device, LoadOptions::default())
}

/// As [`load_llama_gguf`], each tensor dequantized when the model takes it and built at once
/// in the form `options` asks for (int8 block weights, f16 embeddings): host memory while
/// loading is the file, the model so far and one f32 tensor.
pub fn load_llama_gguf_with(
    path: impl AsRef<Path>,
    device: &Device,
    options: LoadOptions,
) -> Result<(Llama, LlamaConfig, Tokenizer)> {
    let file = Arc::new(GgufFile::open(path)?);
    let config = llama_config_from_gguf(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    tokenizer.check_fits(config.vocab_size)?;
    let mut weights = hf_weights(&file, llama_tensors(&config), device)?;
    weights.set_options(options);
    let model = Llama::from_weights(config.clone(), &mut weights)?;
    Ok((model, config, tokenizer))
}

/// (GGUF name, HF name, row-major shape, heads to un-permute by) of one tensor.
type TensorSpec = (String, String, Vec<usize>, Option<usize>);

/// Every tensor the model needs under its HF name, dequantized and un-permuted when a model
/// takes it (one tensor at a time: an int8 model never exists whole in f32). Missing,
/// misshapen and unexpected tensors (which the model would silently go without) are errors
/// now, before anything is built.
fn hf_weights(file: &Arc<GgufFile>, tensors: Vec<TensorSpec>, device: &Device) -> Result<Weights> {
    if let Some(extra) = file
        .tensor_infos()
        .iter()
        .find(|t| !tensors.iter().any(|(name, ..)| *name == t.name))
    {
        return Err(tensor_error(
            file,
            &extra.name,
            format!(
                "not a tensor of a {} model as lathe reads it (it would be ignored)",
                file.architecture()?
            ),
        ));
    }
    let mut weights = Weights::new(file.path(), device);
    for (gguf_name, hf_name, shape, heads) in tensors {
        let Some(info) = file.tensor_info(&gguf_name) else {
            return Err(tensor_error(file, &gguf_name, "missing".into()));
        };
        if info.shape != shape {
            return Err(tensor_error(
                file,
                &gguf_name,
                format!("shape {:?}, expected {shape:?} (for {hf_name})", info.shape),
            ));
        }
        let source = file.clone();
        let tensor_shape = shape.clone();
        let make = move || {
            let (_, mut values) = source.tensor_f32(&gguf_name)?;
            if let Some(heads) = heads {
                values = unpermute_rows(
                    &values,
                    heads,
                    tensor_shape[0] / heads,
                    tensor_shape[1..].iter().product(),
                );
            }
            Tensor::from_vec(values, &tensor_shape, &Device::Cpu)
                .map_err(|e| tensor_error(&source, &gguf_name, e.to_string()))
        };
        weights.insert_deferred(hf_name, shape, make, file.path());
    }
    Ok(weights)
}

/// A Llama's tensors: q/k/v/o biases when the config says so, q/k rows permuted.
fn llama_tensors(c: &LlamaConfig) -> Vec<TensorSpec> {
    tensor_map(c, [c.attention_bias; 4], LLAMA.permuted_qk)
}

/// Every tensor of a Llama-shaped model: q/k/v/o biases as `attn_biases` says, MLP biases
/// as the config does; when `permuted`, q/k rows (and biases) are un-permuted.
fn tensor_map(c: &LlamaConfig, attn_biases: [bool; 4], permuted: bool) -> Vec<TensorSpec> {
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (heads, kv_heads) = (c.num_attention_heads, c.kv_heads());
    let (q, kv) = (heads * c.head_dim(), kv_heads * c.head_dim());
    let mut out = vec![(
        "token_embd.weight".to_string(),
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        None,
    )];
    for i in 0..c.num_hidden_layers {
        let qk_heads = |n| permuted.then_some(n);
        let [q_bias, k_bias, v_bias, o_bias] = attn_biases;
        let linears = [
            ("attn_q", "self_attn.q_proj", q, h, qk_heads(heads), q_bias),
            (
                "attn_k",
                "self_attn.k_proj",
                kv,
                h,
                qk_heads(kv_heads),
                k_bias,
            ),
            ("attn_v", "self_attn.v_proj", kv, h, None, v_bias),
            ("attn_output", "self_attn.o_proj", h, q, None, o_bias),
            ("ffn_gate", "mlp.gate_proj", f, h, None, c.mlp_bias),
            ("ffn_up", "mlp.up_proj", f, h, None, c.mlp_bias),
            ("ffn_down", "mlp.down_proj", h, f, None, c.mlp_bias),
        ];
        for (g, hf, rows, cols, permuted, bias) in linears {
            let (g, hf) = (format!("blk.{i}.{g}"), format!("model.layers.{i}.{hf}"));
            out.push((
                format!("{g}.weight"),
                format!("{hf}.weight"),
                vec![rows, cols],
                permuted,
            ));
            if bias {
                out.push((
                    format!("{g}.bias"),
                    format!("{hf}.bias"),
                    vec![rows],
                    permuted,
                ));
            }
        }
        for (g, hf) in [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ] {
            out.push((
                format!("blk.{i}.{g}.weight"),
                format!("model.layers.{i}.{hf}.weight"),
                vec![h],
                None,
            ));
        }
    }
    out.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![h],
        None,
    ));
    if !c.tie_word_embeddings {
        out.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![v, h],
            None,
        ));
    }
    out
}

/// Undoes llama.cpp's q/k row permutation of a (heads * d, cols) matrix (cols = 1 for a
/// bias): GGUF rows viewed as (heads, d/2, 2, cols) -> HF rows (heads, 2, d/2, cols).
pub fn unpermute_rows(values: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let hf = (h * head_dim + i * half + j) * cols;
                let gguf = (h * head_dim + 2 * j + i) * cols;
                out[hf..hf + cols].copy_from_slice(&values[gguf..gguf + cols]);
            }
        }
    }
    out
}

fn file_error(file: &GgufFile, detail: String) -> Error {
    Error::File {
        path: file.path().to_string(),
        detail,
    }
}

fn tensor_error(file: &GgufFile, tensor: &str, detail: String) -> Error {
    Error::Tensor {
        path: file.path().to_string(),
        tensor: tensor.to_string(),
        detail,
    }
}
