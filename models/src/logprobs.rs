//! Log-probabilities of the tokens of a sequence under a model: what perplexity, SFT
//! evaluation and PPO's policy and reference log-probs are made of.

use lathe_core::Tensor;

use crate::attention::TokenLayout;
use crate::generate::LanguageModel;
use crate::{Error, Result};

/// log p(ids[b, t + 1] | ids[b, ..= t]) for every row b and t < T - 1: ids (B, T) u32 ->
/// (B, T - 1) f32, on the model's device. Fused log-softmax + gather: the (B, T, V)
/// probabilities are never materialised (the logits are). Entries whose target or context
/// is padding are computed all the same; the caller masks them.
pub fn token_logprobs<M: LanguageModel + ?Sized>(
    model: &M,
    ids: &Tensor,
    layout: &TokenLayout,
) -> Result<Tensor> {
    Ok(predictions(model, ids, layout)?.0)
}

/// [`token_logprobs`] and the entropy of each of those predictions, (B, T - 1) each: the
/// policy's entropy trl's GRPO logs. The entropy is a statistic (no gradient), read from
/// the same logits in one more pass over them.
pub fn token_logprobs_and_entropy<M: LanguageModel + ?Sized>(
    model: &M,
    ids: &Tensor,
    layout: &TokenLayout,
) -> Result<(Tensor, Tensor)> {
    let (logps, predicting) = predictions(model, ids, layout)?;
    Ok((logps, predicting.detach().entropy_last()?))
}

/// The log-probs (B, T - 1) and the logits (B, T - 1, V) they come from.
fn predictions<M: LanguageModel + ?Sized>(
    model: &M,
    ids: &Tensor,
    layout: &TokenLayout,
) -> Result<(Tensor, Tensor)> {
    let &[batch, seq] = ids.shape() else {
        return Err(Error::Config(format!(
            "token_logprobs takes ids (B, T), got {:?}",
            ids.shape()
        )));
    };
    if seq < 2 {
        return Err(Error::Config(format!(
            "token_logprobs needs at least 2 tokens per row (one to predict from), got {seq}"
        )));
    }
    let logits = model.forward(ids, layout, None)?; // (B, T, V)
    let predicting = logits.narrow(1, 0, seq - 1)?; // (B, T - 1, V)
    let targets = ids.narrow(1, 1, seq - 1)?; // (B, T - 1)
    let out = predicting.log_softmax_gather(&targets)?;
    debug_assert_eq!(out.shape(), [batch, seq - 1]);
    Ok((out, predicting))
}
