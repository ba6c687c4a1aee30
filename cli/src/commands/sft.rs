//! `lathe sft`: supervised LoRA fine-tuning of a causal LM on text (the seed's step 1). The
//! trainer, the run folder and its checkpoints are `lathe_train::sft`'s; this is the
//! command: flags and `--config`, the progress display, Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use lathe_core::Device;
use lathe_models::chat::Message;
use lathe_models::hf::CausalLm;
use lathe_models::plan::{Job, PlanSettings};

pub use lathe_train::sft::{
    block_loss, blocks_fingerprint, chat_messages, check_adapters, check_lora, eval_loss, pack,
    pack_conversations, Blocks, SftConfig, SftRun, SftSummary, SftTrainer, StepStats, MAX_COUNT,
    MAX_STEPS,
};

use crate::config_file::{read_toml, settings};
use crate::progress::Progress;

/// Trains adapters on `model` and writes to `out`: the adapter (peft files), `metrics.jsonl`,
/// `run.json`, and `checkpoint/` (adapter + optimizer + state) every `save_every` steps and
/// at the end. When `out/checkpoint` exists the run resumes from it (its config must equal
/// `config`).
pub fn train(
    model: &mut CausalLm,
    blocks: &Blocks,
    config: &SftConfig,
    out: &Path,
    device: &Device,
) -> Result<SftSummary> {
    train_until(model, blocks, config, out, device, None)
}

/// [`train`], stopping (as an interrupted run would, after its last checkpoint) once
/// `stop_after` steps are done: what the resume tests use.
pub fn train_until(
    model: &mut CausalLm,
    blocks: &Blocks,
    config: &SftConfig,
    out: &Path,
    device: &Device,
    stop_after: Option<usize>,
) -> Result<SftSummary> {
    let options = crate::resume::ResumeOptions::default();
    train_stoppable(
        model, blocks, config, out, device, stop_after, None, &options,
    )
}

/// [`train_until`]; `stop` set (Ctrl-C) ends the run after the current step with a
/// checkpoint saved, the summary marked `interrupted`. `options` carries the model's
/// fingerprint (checked on resume with the data's and the settings) and `--resume-anyway`.
/// Progress goes to stderr.
#[allow(clippy::too_many_arguments)]
pub fn train_stoppable(
    model: &mut CausalLm,
    blocks: &Blocks,
    config: &SftConfig,
    out: &Path,
    device: &Device,
    stop_after: Option<usize>,
    stop: Option<&AtomicBool>,
    options: &crate::resume::ResumeOptions,
) -> Result<SftSummary> {
    let collective = crate::parallel::collective();
    let ranks = collective.size();
    let mut run = SftRun::open_data_parallel(
        model,
        blocks,
        config,
        out,
        device,
        options,
        collective.clone(),
    )?;
    let total_steps = run.trainer().plan().total_steps;
    let start_step = run.start_step();
    let writer = collective.is_writer();
    if writer {
        eprintln!("{}", run.trainer().model().trainable_parameters_line()?);
        eprintln!(
            "sft: {} train blocks, {} eval blocks of {} tokens; {total_steps} steps of {} x {} \
             blocks{}{}",
            blocks.train.len(),
            blocks.eval.len(),
            config.block_size,
            config.batch_size,
            config.grad_accum,
            if ranks > 1 {
                format!(" x {ranks} ranks")
            } else {
                String::new()
            },
            if run.resumed() {
                format!(", resuming at step {start_step}")
            } else {
                String::new()
            }
        );
    }
    if run.already_finished() {
        eprintln!(
            "sft: {} already holds a finished run of {start_step} steps; nothing to do",
            out.display()
        );
        return Ok(run.summary().clone());
    }
    if run.done() {
        // A crash after the last checkpoint: only the final files are missing.
        return Ok(run.finish()?);
    }
    let mut progress = Progress::new("sft", total_steps);
    let stopped = |stop: Option<&AtomicBool>| -> Result<bool> {
        let mine = stop.is_some_and(|s| s.load(Ordering::SeqCst));
        // Every rank stops at the same step: a Ctrl-C seen by one stops all.
        Ok(if ranks > 1 {
            collective.any(mine)?
        } else {
            mine
        })
    };
    while !run.done() {
        let record = run.step()?;
        let (done, loss, lr) = (record.stats.step, record.stats.loss, record.stats.lr);
        let eval_text = record
            .eval_loss
            .map(|e| format!(" eval {:.4}", e as f64))
            .unwrap_or_default();
        progress.update(
            done,
            start_step,
            &format!(
                "loss {loss:.4}{eval_text} lr {lr:.2e} | {:.0} tok/s",
                record.tokens_per_s
            ),
        );
        let interrupted = stopped(stop)?;
        if run.checkpoint_due() || interrupted {
            run.save_checkpoint()?;
        }
        if interrupted && !run.done() {
            progress.finish();
            return Ok(run.interrupted());
        }
        if stop_after == Some(done) {
            progress.finish();
            return Ok(run.summary().clone());
        }
    }
    progress.finish();
    Ok(run.finish()?)
}

/// `lathe sft` flags: the inputs, and [`SftSettings`] (also the `--config` file's keys).
#[derive(clap::Args, Debug)]
pub struct SftArgs {
    #[command(flatten)]
    pub model: crate::model_args::ModelArgs,
    /// Training text: .txt (one text per line), .jsonl or .json (objects with --text-field),
    /// or Parquet / Arrow (HF datasets' files) with a --text-field column.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// The field holding the text in JSON objects.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// The field holding conversations (trl's conversational format: a list of
    /// {"role", "content"}), rendered with the model's chat template. Without it, records
    /// with no --text-field but a "messages" field are taken as conversations.
    #[arg(long, value_name = "FIELD")]
    pub messages_field: Option<String>,
    /// On conversations, learn only the assistant's turns (trl's assistant_only_loss);
    /// `false` learns every token of the rendered conversation.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub assistant_only_loss: bool,
    /// Output folder: the adapter (peft files), metrics.jsonl, run.json, checkpoint/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A TOML file of the training settings (the keys of run.json's "config": block_size,
    /// batch_size, lr, lora_r, ...); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SftSettings,
    /// Resume the checkpoint in --out even when its model, data or settings differ from
    /// this run's (a warning names them); the LoRA shape settings must still match.
    #[arg(long)]
    pub resume_anyway: bool,
}

settings! {
    /// SFT's settings; unset ones are `SftConfig::default()`'s.
    pub struct SftSettings => SftConfig {
        /// Tokens per training block.
        block_size: usize,
        /// Blocks per micro-batch.
        batch_size: usize,
        /// Micro-batches per optimizer step.
        grad_accum: usize,
        /// Passes over the training blocks.
        epochs: f64,
        /// Stop after this many optimizer steps (overrides --epochs; >= 1).
        max_steps: usize,
        /// AdamW's peak learning rate.
        lr: f32,
        /// AdamW's decoupled weight decay.
        weight_decay: f32,
        /// Steps of linear warm-up from 0.
        warmup_steps: usize,
        /// constant, linear or cosine decay after the warm-up.
        schedule: String,
        /// Clip the gradients' global L2 norm to this (> 0; inf: no clipping).
        max_grad_norm: f32,
        /// LoRA rank.
        lora_r: usize,
        /// LoRA alpha (scaling alpha / r).
        lora_alpha: f64,
        /// Dropout on the adapters' input.
        lora_dropout: f64,
        /// Modules to adapt, comma-separated (default: the architecture's, e.g.
        /// query_key_value for GPT-NeoX, q_proj,v_proj for Llama).
        #[arg(value_delimiter = ',')]
        target_modules: Vec<String>,
        /// Recompute every block's activations in the backward instead of keeping them
        /// (`--gradient-checkpointing false` keeps them).
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        gradient_checkpointing: bool,
        /// Share of the blocks held out for the eval loss.
        eval_fraction: f64,
        /// Evaluate every N steps (0: at the end only).
        eval_every: usize,
        /// Save a checkpoint every N steps (0: at the end only); a rerun resumes from it
        ///.
        save_every: usize,
        /// The seed of the adapters' init, the data order and dropout.
        seed: u64,
    }
}

/// The `--help` text after the flags: the defaults, as a `--config` file would set them.
pub fn defaults_help() -> String {
    crate::config_file::defaults_help(&SftConfig::default())
}

impl SftArgs {
    /// The settings: `SftConfig::default()`, under the `--config` file's, under the flags.
    pub fn settings(&self) -> Result<SftConfig> {
        let file: SftSettings = match &self.config {
            Some(path) => read_toml(path, "SFT config")?,
            None => SftSettings::default(),
        };
        let mut config = SftConfig::default();
        self.settings.clone().over(file).apply_to(&mut config);
        Ok(config)
    }
}

/// What `lathe sft` trains on.
enum SftData {
    Texts(Vec<String>),
    Conversations(Vec<Vec<Message>>),
}

/// The texts of `--text-field`, or the conversations of `--messages-field` (or of a
/// "messages" field when the records have no text field).
fn read_sft_data(args: &SftArgs) -> Result<SftData> {
    let conversations = |field: &str| -> Result<SftData> {
        let read = lathe_data::read_messages(&args.data, field)?;
        Ok(SftData::Conversations(
            read.iter().map(|turns| chat_messages(turns)).collect(),
        ))
    };
    if let Some(field) = &args.messages_field {
        return conversations(field);
    }
    match crate::texts::read_texts(&args.data, &args.text_field) {
        Ok(texts) => Ok(SftData::Texts(texts)),
        Err(texts_error) => conversations("messages").map_err(|_| texts_error),
    }
}

/// `lathe sft`.
pub fn run(args: &SftArgs) -> Result<()> {
    let config = args.settings()?;
    config.validate()?;
    args.model.precision()?;
    args.model.preflight(PlanSettings {
        job: Job::Sft,
        batch: config.batch_size,
        train_batch: config.batch_size,
        seq_len: config.block_size,
        lora_r: config.lora_r,
        lora_targets: config.target_modules.clone(),
        gradient_checkpointing: config.gradient_checkpointing,
        ..PlanSettings::inference()
    })?;
    let data = read_sft_data(args)?;
    let (mut pretrained, device) = args.model.load()?;
    let blocks = match &data {
        SftData::Texts(texts) => pack(
            texts,
            &pretrained.tokenizer,
            config.block_size,
            config.eval_fraction,
        ),
        SftData::Conversations(conversations) => pack_conversations(
            conversations,
            &pretrained.chat_template()?,
            &pretrained.tokenizer,
            config.block_size,
            config.eval_fraction,
            args.assistant_only_loss,
        ),
    }
    .with_context(|| format!("packing {}", args.data.display()))?;
    let stop = crate::progress::stop_on_ctrl_c("sft");
    let options = crate::resume::ResumeOptions {
        model: Some(args.model.fingerprint(None)?),
        reward: None,
        anyway: args.resume_anyway,
    };
    let summary = train_stoppable(
        &mut pretrained.model,
        &blocks,
        &config,
        &args.out,
        &device,
        None,
        Some(&stop),
        &options,
    )?;
    if summary.interrupted {
        return Err(crate::run_files::Interrupted {
            command: "sft",
            step: summary.steps,
        }
        .into());
    }
    if !crate::parallel::is_writer() {
        return Ok(());
    }
    let first = summary.losses.first().copied().unwrap_or(f32::NAN);
    let last = summary.losses.last().copied().unwrap_or(f32::NAN);
    eprintln!(
        "sft: done, {} steps, loss {first:.4} -> {last:.4}{}{}; adapter in {}",
        summary.steps,
        summary
            .eval_losses
            .last()
            .map(|(_, e)| format!(", eval loss {e:.4}"))
            .unwrap_or_default(),
        // A rerun of a finished run trained nothing: no speed to report.
        if summary.tokens_per_s > 0.0 {
            format!(", {:.0} tokens/s", summary.tokens_per_s)
        } else {
            String::new()
        },
        args.out.display()
    );
    Ok(())
}
