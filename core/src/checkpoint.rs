//! Gradient checkpointing: a function's intermediate tensors are not kept for the backward;
//! the backward runs the function again, with recording on, and back-propagates through the
//! recomputation. Memory for activations drops from every tensor of every block to the
//! blocks' inputs, for about one extra forward of compute (the seed's
//! `gradient_checkpointing_enable()`).

use crate::backprop::{backward_seeded, enable_grad, grad_enabled, no_grad};
use crate::tensor::Tensor;

/// `f(inputs)` without its graph; gradients reach `inputs` and `params` through a
/// recomputation of `f` in the backward.
///
/// `params` are the variables `f` uses besides its inputs (a block's trainable weights): the
/// recomputation yields their gradients. A variable `f` captures but that is not listed gets
/// no gradient. `f` must compute the same thing both times: randomness inside it (dropout)
/// must come from seeds fixed before the call, as lathe's counter-based dropout does.
///
/// `f` may fail with any error that a lathe-core error converts into (a model crate's own);
/// a failure of the recomputation in the backward becomes `Error::Backward` with its text.
pub fn checkpoint<F, E>(
    inputs: &[Tensor],
    params: &[Tensor],
    f: F,
) -> std::result::Result<Tensor, E>
where
    F: Fn(&[Tensor]) -> std::result::Result<Tensor, E> + Send + Sync + 'static,
    E: From<crate::Error> + std::fmt::Display,
{
    let tracks = inputs.iter().chain(params).any(Tensor::tracks_grad);
    if !grad_enabled() || !tracks {
        return f(inputs);
    }
    let output = {
        let _no_grad = no_grad();
        f(inputs)?
    };
    let saved: Vec<Tensor> = inputs.to_vec();
    let n_inputs = inputs.len();
    let params_saved: Vec<Tensor> = params.to_vec();
    let all: Vec<&Tensor> = inputs.iter().chain(params).collect();
    Ok(output.with_backward("checkpoint", &all, move |_, grad| {
        let _recording = enable_grad();
        // Fresh leaves for the inputs (their gradients are read back below); the params
        // are used as they are, so the recomputed graph reaches them under their identity.
        let leaves: Vec<Tensor> = saved
            .iter()
            .map(|t| {
                if t.tracks_grad() {
                    t.detach().into_variable()
                } else {
                    t.detach()
                }
            })
            .collect();
        let recomputed = f(&leaves)
            .map_err(|e| crate::Error::Backward(format!("checkpoint recomputation: {e}")))?;
        if !recomputed.tracks_grad() {
            return Ok(vec![None; n_inputs + params_saved.len()]);
        }
        let store = backward_seeded(&recomputed, grad.clone())?;
        Ok(leaves
            .iter()
            .zip(&saved)
            .map(|(leaf, original)| {
                original
                    .tracks_grad()
                    .then(|| store.get(leaf).cloned())
                    .flatten()
            })
            .chain(params_saved.iter().map(|p| store.get(p).cloned()))
            .collect())
    }))
}
