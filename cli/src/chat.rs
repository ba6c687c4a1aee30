//! `--chat`: prompts put through the model's chat template, each text one user turn
//! followed by the generation prompt (transformers' `apply_chat_template(...,
//! add_generation_prompt=True)`), tokenized without adding special tokens: the template
//! writes them.

use std::path::Path;

use anyhow::{Context, Result};
use lathe_models::chat::Message;
use lathe_models::pretrained::chat_template_of;
use lathe_models::tokenizer::Tokenizer;
use lathe_ppo::Prompts;

/// Each text rendered with the chat template of the model at `model` as a one-turn
/// conversation ready for the assistant's answer.
pub fn render_prompts(model: &Path, texts: &[String]) -> Result<Vec<String>> {
    let template = chat_template_of(model).context("--chat needs the model's chat template")?;
    texts
        .iter()
        .map(|text| {
            template
                .render(&[Message::new("user", text.as_str())], true)
                .map_err(Into::into)
        })
        .collect()
}

/// Token ids of each prompt: through the chat template with `chat` (no special tokens
/// added), else as the tokenizer encodes the text (its special tokens added).
pub fn prompt_ids(
    model: &Path,
    tokenizer: &Tokenizer,
    texts: &[String],
    chat: bool,
) -> Result<Vec<Vec<u32>>> {
    let (texts, add_special) = if chat {
        (render_prompts(model, texts)?, false)
    } else {
        (texts.to_vec(), true)
    };
    texts
        .iter()
        .map(|t| tokenizer.encode(t, add_special).map_err(Into::into))
        .collect()
}

/// What PPO and GRPO draw queries from: whole chat-templated prompts with `chat`, else
/// texts to cut queries from (the seed's setup).
pub fn prompts(
    model: &Path,
    tokenizer: &Tokenizer,
    texts: &[String],
    chat: bool,
) -> Result<Prompts> {
    Ok(if chat {
        Prompts::whole(prompt_ids(model, tokenizer, texts, true)?)?
    } else {
        Prompts::cut_from_texts(tokenizer, texts)?
    })
}

/// The longest query in tokens: the longest chat-templated prompt with `chat`, else
/// `cut_max` (queries are cut to at most that); for the memory plan before loading.
pub fn longest_query(
    model: &crate::model_args::ModelArgs,
    texts: &[String],
    chat: bool,
    cut_max: usize,
) -> Result<usize> {
    if !chat {
        return Ok(cut_max);
    }
    let tokenizer = model.tokenizer()?;
    Ok(prompt_ids(&model.model, &tokenizer, texts, true)?
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0))
}
