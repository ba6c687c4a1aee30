//! Llama models from GGUF files (llama.cpp's format): config from the `llama.*` metadata,
//! weights dequantized to f32 and renamed to their HF names, the tokenizer from the
//! `tokenizer.ggml.*` metadata.
//!
//! llama.cpp's `convert_hf_to_gguf.py` permutes the rows of q_proj and k_proj so that its
//! rotary kernel can rotate adjacent pairs: per head, HF row `i * d/2 + j` (half `i` of the
//! split-half layout, `j < d/2`) becomes GGUF row `2 * j + i`. [`unpermute_rows`] undoes it,
//! as transformers' `reverse_permute_weights` does (k with the kv head count).
//!
//! A GGUF without `output.weight` ties the lm head to `token_embd` (SmolLM2): llama.cpp
//! falls back to the embedding. transformers 4.46 does not (its LlamaConfig defaults to
//! untied, leaving lm_head random) unless given `tie_word_embeddings=True`.

use std::path::Path;
use std::sync::Arc;

use lathe_core::{Device, Tensor};

use crate::config::{LlamaConfig, TokenIds};
use crate::gguf::GgufFile;
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::{LoadOptions, Weights};
use crate::{Error, Result};

/// The one architecture read here.
const LLAMA: &str = "llama";

impl LlamaConfig {
    /// The config of a Llama GGUF file; see [`llama_config_from_gguf`].
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
        llama_config_from_gguf(file)
    }
}

/// Builds a [`LlamaConfig`] from a GGUF file's `llama.*` metadata (names as transformers'
/// GGUF loader maps them: context_length, block_count, feed_forward_length, ...).
///
/// vocab_size is the embedding's row count (`token_embd.weight`), else `llama.vocab_size`,
/// else the token list's length; when both the embedding and `llama.vocab_size` are present
/// they must agree. tie_word_embeddings is true when `output.weight` is absent.
pub fn llama_config_from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
    let arch = file.architecture()?;
    if arch != LLAMA {
        return Err(file_error(
            file,
            format!("general.architecture is {arch:?}; lathe loads \"llama\" GGUF models only"),
        ));
    }
    let key = |k: &str| format!("{LLAMA}.{k}");
    let optional_usize = |k: &str| -> Result<Option<usize>> {
        match file.metadata(&key(k)) {
            Some(_) => file.get_usize(&key(k)).map(Some),
            None => Ok(None),
        }
    };
    check_rope_scaling(file)?;

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
                format!("llama.attention.value_length {v} differs from the key length {head_dim}"),
            ));
        }
    }
    if let Some(rot) = optional_usize("rope.dimension_count")? {
        if rot != head_dim {
            return Err(file_error(
                file,
                format!(
                    "llama.rope.dimension_count {rot} differs from head_dim {head_dim}: partial \
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
        vocab_size: vocab_size(file)?,
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
    config
        .validate()
        .map_err(|e| file_error(file, e.to_string()))?;
    Ok(config)
}

/// RoPE scaling (Llama 3.1's `rope_freqs`, linear/yarn `rope.scaling.*`) changes the
/// rotary frequencies; lathe implements only the plain form.
fn check_rope_scaling(file: &GgufFile) -> Result<()> {
    let scaling = match file.metadata("llama.rope.scaling.type") {
        Some(_) => Some(file.get_str("llama.rope.scaling.type")?),
        None => None,
    };
    if let Some(kind) = scaling.filter(|k| *k != "none") {
        return Err(file_error(
            file,
            format!("llama.rope.scaling.type {kind:?} is not supported (plain rotary only)"),
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

fn vocab_size(file: &GgufFile) -> Result<usize> {
    let declared = match file.metadata("llama.vocab_size") {
        Some(_) => Some(file.get_usize("llama.vocab_size")?),
        None => None,
    };
    let rows = file
        .tensor_info("token_embd.weight")
        .and_then(|t| t.shape.first().copied());
    match (rows, declared) {
        (Some(r), Some(d)) if r != d => Err(tensor_error(
            file,
            "token_embd.weight",
            format!("{r} rows but llama.vocab_size is {d}"),
        )),
        (Some(n), _) | (None, Some(n)) => Ok(n),
        (None, None) => Ok(file.get_str_array("tokenizer.ggml.tokens")?.len()),
    }
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
    let mut weights = hf_weights(&file, &config, device)?;
    weights.set_options(options);
    let model = Llama::from_weights(config.clone(), &mut weights)?;
    Ok((model, config, tokenizer))
}

/// Every tensor the model needs under its HF name, dequantized and un-permuted when a model
/// takes it (one tensor at a time: an int8 model never exists whole in f32). Missing and
/// misshapen tensors are errors now, before anything is built.
pub fn hf_weights(file: &Arc<GgufFile>, config: &LlamaConfig, device: &Device) -> Result<Weights> {
    let mut weights = Weights::new(file.path(), device);
    for (gguf_name, hf_name, shape, heads) in tensor_map(config) {
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

/// (GGUF name, HF name, row-major shape, heads to un-permute by) of every tensor. Biases
/// are included when the config says so (q/k biases are permuted like their weights' rows).
fn tensor_map(c: &LlamaConfig) -> Vec<(String, String, Vec<usize>, Option<usize>)> {
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
        let linears = [
            (
                "attn_q",
                "self_attn.q_proj",
                q,
                h,
                Some(heads),
                c.attention_bias,
            ),
            (
                "attn_k",
                "self_attn.k_proj",
                kv,
                h,
                Some(kv_heads),
                c.attention_bias,
            ),
            ("attn_v", "self_attn.v_proj", kv, h, None, c.attention_bias),
            (
                "attn_output",
                "self_attn.o_proj",
                h,
                q,
                None,
                c.attention_bias,
            ),
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
