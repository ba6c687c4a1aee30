//! Direct Preference Optimization (Rafailov et al.) of LoRA adapters, as trl 1.16's
//! `DPOTrainer`: for each pair (prompt, chosen, rejected) the policy's and the reference's
//! summed log-probs of the two completions, and a loss of the log-ratio margin
//! `d = (πc - rc) - (πr - rr)`. The reference is the same model with its adapters off (the
//! trick of the seed's PPO), so there is no second copy of the model; its log-probs are
//! computed per batch or once up front (`precompute_ref_log_probs`).
//!
//! The loss depends on the model only through the 2B summed log-probs, so it is computed on
//! the host in f64 ([`dpo_loss`], trl's formulas) with its gradient, which then flows into
//! the model through the surrogate `Σ logp · ∂L/∂logp` (the same gradient, one backward).
//!
//! Everything random is a function of the seed and a position, as in SFT: the pair order of
//! epoch e of (seed, e), the dropout masks of micro-batch g of (seed, g).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use lathe_core::optim::{Adam, AdamConfig};
use lathe_core::{clip_grad_norm, Device, GradStore, LrSchedule, Rng, ScheduleKind, Tensor};
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::chat::{ChatTemplate, Message};
use lathe_models::hf::CausalLm;
use lathe_models::logprobs::{next_tokens, packed_token_logprobs};
use lathe_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::resume::{Fingerprints, ResumeOptions};
use crate::run_dir::{RunDir, OPTIMIZER_FILE};
use crate::sft::{chat_messages, check_adapters, check_lora, lora_config, MAX_COUNT, MAX_STEPS};
use crate::{invalid, Error, Result};

/// trl's `loss_type`s implemented here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// `-log σ(β d)` (the DPO paper's).
    Sigmoid,
    /// `((πc - rc)/|c| - (πr - rr)/|r| - 1/(2β))²` (Azar et al., length-normalised as trl).
    Ipo,
    /// `relu(1 - β d)` (SLiC).
    Hinge,
    /// `(-(1-ε) log σ(β d) + ε log σ(-β d)) / (1 - 2ε)` with ε = `label_smoothing`.
    Robust,
}

impl std::str::FromStr for DpoLoss {
    type Err = Error;

    fn from_str(name: &str) -> Result<DpoLoss> {
        Ok(match name {
            "sigmoid" => DpoLoss::Sigmoid,
            "ipo" => DpoLoss::Ipo,
            "hinge" => DpoLoss::Hinge,
            "robust" => DpoLoss::Robust,
            other => invalid!("loss_type {other:?} is not one of sigmoid, ipo, hinge, robust"),
        })
    }
}

/// The settings of a DPO run under trl's `DPOConfig` names (and transformers'
/// `TrainingArguments` ones), with trl 1.16's defaults; the LoRA keys as SFT's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// The KL penalty's inverse temperature: how far the policy may move from the reference.
    pub beta: f64,
    /// Which preference loss to minimise (trl's `loss_type`).
    pub loss_type: DpoLoss,
    /// The assumed share of flipped labels; used by `robust` only (trl accepts it with the
    /// other losses and ignores it: lathe refuses it there).
    pub label_smoothing: f64,
    /// Peak learning rate of AdamW.
    pub learning_rate: f32,
    /// Pairs per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Passes over the pairs; ignored when `max_steps` is set.
    pub num_train_epochs: f64,
    /// Optimizer steps to run (overrides `num_train_epochs`).
    pub max_steps: Option<usize>,
    /// The longest prompt + completion in tokens: longer completions are cut at the end.
    pub max_length: usize,
    /// Compute the reference log-probs of every pair once before training (else per batch).
    pub precompute_ref_log_probs: bool,
    /// AdamW's decoupled weight decay (>= 0).
    pub weight_decay: f32,
    /// Clip the gradients' global L2 norm to this (> 0; inf: no clipping).
    pub max_grad_norm: f32,
    /// Steps of linear warmup from 0 to `learning_rate`.
    pub warmup_steps: usize,
    /// constant, linear or cosine decay after the warm-up.
    pub lr_scheduler_type: String,
    /// Seed of everything random: pair order, dropout masks, adapter init.
    pub seed: u64,
    /// Checkpoint every N steps (0: at the end only).
    pub save_steps: usize,
    /// Recompute activations in the backward pass instead of keeping them (less memory).
    pub gradient_checkpointing: bool,
    /// LoRA rank (>= 1).
    pub lora_r: usize,
    /// LoRA scale numerator: the update is scaled by `lora_alpha / lora_r`.
    pub lora_alpha: f64,
    /// Dropout on the adapters' input, in [0, 1).
    pub lora_dropout: f64,
    /// Empty: the architecture's defaults.
    pub target_modules: Vec<String>,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            loss_type: DpoLoss::Sigmoid,
            label_smoothing: 0.0,
            learning_rate: 1e-6,
            per_device_train_batch_size: 8,
            gradient_accumulation_steps: 1,
            num_train_epochs: 3.0,
            max_steps: None,
            max_length: 1024,
            precompute_ref_log_probs: false,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            lr_scheduler_type: "linear".into(),
            seed: 42,
            save_steps: 0,
            gradient_checkpointing: true,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: Vec::new(),
        }
    }
}

impl DpoConfig {
    /// Checks every setting against its meaning; the error names the key and its range.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            invalid!("beta must be finite and > 0, got {}", self.beta);
        }
        match self.loss_type {
            DpoLoss::Robust if !(0.0..0.5).contains(&self.label_smoothing) => invalid!(
                "label_smoothing must be in [0, 0.5) for the robust loss, got {}",
                self.label_smoothing
            ),
            DpoLoss::Robust => {}
            other if self.label_smoothing != 0.0 => invalid!(
                "label_smoothing {} has no effect on the {other:?} loss (trl 1.16 ignores it \
                 there): use loss_type = \"robust\", or leave it at 0",
                self.label_smoothing
            ),
            _ => {}
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            invalid!(
                "learning_rate must be finite and > 0, got {}",
                self.learning_rate
            );
        }
        for (name, v) in [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
        ] {
            if !(1..=MAX_COUNT).contains(&v) {
                invalid!("{name} must be in 1..={MAX_COUNT}, got {v}");
            }
        }
        if !(2..=MAX_COUNT).contains(&self.max_length) {
            invalid!(
                "max_length must be in 2..={MAX_COUNT}, got {}",
                self.max_length
            );
        }
        match self.max_steps {
            Some(steps) if !(1..=MAX_STEPS).contains(&steps) => invalid!(
                "max_steps must be in 1..={MAX_STEPS}, got {steps} (leave it out to train for \
                 num_train_epochs)"
            ),
            None if !(self.num_train_epochs.is_finite() && self.num_train_epochs > 0.0) => {
                invalid!(
                    "num_train_epochs must be finite and > 0 (or give max_steps), got {}",
                    self.num_train_epochs
                )
            }
            _ => {}
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            invalid!(
                "weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            );
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            invalid!(
                "max_grad_norm must be > 0 (inf: no clipping), got {}",
                self.max_grad_norm
            );
        }
        self.schedule_kind()?;
        check_lora(self.lora_r, self.lora_alpha, self.lora_dropout)
    }

    fn schedule_kind(&self) -> Result<ScheduleKind> {
        Ok(match self.lr_scheduler_type.as_str() {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            other => invalid!("lr_scheduler_type {other:?} is not constant, linear or cosine"),
        })
    }
}

/// One preference record: `{"prompt", "chosen", "rejected"}` (trl's standard format); the
/// type lives in lathe-data, which reads it from any data file.
pub use lathe_data::PreferencePair;

/// The preference records of a data file (JSONL, JSON, Parquet, Arrow; see lathe-data) with
/// trl's column names `prompt`, `chosen` and `rejected`. A record without one of the three,
/// or with an empty `chosen` or `rejected`, is an error naming it.
pub fn read_preferences(path: &Path) -> Result<Vec<PreferencePair>> {
    read_preferences_from(path, "prompt", "chosen", "rejected")
}

/// [`read_preferences`] from the named columns.
pub fn read_preferences_from(
    path: &Path,
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> Result<Vec<PreferencePair>> {
    lathe_data::read_preferences(path, prompt, chosen, rejected)
        .map_err(|e| Error::Invalid(e.to_string()))
}

/// A pair as token ids: the prompt (special tokens as the tokenizer adds them) and each
/// completion (without special tokens, EOS appended when the tokenizer has one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenPair {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// The preferred completion's token ids.
    pub chosen: Vec<u32>,
    /// The dispreferred completion's token ids.
    pub rejected: Vec<u32>,
}

/// Tokenizes `pairs`, cutting completions at the end so that prompt + completion fits
/// `max_length`; a prompt that leaves no room for a completion token is an error.
pub fn tokenize_pairs(
    pairs: &[PreferencePair],
    tokenizer: &Tokenizer,
    max_length: usize,
) -> Result<Vec<TokenPair>> {
    let eos = tokenizer.eos_id();
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let prompt = tokenizer.encode(&p.prompt, true)?;
            let Some(room) = max_length.checked_sub(prompt.len()).filter(|r| *r > 0) else {
                invalid!(
                    "pair {}: the prompt is {} tokens, no room for a completion within \
                     max_length {max_length}",
                    i + 1,
                    prompt.len()
                );
            };
            let completion = |text: &str| -> Result<Vec<u32>> {
                let mut ids = tokenizer.encode(text, false)?;
                ids.extend(eos);
                ids.truncate(room);
                Ok(ids)
            };
            Ok(TokenPair {
                prompt: prompt.clone(),
                chosen: completion(&p.chosen)?,
                rejected: completion(&p.rejected)?,
            })
        })
        .collect()
}

/// One conversational preference record (prompt, chosen and rejected as message lists); the
/// type lives in lathe-data.
pub use lathe_data::ConversationPair;

/// The conversational preference records of a data file, with the named columns.
pub fn read_preference_conversations(
    path: &Path,
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> Result<Vec<ConversationPair>> {
    lathe_data::read_preference_conversations(path, prompt, chosen, rejected)
        .map_err(|e| Error::Invalid(e.to_string()))
}

/// Conversational pairs as token ids, as trl's DPOTrainer tokenizes them: the prompt
/// rendered with the generation prompt, prompt + chosen and prompt + rejected rendered
/// whole (no special tokens added and no EOS appended: the template writes them); the
/// completion starts where the prompt's ids and both whole conversations' ids stop agreeing
/// (trl's `common_prefix_length`). Completions are cut to fit `max_length` as in
/// [`tokenize_pairs`].
pub fn tokenize_conversation_pairs(
    pairs: &[ConversationPair],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    max_length: usize,
) -> Result<Vec<TokenPair>> {
    let render = |turns: Vec<Message>, generation: bool| -> Result<Vec<u32>> {
        let text = template
            .render(&turns, generation)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(tokenizer.encode(&text, false)?)
    };
    let common = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let prompt_turns = chat_messages(&p.prompt);
            let whole = |completion: &[lathe_data::Message]| {
                let mut turns = prompt_turns.clone();
                turns.extend(chat_messages(completion));
                render(turns, false)
            };
            let prompt = render(prompt_turns.clone(), true)?;
            let (chosen, rejected) = (whole(&p.chosen)?, whole(&p.rejected)?);
            let cut = common(&prompt, &chosen).min(common(&prompt, &rejected));
            let Some(room) = max_length.checked_sub(cut).filter(|r| *r > 0) else {
                invalid!(
                    "pair {}: the prompt is {cut} tokens, no room for a completion within \
                     max_length {max_length}",
                    i + 1
                );
            };
            let completion = |ids: &[u32]| -> Result<Vec<u32>> {
                if ids.len() == cut {
                    invalid!("pair {}: a completion renders to no token", i + 1);
                }
                Ok(ids[cut..ids.len().min(cut + room)].to_vec())
            };
            Ok(TokenPair {
                prompt: prompt[..cut].to_vec(),
                chosen: completion(&chosen)?,
                rejected: completion(&rejected)?,
            })
        })
        .collect()
}

/// The loss of a batch of B pairs from their summed log-probs, with what trl logs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DpoLossOutput {
    /// The mean loss over the pairs.
    pub loss: f64,
    /// Per pair.
    pub losses: Vec<f64>,
    /// β (πc - rc) per pair.
    pub chosen_rewards: Vec<f64>,
    /// β (πr - rr) per pair.
    pub rejected_rewards: Vec<f64>,
    /// ∂loss/∂πc per pair (of the mean loss).
    pub grad_chosen: Vec<f64>,
    /// ∂loss/∂πr per pair (of the mean loss).
    pub grad_rejected: Vec<f64>,
}

/// The summed log-probs of a batch: policy (π) and reference (r) of chosen (c) and
/// rejected (r) completions, and the completions' token counts (IPO normalises by them).
#[derive(Clone, Copy, Debug)]
pub struct PairLogps<'a> {
    /// πc: the policy's summed log-prob of each chosen completion (B).
    pub policy_chosen: &'a [f64],
    /// πr: the policy's summed log-prob of each rejected completion (B).
    pub policy_rejected: &'a [f64],
    /// rc: the reference's summed log-prob of each chosen completion (B).
    pub ref_chosen: &'a [f64],
    /// rr: the reference's summed log-prob of each rejected completion (B).
    pub ref_rejected: &'a [f64],
    /// Tokens in each chosen completion (B).
    pub chosen_lengths: &'a [usize],
    /// Tokens in each rejected completion (B).
    pub rejected_lengths: &'a [usize],
}

/// log σ(x), without overflow.
fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// trl 1.16's DPO loss (`DPOTrainer._compute_loss`) of a batch, its gradient, and the
/// rewards it logs.
pub fn dpo_loss(logps: PairLogps<'_>, config: &DpoConfig) -> DpoLossOutput {
    let n = logps.policy_chosen.len();
    let beta = config.beta;
    let ls = config.label_smoothing;
    let mut out = DpoLossOutput {
        loss: 0.0,
        losses: Vec::with_capacity(n),
        chosen_rewards: Vec::with_capacity(n),
        rejected_rewards: Vec::with_capacity(n),
        grad_chosen: Vec::with_capacity(n),
        grad_rejected: Vec::with_capacity(n),
    };
    for i in 0..n {
        let chosen = logps.policy_chosen[i] - logps.ref_chosen[i];
        let rejected = logps.policy_rejected[i] - logps.ref_rejected[i];
        let d = chosen - rejected;
        // (loss, ∂loss/∂πc, ∂loss/∂πr) of the pair.
        let (loss, gc, gr) = match config.loss_type {
            DpoLoss::Sigmoid => {
                let g = -beta * sigmoid(-beta * d);
                (-log_sigmoid(beta * d), g, -g)
            }
            DpoLoss::Robust => {
                let scale = 1.0 / (1.0 - 2.0 * ls);
                let loss =
                    (-(1.0 - ls) * log_sigmoid(beta * d) + ls * log_sigmoid(-beta * d)) * scale;
                let g = (-(1.0 - ls) * beta * sigmoid(-beta * d) - ls * beta * sigmoid(beta * d))
                    * scale;
                (loss, g, -g)
            }
            DpoLoss::Hinge => {
                let margin = 1.0 - beta * d;
                // relu's gradient at 0 is 0, as torch's.
                let g = if margin > 0.0 { -beta } else { 0.0 };
                (margin.max(0.0), g, -g)
            }
            DpoLoss::Ipo => {
                let lc = logps.chosen_lengths[i].max(1) as f64;
                let lr = logps.rejected_lengths[i].max(1) as f64;
                let z = chosen / lc - rejected / lr - 1.0 / (2.0 * beta);
                (z * z, 2.0 * z / lc, -2.0 * z / lr)
            }
        };
        out.losses.push(loss);
        out.grad_chosen.push(gc / n as f64);
        out.grad_rejected.push(gr / n as f64);
        out.chosen_rewards.push(beta * chosen);
        out.rejected_rewards.push(beta * rejected);
    }
    out.loss = out.losses.iter().sum::<f64>() / n as f64;
    out
}

/// (trl name, value) pairs of a step's statistics.
pub type Metrics = Vec<(&'static str, f64)>;

/// The statistics of a batch under trl's names: `rewards/chosen`, `rewards/rejected`,
/// `rewards/accuracies` (the share of pairs whose chosen reward is strictly higher),
/// `rewards/margins`, `logps/chosen`, `logps/rejected` (means).
pub fn dpo_metrics(out: &DpoLossOutput, logps: PairLogps<'_>) -> Metrics {
    let n = out.losses.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let (c, r) = (&out.chosen_rewards, &out.rejected_rewards);
    let accurate = c.iter().zip(r).filter(|(c, r)| c > r).count() as f64;
    let margins: Vec<f64> = c.iter().zip(r).map(|(c, r)| c - r).collect();
    vec![
        ("rewards/chosen", mean(c)),
        ("rewards/rejected", mean(r)),
        ("rewards/accuracies", accurate / n),
        ("rewards/margins", mean(&margins)),
        ("logps/chosen", mean(logps.policy_chosen)),
        ("logps/rejected", mean(logps.policy_rejected)),
    ]
}

/// The summed log-probs (2B,) of the completions of `pairs`, chosen rows first, as a
/// tensor that back-propagates into the model, and the completions' lengths. Rows are
/// prompt + completion, packed without padding; a completion token's log-prob is the
/// model's prediction of it from the tokens before it.
pub fn completion_logps(
    model: &CausalLm,
    pairs: &[&TokenPair],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, Vec<usize>)> {
    let rows: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
        .chain(
            pairs
                .iter()
                .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
        )
        .collect();
    let seq = rows
        .iter()
        .map(|(p, c)| p.len() + c.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let n = rows.len();
    let mut ids = Vec::with_capacity(n * seq);
    // wanted[row, t] when position t predicts a completion token (t + 1 in the completion):
    // the prompt's and the padding's predictions are never computed.
    let mut wanted = vec![false; n * (seq - 1)];
    for (row, (prompt, completion)) in rows.iter().enumerate() {
        ids.extend_from_slice(prompt);
        ids.extend_from_slice(completion);
        ids.resize((row + 1) * seq, pad);
        let start = prompt.len().max(1) - 1;
        wanted[row * (seq - 1) + start..row * (seq - 1) + prompt.len() + completion.len() - 1]
            .fill(true);
    }
    let lengths = rows.iter().map(|(_, c)| c.len()).collect();
    let targets = next_tokens(&ids, seq, Some(&wanted))?;
    // The rows packed without their padding.
    let row_lengths: Vec<usize> = rows.iter().map(|(p, c)| p.len() + c.len()).collect();
    let (per_token, _) =
        packed_token_logprobs(model, &ids, (n, seq), &row_lengths, &targets, false, device)?; // (2B, T - 1)
    Ok((per_token.sum(1)?, lengths))
}

/// The step counts of a run: micro-batches per epoch, optimizer steps per epoch, and the
/// run's optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DpoPlan {
    /// Micro-batches in one pass over the pairs.
    pub micro_per_epoch: usize,
    /// Optimizer steps in one epoch (`micro_per_epoch / gradient_accumulation_steps`,
    /// rounded up).
    pub steps_per_epoch: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
}

impl DpoPlan {
    /// The plan of `config` on `pairs` pairs; an error when the epochs come to more than
    /// [`MAX_STEPS`] steps.
    pub fn new(config: &DpoConfig, pairs: usize) -> Result<DpoPlan> {
        let micro_per_epoch = pairs.div_ceil(config.per_device_train_batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(config.gradient_accumulation_steps);
        let total_steps = match config.max_steps {
            Some(steps) => steps,
            None => {
                let steps = (config.num_train_epochs * steps_per_epoch as f64).ceil();
                if steps > MAX_STEPS as f64 {
                    invalid!(
                        "{} epochs of {steps_per_epoch} steps are more than {MAX_STEPS} steps",
                        config.num_train_epochs
                    );
                }
                (steps as usize).max(1)
            }
        };
        Ok(DpoPlan {
            micro_per_epoch,
            steps_per_epoch,
            total_steps,
        })
    }
}

/// What one optimizer step measured: the loss and trl's statistics over its pairs.
#[derive(Clone, Debug)]
pub struct DpoStepStats {
    /// Steps done, this one included.
    pub step: usize,
    /// Mean loss over the step's pairs.
    pub loss: f64,
    /// The learning rate the step used.
    pub lr: f32,
    /// The gradients' global L2 norm before clipping.
    pub grad_norm: f32,
    /// (trl name, value): rewards/*, logps/*.
    pub metrics: Metrics,
}

/// The salt of the dropout masks' stream (the pair order's is 0).
const DROPOUT_STREAM: u64 = 0x5eed;

fn position_seed(seed: u64, stream: u64, index: usize) -> u64 {
    lathe_core::seed::derive(seed, stream, (index as u64).wrapping_add(1))
}

/// DPO of LoRA adapters on a model, one optimizer step at a time:
/// [`step`](DpoTrainer::step) runs `gradient_accumulation_steps` micro-batches of pairs
/// through the policy (and the reference, adapters off), the loss and its gradient, then
/// clip, schedule and AdamW update.
pub struct DpoTrainer<'a> {
    model: &'a mut CausalLm,
    pairs: &'a [TokenPair],
    config: DpoConfig,
    device: Device,
    switch: AdapterSwitch,
    lora_config: LoraConfig,
    params: Vec<Tensor>,
    adam: Adam,
    schedule: LrSchedule,
    plan: DpoPlan,
    pad: u32,
    /// The reference's summed log-probs (chosen, rejected) per pair, when precomputed.
    reference: Option<Vec<(f64, f64)>>,
    step: usize,
    order: Vec<usize>,
    order_epoch: usize,
}

impl<'a> DpoTrainer<'a> {
    /// A trainer for `config` on `pairs`: adds fresh adapters to `model` (which must have
    /// none); `pad` fills the right padding of batched rows.
    pub fn new(
        model: &'a mut CausalLm,
        pairs: &'a [TokenPair],
        config: &DpoConfig,
        pad: u32,
        device: &Device,
    ) -> Result<Self> {
        Self::build(model, pairs, config, pad, device, None)
    }

    fn build(
        model: &'a mut CausalLm,
        pairs: &'a [TokenPair],
        config: &DpoConfig,
        pad: u32,
        device: &Device,
        checkpoint: Option<(&Path, &TrainerState)>,
    ) -> Result<Self> {
        config.validate()?;
        if pairs.is_empty() {
            invalid!("no preference pairs to train on");
        }
        let plan = DpoPlan::new(config, pairs.len())?;
        let lora_config = lora_config(
            &model.config(),
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            &config.target_modules,
        );
        let switch = AdapterSwitch::new();
        let step = match checkpoint {
            Some((dir, state)) => {
                let loaded = model.load_lora(dir, &switch)?;
                check_adapters(model, &lora_config, &loaded, dir)?;
                state.step
            }
            None => {
                model.add_lora(&lora_config, &switch, config.seed)?;
                0
            }
        };
        model.set_gradient_checkpointing(config.gradient_checkpointing);
        // The base is final from here on: its forward products read packed panels.
        model.pack_frozen_weights()?;
        let params = model.lora_parameters();
        let mut adam = Adam::new(
            params.clone(),
            AdamConfig::adamw(config.learning_rate, config.weight_decay),
        )?;
        if let Some((dir, state)) = checkpoint {
            let moments =
                crate::run_dir::load_moments(&dir.join(OPTIMIZER_FILE), params.len(), device)?;
            adam.restore(state.adam_step, moments)?;
        }
        let schedule = LrSchedule {
            peak: config.learning_rate,
            warmup_steps: config.warmup_steps,
            total_steps: plan.total_steps,
            kind: config.schedule_kind()?,
        };
        let mut trainer = DpoTrainer {
            model,
            pairs,
            config: config.clone(),
            device: device.clone(),
            switch,
            lora_config,
            params,
            adam,
            schedule,
            plan,
            pad,
            reference: None,
            step,
            order: Vec::new(),
            order_epoch: usize::MAX,
        };
        if config.precompute_ref_log_probs {
            let all: Vec<&TokenPair> = pairs.iter().collect();
            let mut reference = Vec::with_capacity(pairs.len());
            for chunk in all.chunks(config.per_device_train_batch_size) {
                let (c, r) = trainer.reference_logps(chunk)?;
                reference.extend(c.into_iter().zip(r));
            }
            trainer.reference = Some(reference);
        }
        Ok(trainer)
    }

    /// The reference's summed log-probs of `batch` (adapters off, no gradients).
    fn reference_logps(&self, batch: &[&TokenPair]) -> Result<(Vec<f64>, Vec<f64>)> {
        let _no_grad = lathe_core::no_grad();
        let _off = self.switch.disable();
        let (logps, _) = completion_logps(self.model, batch, self.pad, &self.device)?;
        Ok(split_rows(&logps.to_vec_f32()?))
    }

    /// One optimizer step. A NaN/inf loss, gradient norm or parameter is
    /// [`Error::Diverged`], the step not counted.
    pub fn step(&mut self) -> Result<DpoStepStats> {
        let step = self.step;
        let (loss, metrics, mut grads) = self.forward_backward()?;
        let grad_norm = clip_grad_norm(&mut grads, &self.params, self.config.max_grad_norm)?;
        let lr = self.schedule.lr(step);
        let diverged = |what: String| Error::Diverged {
            step: step + 1,
            what,
            lr,
        };
        if !loss.is_finite() {
            return Err(diverged(format!("the loss is {loss}")));
        }
        if !grad_norm.is_finite() {
            return Err(diverged(format!("the gradient norm is {grad_norm}")));
        }
        self.adam.set_lr(lr);
        self.adam.step(&grads)?;
        if let Some(i) = lathe_core::first_diverged(&self.params)? {
            return Err(diverged(format!(
                "LoRA parameter {i} {:?} holds NaN/inf or a value beyond 1.8e19 after the update",
                self.params[i].shape()
            )));
        }
        self.step += 1;
        Ok(DpoStepStats {
            step: self.step,
            loss,
            lr,
            grad_norm,
            metrics,
        })
    }

    /// The step's micro-batches: the loss and statistics over all its pairs, and the
    /// gradients summed (each micro-batch weighed by its share of the step's pairs).
    fn forward_backward(&mut self) -> Result<(f64, Metrics, GradStore)> {
        let (batch_size, accum, seed) = (
            self.config.per_device_train_batch_size,
            self.config.gradient_accumulation_steps,
            self.config.seed,
        );
        let mut grads: Option<GradStore> = None;
        let mut tally = DpoLossOutput::default();
        let (mut policy_chosen, mut policy_rejected) = (Vec::new(), Vec::new());
        for micro in 0..accum {
            let global = self.step * accum + micro;
            let (epoch, index) = (
                global / self.plan.micro_per_epoch,
                global % self.plan.micro_per_epoch,
            );
            if epoch != self.order_epoch {
                self.order = Rng::new(position_seed(seed, 0, epoch)).permutation(self.pairs.len());
                self.order_epoch = epoch;
            }
            let chosen: Vec<usize> = self.order
                [index * batch_size..((index + 1) * batch_size).min(self.order.len())]
                .to_vec();
            let batch: Vec<&TokenPair> = chosen.iter().map(|&i| &self.pairs[i]).collect();
            let (ref_c, ref_r) = match &self.reference {
                Some(all) => chosen.iter().map(|&i| all[i]).unzip(),
                None => self.reference_logps(&batch)?,
            };
            self.switch
                .train(position_seed(seed, DROPOUT_STREAM, global));
            let (logps, lengths) = completion_logps(self.model, &batch, self.pad, &self.device)?;
            let (pol_c, pol_r) = split_rows(&logps.to_vec_f32()?);
            let n = batch.len();
            let out = dpo_loss(
                PairLogps {
                    policy_chosen: &pol_c,
                    policy_rejected: &pol_r,
                    ref_chosen: &ref_c,
                    ref_rejected: &ref_r,
                    chosen_lengths: &lengths[..n],
                    rejected_lengths: &lengths[n..],
                },
                &self.config,
            );
            // ∂(step loss)/∂logp: this micro-batch's mean-loss gradient, weighed by its share.
            let weight = n as f64 / (batch_size * accum) as f64;
            let upstream: Vec<f32> = out
                .grad_chosen
                .iter()
                .chain(&out.grad_rejected)
                .map(|g| (g * weight) as f32)
                .collect();
            let upstream = Tensor::from_vec(upstream, &[2 * n], &self.device)?;
            let micro_grads = logps.mul(&upstream)?.sum_all()?.backward()?;
            grads = Some(GradStore::accumulate(grads, micro_grads, &self.params)?);
            tally.losses.extend(out.losses);
            tally.chosen_rewards.extend(out.chosen_rewards);
            tally.rejected_rewards.extend(out.rejected_rewards);
            policy_chosen.extend(pol_c);
            policy_rejected.extend(pol_r);
        }
        tally.loss = tally.losses.iter().sum::<f64>() / tally.losses.len() as f64;
        let metrics = dpo_metrics(
            &tally,
            PairLogps {
                policy_chosen: &policy_chosen,
                policy_rejected: &policy_rejected,
                ref_chosen: &[],
                ref_rejected: &[],
                chosen_lengths: &[],
                rejected_lengths: &[],
            },
        );
        let grads = grads.expect("gradient_accumulation_steps >= 1");
        Ok((tally.loss, metrics, grads))
    }

    /// Optimizer steps done.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Whether the run's steps are all done.
    pub fn done(&self) -> bool {
        self.step >= self.plan.total_steps
    }

    /// The run's step counts.
    pub fn plan(&self) -> DpoPlan {
        self.plan
    }

    /// The policy being trained, its adapters attached.
    pub fn model(&self) -> &CausalLm {
        self.model
    }

    /// The switch of the policy's adapters (off: the reference).
    pub fn switch(&self) -> &AdapterSwitch {
        &self.switch
    }

    /// The AdamW optimizer with its moments and step count.
    pub fn optimizer(&self) -> &Adam {
        &self.adam
    }
}

/// (2B,) values, chosen rows first, as (chosen, rejected) in f64.
fn split_rows(values: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let n = values.len() / 2;
    let as_f64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect();
    (as_f64(&values[..n]), as_f64(&values[n..]))
}

/// The trainer state of a DPO checkpoint.
#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    adam_step: u64,
    config: DpoConfig,
    #[serde(default)]
    inputs: Option<Fingerprints>,
}

/// sha256 of the tokenized pairs.
pub fn pairs_fingerprint(pairs: &[TokenPair]) -> String {
    let mut bytes = Vec::new();
    for p in pairs {
        for ids in [&p.prompt, &p.chosen, &p.rejected] {
            bytes.extend((ids.len() as u64).to_le_bytes());
            bytes.extend(ids.iter().flat_map(|t| t.to_le_bytes()));
        }
    }
    crate::resume::bytes_fingerprint(&bytes)
}

/// One step of a [`DpoRun`] as metrics.jsonl records it.
#[derive(Clone, Debug)]
pub struct DpoRecord {
    /// The trainer's measurements of the step.
    pub stats: DpoStepStats,
    /// The JSON line written to metrics.jsonl.
    pub json: serde_json::Value,
}

/// What a finished (or interrupted) DPO run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DpoSummary {
    /// Optimizer steps done, a resumed run's earlier ones included.
    pub steps: usize,
    /// Loss of each step (a resumed run's earlier steps as metrics.jsonl recorded them).
    pub losses: Vec<f64>,
    /// Mean `rewards/margins` (chosen minus rejected reward) of each step.
    pub margins: Vec<f64>,
    /// The checkpoint step this run resumed from (None: a fresh run).
    pub resumed_from: Option<usize>,
    /// Stopped by Ctrl-C after saving a checkpoint.
    pub interrupted: bool,
}

/// A [`DpoTrainer`] in a run folder `out` (lathe-train's [`RunDir`], as SFT's and PPO's):
/// `metrics.jsonl` (a line a step, trl's names), `checkpoint/` (adapter, optimizer, state)
/// when due, and at the end the adapter (peft files) and `run.json`. When `out/checkpoint`
/// exists the run resumes from it, exactly, after the same checks as SFT's.
pub struct DpoRun<'a> {
    trainer: DpoTrainer<'a>,
    run: RunDir,
    inputs: Fingerprints,
    start_step: usize,
    metrics: Option<File>,
    summary: DpoSummary,
    started: Instant,
}

impl<'a> DpoRun<'a> {
    /// Opens (resumes, or starts) the run in `out`.
    pub fn open(
        model: &'a mut CausalLm,
        pairs: &'a [TokenPair],
        config: &DpoConfig,
        pad: u32,
        out: &Path,
        device: &Device,
        options: &ResumeOptions,
    ) -> Result<Self> {
        config.validate()?;
        let total_steps = DpoPlan::new(config, pairs.len())?.total_steps;
        let inputs = Fingerprints {
            model: options.model.clone(),
            data: Some(pairs_fingerprint(pairs)),
            reward: None,
        };
        let run = RunDir::new(out, "dpo");
        let trainer = match run.checkpoint_to_resume() {
            Some(dir) => {
                let state: TrainerState = run.read_state(&dir)?;
                run.check_step(&dir, state.step, state.config == *config, total_steps)?;
                if state.adam_step != state.step as u64 {
                    return Err(crate::run_dir::damaged_state(
                        &dir,
                        format!(
                            "the optimizer has taken {} steps at step {} (a DPO run takes one \
                             per step)",
                            state.adam_step, state.step
                        ),
                    ));
                }
                run.check_logged(&dir, state.step)?;
                crate::resume::check(
                    "dpo",
                    &dir,
                    state.inputs.as_ref(),
                    &inputs,
                    &serde_json::to_value(&state.config)?,
                    &serde_json::to_value(config)?,
                    options.anyway,
                )?;
                DpoTrainer::build(model, pairs, config, pad, device, Some((&dir, &state)))?
            }
            None => DpoTrainer::build(model, pairs, config, pad, device, None)?,
        };
        run.create()?;
        let start_step = trainer.steps_done();
        let mut summary = DpoSummary {
            steps: total_steps,
            resumed_from: (start_step > 0).then_some(start_step),
            ..DpoSummary::default()
        };
        if start_step > 0 {
            for r in crate::run_dir::read_jsonl(&run.metrics())? {
                if r["step"].as_u64().is_some_and(|s| s as usize <= start_step) {
                    summary.losses.push(r["loss"].as_f64().unwrap_or(f64::NAN));
                    summary
                        .margins
                        .push(r["rewards/margins"].as_f64().unwrap_or(f64::NAN));
                }
            }
        }
        let metrics = if start_step < total_steps {
            Some(run.reopen_log(crate::run_dir::METRICS_FILE, start_step)?)
        } else {
            None
        };
        Ok(DpoRun {
            trainer,
            run,
            inputs,
            start_step,
            metrics,
            summary,
            started: Instant::now(),
        })
    }

    /// The run's trainer.
    pub fn trainer(&self) -> &DpoTrainer<'a> {
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
        self.start_step >= self.trainer.plan.total_steps
            && self.run.path().join("run.json").is_file()
    }

    /// One step, its line appended to metrics.jsonl.
    pub fn step(&mut self) -> Result<DpoRecord> {
        let stats = self.trainer.step()?;
        let done = stats.step;
        let plan = self.trainer.plan;
        let mut json = json!({
            "step": done, "epoch": done as f64 / plan.steps_per_epoch as f64,
            "loss": stats.loss, "learning_rate": stats.lr, "grad_norm": stats.grad_norm,
            "elapsed_s": self.started.elapsed().as_secs_f64(),
        });
        for (name, value) in &stats.metrics {
            json[*name] = json!(value);
        }
        let metrics = self
            .metrics
            .as_mut()
            .expect("a run with steps to do has its metrics open");
        crate::run_dir::append_jsonl(metrics, &json)?;
        metrics.flush()?;
        self.summary.losses.push(stats.loss);
        self.summary
            .margins
            .push(json["rewards/margins"].as_f64().unwrap_or(f64::NAN));
        Ok(DpoRecord { stats, json })
    }

    /// Whether the step just done is one to checkpoint: every `save_steps` and the last.
    pub fn checkpoint_due(&self) -> bool {
        let done = self.trainer.step;
        let every = self.trainer.config.save_steps;
        done == self.trainer.plan.total_steps || (every > 0 && done.is_multiple_of(every))
    }

    /// Writes `out/checkpoint` (adapter, optimizer moments, trainer state).
    pub fn save_checkpoint(&self) -> Result<()> {
        let trainer = &self.trainer;
        self.run.save_checkpoint(|temp| -> Result<()> {
            trainer.model.save_lora(temp, &trainer.lora_config)?;
            crate::run_dir::save_moments(&trainer.adam, &temp.join(OPTIMIZER_FILE))?;
            let state = TrainerState {
                step: trainer.step,
                adam_step: trainer.adam.step_count(),
                config: trainer.config.clone(),
                inputs: Some(self.inputs.clone()),
            };
            crate::run_dir::write_state(temp, &state)
        })
    }

    /// What the run has done so far.
    pub fn summary(&self) -> &DpoSummary {
        &self.summary
    }

    /// The summary of a run stopped (Ctrl-C) after its checkpoint.
    pub fn interrupted(mut self) -> DpoSummary {
        self.summary.interrupted = true;
        self.summary.steps = self.trainer.step;
        self.summary
    }

    /// Ends the run: the adapter (peft files) and `run.json` written into `out` (only once
    /// both are written); a finished run's outputs are kept as they are.
    pub fn finish(self) -> Result<DpoSummary> {
        if self.already_finished() {
            return Ok(self.summary);
        }
        self.trainer.switch.eval();
        let trainer = &self.trainer;
        let summary = &self.summary;
        self.run.save_final(|dir| -> Result<()> {
            trainer.model.save_lora(dir, &trainer.lora_config)?;
            std::fs::write(
                dir.join("run.json"),
                serde_json::to_string_pretty(
                    &json!({ "config": trainer.config, "summary": summary }),
                )?,
            )?;
            Ok(())
        })?;
        Ok(self.summary)
    }
}
