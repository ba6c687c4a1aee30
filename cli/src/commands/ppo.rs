//! `lathe ppo`: PPO with a fresh LoRA on a (possibly SFT-merged) model against a reward
//! (the seed's step 3). The run (queries, sampling, scoring, the PPO step, the run folder
//! and its checkpoints) is `lathe_ppo::run`'s; this is the command: flags and `--config`,
//! the reward model, the progress display, Ctrl-C, and the report.

use lathe_models::plan::{Job, PlanSettings};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use lathe_core::Device;
use lathe_lora::AdapterSwitch;
use lathe_models::hf::CausalLm;
use lathe_models::tokenizer::Tokenizer;
use lathe_ppo::{PpoRun, Prompts, Reward};

pub use lathe_ppo::run::{PpoFile, PpoSummary, RunSettings, MAX_STEPS};

use crate::config_file::{read_toml, settings};
use crate::progress::Progress;
use crate::run_files::Interrupted;

/// The PPO run: `model` (with no adapters yet, or a checkpoint's), `prompts` to draw queries
/// from, `reward` to score query + response texts, outputs under `out`. `stop` ends the run
/// after the current step (Ctrl-C); `stop_after` stops after that many steps (tests).
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: CausalLm,
    tokenizer: &Tokenizer,
    prompts: Prompts,
    reward: &mut dyn Reward,
    file: &PpoFile,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
    stop_after: Option<usize>,
) -> Result<PpoSummary> {
    let options = crate::resume::ResumeOptions::default();
    train_with(
        model, tokenizer, prompts, reward, file, out, device, stop, stop_after, &options,
    )
}

/// [`train`], with the model's and reward's fingerprints (checked on resume with the
/// prompts' and the settings) and `--resume-anyway` in `options`; progress on stderr, and the
/// report written at the end.
#[allow(clippy::too_many_arguments)]
pub fn train_with(
    model: CausalLm,
    tokenizer: &Tokenizer,
    prompts: Prompts,
    reward: &mut dyn Reward,
    file: &PpoFile,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
    stop_after: Option<usize>,
    options: &crate::resume::ResumeOptions,
) -> Result<PpoSummary> {
    let collective = crate::parallel::collective();
    let (ranks, writer) = (collective.size(), collective.is_writer());
    let mut run = PpoRun::open_on_ranks(
        model,
        tokenizer,
        prompts,
        file,
        out,
        device,
        options,
        collective.clone(),
    )?;
    let steps = file.run.steps;
    if run.resumed() && writer {
        eprintln!(
            "ppo: resuming at step {} of {steps} from {}",
            run.start_step(),
            out.join("checkpoint").display()
        );
    }
    if writer {
        eprintln!("{}", run.trainer().model.trainable_parameters_line()?);
    }
    if run.already_finished() {
        eprintln!(
            "ppo: {} already holds a finished run of {} steps; nothing to do",
            out.display(),
            run.start_step()
        );
        // The report is written after run.json: a failure in between (a full disk) left
        // the run without it.
        if writer && !out.join("report.html").is_file() {
            crate::report::write_report(out)?;
        }
        return Ok(run.summary().clone());
    }
    let mut progress = Progress::new("ppo", steps);
    let start = run.start_step();
    while !run.done() {
        let record = run.step(reward)?;
        let stats = &record.stats;
        let (mean_reward, kl) = (stats["env/reward_mean"], stats["objective/kl"]);
        progress.update(
            record.step,
            start,
            &format!(
                "reward {mean_reward:.3} kl {kl:.3} kl_coef {:.3} | {:.1} s/step",
                stats["objective/kl_coef"], record.step_s
            ),
        );
        let mine = stop.load(Ordering::SeqCst);
        // Every rank stops at the same step: a Ctrl-C seen by one stops all.
        let interrupted = if ranks > 1 {
            collective.any(mine)?
        } else {
            mine
        };
        if run.checkpoint_due() || interrupted {
            run.save_checkpoint()?;
        }
        if interrupted {
            progress.finish();
            return Ok(run.interrupted());
        }
        if stop_after == Some(record.step) {
            progress.finish();
            return Ok(run.summary().clone());
        }
    }
    progress.finish();
    let summary = run.finish()?;
    if writer {
        crate::report::write_report(out)?;
    }
    Ok(summary)
}

/// `lathe ppo` flags: the inputs, and every setting of the `--config` file's two sections
/// ([`PpoSettings`] and [`PpoRunSettings`]).
#[derive(clap::Args, Debug)]
pub struct PpoArgs {
    #[command(flatten)]
    pub model: crate::model_args::ModelArgs,
    /// An SFT adapter merged into the model first (the reference is then the SFT model).
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The reward model directory (`lathe reward-train`'s output).
    #[arg(long, value_name = "DIR")]
    pub reward: PathBuf,
    /// Texts to cut queries from: .txt, .jsonl, .json, Parquet or Arrow (with --text-field).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Each text is a user turn put through the model's chat template (with the generation
    /// prompt), used whole as a query instead of cut to --query-length.
    #[arg(long)]
    pub chat: bool,
    /// Run directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A TOML file: `[ppo]` with trl's PPOConfig keys, `[run]` with steps, query_length,
    /// response_length, sampling, LoRA settings; flags given on the command line override
    /// it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub ppo: PpoSettings,
    #[command(flatten)]
    pub run: PpoRunSettings,
    /// Resume the checkpoint in --out even when its model, reward, data or settings differ
    /// from this run's (a warning names them); the LoRA shape settings must still match.
    #[arg(long)]
    pub resume_anyway: bool,
}

settings! {
    /// The `[ppo]` section: trl's PPOConfig keys; unset ones are `PpoConfig::default()`'s.
    pub struct PpoSettings => lathe_ppo::PpoConfig {
        /// Adam's learning rate.
        learning_rate: f32,
        /// Samples per PPO step (rollouts scored together).
        batch_size: usize,
        /// Samples per forward/backward in the PPO epochs.
        mini_batch_size: usize,
        /// Minibatches whose gradients are summed before one optimizer step.
        gradient_accumulation_steps: usize,
        /// Passes over the batch per step.
        ppo_epochs: usize,
        /// The KL coefficient to start from.
        init_kl_coef: f32,
        /// Adapt the KL coefficient towards --target (else fixed at --init-kl-coef).
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        adap_kl_ctrl: bool,
        /// The adaptive controller's target KL.
        target: f32,
        /// The adaptive controller's horizon.
        horizon: f32,
        /// Discount of GAE.
        gamma: f32,
        /// GAE's lambda.
        lam: f32,
        /// The policy ratio's clip range.
        cliprange: f32,
        /// The value prediction's clip range.
        cliprange_value: f32,
        /// The value loss's weight.
        vf_coef: f32,
        /// The per-token KL estimate: kl, abs or mse.
        kl_penalty: lathe_ppo::math::KlPenalty,
        /// Whiten the per-token rewards.
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        whiten_rewards: bool,
        /// Skip a minibatch's update when its mean ratio exceeds this.
        ratio_threshold: f32,
        /// Stop a step's epochs once the policy KL exceeds 1.5 --target-kl.
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        early_stopping: bool,
        /// The policy KL early stopping compares with.
        target_kl: f32,
        /// Clip the gradients' global norm to this (default: no clipping).
        max_grad_norm: f32,
        /// The seed of everything random in the run.
        seed: u64,
    }
}

settings! {
    /// The `[run]` section: the run beyond trl's PPOConfig; unset ones are
    /// `RunSettings::default()`'s.
    pub struct PpoRunSettings => RunSettings {
        /// PPO steps to run.
        steps: usize,
        /// Query lengths, MIN-MAX tokens of a text, drawn uniformly.
        query_length: lathe_ppo::rollout::LengthRange,
        /// Response lengths, MIN-MAX new tokens, drawn uniformly.
        response_length: lathe_ppo::rollout::LengthRange,
        /// Sampling temperature.
        temperature: f32,
        /// Sample among the k most likely tokens (0: all).
        top_k: usize,
        /// Nucleus sampling's mass.
        top_p: f32,
        /// LoRA rank.
        lora_r: usize,
        /// LoRA alpha (scaling alpha / r).
        lora_alpha: f64,
        /// Dropout on the adapters' input.
        lora_dropout: f64,
        /// Modules to adapt, comma-separated (default: the architecture's).
        #[arg(value_delimiter = ',')]
        target_modules: Vec<String>,
        /// The value head's dropout.
        value_head_dropout: f32,
        /// Save a checkpoint every N steps (0: at the end only); a rerun resumes from it.
        save_every: usize,
        /// Recompute every block's activations in the backward instead of keeping them.
        #[arg(num_args = 0..=1, default_missing_value = "true")]
        gradient_checkpointing: bool,
    }
}

/// The `--config` file of `lathe ppo`: its two sections.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PpoSettingsFile {
    #[serde(default)]
    ppo: PpoSettings,
    #[serde(default)]
    run: PpoRunSettings,
}

/// The `--help` text after the flags: the defaults, as a `--config` file would set them.
pub fn defaults_help() -> String {
    crate::config_file::defaults_help(&PpoFile::default())
}

impl PpoArgs {
    /// The defaults, under the config file's settings, under the flags.
    pub fn settings(&self) -> Result<PpoFile> {
        let file: PpoSettingsFile = match &self.config {
            Some(path) => read_toml(path, "PPO config")?,
            None => PpoSettingsFile::default(),
        };
        let mut settings = PpoFile::default();
        self.ppo.clone().over(file.ppo).apply_to(&mut settings.ppo);
        self.run.clone().over(file.run).apply_to(&mut settings.run);
        Ok(settings)
    }
}

/// `lathe ppo`.
pub fn run(args: &PpoArgs) -> Result<()> {
    let file = args.settings()?;
    file.validate()?;
    args.model.precision()?;
    let run = &file.run;
    let texts = crate::texts::read_texts(&args.data, &args.text_field)?;
    let query_max =
        crate::chat::longest_query(&args.model, &texts, args.chat, run.query_length.max)?;
    args.model.preflight(PlanSettings {
        job: Job::Ppo,
        batch: file.ppo.batch_size,
        train_batch: file.ppo.mini_batch_size,
        seq_len: query_max + run.response_length.max,
        lora_r: run.lora_r,
        lora_targets: run.target_modules.clone(),
        gradient_checkpointing: run.gradient_checkpointing,
        ..PlanSettings::inference()
    })?;
    let (mut pretrained, device) = args.model.load()?;
    if let Some(adapter) = &args.adapter {
        pretrained
            .model
            .load_lora(adapter, &AdapterSwitch::new())
            .with_context(|| format!("loading the SFT adapter {}", adapter.display()))?;
        pretrained.model.merge_lora()?;
        eprintln!(
            "merged the SFT adapter {} into the model",
            adapter.display()
        );
    }
    let mut reward = crate::reward_glue::load_reward(&args.reward, &device)?;
    let stop = crate::progress::stop_on_ctrl_c("ppo");
    let options = crate::resume::ResumeOptions {
        model: Some(args.model.fingerprint(args.adapter.as_deref())?),
        reward: Some(crate::resume::path_fingerprint(&args.reward)?),
        anyway: args.resume_anyway,
    };
    let prompts =
        crate::chat::prompts(&args.model.model, &pretrained.tokenizer, &texts, args.chat)?;
    let summary = train_with(
        pretrained.model,
        &pretrained.tokenizer,
        prompts,
        reward.as_mut(),
        &file,
        &args.out,
        &device,
        &stop,
        None,
        &options,
    )?;
    if summary.interrupted {
        return Err(Interrupted {
            command: "ppo",
            step: summary.steps_done,
        }
        .into());
    }
    let n = summary.mean_rewards.len();
    if n > 0 && crate::parallel::is_writer() {
        let k = n.min(5);
        let first: f32 = summary.mean_rewards[..k].iter().sum::<f32>() / k as f32;
        let last: f32 = summary.mean_rewards[n - k..].iter().sum::<f32>() / k as f32;
        eprintln!(
            "ppo: {} steps, mean reward (first {k}) {first:.3} -> (last {k}) {last:.3}, KL {:.3}; report: {}",
            summary.steps_done,
            summary.kls[n - 1],
            args.out.join("report.html").display()
        );
    }
    Ok(())
}
