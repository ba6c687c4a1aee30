//! trl's classic `PPOTrainer.step` on a LoRA policy: the reference log-probs come from the
//! same model with its adapters switched off (no second copy of the weights), the values
//! from a value head on the last hidden state. Trainable: the adapters and the value head.
//!
//! Data parallel ([`PpoTrainer::join`]): every rank holds the whole batch (queries,
//! responses, scores); rank 0 runs the policy's rollout forward and rank 1 the reference's,
//! each over the whole batch, and every rank then computes the rewards, advantages,
//! whitening and statistics over the batch, so they are the batch's and not a shard's (trl's
//! data-parallel PPO whitens per process; lathe does not). The minibatches of each backward batch are
//! shared out (rank r takes a contiguous run of them), their gradients summed over ranks in
//! rank order and their statistics gathered in minibatch order: with one minibatch per rank
//! per backward batch, the bits of one process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use lathe_core::collective::all_reduce_grads;
use lathe_core::optim::{Adam, AdamConfig};
use lathe_core::{clip_grad_norm, first_diverged, no_grad, Device, GradStore, Tensor};
use lathe_core::{Collective, Rng, Solo};
use lathe_lora::AdapterSwitch;
use lathe_models::attention::TokenLayout;
use lathe_models::hf::CausalLm;
use lathe_models::value_head::ValueHead;

use crate::config::PpoConfig;
use crate::loss::{ppo_loss, LossStats, RolloutBatch};
use crate::math::{compute_advantages, compute_rewards, masked_mean, Grid, KlController};
use crate::{Error, Result};

/// The policy, its value head and the optimizer state of a PPO run.
pub struct PpoTrainer {
    /// The policy: the base model with its LoRA adapters.
    pub model: CausalLm,
    /// The scalar value head on the policy's last hidden states.
    pub value_head: ValueHead,
    /// Turns the adapters on (the policy) or off (the reference) and their dropout.
    pub switch: AdapterSwitch,
    /// The trainer's settings.
    pub config: PpoConfig,
    adam: Adam,
    kl: KlController,
    pad_id: u32,
    device: Device,
    steps_done: usize,
    /// The ranks training together ([`Solo`] in one process).
    collective: Arc<dyn Collective>,
}

/// A forward evaluated at chosen positions: (1, n) log-probs of the next tokens and values
/// on the device; the entropies on the host when asked.
struct Forward {
    logprobs: Tensor,
    values: Tensor,
    entropy: Option<Grid>,
}

/// A point in time and in the count of matrix-product FLOPs ([`lathe_core::flops`]).
struct Mark {
    at: Instant,
    flops: u64,
}

impl Mark {
    fn now() -> Mark {
        Mark {
            at: Instant::now(),
            flops: lathe_core::flops::counted(),
        }
    }
}

/// Where a step's time and counted FLOPs went, by phase: the rollout's forwards (policy and
/// reference), rewards and advantages, the minibatches' forwards, their backwards, and the
/// optimizer (gradient exchange, clipping, Adam). Recorded as `time/ppo/<phase>_s` and
/// `time/ppo/<phase>_gflop`, with trl's timings under `time/` (measurements, not results:
/// the FLOP counter is process-wide, so other threads' products in the same process count
/// too).
#[derive(Default)]
struct Phases(BTreeMap<&'static str, (f64, u64)>);

impl Phases {
    /// Adds the time and FLOPs since `mark` to `phase`.
    fn add(&mut self, phase: &'static str, mark: Mark) {
        let entry = self.0.entry(phase).or_default();
        entry.0 += mark.at.elapsed().as_secs_f64();
        entry.1 += lathe_core::flops::counted().saturating_sub(mark.flops);
    }

    fn record(self, stats: &mut StepStats) {
        for (phase, (seconds, flops)) in self.0 {
            stats.insert(format!("time/ppo/{phase}_s"), seconds as f32);
            stats.insert(
                format!("time/ppo/{phase}_gflop"),
                (flops as f64 / 1e9) as f32,
            );
        }
    }
}

/// The statistics of one step under trl's names (`objective/kl`, `ppo/loss/total`, ...).
pub type StepStats = BTreeMap<String, f32>;

impl PpoTrainer {
    /// A trainer over `model` (with LoRA adapters on `switch`, see
    /// `CausalLm::add_lora`/`load_lora`) and `value_head`. `pad_id` fills the right padding
    /// of batched sequences.
    pub fn new(
        mut model: CausalLm,
        switch: AdapterSwitch,
        value_head: ValueHead,
        config: PpoConfig,
        pad_id: u32,
        device: &Device,
    ) -> Result<PpoTrainer> {
        config.validate()?;
        let mut params = model.lora_parameters();
        if params.is_empty() {
            return Err(Error::Config(
                "the policy has no LoRA adapters: add or load some first".into(),
            ));
        }
        params.extend(value_head.summary.variables());
        // The base is final from here on: its forward products read packed panels.
        model.pack_frozen_weights()?;
        let adam = Adam::new(
            params,
            AdamConfig {
                lr: config.learning_rate,
                ..AdamConfig::default()
            },
        )?;
        let kl = config.kl_controller();
        Ok(PpoTrainer {
            model,
            value_head,
            switch,
            config,
            adam,
            kl,
            pad_id,
            device: device.clone(),
            steps_done: 0,
            collective: Arc::new(Solo),
        })
    }

    /// Makes this trainer one of the ranks of `collective` (see the module's docs): every
    /// rank must be built alike and given the same batches.
    pub fn join(&mut self, collective: Arc<dyn Collective>) {
        self.collective = collective;
    }

    /// The ranks training together.
    pub fn collective(&self) -> &dyn Collective {
        &*self.collective
    }

    /// The KL controller and its current coefficient.
    pub fn kl_controller(&self) -> &KlController {
        &self.kl
    }

    /// The token that pads batched sequences on the right.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// PPO steps done.
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// The Adam optimizer of the adapters and the value head, with its moments.
    pub fn optimizer(&self) -> &Adam {
        &self.adam
    }

    /// Restores a resumed run's counters, KL controller and optimizer state.
    pub fn restore(
        &mut self,
        steps_done: usize,
        kl: KlController,
        adam_step: u64,
        moments: Vec<(Tensor, Tensor)>,
    ) -> Result<()> {
        self.adam.restore(adam_step, moments)?;
        self.kl = kl;
        self.steps_done = steps_done;
        Ok(())
    }

    /// Forward of the sequences evaluated only at `positions` (row, t): the log-prob of token
    /// t + 1, the value at t and the entropy at t, each as a (1, n) row in the order given.
    ///
    /// The sequences are packed back to back into one row ([`TokenLayout::packed`]), so no
    /// padding is computed; every token's result equals a right-padded batch's.
    fn forward_at(
        &self,
        seqs: &[Vec<u32>],
        positions: &[(usize, usize)],
        with_entropy: bool,
    ) -> Result<Forward> {
        let n = positions.len();
        let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
        // Where each sequence starts in the packed row.
        let starts: Vec<usize> = lengths
            .iter()
            .scan(0, |start, &len| {
                let here = *start;
                *start += len;
                Some(here)
            })
            .collect();
        let total: usize = lengths.iter().sum();
        let ids = Tensor::from_vec(seqs.concat(), &[1, total], &self.device)?;
        let layout = TokenLayout::packed(&lengths, &self.device)?;
        let hidden = self.model.forward_hidden(&ids, &layout, None)?; // (1, N, H)
        let h = hidden.shape()[2];
        let rows: Vec<u32> = positions
            .iter()
            .map(|&(r, t)| (starts[r] + t) as u32)
            .collect();
        let targets: Vec<u32> = positions.iter().map(|&(r, t)| seqs[r][t + 1]).collect();
        // (n, H) hidden states at the positions.
        let picked = Tensor::embedding_with_host_ids(
            &hidden.reshape(&[total, h])?,
            &Tensor::from_vec(rows.clone(), &[n], &self.device)?,
            rows,
        )?;
        // The head and log-softmax fused: the (n, V) logits are never held on the CPU.
        let (logprobs, entropy) =
            self.model
                .lm_head_logprobs(&picked, &targets, None, with_entropy)?; // (n,) each
        let logprobs = logprobs.reshape(&[1, n])?;
        let values = self
            .value_head
            .forward(&picked.reshape(&[1, n, h])?)?
            .reshape(&[1, n])?;
        let entropy = entropy
            .map(|ent| Grid::new(1, n, ent.to_vec_f32()?))
            .transpose()?;
        Ok(Forward {
            logprobs,
            values,
            entropy,
        })
    }

    /// One PPO step on a batch of (query, response) token ids and their scores, as trl's
    /// `step`. Returns every statistic trl logs for a step.
    pub fn step(
        &mut self,
        queries: &[Vec<u32>],
        responses: &[Vec<u32>],
        scores: &[f32],
    ) -> Result<StepStats> {
        let b = queries.len();
        if b != self.config.batch_size || responses.len() != b || scores.len() != b {
            return Err(Error::Shape(format!(
                "step: {} queries, {} responses, {} scores for batch_size {}",
                b,
                responses.len(),
                scores.len(),
                self.config.batch_size
            )));
        }
        if let Some(i) = (0..b).find(|&i| queries[i].is_empty() || responses[i].is_empty()) {
            return Err(Error::Shape(format!(
                "sample {i} has an empty query or response"
            )));
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(Error::Shape(format!("score {i} is {}", scores[i])));
        }
        let seqs: Vec<Vec<u32>> = queries
            .iter()
            .zip(responses)
            .map(|(q, r)| q.iter().chain(r).copied().collect())
            .collect();
        let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let cols = seq - 1;
        // Response positions of the (B, T-1) log-probs: token t+1 is predicted at t.
        let mut mask = Grid::zeros(b, cols);
        for (i, (q, r)) in queries.iter().zip(responses).enumerate() {
            let start = q.len() - 1;
            mask.data[i * cols + start..i * cols + start + r.len()].fill(1.0);
        }

        let mut phases = Phases::default();
        // Rollout quantities: no gradients, no dropout.
        let mark = Mark::now();
        let (logprobs, values, ref_logprobs) = {
            let _no_grad = no_grad();
            self.switch.eval();
            self.value_head.eval();
            // Only the response positions are needed: the rest is masked everywhere
            // downstream (rewards, advantages, statistics), so it stays 0.
            let positions: Vec<(usize, usize)> = (0..b)
                .flat_map(|r| (0..cols).map(move |t| (r, t)))
                .filter(|&(r, t)| mask.at(r, t) != 0.0)
                .collect();
            // With several ranks, rank 0 runs the policy's forward and rank 1 the
            // reference's, each over the whole batch (as one process runs them, so the same
            // bits), and they exchange the results.
            let (rank, ranks) = (self.collective.rank(), self.collective.size());
            let reference_rank = 1 % ranks;
            // (3, B, T-1): policy log-probs, values, reference log-probs.
            let mut grids = vec![0.0f32; 3 * b * cols];
            let mut scatter = |k: usize, t: &Tensor| -> Result<()> {
                for (&(r, c), v) in positions.iter().zip(t.to_vec_f32()?) {
                    grids[k * b * cols + r * cols + c] = v;
                }
                Ok(())
            };
            if rank == 0 {
                let policy = self.forward_at(&seqs, &positions, false)?;
                scatter(0, &policy.logprobs)?;
                scatter(1, &policy.values)?;
            }
            if rank == reference_rank {
                let _off = self.switch.disable();
                let reference = self.forward_at(&seqs, &positions, false)?;
                scatter(2, &reference.logprobs)?;
            }
            if ranks > 1 {
                let all = self.collective.all_gather_f32(&grids)?;
                let (policy, reference) =
                    (&all[..2 * b * cols], &all[reference_rank * grids.len()..]);
                grids[..2 * b * cols].copy_from_slice(policy);
                grids[2 * b * cols..].copy_from_slice(&reference[2 * b * cols..3 * b * cols]);
            }
            let grid =
                |k: usize| Grid::new(b, cols, grids[k * b * cols..(k + 1) * b * cols].to_vec());
            (grid(0)?, grid(1)?, grid(2)?)
        };
        phases.add("rollout_forward", mark);
        let mark = Mark::now();
        let kl_coef = self.kl.value();
        let (rewards, non_score, kls) = compute_rewards(
            scores,
            &logprobs,
            &ref_logprobs,
            &mask,
            kl_coef,
            self.config.kl_penalty,
        )?;
        let (values, advantages, returns) = compute_advantages(
            &values,
            &rewards,
            &mask,
            self.config.gamma,
            self.config.lam,
            self.config.whiten_rewards,
        )?;

        phases.add("advantages", mark);
        let minibatch_stats = self.optimize(
            &seqs,
            [&logprobs, &values, &advantages, &returns, &mask],
            &mut phases,
        )?;
        self.switch.eval();
        self.value_head.eval();

        let stats = record_step_stats(&StepRecord {
            scores,
            logprobs: &logprobs,
            kls: &kls,
            non_score: &non_score,
            mask: &mask,
            kl_coef,
            query_lens: queries.iter().map(Vec::len).collect(),
            response_lens: responses.iter().map(Vec::len).collect(),
            minibatches: &minibatch_stats,
        });
        let mean_kl = stats["objective/kl"];
        self.kl.update(mean_kl, self.config.batch_size);
        self.steps_done += 1;
        let mut stats = stats;
        phases.record(&mut stats);
        Ok(stats)
    }

    /// The PPO epochs: shuffled minibatches, gradients summed over
    /// `gradient_accumulation_steps` of them per optimizer step, early stop on KL.
    ///
    /// No dropout, as in trl 0.11.4: its `batched_forward_pass` puts the model in eval mode
    /// before every forward, the minibatch forwards of the PPO epochs included, so neither
    /// LoRA dropout nor the value head's dropout ever applies in the classic PPOTrainer.
    ///
    /// `grids`: the rollout's old log-probs, values, advantages, returns and mask.
    fn optimize(
        &mut self,
        seqs: &[Vec<u32>],
        grids: [&Grid; 5],
        phases: &mut Phases,
    ) -> Result<Vec<LossStats>> {
        let [old_logprobs, values, advantages, returns, mask] = grids;
        let c = self.config.clone();
        let b = seqs.len();
        let backward_batch = c.mini_batch_size * c.gradient_accumulation_steps;
        let params = self.adam.params().to_vec();
        let mut all = Vec::new();
        let mut rng = Rng::new(lathe_core::seed::derive(c.seed, 0, self.steps_done as u64));
        for _epoch in 0..c.ppo_epochs {
            let order = rng.permutation(b);
            for backward in order.chunks(backward_batch) {
                let minibatches: Vec<&[usize]> = backward.chunks(c.mini_batch_size).collect();
                let (rank, ranks, m) = (
                    self.collective.rank(),
                    self.collective.size(),
                    minibatches.len(),
                );
                // This rank's contiguous run of the backward batch's minibatches.
                let mine = rank * m / ranks..(rank + 1) * m / ranks;
                let mut grads: Option<GradStore> = None;
                let mut stats_of: Vec<Option<LossStats>> = vec![None; m];
                for k in mine {
                    let rows = minibatches[k];
                    let mb_seqs: Vec<Vec<u32>> = rows.iter().map(|&r| seqs[r].clone()).collect();
                    // Only the response positions enter the loss: the minibatch's sequences
                    // are packed without padding, and the LM head, log-softmax, entropy and
                    // value head run on the response positions alone, as one (1, n) row. The
                    // loss and its statistics are masked means over those same positions,
                    // so they equal the full-grid computation.
                    let positions: Vec<(usize, usize)> = rows
                        .iter()
                        .enumerate()
                        .flat_map(|(i, &r)| {
                            (0..seqs[r].len() - 1)
                                .filter(move |&t| mask.at(r, t) != 0.0)
                                .map(move |t| (i, t))
                        })
                        .collect();
                    let compact = |g: &Grid| {
                        Grid::new(
                            1,
                            positions.len(),
                            positions.iter().map(|&(i, t)| g.at(rows[i], t)).collect(),
                        )
                    };
                    let (old, val, adv, ret, m) = (
                        compact(old_logprobs)?,
                        compact(values)?,
                        compact(advantages)?,
                        compact(returns)?,
                        compact(mask)?,
                    );
                    let mark = Mark::now();
                    let forward = self.forward_at(&mb_seqs, &positions, true)?;
                    let batch = RolloutBatch {
                        old_logprobs: &old,
                        values: &val,
                        advantages: &adv,
                        returns: &ret,
                        mask: &m,
                    };
                    let entropy = forward.entropy.as_ref().expect("computed");
                    let (loss, stats) =
                        ppo_loss(&c, &batch, &forward.logprobs, &forward.values, entropy)?;
                    phases.add("minibatch_forward", mark);
                    let mark = Mark::now();
                    // A non-finite loss is reported below, once every rank has its figures.
                    if !stats.skipped && stats.loss_total.is_finite() {
                        let scaled =
                            loss.affine(1.0 / c.gradient_accumulation_steps as f32, 0.0)?;
                        let g = scaled.backward()?;
                        grads = Some(GradStore::accumulate(grads, g, &params)?);
                    }
                    phases.add("backward", mark);
                    stats_of[k] = Some(stats);
                }
                let mark = Mark::now();
                let stats_of = self.gather_stats(stats_of)?;
                if let Some(stats) = stats_of
                    .iter()
                    .find(|s| !s.skipped && !s.loss_total.is_finite())
                {
                    return Err(self.diverged(format!(
                        "the loss is {} (policy {}, value {})",
                        stats.loss_total, stats.loss_policy, stats.loss_value
                    )));
                }
                all.extend(stats_of);
                let (grads, _) =
                    all_reduce_grads(&*self.collective, grads.unwrap_or_default(), &params)?;
                if !grads.is_empty() {
                    let mut grads = grads;
                    // An infinite max_norm measures the norm without clipping.
                    let max_norm = c.max_grad_norm.unwrap_or(f32::INFINITY);
                    let norm = clip_grad_norm(&mut grads, &params, max_norm)?;
                    if !norm.is_finite() {
                        return Err(self.diverged(format!("the gradient norm is {norm}")));
                    }
                    self.adam.step(&grads)?;
                    if let Some(i) = first_diverged(&params)? {
                        return Err(self.diverged(format!(
                            "trainable parameter {i} ({:?}) holds NaN/inf or a value beyond 1.8e19 after the update",
                            params[i].shape()
                        )));
                    }
                }
                phases.add("optimizer", mark);
            }
            if c.early_stopping
                && all
                    .last()
                    .is_some_and(|s| s.policy_policykl > 1.5 * c.target_kl)
            {
                break;
            }
        }
        Ok(all)
    }
}

impl PpoTrainer {
    /// Every minibatch's statistics on every rank, in minibatch order: `mine` holds this
    /// rank's (the others None).
    fn gather_stats(&self, mine: Vec<Option<LossStats>>) -> Result<Vec<LossStats>> {
        if self.collective.size() == 1 {
            return Ok(mine.into_iter().flatten().collect());
        }
        // (minibatches, 18): a has-figures flag, then the 17 numbers.
        let local: Vec<f32> = mine
            .iter()
            .flat_map(|s| match s {
                Some(s) => std::iter::once(1.0)
                    .chain(s.to_values())
                    .collect::<Vec<_>>(),
                None => vec![0.0; 18],
            })
            .collect();
        let all = self.collective.all_gather_f32(&local)?;
        (0..mine.len())
            .map(|k| {
                all.chunks_exact(local.len())
                    .map(|rank| &rank[k * 18..(k + 1) * 18])
                    .find(|row| row[0] == 1.0)
                    .map(|row| LossStats::from_values(row[1..].try_into().expect("17 values")))
                    .ok_or_else(|| {
                        Error::Core(lathe_core::Error::Collective(format!(
                            "no rank computed minibatch {k}"
                        )))
                    })
            })
            .collect()
    }

    /// The error of a diverged step (`what` went non-finite); nothing is saved after it.
    fn diverged(&self, what: String) -> Error {
        Error::Diverged(format!(
            "step {}: {what}; stopping (the learning rate is likely too high, or a setting is \
             NaN/inf)",
            self.steps_done + 1
        ))
    }
}

/// What trl's `record_step_stats` reads.
pub struct StepRecord<'a> {
    /// The reward of each sample (B).
    pub scores: &'a [f32],
    /// The policy's log-probs of the response tokens at rollout time (B, T).
    pub logprobs: &'a Grid,
    /// The per-token KL estimates against the reference (B, T).
    pub kls: &'a Grid,
    /// The per-token KL penalty, `-kl_coef * kl` (B, T).
    pub non_score: &'a Grid,
    /// 1 at a response token, 0 at padding (B, T).
    pub mask: &'a Grid,
    /// The KL coefficient the step used.
    pub kl_coef: f32,
    /// Tokens in each query (B).
    pub query_lens: Vec<usize>,
    /// Tokens in each response (B).
    pub response_lens: Vec<usize>,
    /// The loss statistics of each minibatch update of the step.
    pub minibatches: &'a [LossStats],
}

/// trl's `record_step_stats` (+ `env/reward_*` of `log_stats`): per-row KL and entropy sums
/// averaged over rows, score mean and unbiased std, each minibatch statistic averaged over
/// the minibatches, and the explained variance of the values.
pub fn record_step_stats(r: &StepRecord<'_>) -> StepStats {
    let b = r.mask.rows;
    let row_sums = |g: &Grid| -> Vec<f64> {
        (0..b)
            .map(|i| {
                g.row(i)
                    .iter()
                    .zip(r.mask.row(i))
                    .map(|(&v, &m)| v as f64 * m as f64)
                    .sum()
            })
            .collect()
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let std = |v: &[f64]| {
        let m = mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0).max(1.0)).sqrt()
    };
    let neg_logprobs = Grid {
        rows: r.logprobs.rows,
        cols: r.logprobs.cols,
        data: r.logprobs.data.iter().map(|l| -l).collect(),
    };
    let scores: Vec<f64> = r.scores.iter().map(|&s| s as f64).collect();
    let as_f64 = |v: &[usize]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let mut stats = StepStats::new();
    let mut put = |k: &str, v: f64| {
        stats.insert(k.to_string(), v as f32);
    };
    put("objective/kl", mean(&row_sums(r.kls)));
    put("objective/kl_coef", r.kl_coef as f64);
    put("objective/entropy", mean(&row_sums(&neg_logprobs)));
    put(
        "ppo/mean_non_score_reward",
        masked_mean(r.non_score, r.mask) as f64,
    );
    put("ppo/mean_scores", mean(&scores));
    put("ppo/std_scores", std(&scores));
    put("env/reward_mean", mean(&scores));
    put("env/reward_std", std(&scores));
    put("tokens/queries_len_mean", mean(&as_f64(&r.query_lens)));
    put("tokens/responses_len_mean", mean(&as_f64(&r.response_lens)));
    let n = r.minibatches.len().max(1) as f64;
    for (i, (name, _)) in LossStats::default().named().iter().enumerate() {
        let total: f64 = r.minibatches.iter().map(|s| s.named()[i].1 as f64).sum();
        put(name, total / n);
    }
    put(
        "ppo/minibatches_skipped",
        r.minibatches.iter().filter(|s| s.skipped).count() as f64,
    );
    let explained = 1.0 - stats["ppo/val/error"] as f64 / stats["ppo/returns/var"] as f64;
    stats.insert("ppo/val/var_explained".to_string(), explained as f32);
    stats
}
