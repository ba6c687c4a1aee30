//! Picking the next token from logits: greedy argmax, or seeded sampling after temperature,
//! top-k and top-p (nucleus) filtering, in transformers' order (`TemperatureLogitsWarper`,
//! `TopKLogitsWarper`, `TopPLogitsWarper`, then a draw), defined so that a GPU computes it
//! without sorting the vocabulary.
//!
//! On a GPU the sampler runs as a kernel (`sample.wgsl`, launched by
//! [`crate::sampling_gpu`]) and generation reads back one token id per row and step; on the
//! CPU it runs here, in f64, with the same definition (see [`candidates`], [`sample_row_at`]).
//! Its random numbers come from a small self-contained generator (xoshiro256** seeded
//! through splitmix64), so a seed gives the same tokens on every platform and with every
//! backend that produces the same logits.

use lathe_core::{Rng, Tensor};

use crate::{Error, Result};

/// How the next token is chosen from a row of logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Logits are divided by this before sampling (> 0); ignored when `greedy`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (ties with the k-th kept, as transformers);
    /// 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability sums to at least
    /// `top_p` (never fewer than one token; every token tied with the last one stays, see
    /// [`candidates`]); 1.0 = off.
    pub top_p: f32,
    /// Take the most likely token (the first on ties) instead of sampling.
    pub greedy: bool,
}

impl Default for SamplingConfig {
    /// Plain sampling from the model's distribution (temperature 1, no filtering).
    fn default() -> SamplingConfig {
        SamplingConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            greedy: false,
        }
    }
}

impl SamplingConfig {
    /// Argmax decoding.
    pub fn greedy() -> SamplingConfig {
        SamplingConfig {
            greedy: true,
            ..SamplingConfig::default()
        }
    }

    /// Errors unless the temperature is positive and finite and top_p is in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if self.greedy {
            return Ok(());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::Config(format!(
                "sampling temperature must be positive and finite, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Config(format!(
                "sampling top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The index of the largest value, the first one on ties (NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// The tokens sampling may pick from a row of logits, in token-id order, with their
/// unnormalised probabilities p (all > 0): temperature, then top-k, then top-p.
///
/// The definition is the one the GPU kernel (`sample.wgsl`) computes without sorting:
/// - p_i = exp((l_i - max) / T); tokens whose p is 0 (logit -inf, or underflow) are never
///   kept.
/// - top-k (0 < k < V): keep tokens whose logit is >= the k-th largest logit, so ties with
///   the k-th are kept (as transformers' `TopKLogitsWarper`).
/// - top-p (< 1): with total = the sum of p over the tokens kept so far, keep token i iff
///   the mass of the kept tokens with p_j > p_i is < top_p * total. This is a threshold
///   rule: every token tied with the boundary probability stays. transformers'
///   `TopPLogitsWarper` cuts inside a tie (by its sort order); otherwise the two agree.
pub fn candidates(logits: &[f32], config: &SamplingConfig) -> Result<Vec<(u32, f64)>> {
    config.validate()?;
    let max = checked_max(logits)? as f64;
    let temperature = config.temperature as f64;
    let kth = top_k_threshold(logits, config.top_k);
    // (l - max) / T rather than l / T - max / T: no inf - inf for tiny temperatures.
    let mut kept: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|&(_, &l)| kth.is_none_or(|kth| l >= kth))
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / temperature).exp()))
        .filter(|&(_, p)| p > 0.0)
        .collect();
    if config.top_p < 1.0 {
        let threshold = top_p_threshold(&kept, config.top_p as f64);
        kept.retain(|&(_, p)| p >= threshold);
    }
    Ok(kept)
}

/// The k-th largest logit when top-k filters anything (0 < k < V).
fn top_k_threshold(logits: &[f32], top_k: usize) -> Option<f32> {
    if top_k == 0 || top_k >= logits.len() {
        return None;
    }
    let mut values = logits.to_vec();
    let (_, kth, _) = values.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
    Some(*kth)
}

/// The smallest probability top-p keeps: walking the distinct values of p from the largest,
/// a value stays while the mass strictly above it is below `top_p` * total.
fn top_p_threshold(kept: &[(u32, f64)], top_p: f64) -> f64 {
    let limit = top_p * kept.iter().map(|c| c.1).sum::<f64>();
    let mut probs: Vec<f64> = kept.iter().map(|c| c.1).collect();
    probs.sort_by(|a, b| b.total_cmp(a));
    let mut above = 0.0;
    let mut threshold = f64::INFINITY;
    for group in probs.chunk_by(|a, b| a == b) {
        if above >= limit {
            break;
        }
        threshold = group[0];
        above += group.iter().sum::<f64>();
    }
    threshold
}

/// The largest logit, after checking the row holds no NaN or +inf and some finite value.
pub(crate) fn checked_max(logits: &[f32]) -> Result<f32> {
    if let Some(i) = logits
        .iter()
        .position(|l| l.is_nan() || *l == f32::INFINITY)
    {
        return Err(Error::Config(format!(
            "logit {i} is {}: cannot sample",
            logits[i]
        )));
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(Error::Config(format!(
            "every one of the {} logits is -inf (or there are none): no token to pick",
            logits.len()
        )));
    }
    Ok(max)
}

/// The largest f32 below 1: where a draw that rounds up to 1 goes.
const BELOW_ONE: f32 = 1.0 - f32::EPSILON / 2.0;

/// The uniform of one draw: `next_f64` rounded to f32 (kept below 1), so the host and the
/// GPU kernel (which takes f32 uniforms) draw with the very same number.
pub fn next_uniform(rng: &mut Rng) -> f32 {
    (rng.next_f64() as f32).min(BELOW_ONE)
}

/// Picks one token of a row of logits: argmax when greedy (no random number used), else a
/// draw from `candidates` with one uniform of `rng`.
pub fn sample_row(logits: &[f32], config: &SamplingConfig, rng: &mut Rng) -> Result<u32> {
    if config.greedy {
        return sample_row_at(logits, config, 0.0);
    }
    sample_row_at(logits, config, next_uniform(rng))
}

/// Picks one token of a row of logits with the uniform `u` in [0, 1): argmax when greedy
/// (`u` unused), else the first candidate in token-id order whose running sum of p (in id
/// order) exceeds u * sum(p), or the last candidate if rounding runs past the end. The draw
/// in id order needs no sort, so the GPU kernel computes the same token.
pub fn sample_row_at(logits: &[f32], config: &SamplingConfig, u: f32) -> Result<u32> {
    if config.greedy {
        checked_max(logits)?;
        return Ok(argmax(logits) as u32);
    }
    if !(0.0..1.0).contains(&u) {
        return Err(Error::Config(format!(
            "the uniform of a draw must be in [0, 1), got {u}"
        )));
    }
    let candidates = candidates(logits, config)?;
    let total: f64 = candidates.iter().map(|c| c.1).sum();
    let target = u as f64 * total;
    let mut running = 0.0;
    for &(token, p) in &candidates {
        running += p;
        if running > target {
            return Ok(token);
        }
    }
    // Only rounding gets here: the draw fell past the last candidate's share.
    Ok(candidates.last().expect("at least one candidate").0)
}

/// A sampler with one random stream per batch row, so a row's tokens depend on the seed and
/// its row index only, not on the other rows or on when they finish.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rows: Vec<Rng>,
}

impl Sampler {
    /// A sampler of `batch` rows, row b's stream seeded from (`seed`, b); an error when
    /// `config` is out of range.
    pub fn new(config: SamplingConfig, seed: u64, batch: usize) -> Result<Sampler> {
        Self::for_rows(config, seed, 0, batch)
    }

    /// The sampler of rows `first_row .. first_row + batch` of a larger batch: row b's
    /// stream is that of row `first_row + b` of [`Sampler::new`].
    pub fn for_rows(
        config: SamplingConfig,
        seed: u64,
        first_row: usize,
        batch: usize,
    ) -> Result<Sampler> {
        config.validate()?;
        let rows = (first_row as u64..(first_row + batch) as u64)
            .map(|b| Rng::new(seed ^ b.wrapping_mul(0xd1b5_4a32_d192_ed03)))
            .collect();
        Ok(Sampler { config, rows })
    }

    /// Keeps the streams of `rows` (indices into the current rows, in the new order): the
    /// sampler of a batch whose finished rows were dropped. Each kept row goes on with its
    /// own stream, so its tokens are those it would have drawn in the whole batch.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let kept = rows
            .iter()
            .map(|&r| {
                self.rows.get(r).cloned().ok_or_else(|| {
                    Error::Config(format!("sampler has {} rows, no row {r}", self.rows.len()))
                })
            })
            .collect::<Result<Vec<Rng>>>()?;
        self.rows = kept;
        Ok(())
    }

    /// The sampling settings.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// One token per row of host logits (B * V values, row-major).
    pub fn sample_host(&mut self, logits: &[f32], vocab: usize) -> Result<Vec<u32>> {
        let batch = self.rows.len();
        if vocab == 0 || logits.len() != batch * vocab {
            return Err(Error::Config(format!(
                "sampler for {batch} rows got {} logits with a vocabulary of {vocab}",
                logits.len()
            )));
        }
        logits
            .chunks(vocab)
            .zip(&mut self.rows)
            .enumerate()
            .map(|(b, (row, rng))| {
                sample_row(row, &self.config, rng)
                    .map_err(|e| Error::Config(format!("batch row {b}: {e}")))
            })
            .collect()
    }

    /// One token per row of logits (B, V) on any device. On a GPU the kernel samples there
    /// and only the B token ids are read back.
    pub fn sample(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        self.sample_suppressing(logits, None)
    }

    /// As [`Sampler::sample`], with the logit of `suppress` taken as -inf in every row (EOS
    /// before `min_new_tokens`), so no pass over the logits is needed on the host.
    pub fn sample_suppressing(
        &mut self,
        logits: &Tensor,
        suppress: Option<u32>,
    ) -> Result<Vec<u32>> {
        let batch = self.rows.len();
        let vocab = match logits.shape() {
            &[b, v] if b == batch && v > 0 => v,
            shape => {
                return Err(Error::Config(format!(
                    "sampler for {batch} rows takes logits ({batch}, V) with V > 0, got \
                     {shape:?}"
                )))
            }
        };
        if let Some(token) = suppress.filter(|&t| t as usize >= vocab) {
            return Err(Error::Config(format!(
                "sampler: token {token} to suppress is outside the vocabulary of {vocab}"
            )));
        }
        if !logits.device().is_gpu() {
            let mut host = logits.to_vec_f32()?;
            if let Some(token) = suppress {
                suppress_host(&mut host, vocab, token);
            }
            return self.sample_host(&host, vocab);
        }
        let uniforms = self.uniforms();
        crate::sampling_gpu::sample_on_device(logits, &self.config, &uniforms, suppress)
    }

    /// One uniform per row for the next draw (none consumed when greedy: zeros).
    fn uniforms(&mut self) -> Vec<f32> {
        if self.config.greedy {
            return vec![0.0; self.rows.len()];
        }
        self.rows.iter_mut().map(next_uniform).collect()
    }
}

/// Sets the logit of `token` in every row of host logits (B * V) to -inf.
pub(crate) fn suppress_host(logits: &mut [f32], vocab: usize, token: u32) {
    logits
        .chunks_mut(vocab)
        .for_each(|row| row[token as usize] = f32::NEG_INFINITY);
}
