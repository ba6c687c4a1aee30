//! The value head of PPO, as trl's `ValueHead` (trl 0.4-0.11 `models/modeling_value_head.py`):
//! dropout (only while training) then `summary`, a Linear(H, 1), on the last hidden state.
//! `AutoModelForCausalLMWithValueHead` squeezes the last dim, so values are (B, T).
//! Tensor names as trl saves them: `v_head.summary.weight` (1, H), `v_head.summary.bias` (1,).

use std::sync::atomic::{AtomicU64, Ordering};

use lathe_core::{Device, Tensor};

use crate::hf::Weights;
use crate::linear::Linear;
use crate::{Error, Result};

/// Dropout and a Linear(H, 1) over hidden states.
#[derive(Debug)]
pub struct ValueHead {
    /// trl's `summary_dropout_prob` (0.1 by default there); 0 disables dropout.
    pub dropout: f32,
    pub summary: Linear,
    training: bool,
    /// Seeds successive dropout masks, so each training forward draws a new one.
    dropout_calls: AtomicU64,
    seed: u64,
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
        ValueHead::from_parts(Linear::dense(weight, Some(bias))?, dropout, seed)
    }

    /// A head of trained weights `v_head.summary.{weight,bias}` (taken as trainable variables).
    pub fn from_weights(weights: &mut Weights, hidden: usize, dropout: f32) -> Result<ValueHead> {
        let weight = weights
            .take("v_head.summary.weight", &[1, hidden])?
            .into_variable();
        let bias = weights.take("v_head.summary.bias", &[1])?.into_variable();
        ValueHead::from_parts(Linear::dense(weight, Some(bias))?, dropout, 0)
    }

    fn from_parts(summary: Linear, dropout: f32, seed: u64) -> Result<ValueHead> {
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
            training: false,
            dropout_calls: AtomicU64::new(0),
            seed,
        })
    }

    /// Training mode applies dropout; eval mode (the default) is the identity before summary.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    pub fn is_training(&self) -> bool {
        self.training
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
        let x = if self.training && self.dropout > 0.0 {
            hidden.mul(&self.dropout_mask(hidden.shape(), hidden.device())?)?
        } else {
            hidden.clone()
        };
        Ok(self.summary.forward(&x)?.reshape(&[b, t])?)
    }

    /// Inverted dropout: each element kept with probability 1 - p and scaled by 1 / (1 - p).
    fn dropout_mask(&self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let call = self.dropout_calls.fetch_add(1, Ordering::Relaxed);
        let mut state = self.seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let keep = 1.0 - self.dropout;
        let n: usize = shape.iter().product();
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
                if u < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Tensor::from_vec(mask, shape, device)?)
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

/// A small, fast, well-mixed PRNG step (Steele et al.'s SplitMix64).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
