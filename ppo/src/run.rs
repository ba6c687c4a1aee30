//! A PPO run in a run folder: the seed's step 3 as a library. [`PpoRun::step`] draws a
//! batch of queries from the texts, samples responses with the policy, scores them with a
//! [`Reward`], and takes one [`PpoTrainer::step`]. The folder (lathe-train's [`RunDir`])
//! holds:
//! - `metrics.jsonl`: every statistic of every step under trl's names;
//! - `samples.jsonl`: each step's query, response and reward;
//! - `checkpoint/`: adapter, value head, optimizer and trainer state (a rerun resumes
//!   exactly);
//! - at the end, the adapter (peft files), `value_head.safetensors` and `run.json`.
//!
//! Everything random is a function of (seed, step): which texts, the query and response
//! lengths, the sampled tokens, the dropout masks; so a resumed run equals an uninterrupted
//! one.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lathe_core::collective::check_same_inputs;
use lathe_core::{Collective, Device, Rng, Solo};
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::hf::CausalLm;
use lathe_models::sampling::SamplingConfig;
use lathe_models::tokenizer::Tokenizer;
use lathe_models::value_head::ValueHead;
use lathe_train::resume::{Fingerprints, ResumeOptions};
use lathe_train::run_dir::{append_jsonl, damaged_state, RunDir, METRICS_FILE, OPTIMIZER_FILE};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::math::KlController;
use crate::rollout::{sample_responses_on_ranks, LengthRange, Prompts};
use crate::trainer::StepStats;
use crate::{Error, PpoConfig, PpoTrainer, Result, Reward};

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
    /// Sampling temperature of the responses (> 0).
    pub temperature: f32,
    /// 0 = no top-k filtering (the seed's setting).
    pub top_k: usize,
    /// Nucleus sampling's probability mass (1: no filtering).
    pub top_p: f32,
    /// LoRA rank (>= 1).
    pub lora_r: usize,
    /// LoRA scale numerator: the update is scaled by `lora_alpha / lora_r`.
    pub lora_alpha: f64,
    /// Dropout on the adapters' input, in [0, 1).
    pub lora_dropout: f64,
    /// Empty: the architecture's defaults.
    pub target_modules: Vec<String>,
    /// The value head's dropout (trl: 0.1).
    pub value_head_dropout: f32,
    /// Checkpoint every N steps (0: at the end only).
    pub save_every: usize,
    /// Recompute activations in the backward pass instead of keeping them (less memory).
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
        let bad = |m: String| Err(Error::Config(m));
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return bad(format!(
                "steps must be in 1..={MAX_STEPS}, got {}",
                self.steps
            ));
        }
        self.query_length.validate("query_length")?;
        self.response_length.validate("response_length")?;
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature must be finite and > 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..1.0).contains(&self.value_head_dropout) {
            return bad(format!(
                "value_head_dropout must be in [0, 1), got {}",
                self.value_head_dropout
            ));
        }
        Ok(lathe_train::sft::check_lora(
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
        )?)
    }

    /// The LoRA config for `model` (the architecture's default targets when none are set).
    pub fn lora_config(&self, model: &CausalLm) -> LoraConfig {
        lathe_train::sft::lora_config(
            &model.config(),
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            &self.target_modules,
        )
    }

    fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            greedy: false,
        }
    }
}

/// The whole config file: `[ppo]` with trl's PPOConfig keys, `[run]` with [`RunSettings`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoFile {
    /// The `[ppo]` section: the trainer's settings.
    pub ppo: PpoConfig,
    /// The `[run]` section: rollouts, LoRA, length of the run.
    pub run: RunSettings,
}

impl PpoFile {
    /// Both sections' checks.
    pub fn validate(&self) -> Result<()> {
        self.ppo.validate()?;
        self.run.validate()
    }
}

/// The value head's file in a checkpoint and in the final outputs.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
const SAMPLES_FILE: &str = "samples.jsonl";

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    adam_step: u64,
    kl: KlController,
    config: PpoFile,
    /// The run's inputs; absent in checkpoints of older versions.
    #[serde(default)]
    inputs: Option<Fingerprints>,
}

/// What a finished (or interrupted) run did.
#[derive(Clone, Debug, Serialize)]
pub struct PpoSummary {
    /// PPO steps done, a resumed run's earlier ones included.
    pub steps_done: usize,
    /// The mean score (`env/reward_mean`) of each step.
    pub mean_rewards: Vec<f32>,
    /// The policy's KL from the reference (`objective/kl`) at each step.
    pub kls: Vec<f32>,
    /// Stopped by Ctrl-C after saving a checkpoint.
    pub interrupted: bool,
    /// The checkpoint step this run resumed from (None: a fresh run).
    pub resumed_from: Option<usize>,
    /// Wall-clock seconds per step of this process's steps.
    pub seconds_per_step: f64,
}

/// One step of a [`PpoRun`] as metrics.jsonl and samples.jsonl record it.
#[derive(Clone, Debug)]
pub struct StepRecord {
    /// Steps done, this one included.
    pub step: usize,
    /// trl's statistics of the step.
    pub stats: StepStats,
    /// Seconds spent sampling the responses.
    pub generate_s: f64,
    /// Seconds spent on the whole step.
    pub step_s: f64,
}

/// A [`PpoTrainer`] in a run folder, with the texts its queries are cut from. When
/// `out/checkpoint` exists the run resumes from it: its settings and inputs must match (see
/// [`lathe_train::resume::check`]), and it continues exactly as the uninterrupted run would.
pub struct PpoRun<'t> {
    trainer: PpoTrainer,
    tokenizer: &'t Tokenizer,
    /// What queries are drawn from: texts to cut, or whole (chat-templated) prompts.
    prompts: Prompts,
    file: PpoFile,
    lora: LoraConfig,
    run: RunDir,
    inputs: Fingerprints,
    device: Device,
    start_step: usize,
    /// metrics.jsonl and samples.jsonl, open once there is something to train.
    logs: Option<(File, File)>,
    summary: PpoSummary,
    started: Instant,
}

impl<'t> PpoRun<'t> {
    /// Opens (resumes, or starts) the run in `out`: `model` with no adapters yet (or merged
    /// SFT ones), `prompts` to draw queries from. The folder is created once every setting and
    /// the adapters are accepted. `options` carries the model's and reward's fingerprints
    /// and whether a mismatch on resume is only warned about.
    pub fn open(
        model: CausalLm,
        tokenizer: &'t Tokenizer,
        prompts: Prompts,
        file: &PpoFile,
        out: &Path,
        device: &Device,
        options: &ResumeOptions,
    ) -> Result<Self> {
        Self::open_on_ranks(
            model,
            tokenizer,
            prompts,
            file,
            out,
            device,
            options,
            Arc::new(Solo),
        )
    }

    /// [`open`](PpoRun::open) as one of the ranks of `collective`: each rank generates its
    /// share of every step's responses, scores them all, and trains as
    /// [`PpoTrainer::join`] says. Every rank must be given the same settings, model, prompts
    /// and reward (checked: a rank that differs from rank 0 is refused, naming what
    /// differs); every rank resumes from the same checkpoint; only rank 0 writes `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn open_on_ranks(
        mut model: CausalLm,
        tokenizer: &'t Tokenizer,
        prompts: Prompts,
        file: &PpoFile,
        out: &Path,
        device: &Device,
        options: &ResumeOptions,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        file.validate()?;
        let (config, settings) = (&file.ppo, &file.run);
        let inputs = Fingerprints {
            model: options.model.clone(),
            data: Some(prompts.fingerprint()),
            reward: options.reward.clone(),
        };
        check_same_inputs(
            &*collective,
            &[
                (
                    "settings",
                    serde_json::to_string(file).map_err(lathe_train::Error::from)?,
                ),
                ("model", format!("{:?}", inputs.model)),
                ("prompts", format!("{:?}", inputs.data)),
                ("reward", format!("{:?}", inputs.reward)),
                ("output folder", out.display().to_string()),
            ],
        )?;
        let run = RunDir::new(out, "ppo");
        let resume_dir = run.checkpoint_to_resume();
        let switch = AdapterSwitch::new();
        let hidden = model.config().hidden_size();
        let lora = settings.lora_config(&model);
        let (value_head, state) = if let Some(checkpoint) = &resume_dir {
            let state = read_state(&run, checkpoint, file)?;
            lathe_train::resume::check(
                "ppo",
                checkpoint,
                state.inputs.as_ref(),
                &inputs,
                &serde_json::to_value(&state.config).map_err(lathe_train::Error::from)?,
                &serde_json::to_value(file).map_err(lathe_train::Error::from)?,
                options.anyway,
            )?;
            let loaded = model.load_lora(checkpoint, &switch)?;
            lathe_train::sft::check_adapters(&model, &lora, &loaded, checkpoint)?;
            let head = load_value_head(
                &checkpoint.join(VALUE_HEAD_FILE),
                hidden,
                settings.value_head_dropout,
                device,
            )?;
            (head, Some((checkpoint.clone(), state)))
        } else {
            model.add_lora(&lora, &switch, config.seed)?;
            let head = ValueHead::new(hidden, settings.value_head_dropout, config.seed, device)?;
            (head, None)
        };
        model.set_gradient_checkpointing(settings.gradient_checkpointing);
        let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
        let mut trainer = PpoTrainer::new(model, switch, value_head, config.clone(), pad, device)?;
        trainer.join(collective.clone());
        let writer = collective.is_writer();
        // Only now, with every setting and the adapters accepted, does the run folder appear.
        if writer {
            run.create()?;
        }
        let start_step = match &state {
            Some((checkpoint, s)) => {
                let n = trainer.optimizer().params().len();
                let moments = lathe_train::run_dir::load_moments(
                    &checkpoint.join(OPTIMIZER_FILE),
                    n,
                    device,
                )?;
                trainer.restore(s.step, s.kl.clone(), s.adam_step, moments)?;
                s.step
            }
            None => 0,
        };
        // A resumed run's summary covers the steps before the checkpoint too.
        let summary = if start_step > 0 {
            summary_from_metrics(&run.metrics(), start_step)?
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
        let logs = if start_step < settings.steps && writer {
            Some((
                run.reopen_log(METRICS_FILE, start_step)?,
                run.reopen_log(SAMPLES_FILE, start_step)?,
            ))
        } else {
            None
        };
        Ok(PpoRun {
            trainer,
            tokenizer,
            prompts,
            file: file.clone(),
            lora,
            run,
            inputs,
            device: device.clone(),
            start_step,
            logs,
            summary,
            started: Instant::now(),
        })
    }

    /// The run's trainer.
    pub fn trainer(&self) -> &PpoTrainer {
        &self.trainer
    }

    /// The step the run (re)started at: 0, or the checkpoint's.
    pub fn start_step(&self) -> usize {
        self.start_step
    }

    /// Whether this run resumed a checkpoint.
    pub fn resumed(&self) -> bool {
        self.summary.resumed_from.is_some()
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.trainer.steps_done()
    }

    /// Whether the run's steps are all done (a rerun of a finished run has none to do).
    pub fn done(&self) -> bool {
        self.steps_done() >= self.file.run.steps
    }

    /// Whether `out` holds the run finished: all steps done and `run.json` written.
    pub fn already_finished(&self) -> bool {
        self.start_step >= self.file.run.steps && self.run.path().join("run.json").is_file()
    }

    /// One PPO step: draw texts and cut queries, sample responses, score them with
    /// `reward`, update; its lines appended to metrics.jsonl and samples.jsonl.
    pub fn step(&mut self, reward: &mut dyn Reward) -> Result<StepRecord> {
        let started = Instant::now();
        let (config, settings) = (&self.file.ppo, &self.file.run);
        let step = self.steps_done();
        let mut rng = Rng::new(lathe_core::seed::derive(config.seed, 0, step as u64 + 1));
        let queries = self
            .prompts
            .draw(config.batch_size, settings.query_length, &mut rng);
        let generate_started = Instant::now();
        let responses = sample_responses_on_ranks(
            &self.trainer.model,
            &queries,
            settings.response_length,
            settings.sampling(),
            self.trainer.pad_id(),
            rng.next_u64(),
            &mut rng,
            &self.device,
            self.trainer.collective(),
        )?;
        let generate_s = generate_started.elapsed().as_secs_f64();
        let decode = |ids: &Vec<Vec<u32>>| -> Result<Vec<String>> {
            Ok(ids
                .iter()
                .map(|t| self.tokenizer.decode(t, true))
                .collect::<std::result::Result<_, _>>()?)
        };
        let (query_texts, response_texts) = (decode(&queries)?, decode(&responses)?);
        let full: Vec<String> = query_texts
            .iter()
            .zip(&response_texts)
            .map(|(q, r)| format!("{q}{r}"))
            .collect();
        let scores = reward.score(&full)?;
        if scores.len() != full.len() {
            return Err(Error::Reward(format!(
                "the reward returned {} scores for {} texts",
                scores.len(),
                full.len()
            )));
        }
        let stats = self.trainer.step(&queries, &responses, &scores)?;
        let done = step + 1;
        let step_s = started.elapsed().as_secs_f64();
        let mut record = json!({ "step": done });
        for (k, v) in &stats {
            record[k] = json!(v);
        }
        record["time/generate_s"] = json!(generate_s);
        record["time/step_s"] = json!(step_s);
        // Only rank 0 has the logs open.
        if let Some((metrics, samples)) = self.logs.as_mut() {
            append_jsonl(metrics, &record)?;
            metrics.flush()?;
            for ((q, r), s) in query_texts.iter().zip(&response_texts).zip(&scores) {
                let line = json!({ "step": done, "query": q, "response": r, "reward": s });
                append_jsonl(samples, &line)?;
            }
            samples.flush()?;
        }
        self.summary.mean_rewards.push(stats["env/reward_mean"]);
        self.summary.kls.push(stats["objective/kl"]);
        self.summary.steps_done = done;
        Ok(StepRecord {
            step: done,
            stats,
            generate_s,
            step_s,
        })
    }

    /// Whether the step just done is one to checkpoint: every `save_every` steps and the
    /// last.
    pub fn checkpoint_due(&self) -> bool {
        let (done, every) = (self.steps_done(), self.file.run.save_every);
        done == self.file.run.steps || (every > 0 && done.is_multiple_of(every))
    }

    /// Writes `out/checkpoint` (adapter, value head, optimizer moments, trainer state)
    /// through a temporary folder renamed into place.
    pub fn save_checkpoint(&self) -> Result<()> {
        let trainer = &self.trainer;
        if !trainer.collective().is_writer() {
            return Ok(());
        }
        Ok(self.run.save_checkpoint(|temp| -> Result<()> {
            trainer.model.save_lora(temp, &self.lora)?;
            save_value_head(&trainer.value_head, &temp.join(VALUE_HEAD_FILE))?;
            let adam = trainer.optimizer();
            lathe_train::run_dir::save_moments(adam, &temp.join(OPTIMIZER_FILE))?;
            let state = TrainerState {
                step: trainer.steps_done(),
                adam_step: adam.step_count(),
                kl: trainer.kl_controller().clone(),
                config: self.file.clone(),
                inputs: Some(self.inputs.clone()),
            };
            Ok(lathe_train::run_dir::write_state(temp, &state)?)
        })?)
    }

    /// The summary so far.
    pub fn summary(&self) -> &PpoSummary {
        &self.summary
    }

    /// The summary of a run stopped (Ctrl-C) after its checkpoint.
    pub fn interrupted(mut self) -> PpoSummary {
        self.summary.interrupted = true;
        self.summary
    }

    /// Ends the run: the adapter (peft files), the value head and `run.json` written into
    /// `out` (only once all are written). A finished run's outputs are kept as they are
    /// ([`already_finished`](PpoRun::already_finished)); only when its final files are
    /// missing (a crash after the last checkpoint) are they written.
    pub fn finish(mut self) -> Result<PpoSummary> {
        if self.already_finished() {
            return Ok(self.summary);
        }
        let ran = self.steps_done() - self.start_step;
        if ran > 0 {
            self.summary.seconds_per_step = self.started.elapsed().as_secs_f64() / ran as f64;
        }
        let (trainer, summary) = (&self.trainer, &self.summary);
        if !trainer.collective().is_writer() {
            return Ok(self.summary);
        }
        self.run.save_final(|dir| -> Result<()> {
            trainer.model.save_lora(dir, &self.lora)?;
            save_value_head(&trainer.value_head, &dir.join(VALUE_HEAD_FILE))?;
            let run_json = json!({ "config": self.file, "summary": summary });
            std::fs::write(
                dir.join("run.json"),
                serde_json::to_string_pretty(&run_json).map_err(lathe_train::Error::from)?,
            )
            .map_err(lathe_train::Error::from)?;
            Ok(())
        })?;
        Ok(self.summary)
    }
}

/// Reads a checkpoint's trainer state and refuses one that no run of `file` wrote (a hand
/// edit, a damaged file): a step beyond the run, an optimizer step count no PPO step count
/// gives, a KL coefficient that is negative or of another controller, a step
/// metrics.jsonl never recorded.
fn read_state(run: &RunDir, dir: &Path, file: &PpoFile) -> Result<TrainerState> {
    let state: TrainerState = run.read_state(dir)?;
    let bad = |detail: String| Error::from(damaged_state(dir, detail));
    run.check_step(dir, state.step, state.config == *file, file.run.steps)?;
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
    if !state.kl.same_kind(&state.config.ppo.kl_controller()) {
        return Err(bad(format!(
            "the KL controller {:?} is not the one the config makes",
            state.kl
        )));
    }
    run.check_logged(dir, state.step)?;
    Ok(state)
}

/// The summary of the first `steps` steps of a run from its `metrics.jsonl` (a resumed or
/// finished run); the timing is unknown (0).
fn summary_from_metrics(metrics: &Path, steps: usize) -> Result<PpoSummary> {
    let records = if metrics.is_file() {
        lathe_train::run_dir::read_jsonl(metrics)?
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

/// The value head as trl's `AutoModelForCausalLMWithValueHead` names it.
pub fn save_value_head(head: &ValueHead, path: &Path) -> Result<()> {
    let (weight, bias) = head.summary.dense_parts()?;
    let bias = bias.ok_or_else(|| Error::Shape("the value head has no bias".into()))?;
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

/// The value head [`save_value_head`] wrote; a file with any other tensor is refused.
pub fn load_value_head(
    path: &Path,
    hidden: usize,
    dropout: f32,
    device: &Device,
) -> Result<ValueHead> {
    let mut weights = lathe_models::weights::Weights::new(path.display().to_string(), device);
    let names = weights.add_file(path)?;
    // A tensor the head does not use means the file is not this head's: an error, not
    // dropped.
    let extra: Vec<&String> = names
        .iter()
        .filter(|n| !["v_head.summary.weight", "v_head.summary.bias"].contains(&n.as_str()))
        .collect();
    if !extra.is_empty() {
        return Err(Error::Config(format!(
            "{} holds tensors a value head does not have: {extra:?} (it holds \
             v_head.summary.weight and v_head.summary.bias)",
            path.display()
        )));
    }
    Ok(ValueHead::from_weights(&mut weights, hidden, dropout)?)
}
