//! Encoder configs from HF `config.json` (BERT: `model_type` "bert"; DistilBERT:
//! "distilbert"), the labels of a classification head (`id2label`), and lathe's own
//! `lathe_reward` section that a trained reward model carries.

use std::path::Path;

use lathe_core::GeluKind;
use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// The config key of lathe's reward-model settings inside `config.json`.
pub const LATHE_KEY: &str = "lathe_reward";

/// Which encoder family: the two differ in weight names, config keys and token-type
/// embeddings (BERT only), not in the math of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// BERT (`model_type` "bert").
    Bert,
    /// DistilBERT (`model_type` "distilbert").
    DistilBert,
}

/// How token states become one vector per text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pooling {
    /// Mean over the text's tokens (padding excluded), as sentence-transformers.
    #[default]
    Mean,
    /// The first token's state (`[CLS]`).
    First,
}

impl Pooling {
    /// The name in config files and on the command line: "mean" or "first".
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::First => "first",
        }
    }

    /// Reads "mean", or "first" (alias "cls"); an error names the accepted values.
    pub fn parse(name: &str) -> Result<Pooling> {
        match name {
            "mean" => Ok(Pooling::Mean),
            "first" | "cls" => Ok(Pooling::First),
            other => Err(Error::Config(format!(
                "unknown pooling {other:?}: expected \"mean\" or \"first\""
            ))),
        }
    }
}

/// The shape and settings of an encoder, read from `config.json`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EncoderConfig {
    /// The encoder family.
    pub architecture: Architecture,
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// H: width of the hidden states.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (each H / heads wide).
    pub heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate: usize,
    /// Rows of the position table: longer texts are truncated.
    pub max_positions: usize,
    /// BERT's token-type rows (0 for DistilBERT); every token uses type 0.
    pub type_vocab_size: usize,
    /// LayerNorm's epsilon.
    pub layer_norm_eps: f32,
    /// The feed-forward activation's GELU formula.
    pub gelu: GeluKind,
    /// Label names by id from `id2label` (empty when the config has none).
    pub labels: Vec<String>,
    /// The lathe head settings (pooling) of a model trained by lathe.
    pub lathe_pooling: Option<Pooling>,
    /// The whole config, kept to write it back with a new head.
    pub raw: Map<String, Value>,
}

fn usize_key(raw: &Map<String, Value>, key: &str, path: &str) -> Result<usize> {
    raw.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::File {
            path: path.to_string(),
            detail: format!("missing or invalid positive integer {key:?}"),
        })
}

fn gelu_kind(name: &str, path: &str) -> Result<GeluKind> {
    match name {
        "gelu" => Ok(GeluKind::Erf),
        "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Ok(GeluKind::Tanh),
        other => Err(Error::File {
            path: path.to_string(),
            detail: format!("activation {other:?} is not supported (gelu, gelu_new, gelu_fast)"),
        }),
    }
}

impl EncoderConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<EncoderConfig> {
        let path = dir.join("config.json");
        let label = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::File {
            path: label.clone(),
            detail: format!("cannot read: {e}"),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::File {
            path: label.clone(),
            detail: format!("invalid JSON: {e}"),
        })?;
        let Value::Object(raw) = value else {
            return Err(Error::File {
                path: label,
                detail: "not a JSON object".into(),
            });
        };
        EncoderConfig::from_map(raw, &label)
    }

    /// Parses a config object; `path` names it in errors.
    pub fn from_map(raw: Map<String, Value>, path: &str) -> Result<EncoderConfig> {
        let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
        let (architecture, hidden, layers, heads, intermediate, act_key, type_vocab, eps) =
            match model_type {
                "bert" => (
                    Architecture::Bert,
                    usize_key(&raw, "hidden_size", path)?,
                    usize_key(&raw, "num_hidden_layers", path)?,
                    usize_key(&raw, "num_attention_heads", path)?,
                    usize_key(&raw, "intermediate_size", path)?,
                    "hidden_act",
                    raw.get("type_vocab_size").and_then(Value::as_u64).unwrap_or(2) as usize,
                    raw.get("layer_norm_eps")
                        .and_then(Value::as_f64)
                        .unwrap_or(1e-12) as f32,
                ),
                // DistilBERT's LayerNorms use a fixed eps of 1e-12 (not in its config).
                "distilbert" => (
                    Architecture::DistilBert,
                    usize_key(&raw, "dim", path)?,
                    usize_key(&raw, "n_layers", path)?,
                    usize_key(&raw, "n_heads", path)?,
                    usize_key(&raw, "hidden_dim", path)?,
                    "activation",
                    0,
                    1e-12,
                ),
                other => {
                    return Err(Error::File {
                        path: path.to_string(),
                        detail: format!(
                            "model_type {other:?} is not supported: lathe-reward loads \"bert\" and \"distilbert\" encoders"
                        ),
                    })
                }
            };
        if hidden % heads != 0 {
            return Err(Error::File {
                path: path.to_string(),
                detail: format!("hidden size {hidden} is not a multiple of {heads} heads"),
            });
        }
        let act = raw.get(act_key).and_then(Value::as_str).unwrap_or("gelu");
        let gelu = gelu_kind(act, path)?;
        let labels = parse_labels(&raw, path)?;
        let lathe_pooling = match raw.get(LATHE_KEY) {
            None => None,
            Some(section) => {
                let pooling = section
                    .get("pooling")
                    .and_then(Value::as_str)
                    .ok_or_else(|| Error::File {
                        path: path.to_string(),
                        detail: format!("{LATHE_KEY}.pooling is missing"),
                    })?;
                Some(Pooling::parse(pooling)?)
            }
        };
        Ok(EncoderConfig {
            architecture,
            vocab_size: usize_key(&raw, "vocab_size", path)?,
            hidden,
            layers,
            heads,
            intermediate,
            max_positions: usize_key(&raw, "max_position_embeddings", path)?,
            type_vocab_size: type_vocab,
            layer_norm_eps: eps,
            gelu,
            labels,
            lathe_pooling,
            raw,
        })
    }

    /// The config of a lathe-trained reward model on this encoder: labels, and the
    /// `lathe_reward` section (pooling, reward label, format version).
    pub fn with_head(&self, labels: &[String], pooling: Pooling, reward_label: &str) -> Value {
        let mut raw = self.raw.clone();
        let id2label: Map<String, Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), json!(l)))
            .collect();
        let label2id: Map<String, Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), json!(i)))
            .collect();
        raw.insert("id2label".into(), Value::Object(id2label));
        raw.insert("label2id".into(), Value::Object(label2id));
        raw.insert(
            LATHE_KEY.into(),
            json!({
                "format": 1,
                "head": "linear",
                "pooling": pooling.name(),
                "reward_label": reward_label,
            }),
        );
        Value::Object(raw)
    }

    /// The reward label a lathe-trained model was saved with.
    pub fn saved_reward_label(&self) -> Option<String> {
        self.raw
            .get(LATHE_KEY)?
            .get("reward_label")?
            .as_str()
            .map(str::to_string)
    }
}

/// `id2label` ({"0": "NEGATIVE", "1": "POSITIVE"}) as names ordered by id; the ids must be
/// exactly 0..n.
fn parse_labels(raw: &Map<String, Value>, path: &str) -> Result<Vec<String>> {
    let Some(map) = raw.get("id2label").and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    let mut labels = vec![None; map.len()];
    for (id, name) in map {
        let slot = id
            .parse::<usize>()
            .ok()
            .and_then(|i| labels.get_mut(i))
            .ok_or_else(|| Error::File {
                path: path.to_string(),
                detail: format!("id2label key {id:?} is not an id in 0..{}", map.len()),
            })?;
        *slot = Some(name.as_str().unwrap_or_default().to_string());
    }
    Ok(labels.into_iter().map(Option::unwrap_or_default).collect())
}

/// The index of the label that is the reward: `wanted` by name (case-insensitive) when
/// given, else the positive one ("POSITIVE", "pos", "positive", "LABEL_1" of two labels, or
/// index 1 of two labels).
pub fn reward_index(labels: &[String], wanted: Option<&str>) -> Result<usize> {
    if let Some(name) = wanted {
        return labels
            .iter()
            .position(|l| l.eq_ignore_ascii_case(name))
            .or_else(|| name.parse::<usize>().ok().filter(|&i| i < labels.len()))
            .ok_or_else(|| {
                Error::Config(format!(
                    "reward label {name:?} is not one of the model's labels {labels:?}"
                ))
            });
    }
    if let Some(i) = labels
        .iter()
        .position(|l| matches!(l.to_ascii_lowercase().as_str(), "positive" | "pos"))
    {
        return Ok(i);
    }
    if labels.len() == 2 {
        return Ok(1);
    }
    Err(Error::Config(format!(
        "no positive label among {labels:?}: name the reward label"
    )))
}
