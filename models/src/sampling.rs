//! Picking the next token from logits: greedy argmax, or seeded sampling after temperature,
//! top-k and top-p (nucleus) filtering, in transformers' order (`TemperatureLogitsWarper`,
//! `TopKLogitsWarper`, `TopPLogitsWarper`, then a multinomial draw).
//!
//! The sampler runs on the host over one (B, V) block of logits per step (on a GPU only the
//! last position's logits are read back). Its random numbers come from a small
//! self-contained generator (xoshiro256** seeded through splitmix64), so a seed gives the
//! same tokens on every platform and with every backend that produces the same logits.

use lathe_core::Tensor;

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
    /// `top_p` (never fewer than one token); 1.0 = off.
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

/// xoshiro256** (Blackman and Vigna), its state seeded by splitmix64: fast, small, and the
/// same numbers everywhere.
#[derive(Clone, Debug)]
pub struct Rng {
    state: [u64; 4],
}

/// One splitmix64 step: advances `x` and returns the next output.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        Rng {
            state: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
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

/// The tokens sampling may pick from a row of logits and their unnormalised probabilities,
/// most likely first (ties in token order): temperature, then top-k, then top-p.
pub fn candidates(logits: &[f32], config: &SamplingConfig) -> Result<Vec<(u32, f64)>> {
    config.validate()?;
    let max = checked_max(logits)?;
    let temperature = config.temperature as f64;
    // (l - max) / T rather than l / T - max / T: no inf - inf for tiny temperatures.
    let mut weighted: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max as f64) / temperature).exp()))
        .filter(|&(_, p)| p > 0.0)
        .collect();
    weighted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if config.top_k > 0 && config.top_k < weighted.len() {
        // transformers keeps every token whose score reaches the k-th largest.
        let kth = weighted[config.top_k - 1].1;
        weighted.retain(|&(_, p)| p >= kth);
    }
    if config.top_p < 1.0 {
        let total: f64 = weighted.iter().map(|c| c.1).sum();
        let mut before = 0.0;
        let keep = weighted
            .iter()
            .take_while(|&&(_, p)| {
                let kept = before < config.top_p as f64 * total;
                before += p;
                kept
            })
            .count();
        weighted.truncate(keep.max(1));
    }
    Ok(weighted)
}

/// The largest logit, after checking the row holds no NaN or +inf and some finite value.
fn checked_max(logits: &[f32]) -> Result<f32> {
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

/// Picks one token of a row of logits: argmax when greedy, else a draw from `candidates`.
pub fn sample_row(logits: &[f32], config: &SamplingConfig, rng: &mut Rng) -> Result<u32> {
    if config.greedy {
        checked_max(logits)?;
        return Ok(argmax(logits) as u32);
    }
    let candidates = candidates(logits, config)?;
    let total: f64 = candidates.iter().map(|c| c.1).sum();
    let mut u = rng.next_f64() * total;
    for &(token, p) in &candidates {
        if u < p {
            return Ok(token);
        }
        u -= p;
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
    pub fn new(config: SamplingConfig, seed: u64, batch: usize) -> Result<Sampler> {
        config.validate()?;
        let rows = (0..batch as u64)
            .map(|b| Rng::new(seed ^ b.wrapping_mul(0xd1b5_4a32_d192_ed03)))
            .collect();
        Ok(Sampler { config, rows })
    }

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

    /// One token per row of logits (B, V) on any device (read back to the host).
    pub fn sample(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        let &[_, vocab] = logits.shape() else {
            return Err(Error::Config(format!(
                "sampler takes logits (B, V), got {:?}",
                logits.shape()
            )));
        };
        self.sample_host(&logits.to_vec_f32()?, vocab)
    }
}
