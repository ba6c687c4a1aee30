//! A dense linear layer with a LoRA adapter: the composition model crates make with their
//! own linear type, here for a plain f32 or f16 weight.

use lathe_core::{DType, Tensor};

use crate::adapter::{AdapterSwitch, LoraAdapter};
use crate::config::LoraConfig;
use crate::{Error, Result};

/// y = x W^T + b + scaling * B A dropout(x), W (out, in) frozen.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: LoraAdapter,
    /// Whether the adapter's delta is folded into `weight` (then the forward skips it).
    merged: bool,
}

impl LoraLinear {
    /// Wraps a frozen weight (out, in) (f32 or f16) with a fresh adapter (A from `seed`).
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        config: &LoraConfig,
        switch: &AdapterSwitch,
        seed: u64,
    ) -> Result<LoraLinear> {
        let &[out, input] = weight.shape() else {
            return Err(Error::Config(format!(
                "weight must be (out, in), got {:?}",
                weight.shape()
            )));
        };
        let adapter =
            LoraAdapter::new("linear", input, out, config, switch, seed, weight.device())?;
        Ok(LoraLinear {
            weight: weight.detach(),
            bias,
            adapter,
            merged: false,
        })
    }

    /// The layer's adapter.
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// The frozen base weight (out, in), with the adapter folded in while merged.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Whether the adapter is folded into the weight (see [`merge`](Self::merge)).
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// x (..., in) -> (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.matmul_t(&self.weight, false, true)?;
        if let Some(b) = &self.bias {
            y = y.bias_add(b)?;
        }
        if self.merged {
            return Ok(y);
        }
        Ok(match self.adapter.delta(x)? {
            Some(delta) => y.add(&delta)?,
            None => y,
        })
    }

    /// Folds the adapter into the weight (W += scaling B A, rounded to W's dtype).
    pub fn merge(&mut self) -> Result<()> {
        if !self.merged {
            self.weight = shift(&self.weight, &self.adapter.delta_weight()?, 1.0)?;
            self.merged = true;
        }
        Ok(())
    }

    /// Takes the adapter back out of the weight (exact up to rounding for f32 weights).
    pub fn unmerge(&mut self) -> Result<()> {
        if self.merged {
            self.weight = shift(&self.weight, &self.adapter.delta_weight()?, -1.0)?;
            self.merged = false;
        }
        Ok(())
    }
}

/// weight + sign * delta in f32, back in weight's dtype.
fn shift(weight: &Tensor, delta: &Tensor, sign: f32) -> Result<Tensor> {
    let _no_grad = lathe_core::no_grad();
    let dtype = weight.dtype();
    let sum = weight
        .to_dtype(DType::F32)?
        .add(&delta.affine(sign, 0.0)?)?;
    Ok(sum.to_dtype(dtype)?)
}
