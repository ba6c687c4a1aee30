//! `lathe ppo`: PPO with a fresh LoRA on a (possibly SFT-merged) model against a reward
//! (the seed's step 3). Writes to the run directory:
//! - `metrics.jsonl`: every statistic of every step under trl's names;
//! - `samples.jsonl`: each step's query, response and reward;
//! - `checkpoint/`: adapter, value head, optimizer and trainer state (a rerun resumes
//!   exactly; Ctrl-C finishes the current step, saves and exits);
//! - the final adapter (peft files) and `value_head.safetensors`, `run.json`, and the report
//!   (`report.html` and PNG plots).
//!
//! Everything random is a function of (seed, step): which texts, the query and response
//! lengths, the sampled tokens, the dropout masks; so a resumed run equals an uninterrupted one.

use lathe_models::plan::{Job, PlanSettings};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_core::Device;
use lathe_core::Rng;
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::hf::CausalLm;
use lathe_models::sampling::SamplingConfig;
use lathe_models::tokenizer::Tokenizer;
use lathe_models::value_head::ValueHead;
use lathe_ppo::math::KlController;
use lathe_ppo::rollout::{make_queries, sample_responses, LengthRange};
use lathe_ppo::{PpoConfig, PpoTrainer, Reward};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config_file::read_toml;
use crate::progress::Progress;
use crate::run_files::{append_jsonl, Interrupted, RunDir, METRICS_FILE, OPTIMIZER_FILE};

/// The run's settings beyond trl's PPOConfig: rollouts, LoRA, length of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSettings {
    /// PPO steps to run.
    pub steps: usize,
    /// Query length L ~ U{min..=max} tokens of a text (the seed: LengthSampler(2, 8)).
    pub query_length: LengthRange,
    /// Response length ~ U{min..=max} new tokens (the seed: LengthSampler(4, 16)).
    pub response_length: LengthRange,
    pub temperature: f32,
    /// 0 = no top-k filtering (the seed's setting).
    pub top_k: usize,
    pub top_p: f32,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Empty: the architecture's defaults.
    pub target_modules: Vec<String>,
    /// The value head's dropout (trl: 0.1).
    pub value_head_dropout: f32,
    /// Checkpoint every N steps (0: at the end only).
    pub save_every: usize,
    pub gradient_checkpointing: bool,
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            steps: 20,
            query_length: LengthRange { min: 2, max: 7 },
            response_length: LengthRange { min: 4, max: 15 },
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: Vec::new(),
            value_head_dropout: 0.1,
            save_every: 0,
            gradient_checkpointing: false,
        }
    }
}

/// The most PPO steps a run may ask for.
pub const MAX_STEPS: usize = 1 << 30;

impl RunSettings {
    /// Checks every setting against its meaning; the error names the key and its range.
    /// `steps = 0` is an error (trl's loop would do nothing and still save: say so instead).
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_STEPS).contains(&self.steps) {
            bail!("steps must be in 1..={MAX_STEPS}, got {}", self.steps);
        }
        self.query_length.validate("query_length")?;
        self.response_length.validate("response_length")?;
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "temperature must be finite and > 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(0.0..1.0).contains(&self.value_head_dropout) {
            bail!(
                "value_head_dropout must be in [0, 1), got {}",
                self.value_head_dropout
            );
        }
        Ok(crate::sft::check_lora(
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
        )?)
    }
}

/// The whole config file: `[ppo]` with trl's PPOConfig keys, `[run]` with [`RunSettings`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoFile {
    pub ppo: PpoConfig,
    pub run: RunSettings,
}

impl PpoFile {
    pub fn read(path: &Path) -> Result<PpoFile> {
        read_toml(path, "PPO config")
    }

    /// Both sections' checks.
    pub fn validate(&self) -> Result<()> {
        self.ppo.validate()?;
        self.run.validate()
    }
}

const VALUE_HEAD_FILE: &str = "value_head.safetensors";

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    adam_step: u64,
    kl: KlController,
    config: PpoFile,
    /// The run's inputs; absent in checkpoints of older versions.
    #[serde(default)]
    inputs: Option<crate::resume::Fingerprints>,
}

/// Reads a checkpoint's trainer state and refuses one that no run of `file` wrote (a hand
/// edit, a damaged file): a step beyond the run, an optimizer step count no PPO step count
/// gives, a KL coefficient that is negative or of another controller, a step
/// metrics.jsonl never recorded.
fn read_state(folder: &RunDir, dir: &Path, file: &PpoFile) -> Result<TrainerState> {
    let state: TrainerState = folder.read_state(dir)?;
    let bad = |detail: String| anyhow::Error::from(crate::run_files::damaged_state(dir, detail));
    folder.check_step(dir, state.step, state.config == *file, file.run.steps)?;
    // Each PPO step updates at least once (the first epoch's first backward batch) and at
    // most once per backward batch of every epoch.
    let c = &state.config.ppo;
    let backward = c
        .mini_batch_size
        .saturating_mul(c.gradient_accumulation_steps)
        .max(1);
    let per_step = c.batch_size.div_ceil(backward).saturating_mul(c.ppo_epochs) as u64;
    let (low, high) = (
        state.step as u64,
        (state.step as u64).saturating_mul(per_step),
    );
    if !(low..=high).contains(&state.adam_step) {
        return Err(bad(format!(
            "the optimizer has taken {} steps at PPO step {}, outside the {low}..={high} that \
             run takes",
            state.adam_step, state.step
        )));
    }
    let kl = state.kl.value();
    if !(kl.is_finite() && kl >= 0.0) {
        return Err(bad(format!("the KL coefficient is {kl}")));
    }
    let same_kind = match (&state.kl, state.config.ppo.kl_controller()) {
        (KlController::Fixed { .. }, KlController::Fixed { .. }) => true,
        (
            KlController::Adaptive {
                target, horizon, ..
            },
            KlController::Adaptive {
                target: t,
                horizon: h,
                ..
            },
        ) => *target == t && *horizon == h,
        _ => false,
    };
    if !same_kind {
        return Err(bad(format!(
            "the KL controller {:?} is not the one the config makes",
            state.kl
        )));
    }
    folder.check_logged(dir, state.step)?;
    Ok(state)
}

/// sha256 of the tokenized texts queries are cut from.
fn texts_fingerprint(tokenized: &[Vec<u32>]) -> String {
    let mut bytes = Vec::new();
    for t in tokenized {
        bytes.extend((t.len() as u64).to_le_bytes());
        bytes.extend(t.iter().flat_map(|x| x.to_le_bytes()));
    }
    crate::resume::bytes_fingerprint(&bytes)
}

/// What a finished (or interrupted) run did.
#[derive(Clone, Debug, Serialize)]
pub struct PpoSummary {
    pub steps_done: usize,
    pub mean_rewards: Vec<f32>,
    pub kls: Vec<f32>,
    pub interrupted: bool,
    pub resumed_from: Option<usize>,
    pub seconds_per_step: f64,
}

/// The PPO run: `model` (with no adapters yet, or a checkpoint's), `texts` to cut queries
/// from, `reward` to score query + response texts, outputs under `out`. `stop` ends the run
/// after the current step (Ctrl-C); `stop_after` stops after that many steps (tests).
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: CausalLm,
    tokenizer: &Tokenizer,
    texts: &[String],
    reward: &mut dyn Reward,
    file: &PpoFile,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
    stop_after: Option<usize>,
) -> Result<PpoSummary> {
    let options = crate::resume::ResumeOptions::default();
    train_with(
        model, tokenizer, texts, reward, file, out, device, stop, stop_after, &options,
    )
}

/// [`train`], with the model's and reward's fingerprints (checked on resume with the
/// texts' and the settings) and `--resume-anyway` in `options`.
#[allow(clippy::too_many_arguments)]
pub fn train_with(
    mut model: CausalLm,
    tokenizer: &Tokenizer,
    texts: &[String],
    reward: &mut dyn Reward,
    file: &PpoFile,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
    stop_after: Option<usize>,
    options: &crate::resume::ResumeOptions,
) -> Result<PpoSummary> {
    let (config, run) = (&file.ppo, &file.run);
    file.validate()?;
    let tokenized: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode(t, true))
        .collect::<std::result::Result<_, _>>()?;
    let tokenized: Vec<Vec<u32>> = tokenized.into_iter().filter(|t| !t.is_empty()).collect();
    if tokenized.is_empty() {
        bail!("no text gives a token to start a query from");
    }
    let switch = AdapterSwitch::new();
    let inputs = crate::resume::Fingerprints {
        model: options.model.clone(),
        data: Some(texts_fingerprint(&tokenized)),
        reward: options.reward.clone(),
    };
    let folder = RunDir::new(out, "ppo");
    let resume_dir = folder.checkpoint_to_resume();
    let hidden = model.config().hidden_size();
    let lora = lora_config(run, &model);
    let (value_head, state) = if let Some(checkpoint) = &resume_dir {
        let state = read_state(&folder, checkpoint, file)?;
        crate::resume::check(
            "ppo",
            checkpoint,
            state.inputs.as_ref(),
            &inputs,
            &serde_json::to_value(&state.config)?,
            &serde_json::to_value(file)?,
            options.anyway,
        )?;
        let loaded = model.load_lora(checkpoint, &switch)?;
        crate::sft::check_adapters(&model, &lora, &loaded, checkpoint)?;
        let head = load_value_head(&checkpoint.join(VALUE_HEAD_FILE), hidden, run, device)?;
        eprintln!(
            "ppo: resuming at step {} of {} from {}",
            state.step,
            run.steps,
            checkpoint.display()
        );
        (head, Some(state))
    } else {
        model.add_lora(&lora, &switch, config.seed)?;
        (
            ValueHead::new(hidden, run.value_head_dropout, config.seed, device)?,
            None,
        )
    };
    model.set_gradient_checkpointing(run.gradient_checkpointing);
    eprintln!("{}", model.trainable_parameters_line()?);
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let mut trainer = PpoTrainer::new(model, switch, value_head, config.clone(), pad, device)?;
    // Only now, with every setting and the adapters accepted, does the run folder appear.
    folder.create()?;
    let start = match &state {
        Some(s) => {
            let n = trainer.optimizer().params().len();
            let checkpoint = resume_dir
                .as_ref()
                .expect("a state comes from a checkpoint");
            let pairs =
                crate::run_files::load_moments(&checkpoint.join(OPTIMIZER_FILE), n, device)?;
            trainer.restore(s.step, s.kl.clone(), s.adam_step, pairs)?;
            s.step
        }
        None => 0,
    };
    let metrics_path = folder.metrics();
    if start >= run.steps {
        // A rerun of a finished run: nothing to train. Its outputs stay as they are; only
        // when the final ones are missing (a crash after the last checkpoint) are they
        // written, with the summary taken from metrics.jsonl.
        let summary = finished_summary(&metrics_path, start)?;
        if out.join("run.json").is_file() {
            eprintln!(
                "ppo: {} already holds a finished run of {start} steps; nothing to do",
                out.display()
            );
            // The report is written after run.json: a failure in between (a full disk)
            // left the run without it.
            if !out.join("report.html").is_file() {
                crate::report::write_report(out)?;
            }
        } else {
            save_final(&trainer, &lora, file, &summary, out)?;
        }
        return Ok(summary);
    }
    let mut metrics = folder.reopen_log(METRICS_FILE, start)?;
    let mut samples = folder.reopen_log("samples.jsonl", start)?;
    let sampling = SamplingConfig {
        temperature: run.temperature,
        top_k: run.top_k,
        top_p: run.top_p,
        greedy: false,
    };
    // A resumed run's summary covers the steps before the checkpoint too.
    let mut summary = if start > 0 {
        finished_summary(&metrics_path, start)?
    } else {
        PpoSummary {
            steps_done: 0,
            mean_rewards: Vec::new(),
            kls: Vec::new(),
            interrupted: false,
            resumed_from: None,
            seconds_per_step: 0.0,
        }
    };
    let mut progress = Progress::new("ppo", run.steps);
    let started = Instant::now();
    for step in start..run.steps {
        let step_started = Instant::now();
        let mut rng = Rng::new(lathe_core::seed::derive(config.seed, 0, step as u64 + 1));
        let drawn: Vec<&[u32]> = (0..config.batch_size)
            .map(|_| tokenized[(rng.next_u64() % tokenized.len() as u64) as usize].as_slice())
            .collect();
        let queries = make_queries(&drawn, run.query_length, &mut rng);
        let generate_started = Instant::now();
        let responses = sample_responses(
            &trainer.model,
            &queries,
            run.response_length,
            sampling,
            pad,
            rng.next_u64(),
            &mut rng,
            device,
        )?;
        let generate_s = generate_started.elapsed().as_secs_f64();
        let query_texts: Vec<String> = queries
            .iter()
            .map(|q| tokenizer.decode(q, true))
            .collect::<std::result::Result<_, _>>()?;
        let response_texts: Vec<String> = responses
            .iter()
            .map(|r| tokenizer.decode(r, true))
            .collect::<std::result::Result<_, _>>()?;
        let full: Vec<String> = query_texts
            .iter()
            .zip(&response_texts)
            .map(|(q, r)| format!("{q}{r}"))
            .collect();
        let scores = reward.score(&full)?;
        if scores.len() != full.len() {
            bail!(
                "the reward returned {} scores for {} texts",
                scores.len(),
                full.len()
            );
        }
        let stats = trainer.step(&queries, &responses, &scores)?;
        let done = step + 1;
        let mut record = json!({ "step": done });
        for (k, v) in &stats {
            record[k] = json!(v);
        }
        record["time/generate_s"] = json!(generate_s);
        record["time/step_s"] = json!(step_started.elapsed().as_secs_f64());
        append_jsonl(&mut metrics, &record)?;
        metrics.flush()?;
        for ((q, r), s) in query_texts.iter().zip(&response_texts).zip(&scores) {
            append_jsonl(
                &mut samples,
                &json!({ "step": done, "query": q, "response": r, "reward": s }),
            )?;
        }
        samples.flush()?;
        let (mean_reward, kl) = (stats["env/reward_mean"], stats["objective/kl"]);
        summary.mean_rewards.push(mean_reward);
        summary.kls.push(kl);
        summary.steps_done = done;
        progress.update(
            done,
            start,
            &format!(
                "reward {mean_reward:.3} kl {kl:.3} kl_coef {:.3} | {:.1} s/step",
                stats["objective/kl_coef"],
                step_started.elapsed().as_secs_f64()
            ),
        );
        let interrupted = stop.load(Ordering::SeqCst);
        if done == run.steps || interrupted || (run.save_every > 0 && done % run.save_every == 0) {
            save_checkpoint(&trainer, &lora, file, &inputs, done, out)?;
        }
        if interrupted {
            summary.interrupted = true;
            progress.finish();
            return Ok(summary);
        }
        if stop_after == Some(done) {
            progress.finish();
            return Ok(summary);
        }
    }
    progress.finish();
    let ran = summary.steps_done - start;
    summary.seconds_per_step = started.elapsed().as_secs_f64() / ran.max(1) as f64;
    save_final(&trainer, &lora, file, &summary, out)?;
    Ok(summary)
}

/// The final outputs: adapter, value head, `run.json` and the report.
fn save_final(
    trainer: &PpoTrainer,
    lora: &LoraConfig,
    file: &PpoFile,
    summary: &PpoSummary,
    out: &Path,
) -> Result<()> {
    RunDir::new(out, "ppo").save_final(|dir| -> Result<()> {
        trainer.model.save_lora(dir, lora)?;
        save_value_head(&trainer.value_head, &dir.join(VALUE_HEAD_FILE))?;
        std::fs::write(
            dir.join("run.json"),
            serde_json::to_string_pretty(&json!({ "config": file, "summary": summary }))?,
        )?;
        Ok(())
    })?;
    crate::report::write_report(out)
}

/// The summary of the first `steps` steps of a run from its `metrics.jsonl` (a resumed or
/// finished run); the timing is unknown (0).
fn finished_summary(metrics: &Path, steps: usize) -> Result<PpoSummary> {
    let records = if metrics.is_file() {
        crate::run_files::read_jsonl(metrics)?
    } else {
        Vec::new()
    };
    let mut summary = PpoSummary {
        steps_done: steps,
        mean_rewards: Vec::new(),
        kls: Vec::new(),
        interrupted: false,
        resumed_from: Some(steps),
        seconds_per_step: 0.0,
    };
    for r in records
        .iter()
        .filter(|r| r["step"].as_u64().is_some_and(|s| s as usize <= steps))
    {
        let value = |key: &str| r[key].as_f64().map_or(f32::NAN, |v| v as f32);
        summary.mean_rewards.push(value("env/reward_mean"));
        summary.kls.push(value("objective/kl"));
    }
    Ok(summary)
}

fn lora_config(run: &RunSettings, model: &CausalLm) -> LoraConfig {
    let sft = crate::sft::SftConfig {
        lora_r: run.lora_r,
        lora_alpha: run.lora_alpha,
        lora_dropout: run.lora_dropout,
        target_modules: run.target_modules.clone(),
        ..crate::sft::SftConfig::default()
    };
    sft.lora_config(&model.config())
}

fn save_value_head(head: &ValueHead, path: &Path) -> Result<()> {
    let (weight, bias) = head.summary.dense_parts()?;
    let bias = bias.context("the value head has a bias")?;
    lathe_core::safetensors::save(
        path,
        &[
            ("v_head.summary.weight", &weight.detach()),
            ("v_head.summary.bias", &bias.detach()),
        ],
        None,
    )?;
    Ok(())
}

fn load_value_head(
    path: &Path,
    hidden: usize,
    run: &RunSettings,
    device: &Device,
) -> Result<ValueHead> {
    let mut weights = lathe_models::hf::Weights::new(path.display().to_string(), device);
    let names = weights.add_file(path)?;
    // A tensor the head does not use means the file is not this head's: an error, not
    // dropped.
    let extra: Vec<&String> = names
        .iter()
        .filter(|n| !["v_head.summary.weight", "v_head.summary.bias"].contains(&n.as_str()))
        .collect();
    if !extra.is_empty() {
        bail!(
            "{} holds tensors a value head does not have: {extra:?} (it holds \
             v_head.summary.weight and v_head.summary.bias)",
            path.display()
        );
    }
    Ok(ValueHead::from_weights(
        &mut weights,
        hidden,
        run.value_head_dropout,
    )?)
}

fn save_checkpoint(
    trainer: &PpoTrainer,
    lora: &LoraConfig,
    file: &PpoFile,
    inputs: &crate::resume::Fingerprints,
    step: usize,
    out: &Path,
) -> Result<()> {
    Ok(
        RunDir::new(out, "ppo").save_checkpoint(|temp| -> Result<()> {
            trainer.model.save_lora(temp, lora)?;
            save_value_head(&trainer.value_head, &temp.join(VALUE_HEAD_FILE))?;
            let adam = trainer.optimizer();
            crate::run_files::save_moments(adam, &temp.join(OPTIMIZER_FILE))?;
            let state = TrainerState {
                step,
                adam_step: adam.step_count(),
                kl: trainer.kl_controller().clone(),
                config: file.clone(),
                inputs: Some(inputs.clone()),
            };
            Ok(crate::run_files::write_state(temp, &state)?)
        })?,
    )
}

/// `lathe ppo` flags; each overrides the config file's value when given.
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
    /// Texts to cut queries from: .txt, .jsonl or .json (with --text-field).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Run directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A TOML file: [ppo] with trl's PPOConfig keys, [run] with steps, query_length,
    /// response_length, sampling, LoRA settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub mini_batch_size: Option<usize>,
    #[arg(long)]
    pub ppo_epochs: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f32>,
    #[arg(long)]
    pub init_kl_coef: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Resume the checkpoint in --out even when its model, reward, data or settings differ
    /// from this run's (a warning names them); the LoRA shape settings must still match.
    #[arg(long)]
    pub resume_anyway: bool,
}

impl PpoArgs {
    /// The config file (or defaults) with the flags applied.
    pub fn settings(&self) -> Result<PpoFile> {
        let mut file = match &self.config {
            Some(path) => PpoFile::read(path)?,
            None => PpoFile::default(),
        };
        if let Some(v) = self.steps {
            file.run.steps = v;
        }
        if let Some(v) = self.batch_size {
            file.ppo.batch_size = v;
        }
        if let Some(v) = self.mini_batch_size {
            file.ppo.mini_batch_size = v;
        }
        if let Some(v) = self.ppo_epochs {
            file.ppo.ppo_epochs = v;
        }
        if let Some(v) = self.learning_rate {
            file.ppo.learning_rate = v;
        }
        if let Some(v) = self.init_kl_coef {
            file.ppo.init_kl_coef = v;
        }
        if let Some(v) = self.seed {
            file.ppo.seed = v;
        }
        if let Some(v) = self.save_every {
            file.run.save_every = v;
        }
        Ok(file)
    }
}

/// `lathe ppo`.
pub fn run(args: &PpoArgs) -> Result<()> {
    let file = args.settings()?;
    file.validate()?;
    args.model.precision()?;
    let run = &file.run;
    args.model.preflight(PlanSettings {
        job: Job::Ppo,
        batch: file.ppo.batch_size,
        train_batch: file.ppo.mini_batch_size,
        seq_len: run.query_length.max + run.response_length.max,
        lora_r: run.lora_r,
        lora_targets: run.target_modules.clone(),
        gradient_checkpointing: run.gradient_checkpointing,
        ..PlanSettings::inference()
    })?;
    let texts = crate::texts::read_texts(&args.data, &args.text_field)?;
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
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C kills the process as usual.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nppo: Ctrl-C: finishing this step, then saving (Ctrl-C again to quit now)");
        });
    }
    let options = crate::resume::ResumeOptions {
        model: Some(args.model.fingerprint(args.adapter.as_deref())?),
        reward: Some(crate::resume::path_fingerprint(&args.reward)?),
        anyway: args.resume_anyway,
    };
    let summary = train_with(
        pretrained.model,
        &pretrained.tokenizer,
        &texts,
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
    if n > 0 {
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
