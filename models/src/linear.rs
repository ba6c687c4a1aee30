//! The swappable linear layer. Every projection of every model is a [`Linear`], so
//! quantization and LoRA replace the layer, never the model: an int8 base weight
//! (lathe-quant's LLM.int8) and a LoRA wrapper each become one more arm of the enum, and the
//! model files do not change.

use lathe_core::safetensors::StoredDType;
use lathe_core::{DType, Tensor};
use lathe_lora::LoraAdapter;
use lathe_quant::{Int8Linear, Int8Variant};

use crate::weights::Weights;
use crate::{Error, Result};

/// The precision of every linear layer of the transformer blocks (embeddings, norms and the
/// LM head stay f32 unless [`crate::hf::LoadOptions::embeddings_f16`], as transformers keeps
/// them in 16/32-bit under `load_in_8bit`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Precision {
    /// f32 weights (GGUF blocks dequantized).
    #[default]
    F32,
    /// f16 weights, f32 arithmetic: half the weight bytes.
    F16,
    /// LLM.int8 with this outlier threshold (6.0 as `load_in_8bit`).
    Int8 {
        /// Input columns with any |x| >= this run in 16-bit (0: plain int8).
        threshold: f32,
    },
}

/// y = x @ W^T + b over the last dim of x, with W (out, in) as torch's `nn.Linear` stores it.
#[derive(Clone, Debug)]
pub enum Linear {
    /// An f32 or f16 weight (out, in) and an optional f32 bias (out,): frozen tensors for a
    /// base model, variables when trained. An f16 weight is read as such by the GPU matmul
    /// (half the bytes, f32 arithmetic).
    Dense {
        /// (out, in), f32 or f16.
        weight: Tensor,
        /// (out,) f32, when the layer has one.
        bias: Option<Tensor>,
    },
    /// A frozen LLM.int8 weight (about one byte per parameter) with the 16-bit outlier path;
    /// gradients flow through it to the input (`--load-in-8bit`).
    Int8(Int8Linear),
    /// A frozen base layer (dense or int8) with a LoRA adapter. While `merged`, the
    /// adapter's `scaling * B A` is folded into the base weight and the forward skips it.
    Lora {
        /// The frozen layer the adapter adds to.
        base: Box<Linear>,
        /// The trainable A and B and their scaling.
        adapter: LoraAdapter,
        /// Whether the adapter is folded into `base`'s weight.
        merged: bool,
    },
}

impl Linear {
    /// A dense layer; errors unless weight is f32 or f16 (out, in) and bias f32 (out,) on
    /// its device.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        let [out, _] = *weight.shape() else {
            return Err(Error::Config(format!(
                "linear: weight must be (out, in), got {:?}",
                weight.shape()
            )));
        };
        if weight.dtype() != DType::F16 {
            weight.expect_dtype("linear", DType::F32)?;
        }
        if let Some(b) = &bias {
            b.expect_dtype("linear", DType::F32)?;
            weight.expect_same_device("linear", b)?;
            if b.shape() != [out] {
                return Err(Error::Config(format!(
                    "linear: bias {:?} does not match weight {:?}",
                    b.shape(),
                    weight.shape()
                )));
            }
        }
        Ok(Linear::Dense { weight, bias })
    }

    /// This layer with its weight in LLM.int8 form (outlier threshold `threshold`, 6.0 as
    /// transformers' `load_in_8bit`; 0 disables the outlier path). An int8 layer is returned
    /// as it is.
    pub fn to_int8(&self, threshold: f32) -> Result<Linear> {
        match self {
            Linear::Dense { weight, bias } => Ok(Linear::Int8(Int8Linear::from_dense(
                &weight.to_dtype(DType::F32)?,
                bias.clone(),
                threshold,
            )?)),
            Linear::Int8(_) => Ok(self.clone()),
            Linear::Lora {
                base,
                adapter,
                merged,
            } => Ok(Linear::Lora {
                base: Box::new(base.to_int8(threshold)?),
                adapter: adapter.clone(),
                merged: *merged,
            }),
        }
    }

    /// This layer with its weight rounded to f16 (the bias stays f32, as it is tiny and
    /// added in f32). An int8 layer is returned as it is.
    pub fn to_f16(&self) -> Result<Linear> {
        match self {
            Linear::Dense { weight, bias } => Ok(Linear::Dense {
                weight: weight.to_dtype(DType::F16)?,
                bias: bias.clone(),
            }),
            Linear::Int8(_) => Ok(self.clone()),
            Linear::Lora {
                base,
                adapter,
                merged,
            } => Ok(Linear::Lora {
                base: Box::new(base.to_f16()?),
                adapter: adapter.clone(),
                merged: *merged,
            }),
        }
    }

    /// Gives a frozen f32 weight on the CPU a second copy packed for the forward product
    /// ([`Tensor::packed_for_cpu_forward`]); returns the bytes that copy adds (0 where
    /// nothing was packed: int8 and f16 weights, variables, the GPU, a CPU without the
    /// kernel). A LoRA layer packs its base; its adapter, trained, stays as it is.
    pub fn pack_for_cpu(&mut self) -> Result<u64> {
        match self {
            Linear::Dense { weight, .. } => {
                let before = weight.packed_bytes();
                *weight = weight.packed_for_cpu_forward()?;
                Ok((weight.packed_bytes() - before) as u64)
            }
            Linear::Int8(_) => Ok(0),
            Linear::Lora { base, .. } => base.pack_for_cpu(),
        }
    }

    /// x (..., in) -> (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Int8(layer) => Ok(layer.forward(x)?),
            Linear::Lora {
                base,
                adapter,
                merged,
            } => {
                let y = base.forward(x)?;
                if *merged {
                    return Ok(y);
                }
                Ok(match adapter.delta(x)? {
                    Some(delta) => y.add(&delta)?,
                    None => y,
                })
            }
            Linear::Dense { weight, bias } => {
                let y = x.matmul_t(weight, false, true)?;
                Ok(match bias {
                    Some(b) => y.bias_add(b)?,
                    None => y,
                })
            }
        }
    }

    /// The mean cross-entropy of this layer's logits (N, out) for x (N, in) against u32
    /// targets (N,), as `forward(x)` then [`Tensor::cross_entropy`]. A plain dense layer
    /// (an LM head) takes core's fused [`Tensor::linear_cross_entropy`], which never holds
    /// the (N, V) logits on the CPU.
    pub fn cross_entropy(
        &self,
        x: &Tensor,
        targets: &Tensor,
        ignore_index: Option<u32>,
    ) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense { weight, bias: None } => {
                x.linear_cross_entropy(weight, targets, ignore_index)?
            }
            _ => self.forward(x)?.cross_entropy(targets, ignore_index)?,
        })
    }

    /// The log-softmax of this layer's logits (N, out) for x (N, in), gathered at host
    /// `targets` (N) (rows whose target is `ignore_index` are 0), and the entropy of each
    /// row's softmax when asked: the per-token log-probs of an LM head. A plain dense layer
    /// takes core's fused [`Tensor::linear_log_softmax_gather`] (no (N, V) logits held on the
    /// CPU, ignored rows skipped); other layers build the logits.
    pub fn token_logprobs(
        &self,
        x: &Tensor,
        targets: &[u32],
        ignore_index: Option<u32>,
        entropy: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match self {
            Linear::Dense { weight, bias: None } => {
                x.linear_log_softmax_gather(weight, targets, ignore_index, entropy)?
            }
            _ => self
                .forward(x)?
                .log_softmax_gather_masked(targets, ignore_index, entropy)?,
        })
    }

    /// The output width: rows of the weight.
    pub fn out_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.shape()[0],
            Linear::Int8(layer) => layer.weight.out_features(),
            Linear::Lora { base, .. } => base.out_features(),
        }
    }

    /// The input width: columns of the weight.
    pub fn in_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.shape()[1],
            Linear::Int8(layer) => layer.weight.in_features(),
            Linear::Lora { base, .. } => base.in_features(),
        }
    }

    /// The weight and bias as dense tensors, for saving a checkpoint (an int8 weight is
    /// dequantized to f32; an f16 weight stays f16). A LoRA layer gives its base's (merged
    /// or not, as it is).
    pub fn dense_parts(&self) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Linear::Dense { weight, bias } => Ok((weight.clone(), bias.clone())),
            Linear::Int8(layer) => Ok((layer.weight.dequantize()?, layer.bias.clone())),
            Linear::Lora { base, .. } => base.dense_parts(),
        }
    }

    /// The base layer with `sign * scaling * B A` added to its weight: a dense weight in
    /// f32 (then back to its dtype); an int8 weight is dequantized, shifted and quantized
    /// again (lossy, as peft's merge into bitsandbytes layers).
    fn shifted(&self, delta: &Tensor, sign: f32) -> Result<Linear> {
        let _no_grad = lathe_core::no_grad();
        match self {
            Linear::Dense { weight, bias } => {
                let dtype = weight.dtype();
                let w = weight
                    .to_dtype(DType::F32)?
                    .add(&delta.affine(sign, 0.0)?)?
                    .to_dtype(dtype)?;
                Ok(Linear::Dense {
                    weight: w,
                    bias: bias.clone(),
                })
            }
            Linear::Int8(layer) => {
                // The layer keeps its forward's arithmetic (peft's merge into a bnb layer
                // leaves a bnb layer).
                let w = layer.weight.dequantize()?.add(&delta.affine(sign, 0.0)?)?;
                let merged = Int8Linear::from_dense(&w, layer.bias.clone(), layer.threshold)?;
                Ok(Linear::Int8(merged.with_variant(layer.variant)))
            }
            Linear::Lora { .. } => Err(Error::Config(
                "a LoRA layer over another LoRA layer is not supported".into(),
            )),
        }
    }

    /// Folds a LoRA adapter into its base weight (a no-op when merged or not LoRA).
    pub fn merge_adapter(&mut self) -> Result<()> {
        if let Linear::Lora {
            base,
            adapter,
            merged: merged @ false,
        } = self
        {
            **base = base.shifted(&adapter.delta_weight()?, 1.0)?;
            *merged = true;
        }
        Ok(())
    }

    /// Takes a merged adapter back out of its base weight (exact up to rounding for f32).
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        if let Linear::Lora {
            base,
            adapter,
            merged: merged @ true,
        } = self
        {
            **base = base.shifted(&adapter.delta_weight()?, -1.0)?;
            *merged = false;
        }
        Ok(())
    }

    /// Merges the adapter and drops it, leaving the base layer (peft's `merge_and_unload`).
    pub fn merge_and_unload(&mut self) -> Result<()> {
        self.merge_adapter()?;
        if let Linear::Lora { base, .. } = self {
            let base = (**base).clone();
            *self = base;
        }
        Ok(())
    }

    /// The trainable tensors this layer uses: its adapter's A and B, and any weight or bias
    /// that is a variable (full fine-tuning).
    pub fn variables(&self) -> Vec<Tensor> {
        match self {
            Linear::Dense { weight, bias } => std::iter::once(weight)
                .chain(bias.as_ref())
                .filter(|t| t.is_variable())
                .cloned()
                .collect(),
            Linear::Int8(layer) => layer
                .bias
                .iter()
                .filter(|t| t.is_variable())
                .cloned()
                .collect(),
            Linear::Lora { base, adapter, .. } => {
                let mut out = base.variables();
                out.extend(adapter.parameters().into_iter().cloned());
                out
            }
        }
    }

    /// The device the layer's weights live on.
    pub fn dense_device(&self) -> lathe_core::Device {
        match self {
            Linear::Dense { weight, .. } => weight.device().clone(),
            Linear::Int8(layer) => layer.weight.device().clone(),
            Linear::Lora { base, .. } => base.dense_device(),
        }
    }

    /// The adapter of a LoRA layer.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        match self {
            Linear::Lora { adapter, .. } => Some(adapter),
            _ => None,
        }
    }

    /// Number of parameters of the frozen base (weight and bias).
    pub fn base_parameter_count(&self) -> usize {
        match self {
            Linear::Dense { weight, bias } => {
                weight.elem_count() + bias.as_ref().map_or(0, Tensor::elem_count)
            }
            Linear::Int8(layer) => {
                layer.weight.out_features() * layer.weight.in_features()
                    + layer.bias.as_ref().map_or(0, Tensor::elem_count)
            }
            Linear::Lora { base, .. } => base.base_parameter_count(),
        }
    }

    /// Loads `{prefix}.weight` (out, in) and, when `bias`, `{prefix}.bias` (out,).
    pub fn load(
        weights: &mut Weights,
        prefix: &str,
        out: usize,
        input: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = weights.take(&format!("{prefix}.weight"), &[out, input])?;
        let bias = if bias {
            Some(weights.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Linear::dense(weight, bias)
    }

    /// As [`Linear::load`], for a linear layer of a transformer block: the weight is built
    /// straight in the precision of the store's [`crate::hf::LoadOptions`] (an int8 weight
    /// is quantized as it is read, never held in f32 whole).
    ///
    /// In a bitsandbytes 8-bit checkpoint ([`Weights::bnb_int8`]) the checkpoint decides, not
    /// the requested precision (transformers too loads it in 8 bits whatever `dtype` says): an
    /// int8 weight with its `SCB` scales becomes an [`Int8Linear`] as stored (no
    /// requantization) with the checkpoint's threshold, computing bitsandbytes' variant of
    /// LLM.int8 ([`Int8Variant::Bitsandbytes`]) so that the model's logits are bnb's; a
    /// module of `llm_int8_skip_modules` stays dense (f16 when F16 is asked, else f32); any
    /// other float weight is quantized to int8 with that threshold, as bitsandbytes would
    /// when loading it, but by lathe and in lathe's variant (bnb would quantize the weight
    /// rounded to f16, so its layer is not this one whatever the forward). An int8 weight in
    /// a checkpoint whose config has no bitsandbytes `quantization_config`, or in a skipped
    /// module, is an error.
    pub fn load_block(
        weights: &mut Weights,
        prefix: &str,
        out: usize,
        input: usize,
        bias: bool,
    ) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let take_bias = |weights: &mut Weights| match bias {
            true => weights.take(&format!("{prefix}.bias"), &[out]).map(Some),
            false => Ok(None),
        };
        let bnb = weights.bnb_int8().cloned();
        let skipped = bnb.as_ref().is_some_and(|q| q.skips(prefix));
        if weights.stored_dtype(&name) == Some(StoredDType::I8) {
            let problem = match &bnb {
                None => Some(
                    "int8 (bitsandbytes) weight, but config.json has no bitsandbytes 8-bit \
                     quantization_config to say how to use it",
                ),
                Some(_) if skipped => Some(
                    "int8 weight of a module that quantization_config.llm_int8_skip_modules \
                     keeps dense",
                ),
                Some(_) => None,
            };
            if let Some(detail) = problem {
                return Err(Error::Tensor {
                    path: weights.file_of(&name),
                    tensor: name,
                    detail: detail.to_string(),
                });
            }
            let threshold = bnb.map_or(Int8Linear::DEFAULT_THRESHOLD, |q| q.threshold);
            let weight = weights.take_bnb_int8(prefix, out, input)?;
            let bias = take_bias(weights)?;
            // bitsandbytes' own arithmetic: the checkpoint was made to run under bnb's
            // Linear8bitLt, and lathe's variant moves an int8 activation by a step now and
            // then (the planted outliers of the test fixtures amplify it to 0.33 in a Llama
            // logit), so only bnb's variant gives the logits the checkpoint's users know
            // (models/tests/bnb_int8.rs holds them to bnb's within 1e-5). Weights lathe
            // quantizes itself, below, keep lathe's.
            let layer = Int8Linear::new(weight, bias, threshold)?;
            return Ok(Linear::Int8(layer.with_variant(Int8Variant::Bitsandbytes)));
        }
        let precision = match (bnb, weights.options().precision) {
            (Some(_), Precision::F16) if skipped => Precision::F16,
            (Some(_), _) if skipped => Precision::F32,
            (Some(q), _) => Precision::Int8 {
                threshold: q.threshold,
            },
            (None, precision) => precision,
        };
        let weight = match precision {
            Precision::F32 => return Linear::load(weights, prefix, out, input, bias),
            Precision::F16 => weights.take_as_f16(&name, &[out, input])?,
            Precision::Int8 { threshold } => {
                let weight = weights.take_int8(&name, &[out, input])?;
                let bias = take_bias(weights)?;
                return Ok(Linear::Int8(Int8Linear::new(weight, bias, threshold)?));
            }
        };
        let bias = take_bias(weights)?;
        Linear::dense(weight, bias)
    }

    /// Appends this layer's tensors under `{prefix}.weight` and `{prefix}.bias`.
    pub fn push_named(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) -> Result<()> {
        let (weight, bias) = self.dense_parts()?;
        out.push((format!("{prefix}.weight"), weight));
        if let Some(b) = bias {
            out.push((format!("{prefix}.bias"), b));
        }
        Ok(())
    }
}
