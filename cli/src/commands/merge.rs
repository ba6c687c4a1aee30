//! `lathe merge`: a base model plus a LoRA adapter written as one HF model directory
//! (config.json, model.safetensors, tokenizer.json) that transformers and lathe both load.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lathe_core::Device;
use lathe_lora::AdapterSwitch;
use lathe_models::hf::save_hf_dir;
use lathe_models::pretrained::{Precision, Pretrained};

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base model: a HF model directory or a .gguf file.
    #[arg(long, value_name = "DIR|FILE.gguf|ORG/NAME", value_parser = crate::model_args::model_path)]
    pub model: PathBuf,
    /// The adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Where to write the merged model (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Merges on the CPU in f32 (the weights are written in f32, as they were loaded).
pub fn merge(model: &Path, adapter: &Path, out: &Path) -> Result<()> {
    crate::output::check_new_dir(out)?;
    let mut pretrained = Pretrained::load(model, &Device::Cpu, Precision::F32)
        .with_context(|| format!("loading {}", model.display()))?;
    pretrained
        .model
        .load_lora(adapter, &AdapterSwitch::new())
        .with_context(|| format!("loading the adapter {}", adapter.display()))?;
    pretrained.model.merge_lora()?;
    // The chat template travels with the model (a GGUF keeps it in its metadata).
    let chat_template = match pretrained.chat_template() {
        Ok(template) => Some(template.source().to_string()),
        Err(e) => {
            eprintln!("merge: no chat template carried over: {e}");
            None
        }
    };
    write_model_dir(&pretrained, chat_template.as_deref(), out)
}

/// Writes `pretrained` to the new folder `out` as a HF model directory (config.json,
/// model.safetensors in f32, tokenizer.json, and a tokenizer_config.json with the special
/// tokens and `chat_template`, where transformers 4.x and 5.x both read it).
pub fn write_model_dir(
    pretrained: &Pretrained,
    chat_template: Option<&str>,
    out: &Path,
) -> Result<()> {
    let config = pretrained.model.config();
    let tensors = pretrained.model.named_weights()?;
    // Every file goes into a temporary folder renamed to `out` once all are written: `out`
    // is a whole model or nothing.
    crate::output::build_dir(out, |dir| {
        save_hf_dir(dir, &config, &tensors)?;
        let tokenizer = &pretrained.tokenizer;
        tokenizer
            .inner()
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
        let mut tokenizer_config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(tokenizer.bos_id()),
            "eos_token": token(tokenizer.eos_id()),
            "pad_token": token(tokenizer.pad_id()),
            "clean_up_tokenization_spaces": false,
        });
        if let Some(template) = chat_template {
            tokenizer_config["chat_template"] = template.into();
        }
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tokenizer_config)?,
        )
        .context("writing tokenizer_config.json")?;
        Ok(())
    })
}

pub fn run(args: &MergeArgs) -> Result<()> {
    merge(&args.model, &args.adapter, &args.out)?;
    eprintln!(
        "merged {} + {} into {}",
        args.model.display(),
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}
