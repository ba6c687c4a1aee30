//! Tokenizers: HF `tokenizer.json` files (GPT-NeoX, BERT, ...) and the byte-level BPE
//! tokenizer that a GGUF file carries in its `tokenizer.ggml.*` metadata (SmolLM2).
//!
//! Both wrap the `tokenizers` crate (the engine of the Python `tokenizers` package, with the
//! same onig regex engine), so a `tokenizer.json` encodes exactly as transformers' fast
//! tokenizers do.
//!
//! From GGUF, the tokenizer is rebuilt the way llama.cpp reads the metadata:
//! - `tokenizer.ggml.model` must be "gpt2" (byte-level BPE); `tokens` is the vocabulary (id =
//!   index), `merges` the ranked "left right" merges.
//! - `tokenizer.ggml.pre` selects the pre-tokenizer regexes (llama.cpp `llama-vocab.cpp`):
//!   "smollm" (and starcoder, refact, command-r, codeshell, exaone, minerva-7b) split every
//!   digit on its own (`\p{N}`) before the GPT-2 regex; "gpt-2", "default" and friends use the
//!   GPT-2 regex alone. This equals the `Digits(individual_digits) + ByteLevel` pre-tokenizer
//!   of SmolLM2's own tokenizer.json. "qwen2" (and deepseek-r1-qwen) splits with Qwen2's
//!   tokenizer.json regex (single digits, `\s*[\r\n]+` runs), as its `Split` + `ByteLevel`
//!   pre-tokenizer does (without its NFC normalizer, which neither llama.cpp nor
//!   transformers' GGUF loader applies). Unknown pre types are refused rather than guessed.
//!   (transformers' GGUF loader ignores `tokenizer.ggml.pre` and always uses the GPT-2 regex;
//!   we follow llama.cpp and the original tokenizer. For SmolLM2 the ids agree anyway, its
//!   merges never joining digits, but other vocabularies would differ on digit runs.)
//! - `token_type` 3 (control) tokens become special added tokens (matched before BPE, skipped
//!   by `decode(.., skip_special = true)`), type 4 (user-defined) plain added tokens.
//! - `add_bos_token` / `add_eos_token` (default false) decide what `encode(.., true)` adds.

use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper};

use crate::gguf::GgufFile;
use crate::{Error, Result};

/// GGUF `token_type` values (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// `tokenizer.ggml.pre` values whose llama.cpp regexes are `\p{N}` then the GPT-2 regex.
const PRE_DIGITS_THEN_GPT2: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];

/// `tokenizer.ggml.pre` values that use the GPT-2 regex alone ("default": what transformers
/// does for every GGUF file).
const PRE_GPT2: &[&str] = &[
    "gpt-2",
    "gpt2",
    "default",
    "phi-2",
    "mpt",
    "olmo",
    "roberta-bpe",
];

/// `tokenizer.ggml.pre` values whose llama.cpp regex is Qwen2's ([`QWEN2_REGEX`]).
const PRE_QWEN2: &[&str] = &["qwen2", "deepseek-r1-qwen"];

/// The `Split` regex of Qwen2's tokenizer.json (llama.cpp spells the `(?i:...)` group out
/// case by case; onig takes it as written).
const QWEN2_REGEX: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// `(start, end)` byte offsets of a token in the text it was encoded from.
pub type ByteRange = (usize, usize);

/// A text tokenizer with its special-token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Where it came from, for error messages.
    source: String,
    /// Largest id + 1 (model vocabulary and added tokens).
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a HF `tokenizer.json`.
    ///
    /// Special ids: from `tokenizer_config.json` beside it when that file names
    /// `bos_token`/`eos_token`/`pad_token`; otherwise (or for the ones it leaves out) from
    /// the usual token names present in the vocabulary: bos `<s>`, `<|endoftext|>`, `[CLS]`;
    /// eos `</s>`, `<|endoftext|>`, `[SEP]`; pad `<pad>`, `<|padding|>`, `[PAD]`. For
    /// GPT-NeoX that gives bos = eos = 0 (`<|endoftext|>`) and pad = 1 (`<|padding|>`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let load_error = |detail: String| Error::Tokenizer {
            path: source.clone(),
            detail: format!("cannot load tokenizer.json: {detail}"),
        };
        let text = std::fs::read_to_string(path).map_err(|e| load_error(e.to_string()))?;
        // tokenizers 0.22 panics (`expect("Helper")` in decoders/mod.rs) instead of returning
        // its error when the `decoder` value is cut short or nested past serde_json's depth
        // limit. The same parser with the same limit checks the text as JSON first, so only
        // well-formed documents reach it; the catch is a backstop for panics of the crate on
        // other malformed input (a library never panics on a bad file).
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| load_error(format!("invalid JSON: {e}")))?;
        let inner = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| load_error("the tokenizers crate panicked on its contents".into()))?
            .map_err(|e| load_error(e.to_string()))?;
        if let Some(post) = inner.get_post_processor() {
            serde_json::to_value(post)
                .map_err(|e| e.to_string())
                .and_then(|post| check_post_processor(&post))
                .map_err(|e| load_error(format!("post_processor: {e}")))?;
        }
        // A tokenizer.json may carry padding/truncation settings (all-MiniLM-L6-v2's pads to
        // 128); transformers resets them on every call unless asked, and so do we: encode
        // returns exactly the text's ids. Batching pads on its own.
        let mut inner = inner;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::Tokenizer {
            path: source.clone(),
            detail: format!("cannot disable truncation: {e}"),
        })?;
        let config = path
            .parent()
            .map(|dir| dir.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        let special = |key: &str, fallback: &[&str]| {
            let named = config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str()))
                .and_then(|t| inner.token_to_id(t));
            named.or_else(|| fallback.iter().find_map(|t| inner.token_to_id(t)))
        };
        let bos = special("bos_token", &["<s>", "<|endoftext|>", "[CLS]"]);
        let eos = special("eos_token", &["</s>", "<|endoftext|>", "[SEP]"]);
        let pad = special("pad_token", &["<pad>", "<|padding|>", "[PAD]"]);
        Ok(Self::new(inner, source, bos, eos, pad))
    }

    /// Builds the byte-level BPE tokenizer stored in a GGUF file's metadata (see the module
    /// docs for how each key is used).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let source = file.path().to_string();
        let err = |detail: String| Error::Tokenizer {
            path: source.clone(),
            detail,
        };
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model is {model:?}; lathe builds byte-level BPE (\"gpt2\") tokenizers only"
            )));
        }
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let merges = file
            .get_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        err(format!(
                            "merge {m:?} is not two tokens separated by a space"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_types = match file.metadata("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(_) => file.get_i64_array("tokenizer.ggml.token_type")?,
        };
        if token_types.len() != tokens.len() {
            return Err(err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                token_types.len(),
                tokens.len()
            )));
        }
        let n = tokens.len();
        let id_of = |key: &str| -> Result<Option<u32>> {
            if file.metadata(key).is_none() {
                return Ok(None);
            }
            let id = file.get_u32(key)?;
            if id as usize >= n {
                return Err(err(format!("{key} is {id}, past the {n} tokens")));
            }
            Ok(Some(id))
        };
        let bos = id_of("tokenizer.ggml.bos_token_id")?;
        let eos = id_of("tokenizer.ggml.eos_token_id")?;
        let pad = id_of("tokenizer.ggml.padding_token_id")?;
        let flag = |key: &str| -> Result<bool> {
            match file.metadata(key) {
                None => Ok(false),
                Some(_) => file.get_bool(key),
            }
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token")?;
        let add_eos = flag("tokenizer.ggml.add_eos_token")?;
        let pre = match file.metadata("tokenizer.ggml.pre") {
            None => "gpt-2",
            Some(_) => file.get_str("tokenizer.ggml.pre")?,
        };

        // Later duplicates win, as in transformers' converter (a dict comprehension).
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(format!("cannot build the BPE model: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre).map_err(&err)?));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));

        let added = |ty: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&token_types)
                .filter(|&(_, &t)| t == ty)
                .map(|(tok, _)| AddedToken::from(tok.to_string(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
        inner.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));

        if (add_bos && bos.is_none()) || (add_eos && eos.is_none()) {
            return Err(err(
                "add_bos_token/add_eos_token is set but the bos/eos token id is missing".into(),
            ));
        }
        let post = post_processor(&tokens, bos.filter(|_| add_bos), eos.filter(|_| add_eos))
            .map_err(&err)?;
        inner.with_post_processor(Some(post));
        Ok(Self::new(inner, source, bos, eos, pad))
    }

    fn new(
        inner: tokenizers::Tokenizer,
        source: String,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
    ) -> Self {
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        Self {
            inner,
            source,
            vocab_size,
            bos,
            eos,
            pad,
        }
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor
    /// adds (BOS for Llama-2 style, `[CLS] .. [SEP]` for BERT, nothing for GPT-NeoX/SmolLM2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| self.error(format!("encode failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The ids of `text` (no special tokens added) with the byte range of `text` each
    /// token came from.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.error(format!("encode failed: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// [`Tokenizer::encode`] of each text (in parallel), without padding.
    pub fn encode_batch(&self, texts: &[&str], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), add_special_tokens)
            .map_err(|e| self.error(format!("encode_batch failed: {e}")))?;
        Ok(encs.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// The text of `ids`; `skip_special` drops special tokens (BOS/EOS, control tokens).
    /// An id outside the vocabulary is an error (the `tokenizers` crate would drop it
    /// silently).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(self.error(format!(
                "token id {bad} is out of range: the vocabulary has {} ids",
                self.vocab_size
            )));
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.error(format!("decode failed: {e}")))
    }

    /// Number of token ids (largest id + 1, added tokens included): the embedding rows a
    /// model needs at least.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token string (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The beginning-of-sequence id, when the tokenizer (or its model's config) has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence id, when the tokenizer (or its model's config) has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The padding id, when the tokenizer (or its model's config) has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Overrides the special ids (e.g. from a model config); each must be in the vocabulary.
    pub fn set_special_ids(
        &mut self,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
    ) -> Result<()> {
        for (what, id) in [("bos", bos), ("eos", eos), ("pad", pad)] {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size) {
                return Err(self.error(format!(
                    "{what} id {id} is out of range: the vocabulary has {} ids",
                    self.vocab_size
                )));
            }
        }
        (self.bos, self.eos, self.pad) = (bos, eos, pad);
        Ok(())
    }

    /// Checks that every token id indexes a row of an embedding with `vocab_rows` rows
    /// (models often pad the embedding past the vocabulary, GPT-NeoX-20B to 50432 rows for
    /// 50280 ids; fewer rows than ids would read out of bounds).
    pub fn check_fits(&self, vocab_rows: usize) -> Result<()> {
        if self.vocab_size > vocab_rows {
            return Err(self.error(format!(
                "the tokenizer has {} token ids (0..={}) but the model's embedding has only \
                 {vocab_rows} rows: tokenizer and model do not belong together",
                self.vocab_size,
                self.vocab_size - 1
            )));
        }
        Ok(())
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn error(&self, detail: String) -> Error {
        Error::Tokenizer {
            path: self.source.clone(),
            detail,
        }
    }
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    // ByteLevel with use_regex = true applies the GPT-2 regex, then maps bytes to the
    // printable-unicode alphabet the vocabulary is written in.
    let byte_level = ByteLevel::new(false, true, true);
    if PRE_GPT2.contains(&pre) {
        Ok(byte_level.into())
    } else if PRE_DIGITS_THEN_GPT2.contains(&pre) {
        Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into())
    } else if PRE_QWEN2.contains(&pre) {
        // Qwen2's tokenizer.json: Split(regex, Isolated), then ByteLevel without its regex.
        let split = Split::new(
            SplitPattern::Regex(QWEN2_REGEX.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("cannot build the qwen2 pre-tokenizer: {e}"))?;
        let bytes = ByteLevel::new(false, false, false);
        Ok(Sequence::new(vec![split.into(), bytes.into()]).into())
    } else {
        Err(format!(
            "tokenizer.ggml.pre {pre:?} is not supported (its pre-tokenizer regexes are not \
             implemented); supported: {}, {} and {}",
            PRE_GPT2.join(", "),
            PRE_DIGITS_THEN_GPT2.join(", "),
            PRE_QWEN2.join(", ")
        ))
    }
}

/// Checks a post-processor (as the `tokenizers` crate serializes it) the way that crate's
/// builder does, and more: deserializing a tokenizer.json skips the builder, and encoding
/// then panics on a template naming a special token it does not define, on `$B` in the
/// single-sequence template (there is no second sequence), or on a special token whose ids
/// and tokens differ in number. Nested `Sequence` post-processors are checked too.
fn check_post_processor(post: &serde_json::Value) -> std::result::Result<(), String> {
    use serde_json::Value;
    match post.get("type").and_then(Value::as_str) {
        Some("Sequence") => post
            .get("processors")
            .and_then(Value::as_array)
            .map_or(Ok(()), |all| all.iter().try_for_each(check_post_processor)),
        Some("TemplateProcessing") => {
            let empty = serde_json::Map::new();
            let specials = post
                .get("special_tokens")
                .and_then(Value::as_object)
                .unwrap_or(&empty);
            for (name, token) in specials {
                let count = |key: &str| token.get(key).and_then(Value::as_array).map(Vec::len);
                if count("ids") != count("tokens") {
                    return Err(format!(
                        "special token {name:?} has {:?} ids but {:?} tokens",
                        count("ids"),
                        count("tokens")
                    ));
                }
            }
            for (template, second_allowed) in [("single", false), ("pair", true)] {
                let pieces = post.get(template).and_then(Value::as_array);
                for piece in pieces.into_iter().flatten() {
                    if let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) {
                        if !specials.contains_key(id) {
                            return Err(format!(
                                "the {template} template uses special token {id:?}, which is \
                                 not among its special_tokens"
                            ));
                        }
                    }
                    let sequence = piece.pointer("/Sequence/id").and_then(Value::as_str);
                    if !second_allowed && sequence == Some("B") {
                        return Err(format!(
                            "the {template} template uses sequence $B (single texts have one)"
                        ));
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// ByteLevel (offsets only) when nothing is added; a template adding BOS/EOS otherwise.
fn post_processor(
    tokens: &[&str],
    bos: Option<u32>,
    eos: Option<u32>,
) -> std::result::Result<PostProcessorWrapper, String> {
    if bos.is_none() && eos.is_none() {
        return Ok(ByteLevel::new(true, false, true).into());
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some(b) = bos {
        let t = tokens[b as usize].to_string();
        single.push(t.clone());
        pair.push(t.clone());
        specials.push((t, b));
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if let Some(e) = eos {
        let t = tokens[e as usize].to_string();
        single.push(t.clone());
        pair.push(t.clone());
        specials.push((t, e));
    }
    if let Some(b) = bos {
        pair.push(format!("{}:1", tokens[b as usize]));
    }
    pair.push("$B:1".to_string());
    if let Some(e) = eos {
        pair.push(format!("{}:1", tokens[e as usize]));
    }
    specials.dedup();
    TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| format!("cannot build the BOS/EOS template: {e}"))?
        .special_tokens(specials)
        .build()
        .map(Into::into)
        .map_err(|e| format!("cannot build the BOS/EOS template: {e}"))
}
