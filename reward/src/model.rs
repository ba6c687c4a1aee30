//! [`RewardModel`]: an encoder, a classification head and its tokenizer; texts in, one
//! reward each.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use lathe_core::{DType, Device, Tensor};
use lathe_models::hf::Weights;
use lathe_models::tokenizer::Tokenizer;
use serde_json::Value;

use crate::config::{reward_index, Architecture, EncoderConfig, Pooling};
use crate::encoder::Encoder;
use crate::head::{pool, Head};
use crate::{Error, Result, Reward};

/// Files copied from the encoder directory into a saved reward model (when present).
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// How to load a reward model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The label whose logit is the reward (name, case-insensitive, or index). Default: the
    /// label the model was trained with by lathe, else the positive one (see
    /// [`crate::config::reward_index`]).
    pub reward_label: Option<String>,
    /// Texts per forward pass.
    pub batch_size: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            reward_label: None,
            batch_size: 16,
        }
    }
}

/// Token ids of a batch of texts, ready for the encoder.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// Per text, its token ids (special tokens included, truncated to the position table).
    pub ids: Vec<Vec<u32>>,
    /// How many of the texts were longer than the position table and were truncated.
    pub truncated: usize,
}

/// A sentiment reward model: encoder + head + tokenizer.
///
/// `score` gives the raw logit of the reward label (no softmax), as the seed's
/// `pipeline("sentiment-analysis", function_to_apply="none")` with the POSITIVE logit.
/// Texts longer than the encoder's position table are truncated to it (the last token, the
/// tokenizer's `[SEP]`, is kept, as transformers' `truncation=True`); the first time it happens
/// a line goes to stderr, and [`RewardModel::truncated_count`] counts them. Empty texts are
/// scored as `[CLS] [SEP]`, as transformers does.
#[derive(Debug)]
pub struct RewardModel {
    pub(crate) encoder: Encoder,
    pub(crate) head: Option<Head>,
    pub(crate) tokenizer: Tokenizer,
    /// Label names by id.
    pub(crate) labels: Vec<String>,
    pub(crate) reward_index: usize,
    /// The pooling of `embed` (the head's, else the directory's `1_Pooling`, else mean).
    pub(crate) pooling: Pooling,
    pub(crate) batch_size: usize,
    /// The directory the tokenizer files came from.
    pub(crate) source_dir: PathBuf,
    truncated: AtomicUsize,
    warned: AtomicBool,
}

/// The weights of a HF directory (single `model.safetensors` or the shards of
/// `model.safetensors.index.json`), read one tensor at a time as the encoder takes them
/// (loading holds the encoder built so far plus one tensor, never a whole file). Integer
/// buffers such as BERT's `embeddings.position_ids` (I64, saved by older transformers) are
/// never taken, so never read.
pub fn read_weights(dir: &Path, device: &Device) -> Result<Weights> {
    Ok(Weights::from_hf_dir(dir, device)?)
}

/// The `tokenizer.json` of an encoder directory, checked against the encoder's vocabulary.
pub fn read_tokenizer(dir: &Path, config: &EncoderConfig) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::File {
            path: dir.display().to_string(),
            detail: "no tokenizer.json (lathe-reward needs the fast tokenizer file)".into(),
        });
    }
    let tokenizer = Tokenizer::from_file(&path)?;
    tokenizer.check_fits(config.vocab_size)?;
    Ok(tokenizer)
}

/// Token ids of `texts` with the tokenizer's special tokens, truncated to `max_positions`
/// (keeping the final special token, as transformers' `truncation=True`). A text that
/// tokenizes to nothing at all (a tokenizer without `[CLS]`/`[SEP]`) is an error.
pub fn encode_ids(tokenizer: &Tokenizer, max_positions: usize, texts: &[&str]) -> Result<Encoded> {
    let mut ids = tokenizer.encode_batch(texts, true)?;
    let mut truncated = 0;
    for (i, row) in ids.iter_mut().enumerate() {
        if row.is_empty() {
            return Err(Error::Config(format!(
                "text {i} ({:?}) has no tokens: the tokenizer adds no special tokens",
                texts[i]
            )));
        }
        if row.len() > max_positions {
            let last = *row.last().expect("non-empty");
            row.truncate(max_positions - 1);
            row.push(last);
            truncated += 1;
        }
    }
    Ok(Encoded { ids, truncated })
}

/// The pooling a sentence-transformers directory declares in `1_Pooling/config.json`.
fn directory_pooling(dir: &Path) -> Pooling {
    let Some(value) = std::fs::read_to_string(dir.join("1_Pooling").join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
    else {
        return Pooling::Mean;
    };
    if value.get("pooling_mode_cls_token").and_then(Value::as_bool) == Some(true) {
        Pooling::First
    } else {
        Pooling::Mean
    }
}

impl RewardModel {
    /// Loads a reward model (or a bare encoder, for [`RewardModel::embed`]) from a HF
    /// directory: `config.json`, `model.safetensors` (or shards), `tokenizer.json`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<RewardModel> {
        RewardModel::load_with(dir, device, &LoadOptions::default())
    }

    /// [`RewardModel::load`] with options.
    ///
    /// Heads: a `lathe_reward` section in `config.json` means lathe's linear head
    /// (`classifier.*` on pooled states); a DistilBERT with `pre_classifier.*` and
    /// `classifier.*` is a `DistilBertForSequenceClassification`; without either the model
    /// is an encoder only (embeddings work, scoring errors). On the CPU the frozen linear
    /// weights get a copy packed for the forward ([`Encoder::pack_frozen_weights`]).
    pub fn load_with(
        dir: impl AsRef<Path>,
        device: &Device,
        options: &LoadOptions,
    ) -> Result<RewardModel> {
        let dir = dir.as_ref();
        if options.batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        let config = EncoderConfig::from_dir(dir)?;
        let tokenizer = read_tokenizer(dir, &config)?;
        let mut weights = read_weights(dir, device)?;
        let mut encoder = Encoder::load(&mut weights, &config)?;
        // Loaded to score: the weights are final.
        encoder.pack_frozen_weights()?;
        let mut labels = config.labels.clone();
        let h = config.hidden;
        let head = if let Some(pooling) = config.lathe_pooling {
            if labels.len() < 2 {
                return Err(Error::File {
                    path: dir.join("config.json").display().to_string(),
                    detail: "a lathe reward model needs id2label with at least 2 labels".into(),
                });
            }
            Some(Head::load_linear(&mut weights, h, labels.len(), pooling)?)
        } else if config.architecture == Architecture::DistilBert
            && weights.contains("classifier.weight")
            && weights.contains("pre_classifier.weight")
        {
            if labels.is_empty() {
                // transformers' default: two labels LABEL_0, LABEL_1.
                labels = vec!["LABEL_0".into(), "LABEL_1".into()];
            }
            Some(Head::load_distilbert(&mut weights, h, labels.len())?)
        } else if weights.contains("classifier.weight") {
            return Err(Error::File {
                path: dir.display().to_string(),
                detail: "a BERT sequence-classification head (pooler + tanh + classifier) is not \
                         supported; train a lathe head on this encoder with `lathe reward-train`"
                    .into(),
            });
        } else {
            None
        };
        let pooling = match &head {
            Some(head) => head.pooling(),
            None => directory_pooling(dir),
        };
        let index = if head.is_some() {
            let wanted = options
                .reward_label
                .clone()
                .or_else(|| config.saved_reward_label());
            reward_index(&labels, wanted.as_deref())?
        } else {
            0
        };
        Ok(RewardModel {
            encoder,
            head,
            tokenizer,
            labels,
            reward_index: index,
            pooling,
            batch_size: options.batch_size,
            source_dir: dir.to_path_buf(),
            truncated: AtomicUsize::new(0),
            warned: AtomicBool::new(false),
        })
    }

    /// A model from parts (training builds one around a fresh head).
    pub(crate) fn from_parts(
        encoder: Encoder,
        head: Option<Head>,
        tokenizer: Tokenizer,
        labels: Vec<String>,
        reward_index: usize,
        pooling: Pooling,
        source_dir: PathBuf,
    ) -> RewardModel {
        RewardModel {
            encoder,
            head,
            tokenizer,
            labels,
            reward_index,
            pooling,
            batch_size: 16,
            source_dir,
            truncated: AtomicUsize::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// The encoder's config.
    pub fn config(&self) -> &EncoderConfig {
        self.encoder.config()
    }

    /// The encoder.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The classification head; `None` for an encoder without one.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    /// The tokenizer texts are encoded with.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.encoder.device()
    }

    /// Label names by id.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The label whose logit is the reward.
    pub fn reward_label(&self) -> &str {
        self.labels
            .get(self.reward_index)
            .map_or("", String::as_str)
    }

    /// Chooses the reward label by name (case-insensitive) or index.
    pub fn set_reward_label(&mut self, label: &str) -> Result<()> {
        self.reward_index = reward_index(&self.labels, Some(label))?;
        Ok(())
    }

    /// Sets how many texts are scored per forward pass (>= 1; an error for 0).
    pub fn set_batch_size(&mut self, batch_size: usize) -> Result<()> {
        if batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        self.batch_size = batch_size;
        Ok(())
    }

    /// The pooling of [`RewardModel::embed`].
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// How many texts were truncated to the position table so far.
    pub fn truncated_count(&self) -> usize {
        self.truncated.load(Ordering::Relaxed)
    }

    /// Token ids of `texts` with the tokenizer's special tokens, truncated to the position
    /// table (keeping the final special token). A text that tokenizes to nothing at all (a
    /// tokenizer without `[CLS]`/`[SEP]`) is an error.
    pub fn encode(&self, texts: &[&str]) -> Result<Encoded> {
        let max = self.encoder.config().max_positions;
        let encoded = encode_ids(&self.tokenizer, max, texts)?;
        let truncated = encoded.truncated;
        if truncated > 0 {
            self.truncated.fetch_add(truncated, Ordering::Relaxed);
            if !self.warned.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "lathe-reward: {truncated} text(s) longer than the encoder's {max} positions were \
                     truncated to {max} tokens (said once; RewardModel::truncated_count counts them all)"
                );
            }
        }
        Ok(encoded)
    }

    /// Pooled states (B, H) of token-id rows (with gradients to any trainable encoder
    /// tensors when recording).
    pub fn pooled_ids(&self, ids: &[Vec<u32>], pooling: Pooling) -> Result<Tensor> {
        let states = self.encoder.forward(ids)?;
        pool(&states, &row_lengths(ids), pooling)
    }

    /// Logits (B, labels) of token-id rows.
    pub fn logits_ids(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let head = self.require_head()?;
        let states = self.encoder.forward(ids)?;
        head.forward(&states, &row_lengths(ids))
    }

    fn require_head(&self) -> Result<&Head> {
        self.head.as_ref().ok_or_else(|| {
            Error::Config(format!(
                "{} has no classification head: it is an encoder only (train a reward model on it \
                 with `lathe reward-train`)",
                self.source_dir.display()
            ))
        })
    }

    /// Runs `f` on the model's batches of `texts` without gradient recording and gathers
    /// the rows of its (B, width) outputs.
    fn batched(
        &self,
        texts: &[&str],
        f: impl Fn(&[Vec<u32>]) -> Result<Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let _no_grad = lathe_core::no_grad();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.batch_size) {
            let encoded = self.encode(chunk)?;
            let y = f(&encoded.ids)?;
            let width = y.shape()[1];
            let values = y.to_dtype(DType::F32)?.to_vec_f32()?;
            out.extend(values.chunks(width.max(1)).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// All label logits of each text.
    pub fn logits(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        self.require_head()?;
        self.batched(texts, |ids| self.logits_ids(ids))
    }

    /// The reward of each text: the raw logit of the reward label.
    pub fn score_texts(&self, texts: &[&str]) -> Result<Vec<f32>> {
        Ok(self
            .logits(texts)?
            .into_iter()
            .map(|row| row[self.reward_index])
            .collect())
    }

    /// Pooled encoder states of each text (sentence embeddings: mean pooling for
    /// all-MiniLM-L6-v2, as sentence-transformers without normalisation).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        self.batched(texts, |ids| self.pooled_ids(ids, self.pooling))
    }

    /// Writes the model as a directory [`RewardModel::load`] reads back (and transformers'
    /// `AutoModel` reads the encoder of): `config.json` (the encoder's, with `id2label`,
    /// `label2id` and a `lathe_reward` section: format 1, head "linear", pooling, reward
    /// label), `model.safetensors` (encoder tensors under their HF names, LoRA merged; the
    /// head as `classifier.weight` (labels, H) and `classifier.bias`, or DistilBERT's
    /// `pre_classifier.*` too), and the tokenizer files of the source directory.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let head = self.require_head()?;
        let file_error = |path: &Path, e: std::io::Error| Error::File {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
        let mut encoder = self.encoder.clone();
        encoder.merge_lora()?;
        let mut named = encoder.named_tensors()?;
        named.extend(head.named_tensors()?);
        let named: Vec<(String, Tensor)> = named
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.detach())))
            .collect::<Result<_>>()?;
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut metadata = HashMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        lathe_core::safetensors::save(&dir.join("model.safetensors"), &refs, Some(metadata))?;
        let config = match head {
            Head::Linear { pooling, .. } => {
                self.config()
                    .with_head(&self.labels, *pooling, self.reward_label())
            }
            Head::DistilBert { .. } => Value::Object(self.config().raw.clone()),
        };
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::Config(format!("cannot serialise config: {e}")))?;
        std::fs::write(&config_path, text).map_err(|e| file_error(&config_path, e))?;
        for name in TOKENIZER_FILES {
            let from = self.source_dir.join(name);
            let to = dir.join(name);
            if from.is_file() && from != to {
                std::fs::copy(&from, &to).map_err(|e| file_error(&to, e))?;
            }
        }
        Ok(())
    }
}

impl Reward for RewardModel {
    fn score(&self, texts: &[String]) -> Result<Vec<f32>> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.score_texts(&refs)
    }
}

/// Tokens of each row.
fn row_lengths(ids: &[Vec<u32>]) -> Vec<usize> {
    ids.iter().map(Vec::len).collect()
}
