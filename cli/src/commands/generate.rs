//! `lathe generate`: batched text generation from prompts given as arguments or in a file,
//! printed as text or JSONL.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_models::generate::{generate, GenerateConfig};
use lathe_models::sampling::SamplingConfig;
use serde_json::json;

use crate::model_args::ModelArgs;
use crate::output::Output;
use crate::texts::read_texts;
use lathe_models::plan::PlanSettings;

/// Output format of `lathe generate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Prompt and completion of each prompt, separated by a line of dashes.
    Text,
    /// One JSON object per prompt: prompt, completion, token ids, finish reason.
    Jsonl,
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts, one per argument (or use --prompts FILE).
    #[arg(value_name = "PROMPT")]
    pub prompts: Vec<String>,
    /// A file of prompts: .txt (one per line), .jsonl or .json (objects with --prompt-field).
    #[arg(long = "prompts", value_name = "FILE", conflicts_with = "prompts")]
    pub prompts_file: Option<PathBuf>,
    /// The field holding the prompt in JSON objects.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// At most this many new tokens per prompt.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// No EOS before this many new tokens.
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Sample (with --temperature, --top-k, --top-p) instead of greedy decoding, as
    /// transformers' do_sample.
    #[arg(long)]
    pub do_sample: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all); transformers' default is 50.
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (each prompt of a batch has its own stream).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Never stop at EOS: every prompt gets exactly --max-new-tokens tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Prompts generated together in one batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Recompute the whole sequence every step instead of using the KV cache (slow).
    #[arg(long)]
    pub no_cache: bool,
    /// Do not add the tokenizer's special tokens (BOS) to the prompts.
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Each prompt is a user turn put through the model's chat template, with the
    /// generation prompt (the template writes the special tokens; none are added).
    #[arg(long, conflicts_with = "no_special_tokens")]
    pub chat: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Write the output here (written to a temporary file and renamed) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    // A --out that cannot be written is refused before the prompts and the model are read.
    if let Some(out) = &args.out {
        crate::output::file_target(out)?;
    }
    let prompts = match &args.prompts_file {
        Some(path) => read_texts(path, &args.prompt_field)?,
        None if args.prompts.is_empty() => {
            bail!("no prompts: give them as arguments or with --prompts FILE")
        }
        None => args.prompts.clone(),
    };
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    // What the model reads: the prompts, or their chat-template renderings.
    let inputs = if args.chat {
        crate::chat::render_prompts(&args.model.model, &prompts)?
    } else {
        prompts.clone()
    };
    let add_special = !(args.no_special_tokens || args.chat);
    // The longest prompt in tokens (the tokenizer loads in a moment, the model may take
    // minutes); without a tokenizer on its own, a prompt has at most one token per byte.
    let longest = match args.model.tokenizer() {
        Ok(tokenizer) => inputs
            .iter()
            .map(|p| tokenizer.encode(p, add_special).map(|ids| ids.len()))
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter()
            .max()
            .unwrap_or(0),
        Err(_) => inputs.iter().map(String::len).max().unwrap_or(0),
    };
    args.model.preflight(PlanSettings {
        batch: args.batch_size.min(prompts.len()),
        train_batch: args.batch_size.min(prompts.len()),
        seq_len: longest + 1 + args.max_new_tokens,
        ..PlanSettings::inference()
    })?;
    let (pretrained, device) = args.model.load()?;
    let tokenizer = &pretrained.tokenizer;
    let eos = tokenizer.eos_id();
    let config = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        eos_token_id: eos,
        stop_at_eos: !args.ignore_eos,
        pad_token_id: tokenizer.pad_id().or(eos).unwrap_or(0),
        sampling: if args.do_sample {
            SamplingConfig {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                greedy: false,
            }
        } else {
            SamplingConfig::greedy()
        },
        seed: args.seed,
        use_cache: !args.no_cache,
    };
    let mut output = Output::open(args.out.as_deref())?;
    let (mut new_tokens, mut seconds) = (0usize, 0.0f64);
    let batches = prompts
        .chunks(args.batch_size)
        .zip(inputs.chunks(args.batch_size));
    for (chunk_index, (chunk, chunk_inputs)) in batches.enumerate() {
        let texts: Vec<&str> = chunk_inputs.iter().map(String::as_str).collect();
        let ids = tokenizer
            .encode_batch(&texts, add_special)
            .context("tokenizing the prompts")?;
        let start = Instant::now();
        // Each batch gets its own seed so that batches are not copies of each other.
        let batch_config = GenerateConfig {
            seed: config.seed.wrapping_add(chunk_index as u64),
            ..config
        };
        let generated = generate(&pretrained.model, &ids, &batch_config, &device)?;
        seconds += start.elapsed().as_secs_f64();
        for (prompt, tokens) in chunk.iter().zip(&generated) {
            // A finished row is padded after its EOS: keep the tokens up to and with EOS.
            let end = match (config.stop_at_eos, eos) {
                (true, Some(eos)) => tokens
                    .iter()
                    .position(|&t| t == eos)
                    .map_or(tokens.len(), |i| i + 1),
                _ => tokens.len(),
            };
            let kept = &tokens[..end];
            new_tokens += kept.len();
            let completion = tokenizer.decode(kept, true)?;
            let finish_reason = if end < tokens.len() || kept.last() == eos.as_ref() {
                "eos"
            } else {
                "length"
            };
            match args.format {
                Format::Text => writeln!(output, "{prompt}{completion}\n---")?,
                Format::Jsonl => writeln!(
                    output,
                    "{}",
                    json!({
                        "prompt": prompt,
                        "completion": completion,
                        "new_token_ids": kept,
                        "finish_reason": finish_reason,
                    })
                )?,
            }
        }
        eprintln!(
            "batch {}/{}: {} prompts, {:.1} s",
            chunk_index + 1,
            prompts.len().div_ceil(args.batch_size),
            chunk.len(),
            seconds
        );
    }
    output.finish()?;
    eprintln!(
        "generated {new_tokens} tokens for {} prompts in {seconds:.2} s ({:.1} tokens/s)",
        prompts.len(),
        new_tokens as f64 / seconds.max(1e-9)
    );
    Ok(())
}
