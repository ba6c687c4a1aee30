//! The loop over transformer blocks that both architectures share: plain (optionally
//! filling a KV cache), or with gradient checkpointing, where each block keeps no
//! activations and re-runs its forward in the backward.

use lathe_core::ops::softmax::AttentionMask;
use lathe_core::Tensor;

use crate::attention::TokenLayout;
use crate::kv_cache::KvCache;
use crate::Result;

/// A model as a stack of blocks.
pub(crate) trait BlockStack: Clone + Send + Sync + 'static {
    type Layer;
    fn layers(&self) -> &[Self::Layer];
    /// Whether blocks are checkpointed when no KV cache is filled.
    fn checkpointing(&self) -> bool;
    /// Block `index` (whose weights are `layer`): x (B, T, H) -> (B, T, H).
    fn block(
        &self,
        layer: &Self::Layer,
        index: usize,
        x: &Tensor,
        layout: &TokenLayout,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor>;
    /// The trainable tensors of a block (a checkpoint's parameters).
    fn layer_variables(layer: &Self::Layer) -> Vec<Tensor>;
}

/// Runs every block of `model` over x (B, T, H). With checkpointing on (and no cache, which
/// only decoding uses) each block goes through `lathe_core::checkpoint`.
pub(crate) fn run_blocks<M: BlockStack>(
    model: &M,
    mut x: Tensor,
    layout: &TokenLayout,
    mask: &AttentionMask,
    mut cache: Option<&mut KvCache>,
) -> Result<Tensor> {
    if cache.is_some() {
        layout.refuse_packed("a KV cache")?;
    }
    if model.checkpointing() && cache.is_none() {
        // One shared copy (tensors are reference-counted) for the blocks' recomputation.
        let shared = std::sync::Arc::new(model.clone());
        for (i, layer) in model.layers().iter().enumerate() {
            let (shared, layout, mask) = (shared.clone(), layout.clone(), mask.clone());
            x = lathe_core::checkpoint(
                std::slice::from_ref(&x),
                &M::layer_variables(layer),
                move |ins: &[Tensor]| {
                    shared.block(&shared.layers()[i], i, &ins[0], &layout, &mask, None)
                },
            )?;
        }
    } else {
        for (i, layer) in model.layers().iter().enumerate() {
            x = model.block(layer, i, &x, layout, mask, cache.as_deref_mut())?;
        }
    }
    Ok(x)
}

/// Each layer's named parts (e.g. its linears, `&` or `&mut`) under their full module name
/// `{prefix}.{layer index}.{name}`, layer by layer.
pub(crate) fn by_layer<T, const N: usize>(
    prefix: &str,
    layers: impl Iterator<Item = [(&'static str, T); N]>,
) -> Vec<(String, T)> {
    layers
        .enumerate()
        .flat_map(|(i, parts)| {
            parts
                .into_iter()
                .map(move |(name, part)| (format!("{prefix}.{i}.{name}"), part))
        })
        .collect()
}
