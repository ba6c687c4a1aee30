//! The GRPO trainer: a generation batch of P prompts × G completions, scored by the reward
//! functions, turned into group-relative advantages, then `num_iterations` optimizer steps
//! over it (each `gradient_accumulation_steps` micro-batches of completions), the loss and
//! its gradient from [`super::loss`]. There is no value head, and the reference is the
//! policy with its adapters off: one model in memory.
//!
//! Everything random is a function of (seed, generation): which texts give the prompts,
//! their lengths, the sampled tokens; and (seed, micro-batch) for the dropout masks.

use lathe_core::optim::{Adam, AdamConfig};
use lathe_core::{clip_grad_norm, Device, GradStore, LrSchedule, Rng, ScheduleKind, Tensor};
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::generate::{generate_groups, GenerateConfig};
use lathe_models::hf::CausalLm;
use lathe_models::logprobs::{next_tokens, packed_token_logprobs};
use lathe_models::sampling::SamplingConfig;
use lathe_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use super::advantages::{group_advantages, Aggregation, ScaleRewards};
use super::loss::{grpo_loss, GrpoLoss, LossSettings, TokenBatch};
use crate::rollout::{LengthRange, Prompts};
use crate::{Error, Result, Reward};

/// The reward functions lathe has besides the reward model (trl's `reward_funcs` may name
/// any Python callable; these are lathe's built-ins).
pub const REWARD_FUNCS: &[&str] = &["model", "length", "format"];

/// The "format" reward: 1 when the completion is `<think>…</think>` then `<answer>…</answer>`
/// and nothing else (whitespace between and around allowed), else 0 — the format reward of
/// trl's GRPO examples (`^<think>.*?</think>\s*<answer>.*?</answer>$`).
pub fn format_reward(completion: &str) -> f64 {
    let matches = (|| {
        let rest = completion.trim().strip_prefix("<think>")?;
        let (_, rest) = rest.split_once("</think>")?;
        let rest = rest.trim_start().strip_prefix("<answer>")?;
        let (answer, tail) = rest.split_once("</answer>")?;
        (tail.is_empty() && !answer.contains("<answer>")).then_some(())
    })();
    if matches.is_some() {
        1.0
    } else {
        0.0
    }
}

/// GRPO's settings under trl's `GRPOConfig` names, trl 1.16's defaults; the prompt length
/// and the LoRA keys are lathe's (as PPO's `[run]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// G: completions per prompt (>= 2).
    pub num_generations: usize,
    /// The most new tokens a completion may have.
    pub max_completion_length: usize,
    /// Sampling temperature of the completions (> 0).
    pub temperature: f32,
    /// Nucleus sampling's probability mass (1: no filtering).
    pub top_p: f32,
    /// 0: no top-k filtering.
    pub top_k: usize,
    /// The KL term's weight (0: no reference pass at all).
    pub beta: f64,
    /// The lower clip range (and the upper one unless `epsilon_high` is set).
    pub epsilon: f64,
    /// The upper clip range (None: `epsilon`; DAPO sets it higher).
    pub epsilon_high: Option<f64>,
    /// How the per-token losses are reduced.
    pub loss_type: GrpoLoss,
    /// What divides the advantages.
    pub scale_rewards: ScaleRewards,
    /// How several reward functions combine.
    pub multi_objective_aggregation: Aggregation,
    /// Optimizer steps per generation batch (μ).
    pub num_iterations: usize,
    /// Names from [`REWARD_FUNCS`]: "model" (the reward model's score of prompt +
    /// completion), "length" (the share of `max_completion_length` the completion uses),
    /// "format" ([`format_reward`] of the completion text).
    pub reward_funcs: Vec<String>,
    /// One per reward function (default: all 1).
    pub reward_weights: Option<Vec<f64>>,
    /// Peak learning rate of AdamW.
    pub learning_rate: f32,
    /// Completions per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step; a generation batch holds
    /// per_device_train_batch_size × gradient_accumulation_steps completions.
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps of the run (a multiple of num_iterations).
    pub max_steps: usize,
    /// AdamW's decoupled weight decay (>= 0).
    pub weight_decay: f32,
    /// Clip the gradients' global L2 norm to this (> 0; inf: no clipping).
    pub max_grad_norm: f32,
    /// Steps of linear warmup from 0 to `learning_rate`.
    pub warmup_steps: usize,
    /// constant, linear or cosine decay after the warm-up.
    pub lr_scheduler_type: String,
    /// Seed of everything random: prompts, sampling, dropout, adapter init.
    pub seed: u64,
    /// Checkpoint every N steps (0: at the end only; a multiple of num_iterations).
    pub save_steps: usize,
    /// Recompute activations in the backward pass instead of keeping them (less memory).
    pub gradient_checkpointing: bool,
    /// A prompt is the first L tokens of a text, L ~ U{min..=max} (lathe's, as PPO's).
    pub prompt_length: LengthRange,
    /// LoRA rank (>= 1).
    pub lora_r: usize,
    /// LoRA scale numerator: the update is scaled by `lora_alpha / lora_r`.
    pub lora_alpha: f64,
    /// Dropout on the adapters' input, in [0, 1).
    pub lora_dropout: f64,
    /// Empty: the architecture's defaults.
    pub target_modules: Vec<String>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            num_generations: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            loss_type: GrpoLoss::Dapo,
            scale_rewards: ScaleRewards::Group,
            multi_objective_aggregation: Aggregation::SumThenNormalize,
            num_iterations: 1,
            reward_funcs: vec!["model".into()],
            reward_weights: None,
            learning_rate: 1e-6,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_steps: 20,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            lr_scheduler_type: "linear".into(),
            seed: 42,
            save_steps: 0,
            gradient_checkpointing: true,
            prompt_length: LengthRange { min: 2, max: 7 },
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: Vec::new(),
        }
    }
}

/// The largest count setting accepted (2^20).
const MAX_COUNT: usize = 1 << 20;

impl GrpoConfig {
    /// Checks every setting against its meaning; the error names the key and its range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::GrpoConfig(m));
        if !(2..=MAX_COUNT).contains(&self.num_generations) {
            return bad(format!(
                "num_generations must be in 2..={MAX_COUNT} (a group needs two completions to \
                 compare), got {}",
                self.num_generations
            ));
        }
        for (name, v) in [
            ("max_completion_length", self.max_completion_length),
            ("num_iterations", self.num_iterations),
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("max_steps", self.max_steps),
        ] {
            if !(1..=MAX_COUNT).contains(&v) {
                return bad(format!("{name} must be in 1..={MAX_COUNT}, got {v}"));
            }
        }
        let generation = self.generation_batch();
        if !generation.is_multiple_of(self.num_generations) {
            return bad(format!(
                "per_device_train_batch_size × gradient_accumulation_steps = {generation} \
                 completions is not a multiple of num_generations {} (each prompt's group must \
                 be whole)",
                self.num_generations
            ));
        }
        if !self.max_steps.is_multiple_of(self.num_iterations)
            || !self.save_steps.is_multiple_of(self.num_iterations)
        {
            return bad(format!(
                "max_steps {} and save_steps {} must be multiples of num_iterations {} (a \
                 checkpoint falls between generation batches)",
                self.max_steps, self.save_steps, self.num_iterations
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(format!("beta must be finite and >= 0, got {}", self.beta));
        }
        let high = self.epsilon_high.unwrap_or(self.epsilon);
        let epsilon_ok = (0.0..1.0).contains(&self.epsilon);
        if !(epsilon_ok && high.is_finite() && high >= 0.0) {
            return bad(format!(
                "epsilon must be in [0, 1) and epsilon_high finite and >= 0, got {} and {high}",
                self.epsilon
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature must be finite and > 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.reward_funcs.is_empty() {
            return bad("reward_funcs is empty: name at least one of model, length".into());
        }
        if let Some(f) = self
            .reward_funcs
            .iter()
            .find(|f| !REWARD_FUNCS.contains(&f.as_str()))
        {
            return bad(format!(
                "reward function {f:?} does not exist (lathe has {REWARD_FUNCS:?})"
            ));
        }
        if let Some(w) = &self.reward_weights {
            if w.len() != self.reward_funcs.len() || w.iter().any(|x| !x.is_finite()) {
                return bad(format!(
                    "reward_weights {w:?} must be {} finite numbers, one per reward function",
                    self.reward_funcs.len()
                ));
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning_rate must be finite and > 0, got {}",
                self.learning_rate
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            return bad(format!(
                "max_grad_norm must be > 0 (inf: no clipping), got {}",
                self.max_grad_norm
            ));
        }
        self.prompt_length.validate("prompt_length")?;
        self.schedule_kind()?;
        Ok(lathe_train::sft::check_lora(
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
        )?)
    }

    /// Completions per generation batch.
    pub fn generation_batch(&self) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps
    }

    fn weights(&self) -> Vec<f64> {
        self.reward_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.reward_funcs.len()])
    }

    fn schedule_kind(&self) -> Result<ScheduleKind> {
        Ok(match self.lr_scheduler_type.as_str() {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            other => {
                return Err(Error::GrpoConfig(format!(
                    "lr_scheduler_type {other:?} is not constant, linear or cosine"
                )))
            }
        })
    }

    /// The LoRA config for `model`.
    pub fn lora_config(&self, model: &CausalLm) -> LoraConfig {
        lathe_train::sft::lora_config(
            &model.config(),
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            &self.target_modules,
        )
    }
}

/// A generation batch: P × G rows of prompt + completion, and what each step over it reads.
struct Generation {
    /// Row-major (rows, T) ids, right-padded.
    ids: Vec<u32>,
    seq: usize,
    /// Real tokens of each row (prompt + completion): the forwards pack the rows to these.
    lengths: Vec<usize>,
    /// (rows, T - 1): 1 where position t predicts a completion token.
    mask: Vec<f64>,
    /// (rows, T - 1): the completion token position t predicts, and
    /// [`lathe_models::generate::IGNORE`] elsewhere (the prompt's and the padding's
    /// predictions are never computed).
    targets: Vec<u32>,
    advantages: Vec<f64>,
    /// (rows, T - 1) log-probs at generation time (μ > 1) and of the reference (β ≠ 0).
    old_logps: Option<Vec<f64>>,
    ref_logps: Option<Vec<f64>>,
    /// Completion tokens in the batch (dapo's denominator).
    tokens: usize,
    /// Statistics of the generation: rewards, completion lengths.
    metrics: Metrics,
    /// The decoded prompts and completions, with their summed reward.
    samples: Vec<(String, String, f64)>,
}

/// (trl name, value) pairs of a step's statistics.
pub type Metrics = Vec<(String, f64)>;

/// What one optimizer step measured, under trl's names.
#[derive(Clone, Debug)]
pub struct GrpoStepStats {
    /// Steps done, this one included.
    pub step: usize,
    /// (name, value): loss, grad_norm, learning_rate, reward, reward_std,
    /// `rewards/<f>/mean|std`, frac_reward_zero_std, kl, `clip_ratio/*`, `completions/*`.
    pub metrics: Metrics,
    /// The prompts, completions and rewards of a step that generated (else empty).
    pub samples: Vec<(String, String, f64)>,
}

impl GrpoStepStats {
    /// The value of `name`, NaN when the step did not log it.
    pub fn get(&self, name: &str) -> f64 {
        self.metrics
            .iter()
            .find(|(k, _)| k == name)
            .map_or(f64::NAN, |(_, v)| *v)
    }
}

/// GRPO on a LoRA policy; `step` is one optimizer step (generating first when a new
/// generation batch is due).
pub struct GrpoTrainer {
    /// The policy: the base model with its LoRA adapters.
    pub model: CausalLm,
    /// Turns the adapters on (the policy) or off (the reference) and their dropout.
    pub switch: AdapterSwitch,
    config: GrpoConfig,
    lora: LoraConfig,
    params: Vec<Tensor>,
    adam: Adam,
    schedule: LrSchedule,
    pad: u32,
    eos: Option<u32>,
    device: Device,
    steps_done: usize,
    /// Prompt and completion tokens of every generation batch so far (trl's `num_tokens`).
    num_tokens: u64,
    generation: Option<Generation>,
}

impl GrpoTrainer {
    /// A trainer over `model` with fresh adapters (seeded) or, with `switch` given, the
    /// adapters a checkpoint loaded on it.
    pub fn new(
        mut model: CausalLm,
        loaded: Option<AdapterSwitch>,
        config: &GrpoConfig,
        tokenizer: &Tokenizer,
        device: &Device,
    ) -> Result<GrpoTrainer> {
        config.validate()?;
        let lora = config.lora_config(&model);
        let switch = match loaded {
            Some(switch) => switch,
            None => {
                let switch = AdapterSwitch::new();
                model.add_lora(&lora, &switch, config.seed)?;
                switch
            }
        };
        model.set_gradient_checkpointing(config.gradient_checkpointing);
        // The base is final from here on: its forward products read packed panels.
        model.pack_frozen_weights()?;
        let params = model.lora_parameters();
        if params.is_empty() {
            return Err(Error::GrpoConfig("the policy has no LoRA adapters".into()));
        }
        let adam = Adam::new(
            params.clone(),
            AdamConfig::adamw(config.learning_rate, config.weight_decay),
        )?;
        let schedule = LrSchedule {
            peak: config.learning_rate,
            warmup_steps: config.warmup_steps,
            total_steps: config.max_steps,
            kind: config.schedule_kind()?,
        };
        Ok(GrpoTrainer {
            model,
            switch,
            config: config.clone(),
            lora,
            params,
            adam,
            schedule,
            pad: tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0),
            eos: tokenizer.eos_id(),
            device: device.clone(),
            steps_done: 0,
            num_tokens: 0,
            generation: None,
        })
    }

    /// The settings the trainer was built with.
    pub fn config(&self) -> &GrpoConfig {
        &self.config
    }

    /// The adapters' settings (rank, alpha, dropout, the resolved target modules).
    pub fn lora_config(&self) -> &LoraConfig {
        &self.lora
    }

    /// The AdamW optimizer with its moments and step count.
    pub fn optimizer(&self) -> &Adam {
        &self.adam
    }

    /// Optimizer steps done.
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// Whether all `max_steps` steps are done.
    pub fn done(&self) -> bool {
        self.steps_done >= self.config.max_steps
    }

    /// Tokens generated and prompted so far (trl's `num_tokens`).
    pub fn num_tokens(&self) -> u64 {
        self.num_tokens
    }

    /// Restores a checkpoint's step count, token count and optimizer moments (at a
    /// generation boundary).
    pub fn restore(
        &mut self,
        steps_done: usize,
        num_tokens: u64,
        adam_step: u64,
        moments: Vec<(Tensor, Tensor)>,
    ) -> Result<()> {
        self.adam.restore(adam_step, moments)?;
        self.steps_done = steps_done;
        self.num_tokens = num_tokens;
        self.generation = None;
        Ok(())
    }

    /// One optimizer step; a new generation batch first when one is due. `prompts` are
    /// what the generation's prompts are drawn from, `reward` scores prompt + completion
    /// texts (for the "model" reward function).
    pub fn step(
        &mut self,
        prompts: &Prompts,
        tokenizer: &Tokenizer,
        reward: &mut dyn Reward,
    ) -> Result<GrpoStepStats> {
        let step = self.steps_done;
        let mut samples = Vec::new();
        if step.is_multiple_of(self.config.num_iterations) || self.generation.is_none() {
            let generation = self.generate(
                step / self.config.num_iterations,
                prompts,
                tokenizer,
                reward,
            )?;
            samples = generation.samples.clone();
            self.generation = Some(generation);
        }
        let (loss, mut metrics, mut grads) = self.forward_backward(step)?;
        let grad_norm = clip_grad_norm(&mut grads, &self.params, self.config.max_grad_norm)?;
        let lr = self.schedule.lr(step);
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::GrpoDiverged(format!(
                "step {}: loss {loss}, gradient norm {grad_norm} (learning rate {lr:e}); the \
                 last checkpoint and adapter are kept",
                step + 1
            )));
        }
        self.adam.set_lr(lr);
        self.adam.step(&grads)?;
        if let Some(i) = lathe_core::first_diverged(&self.params)? {
            return Err(Error::GrpoDiverged(format!(
                "step {}: LoRA parameter {i} holds NaN/inf after the update",
                step + 1
            )));
        }
        self.steps_done += 1;
        let generation = self.generation.as_ref().expect("generated above");
        metrics.extend(generation.metrics.iter().cloned());
        metrics.push(("num_tokens".into(), self.num_tokens as f64));
        metrics.push(("loss".into(), loss));
        metrics.push(("grad_norm".into(), grad_norm as f64));
        metrics.push(("learning_rate".into(), lr as f64));
        Ok(GrpoStepStats {
            step: self.steps_done,
            metrics,
            samples,
        })
    }

    /// Draws the prompts of generation `index`, samples G completions each, scores them and
    /// computes the advantages (and the old and reference log-probs when needed).
    fn generate(
        &mut self,
        index: usize,
        prompts: &Prompts,
        tokenizer: &Tokenizer,
        reward: &mut dyn Reward,
    ) -> Result<Generation> {
        let c = &self.config;
        let g = c.num_generations;
        let prompts_n = c.generation_batch() / g;
        let mut rng = Rng::new(lathe_core::seed::derive(c.seed, 0, index as u64 + 1));
        let prompts = prompts.draw(prompts_n, c.prompt_length, &mut rng);
        // Each prompt G times; the G rows sample independently (per-row streams) after one
        // shared prefill of the prompt.
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), g))
            .collect();
        let config = GenerateConfig {
            max_new_tokens: c.max_completion_length,
            min_new_tokens: 0,
            eos_token_id: self.eos,
            stop_at_eos: self.eos.is_some(),
            pad_token_id: self.pad,
            sampling: SamplingConfig {
                temperature: c.temperature,
                top_k: c.top_k,
                top_p: c.top_p,
                greedy: false,
            },
            seed: rng.next_u64(),
            use_cache: true,
        };
        self.switch.eval();
        let mut completions = generate_groups(&self.model, &prompts, g, &config, &self.device)?;
        // A finished row ends at its EOS; the pads after it are not part of it.
        let mut terminated = 0usize;
        for completion in &mut completions {
            if let Some(end) = self
                .eos
                .and_then(|e| completion.iter().position(|&t| t == e))
            {
                completion.truncate(end + 1);
                terminated += 1;
            }
        }
        let decode = |ids: &[u32]| tokenizer.decode(ids, true);
        let prompt_texts: Vec<String> = rows
            .iter()
            .map(|p| decode(p))
            .collect::<std::result::Result<_, _>>()?;
        let completion_texts: Vec<String> = completions
            .iter()
            .map(|c| decode(c))
            .collect::<std::result::Result<_, _>>()?;
        let c = &self.config;
        let mut per_func: Vec<Vec<f64>> =
            vec![Vec::with_capacity(c.reward_funcs.len()); rows.len()];
        for name in &c.reward_funcs {
            let scores: Vec<f64> = match name.as_str() {
                "model" => {
                    let full: Vec<String> = prompt_texts
                        .iter()
                        .zip(&completion_texts)
                        .map(|(p, c)| format!("{p}{c}"))
                        .collect();
                    let scores = reward.score(&full)?;
                    if scores.len() != full.len() {
                        return Err(Error::Reward(format!(
                            "the reward returned {} scores for {} texts",
                            scores.len(),
                            full.len()
                        )));
                    }
                    scores.into_iter().map(f64::from).collect()
                }
                "format" => completion_texts.iter().map(|t| format_reward(t)).collect(),
                _ => completions
                    .iter()
                    .map(|t| t.len() as f64 / c.max_completion_length as f64)
                    .collect(),
            };
            for (row, s) in per_func.iter_mut().zip(scores) {
                row.push(s);
            }
        }
        let weights = c.weights();
        let advantages = group_advantages(
            &per_func,
            &c.reward_funcs,
            &weights,
            g,
            c.scale_rewards,
            c.multi_objective_aggregation,
        )?;
        // Rows of prompt + completion, right-padded; the mask marks completion predictions.
        // Real tokens of each row; the forwards pack the rows to these.
        let row_lengths: Vec<usize> = rows
            .iter()
            .zip(&completions)
            .map(|(p, c)| p.len() + c.len())
            .collect();
        let seq = row_lengths.iter().copied().max().unwrap_or(2).max(2);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = vec![0.0; rows.len() * (seq - 1)];
        for (r, (p, comp)) in rows.iter().zip(&completions).enumerate() {
            ids.extend_from_slice(p);
            ids.extend_from_slice(comp);
            ids.resize((r + 1) * seq, self.pad);
            for t in p.len() - 1..p.len() + comp.len() - 1 {
                mask[r * (seq - 1) + t] = 1.0;
            }
        }
        let wanted: Vec<bool> = mask.iter().map(|&m| m == 1.0).collect();
        let targets = next_tokens(&ids, seq, Some(&wanted))?;
        let tokens: usize = completions.iter().map(Vec::len).sum();
        let prompt_tokens: usize = rows.iter().map(Vec::len).sum();
        self.num_tokens += (prompt_tokens + tokens) as u64;
        let lengths: Vec<f64> = completions.iter().map(|c| c.len() as f64).collect();
        let mut metrics = advantages.metrics.clone();
        metrics.push((
            "completions/mean_length".into(),
            lengths.iter().sum::<f64>() / lengths.len() as f64,
        ));
        metrics.push((
            "completions/min_length".into(),
            lengths.iter().copied().fold(f64::INFINITY, f64::min),
        ));
        metrics.push((
            "completions/max_length".into(),
            lengths.iter().copied().fold(0.0, f64::max),
        ));
        metrics.push((
            "completions/clipped_ratio".into(),
            1.0 - terminated as f64 / rows.len() as f64,
        ));
        // The lengths of the completions that ended at EOS (trl: 0 when none did).
        let ended: Vec<f64> = completions
            .iter()
            .filter(|c| self.eos.is_some() && c.last().copied() == self.eos)
            .map(|c| c.len() as f64)
            .collect();
        let (mean, min, max) = match ended.is_empty() {
            true => (0.0, 0.0, 0.0),
            false => (
                ended.iter().sum::<f64>() / ended.len() as f64,
                ended.iter().copied().fold(f64::INFINITY, f64::min),
                ended.iter().copied().fold(0.0, f64::max),
            ),
        };
        metrics.push(("completions/mean_terminated_length".into(), mean));
        metrics.push(("completions/min_terminated_length".into(), min));
        metrics.push(("completions/max_terminated_length".into(), max));
        let summed: Vec<f64> = per_func
            .iter()
            .map(|r| r.iter().zip(&weights).map(|(x, w)| x * w).sum())
            .collect();
        let samples = prompt_texts
            .into_iter()
            .zip(completion_texts)
            .zip(summed)
            .map(|((p, c), r)| (p, c, r))
            .collect();
        let mut generation = Generation {
            ids,
            seq,
            lengths: row_lengths,
            mask,
            targets,
            advantages: advantages.advantages,
            old_logps: None,
            ref_logps: None,
            tokens,
            metrics,
            samples,
        };
        if self.config.num_iterations > 1 {
            generation.old_logps = Some(self.logps_no_grad(&generation, false)?);
        }
        if self.config.beta != 0.0 {
            generation.ref_logps = Some(self.logps_no_grad(&generation, true)?);
        }
        Ok(generation)
    }

    /// (rows, T - 1) log-probs of a whole generation batch without gradients, by
    /// micro-batches; `reference`: with the adapters off.
    fn logps_no_grad(&self, generation: &Generation, reference: bool) -> Result<Vec<f64>> {
        let _no_grad = lathe_core::no_grad();
        let _off = reference.then(|| self.switch.disable());
        self.switch.eval();
        let rows = generation.advantages.len();
        let mut out = Vec::with_capacity(rows * (generation.seq - 1));
        for start in (0..rows).step_by(self.config.per_device_train_batch_size) {
            let n = self.config.per_device_train_batch_size.min(rows - start);
            let logps = self.row_logps(generation, start, n)?;
            out.extend(logps.to_vec_f32()?.into_iter().map(f64::from));
        }
        Ok(out)
    }

    /// (n, T - 1) per-token log-probs of rows `start..start + n`.
    fn row_logps(&self, generation: &Generation, start: usize, n: usize) -> Result<Tensor> {
        Ok(self.packed_logps(generation, start, n, false)?.0)
    }

    /// (n, T - 1) per-token log-probs of rows `start..start + n` and, when asked, their
    /// entropies: the rows packed without their padding.
    fn packed_logps(
        &self,
        generation: &Generation,
        start: usize,
        n: usize,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let seq = generation.seq;
        Ok(packed_token_logprobs(
            &self.model,
            &generation.ids[start * seq..(start + n) * seq],
            (n, seq),
            &generation.lengths[start..start + n],
            &generation.targets[start * (seq - 1)..(start + n) * (seq - 1)],
            entropy,
            &self.device,
        )?)
    }

    /// The step's micro-batches over the generation batch: the loss (summed as trl's
    /// accumulation sums it), the averaged statistics and the summed gradients.
    fn forward_backward(&self, step: usize) -> Result<(f64, Metrics, GradStore)> {
        let generation = self.generation.as_ref().expect("a generation batch");
        let c = &self.config;
        let (micro, accum) = (c.per_device_train_batch_size, c.gradient_accumulation_steps);
        let cols = generation.seq - 1;
        let settings = LossSettings {
            loss_type: c.loss_type,
            beta: c.beta,
            epsilon_low: c.epsilon,
            epsilon_high: c.epsilon_high.unwrap_or(c.epsilon),
            max_completion_length: c.max_completion_length,
            gradient_accumulation_steps: accum,
            steps_per_generation: accum,
            num_items_in_batch: generation.tokens,
        };
        let mut grads: Option<GradStore> = None;
        let mut loss = 0.0;
        let mut tallies: Vec<(&'static str, f64)> = Vec::new();
        for m in 0..accum {
            let start = m * micro;
            let span = start * cols..(start + micro) * cols;
            self.switch.train(lathe_core::seed::derive(
                c.seed,
                0x5eed,
                (step * accum + m) as u64 + 1,
            ));
            let (logps, entropy) = self.packed_logps(generation, start, micro, true)?;
            let entropy = entropy.ok_or_else(|| {
                Error::GrpoConfig("the model returned no entropy though it was asked for".into())
            })?;
            let values: Vec<f64> = logps.to_vec_f32()?.into_iter().map(f64::from).collect();
            // trl's `entropy`: the masked mean over the micro-batch's completion tokens,
            // averaged over micro-batches as its other statistics are.
            let entropy = masked_mean(&entropy.to_vec_f32()?, &generation.mask[span.clone()]);
            let old = generation
                .old_logps
                .as_ref()
                .map_or(values.as_slice(), |o| &o[span.clone()]);
            let reference = generation
                .ref_logps
                .as_ref()
                .map_or(values.as_slice(), |r| &r[span.clone()]);
            let out = grpo_loss(
                TokenBatch {
                    rows: micro,
                    cols,
                    logps: &values,
                    old_logps: old,
                    ref_logps: reference,
                    mask: &generation.mask[span],
                    advantages: &generation.advantages[start..start + micro],
                },
                &settings,
            );
            let upstream: Vec<f32> = out.grad.iter().map(|&g| g as f32).collect();
            let upstream = Tensor::from_vec(upstream, &[micro, cols], &self.device)?;
            let micro_grads = logps.mul(&upstream)?.sum_all()?.backward()?;
            grads = Some(GradStore::accumulate(grads, micro_grads, &self.params)?);
            loss += out.loss;
            let stats = out.metrics.into_iter().chain([("entropy", entropy)]);
            for (i, (name, value)) in stats.enumerate() {
                match tallies.get_mut(i) {
                    Some((_, sum)) => *sum += value / accum as f64,
                    None => tallies.push((name, value / accum as f64)),
                }
            }
        }
        let metrics = tallies
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Ok((
            loss,
            metrics,
            grads.expect("gradient_accumulation_steps >= 1"),
        ))
    }
}

/// The mean of `values` where `mask` is 1 (0 when nothing is masked in).
fn masked_mean(values: &[f32], mask: &[f64]) -> f64 {
    let count: f64 = mask.iter().sum();
    let total: f64 = values.iter().zip(mask).map(|(&v, m)| v as f64 * m).sum();
    if count > 0.0 {
        total / count
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::format_reward;

    #[test]
    fn format_reward_wants_think_then_answer_and_nothing_else() {
        for good in [
            "<think>2+2</think><answer>4</answer>",
            "  <think>a\nb</think>\n<answer>yes</answer>\n",
        ] {
            assert_eq!(format_reward(good), 1.0, "{good:?}");
        }
        for bad in [
            "<answer>4</answer>",
            "<think>x</think>",
            "<think>x</think><answer>4</answer> and more",
            "well <think>x</think><answer>4</answer>",
            "<think>x</think><answer>4",
            "",
        ] {
            assert_eq!(format_reward(bad), 0.0, "{bad:?}");
        }
    }
}
