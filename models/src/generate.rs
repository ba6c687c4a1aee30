//! Batched autoregressive generation, as transformers' `generate` does it.
//!
//! Prompts of different lengths are left-padded into one batch (their real tokens end
//! together, so every row's next token comes from the last position). With the KV cache one
//! prefill forward runs the prompts, then each step feeds one token per row; without it each
//! step recomputes the whole sequence (slow; a reference for tests). EOS is suppressed until
//! `min_new_tokens` tokens are out; when `stop_at_eos`, a row that emitted EOS is finished
//! and emits `pad_token_id` from then on, and generation ends when every row is finished.

use lathe_core::{Device, Tensor};

use crate::arch::Architecture;
use crate::attention::TokenLayout;
use crate::hf::CausalLm;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::sampling::{Sampler, SamplingConfig};
use crate::{Error, Result};

/// What [`generate`] needs of a model.
pub trait LanguageModel: Sync {
    /// Logits (B, T, V) of token ids (B, T).
    fn forward(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;
    /// Logits (B, 1, V) of the last position only. The default narrows `forward`'s; models
    /// override it to run the LM head on one position instead of T (a prompt's prefill
    /// needs only its last logits: the head is a (V, H) matmul per position).
    fn forward_last(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let logits = self.forward(ids, layout, cache)?;
        let t = logits.shape().get(1).copied().unwrap_or(0);
        if t <= 1 {
            return Ok(logits);
        }
        Ok(logits.narrow(1, t - 1, 1)?)
    }
    /// Logits per position (the embedding's rows).
    fn vocab_size(&self) -> usize;
    /// Ids below this are sampled; the logits of the rest are dropped (a tokenizer smaller
    /// than the embedding). The whole vocabulary by default.
    fn sample_vocab(&self) -> usize {
        self.vocab_size()
    }
    /// Transformer blocks (the KV cache holds one entry per block).
    fn num_layers(&self) -> usize;
    /// Positions the rotary tables cover: prompt plus new tokens must fit.
    fn max_positions(&self) -> usize;
    /// log p(targets[b, t] | ids[b, ..= t]) for ids (B, T) and host `targets` (B, T - 1)
    /// (normally ids[b, t + 1]; [`IGNORE`] where no prediction is wanted: those entries are
    /// 0), and each prediction's entropy when `entropy` (no gradient): (B, T - 1) each. The
    /// default builds the (B, T, V) logits; models with an LM head run it through
    /// [`Linear::token_logprobs`], which on the CPU never holds the logits and skips the
    /// ignored positions.
    fn next_token_logprobs(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        targets: &[u32],
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t) = logprob_shape(ids, targets)?;
        let logits = self.forward(ids, layout, None)?; // (B, T, V)
        let (logps, entropy) =
            predicting_rows(&logits)?.log_softmax_gather_masked(targets, Some(IGNORE), entropy)?;
        rows_of(b, t - 1, logps, entropy)
    }
}

/// The target that asks for no prediction in [`LanguageModel::next_token_logprobs`].
pub const IGNORE: u32 = u32::MAX;

/// (B, T) of ids, checked against targets (B (T - 1)) and T >= 2.
fn logprob_shape(ids: &Tensor, targets: &[u32]) -> Result<(usize, usize)> {
    let &[b, t] = ids.shape() else {
        return Err(Error::Config(format!(
            "next_token_logprobs takes ids (B, T), got {:?}",
            ids.shape()
        )));
    };
    if t < 2 {
        return Err(Error::Config(format!(
            "next_token_logprobs needs at least 2 tokens per row (one to predict from), got {t}"
        )));
    }
    if targets.len() != b * (t - 1) {
        return Err(Error::Config(format!(
            "next_token_logprobs: {} targets for ids {:?} (want B (T - 1) = {})",
            targets.len(),
            ids.shape(),
            b * (t - 1)
        )));
    }
    Ok((b, t))
}

/// (N,) log-probs and entropies back to (B, T - 1) rows.
fn rows_of(
    b: usize,
    cols: usize,
    logps: Tensor,
    entropy: Option<Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    Ok((
        logps.reshape(&[b, cols])?,
        entropy.map(|e| e.reshape(&[b, cols])).transpose()?,
    ))
}

/// The rows (B (T - 1), D) of every position but the last of x (B, T, D): the positions
/// that predict a next token.
fn predicting_rows(x: &Tensor) -> Result<Tensor> {
    let &[b, t, d] = x.shape() else {
        return Err(Error::Config(format!(
            "next_token_logprobs: {:?} is not (B, T, D)",
            x.shape()
        )));
    };
    Ok(x.narrow(1, 0, t - 1)?.reshape(&[b * (t - 1), d])?)
}

/// [`LanguageModel::next_token_logprobs`] of ids (B, T) through a model's own LM head: the
/// last hidden states (B, T, H) of every position but the last, then the head's per-token
/// pass.
fn head_token_logprobs(
    (b, t): (usize, usize),
    hidden: &Tensor,
    head: &Linear,
    targets: &[u32],
    entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (logps, entropy) =
        head.token_logprobs(&predicting_rows(hidden)?, targets, Some(IGNORE), entropy)?;
    rows_of(b, t - 1, logps, entropy)
}

impl<M: Architecture + ?Sized> LanguageModel for M {
    fn forward(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.head()
            .forward(&self.forward_hidden(ids, layout, cache)?)
    }
    fn vocab_size(&self) -> usize {
        self.arch_config().vocab_size()
    }
    fn sample_vocab(&self) -> usize {
        let vocab = self.vocab_size();
        Architecture::sample_vocab(self).unwrap_or(vocab).min(vocab)
    }
    fn num_layers(&self) -> usize {
        self.arch_config().num_hidden_layers()
    }
    fn max_positions(&self) -> usize {
        self.arch_config().max_position_embeddings()
    }
    fn next_token_logprobs(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        targets: &[u32],
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let shape = logprob_shape(ids, targets)?;
        let hidden = self.forward_hidden(ids, layout, None)?; // (B, T, H)
        head_token_logprobs(shape, &hidden, self.head(), targets, entropy)
    }
}

impl LanguageModel for CausalLm {
    fn forward(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        CausalLm::forward(self, ids, layout, cache)
    }
    fn forward_last(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, layout, cache)?; // (B, T, H)
        let t = hidden.shape()[1];
        let last = if t <= 1 {
            hidden
        } else {
            hidden.narrow(1, t - 1, 1)? // (B, 1, H)
        };
        self.lm_head(&last)
    }
    fn vocab_size(&self) -> usize {
        self.arch().vocab_size()
    }
    fn sample_vocab(&self) -> usize {
        LanguageModel::sample_vocab(self.arch())
    }
    fn num_layers(&self) -> usize {
        self.arch().num_layers()
    }
    fn max_positions(&self) -> usize {
        self.arch().max_positions()
    }
    fn next_token_logprobs(
        &self,
        ids: &Tensor,
        layout: &TokenLayout,
        targets: &[u32],
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.arch()
            .next_token_logprobs(ids, layout, targets, entropy)
    }
}

/// How [`generate`] runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateConfig {
    /// At most this many new tokens per prompt.
    pub max_new_tokens: usize,
    /// EOS gets logit -inf until this many new tokens are out (when `eos_token_id` is set).
    pub min_new_tokens: usize,
    /// The end-of-sequence token (None: no token is treated as EOS).
    pub eos_token_id: Option<u32>,
    /// Whether EOS finishes a row. false = "never stop at EOS" (the seed's PPO rollouts):
    /// every row gets exactly `max_new_tokens` tokens, EOS among them possibly.
    pub stop_at_eos: bool,
    /// Fills the left padding of short prompts and follows a finished row's EOS.
    pub pad_token_id: u32,
    /// Temperature, top-k, top-p or greedy decoding.
    pub sampling: SamplingConfig,
    /// Seed of the sampler: row b's tokens depend on (seed, b) only.
    pub seed: u64,
    /// Decode with a KV cache (one token per step) instead of recomputing the sequence.
    pub use_cache: bool,
}

impl Default for GenerateConfig {
    fn default() -> GenerateConfig {
        GenerateConfig {
            max_new_tokens: 16,
            min_new_tokens: 0,
            eos_token_id: None,
            stop_at_eos: true,
            pad_token_id: 0,
            sampling: SamplingConfig::default(),
            seed: 0,
            use_cache: true,
        }
    }
}

/// Generates new tokens for every prompt, batched; `device` is the model's.
///
/// Returns the new tokens of each prompt, all rows of the same length: the number of steps
/// run (`max_new_tokens`, or fewer when every row finished early), a row that finished
/// padded with `pad_token_id` after its EOS, as transformers' `sequences[:, prompt_len:]`.
pub fn generate<M: LanguageModel + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerateConfig,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    generate_groups(model, prompts, 1, config, device)
}

/// [`generate`] for rows `first_row ..` of a larger batch: row b samples from the stream
/// of row `first_row + b`, so that ranks each generating their rows of a batch get the
/// tokens one process generating the whole batch gets (up to the rounding of a batch padded
/// to other lengths). With `limits`, row b stops after `limits[b]` new tokens (at most
/// `max_new_tokens`) and is no longer computed; its tokens are the first `limits[b]` of
/// those it gets without a limit, padded with `pad_token_id` as a finished row.
pub fn generate_rows<M: LanguageModel + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    first_row: usize,
    limits: Option<&[usize]>,
    config: &GenerateConfig,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    check_inputs(model, prompts, config)?;
    if let Some(limits) = limits.filter(|l| l.len() != prompts.len()) {
        return Err(Error::Config(format!(
            "generate: {} row limits for {} prompts",
            limits.len(),
            prompts.len()
        )));
    }
    rayon::scope(|_| generate_here(model, prompts, 1, first_row, limits, config, device))
}

/// `group` samples of every prompt, the prompt's prefill computed once: row p*group + i of
/// the result is prompt p's i-th sample. The prompts run as a batch of P rows; their keys and
/// values, layout and next-token logits are then repeated `group` times in a row, and
/// decoding goes on with P x group rows. Equal to [`generate`] on each prompt repeated
/// `group` times in a row (same seed: the same per-row sampling streams), with 1/group of
/// its prefill work (GRPO's G completions per prompt). Without the KV cache there is no
/// prefill to share: the prompts are repeated.
pub fn generate_groups<M: LanguageModel + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    group: usize,
    config: &GenerateConfig,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    check_inputs(model, prompts, config)?;
    if group == 0 {
        return Err(Error::Config(
            "generate: a group of 0 samples per prompt".into(),
        ));
    }
    if !config.use_cache && group > 1 {
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), group))
            .collect();
        return generate_groups(model, &rows, 1, config, device);
    }
    // On a worker of rayon's pool, the CPU ops' parallel loops start without waking the
    // pool from outside: a cold start costs tens of microseconds per op, and a decode step
    // is hundreds of small ops. (The no-grad guard is per thread: taken inside.)
    rayon::scope(|_| generate_here(model, prompts, group, 0, None, config, device))
}

/// The generation of `prompts` x `group` rows, the sampler's streams from `first_row`; row b
/// stops after `limits[b]` new tokens when limits are given (PPO's sampled response lengths).
///
/// A row that finished (EOS, or its limit) is dropped from the batch at the next step: its
/// cache rows, layout row and sampling stream go, and the model computes only the rows still
/// going. Each row's arithmetic does not depend on the other rows of its batch, so every
/// row's tokens are those of the whole batch decoded to the end (the tests hold them equal
/// token for token); finished rows are padded with `pad_token_id` at the end.
fn generate_here<M: LanguageModel + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    group: usize,
    first_row: usize,
    limits: Option<&[usize]>,
    config: &GenerateConfig,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let _no_grad = lathe_core::no_grad();
    let rows = prompts.len() * group;
    let limit =
        |b: usize| limits.map_or(config.max_new_tokens, |l| l[b].min(config.max_new_tokens));
    let mut run = Run::new(model, prompts, group, first_row, config, device)?;
    let mut out = vec![Vec::with_capacity(config.max_new_tokens); rows];
    // The output row of each row the model still computes.
    let mut live: Vec<usize> = (0..rows).filter(|&b| limit(b) > 0).collect();
    if live.is_empty() {
        return Ok(out);
    }
    let mut logits = run.prefill()?; // (P, V), on the model's device
    if group > 1 {
        logits = run.repeat_rows(group, &logits)?; // (P * group, V)
    }
    if live.len() < rows {
        logits = run.select_rows(&live, &logits)?;
    }
    let mut steps = 0;
    for step in 0..config.max_new_tokens {
        // EOS is suppressed inside the sampler (on a GPU, in the kernel): no host pass.
        let suppress = config.eos_token_id.filter(|_| step < config.min_new_tokens);
        let tokens = run.sampler.sample_suppressing(&logits, suppress)?;
        steps = step + 1;
        let mut going = Vec::with_capacity(live.len());
        for (i, (&b, &token)) in live.iter().zip(&tokens).enumerate() {
            out[b].push(token);
            let eos = config.stop_at_eos && Some(token) == config.eos_token_id;
            if !eos && out[b].len() < limit(b) {
                going.push(i);
            }
        }
        if going.is_empty() || steps == config.max_new_tokens {
            break;
        }
        let tokens: Vec<u32> = going.iter().map(|&i| tokens[i]).collect();
        if going.len() < live.len() {
            run.drop_finished(&going)?;
            live = going.iter().map(|&i| live[i]).collect();
        }
        logits = run.step(&tokens)?;
    }
    for row in &mut out {
        row.resize(steps, config.pad_token_id);
    }
    Ok(out)
}

/// Errors for input generation cannot run on: no prompts, an empty prompt, ids outside the
/// vocabulary, sequences past the model's positions, bad sampling settings.
fn check_inputs<M: LanguageModel + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerateConfig,
) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::Config("generate: no prompts".to_string()));
    }
    if let Some(b) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Config(format!(
            "generate: prompt {b} is empty (it needs at least one token, e.g. BOS)"
        )));
    }
    let vocab = model.vocab_size();
    for (b, prompt) in prompts.iter().enumerate() {
        if let Some((t, id)) = prompt
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(Error::Config(format!(
                "generate: prompt {b} token {t} is id {id}, outside the vocabulary of {vocab}"
            )));
        }
    }
    let named = [
        ("pad_token_id", Some(config.pad_token_id)),
        ("eos_token_id", config.eos_token_id),
    ];
    for (name, id) in named {
        if let Some(id) = id.filter(|&id| id as usize >= vocab) {
            return Err(Error::Config(format!(
                "generate: {name} {id} is outside the vocabulary of {vocab}"
            )));
        }
    }
    if config.min_new_tokens > config.max_new_tokens {
        return Err(Error::Config(format!(
            "generate: min_new_tokens {} exceeds max_new_tokens {}",
            config.min_new_tokens, config.max_new_tokens
        )));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let positions = model.max_positions();
    if longest + config.max_new_tokens > positions {
        return Err(Error::Config(format!(
            "generate: the longest prompt ({longest} tokens) plus max_new_tokens {} exceeds \
             the model's {positions} positions",
            config.max_new_tokens
        )));
    }
    config.sampling.validate()
}

/// The state of one batched generation.
struct Run<'a, M: LanguageModel + ?Sized> {
    model: &'a M,
    device: &'a Device,
    vocab: usize,
    /// The sampled ids: 0..sample_vocab (see [`LanguageModel::sample_vocab`]).
    sample_vocab: usize,
    batch: usize,
    /// Every row's tokens so far, left-padded, (B, T) row-major: the no-cache path's input
    /// (the cache path keeps only the prompts).
    ids: Vec<u32>,
    /// The attention mask of `ids`, (B, T).
    mask: Vec<u32>,
    seq: usize,
    /// The KV cache (cache path only).
    cache: Option<KvCache>,
    /// The layout of the last forward (cache path: the next step's continues it).
    layout: Option<TokenLayout>,
    sampler: Sampler,
}

impl<'a, M: LanguageModel + ?Sized> Run<'a, M> {
    /// The run of `prompts`, each to be sampled `group` times (the sampler and the
    /// finished flags have P x group rows from the start; the model rows become that many
    /// after the prefill, in [`Run::repeat_rows`]).
    fn new(
        model: &'a M,
        prompts: &[Vec<u32>],
        group: usize,
        first_row: usize,
        config: &GenerateConfig,
        device: &'a Device,
    ) -> Result<Run<'a, M>> {
        let batch = prompts.len();
        let seq = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch * seq);
        for prompt in prompts {
            let pad = seq - prompt.len();
            ids.extend(std::iter::repeat_n(config.pad_token_id, pad));
            ids.extend_from_slice(prompt);
            mask.extend(std::iter::repeat_n(0, pad));
            mask.extend(std::iter::repeat_n(1, prompt.len()));
        }
        let cache = config
            .use_cache
            .then(|| KvCache::with_capacity(model.num_layers(), seq + config.max_new_tokens));
        Ok(Run {
            model,
            device,
            vocab: model.vocab_size(),
            sample_vocab: model.sample_vocab(),
            batch,
            ids,
            mask,
            seq,
            cache,
            layout: None,
            sampler: Sampler::for_rows(config.sampling, config.seed, first_row, batch * group)?,
        })
    }

    /// Runs the prompts; the next-token logits (B, V) on the device.
    fn prefill(&mut self) -> Result<Tensor> {
        let layout =
            TokenLayout::from_attention_mask(&self.mask, self.batch, self.seq, self.device)?;
        let ids = Tensor::from_vec(self.ids.clone(), &[self.batch, self.seq], self.device)?;
        let logits = self
            .model
            .forward_last(&ids, &layout, self.cache.as_mut())?;
        self.layout = Some(layout);
        self.last_logits(&logits)
    }

    /// After the prefill: every row (cache, layout, host ids and mask, the prefill's
    /// logits (B, V)) `group` times in a row. Returns the logits (B * group, V).
    fn repeat_rows(&mut self, group: usize, logits: &Tensor) -> Result<Tensor> {
        let (batch, seq) = (self.batch, self.seq);
        if let Some(cache) = &mut self.cache {
            cache.repeat_rows(group)?;
        }
        if let Some(layout) = &mut self.layout {
            *layout = layout.repeat_rows(group)?;
        }
        let repeat = |v: &[u32]| -> Vec<u32> {
            v.chunks(seq.max(1))
                .flat_map(|row| std::iter::repeat_n(row, group))
                .flatten()
                .copied()
                .collect()
        };
        self.ids = repeat(&self.ids);
        self.mask = repeat(&self.mask);
        self.batch = batch * group;
        let index: Vec<u32> = (0..batch * group).map(|r| (r / group) as u32).collect();
        let index = Tensor::from_vec(index, &[batch * group], self.device)?;
        Ok(Tensor::embedding(logits, &index)?)
    }

    /// Keeps rows `rows` (indices of the current rows, in order) of everything the next steps
    /// read: the cache, the layout, the host ids and mask, the sampling streams.
    fn drop_finished(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(cache) = &mut self.cache {
            cache.select_rows(rows)?;
        }
        if let Some(layout) = &mut self.layout {
            *layout = layout.select_rows(rows)?;
        }
        let seq = self.seq.max(1);
        let select = |v: &[u32]| -> Vec<u32> {
            rows.iter()
                .flat_map(|&r| &v[r * seq..(r + 1) * seq])
                .copied()
                .collect()
        };
        if self.cache.is_none() {
            self.ids = select(&self.ids);
            self.mask = select(&self.mask);
        }
        self.sampler.select_rows(rows)?;
        self.batch = rows.len();
        Ok(())
    }

    /// [`Run::drop_finished`] before the first step, with the prefill's logits (B, V):
    /// returns their rows `rows`.
    fn select_rows(&mut self, rows: &[usize], logits: &Tensor) -> Result<Tensor> {
        self.drop_finished(rows)?;
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let index = Tensor::from_vec(index, &[rows.len()], self.device)?;
        Ok(Tensor::embedding(logits, &index)?)
    }

    /// Appends one token per row and returns the next-token logits (B, V) on the device.
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let batch = self.batch;
        let logits = match (&mut self.cache, &mut self.layout) {
            (Some(cache), Some(last)) => {
                let layout = last.next(1)?;
                let ids = Tensor::from_vec(tokens.to_vec(), &[batch, 1], self.device)?;
                let logits = self.model.forward(&ids, &layout, Some(cache))?;
                *last = layout;
                logits
            }
            _ => {
                self.append(tokens);
                let layout =
                    TokenLayout::from_attention_mask(&self.mask, batch, self.seq, self.device)?;
                let ids = Tensor::from_vec(self.ids.clone(), &[batch, self.seq], self.device)?;
                self.model.forward_last(&ids, &layout, None)?
            }
        };
        self.last_logits(&logits)
    }

    /// Appends one token per row to the host ids and mask (the no-cache path's input).
    fn append(&mut self, tokens: &[u32]) {
        let seq = self.seq;
        let mut ids = Vec::with_capacity(self.batch * (seq + 1));
        let mut mask = Vec::with_capacity(self.batch * (seq + 1));
        for (b, &token) in tokens.iter().enumerate() {
            ids.extend_from_slice(&self.ids[b * seq..(b + 1) * seq]);
            ids.push(token);
            mask.extend_from_slice(&self.mask[b * seq..(b + 1) * seq]);
            mask.push(1);
        }
        self.ids = ids;
        self.mask = mask;
        self.seq += 1;
    }

    /// The last position's logits (B, V) of (B, T, V), left on the device: the sampler
    /// reads back only the tokens.
    fn last_logits(&self, logits: &Tensor) -> Result<Tensor> {
        let &[b, t, v] = logits.shape() else {
            return Err(Error::Config(format!(
                "the model returned logits {:?}, expected (B, T, V)",
                logits.shape()
            )));
        };
        if b != self.batch || v != self.vocab || t == 0 {
            return Err(Error::Config(format!(
                "the model returned logits {:?} for a batch of {} over {} tokens",
                logits.shape(),
                self.batch,
                self.vocab
            )));
        }
        let last = if t == 1 {
            logits.clone()
        } else {
            logits.narrow(1, t - 1, 1)? // (B, 1, V)
        };
        let last = last.reshape(&[b, v])?;
        if self.sample_vocab < v {
            // Drop the ids the tokenizer cannot decode: sampling from the rest is sampling
            // with their logits at -inf. (A copy of B x V floats, on the device.)
            return Ok(last.narrow(1, 0, self.sample_vocab)?);
        }
        Ok(last)
    }
}
