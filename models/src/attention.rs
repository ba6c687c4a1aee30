//! What GPT-NeoX and Llama attention share: where each token sits ([`TokenLayout`]:
//! rotary positions, the valid key range of each row of a padded batch, or several sequences
//! packed into one row), splitting and merging heads, and scaled dot-product attention with
//! causal and key-padding masks and grouped-query key/value heads.

use lathe_core::ops::softmax::AttentionMask;
use lathe_core::{Device, Tensor};

use crate::{Error, Result};

/// The rotary position of every token of a batch and which keys each row may attend to.
///
/// Batches of prompts of different lengths are left-padded: row b's real tokens start after
/// its padding, their positions count from 0 there (HF: `attention_mask.cumsum(-1) - 1`), and
/// keys outside the row's range `[start, end)` are masked for every query. Key coordinates
/// count from the start of the sequence, KV cache included.
///
/// A packed layout ([`TokenLayout::packed`]) holds sequences of different lengths back to back
/// in one row: no padding reaches the linear layers, and attention runs per sequence.
#[derive(Clone, Debug)]
pub struct TokenLayout {
    /// (B, T) u32 on the model's device.
    positions: Tensor,
    /// The same positions on the host, for building the next step's layout.
    positions_host: Vec<u32>,
    /// Per row, the valid keys [start, end); `None` when every key is valid.
    key_ranges: Option<Vec<(u32, u32)>>,
    /// Set when the one row holds several sequences back to back.
    packing: Option<Packing>,
}

/// Sequences packed back to back in one row of N tokens, and the gathers that move them to
/// a right-padded (S, T_max) batch and back: attention runs on the padded batch, where a
/// causal mask is all a sequence needs (its padding comes after every real query), while
/// every other layer runs on the N real tokens alone.
#[derive(Clone, Debug)]
pub struct Packing {
    /// Tokens of each sequence.
    lengths: Vec<usize>,
    /// (S, T_max) u32: the packed token at each padded slot; a padding slot repeats its
    /// sequence's last token, whose query is dropped and whose key no real query sees.
    to_padded: Tensor,
    /// (N,) u32: the padded slot (row-major in (S, T_max)) of each packed token.
    from_padded: Tensor,
    /// The two index tensors' values on the host: the gathers never read them back.
    to_padded_host: Vec<u32>,
    from_padded_host: Vec<u32>,
}

impl Packing {
    /// Tokens of each sequence, in packing order.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// tokens (N, width) -> (S, T_max, width): each sequence on its own row, its padding
    /// slots repeating its last token. A gather: gradients flow back to the tokens.
    pub fn to_padded(&self, tokens: &Tensor) -> Result<Tensor> {
        Ok(Tensor::embedding_with_host_ids(
            tokens,
            &self.to_padded,
            self.to_padded_host.clone(),
        )?)
    }

    /// padded (S, T_max, width) -> (N, width): the real tokens back in packing order.
    pub fn from_padded(&self, padded: &Tensor) -> Result<Tensor> {
        let [s, t_max, width] = *padded.shape() else {
            return Err(Error::Config(format!(
                "a padded batch must be (S, T_max, width), got {:?}",
                padded.shape()
            )));
        };
        let slots = padded.reshape(&[s * t_max, width])?;
        Ok(Tensor::embedding_with_host_ids(
            &slots,
            &self.from_padded,
            self.from_padded_host.clone(),
        )?)
    }

    /// x (1, heads, N, d) -> (S, heads, T_max, d): each sequence on its own row.
    fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let [_, heads, n, d] = *x.shape() else {
            return Err(Error::Config(format!(
                "packed attention input must be (1, heads, N, d), got {:?}",
                x.shape()
            )));
        };
        let tokens = x.permute(&[0, 2, 1, 3])?.reshape(&[n, heads * d])?;
        split_heads(&self.to_padded(&tokens)?, heads)
    }

    /// context (S, T_max, width) -> (1, N, width): the real tokens back in packing order.
    fn repack(&self, context: &Tensor) -> Result<Tensor> {
        let tokens = self.from_padded(context)?;
        let [n, width] = *tokens.shape() else {
            unreachable!("from_padded returns (N, width)")
        };
        Ok(tokens.reshape(&[1, n, width])?)
    }
}

impl TokenLayout {
    /// Rows without padding: every row's tokens are at positions `start..start + seq`.
    pub fn contiguous(
        batch: usize,
        seq: usize,
        start: usize,
        device: &Device,
    ) -> Result<TokenLayout> {
        let positions_host: Vec<u32> = (0..batch)
            .flat_map(|_| (start..start + seq).map(|p| p as u32))
            .collect();
        TokenLayout::new(positions_host, batch, seq, None, device)
    }

    /// Sequences of `lengths` tokens packed back to back in one row (B = 1, T = their sum),
    /// each at positions 0..len and attending only to its own earlier tokens: the result at
    /// every token equals a right-padded batch's, without computing the padding. Not for
    /// decoding with a KV cache.
    pub fn packed(lengths: &[usize], device: &Device) -> Result<TokenLayout> {
        if lengths.is_empty() {
            return Err(Error::Config("a packed layout needs a sequence".into()));
        }
        if let Some(i) = lengths.iter().position(|&len| len == 0) {
            return Err(Error::Config(format!(
                "packed sequence {i} is empty: every sequence needs a token"
            )));
        }
        let total: usize = lengths.iter().sum();
        let t_max = lengths.iter().copied().max().unwrap_or(0);
        if total > u32::MAX as usize || lengths.len().saturating_mul(t_max) > u32::MAX as usize {
            return Err(Error::Config(format!(
                "{} packed sequences of up to {t_max} tokens overflow u32 token indices",
                lengths.len()
            )));
        }
        let mut positions_host = Vec::with_capacity(total);
        let mut to_padded = Vec::with_capacity(lengths.len() * t_max);
        let mut from_padded = Vec::with_capacity(total);
        let mut start = 0;
        for (s, &len) in lengths.iter().enumerate() {
            positions_host.extend((0..len).map(|p| p as u32));
            to_padded.extend((0..t_max).map(|t| (start + t.min(len - 1)) as u32));
            from_padded.extend((0..len).map(|t| (s * t_max + t) as u32));
            start += len;
        }
        let mut layout = TokenLayout::new(positions_host, 1, total, None, device)?;
        layout.packing = Some(Packing {
            lengths: lengths.to_vec(),
            to_padded: Tensor::from_vec(to_padded.clone(), &[lengths.len(), t_max], device)?,
            from_padded: Tensor::from_vec(from_padded.clone(), &[total], device)?,
            to_padded_host: to_padded,
            from_padded_host: from_padded,
        });
        Ok(layout)
    }

    /// The layout of a HF `attention_mask` (B, T) given row-major as 0/1 values: each row's
    /// ones must be one contiguous run (left padding, right padding, or none). Positions are
    /// HF's `cumsum(mask) - 1`, 0 on padding.
    pub fn from_attention_mask(
        mask: &[u32],
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> Result<TokenLayout> {
        if mask.len() != batch * seq {
            return Err(Error::Config(format!(
                "attention_mask has {} values, expected B * T = {batch} * {seq}",
                mask.len()
            )));
        }
        let mut positions_host = Vec::with_capacity(batch * seq);
        let mut ranges = Vec::with_capacity(batch);
        for (b, row) in mask.chunks(seq.max(1)).take(batch).enumerate() {
            let start = row.iter().position(|&m| m != 0).unwrap_or(seq);
            let end = row.iter().rposition(|&m| m != 0).map_or(start, |i| i + 1);
            if row[start..end].contains(&0) {
                return Err(Error::Config(format!(
                    "attention_mask row {b} is not one contiguous run of ones: {row:?}"
                )));
            }
            positions_host.extend(
                (0..seq).map(|t| t.saturating_sub(start).min(end.saturating_sub(start + 1)) as u32),
            );
            ranges.push((start as u32, end as u32));
        }
        let all_valid = ranges.iter().all(|&(s, e)| s == 0 && e as usize == seq);
        let key_ranges = (!all_valid).then_some(ranges);
        TokenLayout::new(positions_host, batch, seq, key_ranges, device)
    }

    fn new(
        positions_host: Vec<u32>,
        batch: usize,
        seq: usize,
        key_ranges: Option<Vec<(u32, u32)>>,
        device: &Device,
    ) -> Result<TokenLayout> {
        let positions = Tensor::from_vec(positions_host.clone(), &[batch, seq], device)?;
        Ok(TokenLayout {
            positions,
            positions_host,
            key_ranges,
            packing: None,
        })
    }

    /// The layout of the next `count` tokens appended to every row (decoding with a KV cache):
    /// positions continue from each row's last one and every row's key range grows by `count`.
    pub fn next(&self, count: usize) -> Result<TokenLayout> {
        self.refuse_packed("decoding")?;
        let [batch, seq] = *self.positions.shape() else {
            unreachable!("positions are (B, T)")
        };
        let positions_host: Vec<u32> = (0..batch)
            .flat_map(|b| {
                let last = if seq == 0 {
                    0
                } else {
                    self.positions_host[b * seq + seq - 1] + 1
                };
                (0..count as u32).map(move |i| last + i)
            })
            .collect();
        let key_ranges = self
            .key_ranges
            .as_ref()
            .map(|ranges| ranges.iter().map(|&(s, e)| (s, e + count as u32)).collect());
        TokenLayout::new(
            positions_host,
            batch,
            count,
            key_ranges,
            self.positions.device(),
        )
    }

    /// The same layout with every row `group` times in a row (row b becomes rows
    /// b*group..(b+1)*group): the layout of a prompt's G samples.
    pub fn repeat_rows(&self, group: usize) -> Result<TokenLayout> {
        let rows: Vec<usize> = (0..self.batch() * group).map(|r| r / group).collect();
        self.select_rows(&rows)
    }

    /// The layout of rows `rows` (indices of this layout's rows, in the new order, repeats
    /// allowed): a batch whose finished rows were dropped, or repeated.
    pub fn select_rows(&self, rows: &[usize]) -> Result<TokenLayout> {
        self.refuse_packed("selecting rows")?;
        let [batch, seq] = *self.positions.shape() else {
            unreachable!("positions are (B, T)")
        };
        if let Some(&bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(Error::Config(format!(
                "token layout has {batch} rows, no row {bad}"
            )));
        }
        let positions_host: Vec<u32> = rows
            .iter()
            .flat_map(|&b| &self.positions_host[b * seq..(b + 1) * seq])
            .copied()
            .collect();
        let key_ranges = self
            .key_ranges
            .as_ref()
            .map(|ranges| rows.iter().map(|&b| ranges[b]).collect());
        TokenLayout::new(
            positions_host,
            rows.len(),
            seq,
            key_ranges,
            self.positions.device(),
        )
    }

    /// (B, T) u32 positions.
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// The positions' values on the host (row-major (B, T)), as [`TokenLayout::positions`]
    /// holds them on the device.
    pub fn positions_host(&self) -> &[u32] {
        &self.positions_host
    }

    /// B: the number of rows.
    pub fn batch(&self) -> usize {
        self.positions.shape()[0]
    }

    /// T: tokens per row, padding included.
    pub fn seq_len(&self) -> usize {
        self.positions.shape()[1]
    }

    /// The packed sequences, when this layout packs several into its one row.
    pub fn packing(&self) -> Option<&Packing> {
        self.packing.as_ref()
    }

    /// Errors when this layout is packed: `what` needs one sequence per row.
    pub(crate) fn refuse_packed(&self, what: &str) -> Result<()> {
        match &self.packing {
            Some(p) => Err(Error::Config(format!(
                "{what} needs one sequence per row; this layout packs {} sequences into one",
                p.lengths.len()
            ))),
            None => Ok(()),
        }
    }

    /// Per row, the valid keys `[start, end)`; `None` when every key is valid.
    pub fn key_ranges(&self) -> Option<&[(u32, u32)]> {
        self.key_ranges.as_deref()
    }

    /// The causal + key-range mask for attention over `total_keys` keys (cache included).
    pub fn mask(&self, total_keys: usize) -> Result<AttentionMask> {
        if let Some(ranges) = &self.key_ranges {
            if let Some((b, &(_, end))) = ranges
                .iter()
                .enumerate()
                .find(|(_, range)| range.1 as usize > total_keys)
            {
                return Err(Error::Config(format!(
                    "row {b}'s key range ends at {end}, past the {total_keys} keys of the sequence"
                )));
            }
        }
        Ok(AttentionMask {
            causal: true,
            key_ranges: self.key_ranges.clone(),
        })
    }

    /// Errors unless ids (B, T) match this layout.
    pub(crate) fn check_ids(&self, ids: &Tensor) -> Result<()> {
        if ids.shape() != self.positions.shape() {
            return Err(Error::Config(format!(
                "token ids {:?} do not match the layout's (B, T) {:?}",
                ids.shape(),
                self.positions.shape()
            )));
        }
        Ok(())
    }
}

/// (B, T, heads * d) -> (B, heads, T, d).
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let [b, t, width] = *x.shape() else {
        return Err(Error::Config(format!(
            "attention input must be (B, T, width), got {:?}",
            x.shape()
        )));
    };
    Ok(x.reshape(&[b, t, heads, width / heads])?
        .permute(&[0, 2, 1, 3])?)
}

/// (B, heads, T, d) -> (B, T, heads * d).
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let [b, heads, t, d] = *x.shape() else {
        return Err(Error::Config(format!(
            "attention output must be (B, heads, T, d), got {:?}",
            x.shape()
        )));
    };
    Ok(x.permute(&[0, 2, 1, 3])?.reshape(&[b, t, heads * d])?)
}

/// softmax(q k^T * scale, mask) v with grouped-query heads, merged back to (B, T, heads * d).
///
/// q (B, heads, T, d); k and v (B, kv_heads, Tk, d) with heads a multiple of kv_heads: query
/// head h uses kv head h / (heads / kv_heads), as transformers' `repeat_kv`. Instead of
/// copying the kv heads, the query heads of a group are stacked along the query axis
/// ((B, kv_heads, group * T, d), a free reshape), so each group shares one product with its
/// keys. The scores are scaled after the product, as transformers does.
///
/// With `packing`, q, k and v hold (1, _, N, d) packed tokens: they are laid out per sequence,
/// attended there, and the context comes back as (1, N, heads * d).
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    packing: Option<&Packing>,
    scale: f32,
) -> Result<Tensor> {
    if let Some(packing) = packing {
        if k.shape().get(2) != q.shape().get(2) {
            return Err(Error::Config(
                "a packed layout cannot attend to a KV cache's earlier keys".into(),
            ));
        }
        let (q, k, v) = (packing.unpack(q)?, packing.unpack(k)?, packing.unpack(v)?);
        return packing.repack(&attend(&q, &k, &v, mask, None, scale)?);
    }
    let [b, heads, t, d] = *q.shape() else {
        return Err(Error::Config(format!(
            "queries must be (B, heads, T, d), got {:?}",
            q.shape()
        )));
    };
    let [_, kv_heads, tk, _] = *k.shape() else {
        return Err(Error::Config(format!(
            "keys must be (B, kv_heads, Tk, d), got {:?}",
            k.shape()
        )));
    };
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Error::Config(format!(
            "{heads} query heads cannot share {kv_heads} key/value heads"
        )));
    }
    let group = heads / kv_heads;
    let grouped_q = q.reshape(&[b, kv_heads, group * t, d])?;
    let scores = grouped_q
        .matmul_t(k, false, true)? // (B, kv_heads, group * T, Tk)
        .scale(scale)?
        .reshape(&[b, heads, t, tk])?;
    let probs = scores
        .masked_softmax(mask)?
        .reshape(&[b, kv_heads, group * t, tk])?;
    let context = probs.matmul(v)?.reshape(&[b, heads, t, d])?; // (B, heads, T, d)
    merge_heads(&context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_layout_numbers_each_sequence_from_zero_and_refuses_what_needs_rows() {
        let device = Device::Cpu;
        let layout = TokenLayout::packed(&[3, 1, 2], &device).unwrap();
        assert_eq!((layout.batch(), layout.seq_len()), (1, 6));
        assert_eq!(
            layout.positions().to_vec_u32().unwrap(),
            vec![0, 1, 2, 0, 0, 1]
        );
        assert!(layout.key_ranges().is_none());
        let packing = layout.packing().unwrap();
        assert_eq!(packing.lengths(), [3, 1, 2]);
        // Padded slots of (3, 3): padding repeats the sequence's last token.
        assert_eq!(packing.to_padded_host, vec![0, 1, 2, 3, 3, 3, 4, 5, 5]);
        assert_eq!(packing.from_padded_host, vec![0, 1, 2, 3, 6, 7]);
        assert!(layout.next(1).is_err());
        assert!(layout.select_rows(&[0]).is_err());
        assert!(TokenLayout::packed(&[], &device).is_err());
        assert!(TokenLayout::packed(&[2, 0], &device).is_err());
    }
}
