//! Log-probabilities of the tokens of a sequence under a model: what perplexity, SFT
//! evaluation and the policy and reference log-probs of PPO, GRPO and DPO are made of.

use lathe_core::Tensor;

use crate::attention::TokenLayout;
use crate::generate::{LanguageModel, IGNORE};
use crate::{Error, Result};

/// The targets of [`token_logprobs`] for host ids (B, T): ids[b, t + 1] for each t < T - 1,
/// or [`IGNORE`] where `wanted` (B (T - 1)) says the prediction is not needed (a prompt's
/// positions: the model then skips their LM-head work where it can).
pub fn next_tokens(ids: &[u32], seq: usize, wanted: Option<&[bool]>) -> Result<Vec<u32>> {
    if seq < 2 || !ids.len().is_multiple_of(seq) {
        return Err(Error::Config(format!(
            "next_tokens: {} ids do not make rows of {seq} >= 2 tokens",
            ids.len()
        )));
    }
    let targets: Vec<u32> = ids
        .chunks(seq)
        .flat_map(|row| row[1..].iter().copied())
        .collect();
    match wanted {
        None => Ok(targets),
        Some(wanted) if wanted.len() == targets.len() => Ok(targets
            .into_iter()
            .zip(wanted)
            .map(|(t, &w)| if w { t } else { IGNORE })
            .collect()),
        Some(wanted) => Err(Error::Config(format!(
            "next_tokens: {} flags for {} predictions",
            wanted.len(),
            targets.len()
        ))),
    }
}

/// log p(targets[b, t] | ids[b, ..= t]) for every row b and t < T - 1: ids (B, T) u32 ->
/// (B, T - 1) f32, on the model's device; `targets` from [`next_tokens`] (entries that are
/// [`IGNORE`] are 0). The LM head and log-softmax are fused: on the CPU neither the (B, T,
/// V) probabilities nor the logits are held. Entries whose context is padding are computed
/// all the same; the caller masks them.
pub fn token_logprobs<M: LanguageModel + ?Sized>(
    model: &M,
    ids: &Tensor,
    layout: &TokenLayout,
    targets: &[u32],
) -> Result<Tensor> {
    Ok(model.next_token_logprobs(ids, layout, targets, false)?.0)
}

/// [`token_logprobs`] and the entropy of each of those predictions, (B, T - 1) each: the
/// policy's entropy trl's GRPO logs. The entropy is a statistic (no gradient), read in the
/// same pass over the logits.
pub fn token_logprobs_and_entropy<M: LanguageModel + ?Sized>(
    model: &M,
    ids: &Tensor,
    layout: &TokenLayout,
    targets: &[u32],
) -> Result<(Tensor, Tensor)> {
    match model.next_token_logprobs(ids, layout, targets, true)? {
        (logps, Some(entropy)) => Ok((logps, entropy)),
        (_, None) => Err(Error::Config(
            "next_token_logprobs returned no entropy though it was asked for one".into(),
        )),
    }
}
