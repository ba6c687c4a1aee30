//! A GRPO run in a run folder (lathe-train's [`RunDir`], as PPO's): `metrics.jsonl` (a line
//! a step, trl's names), `samples.jsonl` (each generation's prompts, completions and
//! rewards), `checkpoint/` (adapter, optimizer, state) at generation-batch boundaries, and
//! at the end the adapter (peft files) and `run.json`. A rerun resumes the checkpoint
//! exactly: everything random is a function of (seed, generation) and (seed, micro-batch).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use lathe_core::Device;
use lathe_lora::AdapterSwitch;
use lathe_models::hf::CausalLm;
use lathe_models::tokenizer::Tokenizer;
use lathe_train::resume::{Fingerprints, ResumeOptions};
use lathe_train::run_dir::{append_jsonl, damaged_state, RunDir, METRICS_FILE, OPTIMIZER_FILE};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::trainer::{GrpoConfig, GrpoStepStats, GrpoTrainer};
use crate::rollout::Prompts;
use crate::{Result, Reward};

const SAMPLES_FILE: &str = "samples.jsonl";

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    /// trl's `num_tokens` at the checkpoint.
    num_tokens: u64,
    adam_step: u64,
    config: GrpoConfig,
    #[serde(default)]
    inputs: Option<Fingerprints>,
}

/// What a finished (or interrupted) run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GrpoSummary {
    /// GRPO steps done, a resumed run's earlier ones included.
    pub steps_done: usize,
    /// The mean reward (`reward`) of each step.
    pub mean_rewards: Vec<f64>,
    /// The checkpoint step this run resumed from (None: a fresh run).
    pub resumed_from: Option<usize>,
    /// Stopped by Ctrl-C after saving a checkpoint.
    pub interrupted: bool,
    /// Wall-clock seconds per step of this process's steps.
    pub seconds_per_step: f64,
}

/// A [`GrpoTrainer`] in a run folder, with the texts its prompts are cut from.
pub struct GrpoRun<'t> {
    trainer: GrpoTrainer,
    tokenizer: &'t Tokenizer,
    prompts: Prompts,
    run: RunDir,
    inputs: Fingerprints,
    start_step: usize,
    logs: Option<(File, File)>,
    summary: GrpoSummary,
    started: Instant,
}

impl<'t> GrpoRun<'t> {
    /// Opens (resumes, or starts) the run in `out` on `model` (no adapters yet).
    pub fn open(
        mut model: CausalLm,
        tokenizer: &'t Tokenizer,
        prompts: Prompts,
        config: &GrpoConfig,
        out: &Path,
        device: &Device,
        options: &ResumeOptions,
    ) -> Result<Self> {
        config.validate()?;
        let inputs = Fingerprints {
            model: options.model.clone(),
            data: Some(prompts.fingerprint()),
            reward: options.reward.clone(),
        };
        let run = RunDir::new(out, "grpo");
        let resume = match run.checkpoint_to_resume() {
            Some(dir) => {
                let state: TrainerState = run.read_state(&dir)?;
                run.check_step(&dir, state.step, state.config == *config, config.max_steps)?;
                let c = &state.config;
                if !state.step.is_multiple_of(c.num_iterations)
                    || state.adam_step != state.step as u64
                {
                    return Err(damaged_state(
                        &dir,
                        format!(
                            "step {} with {} optimizer steps (a GRPO checkpoint is taken after \
                             a whole generation batch, one optimizer step a step)",
                            state.step, state.adam_step
                        ),
                    )
                    .into());
                }
                run.check_logged(&dir, state.step)?;
                lathe_train::resume::check(
                    "grpo",
                    &dir,
                    state.inputs.as_ref(),
                    &inputs,
                    &serde_json::to_value(&state.config).map_err(lathe_train::Error::from)?,
                    &serde_json::to_value(config).map_err(lathe_train::Error::from)?,
                    options.anyway,
                )?;
                let switch = AdapterSwitch::new();
                let loaded = model.load_lora(&dir, &switch)?;
                lathe_train::sft::check_adapters(
                    &model,
                    &config.lora_config(&model),
                    &loaded,
                    &dir,
                )?;
                Some((dir, state, switch))
            }
            None => None,
        };
        let (switch, state) = match resume {
            Some((dir, state, switch)) => (Some(switch), Some((dir, state))),
            None => (None, None),
        };
        let mut trainer = GrpoTrainer::new(model, switch, config, tokenizer, device)?;
        run.create()?;
        let start_step = match &state {
            Some((dir, s)) => {
                let n = trainer.optimizer().params().len();
                let moments =
                    lathe_train::run_dir::load_moments(&dir.join(OPTIMIZER_FILE), n, device)?;
                trainer.restore(s.step, s.num_tokens, s.adam_step, moments)?;
                s.step
            }
            None => 0,
        };
        let mut summary = GrpoSummary {
            resumed_from: (start_step > 0).then_some(start_step),
            steps_done: start_step,
            ..GrpoSummary::default()
        };
        if start_step > 0 {
            for r in lathe_train::run_dir::read_jsonl(&run.metrics())? {
                if r["step"].as_u64().is_some_and(|s| s as usize <= start_step) {
                    summary
                        .mean_rewards
                        .push(r["reward"].as_f64().unwrap_or(f64::NAN));
                }
            }
        }
        let logs = if start_step < config.max_steps {
            Some((
                run.reopen_log(METRICS_FILE, start_step)?,
                run.reopen_log(SAMPLES_FILE, start_step)?,
            ))
        } else {
            None
        };
        Ok(GrpoRun {
            trainer,
            tokenizer,
            prompts,
            run,
            inputs,
            start_step,
            logs,
            summary,
            started: Instant::now(),
        })
    }

    /// The run's trainer.
    pub fn trainer(&self) -> &GrpoTrainer {
        &self.trainer
    }

    /// The step the run (re)started at: 0, or the checkpoint's.
    pub fn start_step(&self) -> usize {
        self.start_step
    }

    /// Whether the run's steps are all done.
    pub fn done(&self) -> bool {
        self.trainer.done()
    }

    /// Whether `out` holds the run finished: all steps done and `run.json` written.
    pub fn already_finished(&self) -> bool {
        self.start_step >= self.trainer.config().max_steps
            && self.run.path().join("run.json").is_file()
    }

    /// One optimizer step, its line appended to metrics.jsonl (and a generation's samples
    /// to samples.jsonl).
    pub fn step(&mut self, reward: &mut dyn Reward) -> Result<GrpoStepStats> {
        let started = Instant::now();
        let stats = self.trainer.step(&self.prompts, self.tokenizer, reward)?;
        let mut record = json!({ "step": stats.step });
        for (k, v) in &stats.metrics {
            record[k] = json!(v);
        }
        record["time/step_s"] = json!(started.elapsed().as_secs_f64());
        let (metrics, samples) = self
            .logs
            .as_mut()
            .expect("a run with steps to do has its logs open");
        append_jsonl(metrics, &record)?;
        metrics.flush()?;
        for (prompt, completion, reward) in &stats.samples {
            let line = json!({ "step": stats.step, "prompt": prompt, "completion": completion, "reward": reward });
            append_jsonl(samples, &line)?;
        }
        samples.flush()?;
        self.summary.mean_rewards.push(stats.get("reward"));
        self.summary.steps_done = stats.step;
        Ok(stats)
    }

    /// Whether a checkpoint is due after the step just done: every `save_steps`, and the
    /// last (both fall between generation batches).
    pub fn checkpoint_due(&self) -> bool {
        let (done, every) = (self.trainer.steps_done(), self.trainer.config().save_steps);
        done == self.trainer.config().max_steps || (every > 0 && done.is_multiple_of(every))
    }

    /// Whether the step just done ended a generation batch (where Ctrl-C can stop).
    pub fn at_generation_boundary(&self) -> bool {
        self.trainer
            .steps_done()
            .is_multiple_of(self.trainer.config().num_iterations)
    }

    /// Writes `out/checkpoint` (adapter, optimizer moments, trainer state).
    pub fn save_checkpoint(&self) -> Result<()> {
        let trainer = &self.trainer;
        Ok(self.run.save_checkpoint(|temp| -> Result<()> {
            trainer.model.save_lora(temp, trainer.lora_config())?;
            lathe_train::run_dir::save_moments(trainer.optimizer(), &temp.join(OPTIMIZER_FILE))?;
            let state = TrainerState {
                step: trainer.steps_done(),
                num_tokens: trainer.num_tokens(),
                adam_step: trainer.optimizer().step_count(),
                config: trainer.config().clone(),
                inputs: Some(self.inputs.clone()),
            };
            Ok(lathe_train::run_dir::write_state(temp, &state)?)
        })?)
    }

    /// What the run has done so far.
    pub fn summary(&self) -> &GrpoSummary {
        &self.summary
    }

    /// The summary of a run stopped (Ctrl-C) after its checkpoint.
    pub fn interrupted(mut self) -> GrpoSummary {
        self.summary.interrupted = true;
        self.summary
    }

    /// Ends the run: the adapter and `run.json` written into `out` (a finished run's
    /// outputs are kept as they are).
    pub fn finish(mut self) -> Result<GrpoSummary> {
        if self.already_finished() {
            return Ok(self.summary);
        }
        let ran = self.trainer.steps_done() - self.start_step;
        if ran > 0 {
            self.summary.seconds_per_step = self.started.elapsed().as_secs_f64() / ran as f64;
        }
        self.trainer.switch.eval();
        let (trainer, summary) = (&self.trainer, &self.summary);
        self.run.save_final(|dir| -> Result<()> {
            trainer.model.save_lora(dir, trainer.lora_config())?;
            let run_json = json!({ "config": trainer.config(), "summary": summary });
            std::fs::write(
                dir.join("run.json"),
                serde_json::to_string_pretty(&run_json).map_err(lathe_train::Error::from)?,
            )?;
            Ok(())
        })?;
        Ok(self.summary)
    }
}
