//! `lathe dpo`: Direct Preference Optimization of a fresh LoRA on preference pairs
//! (`{"prompt", "chosen", "rejected"}`), the reference being the same model with its
//! adapters off. The trainer and its run folder are `lathe_train::dpo`'s; this is the
//! command: flags and `--config` (trl's DPOConfig names), the memory plan from the
//! tokenized pairs, the progress display, Ctrl-C, and the report.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use lathe_models::plan::{Job, PlanSettings};
use lathe_models::pretrained::chat_template_of;
use lathe_train::dpo::{
    read_preference_conversations, read_preferences_from, tokenize_conversation_pairs,
    tokenize_pairs, DpoConfig, DpoLoss, DpoRun,
};

use crate::config_file::{read_toml, settings};
use crate::progress::Progress;

/// `lathe dpo` flags: the inputs, and [`DpoSettings`] (also the `--config` file's keys).
#[derive(clap::Args, Debug)]
pub struct DpoArgs {
    #[command(flatten)]
    pub model: crate::model_args::ModelArgs,
    /// Preference pairs: .jsonl (an object a line) or .json (an array) of
    /// {"prompt", "chosen", "rejected"}, or Parquet / Arrow (HF datasets' files) with those
    /// columns.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// The prompt column (JSON field) of --data.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// The preferred completion's column.
    #[arg(long, default_value = "chosen")]
    pub chosen_field: String,
    /// The rejected completion's column.
    #[arg(long, default_value = "rejected")]
    pub rejected_field: String,
    /// Output folder: the adapter (peft files), metrics.jsonl, run.json, checkpoint/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A TOML file of the settings (trl's DPOConfig names: beta, loss_type,
    /// learning_rate, ...); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: DpoSettings,
    /// Resume the checkpoint in --out even when its model, data or settings differ from
    /// this run's (a warning names them); the LoRA shape settings must still match.
    #[arg(long)]
    pub resume_anyway: bool,
}

settings! {
    /// DPO's settings under trl's DPOConfig names; unset ones are `DpoConfig::default()`'s
    /// (trl 1.16's defaults).
    pub struct DpoSettings => DpoConfig {
        /// How far the policy may move from the reference (the KL penalty's 1/temperature).
        beta: f64,
        /// sigmoid (DPO), ipo, hinge or robust.
        loss_type: DpoLoss,
        /// The assumed share of flipped labels (robust only).
        label_smoothing: f64,
        learning_rate: f32,
        /// Pairs per micro-batch.
        per_device_train_batch_size: usize,
        /// Micro-batches per optimizer step.
        gradient_accumulation_steps: usize,
        num_train_epochs: f64,
        /// Stop after this many optimizer steps (overrides --num-train-epochs; >= 1).
        max_steps: usize,
        /// The longest prompt + completion in tokens (completions are cut at the end).
        max_length: usize,
        /// Compute the reference log-probs once before training instead of per batch.
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        precompute_ref_log_probs: bool,
        weight_decay: f32,
        /// Clip the gradients' global L2 norm to this (> 0; inf: no clipping).
        max_grad_norm: f32,
        warmup_steps: usize,
        /// constant, linear or cosine decay after the warm-up.
        lr_scheduler_type: String,
        seed: u64,
        /// Save a checkpoint every N steps (0: at the end only); a rerun resumes from it.
        save_steps: usize,
        /// Recompute every block's activations in the backward instead of keeping them.
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        gradient_checkpointing: bool,
        lora_r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        /// Modules to adapt, comma-separated (default: the architecture's).
        #[arg(value_delimiter = ',')]
        target_modules: Vec<String>,
    }
}

/// The `--help` text after the flags: the defaults, as a `--config` file would set them.
pub fn defaults_help() -> String {
    crate::config_file::defaults_help(&DpoConfig::default())
}

impl DpoArgs {
    /// The defaults, under the `--config` file's settings, under the flags.
    pub fn settings(&self) -> Result<DpoConfig> {
        let file: DpoSettings = match &self.config {
            Some(path) => read_toml(path, "DPO config")?,
            None => DpoSettings::default(),
        };
        let mut config = DpoConfig::default();
        self.settings.clone().over(file).apply_to(&mut config);
        Ok(config)
    }
}

/// `lathe dpo`.
pub fn run(args: &DpoArgs) -> Result<()> {
    let config = args.settings()?;
    config.validate()?;
    args.model.precision()?;
    // Tokenized before the model loads, so the plan knows the longest row.
    let tokenizer = args.model.tokenizer()?;
    let columns = (&args.prompt_field, &args.chosen_field, &args.rejected_field);
    let tokens = match read_preferences_from(&args.data, columns.0, columns.1, columns.2) {
        Ok(pairs) => tokenize_pairs(&pairs, &tokenizer, config.max_length),
        // trl's conversational preference records: message lists through the chat template.
        Err(text_error) => {
            let Ok(pairs) =
                read_preference_conversations(&args.data, columns.0, columns.1, columns.2)
            else {
                return Err(text_error.into());
            };
            let template = chat_template_of(&args.model.model)
                .context("conversational preference records need the model's chat template")?;
            tokenize_conversation_pairs(&pairs, &template, &tokenizer, config.max_length)
        }
    }
    .with_context(|| format!("tokenizing {}", args.data.display()))?;
    let longest = tokens
        .iter()
        .map(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len()))
        .max()
        .unwrap_or(0);
    let rows = 2 * config.per_device_train_batch_size.min(tokens.len());
    args.model.preflight(PlanSettings {
        job: Job::Dpo,
        batch: rows,
        train_batch: rows,
        seq_len: longest,
        lora_r: config.lora_r,
        lora_targets: config.target_modules.clone(),
        gradient_checkpointing: config.gradient_checkpointing,
        ..PlanSettings::inference()
    })?;
    let (mut pretrained, device) = args.model.load()?;
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let stop = crate::progress::stop_on_ctrl_c("dpo");
    let options = crate::resume::ResumeOptions {
        model: Some(args.model.fingerprint(None)?),
        reward: None,
        anyway: args.resume_anyway,
    };
    let mut run = DpoRun::open(
        &mut pretrained.model,
        &tokens,
        &config,
        pad,
        &args.out,
        &device,
        &options,
    )?;
    eprintln!("{}", run.trainer().model().trainable_parameters_line()?);
    let plan = run.trainer().plan();
    eprintln!(
        "dpo: {} pairs; {} steps of {} x {} pairs{}",
        tokens.len(),
        plan.total_steps,
        config.per_device_train_batch_size,
        config.gradient_accumulation_steps,
        if run.start_step() > 0 {
            format!(", resuming at step {}", run.start_step())
        } else {
            String::new()
        }
    );
    if run.already_finished() {
        eprintln!(
            "dpo: {} already holds a finished run; nothing to do",
            args.out.display()
        );
        return Ok(());
    }
    let start = run.start_step();
    let mut progress = Progress::new("dpo", plan.total_steps);
    while !run.done() {
        let record = run.step()?;
        let json = &record.json;
        progress.update(
            record.stats.step,
            start,
            &format!(
                "loss {:.4} margin {:.3} accuracy {:.2} lr {:.2e}",
                record.stats.loss,
                json["rewards/margins"].as_f64().unwrap_or(f64::NAN),
                json["rewards/accuracies"].as_f64().unwrap_or(f64::NAN),
                record.stats.lr
            ),
        );
        let interrupted = stop.load(Ordering::SeqCst);
        if run.checkpoint_due() || interrupted {
            run.save_checkpoint()?;
        }
        if interrupted && !run.done() {
            progress.finish();
            let steps = run.interrupted().steps;
            return Err(crate::run_files::Interrupted {
                command: "dpo",
                step: steps,
            }
            .into());
        }
    }
    progress.finish();
    let summary = run.finish()?;
    crate::report::write_report(&args.out)?;
    let (first, last) = (
        summary.losses.first().copied().unwrap_or(f64::NAN),
        summary.losses.last().copied().unwrap_or(f64::NAN),
    );
    eprintln!(
        "dpo: done, {} steps, loss {first:.4} -> {last:.4}, margin {:.3}; adapter in {}",
        summary.steps,
        summary.margins.last().copied().unwrap_or(f64::NAN),
        args.out.display()
    );
    Ok(())
}
