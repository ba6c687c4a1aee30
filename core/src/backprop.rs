//! Reverse-mode autodiff, define-by-run: every op result that depends on a variable records
//! its inputs and a backward closure (the graph lives in the tensors, as in candle).
//! [`Tensor::backward`] walks that graph in reverse topological order.
//!
//! Frozen tensors are simply not variables: they get no gradient, but gradients still flow
//! through the ops that use them to the inputs that do track.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};

use crate::tensor::{Tensor, TensorId};
use crate::{Error, Result};

pub(crate) type BackwardFn =
    Box<dyn Fn(&Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// The op that produced a tensor.
pub(crate) struct GradFn {
    pub name: &'static str,
    pub inputs: Vec<Tensor>,
    pub backward: BackwardFn,
}

thread_local! {
    static GRAD_DISABLED: Cell<usize> = const { Cell::new(0) };
}

pub(crate) fn grad_enabled() -> bool {
    GRAD_DISABLED.with(|d| d.get() == 0)
}

/// While alive, ops on this thread record no history (inference, optimizer steps).
pub struct NoGradGuard(());

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_DISABLED.with(|d| d.set(d.get() - 1));
    }
}

/// Disables gradient recording on this thread until the guard drops.
pub fn no_grad() -> NoGradGuard {
    GRAD_DISABLED.with(|d| d.set(d.get() + 1));
    NoGradGuard(())
}

/// Re-enables gradient recording on this thread until dropped, restoring the previous
/// state (used inside a backward, which runs with recording off, to recompute a forward).
pub(crate) struct EnableGradGuard(usize);

impl Drop for EnableGradGuard {
    fn drop(&mut self) {
        GRAD_DISABLED.with(|d| d.set(self.0));
    }
}

pub(crate) fn enable_grad() -> EnableGradGuard {
    EnableGradGuard(GRAD_DISABLED.with(|d| d.replace(0)))
}

/// Gradients by tensor identity.
#[derive(Default)]
pub struct GradStore {
    grads: HashMap<TensorId, Tensor>,
}

impl GradStore {
    /// The gradient of the loss with respect to `tensor`, if it was reached.
    pub fn get(&self, tensor: &Tensor) -> Option<&Tensor> {
        self.grads.get(&tensor.id())
    }
    /// Takes `tensor`'s gradient out of the store, if it was reached.
    pub fn remove(&mut self, tensor: &Tensor) -> Option<Tensor> {
        self.grads.remove(&tensor.id())
    }
    /// Sets `tensor`'s gradient (replacing any); `grad` should have its shape.
    pub fn insert(&mut self, tensor: &Tensor, grad: Tensor) {
        self.grads.insert(tensor.id(), grad);
    }
    /// The number of tensors with a gradient.
    pub fn len(&self) -> usize {
        self.grads.len()
    }
    /// Whether no tensor has a gradient.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Gradient accumulation: `next` added into `sum` for every parameter of `params`
    /// (`previous + next`, in that order, or `next`'s gradient where `sum` has none). With
    /// no `sum` yet (the first micro-batch), `next` becomes it whole.
    pub fn accumulate(
        sum: Option<GradStore>,
        next: GradStore,
        params: &[Tensor],
    ) -> Result<GradStore> {
        let Some(mut sum) = sum else {
            return Ok(next);
        };
        for p in params {
            if let Some(g) = next.get(p) {
                let total = match sum.remove(p) {
                    Some(previous) => previous.add(g)?,
                    None => g.clone(),
                };
                sum.insert(p, total);
            }
        }
        Ok(sum)
    }
}

/// Tensors reachable from `root` through tracking inputs, inputs before users.
fn topological_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative DFS: graphs of deep models are too deep for recursion.
    let mut stack = vec![(root.clone(), false)];
    while let Some((tensor, expanded)) = stack.pop() {
        if expanded {
            order.push(tensor);
            continue;
        }
        if !seen.insert(tensor.id()) {
            continue;
        }
        stack.push((tensor.clone(), true));
        if let Some(grad_fn) = tensor.grad_fn() {
            for input in &grad_fn.inputs {
                if input.tracks_grad() && !seen.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order
}

/// Gradients of `root` (seeded with ones) with respect to every variable it depends on.
/// Intermediate gradients are dropped as soon as they have been propagated.
pub(crate) fn backward(root: &Tensor) -> Result<GradStore> {
    let seed = {
        let _guard = no_grad();
        Tensor::ones(root.shape(), root.device())?
    };
    backward_seeded(root, seed)
}

/// Gradients of `root` given the gradient `seed` of some loss with respect to `root`.
pub(crate) fn backward_seeded(root: &Tensor, seed: Tensor) -> Result<GradStore> {
    if !root.tracks_grad() {
        return Err(Error::Backward(
            "the tensor does not depend on any variable".into(),
        ));
    }
    if seed.shape() != root.shape() {
        return Err(Error::Backward(format!(
            "seed gradient {:?} for a tensor of shape {:?}",
            seed.shape(),
            root.shape()
        )));
    }
    let _guard = no_grad();
    let order = topological_order(root);
    let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
    grads.insert(root.id(), seed);
    let mut store = GradStore::default();
    for tensor in order.iter().rev() {
        let Some(grad) = grads.remove(&tensor.id()) else {
            continue;
        };
        let Some(grad_fn) = tensor.grad_fn() else {
            if tensor.is_variable() {
                store.grads.insert(tensor.id(), grad);
            }
            continue;
        };
        let input_grads = (grad_fn.backward)(tensor, &grad)?;
        if input_grads.len() != grad_fn.inputs.len() {
            return Err(Error::Backward(format!(
                "{} returned {} gradients for {} inputs",
                grad_fn.name,
                input_grads.len(),
                grad_fn.inputs.len()
            )));
        }
        for (input, input_grad) in grad_fn.inputs.iter().zip(input_grads) {
            let Some(input_grad) = input_grad else {
                continue;
            };
            if !input.tracks_grad() {
                continue;
            }
            if input_grad.shape() != input.shape() {
                return Err(Error::Backward(format!(
                    "{} produced a gradient of shape {:?} for an input of shape {:?}",
                    grad_fn.name,
                    input_grad.shape(),
                    input.shape()
                )));
            }
            let summed = match grads.remove(&input.id()) {
                Some(previous) => accumulate(&previous, &input_grad)?,
                None => input_grad,
            };
            grads.insert(input.id(), summed);
        }
    }
    Ok(store)
}

/// previous + next; f16 gradients are summed in f32 and stored back as f16.
fn accumulate(previous: &Tensor, next: &Tensor) -> Result<Tensor> {
    match previous.dtype() {
        crate::DType::F32 => previous.add(next),
        dtype => previous
            .to_dtype(crate::DType::F32)?
            .add(&next.to_dtype(crate::DType::F32)?)?
            .to_dtype(dtype),
    }
}
