//! One entry point for "a model the user named": a HF model directory (config.json,
//! safetensors, tokenizer.json) or a GGUF file, loaded with its tokenizer onto a device, in
//! the precision asked for. The CLI and the training crates load models through this.

use std::path::{Path, PathBuf};

use lathe_core::Device;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::gguf_model::load_gguf_with;
use crate::hf::{load_hf_dir_with, CausalLm, LoadOptions};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

pub use crate::linear::Precision;

/// A loaded model with its tokenizer and where it came from.
pub struct Pretrained {
    /// The model, sampling limited to the tokenizer's ids when the embedding is padded.
    pub model: CausalLm,
    /// The model's tokenizer, special ids as its config names them.
    pub tokenizer: Tokenizer,
    /// The HF model folder or .gguf file it was loaded from.
    pub source: PathBuf,
}

impl Pretrained {
    /// Loads `path`: a directory is a HF model directory (its tokenizer.json beside the
    /// weights), a file ending in `.gguf` a GGUF file (Llama or Qwen2, tokenizer from its
    /// metadata).
    ///
    /// Special ids the model config names (bos, the first eos) override the tokenizer's
    /// guesses, as transformers' generation config does. The tokenizer is checked to fit the
    /// embedding.
    pub fn load(path: &Path, device: &Device, precision: Precision) -> Result<Pretrained> {
        let options = LoadOptions {
            precision,
            embeddings_f16: false,
        };
        Pretrained::load_with(path, device, options)
    }

    /// As [`Pretrained::load`], with every load option. A HF directory is read a tensor at a
    /// time, each built in its final form as it is read; a GGUF file is dequantized, then
    /// converted.
    pub fn load_with(path: &Path, device: &Device, options: LoadOptions) -> Result<Pretrained> {
        let (mut model, mut tokenizer) = if path.is_dir() {
            let tokenizer_path = path.join("tokenizer.json");
            if !tokenizer_path.is_file() {
                return Err(Error::File {
                    path: path.display().to_string(),
                    detail: "no tokenizer.json in the model directory".into(),
                });
            }
            let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
            (load_hf_dir_with(path, device, options)?, tokenizer)
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            load_gguf_with(path, device, options)?
        } else if path.exists() {
            return Err(Error::File {
                path: path.display().to_string(),
                detail: "not a model: expected a HF model directory or a .gguf file".into(),
            });
        } else {
            return Err(Error::File {
                path: path.display().to_string(),
                detail: "no such file or directory".into(),
            });
        };
        let config = model.config();
        tokenizer.check_fits(config.vocab_size())?;
        // A padded embedding (GPT-NeoX-20B: 50432 rows, 50277 ids): never sample an id the
        // tokenizer cannot decode.
        if tokenizer.vocab_size() < config.vocab_size() {
            model.limit_sampling_to(Some(tokenizer.vocab_size()));
        }
        apply_config_special_ids(&mut tokenizer, &config)?;
        Ok(Pretrained {
            model,
            tokenizer,
            source: path.to_path_buf(),
        })
    }
}

impl Pretrained {
    /// The chat template the model ships: [`chat_template_of`] its source.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        chat_template_of(&self.source)
    }
}

/// The chat template of the model at `path` (a HF directory: see
/// [`ChatTemplate::from_hf_dir`]; a GGUF file: [`ChatTemplate::from_gguf`]), read without
/// loading the weights; an error saying where it looked when there is none.
pub fn chat_template_of(path: &Path) -> Result<ChatTemplate> {
    let (found, looked) = if path.is_dir() {
        (
            ChatTemplate::from_hf_dir(path)?,
            "chat_template.jinja, tokenizer_config.json's chat_template, chat_template.json",
        )
    } else {
        (
            ChatTemplate::from_gguf(&GgufFile::open_header(path)?)?,
            "the GGUF metadata key tokenizer.chat_template",
        )
    };
    found.ok_or_else(|| Error::File {
        path: path.display().to_string(),
        detail: format!("the model has no chat template (looked for {looked})"),
    })
}

/// The config's bos and first eos id replace the tokenizer's, when the config names them;
/// the pad id stays the tokenizer's (or falls back to eos, as transformers' generate does).
fn apply_config_special_ids(tokenizer: &mut Tokenizer, config: &ModelConfig) -> Result<()> {
    let bos = config.bos_token_id().or(tokenizer.bos_id());
    let eos = config
        .eos_token_ids()
        .first()
        .copied()
        .or(tokenizer.eos_id());
    let pad = tokenizer.pad_id().or(eos);
    tokenizer.set_special_ids(bos, eos, pad)
}
