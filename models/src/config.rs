//! Model configurations read from a HF `config.json`.
//!
//! The fields are the ones transformers' `GPTNeoXConfig` and `LlamaConfig` use, under the same
//! names and with the same defaults, so a config written by `save_pretrained` reads as it is.
//! Fields lathe does not use (dropouts, initializer ranges, `architectures`, ...) are kept in
//! `extra`, so a config read and written back loses nothing. Values lathe cannot honour
//! (an unknown activation, RoPE scaling) are errors at load time, not surprises later.
//!
//! Both layouts transformers writes are read:
//! - 4.46 and earlier: rotary settings at the top level (`rotary_pct` / `rotary_emb_base` for
//!   GPT-NeoX, `rope_theta` for Llama, `rope_scaling` for scaled RoPE), `torch_dtype`;
//! - 5.x: a `rope_parameters` object (`rope_type`, `rope_theta`, `partial_rotary_factor`, and
//!   for scaled RoPE `factor`, ...), `dtype`.
//!
//! transformers 5.x prefers `rope_parameters` over the top-level keys and 4.46 reads only the
//! top-level ones, so where both are present and disagree the config means different models
//! to the two versions: that is an error here, naming both keys. A `rope_type` other than
//! "default" (scaled RoPE) is refused. Writing a config back keeps both layouts and makes
//! them agree with the values lathe uses.
//!
//! The rule for keys: a key that changes the math is implemented or refused; a key lathe does
//! not know is listed by [`ModelConfig::unknown_keys`] (the loader's caller reports them once,
//! see [`ModelConfig::load_warning`]); metadata and settings that do not change the forward
//! pass ([`HARMLESS_KEYS`]) are kept silently.
//!
//! Dropout: lathe never applies the base model's own dropout (`attention_dropout`,
//! `hidden_dropout`, ...); its forward is transformers' eval-mode forward, in inference and in
//! training alike (trl's current trainers disable the policy's dropout too; lathe's training
//! randomness is LoRA and value-head dropout, which it implements). A non-zero value
//! therefore changes nothing at inference and is not an error; it is reported by
//! [`ModelConfig::unapplied_settings`] so that a user who trains knows it is not applied.

use std::path::Path;

use lathe_core::ops::unary::GeluKind;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

pub use crate::arch::ArchConfig;
use crate::{Error, Result};
use std::any::Any;
use std::sync::Arc;

/// A token id or a list of them: Llama 3 style configs list several end-of-sequence ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id (`"eos_token_id": 2`).
    One(u32),
    /// A list of ids (`"eos_token_id": [128001, 128009]`).
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
#[non_exhaustive]
pub struct GptNeoxConfig {
    /// Rows of the embedding matrix (token ids are below this).
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads (each `hidden_size / num_attention_heads` wide).
    pub num_attention_heads: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Fraction of each head's dims that rotate (pythia and 20B: 0.25).
    #[serde(default = "GptNeoxConfig::default_rotary_pct")]
    pub rotary_pct: f64,
    /// RoPE's base frequency θ (default 10000).
    #[serde(default = "GptNeoxConfig::default_rotary_emb_base")]
    pub rotary_emb_base: f64,
    /// LayerNorm's epsilon (default 1e-5).
    #[serde(default = "GptNeoxConfig::default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// x + attn(ln1(x)) + mlp(ln2(x)) when true; sequential residuals when false.
    #[serde(default = "default_true")]
    pub use_parallel_residual: bool,
    /// "gelu" (exact erf form) or "gelu_fast" / "gelu_new" (tanh form).
    #[serde(default = "GptNeoxConfig::default_hidden_act")]
    pub hidden_act: String,
    /// The output head shares the embedding matrix (default false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The longest sequence the model's positions cover (default 2048).
    #[serde(default = "GptNeoxConfig::default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether query_key_value and dense carry biases (transformers >= 4.41; default true).
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    /// The beginning-of-sequence id.
    #[serde(default, deserialize_with = "nullable")]
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence id or ids.
    #[serde(default, deserialize_with = "nullable")]
    pub eos_token_id: Option<TokenIds>,
    /// transformers 4.46's scaled-RoPE settings: only `null` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// transformers 5.x's rotary settings, as read (`rope_type` "default" only; its
    /// `rope_theta` / `partial_rotary_factor` are copied into the fields above when those are
    /// absent, and must agree with them when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
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

    /// Each attention head's width: `hidden_size / num_attention_heads`.
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

    /// Checks the values a model needs to be built: every size positive and the model's size
    /// representable, eps and rotary base positive, rotary fraction in (0, 1], the RoPE
    /// settings of both config layouts in agreement and of the plain kind.
    pub fn validate(&self) -> Result<()> {
        const ARCH: &str = "gpt_neox";
        check_sizes(
            ARCH,
            &[
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
        )?;
        check_heads(ARCH, self.hidden_size, self.num_attention_heads)?;
        let (v, h, l, f) = (
            self.vocab_size,
            self.hidden_size,
            self.num_hidden_layers,
            self.intermediate_size,
        );
        let embeddings = if self.tie_word_embeddings { 1 } else { 2 };
        check_total_size(
            ARCH,
            &[
                &[("", embeddings), ("vocab_size", v), ("hidden_size", h)],
                &[
                    ("num_hidden_layers", l),
                    ("", 4),
                    ("hidden_size", h),
                    ("hidden_size", h),
                ],
                &[
                    ("num_hidden_layers", l),
                    ("", 2),
                    ("intermediate_size", f),
                    ("hidden_size", h),
                ],
                &[("num_hidden_layers", l), ("", 9), ("hidden_size", h)],
                &[("num_hidden_layers", l), ("intermediate_size", f)],
                &[
                    ("", 2),
                    ("max_position_embeddings", self.max_position_embeddings),
                    ("head_size", self.head_size()),
                ],
            ],
        )?;
        check_positive(
            ARCH,
            "layer_norm_eps",
            self.layer_norm_eps,
            "typically 1e-5",
        )?;
        check_positive(
            ARCH,
            "rotary_emb_base",
            self.rotary_emb_base,
            "typically 10000",
        )?;
        if !(self.rotary_pct > 0.0 && self.rotary_pct <= 1.0) {
            return Err(Error::Config(format!(
                "{ARCH}: rotary_pct (partial_rotary_factor) {} is out of range: the fraction of \
                 each head's dims that rotate must be in (0, 1]",
                self.rotary_pct
            )));
        }
        let rotary = self.rotary_ndims();
        if rotary == 0 || !rotary.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "{ARCH}: rotary dims int({} * {}) = {rotary} must be even and positive",
                self.head_size(),
                self.rotary_pct
            )));
        }
        check_rope_scaling(ARCH, &self.rope_scaling)?;
        BnbInt8Config::from_extra(ARCH, &self.extra)?;
        let theta = ("rotary_emb_base", self.rotary_emb_base);
        let pct = ("rotary_pct", self.rotary_pct);
        check_rope_parameters(
            ARCH,
            &self.rope_parameters,
            &[("rope_theta", theta), ("partial_rotary_factor", pct)],
        )?;
        // transformers (4.46 and 5.x) writes these top-level mirrors for gpt_neox and reads
        // neither: one that disagrees means the config was edited in the wrong place.
        for (mirror, (used, value)) in [("rope_theta", theta), ("partial_rotary_factor", pct)] {
            if let Some(m) = number_key(ARCH, &self.extra, mirror)? {
                if m != value {
                    return Err(Error::Config(format!(
                        "{ARCH}: {mirror} {m} disagrees with {used} {value}; transformers reads \
                         {used} (or rope_parameters.{mirror}) for gpt_neox and ignores a \
                         top-level {mirror}: make them agree"
                    )));
                }
            }
        }
        self.gelu_kind().map(|_| ())
    }

    /// Keys of config.json lathe does not know (sorted; `rope_parameters.` keys prefixed).
    pub fn unknown_keys(&self) -> Vec<String> {
        unknown_keys(
            &self.extra,
            &["rope_theta", "partial_rotary_factor", QUANTIZATION_KEY],
            &self.rope_parameters,
        )
    }
}

/// Llama (transformers `LlamaConfig`, model_type "llama"): SmolLM2, TinyLlama, Llama 2/3.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LlamaConfig {
    /// Rows of the embedding matrix (token ids are below this).
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Grouped-query attention: key/value heads shared by groups of query heads. Absent means
    /// as many as the query heads.
    #[serde(default, deserialize_with = "nullable")]
    pub num_key_value_heads: Option<usize>,
    /// Width of the gated MLP's inner layer.
    pub intermediate_size: usize,
    /// Per-head dims; absent means hidden_size / num_attention_heads.
    #[serde(default, deserialize_with = "nullable")]
    pub head_dim: Option<usize>,
    /// RoPE's base frequency θ (default 10000).
    #[serde(default = "LlamaConfig::default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm's epsilon (default 1e-6).
    #[serde(default = "LlamaConfig::default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// The MLP's activation (default "silu").
    #[serde(default = "LlamaConfig::default_hidden_act")]
    pub hidden_act: String,
    /// The output head shares the embedding matrix (default false).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The longest sequence the model's positions cover (default 2048).
    #[serde(default = "LlamaConfig::default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether the q/k/v/o projections carry biases (default false).
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether the MLP's projections carry biases (default false).
    #[serde(default)]
    pub mlp_bias: bool,
    /// The beginning-of-sequence id.
    #[serde(default, deserialize_with = "nullable")]
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence id or ids.
    #[serde(default, deserialize_with = "nullable")]
    pub eos_token_id: Option<TokenIds>,
    /// transformers 4.46's scaled-RoPE settings: only `null` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// transformers 5.x's rotary settings, as read (`rope_type` "default" only; its
    /// `rope_theta` / `partial_rotary_factor` are copied into the fields above when those are
    /// absent, and must agree with them when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
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

    /// Key/value heads: `num_key_value_heads`, or the query heads when absent.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Each head's width: `head_dim`, or `hidden_size / num_attention_heads` when absent.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks the values a model needs to be built: every size positive and the model's size
    /// representable, heads dividing hidden_size and kv heads dividing heads, eps and rope
    /// theta positive, the RoPE settings of both config layouts in agreement and of the plain
    /// kind, rotary over the whole head.
    pub fn validate(&self) -> Result<()> {
        // "llama", or the architecture built on Llama's block (Qwen2) whose config this is.
        let arch = self
            .extra
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama");
        check_sizes(
            arch,
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
            check_heads(arch, self.hidden_size, self.num_attention_heads)?;
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(Error::Config(format!(
                "{arch}: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            )));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(Error::Config(format!(
                "{arch}: head_dim {} must be even and positive for rotary embeddings",
                self.head_dim()
            )));
        }
        let (v, h, l, f) = (
            self.vocab_size,
            self.hidden_size,
            self.num_hidden_layers,
            self.intermediate_size,
        );
        let (heads, kv, d) = (self.num_attention_heads, self.kv_heads(), self.head_dim());
        let embeddings = if self.tie_word_embeddings { 1 } else { 2 };
        check_total_size(
            arch,
            &[
                &[("", embeddings), ("vocab_size", v), ("hidden_size", h)],
                &[
                    ("num_hidden_layers", l),
                    ("", 2),
                    ("num_attention_heads", heads),
                    ("head_dim", d),
                    ("hidden_size", h),
                ],
                &[
                    ("num_hidden_layers", l),
                    ("", 2),
                    ("num_key_value_heads", kv),
                    ("head_dim", d),
                    ("hidden_size", h),
                ],
                &[
                    ("num_hidden_layers", l),
                    ("", 3),
                    ("intermediate_size", f),
                    ("hidden_size", h),
                ],
                &[("num_hidden_layers", l), ("", 2), ("hidden_size", h)],
                &[
                    ("", 2),
                    ("max_position_embeddings", self.max_position_embeddings),
                    ("head_dim", d),
                ],
            ],
        )?;
        check_positive(
            arch,
            "rms_norm_eps",
            self.rms_norm_eps,
            "typically 1e-5 or 1e-6",
        )?;
        check_positive(
            arch,
            "rope_theta",
            self.rope_theta,
            "typically 10000 to 500000",
        )?;
        if self.hidden_act != "silu" {
            return Err(Error::Config(format!(
                "{arch}: hidden_act {:?} is not supported (expected \"silu\")",
                self.hidden_act
            )));
        }
        check_rope_scaling(arch, &self.rope_scaling)?;
        BnbInt8Config::from_extra(arch, &self.extra)?;
        check_rope_parameters(
            arch,
            &self.rope_parameters,
            &[("rope_theta", ("rope_theta", self.rope_theta))],
        )?;
        // Partial rotary is GPT-NeoX's; lathe's Llama rotates the whole head.
        let partial = [
            (
                "partial_rotary_factor",
                number_key(arch, &self.extra, "partial_rotary_factor")?,
            ),
            (
                "rope_parameters.partial_rotary_factor",
                match &self.rope_parameters {
                    Some(Value::Object(p)) => number_key(arch, p, "partial_rotary_factor")?,
                    _ => None,
                },
            ),
        ];
        for (key, value) in partial {
            if let Some(p) = value.filter(|p| *p != 1.0) {
                return Err(Error::Config(format!(
                    "{arch}: {key} {p} is not supported: lathe's Llama rotates the whole head_dim \
                     (partial_rotary_factor 1.0)"
                )));
            }
        }
        Ok(())
    }

    /// Keys of config.json lathe does not know (sorted; `rope_parameters.` keys prefixed).
    pub fn unknown_keys(&self) -> Vec<String> {
        unknown_keys(
            &self.extra,
            &["partial_rotary_factor", QUANTIZATION_KEY],
            &self.rope_parameters,
        )
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
            "{arch}: rope_scaling {v} is not supported (only plain rotary embeddings, rope_type \"default\")"
        ))),
    }
}

/// A float setting that must be finite and positive.
fn check_positive(arch: &str, name: &str, value: f64, typical: &str) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{arch}: {name} {value} is out of range: must be a finite number > 0 ({typical})"
    )))
}

/// The element count of the model's weights (and rotary tables), a sum of products of
/// sizes: every product and the sum must fit a usize, and the f32 bytes an allocation
/// (isize::MAX). `("", n)` is a constant factor.
fn check_total_size(arch: &str, terms: &[&[(&str, usize)]]) -> Result<()> {
    let describe = |term: &[(&str, usize)]| {
        term.iter()
            .map(|(name, v)| {
                if name.is_empty() {
                    v.to_string()
                } else {
                    format!("{name} {v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" * ")
    };
    let too_large = |what: String| {
        Error::Config(format!(
            "{arch}: sizes out of range: {what} is too large for this machine's memory \
             (at most {} bytes of f32 weights)",
            isize::MAX
        ))
    };
    let mut total = 0usize;
    for term in terms {
        let product = term
            .iter()
            .try_fold(1usize, |p, (_, v)| p.checked_mul(*v))
            .ok_or_else(|| too_large(describe(term)))?;
        total = total
            .checked_add(product)
            .ok_or_else(|| too_large("the weights' total size".into()))?;
    }
    match total.checked_mul(4) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
        _ => Err(too_large(format!("{total} weights"))),
    }
}

/// A number under `key` of `map` (`None` when absent or null; an error when not a number).
fn number_key(arch: &str, map: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(Error::Config(format!(
            "{arch}: {key} {other} is not a number"
        ))),
    }
}

/// transformers 5.x's `rope_parameters`: absent, null or one flat object of `rope_type`
/// "default" whose values of `checked` (key in rope_parameters, (field, value lathe uses))
/// agree with lathe's. Other keys are reported by [`unknown_keys`].
fn check_rope_parameters(
    arch: &str,
    rope_parameters: &Option<Value>,
    checked: &[(&str, (&str, f64))],
) -> Result<()> {
    let params = match rope_parameters {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(Error::Config(format!(
                "{arch}: rope_parameters {other} is not an object"
            )))
        }
    };
    if let Some((key, _)) = params.iter().find(|(_, v)| v.is_object()) {
        return Err(Error::Config(format!(
            "{arch}: rope_parameters.{key} is an object: per-layer-type RoPE parameters are not \
             supported (one flat rope_parameters object with rope_type \"default\")"
        )));
    }
    let kind = |key: &str| match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(Error::Config(format!(
            "{arch}: rope_parameters.{key} {other} is not a string"
        ))),
    };
    let (rope_type, legacy_type) = (kind("rope_type")?, kind("type")?);
    if let (Some(a), Some(b)) = (rope_type, legacy_type) {
        if a != b {
            return Err(Error::Config(format!(
                "{arch}: rope_parameters.rope_type {a:?} and rope_parameters.type {b:?} disagree"
            )));
        }
    }
    if let Some(t) = rope_type.or(legacy_type).filter(|t| *t != "default") {
        return Err(Error::Config(format!(
            "{arch}: rope_parameters.rope_type {t:?} is not supported (only \"default\", plain \
             rotary embeddings; scaled RoPE changes the rotary frequencies)"
        )));
    }
    for (key, (field, used)) in checked {
        if let Some(v) = number_key(arch, params, key)? {
            if v != *used {
                return Err(Error::Config(format!(
                    "{arch}: rope_parameters.{key} {v} disagrees with {field} {used}: \
                     transformers 5.x uses rope_parameters.{key} and 4.46 uses {field}, so the \
                     config means two different models; make them agree"
                )));
            }
        }
    }
    Ok(())
}

/// Keys of config.json that change nothing in lathe's forward pass: metadata, Python runtime
/// options, generation defaults (lathe's generation takes its own), the classification
/// head's dropout (no such head here), and tensor-parallel slicing that computes the same
/// products. The model dropouts are here too; see [`DROPOUT_KEYS`].
pub const HARMLESS_KEYS: &[&str] = &[
    "model_type",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "classifier_dropout",
    "is_decoder",
    "is_encoder_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "torchscript",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "chunk_size_feed_forward",
    "pretraining_tp",
    "attn_implementation",
    "_attn_implementation",
    "_commit_hash",
    "transformers.js_config",
    "is_llama_config",
    "rope_interleaved",
    // Generation defaults.
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// The base model's own dropout probabilities (current and older transformers names). lathe
/// never applies them (see the module docs); non-zero ones are listed by
/// [`ModelConfig::unapplied_settings`].
pub const DROPOUT_KEYS: &[&str] = &[
    "attention_dropout",
    "hidden_dropout",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
];

/// Keys of `rope_parameters` lathe reads (rope_type "default" ones).
const ROPE_PARAMETER_KEYS: &[&str] = &["rope_type", "type", "rope_theta", "partial_rotary_factor"];

fn unknown_keys(
    extra: &Map<String, Value>,
    handled: &[&str],
    rope_parameters: &Option<Value>,
) -> Vec<String> {
    let mut keys: Vec<String> = extra
        .keys()
        .filter(|k| {
            let k = k.as_str();
            !HARMLESS_KEYS.contains(&k) && !DROPOUT_KEYS.contains(&k) && !handled.contains(&k)
        })
        .cloned()
        .collect();
    // rope_interleaved (nanotron's) is harmless as false, the only form transformers loads.
    if extra
        .get("rope_interleaved")
        .is_some_and(|v| v != &Value::Bool(false))
    {
        keys.push("rope_interleaved".into());
    }
    if let Some(Value::Object(params)) = rope_parameters {
        keys.extend(
            params
                .keys()
                .filter(|k| !ROPE_PARAMETER_KEYS.contains(&k.as_str()))
                .map(|k| format!("rope_parameters.{k}")),
        );
    }
    keys.sort();
    keys
}

/// Non-zero model dropouts, as "key value".
fn unapplied_dropouts(extra: &Map<String, Value>) -> Vec<String> {
    DROPOUT_KEYS
        .iter()
        .filter_map(|k| {
            let v = extra.get(*k)?;
            let zero = v.is_null() || v.as_f64() == Some(0.0);
            (!zero).then(|| format!("{k} {v}"))
        })
        .collect()
}

/// Copies `rope_parameters[from]` into `map[to]` when `map` has no (or a null) `to`: a config
/// written by transformers 5.x has only the former. Values are checked by `validate`.
fn fill_from_rope_parameters(map: &mut Map<String, Value>, to: &str, from: &str) {
    if !map.get(to).is_none_or(Value::is_null) {
        return;
    }
    let value = match map.get("rope_parameters") {
        Some(Value::Object(p)) => p.get(from).filter(|v| v.is_number()).cloned(),
        _ => None,
    };
    if let Some(v) = value {
        map.insert(to.to_string(), v);
    }
}

/// Sets `map[key]` to `value` where it holds a different number (a value lathe changed),
/// leaving equal numbers as they were written.
fn sync_number(map: &mut Map<String, Value>, key: &str, value: f64, insert: bool) {
    let same = map.get(key).and_then(Value::as_f64) == Some(value);
    if !same && (insert || map.get(key).is_some_and(|v| !v.is_null())) {
        if let Some(n) = serde_json::Number::from_f64(value) {
            map.insert(key.to_string(), Value::Number(n));
        }
    }
}

/// The config.json key of a quantized checkpoint's settings.
pub const QUANTIZATION_KEY: &str = "quantization_config";

/// Keys of a bitsandbytes `quantization_config` (transformers' `BitsAndBytesConfig.to_dict()`,
/// 4.3x to 5.x) that lathe reads or that cannot change an 8-bit checkpoint's forward pass:
/// the `bnb_4bit_*` settings describe 4-bit quantization only, and
/// `llm_int8_enable_fp32_cpu_offload` is device placement. Any other key is refused: lathe
/// cannot tell whether it changes the quantized math.
const BNB_KEYS: &[&str] = &[
    "quant_method",
    "load_in_8bit",
    "load_in_4bit",
    "_load_in_8bit",
    "_load_in_4bit",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_has_fp16_weight",
    "llm_int8_enable_fp32_cpu_offload",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
];

/// A bitsandbytes 8-bit checkpoint's settings (`quantization_config` with `quant_method`
/// "bitsandbytes" and `load_in_8bit`, as transformers writes it when saving a model loaded
/// with `BitsAndBytesConfig(load_in_8bit=True)`). Its block linears are stored as int8 `weight`
/// (out, in) plus f32 `SCB` (out,) row scales and load as LLM.int8 without requantization;
/// 4-bit checkpoints, other quantization methods, `llm_int8_has_fp16_weight` and keys lathe
/// does not know are refused when the config is read.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbInt8Config {
    /// `llm_int8_threshold` (6.0 when absent): the outlier threshold of every int8 layer.
    pub threshold: f32,
    /// `llm_int8_skip_modules`: modules kept dense (none when null; transformers then keeps
    /// only the LM head, which lathe loads dense anyway).
    pub skip_modules: Vec<String>,
}

impl BnbInt8Config {
    /// Reads `quantization_config` from a config's other keys: `None` when absent or null.
    pub fn from_extra(arch: &str, extra: &Map<String, Value>) -> Result<Option<BnbInt8Config>> {
        match extra.get(QUANTIZATION_KEY) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => BnbInt8Config::from_value(v)
                .map(Some)
                .map_err(|e| Error::Config(format!("{arch}: {QUANTIZATION_KEY}: {e}"))),
        }
    }

    /// Parses a `quantization_config` object (errors are the bare reason).
    fn from_value(value: &Value) -> std::result::Result<BnbInt8Config, String> {
        let Value::Object(map) = value else {
            return Err(format!("{value} is not an object"));
        };
        if let Some(key) = map.keys().find(|k| !BNB_KEYS.contains(&k.as_str())) {
            return Err(format!(
                "key {key:?} is not known to lathe and may change the quantized model; \
                 supported: bitsandbytes 8-bit ({})",
                BNB_KEYS.join(", ")
            ));
        }
        let flag = |key: &str| match map.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!("{key} {other} is not a boolean")),
        };
        match map.get("quant_method") {
            // Configs of transformers before 4.31 have no quant_method: bitsandbytes.
            None | Some(Value::Null) => {}
            Some(Value::String(m)) if m == "bitsandbytes" => {}
            Some(other) => {
                return Err(format!(
                    "quant_method {other} is not supported (only \"bitsandbytes\" 8-bit)"
                ))
            }
        }
        if flag("load_in_4bit")? || flag("_load_in_4bit")? {
            return Err(
                "bitsandbytes 4-bit (load_in_4bit) checkpoints are not supported; \
                        lathe loads 8-bit ones (load_in_8bit)"
                    .into(),
            );
        }
        if !(flag("load_in_8bit")? || flag("_load_in_8bit")?) {
            return Err(
                "neither load_in_8bit nor load_in_4bit is true: no quantization \
                        lathe knows"
                    .into(),
            );
        }
        if flag("llm_int8_has_fp16_weight")? {
            return Err(
                "llm_int8_has_fp16_weight true (16-bit weights requantized at every \
                        forward, for training them) is not supported"
                    .into(),
            );
        }
        flag("llm_int8_enable_fp32_cpu_offload")?;
        let threshold = match map.get("llm_int8_threshold") {
            None | Some(Value::Null) => 6.0,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(t) if t.is_finite() && t.abs() <= f32::MAX as f64 => t as f32,
                _ => return Err(format!("llm_int8_threshold {n} is out of range")),
            },
            Some(other) => return Err(format!("llm_int8_threshold {other} is not a number")),
        };
        let skip_modules = match map.get("llm_int8_skip_modules") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item.as_str() {
                    Some(s) if s.contains(|c| "*+?[](){}|^$\\".contains(c)) => Err(format!(
                        "llm_int8_skip_modules pattern {s:?} is a regular expression; lathe \
                         matches module names only (a name, a leading part of one up to a \
                         '.', or a trailing part)"
                    )),
                    Some(s) => Ok(s.to_string()),
                    None => Err(format!(
                        "llm_int8_skip_modules entry {item} is not a string"
                    )),
                })
                .collect::<std::result::Result<_, _>>()?,
            Some(other) => return Err(format!("llm_int8_skip_modules {other} is not a list")),
        };
        Ok(BnbInt8Config {
            threshold,
            skip_modules,
        })
    }

    /// Whether the module `name` (a HF name without `.weight`) is kept dense, with
    /// transformers' matching of plain names: the whole name, a leading part of it ending at a
    /// '.', or its ending ("dense_4h_to_h" skips "gpt_neox.layers.1.mlp.dense_4h_to_h").
    pub fn skips(&self, name: &str) -> bool {
        self.skip_modules.iter().any(|key| {
            name.ends_with(key.as_str())
                || name
                    .strip_prefix(key.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    }
}

/// A model configuration: the config of one architecture (`model_type` of config.json),
/// behind [`ArchConfig`]. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct ModelConfig(Arc<dyn ArchConfig>);

/// An architecture config.json can name: its `model_type`, the rotary keys of 4.46's layout
/// filled from 5.x's `rope_parameters` (top-level key, `rope_parameters` key), and its parser.
/// Adding an architecture is its model file and its line in [`ARCHITECTURES`].
pub struct Registration {
    /// config.json's `model_type` ("llama").
    pub model_type: &'static str,
    /// (top-level key, `rope_parameters` key) pairs of the rotary settings.
    pub rope_keys: &'static [(&'static str, &'static str)],
    /// Reads config.json (rotary keys already filled) into this architecture's config.
    pub parse: fn(Value) -> serde_json::Result<ModelConfig>,
}

/// Every architecture lathe reads.
pub const ARCHITECTURES: &[Registration] = &[
    crate::gpt_neox::REGISTRATION,
    crate::llama::REGISTRATION,
    crate::qwen2::REGISTRATION,
];

impl ModelConfig {
    /// Wraps an architecture's config.
    pub fn new(config: impl ArchConfig + 'static) -> ModelConfig {
        ModelConfig(Arc::new(config))
    }

    /// The architecture's config.
    pub fn arch(&self) -> &dyn ArchConfig {
        &*self.0
    }

    /// The concrete config, when it is a `C` (e.g. `config.downcast_ref::<LlamaConfig>()`).
    pub fn downcast_ref<C: ArchConfig>(&self) -> Option<&C> {
        let any: &dyn Any = &*self.0;
        any.downcast_ref()
    }

    /// Parses config.json text; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<ModelConfig> {
        let file_error = |detail: String| Error::File {
            path: origin.to_string(),
            detail,
        };
        let mut value: Value =
            serde_json::from_str(text).map_err(|e| file_error(format!("invalid JSON: {e}")))?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| file_error("no \"model_type\" string".to_string()))?
            .to_string();
        let Some(registration) = ARCHITECTURES.iter().find(|r| r.model_type == model_type) else {
            let known: Vec<String> = ARCHITECTURES
                .iter()
                .map(|r| format!("{:?}", r.model_type))
                .collect();
            return Err(file_error(format!(
                "unknown model_type {model_type:?} (supported: {})",
                known.join(", ")
            )));
        };
        // transformers 5.x keeps the rotary settings only in rope_parameters.
        if let Value::Object(map) = &mut value {
            for (to, from) in registration.rope_keys {
                fill_from_rope_parameters(map, to, from);
            }
        }
        let config = (registration.parse)(value)
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

    /// Checks every value a model needs to be built; the error names the key.
    pub fn validate(&self) -> Result<()> {
        self.arch().validate()
    }

    /// The config.json text (pretty, with `model_type`). Every key read is kept; the rotary
    /// settings of both layouts (top-level keys, `rope_parameters`) are written with the
    /// values lathe uses, so transformers 4.46 and 5.x read the same model from it.
    pub fn to_json_string(&self) -> Result<String> {
        let arch = self.arch();
        let mut value = arch.to_value();
        if let Ok(Value::Object(map)) = &mut value {
            map.insert("model_type".into(), Value::String(arch.model_type().into()));
            let rope = arch.rope_keys();
            for (top, param, v) in &rope {
                if top != param {
                    // The field is written under its own name; a 5.x-style top-level copy
                    // under the rope_parameters name, when the file had one, is kept in step.
                    sync_number(map, param, *v, false);
                }
            }
            if let Some(Value::Object(params)) = map.get_mut("rope_parameters") {
                for (_, key, v) in rope {
                    sync_number(params, key, v, true);
                }
            }
        }
        value
            .and_then(|v| serde_json::to_string_pretty(&v))
            .map_err(|e| Error::Config(format!("cannot write config.json: {e}")))
    }

    /// Keys of config.json lathe does not know and ignores (sorted; keys inside
    /// `rope_parameters` prefixed `rope_parameters.`). Keys that change the math are
    /// implemented or refused at load time, and [`HARMLESS_KEYS`] are not listed, so these
    /// are keys of newer or other transformers versions whose effect lathe cannot judge.
    pub fn unknown_keys(&self) -> Vec<String> {
        self.arch().unknown_keys()
    }

    /// Settings read but not applied because lathe's forward pass is transformers' eval-mode
    /// one: non-zero model dropouts ("attention_dropout 0.1"). They change nothing at
    /// inference; in training, transformers in train mode would drop out and lathe does not.
    pub fn unapplied_settings(&self) -> Vec<String> {
        unapplied_dropouts(self.arch().extra())
    }

    /// One warning line for [`Self::unknown_keys`] and [`Self::unapplied_settings`], `None`
    /// when both are empty; `origin` names the file. The library never prints: the caller
    /// that loads a model prints this once.
    pub fn load_warning(&self, origin: &str) -> Option<String> {
        let mut parts = Vec::new();
        let unknown = self.unknown_keys();
        if !unknown.is_empty() {
            parts.push(format!(
                "keys lathe does not know, ignored: {}",
                unknown.join(", ")
            ));
        }
        let unapplied = self.unapplied_settings();
        if !unapplied.is_empty() {
            parts.push(format!(
                "not applied (lathe runs the model without its own dropout, as transformers' \
                 eval mode does): {}",
                unapplied.join(", ")
            ));
        }
        (!parts.is_empty()).then(|| format!("warning: {origin}: {}", parts.join("; ")))
    }

    /// The bitsandbytes 8-bit quantization of the checkpoint (`quantization_config`), `None`
    /// for a plain one. Validated when the config was read.
    pub fn bnb_int8(&self) -> Result<Option<BnbInt8Config>> {
        self.arch().bnb_int8()
    }

    /// config.json's `model_type` ("gpt_neox", "llama", "qwen2").
    pub fn model_type(&self) -> &'static str {
        self.arch().model_type()
    }

    /// Rows of the embedding matrix (token ids are below this).
    pub fn vocab_size(&self) -> usize {
        self.arch().vocab_size()
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.arch().hidden_size()
    }

    /// Number of transformer blocks.
    pub fn num_hidden_layers(&self) -> usize {
        self.arch().num_hidden_layers()
    }

    /// The longest sequence the model's positions cover.
    pub fn max_position_embeddings(&self) -> usize {
        self.arch().max_position_embeddings()
    }

    /// The beginning-of-sequence id, when the config names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.arch().bos_token_id()
    }

    /// Every end-of-sequence id (empty when the config names none).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.arch().eos_token_ids()
    }

    /// peft `target_modules` lathe's commands adapt when none are given.
    pub fn default_lora_targets(&self) -> &'static [&'static str] {
        self.arch().default_lora_targets()
    }
}
