//! Supervised LoRA fine-tuning of a causal LM on text (the seed's step 1).
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
//!
//! Data parallel (a [`Collective`] of N ranks, e.g. `mpirun -np N`): a step is
//! `grad_accum x N` micro-batches of the one seeded block order; rank r computes micro-batches
//! `r * grad_accum ..` of them, and the gradients and losses are summed over ranks in rank
//! order. So N ranks with `grad_accum = 1` give the bits of one process with
//! `grad_accum = N` (the same micro-batches, added in the same order); with a larger
//! `grad_accum` the sums are regrouped, equal to f32 rounding. Rank 0 writes the run folder.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lathe_core::collective::{all_reduce_grads, check_same_inputs, sum_in_rank_order};
use lathe_core::optim::{Adam, AdamConfig};
use lathe_core::{clip_grad_norm, Device, GradStore, LrSchedule, ScheduleKind, Tensor};
use lathe_core::{Collective, Rng, Solo};
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::attention::TokenLayout;
use lathe_models::chat::{tokenize_conversation, ChatTemplate, Message};
use lathe_models::config::ModelConfig;
use lathe_models::generate::IGNORE;
use lathe_models::hf::CausalLm;
use lathe_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::resume::{Fingerprints, ResumeOptions};
use crate::run_dir::{RunDir, OPTIMIZER_FILE};
use crate::{invalid, Error, Result};

/// Everything that shapes a run (written to `run.json`; a resume must match it). Also the
/// keys of `lathe sft --config FILE.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    /// Tokens in a training block (2..=[`MAX_COUNT`]).
    pub block_size: usize,
    /// Blocks in a micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub grad_accum: usize,
    /// Passes over the training blocks; ignored when `max_steps` is set.
    pub epochs: f64,
    /// Optimizer steps to run (None: `epochs` of them); 0 is an error.
    pub max_steps: Option<usize>,
    /// Peak learning rate of AdamW.
    pub lr: f32,
    /// AdamW's decoupled weight decay (>= 0).
    pub weight_decay: f32,
    /// Steps of linear warmup from 0 to `lr`.
    pub warmup_steps: usize,
    /// Learning-rate schedule after warmup: "constant", "linear" or "cosine".
    pub schedule: String,
    /// Gradients are clipped to this global L2 norm (> 0; inf: no clipping).
    pub max_grad_norm: f32,
    /// LoRA rank (>= 1).
    pub lora_r: usize,
    /// LoRA scale numerator: the update is scaled by `lora_alpha / lora_r`.
    pub lora_alpha: f64,
    /// Dropout on the adapters' input, in [0, 1).
    pub lora_dropout: f64,
    /// Empty: the architecture's default (GPT-NeoX query_key_value, Llama q_proj, v_proj).
    pub target_modules: Vec<String>,
    /// Recompute activations in the backward pass instead of keeping them (less memory).
    pub gradient_checkpointing: bool,
    /// Fraction of the blocks held out for evaluation, in [0, 1).
    pub eval_fraction: f64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Seed of everything random: block order, dropout masks, adapter init.
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
    /// `schedule` parsed; an error names the accepted values.
    pub fn schedule_kind(&self) -> Result<ScheduleKind> {
        Ok(match self.schedule.as_str() {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            other => invalid!("unknown schedule {other:?} (constant, linear, cosine)"),
        })
    }

    /// The LoRA config for `model` (default targets by architecture).
    pub fn lora_config(&self, model: &ModelConfig) -> LoraConfig {
        lora_config(
            model,
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            &self.target_modules,
        )
    }

    /// Checks every setting against its meaning; the error names the key and its range.
    /// `max_steps = 0` is an error (transformers reads max_steps <= 0 as "not set" and
    /// trains for the epochs instead: lathe says so rather than guessing); `max_grad_norm`
    /// must be > 0 (inf: no clipping).
    pub fn validate(&self) -> Result<()> {
        if !(2..=MAX_COUNT).contains(&self.block_size) {
            invalid!(
                "block_size must be in 2..={MAX_COUNT}, got {}",
                self.block_size
            );
        }
        for (name, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
        ] {
            if !(1..=MAX_COUNT).contains(&v) {
                invalid!("{name} must be in 1..={MAX_COUNT}, got {v}");
            }
        }
        if let Some(steps) = self.max_steps {
            if !(1..=MAX_STEPS).contains(&steps) {
                invalid!(
                    "max_steps must be in 1..={MAX_STEPS}, got {steps} (leave it out to train \
                     for `epochs`)"
                );
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            invalid!("lr must be finite and > 0, got {}", self.lr);
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
        if !(0.0..1.0).contains(&self.eval_fraction) {
            invalid!(
                "eval_fraction must be in [0, 1), got {}",
                self.eval_fraction
            );
        }
        if self.max_steps.is_none() && !(self.epochs.is_finite() && self.epochs > 0.0) {
            invalid!(
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
        invalid!("lora_r must be >= 1 (and at most the adapted layers' width), got 0");
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        invalid!("lora_alpha must be finite and > 0, got {alpha}");
    }
    if !(0.0..1.0).contains(&dropout) {
        invalid!("lora_dropout must be in [0, 1), got {dropout}");
    }
    Ok(())
}

/// The LoRA config of a run's settings on `model`: `targets`, or the architecture's default
/// targets when empty.
pub fn lora_config(
    model: &ModelConfig,
    r: usize,
    alpha: f64,
    dropout: f64,
    targets: &[String],
) -> LoraConfig {
    let targets: Vec<&str> = if targets.is_empty() {
        model.default_lora_targets().to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    let mut config = LoraConfig::new(r, alpha, &targets);
    config.lora_dropout = dropout;
    config
}

/// Set on a token id in a block: the token is read but not predicted (the system and user
/// turns of a conversation trained with `assistant_only_loss`). Token ids stay below 2^31.
pub const NO_LOSS: u32 = 1 << 31;

/// Token blocks for training and held-out evaluation. A token with [`NO_LOSS`] set is
/// context only.
#[derive(Clone, Debug)]
pub struct Blocks {
    /// Tokens in every block.
    pub block_size: usize,
    /// Training blocks, each `block_size` token ids.
    pub train: Vec<Vec<u32>>,
    /// Held-out blocks for evaluation (may be empty).
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
    split_blocks(stream, block_size, eval_fraction)
}

/// lathe-data's turns as the chat template takes them.
pub fn chat_messages(turns: &[lathe_data::Message]) -> Vec<Message> {
    turns
        .iter()
        .map(|m| Message::new(m.role.as_str(), m.content.as_str()))
        .collect()
}

/// Conversations (trl's `{"messages": [...]}` records) rendered with the model's chat
/// `template`, tokenized without added special tokens (the template writes them; no EOS is
/// appended: the turns end with the template's own end-of-turn token), concatenated and cut
/// as [`pack`] does. With `assistant_only_loss` (trl's setting of that name) only the
/// assistant's turns are predicted, the rest is marked [`NO_LOSS`]; a block with nothing to
/// predict is left out.
pub fn pack_conversations(
    conversations: &[Vec<Message>],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    block_size: usize,
    eval_fraction: f64,
    assistant_only_loss: bool,
) -> Result<Blocks> {
    let mut stream = Vec::new();
    for (i, messages) in conversations.iter().enumerate() {
        let tokens = tokenize_conversation(tokenizer, template, messages)
            .map_err(|e| Error::Invalid(format!("conversation {}: {e}", i + 1)))?;
        if assistant_only_loss && !tokens.assistant_mask.contains(&true) {
            invalid!(
                "conversation {} has no assistant turn to learn (assistant_only_loss)",
                i + 1
            );
        }
        stream.extend(
            tokens
                .ids
                .iter()
                .zip(&tokens.assistant_mask)
                .map(|(&id, &learn)| {
                    if learn || !assistant_only_loss {
                        id
                    } else {
                        id | NO_LOSS
                    }
                }),
        );
    }
    let mut blocks = split_blocks(stream, block_size, eval_fraction)?;
    let predicts = |block: &Vec<u32>| block[1..].iter().any(|&id| id & NO_LOSS == 0);
    blocks.train.retain(predicts);
    blocks.eval.retain(predicts);
    if blocks.train.is_empty() {
        invalid!("no training block has an assistant token to predict: use a larger --block-size");
    }
    Ok(blocks)
}

/// Cuts a token stream into blocks and holds out the last `eval_fraction` of them.
fn split_blocks(stream: Vec<u32>, block_size: usize, eval_fraction: f64) -> Result<Blocks> {
    let blocks: Vec<Vec<u32>> = stream
        .chunks_exact(block_size)
        .map(<[u32]>::to_vec)
        .collect();
    if blocks.is_empty() {
        invalid!(
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

/// The salt of the dropout masks' stream (the block order's is 0).
const DROPOUT_STREAM: u64 = 0x5eed;

/// The seed of position `index` of a stream (positions are 1-based in the seeds, as the
/// runs written so far have them).
fn position_seed(seed: u64, stream: u64, index: usize) -> u64 {
    lathe_core::seed::derive(seed, stream, (index as u64).wrapping_add(1))
}

/// The causal-LM loss of a batch of equal-length blocks (B, T): mean over the B (T - 1)
/// next-token predictions, less those of [`NO_LOSS`] tokens.
pub fn block_loss(model: &CausalLm, blocks: &[&Vec<u32>], device: &Device) -> Result<Tensor> {
    let (b, t) = (blocks.len(), blocks[0].len());
    let flat: Vec<u32> = blocks.iter().flat_map(|x| x.iter().copied()).collect();
    let masked = flat.iter().any(|&id| id & NO_LOSS != 0);
    let inputs: Vec<u32> = flat.iter().map(|&id| id & !NO_LOSS).collect();
    let ids = Tensor::from_vec(inputs, &[b, t], device)?;
    let layout = TokenLayout::contiguous(b, t, 0, device)?;
    let hidden = model.forward_hidden(&ids, &layout, None)?; // (B, T, H)
    let h = hidden.shape()[2];
    let predicting = hidden.narrow(1, 0, t - 1)?.reshape(&[b * (t - 1), h])?;
    if !masked {
        let targets = ids.narrow(1, 1, t - 1)?.reshape(&[b * (t - 1)])?;
        return Ok(model.lm_head_loss(&predicting, &targets, None)?);
    }
    // (B (T - 1),): the next token, or IGNORE where it is context only.
    let targets: Vec<u32> = flat
        .chunks_exact(t)
        .flat_map(|block| block[1..].iter())
        .map(|&id| if id & NO_LOSS != 0 { IGNORE } else { id })
        .collect();
    let targets = Tensor::from_vec(targets, &[b * (t - 1)], device)?;
    Ok(model.lm_head_loss(&predicting, &targets, Some(IGNORE))?)
}

/// Mean loss over the held-out blocks (adapters on, no dropout, no gradients).
pub fn eval_loss(
    model: &CausalLm,
    switch: &AdapterSwitch,
    blocks: &[Vec<u32>],
    batch: usize,
    device: &Device,
) -> Result<Option<f32>> {
    eval_loss_on_ranks(model, switch, blocks, batch, device, &Solo)
}

/// [`eval_loss`] shared by the ranks of `collective`: batch i is rank (i mod N)'s, and the
/// batches' losses are added in batch order, so every rank count gives the same bits.
fn eval_loss_on_ranks(
    model: &CausalLm,
    switch: &AdapterSwitch,
    blocks: &[Vec<u32>],
    batch: usize,
    device: &Device,
    collective: &dyn Collective,
) -> Result<Option<f32>> {
    if blocks.is_empty() {
        return Ok(None);
    }
    let _no_grad = lathe_core::no_grad();
    let seed = switch.dropout_seed();
    switch.eval();
    let (rank, ranks) = (collective.rank(), collective.size());
    // (batches,): loss x blocks of this rank's batches, 0 elsewhere.
    let mut sums = vec![0.0f64; blocks.len().div_ceil(batch)];
    for (i, chunk) in blocks.chunks(batch).enumerate() {
        if i % ranks == rank {
            let refs: Vec<&Vec<u32>> = chunk.iter().collect();
            sums[i] = block_loss(model, &refs, device)?.to_scalar()? as f64 * chunk.len() as f64;
        }
    }
    let all = collective.all_gather_f64(&sums)?;
    let mut total = 0.0f64;
    for i in 0..sums.len() {
        total += all[(i % ranks) * sums.len() + i];
    }
    if let Some(seed) = seed {
        switch.train(seed);
    }
    Ok(Some((total / blocks.len() as f64) as f32))
}

/// What a finished run measured.
#[derive(Clone, Debug, Serialize)]
pub struct SftSummary {
    /// Optimizer steps done, a resumed run's earlier ones included.
    pub steps: usize,
    /// Training loss of each step of the run (a resumed run's earlier steps as
    /// metrics.jsonl recorded them).
    pub losses: Vec<f32>,
    /// (step, held-out loss) at each evaluation.
    pub eval_losses: Vec<(usize, f32)>,
    /// Training throughput of this process's steps, in tokens per second.
    pub tokens_per_s: f64,
    /// The checkpoint step this run resumed from (None: a fresh run).
    pub resumed_from: Option<usize>,
    /// Stopped by Ctrl-C after saving a checkpoint.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

/// The trainer state of an SFT checkpoint (`trainer_state.json`).
#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    adam_step: u64,
    config: SftConfig,
    /// The run's inputs; absent in checkpoints of older versions.
    #[serde(default)]
    inputs: Option<Fingerprints>,
    /// The processes that trained it (1 in checkpoints of older versions).
    #[serde(default = "one")]
    ranks: usize,
}

fn one() -> usize {
    1
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
    run: &RunDir,
    dir: &Path,
    config: &SftConfig,
    total_steps: usize,
) -> Result<TrainerState> {
    let state: TrainerState = run.read_state(dir)?;
    run.check_step(dir, state.step, state.config == *config, total_steps)?;
    // One optimizer update per step, always (accumulation sums micro-batches first).
    if state.adam_step != state.step as u64 {
        return Err(crate::run_dir::damaged_state(
            dir,
            format!(
                "the optimizer has taken {} steps at step {} (an SFT run takes one per step)",
                state.adam_step, state.step
            ),
        ));
    }
    run.check_logged(dir, state.step)?;
    Ok(state)
}

/// The step counts of a run: micro-batches per epoch, optimizer steps per epoch, and the
/// run's optimizer steps (`max_steps`, or `epochs` of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Micro-batches in one pass over the training blocks.
    pub micro_per_epoch: usize,
    /// Optimizer steps in one epoch (`micro_per_epoch / (grad_accum x ranks)`, rounded up).
    pub steps_per_epoch: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
}

impl StepPlan {
    /// The plan of `config` (validated) on `blocks`, in one process.
    pub fn new(config: &SftConfig, blocks: &Blocks) -> Result<StepPlan> {
        Self::on_ranks(config, blocks, 1)
    }

    /// The plan of `config` on `blocks` for `ranks` data-parallel processes: a step takes
    /// `grad_accum x ranks` micro-batches.
    pub fn on_ranks(config: &SftConfig, blocks: &Blocks, ranks: usize) -> Result<StepPlan> {
        let micro_per_epoch = blocks.train.len().div_ceil(config.batch_size);
        let steps_per_epoch = micro_per_epoch.div_ceil(config.grad_accum * ranks.max(1));
        let total_steps = match config.max_steps {
            Some(steps) => steps,
            None => {
                let steps = (config.epochs * steps_per_epoch as f64).ceil();
                if steps > MAX_STEPS as f64 {
                    invalid!(
                        "{} epochs of {steps_per_epoch} steps are more than {MAX_STEPS} steps",
                        config.epochs
                    );
                }
                (steps as usize).max(1)
            }
        };
        Ok(StepPlan {
            micro_per_epoch,
            steps_per_epoch,
            total_steps,
        })
    }
}

/// What one optimizer step measured.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// The steps done, this one included (1 after the first).
    pub step: usize,
    /// Mean loss over the step's blocks.
    pub loss: f32,
    /// The learning rate the step used.
    pub lr: f32,
    /// The gradients' global L2 norm before clipping.
    pub grad_norm: f32,
    /// Tokens in the step's blocks (on every rank).
    pub tokens: usize,
    /// f32 values this rank sent to reduce the step's gradients (0 in one process).
    pub reduced_values: usize,
}

/// Where a trainer starts: fresh adapters, or a checkpoint's adapters and moments.
enum Start<'a> {
    Fresh,
    Checkpoint {
        dir: &'a Path,
        state: &'a TrainerState,
    },
}

/// SFT of LoRA adapters on a model, one optimizer step at a time:
/// [`step`](SftTrainer::step) is forward and loss, backward, clip, schedule and AdamW update,
/// over `grad_accum` micro-batches of `batch_size` blocks.
///
/// Everything random is a function of the seed and a position: the block order of epoch e
/// of (seed, e), the dropout masks of micro-batch g of (seed, g), A's init of (seed, layer).
pub struct SftTrainer<'a> {
    model: &'a mut CausalLm,
    blocks: &'a Blocks,
    config: SftConfig,
    device: Device,
    switch: AdapterSwitch,
    lora_config: LoraConfig,
    params: Vec<Tensor>,
    adam: Adam,
    schedule: LrSchedule,
    plan: StepPlan,
    /// Optimizer steps done.
    step: usize,
    /// The block order of the epoch `order_epoch`.
    order: Vec<usize>,
    order_epoch: usize,
    /// The processes training together ([`Solo`] in one process).
    collective: Arc<dyn Collective>,
}

impl<'a> SftTrainer<'a> {
    /// A trainer for `config` on `blocks`: adds fresh adapters to `model` (which must have
    /// none) and turns on gradient checkpointing as the config says.
    pub fn new(
        model: &'a mut CausalLm,
        blocks: &'a Blocks,
        config: &SftConfig,
        device: &Device,
    ) -> Result<Self> {
        Self::data_parallel(model, blocks, config, device, Arc::new(Solo))
    }

    /// [`new`](SftTrainer::new) as one of the ranks of `collective`: every rank builds the
    /// same trainer (the same seed, the same adapters), takes its share of each step's
    /// micro-batches, and applies the gradients summed over all ranks.
    pub fn data_parallel(
        model: &'a mut CausalLm,
        blocks: &'a Blocks,
        config: &SftConfig,
        device: &Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        check_settings(config, blocks)?;
        Self::build(model, blocks, config, device, Start::Fresh, collective)
    }

    fn build(
        model: &'a mut CausalLm,
        blocks: &'a Blocks,
        config: &SftConfig,
        device: &Device,
        start: Start<'_>,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        let plan = StepPlan::on_ranks(config, blocks, collective.size())?;
        let lora_config = config.lora_config(&model.config());
        let switch = AdapterSwitch::new();
        let (step, adam_state) = match start {
            Start::Checkpoint { dir, state } => {
                let loaded = model.load_lora(dir, &switch)?;
                check_adapters(model, &lora_config, &loaded, dir)?;
                (
                    state.step,
                    Some((state.adam_step, dir.join(OPTIMIZER_FILE))),
                )
            }
            Start::Fresh => {
                model.add_lora(&lora_config, &switch, config.seed)?;
                (0, None)
            }
        };
        model.set_gradient_checkpointing(config.gradient_checkpointing);
        // The base is final from here on: its forward products read packed panels.
        model.pack_frozen_weights()?;
        let params = model.lora_parameters();
        let mut adam = Adam::new(
            params.clone(),
            AdamConfig::adamw(config.lr, config.weight_decay),
        )?;
        if let Some((adam_step, path)) = adam_state {
            let moments = crate::run_dir::load_moments(&path, params.len(), device)?;
            adam.restore(adam_step, moments)?;
        }
        let schedule = LrSchedule {
            peak: config.lr,
            warmup_steps: config.warmup_steps,
            total_steps: plan.total_steps,
            kind: config.schedule_kind()?,
        };
        Ok(SftTrainer {
            model,
            blocks,
            config: config.clone(),
            device: device.clone(),
            switch,
            lora_config,
            params,
            adam,
            schedule,
            plan,
            step,
            order: Vec::new(),
            order_epoch: usize::MAX,
            collective,
        })
    }

    /// One optimizer step: forward and loss, backward (summed over the micro-batches),
    /// clip, learning rate, update. A NaN/inf loss, gradient norm or parameter is
    /// [`Error::Diverged`], the step not counted.
    pub fn step(&mut self) -> Result<StepStats> {
        let step = self.step;
        let (loss, mut grads, tokens, reduced_values) = self.forward_backward()?;
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
        Ok(StepStats {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens,
            reduced_values,
        })
    }

    /// This rank's micro-batches of the step through the model and back, summed over the
    /// ranks: the mean loss over the step's blocks, the summed gradients (each micro-batch's
    /// mean loss weighed by its share of the step's blocks), the tokens seen and the f32
    /// values sent for the reduction.
    fn forward_backward(&mut self) -> Result<(f32, GradStore, usize, usize)> {
        let config = &self.config;
        let ranks = self.collective.size();
        // The step's micro-batches, rank-major: rank r takes slots r * grad_accum ...
        let micro_per_step = config.grad_accum * ranks;
        let first_slot = self.step * micro_per_step + self.collective.rank() * config.grad_accum;
        let mut grads: Option<GradStore> = None;
        let mut step_loss = 0.0f64;
        let mut step_blocks = 0usize;
        let mut tokens = 0usize;
        for micro in 0..config.grad_accum {
            let global = first_slot + micro;
            let per_epoch = self.plan.micro_per_epoch;
            let (epoch, index) = (global / per_epoch, global % per_epoch);
            if epoch != self.order_epoch {
                self.order = Rng::new(position_seed(config.seed, 0, epoch))
                    .permutation(self.blocks.train.len());
                self.order_epoch = epoch;
            }
            let order = &self.order;
            let batch: Vec<&Vec<u32>> = order
                [index * config.batch_size..((index + 1) * config.batch_size).min(order.len())]
                .iter()
                .map(|&i| &self.blocks.train[i])
                .collect();
            self.switch
                .train(position_seed(config.seed, DROPOUT_STREAM, global));
            let loss = block_loss(self.model, &batch, &self.device)?;
            let weight = batch.len() as f32 / (config.batch_size * micro_per_step) as f32;
            let micro_grads = loss.affine(weight, 0.0)?.backward()?;
            step_loss += loss.to_scalar()? as f64 * batch.len() as f64;
            step_blocks += batch.len();
            tokens += batch.len() * config.block_size;
            grads = Some(GradStore::accumulate(grads, micro_grads, &self.params)?);
        }
        let grads = grads.expect("grad_accum >= 1");
        let (grads, reduced_values) = all_reduce_grads(&*self.collective, grads, &self.params)?;
        let totals = sum_in_rank_order(
            &*self.collective,
            &[step_loss, step_blocks as f64, tokens as f64],
        )?;
        let (step_loss, step_blocks, tokens) = (totals[0], totals[1], totals[2] as usize);
        Ok((
            (step_loss / step_blocks) as f32,
            grads,
            tokens,
            reduced_values,
        ))
    }

    /// Mean loss over the held-out blocks (None without any); dropout off meanwhile. With
    /// several ranks each takes every N-th batch.
    pub fn eval_loss(&self) -> Result<Option<f32>> {
        eval_loss_on_ranks(
            self.model,
            &self.switch,
            &self.blocks.eval,
            self.config.batch_size,
            &self.device,
            &*self.collective,
        )
    }

    /// The processes training together.
    pub fn collective(&self) -> &dyn Collective {
        &*self.collective
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
    pub fn plan(&self) -> StepPlan {
        self.plan
    }

    /// The settings the trainer was built with.
    pub fn config(&self) -> &SftConfig {
        &self.config
    }

    /// The adapters' settings (rank, alpha, dropout, the resolved target modules).
    pub fn lora_config(&self) -> &LoraConfig {
        &self.lora_config
    }

    /// The model being trained, its adapters attached.
    pub fn model(&self) -> &CausalLm {
        self.model
    }

    /// The AdamW optimizer with its moments and step count.
    pub fn optimizer(&self) -> &Adam {
        &self.adam
    }

    /// Turns the adapters' dropout off (the model as it is used after training).
    pub fn eval_mode(&self) {
        self.switch.eval();
    }
}

/// The settings' own checks and the blocks' size against them.
fn check_settings(config: &SftConfig, blocks: &Blocks) -> Result<()> {
    config.validate()?;
    if blocks.block_size != config.block_size {
        invalid!(
            "blocks of {} tokens for a config of {}",
            blocks.block_size,
            config.block_size
        );
    }
    Ok(())
}

/// One step of an [`SftRun`] as metrics.jsonl records it.
#[derive(Clone, Debug)]
pub struct StepRecord {
    /// The trainer's measurements of the step.
    pub stats: StepStats,
    /// The held-out loss, when this step evaluated.
    pub eval_loss: Option<f32>,
    /// Tokens per second since the run (this session of it) started.
    pub tokens_per_s: f64,
    /// The JSON line written to metrics.jsonl.
    pub json: serde_json::Value,
}

/// An [`SftTrainer`] in a run folder `out`: `metrics.jsonl` (a line a step), `checkpoint/`
/// (adapter + optimizer + trainer state) when [`checkpoint_due`](SftRun::checkpoint_due)
/// says so, and at the end the adapter (peft files) and `run.json`. When `out/checkpoint`
/// exists the run resumes from it: its settings and inputs must match (see
/// [`crate::resume::check`]), and it continues exactly as the uninterrupted run would have.
pub struct SftRun<'a> {
    trainer: SftTrainer<'a>,
    run: RunDir,
    inputs: Fingerprints,
    start_step: usize,
    /// Open once there is something to train.
    metrics: Option<File>,
    summary: SftSummary,
    started: Instant,
    tokens: usize,
}

impl<'a> SftRun<'a> {
    /// Opens (resumes, or starts) the run in `out` (created once every setting and the
    /// adapters are accepted). `options` carries what the trainer cannot see itself: the
    /// model's fingerprint and whether a mismatch on resume is only warned about.
    pub fn open(
        model: &'a mut CausalLm,
        blocks: &'a Blocks,
        config: &SftConfig,
        out: &Path,
        device: &Device,
        options: &ResumeOptions,
    ) -> Result<Self> {
        Self::open_data_parallel(model, blocks, config, out, device, options, Arc::new(Solo))
    }

    /// [`open`](SftRun::open) as one of the ranks of `collective`
    /// ([`SftTrainer::data_parallel`]). Every rank must be given the same settings, model
    /// and data (checked: a rank that differs from rank 0 is refused with what differs);
    /// every rank resumes from the same checkpoint, and only rank 0 writes into `out`.
    pub fn open_data_parallel(
        model: &'a mut CausalLm,
        blocks: &'a Blocks,
        config: &SftConfig,
        out: &Path,
        device: &Device,
        options: &ResumeOptions,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        check_settings(config, blocks)?;
        let ranks = collective.size();
        let total_steps = StepPlan::on_ranks(config, blocks, ranks)?.total_steps;
        let inputs = Fingerprints {
            model: options.model.clone(),
            data: Some(blocks_fingerprint(blocks)),
            reward: None,
        };
        check_same_inputs(
            &*collective,
            &[
                ("settings", serde_json::to_string(config)?),
                ("model", format!("{:?}", inputs.model)),
                ("data", format!("{:?}", inputs.data)),
                ("output folder", out.display().to_string()),
            ],
        )?;
        let run = RunDir::new(out, "sft");
        let checkpoint_dir = run.checkpoint_to_resume();
        let trainer = if let Some(dir) = &checkpoint_dir {
            let state = read_state(&run, dir, config, total_steps)?;
            if state.ranks != ranks {
                invalid!(
                    "{} was written by {} process(es) and this run has {ranks}: a step's \
                     micro-batches would be split another way; resume with mpirun -np {}",
                    dir.display(),
                    state.ranks,
                    state.ranks
                );
            }
            crate::resume::check(
                "sft",
                dir,
                state.inputs.as_ref(),
                &inputs,
                &serde_json::to_value(&state.config)?,
                &serde_json::to_value(config)?,
                options.anyway,
            )?;
            SftTrainer::build(
                model,
                blocks,
                config,
                device,
                Start::Checkpoint { dir, state: &state },
                collective.clone(),
            )?
        } else {
            SftTrainer::build(
                model,
                blocks,
                config,
                device,
                Start::Fresh,
                collective.clone(),
            )?
        };
        let writer = collective.is_writer();
        // Only now, with every setting and the adapters accepted, does the run folder appear.
        if writer {
            run.create()?;
        }
        let start_step = trainer.steps_done();
        let resumed = checkpoint_dir.is_some();
        let metrics_path = run.metrics();
        let mut summary = SftSummary {
            steps: total_steps,
            losses: Vec::new(),
            eval_losses: Vec::new(),
            tokens_per_s: 0.0,
            resumed_from: resumed.then_some(start_step),
            interrupted: false,
        };
        if resumed {
            read_summary(&metrics_path, start_step, &mut summary)?;
        }
        let metrics = if start_step < total_steps && writer {
            Some(run.reopen_log(crate::run_dir::METRICS_FILE, start_step)?)
        } else {
            None
        };
        Ok(SftRun {
            trainer,
            run,
            inputs,
            start_step,
            metrics,
            summary,
            started: Instant::now(),
            tokens: 0,
        })
    }

    /// The run's trainer.
    pub fn trainer(&self) -> &SftTrainer<'a> {
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

    /// The run folder.
    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    /// Whether the run's steps are all done (a rerun of a finished run has none to do).
    pub fn done(&self) -> bool {
        self.trainer.done()
    }

    /// Whether `out` holds the run finished: all steps done and `run.json` written.
    pub fn already_finished(&self) -> bool {
        self.start_step >= self.trainer.plan.total_steps
            && self.run.path().join("run.json").is_file()
    }

    /// One training step, evaluated when due (every `eval_every` steps and at the end), its
    /// line appended to metrics.jsonl.
    pub fn step(&mut self) -> Result<StepRecord> {
        let stats = self.trainer.step()?;
        self.tokens += stats.tokens;
        self.summary.losses.push(stats.loss);
        let done = stats.step;
        let elapsed = self.started.elapsed().as_secs_f64();
        let tokens_per_s = self.tokens as f64 / elapsed;
        let config = &self.trainer.config;
        let plan = self.trainer.plan;
        let mut json = json!({
            "step": done, "epoch": (done as f64 / plan.steps_per_epoch as f64),
            "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
            "tokens_per_s": tokens_per_s, "elapsed_s": elapsed,
        });
        let ranks = self.trainer.collective.size();
        if ranks > 1 {
            // What each rank received to sum the step's gradients (f32, from every other).
            json["reduced_bytes"] = json!(stats.reduced_values * 4 * (ranks - 1));
        }
        let evaluate = done == plan.total_steps
            || (config.eval_every > 0 && done.is_multiple_of(config.eval_every));
        let mut eval_loss = None;
        if evaluate {
            if let Some(eval) = self.trainer.eval_loss()? {
                if !eval.is_finite() {
                    return Err(Error::Diverged {
                        step: done,
                        what: format!("the held-out loss is {eval}"),
                        lr: stats.lr,
                    });
                }
                json["eval_loss"] = json!(eval);
                self.summary.eval_losses.push((done, eval));
                eval_loss = Some(eval);
            }
        }
        // Only rank 0 has the log open.
        if let Some(metrics) = self.metrics.as_mut() {
            crate::run_dir::append_jsonl(metrics, &json)?;
            metrics.flush()?;
        }
        Ok(StepRecord {
            stats,
            eval_loss,
            tokens_per_s,
            json,
        })
    }

    /// Whether the step just done is one to checkpoint: every `save_every` steps and the
    /// last.
    pub fn checkpoint_due(&self) -> bool {
        let done = self.trainer.step;
        let every = self.trainer.config.save_every;
        done == self.trainer.plan.total_steps || (every > 0 && done.is_multiple_of(every))
    }

    /// Writes `out/checkpoint` (adapter, optimizer moments, trainer state) through a
    /// temporary folder renamed into place.
    pub fn save_checkpoint(&self) -> Result<()> {
        let trainer = &self.trainer;
        if !trainer.collective.is_writer() {
            return Ok(());
        }
        self.run.save_checkpoint(|temp| -> Result<()> {
            trainer.model.save_lora(temp, &trainer.lora_config)?;
            crate::run_dir::save_moments(&trainer.adam, &temp.join(OPTIMIZER_FILE))?;
            let state = TrainerState {
                step: trainer.step,
                adam_step: trainer.adam.step_count(),
                config: trainer.config.clone(),
                inputs: Some(self.inputs.clone()),
                ranks: trainer.collective.size(),
            };
            crate::run_dir::write_state(temp, &state)
        })
    }

    /// The summary of a run stopped (Ctrl-C) after its checkpoint.
    pub fn interrupted(mut self) -> SftSummary {
        self.summary.interrupted = true;
        self.summary.steps = self.trainer.step;
        self.summary
    }

    /// The summary so far (steps, the losses metrics.jsonl records).
    pub fn summary(&self) -> &SftSummary {
        &self.summary
    }

    /// Ends the run: adapters to eval mode, and the adapter (peft files) and `run.json`
    /// written into `out` (only once all are written). A finished run's outputs are kept
    /// as they are ([`already_finished`](SftRun::already_finished)); only when its final
    /// files are missing (a crash after the last checkpoint) are they written, with the
    /// summary taken from metrics.jsonl.
    pub fn finish(mut self) -> Result<SftSummary> {
        if self.already_finished() {
            return Ok(self.summary);
        }
        self.trainer.eval_mode();
        if self.trainer.step > self.start_step {
            self.summary.tokens_per_s =
                self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        }
        if !self.trainer.collective.is_writer() {
            return Ok(self.summary);
        }
        save_final(
            self.trainer.model,
            &self.trainer.lora_config,
            &self.trainer.config,
            &self.summary,
            &self.run,
        )?;
        Ok(self.summary)
    }
}

/// The adapter (peft files) and `run.json`.
fn save_final(
    model: &CausalLm,
    lora_config: &LoraConfig,
    config: &SftConfig,
    summary: &SftSummary,
    run: &RunDir,
) -> Result<()> {
    run.save_final(|dir| -> Result<()> {
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
    for r in crate::run_dir::read_jsonl(metrics)? {
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

/// The adapters a checkpoint gave the model must be exactly those the run's LoRA config
/// puts on it, with its rank and scaling: an adapter file with modules the config does not
/// target (extra tensors) is refused, not trained along silently.
pub fn check_adapters(
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
        invalid!(
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
        invalid!(
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
