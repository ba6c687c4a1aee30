//! Rollouts as the seed makes them: a query is the first L tokens of a text (L drawn
//! uniformly from a range), a response is sampled with the policy (no early stop at EOS)
//! and cut to a length drawn from another range; the reward scores the decoded text.

use lathe_core::{Collective, Device, Rng, Solo};
use lathe_models::generate::{generate_rows, GenerateConfig};
use lathe_models::hf::CausalLm;
use lathe_models::sampling::SamplingConfig;
use lathe_models::tokenizer::Tokenizer;

use crate::{Error, Result};

/// Scores texts (query + response decoded), one number each; larger is better.
pub trait Reward {
    /// One score per text, in order; an error stops the step.
    fn score(&mut self, texts: &[String]) -> Result<Vec<f32>>;
}

impl<F> Reward for F
where
    F: FnMut(&[String]) -> Result<Vec<f32>>,
{
    fn score(&mut self, texts: &[String]) -> Result<Vec<f32>> {
        self(texts)
    }
}

/// The longest query or response length accepted (tokens).
pub const MAX_LENGTH: usize = 1 << 16;

/// An inclusive range of lengths, drawn uniformly (trl's `LengthSampler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthRange {
    /// The shortest length (>= 1).
    pub min: usize,
    /// The longest length (>= min, <= [`MAX_LENGTH`]).
    pub max: usize,
}

impl LengthRange {
    /// A length drawn uniformly from `min..=max` (the range must be valid).
    pub fn sample(&self, rng: &mut Rng) -> usize {
        self.min + (rng.next_u64() % (self.max - self.min + 1) as u64) as usize
    }

    /// Checks 1 <= min <= max <= [`MAX_LENGTH`]; `what` names the range in the error.
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.min == 0 || self.min > self.max || self.max > MAX_LENGTH {
            return Err(Error::Config(format!(
                "{what} range {}..={} must satisfy 1 <= min <= max <= {MAX_LENGTH}",
                self.min, self.max
            )));
        }
        Ok(())
    }
}

/// `MIN-MAX` (as `--query-length 2-7` gives it), or one number for a fixed length.
impl std::str::FromStr for LengthRange {
    type Err = Error;

    fn from_str(text: &str) -> Result<LengthRange> {
        let number = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| {
                Error::Config(format!(
                    "{text:?} is not a length range: write MIN-MAX (e.g. 2-7) or one length"
                ))
            })
        };
        let (min, max) = match text.split_once('-') {
            Some((min, max)) => (number(min)?, number(max)?),
            None => (number(text)?, number(text)?),
        };
        Ok(LengthRange { min, max })
    }
}

/// The prompts a run draws its queries from, tokenized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompts {
    tokenized: Vec<Vec<u32>>,
    /// Each prompt is a query as it stands (a chat-templated prompt), rather than the
    /// first L tokens of a text.
    whole: bool,
}

impl Prompts {
    /// Texts whose first L tokens (L drawn per query) make a query: the seed's setup.
    /// Tokenized with the tokenizer's special tokens; texts with no token are left out.
    pub fn cut_from_texts(tokenizer: &Tokenizer, texts: &[String]) -> Result<Prompts> {
        let tokenized = texts
            .iter()
            .map(|t| tokenizer.encode(t, true))
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect();
        Prompts::new(tokenized, false)
    }

    /// Whole prompts (e.g. rendered through the model's chat template), each a query as it is.
    pub fn whole(tokenized: Vec<Vec<u32>>) -> Result<Prompts> {
        Prompts::new(tokenized, true)
    }

    fn new(tokenized: Vec<Vec<u32>>, whole: bool) -> Result<Prompts> {
        if tokenized.iter().all(Vec::is_empty) {
            return Err(Error::Config(
                "no prompt: no text gives a token to start a query from".into(),
            ));
        }
        let tokenized = tokenized.into_iter().filter(|t| !t.is_empty()).collect();
        Ok(Prompts { tokenized, whole })
    }

    /// Number of prompts (those with at least one token).
    pub fn len(&self) -> usize {
        self.tokenized.len()
    }

    /// Whether there is no prompt (never, once constructed).
    pub fn is_empty(&self) -> bool {
        self.tokenized.is_empty()
    }

    /// Whether each prompt is a query as it stands, rather than a text cut to a length.
    pub fn is_whole(&self) -> bool {
        self.whole
    }

    /// `count` queries: prompts drawn uniformly with `rng`, each cut to a length drawn from
    /// `lengths` unless the prompts are whole.
    pub fn draw(&self, count: usize, lengths: LengthRange, rng: &mut Rng) -> Vec<Vec<u32>> {
        let n = self.tokenized.len() as u64;
        let drawn: Vec<&[u32]> = (0..count)
            .map(|_| self.tokenized[(rng.next_u64() % n) as usize].as_slice())
            .collect();
        if self.whole {
            drawn.iter().map(|p| p.to_vec()).collect()
        } else {
            make_queries(&drawn, lengths, rng)
        }
    }

    /// sha256 of the prompts' tokens (and of "whole" for whole prompts), for resuming.
    pub fn fingerprint(&self) -> String {
        let mut bytes = Vec::new();
        if self.whole {
            bytes.extend(b"whole");
        }
        for t in &self.tokenized {
            bytes.extend((t.len() as u64).to_le_bytes());
            bytes.extend(t.iter().flat_map(|x| x.to_le_bytes()));
        }
        lathe_train::resume::bytes_fingerprint(&bytes)
    }
}

/// Queries: for each text drawn (in `order`), its first L tokens with L from `lengths`
/// (texts shorter than L give all their tokens; empty texts are skipped by the caller).
pub fn make_queries(tokenized: &[&[u32]], lengths: LengthRange, rng: &mut Rng) -> Vec<Vec<u32>> {
    tokenized
        .iter()
        .map(|ids| {
            let l = lengths.sample(rng).min(ids.len());
            ids[..l].to_vec()
        })
        .collect()
}

/// Samples one response per query with `sampling` (the seed: top_k 0, top_p 1, sampled),
/// `max(lengths)` new tokens without stopping at EOS, then cuts each to its own drawn
/// length, as the seed's per-sample `LengthSampler`.
#[allow(clippy::too_many_arguments)]
pub fn sample_responses(
    model: &CausalLm,
    queries: &[Vec<u32>],
    lengths: LengthRange,
    sampling: SamplingConfig,
    pad_id: u32,
    seed: u64,
    rng: &mut Rng,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    sample_responses_on_ranks(
        model, queries, lengths, sampling, pad_id, seed, rng, device, &Solo,
    )
}

/// [`sample_responses`] shared by the ranks of `collective`: rank r generates its
/// contiguous share of the rows (with those rows' sampling streams) and every rank gets
/// every response. `rng` is drawn from as by one process.
#[allow(clippy::too_many_arguments)]
pub fn sample_responses_on_ranks(
    model: &CausalLm,
    queries: &[Vec<u32>],
    lengths: LengthRange,
    sampling: SamplingConfig,
    pad_id: u32,
    seed: u64,
    rng: &mut Rng,
    device: &Device,
    collective: &dyn Collective,
) -> Result<Vec<Vec<u32>>> {
    let wanted: Vec<usize> = queries.iter().map(|_| lengths.sample(rng)).collect();
    let config = GenerateConfig {
        max_new_tokens: lengths.max,
        min_new_tokens: 0,
        eos_token_id: None,
        stop_at_eos: false,
        pad_token_id: pad_id,
        sampling,
        seed,
        use_cache: true,
    };
    let (rank, ranks, b) = (collective.rank(), collective.size(), queries.len());
    let (first, end) = (rank * b / ranks, (rank + 1) * b / ranks);
    let mine = if first < end {
        generate_rows(
            model,
            &queries[first..end],
            first,
            Some(&wanted[first..end]),
            &config,
            device,
        )?
    } else {
        Vec::new()
    };
    let out = if ranks == 1 {
        mine
    } else {
        // Every rank's rows, as little-endian u32 ids with a length before each row.
        let mut bytes = Vec::new();
        for row in &mine {
            bytes.extend((row.len() as u32).to_le_bytes());
            bytes.extend(row.iter().flat_map(|t| t.to_le_bytes()));
        }
        let mut all = Vec::with_capacity(b);
        for part in collective.all_gather_bytes(&bytes)? {
            let words: Vec<u32> = part
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect();
            let mut at = 0;
            while at < words.len() {
                let n = words[at] as usize;
                all.push(words[at + 1..at + 1 + n].to_vec());
                at += 1 + n;
            }
        }
        if all.len() != b {
            return Err(lathe_core::Error::Collective(format!(
                "gathered {} responses for {b} queries",
                all.len()
            ))
            .into());
        }
        all
    };
    Ok(out
        .into_iter()
        .zip(wanted)
        .map(|(mut r, n)| {
            r.truncate(n);
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_prompts_are_drawn_whole_and_texts_are_cut() {
        let ids = vec![vec![1, 2, 3, 4, 5, 6, 7, 8], vec![9, 10, 11, 12, 13, 14]];
        let lengths = LengthRange { min: 2, max: 3 };
        let whole = Prompts::whole(ids.clone()).unwrap();
        let cut = Prompts::new(ids.clone(), false).unwrap();
        let drawn_whole = whole.draw(16, lengths, &mut Rng::new(5));
        let drawn_cut = cut.draw(16, lengths, &mut Rng::new(5));
        assert!(drawn_whole.iter().all(|q| ids.contains(q)));
        for q in &drawn_cut {
            assert!((2..=3).contains(&q.len()), "{q:?}");
            assert!(ids.iter().any(|p| p.starts_with(q)), "{q:?}");
        }
        // Both modes draw the same prompts in the same order for the same generator.
        for (w, c) in drawn_whole.iter().zip(&drawn_cut) {
            assert!(w.starts_with(c));
        }
        assert_ne!(whole.fingerprint(), cut.fingerprint());
        assert!(Prompts::whole(vec![vec![], vec![]]).is_err());
        assert_eq!(Prompts::whole(vec![vec![], vec![3]]).unwrap().len(), 1);
    }
}
