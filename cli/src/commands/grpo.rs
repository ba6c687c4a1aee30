//! `lathe grpo`: GRPO with a fresh LoRA towards a reward model (and lathe's length reward),
//! G completions per prompt, the reference being the same model with its adapters off; no
//! value head. The trainer and its run folder are `lathe_ppo::grpo`'s; this is the command:
//! flags and `--config` (trl's GRPOConfig names), the reward model, progress, Ctrl-C, and
//! the report.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use lathe_core::Device;
use lathe_models::hf::CausalLm;
use lathe_models::plan::{Job, PlanSettings};
use lathe_models::tokenizer::Tokenizer;
use lathe_ppo::grpo::{Aggregation, GrpoConfig, GrpoLoss, GrpoRun, GrpoSummary, ScaleRewards};
use lathe_ppo::rollout::LengthRange;
use lathe_ppo::{Prompts, Reward};

use crate::config_file::{read_toml, settings};
use crate::progress::Progress;

/// `lathe grpo` flags: the inputs, and [`GrpoSettings`] (also the `--config` file's keys).
#[derive(clap::Args, Debug)]
pub struct GrpoArgs {
    #[command(flatten)]
    pub model: crate::model_args::ModelArgs,
    /// The reward model directory (`lathe reward-train`'s output), for the "model" reward.
    #[arg(long, value_name = "DIR")]
    pub reward: PathBuf,
    /// Texts to cut prompts from: .txt, .jsonl, .json, Parquet or Arrow (with --text-field).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Each text is a user turn put through the model's chat template (with the generation
    /// prompt), used whole as a prompt instead of cut to prompt_length.
    #[arg(long)]
    pub chat: bool,
    /// Run directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A TOML file of the settings (trl's GRPOConfig names); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: GrpoSettings,
    /// Resume the checkpoint in --out even when its model, reward, data or settings differ.
    #[arg(long)]
    pub resume_anyway: bool,
}

settings! {
    /// GRPO's settings under trl's GRPOConfig names; unset ones are `GrpoConfig::default()`'s.
    pub struct GrpoSettings => GrpoConfig {
        /// G: completions per prompt (>= 2).
        num_generations: usize,
        max_completion_length: usize,
        temperature: f32,
        top_p: f32,
        /// Sample among the k most likely tokens (0: all).
        top_k: usize,
        /// The KL term's weight (0: no reference pass).
        beta: f64,
        /// The clip range (the lower one when --epsilon-high is given).
        epsilon: f64,
        /// DAPO's upper clip range.
        epsilon_high: f64,
        /// grpo, bnpo, dr_grpo or dapo.
        loss_type: GrpoLoss,
        /// group, batch or none.
        scale_rewards: ScaleRewards,
        /// sum_then_normalize or normalize_then_sum.
        multi_objective_aggregation: Aggregation,
        /// Optimizer steps per generation batch.
        num_iterations: usize,
        /// Reward functions, comma-separated: model, length.
        #[arg(value_delimiter = ',')]
        reward_funcs: Vec<String>,
        /// One weight per reward function, comma-separated.
        #[arg(value_delimiter = ',')]
        reward_weights: Vec<f64>,
        learning_rate: f32,
        /// Completions per micro-batch.
        per_device_train_batch_size: usize,
        /// Micro-batches per optimizer step (a generation batch is both counts' product).
        gradient_accumulation_steps: usize,
        /// Optimizer steps of the run.
        max_steps: usize,
        weight_decay: f32,
        max_grad_norm: f32,
        warmup_steps: usize,
        lr_scheduler_type: String,
        seed: u64,
        /// Save a checkpoint every N steps (0: at the end only).
        save_steps: usize,
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        gradient_checkpointing: bool,
        /// Prompt lengths, MIN-MAX tokens of a text.
        prompt_length: LengthRange,
        lora_r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        #[arg(value_delimiter = ',')]
        target_modules: Vec<String>,
    }
}

/// The `--help` text after the flags: the defaults, as a `--config` file would set them.
pub fn defaults_help() -> String {
    crate::config_file::defaults_help(&GrpoConfig::default())
}

impl GrpoArgs {
    /// The defaults, under the `--config` file's settings, under the flags.
    pub fn settings(&self) -> Result<GrpoConfig> {
        let file: GrpoSettings = match &self.config {
            Some(path) => read_toml(path, "GRPO config")?,
            None => GrpoSettings::default(),
        };
        let mut config = GrpoConfig::default();
        self.settings.clone().over(file).apply_to(&mut config);
        Ok(config)
    }
}

/// The GRPO run on `model` in `out`, with progress on stderr and the report at the end;
/// `stop` (Ctrl-C) ends it at the next generation-batch boundary with a checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: CausalLm,
    tokenizer: &Tokenizer,
    prompts: Prompts,
    reward: &mut dyn Reward,
    config: &GrpoConfig,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
    options: &crate::resume::ResumeOptions,
) -> Result<GrpoSummary> {
    let mut run = GrpoRun::open(model, tokenizer, prompts, config, out, device, options)?;
    eprintln!("{}", run.trainer().model.trainable_parameters_line()?);
    if run.already_finished() {
        eprintln!(
            "grpo: {} already holds a finished run; nothing to do",
            out.display()
        );
        if !out.join("report.html").is_file() {
            crate::report::write_report(out)?;
        }
        return Ok(run.summary().clone());
    }
    let start = run.start_step();
    let mut progress = Progress::new("grpo", config.max_steps);
    while !run.done() {
        let stats = run.step(reward)?;
        progress.update(
            stats.step,
            start,
            &format!(
                "reward {:.3} loss {:.4} clipped {:.2} | length {:.1}",
                stats.get("reward"),
                stats.get("loss"),
                stats.get("clip_ratio/region_mean"),
                stats.get("completions/mean_length"),
            ),
        );
        let interrupted = stop.load(Ordering::SeqCst) && run.at_generation_boundary();
        if run.checkpoint_due() || interrupted {
            run.save_checkpoint()?;
        }
        if interrupted && !run.done() {
            progress.finish();
            return Ok(run.interrupted());
        }
    }
    progress.finish();
    let summary = run.finish()?;
    crate::report::write_report(out)?;
    Ok(summary)
}

/// `lathe grpo`.
pub fn run(args: &GrpoArgs) -> Result<()> {
    let config = args.settings()?;
    config.validate()?;
    args.model.precision()?;
    let texts = crate::texts::read_texts(&args.data, &args.text_field)?;
    let prompt_max =
        crate::chat::longest_query(&args.model, &texts, args.chat, config.prompt_length.max)?;
    args.model.preflight(PlanSettings {
        job: Job::Ppo,
        batch: config.generation_batch(),
        train_batch: config.per_device_train_batch_size,
        seq_len: prompt_max + config.max_completion_length,
        lora_r: config.lora_r,
        lora_targets: config.target_modules.clone(),
        gradient_checkpointing: config.gradient_checkpointing,
        ..PlanSettings::inference()
    })?;
    let (pretrained, device) = args.model.load()?;
    let mut reward = crate::reward_glue::load_reward(&args.reward, &device)?;
    let stop = crate::progress::stop_on_ctrl_c("grpo");
    let options = crate::resume::ResumeOptions {
        model: Some(args.model.fingerprint(None)?),
        reward: Some(crate::resume::path_fingerprint(&args.reward)?),
        anyway: args.resume_anyway,
    };
    let prompts =
        crate::chat::prompts(&args.model.model, &pretrained.tokenizer, &texts, args.chat)?;
    let summary = train(
        pretrained.model,
        &pretrained.tokenizer,
        prompts,
        reward.as_mut(),
        &config,
        &args.out,
        &device,
        &stop,
        &options,
    )?;
    if summary.interrupted {
        return Err(crate::run_files::Interrupted {
            command: "grpo",
            step: summary.steps_done,
        }
        .into());
    }
    let n = summary.mean_rewards.len();
    if n > 0 {
        let k = n.min(5);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        eprintln!(
            "grpo: {} steps, mean reward (first {k}) {:.3} -> (last {k}) {:.3}; report: {}",
            summary.steps_done,
            mean(&summary.mean_rewards[..k]),
            mean(&summary.mean_rewards[n - k..]),
            args.out.join("report.html").display()
        );
    }
    Ok(())
}
