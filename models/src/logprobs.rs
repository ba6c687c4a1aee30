//! Log-probabilities of the tokens of a sequence under a model: what perplexity, SFT
//! evaluation and the policy and reference log-probs of PPO, GRPO and DPO are made of.

use lathe_core::{Device, Tensor};

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

/// [`token_logprobs_and_entropy`] (or, without `entropy`, [`token_logprobs`]) of host ids
/// (B, T) right-padded past each row's `lengths[b]` tokens, computed on the real tokens
/// alone: the rows are packed back to back ([`TokenLayout::packed`]), so no padding runs
/// through the model; `device` is the model's. Returns (B, T - 1) as the padded call does,
/// equal to it at every prediction within a row and 0 past it (the targets there must be
/// [`IGNORE`]).
pub fn packed_token_logprobs<M: LanguageModel + ?Sized>(
    model: &M,
    ids: &[u32],
    (batch, seq): (usize, usize),
    lengths: &[usize],
    targets: &[u32],
    entropy: bool,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let cols = seq.saturating_sub(1);
    if batch == 0 || seq < 2 || ids.len() != batch * seq || targets.len() != batch * cols {
        return Err(Error::Config(format!(
            "packed_token_logprobs: {} ids and {} targets for (B, T) = ({batch}, {seq}), B >= 1, \
             T >= 2",
            ids.len(),
            targets.len()
        )));
    }
    if lengths.len() != batch || lengths.iter().any(|&len| len == 0 || len > seq) {
        return Err(Error::Config(format!(
            "packed_token_logprobs: row lengths {lengths:?} for {batch} rows of {seq} tokens"
        )));
    }
    if let Some(r) = (0..batch).find(|&r| {
        targets[r * cols + lengths[r] - 1..(r + 1) * cols]
            .iter()
            .any(|&t| t != IGNORE)
    }) {
        return Err(Error::Config(format!(
            "packed_token_logprobs: row {r} has a target past its {} tokens",
            lengths[r]
        )));
    }
    let total: usize = lengths.iter().sum();
    // The packed row: every row's real tokens, then one padding token, so that the last
    // real token too has a prediction slot (ignored, so 0) for the padding to read.
    let mut packed_ids = Vec::with_capacity(total + 1);
    let mut packed_targets = Vec::with_capacity(total);
    let mut slots = Vec::with_capacity(batch * cols);
    for (r, &len) in lengths.iter().enumerate() {
        let start = packed_ids.len();
        packed_ids.extend_from_slice(&ids[r * seq..r * seq + len]);
        packed_targets.extend_from_slice(&targets[r * cols..r * cols + len - 1]);
        packed_targets.push(IGNORE);
        // (B, T - 1) slot -> packed prediction: its own, or the row's last (ignored) one.
        slots.extend((0..cols).map(|t| (start + t.min(len - 1)) as u32));
    }
    packed_ids.push(ids[seq - 1]);
    let mut row_lengths = lengths.to_vec();
    row_lengths.push(1);
    let layout = TokenLayout::packed(&row_lengths, device)?;
    let packed = Tensor::from_vec(packed_ids, &[1, total + 1], device)?;
    let (logps, entropies) =
        model.next_token_logprobs(&packed, &layout, &packed_targets, entropy)?;
    let slot_ids = Tensor::from_vec(slots.clone(), &[batch, cols], device)?;
    // (1, total) -> (B, T - 1), through a gather that carries the gradient back (its
    // indices given from the host: no GPU read-back).
    let unpack = |x: Tensor| -> Result<Tensor> {
        let rows = x.reshape(&[total, 1])?;
        let gathered = Tensor::embedding_with_host_ids(&rows, &slot_ids, slots.clone())?;
        Ok(gathered.reshape(&[batch, cols])?)
    };
    Ok((unpack(logps)?, entropies.map(unpack).transpose()?))
}
