//! `lathe eval`: perplexity and per-token log-probs of a text file under a model.
//!
//! The text is tokenized as one document (with the tokenizer's special tokens, e.g. BOS) and
//! cut into windows of `--block-size` tokens that overlap by one token, so every token but
//! the first is predicted exactly once, from the tokens before it in its window (the
//! non-overlapping-context perplexity of transformers' perplexity guide with stride =
//! block size).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_core::Tensor;
use lathe_models::attention::TokenLayout;
use lathe_models::generate::LanguageModel;
use lathe_models::logprobs::{next_tokens, token_logprobs};
use serde_json::json;

use crate::model_args::ModelArgs;
use crate::output::Output;
use lathe_models::plan::{Job, PlanSettings};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text file to evaluate (read as one document).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Tokens per window (default: the model's positions, at most 1024).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Windows run together in one forward.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Do not add the tokenizer's special tokens (BOS) before the text.
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Print one JSON object: totals and every token's id, text and log-prob.
    #[arg(long)]
    pub json: bool,
    /// Write the output here (through a temporary file) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// What `lathe eval` measured.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Every token id of the document.
    pub ids: Vec<u32>,
    /// log p(`ids[i]` | window before it) for i >= 1 (the first token is not predicted).
    pub logprobs: Vec<f32>,
}

impl Evaluation {
    /// Mean negative log-likelihood per predicted token, in nats.
    pub fn mean_nll(&self) -> f64 {
        -self.logprobs.iter().map(|&l| l as f64).sum::<f64>() / self.logprobs.len() as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Log-probs of every token of `ids` but the first, in windows of `block` tokens that
/// overlap by one, `batch` windows per forward.
pub fn evaluate<M: LanguageModel + ?Sized>(
    model: &M,
    ids: &[u32],
    block: usize,
    batch: usize,
    device: &lathe_core::Device,
) -> Result<Evaluation> {
    if ids.len() < 2 {
        bail!(
            "the text has {} token(s): at least 2 are needed to predict one",
            ids.len()
        );
    }
    if block < 2 {
        bail!("--block-size must be at least 2, got {block}");
    }
    // Window w covers ids[w * (block - 1) ..][..block]: consecutive windows share one token.
    let step = block - 1;
    let windows: Vec<&[u32]> = (0..(ids.len() - 1).div_ceil(step))
        .map(|w| &ids[w * step..(w * step + block).min(ids.len())])
        .collect();
    let _no_grad = lathe_core::no_grad();
    let mut logprobs = Vec::with_capacity(ids.len() - 1);
    let started = Instant::now();
    let mut done = 0usize;
    // Windows of one length go together (only the last window can be shorter).
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let group: Vec<&[u32]> = windows[i..]
            .iter()
            .take(batch)
            .take_while(|w| w.len() == len)
            .copied()
            .collect();
        let flat: Vec<u32> = group.iter().flat_map(|w| w.iter().copied()).collect();
        let targets = next_tokens(&flat, len, None)?;
        let tokens = Tensor::from_vec(flat, &[group.len(), len], device)?;
        let layout = TokenLayout::contiguous(group.len(), len, 0, device)?;
        let out = token_logprobs(model, &tokens, &layout, &targets)?; // (windows, len - 1)
        logprobs.extend(out.to_vec_f32()?);
        i += group.len();
        done += group.len() * (len - 1);
        eprint!(
            "\reval: {done}/{} tokens, {:.0} tokens/s",
            ids.len() - 1,
            done as f64 / started.elapsed().as_secs_f64().max(1e-9)
        );
    }
    eprintln!();
    Ok(Evaluation {
        ids: ids.to_vec(),
        logprobs,
    })
}

pub fn run(args: &EvalArgs) -> Result<()> {
    // A --out that cannot be written is refused before the text and the model are read.
    if let Some(out) = &args.out {
        crate::output::file_target(out)?;
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    if text.trim().is_empty() {
        bail!("{}: the file holds no text", args.file.display());
    }
    // The windows the text fills, from its tokens (the tokenizer loads in a moment; the
    // model may take minutes, and must not start when it cannot fit). Without a tokenizer
    // on its own, a text has at most one token per byte (byte-level BPE).
    let tokens = match args.model.tokenizer() {
        Ok(tokenizer) => tokenizer.encode(&text, !args.no_special_tokens)?.len(),
        Err(_) => text.len(),
    };
    let block = args.block_size.unwrap_or(1024).min(tokens.max(2));
    args.model.preflight(PlanSettings {
        job: Job::Score,
        batch: args.batch_size.min(tokens.div_ceil(block.max(1)).max(1)),
        train_batch: 1,
        seq_len: block,
        ..PlanSettings::inference()
    })?;
    let (pretrained, device) = args.model.load()?;
    let tokenizer = &pretrained.tokenizer;
    let ids = tokenizer.encode(&text, !args.no_special_tokens)?;
    let positions = pretrained.model.max_positions();
    let block = args.block_size.unwrap_or(positions.min(1024));
    if block > positions {
        bail!("--block-size {block} exceeds the model's {positions} positions");
    }
    let evaluation = evaluate(&pretrained.model, &ids, block, args.batch_size, &device)?;
    let mut out = Output::open(args.out.as_deref())?;
    if args.json {
        let per_token: Vec<_> = evaluation.ids[1..]
            .iter()
            .zip(&evaluation.logprobs)
            .map(|(&id, &logprob)| {
                json!({
                    "id": id,
                    "token": tokenizer.decode(&[id], false).unwrap_or_default(),
                    "logprob": logprob,
                })
            })
            .collect();
        let report = json!({
            "model": args.model.model.display().to_string(),
            "file": args.file.display().to_string(),
            "tokens": evaluation.ids.len(),
            "predicted_tokens": evaluation.logprobs.len(),
            "block_size": block,
            "mean_nll": evaluation.mean_nll(),
            "perplexity": evaluation.perplexity(),
            "first_token": { "id": evaluation.ids[0] },
            "per_token": per_token,
        });
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(
            out,
            "{}: {} tokens ({} predicted, windows of {block}): mean NLL {:.4} nats, perplexity {:.3}",
            args.file.display(),
            evaluation.ids.len(),
            evaluation.logprobs.len(),
            evaluation.mean_nll(),
            evaluation.perplexity()
        )?;
    }
    out.finish()
}
