//! Classification heads on encoder states, and pooling.

use lathe_core::{Device, Tensor};
use lathe_models::hf::Weights;
use lathe_models::linear::Linear;

use crate::config::Pooling;
use crate::{Error, Result};

/// One vector per row (B, H) from token states (B, T, H) of right-padded rows of `lengths`.
pub fn pool(states: &Tensor, lengths: &[usize], pooling: Pooling) -> Result<Tensor> {
    let [b, t, h] = *states.shape() else {
        return Err(Error::Config(format!(
            "states must be (B, T, H), got {:?}",
            states.shape()
        )));
    };
    if lengths.len() != b || lengths.iter().any(|&l| l == 0 || l > t) {
        return Err(Error::Config(format!(
            "lengths {lengths:?} do not fit {b} rows of {t} tokens"
        )));
    }
    match pooling {
        Pooling::First => Ok(states.narrow(1, 0, 1)?.reshape(&[b, h])?),
        Pooling::Mean => {
            // (B, 1, T) weights 1/length on the row's tokens, 0 on padding: one batched
            // product does the masked mean (and its backward).
            let weights: Vec<f32> = lengths
                .iter()
                .flat_map(|&l| (0..t).map(move |i| if i < l { 1.0 / l as f32 } else { 0.0 }))
                .collect();
            let w = Tensor::from_vec(weights, &[b, 1, t], states.device())?;
            Ok(w.matmul(states)?.reshape(&[b, h])?)
        }
    }
}

/// A sequence-classification head: token states in, one logit per label out.
#[derive(Clone, Debug)]
pub enum Head {
    /// transformers' `DistilBertForSequenceClassification`: first token -> pre_classifier
    /// (H, H) -> ReLU -> classifier (labels, H). (Its dropout is inactive at inference.)
    DistilBert {
        /// (H, H), followed by ReLU.
        pre_classifier: Linear,
        /// (labels, H).
        classifier: Linear,
    },
    /// lathe's head: one linear layer (labels, H) on pooled states (mean or first token).
    Linear {
        /// How token states are pooled into one vector.
        pooling: Pooling,
        /// (labels, H).
        classifier: Linear,
    },
}

impl Head {
    /// DistilBERT's head from `pre_classifier.*` and `classifier.*`.
    pub fn load_distilbert(weights: &mut Weights, hidden: usize, labels: usize) -> Result<Head> {
        Ok(Head::DistilBert {
            pre_classifier: Linear::load(weights, "pre_classifier", hidden, hidden, true)?,
            classifier: Linear::load(weights, "classifier", labels, hidden, true)?,
        })
    }

    /// lathe's linear head from `classifier.*`.
    pub fn load_linear(
        weights: &mut Weights,
        hidden: usize,
        labels: usize,
        pooling: Pooling,
    ) -> Result<Head> {
        Ok(Head::Linear {
            pooling,
            classifier: Linear::load(weights, "classifier", labels, hidden, true)?,
        })
    }

    /// A fresh linear head as torch's `nn.Linear` initialises one: weight and bias
    /// U(-1/sqrt(H), 1/sqrt(H)) from `seed`, as trainable variables on `device`.
    pub fn new_linear(
        hidden: usize,
        labels: usize,
        pooling: Pooling,
        seed: u64,
        device: &Device,
    ) -> Result<Head> {
        let bound = 1.0 / (hidden as f32).sqrt();
        let weight = Tensor::rand_uniform(-bound, bound, &[labels, hidden], seed, &Device::Cpu)?
            .to_device(device)?
            .into_variable();
        let bias = Tensor::rand_uniform(-bound, bound, &[labels], seed ^ 0x5eed, &Device::Cpu)?
            .to_device(device)?
            .into_variable();
        Ok(Head::Linear {
            pooling,
            classifier: Linear::dense(weight, Some(bias))?,
        })
    }

    /// The pooling this head reads.
    pub fn pooling(&self) -> Pooling {
        match self {
            Head::DistilBert { .. } => Pooling::First,
            Head::Linear { pooling, .. } => *pooling,
        }
    }

    /// Logits per text: rows of the classifier.
    pub fn num_labels(&self) -> usize {
        match self {
            Head::DistilBert { classifier, .. } | Head::Linear { classifier, .. } => {
                classifier.out_features()
            }
        }
    }

    /// Logits (B, labels) of pooled states (B, H).
    pub fn forward_pooled(&self, pooled: &Tensor) -> Result<Tensor> {
        match self {
            Head::DistilBert {
                pre_classifier,
                classifier,
            } => Ok(classifier.forward(&pre_classifier.forward(pooled)?.relu()?)?),
            Head::Linear { classifier, .. } => Ok(classifier.forward(pooled)?),
        }
    }

    /// Logits (B, labels) of token states (B, T, H).
    pub fn forward(&self, states: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        self.forward_pooled(&pool(states, lengths, self.pooling())?)
    }

    /// The trainable tensors of the head.
    pub fn variables(&self) -> Vec<Tensor> {
        match self {
            Head::DistilBert {
                pre_classifier,
                classifier,
            } => {
                let mut v = pre_classifier.variables();
                v.extend(classifier.variables());
                v
            }
            Head::Linear { classifier, .. } => classifier.variables(),
        }
    }

    /// The head's tensors under their HF names.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        match self {
            Head::DistilBert {
                pre_classifier,
                classifier,
            } => {
                pre_classifier.push_named("pre_classifier", &mut out)?;
                classifier.push_named("classifier", &mut out)?;
            }
            Head::Linear { classifier, .. } => classifier.push_named("classifier", &mut out)?,
        }
        Ok(out)
    }

    /// This head with plain (non-variable) copies of its tensors: a snapshot that later
    /// optimizer steps do not change (for keeping the best epoch's head).
    pub fn snapshot(&self) -> Result<Head> {
        let copy = |l: &Linear| -> Result<Linear> {
            let (w, b) = l.dense_parts()?;
            Ok(Linear::dense(
                w.affine(1.0, 0.0)?.detach(),
                b.map(|b| b.affine(1.0, 0.0).map(|t| t.detach()))
                    .transpose()?,
            )?)
        };
        let _no_grad = lathe_core::no_grad();
        Ok(match self {
            Head::DistilBert {
                pre_classifier,
                classifier,
            } => Head::DistilBert {
                pre_classifier: copy(pre_classifier)?,
                classifier: copy(classifier)?,
            },
            Head::Linear {
                pooling,
                classifier,
            } => Head::Linear {
                pooling: *pooling,
                classifier: copy(classifier)?,
            },
        })
    }
}
