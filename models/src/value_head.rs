//! The value head of PPO, as trl's `ValueHead` (trl 0.4-0.11 `models/modeling_value_head.py`):
//! dropout (only while training) then `summary`, a Linear(H, 1), on the last hidden state.
//! `AutoModelForCausalLMWithValueHead` squeezes the last dim, so values are (B, T).
//! Tensor names as trl saves them: `v_head.summary.weight` (1, H), `v_head.summary.bias` (1,).

use lathe_core::{Device, Tensor};

use crate::linear::Linear;
use crate::weights::Weights;
use crate::{Error, Result};

/// Dropout and a Linear(H, 1) over hidden states.
#[derive(Debug)]
pub struct ValueHead {
    /// trl's `summary_dropout_prob` (0.1 by default there); 0 disables dropout.
    pub dropout: f32,
    /// The (1, H) projection to a scalar value per position (trl's `summary`).
    pub summary: Linear,
    /// Training mode with the dropout seed of the current minibatch; None at evaluation.
    dropout_seed: Option<u64>,
}

impl ValueHead {
    /// A fresh head for hidden size `hidden` on `device`, initialised as torch's `nn.Linear`
    /// (weight and bias uniform in +-1/sqrt(H)) and trainable (variables). Starts in eval mode.
    pub fn new(hidden: usize, dropout: f32, seed: u64, device: &Device) -> Result<ValueHead> {
        let bound = 1.0 / (hidden as f32).sqrt();
        let weight =
            Tensor::rand_uniform(-bound, bound, &[1, hidden], seed, device)?.into_variable();
        let bias = Tensor::rand_uniform(-bound, bound, &[1], seed.wrapping_add(1), device)?
            .into_variable();
        ValueHead::from_parts(Linear::dense(weight, Some(bias))?, dropout)
    }

    /// A head of trained weights `v_head.summary.{weight,bias}` (taken as trainable variables).
    pub fn from_weights(weights: &mut Weights, hidden: usize, dropout: f32) -> Result<ValueHead> {
        let weight = weights
            .take("v_head.summary.weight", &[1, hidden])?
            .into_variable();
        let bias = weights.take("v_head.summary.bias", &[1])?.into_variable();
        ValueHead::from_parts(Linear::dense(weight, Some(bias))?, dropout)
    }

    fn from_parts(summary: Linear, dropout: f32) -> Result<ValueHead> {
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::Config(format!(
                "value head dropout {dropout} is not in [0, 1)"
            )));
        }
        if summary.out_features() != 1 {
            return Err(Error::Config(format!(
                "value head summary must have 1 output, has {}",
                summary.out_features()
            )));
        }
        Ok(ValueHead {
            dropout,
            summary,
            dropout_seed: None,
        })
    }

    /// Training mode: dropout with masks drawn from `seed` (a pure function of the seed and
    /// the element, so a resumed run replays them).
    pub fn train(&mut self, seed: u64) {
        self.dropout_seed = Some(seed);
    }

    /// Evaluation mode (the default): no dropout.
    pub fn eval(&mut self) {
        self.dropout_seed = None;
    }

    /// Whether the head is in training mode (dropout on).
    pub fn is_training(&self) -> bool {
        self.dropout_seed.is_some()
    }

    /// Values (B, T) of hidden states (B, T, H).
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let [b, t, h] = *hidden.shape() else {
            return Err(Error::Config(format!(
                "value head input must be (B, T, H), got {:?}",
                hidden.shape()
            )));
        };
        if h != self.summary.in_features() {
            return Err(Error::Config(format!(
                "value head expects hidden size {}, got {h}",
                self.summary.in_features()
            )));
        }
        let x = match self.dropout_seed {
            Some(seed) if self.dropout > 0.0 => hidden.dropout(self.dropout, seed)?,
            _ => hidden.clone(),
        };
        Ok(self.summary.forward(&x)?.reshape(&[b, t])?)
    }

    /// The trainable tensors (summary weight and bias).
    pub fn parameters(&self) -> Result<Vec<Tensor>> {
        let (w, b) = self.summary.dense_parts()?;
        Ok(std::iter::once(w).chain(b).collect())
    }

    /// The weights under trl's names.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        self.summary.push_named("v_head.summary", &mut out)?;
        Ok(out)
    }
}
