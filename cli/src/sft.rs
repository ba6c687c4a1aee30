//! `lathe sft`: supervised LoRA fine-tuning of a causal LM on text (the seed's step 1).
//!
//! Texts are tokenized (special tokens as the tokenizer adds them, EOS after each text),
//! concatenated and cut into blocks of `block_size` tokens (transformers' `run_clm`
//! `group_texts`; the tail shorter than a block is dropped). The last `eval_fraction` of the
//! blocks is held out. Training: causal-LM loss, AdamW on the adapters only, gradient
//! accumulation, global-norm clipping, warm-up + decay schedule, gradient checkpointing per
//! block, LoRA dropout.
//!
//! Everything random is a function of the seed and a position: the block order of epoch e
//! of (seed, e), the dropout masks of micro-batch g of (seed, g), A's init of (seed, layer).
//! With the adapters and Adam's moments saved in f32, a run resumed from a checkpoint
//! continues exactly as the uninterrupted run would have.

use lathe_models::plan::{Job, PlanSettings};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_core::optim::{Adam, AdamConfig};
use lathe_core::{clip_grad_norm, Device, GradStore, LrSchedule, ScheduleKind, Tensor};
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::attention::TokenLayout;
use lathe_models::config::ModelConfig;
use lathe_models::hf::CausalLm;
use lathe_models::sampling::Rng;
use lathe_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config_file::{flags_win, given_on_command_line, read_toml};
use crate::progress::Progress;
use crate::run_files::STATE_FILE;

/// Everything that shapes a run (written to `run.json`; a resume must match it). Also the
/// keys of `lathe sft --config FILE.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    pub block_size: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub lr: f32,
    pub weight_decay: f32,
    pub warmup_steps: usize,
    pub schedule: String,
    pub max_grad_norm: f32,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Empty: the architecture's default (GPT-NeoX query_key_value, Llama q_proj, v_proj).
    pub target_modules: Vec<String>,
    pub gradient_checkpointing: bool,
    pub eval_fraction: f64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    pub seed: u64,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            block_size: 128,
            batch_size: 8,
            grad_accum: 1,
            epochs: 1.0,
            max_steps: None,
            lr: 2e-4,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: "linear".into(),
            max_grad_norm: 1.0,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: Vec::new(),
            gradient_checkpointing: true,
            eval_fraction: 0.05,
            eval_every: 0,
            save_every: 0,
            seed: 0,
        }
    }
}

impl SftConfig {
    pub fn schedule_kind(&self) -> Result<ScheduleKind> {
        Ok(match self.schedule.as_str() {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            other => bail!("unknown schedule {other:?} (constant, linear, cosine)"),
        })
    }

    /// The LoRA config for `model` (default targets by architecture).
    pub fn lora_config(&self, model: &ModelConfig) -> LoraConfig {
        let targets: Vec<&str> = if self.target_modules.is_empty() {
            model.default_lora_targets().to_vec()
        } else {
            self.target_modules.iter().map(String::as_str).collect()
        };
        let mut config = LoraConfig::new(self.lora_r, self.lora_alpha, &targets);
        config.lora_dropout = self.lora_dropout;
        config
    }

    /// Checks every setting against its meaning; the error names the key and its range.
    /// `max_steps = 0` is an error (transformers reads max_steps <= 0 as "not set" and
    /// trains for the epochs instead: lathe says so rather than guessing); `max_grad_norm`
    /// must be > 0 (inf: no clipping).
    pub fn validate(&self) -> Result<()> {
        if !(2..=MAX_COUNT).contains(&self.block_size) {
            bail!(
                "block_size must be in 2..={MAX_COUNT}, got {}",
                self.block_size
            );
        }
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
        ] {
            if !(1..=MAX_COUNT).contains(&v) {
                bail!("{name} must be in 1..={MAX_COUNT}, got {v}");
            }
        }
        if let Some(steps) = self.max_steps {
            if !(1..=MAX_STEPS).contains(&steps) {
                bail!(
                    "max_steps must be in 1..={MAX_STEPS}, got {steps} (leave it out to train \
                     for `epochs`)"
                );
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr must be finite and > 0, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            );
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            bail!(
                "max_grad_norm must be > 0 (inf: no clipping), got {}",
                self.max_grad_norm
            );
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            bail!(
                "eval_fraction must be in [0, 1), got {}",
                self.eval_fraction
            );
        }
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            bail!(
                "epochs must be finite and > 0 (or give max_steps), got {}",
                self.epochs
            );
        }
        check_lora(self.lora_r, self.lora_alpha, self.lora_dropout)?;
        self.schedule_kind()?;
        Ok(())
    }
}

/// The largest block size, batch size or accumulation count accepted (2^20).
pub const MAX_COUNT: usize = 1 << 20;
/// The most optimizer steps a run may ask for (2^30).
pub const MAX_STEPS: usize = 1 << 30;

/// The LoRA settings' own ranges (the rank's upper bound, the layer's width, is checked
/// where the adapters are added).
pub fn check_lora(r: usize, alpha: f64, dropout: f64) -> Result<()> {
    if r == 0 {
        bail!("lora_r must be >= 1 (and at most the adapted layers' width), got 0");
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        bail!("lora_alpha must be finite and > 0, got {alpha}");
    }
    if !(0.0..1.0).contains(&dropout) {
        bail!("lora_dropout must be in [0, 1), got {dropout}");
    }
    Ok(())
}

/// Token blocks for training and held-out evaluation.
#[derive(Clone, Debug)]
pub struct Blocks {
    pub block_size: usize,
    pub train: Vec<Vec<u32>>,
    pub eval: Vec<Vec<u32>>,
}

/// Tokenizes, concatenates and cuts `texts` into blocks; holds out the last
/// `eval_fraction` of them (at least one when the fraction is positive and there are two
/// blocks or more).
pub fn pack(
    texts: &[String],
    tokenizer: &Tokenizer,
    block_size: usize,
    eval_fraction: f64,
) -> Result<Blocks> {
    let mut stream = Vec::new();
    for text in texts {
        stream.extend(tokenizer.encode(text, true)?);
        if let Some(eos) = tokenizer.eos_id() {
            stream.push(eos);
        }
    }
    let blocks: Vec<Vec<u32>> = stream
        .chunks_exact(block_size)
        .map(<[u32]>::to_vec)
        .collect();
    if blocks.is_empty() {
        bail!(
            "the data has {} tokens, fewer than one block of {block_size}: give more text or \
             a smaller --block-size",
            stream.len()
        );
    }
    let held_out = if eval_fraction > 0.0 && blocks.len() >= 2 {
        ((blocks.len() as f64 * eval_fraction).ceil() as usize).clamp(1, blocks.len() - 1)
    } else {
        0
    };
    let split = blocks.len() - held_out;
    Ok(Blocks {
        block_size,
        eval: blocks[split..].to_vec(),
        train: blocks[..split].to_vec(),
    })
}

fn mix(seed: u64, salt: u64) -> u64 {
    seed ^ salt.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The causal-LM loss of a batch of equal-length blocks (B, T): mean over B (T - 1)
/// next-token predictions.
pub fn block_loss(model: &CausalLm, blocks: &[&Vec<u32>], device: &Device) -> Result<Tensor> {
    let (b, t) = (blocks.len(), blocks[0].len());
    let flat: Vec<u32> = blocks.iter().flat_map(|x| x.iter().copied()).collect();
    let ids = Tensor::from_vec(flat, &[b, t], device)?;
    let layout = TokenLayout::contiguous(b, t, 0, device)?;
    let hidden = model.forward_hidden(&ids, &layout, None)?; // (B, T, H)
    let h = hidden.shape()[2];
    let predicting = hidden.narrow(1, 0, t - 1)?.reshape(&[b * (t - 1), h])?;
    let targets = ids.narrow(1, 1, t - 1)?.reshape(&[b * (t - 1)])?;
    Ok(model.lm_head_loss(&predicting, &targets, None)?)
}

/// Mean loss over the held-out blocks (adapters on, no dropout, no gradients).
pub fn eval_loss(
    model: &CausalLm,
    switch: &AdapterSwitch,
    blocks: &[Vec<u32>],
    batch: usize,
    device: &Device,
) -> Result<Option<f32>> {
    if blocks.is_empty() {
        return Ok(None);
    }
    let _no_grad = lathe_core::no_grad();
    let seed = switch.dropout_seed();
    switch.eval();
    let mut total = 0.0f64;
    for chunk in blocks.chunks(batch) {
        let refs: Vec<&Vec<u32>> = chunk.iter().collect();
        total += block_loss(model, &refs, device)?.to_scalar()? as f64 * chunk.len() as f64;
    }
    if let Some(seed) = seed {
        switch.train(seed);
    }
    Ok(Some((total / blocks.len() as f64) as f32))
}

/// What a finished run measured.
#[derive(Clone, Debug, Serialize)]
pub struct SftSummary {
    pub steps: usize,
    /// Training loss of each step of the run (a resumed run's earlier steps as
    /// metrics.jsonl recorded them).
    pub losses: Vec<f32>,
    /// (step, held-out loss) at each evaluation.
    pub eval_losses: Vec<(usize, f32)>,
    pub tokens_per_s: f64,
    pub resumed_from: Option<usize>,
    /// Stopped by Ctrl-C after saving a checkpoint.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

const CHECKPOINT: &str = "checkpoint";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const METRICS_FILE: &str = "metrics.jsonl";

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    adam_step: u64,
    config: SftConfig,
    /// The run's inputs; absent in checkpoints of older versions.
    #[serde(default)]
    inputs: Option<crate::resume::Fingerprints>,
}

/// sha256 of the training and held-out blocks: the data as the run sees it, so another
/// `--data`, `--text-field` or tokenizer shows as a difference.
pub fn blocks_fingerprint(blocks: &Blocks) -> String {
    let mut bytes = Vec::new();
    for (part, list) in [(0u32, &blocks.train), (1, &blocks.eval)] {
        bytes.extend(part.to_le_bytes());
        bytes.extend((list.len() as u64).to_le_bytes());
        for block in list {
            bytes.extend((block.len() as u64).to_le_bytes());
            bytes.extend(block.iter().flat_map(|t| t.to_le_bytes()));
        }
    }
    crate::resume::bytes_fingerprint(&bytes)
}

/// Reads a checkpoint's trainer state and refuses one that no run of this code wrote (a
/// hand edit, a damaged file): steps beyond the run, an optimizer step count that does not
/// fit the step, a step metrics.jsonl never recorded.
fn read_state(
    dir: &Path,
    out: &Path,
    config: &SftConfig,
    total_steps: usize,
) -> Result<TrainerState> {
    let state: TrainerState = crate::run_files::read_state(dir)?;
    let bad = |detail: String| crate::run_files::damaged_state(dir, detail);
    if state.step == 0 {
        return Err(bad("step 0 (a checkpoint is written after a step)".into()));
    }
    // Only a run of the same settings bounds the step (another max_steps under
    // --resume-anyway is the resume check's to report).
    if state.config == *config && state.step > total_steps {
        return Err(bad(format!(
            "step {} is beyond the run's {total_steps} steps",
            state.step
        )));
    }
    // One optimizer update per step, always (accumulation sums micro-batches first).
    if state.adam_step != state.step as u64 {
        return Err(bad(format!(
            "the optimizer has taken {} steps at step {} (an SFT run takes one per step)",
            state.adam_step, state.step
        )));
    }
    check_metrics_reach(&out.join(METRICS_FILE), state.step).map_err(bad)?;
    Ok(state)
}

/// The highest step metrics.jsonl records must reach the checkpoint's: each step's line is
/// written before its checkpoint.
pub(crate) fn check_metrics_reach(metrics: &Path, step: usize) -> std::result::Result<(), String> {
    let records = if metrics.is_file() {
        crate::run_files::read_jsonl(metrics).map_err(|e| format!("{e:#}"))?
    } else {
        Vec::new()
    };
    let last = records
        .iter()
        .filter_map(|r| r["step"].as_u64())
        .max()
        .unwrap_or(0);
    if (last as usize) < step {
        return Err(format!(
            "step {step}, but {} records steps only up to {last}",
            metrics.display()
        ));
    }
    Ok(())
}

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
    config.validate()?;
    if blocks.block_size != config.block_size {
        bail!(
            "blocks of {} tokens for a config of {}",
            blocks.block_size,
            config.block_size
        );
    }
    let lora_config = config.lora_config(&model.config());
    let switch = AdapterSwitch::new();
    let micro_per_epoch = blocks.train.len().div_ceil(config.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(config.grad_accum);
    let total_steps = match config.max_steps {
        Some(steps) => steps,
        None => {
            let steps = (config.epochs * steps_per_epoch as f64).ceil();
            if steps > MAX_STEPS as f64 {
                bail!(
                    "{} epochs of {steps_per_epoch} steps are more than {MAX_STEPS} steps",
                    config.epochs
                );
            }
            (steps as usize).max(1)
        }
    };
    let inputs = crate::resume::Fingerprints {
        model: options.model.clone(),
        data: Some(blocks_fingerprint(blocks)),
        reward: None,
    };
    let checkpoint_dir = crate::run_files::checkpoint_to_resume(out, CHECKPOINT, STATE_FILE, "sft");
    let resume = checkpoint_dir.is_some();
    let (start_step, adam_state) = if let Some(checkpoint_dir) = &checkpoint_dir {
        let state = read_state(checkpoint_dir, out, config, total_steps)?;
        crate::resume::check(
            "sft",
            checkpoint_dir,
            state.inputs.as_ref(),
            &inputs,
            &serde_json::to_value(&state.config)?,
            &serde_json::to_value(config)?,
            options.anyway,
        )?;
        let loaded = model.load_lora(checkpoint_dir, &switch)?;
        check_adapters(model, &lora_config, &loaded, checkpoint_dir)?;
        (
            state.step,
            Some((state.adam_step, checkpoint_dir.join(OPTIMIZER_FILE))),
        )
    } else {
        model.add_lora(&lora_config, &switch, config.seed)?;
        (0, None)
    };
    // Only now, with every setting and the adapters accepted, does the run folder appear.
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    model.set_gradient_checkpointing(config.gradient_checkpointing);
    let params = model.lora_parameters();
    let mut adam = Adam::new(
        params.clone(),
        AdamConfig::adamw(config.lr, config.weight_decay),
    )?;
    if let Some((adam_step, path)) = adam_state {
        let moments = crate::run_files::load_moments(&path, params.len(), device)?;
        adam.restore(adam_step, moments)?;
    }

    let schedule = LrSchedule {
        peak: config.lr,
        warmup_steps: config.warmup_steps,
        total_steps,
        kind: config.schedule_kind()?,
    };
    eprintln!("{}", model.trainable_parameters_line()?);
    eprintln!(
        "sft: {} train blocks, {} eval blocks of {} tokens; {total_steps} steps of {} x {} \
         blocks{}",
        blocks.train.len(),
        blocks.eval.len(),
        config.block_size,
        config.batch_size,
        config.grad_accum,
        if resume {
            format!(", resuming at step {start_step}")
        } else {
            String::new()
        }
    );
    let metrics_path = out.join(METRICS_FILE);
    let mut summary = SftSummary {
        steps: total_steps,
        losses: Vec::new(),
        eval_losses: Vec::new(),
        tokens_per_s: 0.0,
        resumed_from: resume.then_some(start_step),
        interrupted: false,
    };
    if resume {
        read_summary(&metrics_path, start_step, &mut summary)?;
    }
    if start_step >= total_steps {
        // A rerun of a finished run: nothing to train. Its outputs stay as they are; only
        // when the final ones are missing (a crash after the last checkpoint) are they
        // written, with the summary taken from metrics.jsonl.
        if out.join("run.json").is_file() {
            eprintln!(
                "sft: {} already holds a finished run of {start_step} steps; nothing to do",
                out.display()
            );
        } else {
            switch.eval();
            save_final(model, &lora_config, config, &summary, out)?;
        }
        return Ok(summary);
    }
    let mut metrics = crate::run_files::reopen_jsonl(&metrics_path, start_step)?;
    let mut progress = Progress::new("sft", total_steps);
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut order_epoch = usize::MAX;
    let mut order = Vec::new();
    for step in start_step..total_steps {
        let mut grads: Option<GradStore> = None;
        let mut step_loss = 0.0f64;
        let mut step_blocks = 0usize;
        for micro in 0..config.grad_accum {
            let global = step * config.grad_accum + micro;
            let (epoch, index) = (global / micro_per_epoch, global % micro_per_epoch);
            if epoch != order_epoch {
                order = Rng::new(mix(config.seed, epoch as u64)).permutation(blocks.train.len());
                order_epoch = epoch;
            }
            let batch: Vec<&Vec<u32>> = order
                [index * config.batch_size..((index + 1) * config.batch_size).min(order.len())]
                .iter()
                .map(|&i| &blocks.train[i])
                .collect();
            switch.train(mix(config.seed ^ 0x5eed, global as u64));
            let loss = block_loss(model, &batch, device)?;
            // Each micro-batch's mean loss weighs by its share of the step's blocks.
            let weight = batch.len() as f32 / (config.batch_size * config.grad_accum) as f32;
            let micro_grads = loss.affine(weight, 0.0)?.backward()?;
            step_loss += loss.to_scalar()? as f64 * batch.len() as f64;
            step_blocks += batch.len();
            tokens += batch.len() * config.block_size;
            grads = Some(match grads {
                None => micro_grads,
                Some(mut sum) => {
                    for p in &params {
                        if let Some(g) = micro_grads.get(p) {
                            let total = match sum.remove(p) {
                                Some(previous) => previous.add(g)?,
                                None => g.clone(),
                            };
                            sum.insert(p, total);
                        }
                    }
                    sum
                }
            });
        }
        let mut grads = grads.expect("grad_accum >= 1");
        let loss = (step_loss / step_blocks as f64) as f32;
        let grad_norm = clip_grad_norm(&mut grads, &params, config.max_grad_norm)?;
        let lr = schedule.lr(step);
        let diverged = |what: String| {
            anyhow::anyhow!(
                "step {}: {what}; stopping without saving this step (the last checkpoint and \
                 adapter are kept). The learning rate ({lr:e} at this step) is likely too \
                 high, or a setting is NaN/inf",
                step + 1
            )
        };
        if !loss.is_finite() {
            return Err(diverged(format!("the loss is {loss}")));
        }
        if !grad_norm.is_finite() {
            return Err(diverged(format!("the gradient norm is {grad_norm}")));
        }
        adam.set_lr(lr);
        adam.step(&grads)?;
        if let Some(i) = lathe_core::first_diverged(&params)? {
            return Err(diverged(format!(
                "LoRA parameter {i} {:?} holds NaN/inf or a value beyond 1.8e19 after the update",
                params[i].shape()
            )));
        }
        summary.losses.push(loss);
        let done = step + 1;
        let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64();
        let mut record = json!({
            "step": done, "epoch": (done as f64 / steps_per_epoch as f64),
            "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "elapsed_s": started.elapsed().as_secs_f64(),
        });
        let evaluate =
            done == total_steps || (config.eval_every > 0 && done % config.eval_every == 0);
        if evaluate {
            if let Some(eval) = eval_loss(model, &switch, &blocks.eval, config.batch_size, device)?
            {
                if !eval.is_finite() {
                    return Err(diverged(format!("the held-out loss is {eval}")));
                }
                record["eval_loss"] = json!(eval);
                summary.eval_losses.push((done, eval));
            }
        }
        crate::run_files::append_jsonl(&mut metrics, &record)?;
        metrics.flush()?;
        let eval_text = record
            .get("eval_loss")
            .map(|e| format!(" eval {:.4}", e.as_f64().unwrap_or(f64::NAN)))
            .unwrap_or_default();
        progress.update(
            done,
            start_step,
            &format!("loss {loss:.4}{eval_text} lr {lr:.2e} | {tokens_per_s:.0} tok/s"),
        );
        let interrupted = stop.is_some_and(|s| s.load(Ordering::SeqCst));
        if done == total_steps
            || interrupted
            || (config.save_every > 0 && done % config.save_every == 0)
        {
            save_checkpoint(model, &adam, &lora_config, config, &inputs, done, out)?;
        }
        if interrupted && done < total_steps {
            progress.finish();
            summary.interrupted = true;
            summary.steps = done;
            return Ok(summary);
        }
        if stop_after == Some(done) {
            progress.finish();
            return Ok(summary);
        }
    }
    progress.finish();
    switch.eval();
    summary.tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
    save_final(model, &lora_config, config, &summary, out)?;
    Ok(summary)
}

/// The adapter (peft files) and `run.json`.
fn save_final(
    model: &CausalLm,
    lora_config: &LoraConfig,
    config: &SftConfig,
    summary: &SftSummary,
    out: &Path,
) -> Result<()> {
    crate::run_files::save_into(out, |dir| {
        model.save_lora(dir, lora_config)?;
        std::fs::write(
            dir.join("run.json"),
            serde_json::to_string_pretty(&json!({ "config": config, "summary": summary }))?,
        )?;
        Ok(())
    })
}

/// The losses of the first `steps` steps, from a resumed run's `metrics.jsonl`.
fn read_summary(metrics: &Path, steps: usize, summary: &mut SftSummary) -> Result<()> {
    if !metrics.is_file() {
        return Ok(());
    }
    for r in crate::run_files::read_jsonl(metrics)? {
        let Some(step) = r["step"].as_u64().map(|s| s as usize) else {
            continue;
        };
        if step > steps {
            continue;
        }
        summary
            .losses
            .push(r["loss"].as_f64().map_or(f32::NAN, |v| v as f32));
        if let Some(eval) = r["eval_loss"].as_f64() {
            summary.eval_losses.push((step, eval as f32));
        }
    }
    Ok(())
}

/// Writes `out/checkpoint` through a temporary directory renamed into place.
fn save_checkpoint(
    model: &CausalLm,
    adam: &Adam,
    lora_config: &LoraConfig,
    config: &SftConfig,
    inputs: &crate::resume::Fingerprints,
    step: usize,
    out: &Path,
) -> Result<()> {
    crate::run_files::save_dir(out, CHECKPOINT, |temp| {
        model.save_lora(temp, lora_config)?;
        crate::run_files::save_moments(adam, &temp.join(OPTIMIZER_FILE))?;
        let state = TrainerState {
            step,
            adam_step: adam.step_count(),
            config: config.clone(),
            inputs: Some(inputs.clone()),
        };
        std::fs::write(temp.join(STATE_FILE), serde_json::to_string_pretty(&state)?)?;
        Ok(())
    })
}

/// The adapters a checkpoint gave the model must be exactly those the run's LoRA config
/// puts on it, with its rank and scaling: an adapter file with modules the config does not
/// target (extra tensors) is refused, not trained along silently.
pub(crate) fn check_adapters(
    model: &CausalLm,
    want: &LoraConfig,
    loaded: &LoraConfig,
    checkpoint: &Path,
) -> Result<()> {
    let adapted: Vec<String> = model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.adapter().is_some())
        .map(|(name, _)| name)
        .collect();
    let targeted: Vec<String> = model
        .linears()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| want.matches(name))
        .collect();
    let extra: Vec<&String> = adapted.iter().filter(|n| !targeted.contains(n)).collect();
    let missing: Vec<&String> = targeted.iter().filter(|n| !adapted.contains(n)).collect();
    if !extra.is_empty() || !missing.is_empty() {
        bail!(
            "{}: the adapter's modules do not match the run's target_modules {:?}{}{}; the \
             checkpoint does not belong to this configuration",
            checkpoint.display(),
            want.targets(),
            if extra.is_empty() {
                String::new()
            } else {
                format!("; modules not targeted: {extra:?}")
            },
            if missing.is_empty() {
                String::new()
            } else {
                format!("; targeted modules without an adapter: {missing:?}")
            },
        );
    }
    if loaded.r != want.r || loaded.lora_alpha != want.lora_alpha {
        bail!(
            "{}: the adapter has r {} and alpha {}, the run r {} and alpha {}",
            checkpoint.display(),
            loaded.r,
            loaded.lora_alpha,
            want.r,
            want.lora_alpha
        );
    }
    Ok(())
}

/// `lathe sft` flags.
#[derive(clap::Args, Debug)]
pub struct SftArgs {
    #[command(flatten)]
    pub model: crate::model_args::ModelArgs,
    /// Training text: .txt (one text per line), .jsonl or .json (objects with --text-field).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// The field holding the text in JSON objects.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Output folder: the adapter (peft files), metrics.jsonl, run.json, checkpoint/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A TOML file of the training settings (the keys of run.json's "config": block_size,
    /// batch_size, lr, lora_r, ...); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Tokens per training block.
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    /// Blocks per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides --epochs; >= 1).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// constant, linear or cosine decay after the warm-up.
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    /// Clip the gradients' global L2 norm to this (> 0; inf: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Modules to adapt, comma-separated (default: query_key_value for GPT-NeoX, q_proj,v_proj
    /// for Llama).
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Vec<String>,
    /// Keep every block's activations instead of recomputing them in the backward.
    #[arg(long)]
    pub no_gradient_checkpointing: bool,
    /// Share of the blocks held out for the eval loss.
    #[arg(long, default_value_t = 0.05)]
    pub eval_fraction: f64,
    /// Evaluate every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Save a checkpoint every N steps (0: at the end only); a rerun resumes from it.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Resume the checkpoint in --out even when its model, data or settings differ from
    /// this run's (a warning names them); the LoRA shape settings must still match.
    #[arg(long)]
    pub resume_anyway: bool,
}

impl SftArgs {
    pub fn config(&self) -> SftConfig {
        SftConfig {
            block_size: self.block_size,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            epochs: self.epochs,
            max_steps: self.max_steps,
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup_steps: self.warmup_steps,
            schedule: self.schedule.clone(),
            max_grad_norm: self.max_grad_norm,
            lora_r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            gradient_checkpointing: !self.no_gradient_checkpointing,
            eval_fraction: self.eval_fraction,
            eval_every: self.eval_every,
            save_every: self.save_every,
            seed: self.seed,
        }
    }
}

impl SftArgs {
    /// The settings: the `--config` file when given, with the flags that were given on the
    /// command line (`matches`) on top; the flags alone otherwise.
    pub fn settings(&self, matches: Option<&clap::ArgMatches>) -> Result<SftConfig> {
        let flags = self.config();
        let Some(path) = &self.config else {
            return Ok(flags);
        };
        let mut config: SftConfig = read_toml(path, "SFT config")?;
        flags_win!(
            matches,
            config,
            flags,
            block_size,
            batch_size,
            grad_accum,
            epochs,
            max_steps,
            lr,
            weight_decay,
            warmup_steps,
            schedule,
            max_grad_norm,
            lora_r,
            lora_alpha,
            lora_dropout,
            target_modules,
            eval_fraction,
            eval_every,
            save_every,
            seed
        );
        if given_on_command_line(matches, "no_gradient_checkpointing") {
            config.gradient_checkpointing = flags.gradient_checkpointing;
        }
        Ok(config)
    }
}

/// `lathe sft`; `matches` are the subcommand's parsed flags (to tell given flags from
/// defaults when a config file is used).
pub fn run(args: &SftArgs, matches: Option<&clap::ArgMatches>) -> Result<()> {
    let config = args.settings(matches)?;
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
    let texts = crate::texts::read_texts(&args.data, &args.text_field)?;
    let (mut pretrained, device) = args.model.load()?;
    let blocks = pack(
        &texts,
        &pretrained.tokenizer,
        config.block_size,
        config.eval_fraction,
    )
    .with_context(|| format!("packing {}", args.data.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C kills the process as usual.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nsft: Ctrl-C: finishing this step, then saving (Ctrl-C again to quit now)");
        });
    }
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
