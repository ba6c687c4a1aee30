//! Memory planning of reward-model training, from the encoder's config and the tokenized
//! data alone (no weight read), in the categories of `lathe_models::plan`.
//!
//! Exact from the shapes: the encoder's f32 weights, the head, the LoRA adapters and their
//! Adam state, the cached pooled states (N, H) and the token ids. Estimated per token (the
//! floats the autodiff keeps, fitted to measured peaks of MiniLM; attention scores grow with
//! the padded batch's length T): the encoder passes of each phase, whose batches are known
//! in advance because they are formed from the token counts:
//! - pooled states for the head stage: length-sorted batches of [`FEATURE_BATCH`], no
//!   gradients;
//! - the LoRA stage: a batch of `lora.batch_size` texts padded to the longest text (the
//!   batch holding it is padded to it) with every block's activations kept for the
//!   backward;
//! - scoring the held-out set (and a test set): length-sorted batches of [`EVAL_BATCH`].
//!
//! Loading reads one tensor at a time into its f32 form, so it adds at most one tensor's
//! stored bytes (none when the file is f32).

use lathe_models::plan::{MemoryPlan, RUNTIME_BYTES};

use crate::config::EncoderConfig;
use crate::encoder::block_linears;
use crate::train::{lora_config, Prepared, EVAL_BATCH, FEATURE_BATCH};

/// The data's shape: token counts per text after truncation, and the texts' bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataShape {
    /// Token count of each training text.
    pub train_lengths: Vec<usize>,
    /// Token count of each held-out text.
    pub val_lengths: Vec<usize>,
    /// Texts only scored (a test set), after training.
    pub test_lengths: Vec<usize>,
    /// Bytes of every example's text.
    pub text_bytes: u64,
}

impl Prepared {
    /// The shape of the prepared data, with `test_lengths` of texts scored after training.
    pub fn data_shape(&self, test_lengths: Vec<usize>) -> DataShape {
        DataShape {
            train_lengths: self.train_ids.iter().map(Vec::len).collect(),
            val_lengths: self.val_ids.iter().map(Vec::len).collect(),
            test_lengths,
            text_bytes: self.text_bytes,
        }
    }

    /// [`training_plan`] of this data and settings.
    pub fn memory_plan(&self, test_lengths: Vec<usize>, stored: Stored) -> MemoryPlan {
        training_plan(
            &self.encoder,
            &self.config,
            &self.data_shape(test_lengths),
            stored,
        )
    }
}

/// How the encoder's weights are stored, and where training runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Bytes of one stored weight element: 4 (f32), 2 (f16 or bf16).
    pub elem_bytes: u64,
    /// The plan is of a GPU's memory (no process runtime, loading on the host).
    pub on_gpu: bool,
}

/// The product of `factors` in bytes, saturating at `u64::MAX`: a config whose sizes would
/// overflow plans as "more than any budget" instead of wrapping.
fn bytes(factors: &[u64]) -> u64 {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .unwrap_or(u64::MAX)
}

/// Floats the encoder holds per token at the peak of a pass without gradients: one block's
/// working set (fitted: 9 H + 2 F, plus the attention scores of the token's row).
fn inference_floats(c: &EncoderConfig, t: u64) -> u64 {
    let (h, f, heads) = (c.hidden as u64, c.intermediate as u64, c.heads as u64);
    bytes(&[9, h])
        .saturating_add(bytes(&[2, f]))
        .saturating_add(bytes(&[heads, t]))
}

/// Floats a training pass keeps per token per block for the backward (fitted: 18 H + 4 F,
/// the scores, their scaled copy and probabilities (3 x heads x T), and each adapted
/// linear's input, r-wide middle and output).
fn training_floats(c: &EncoderConfig, t: u64, lora: u64) -> u64 {
    let (h, f, heads) = (c.hidden as u64, c.intermediate as u64, c.heads as u64);
    bytes(&[18, h])
        .saturating_add(bytes(&[4, f]))
        .saturating_add(bytes(&[3, heads, t]))
        .saturating_add(lora)
}

/// The largest no-gradient pass over `lengths` in length-sorted batches of `batch`: each
/// batch is padded to its longest text.
fn sorted_pass_peak(c: &EncoderConfig, lengths: &[usize], batch: usize) -> u64 {
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    sorted
        .chunks(batch.max(1))
        .map(|rows| {
            let t = *rows.last().expect("chunks are non-empty") as u64;
            bytes(&[4, rows.len() as u64, t, inference_floats(c, t)])
        })
        .max()
        .unwrap_or(0)
}

/// The encoder's f32 parameters: embeddings (words, positions, token types, norm) and per
/// block four H x H and two H x F linears with biases and two norms.
/// Saturates at `u64::MAX` for sizes no machine holds.
pub fn encoder_parameters(c: &EncoderConfig) -> u64 {
    let (h, f) = (c.hidden as u128, c.intermediate as u128);
    let rows = c.vocab_size as u128 + c.max_positions as u128 + c.type_vocab_size as u128;
    let embeddings = rows * h + 2 * h;
    let block = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h;
    let total = embeddings.saturating_add((c.layers as u128).saturating_mul(block));
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// The predicted peak of training a reward model on `encoder` with `config` over `data`.
pub fn training_plan(
    encoder: &EncoderConfig,
    config: &crate::TrainConfig,
    data: &DataShape,
    stored: Stored,
) -> MemoryPlan {
    let c = encoder;
    let (h, f32b) = (c.hidden as u64, 4u64);
    let weights = encoder_parameters(c).saturating_mul(f32b);
    // The largest tensor is the word embedding; read whole in its stored form before it is
    // widened (read straight into place when stored as f32).
    let largest = bytes(&[c.vocab_size.max(c.intermediate) as u64, h]);
    let loading = if stored.on_gpu || stored.elem_bytes == 4 {
        0
    } else {
        stored.elem_bytes.saturating_mul(largest)
    };

    // Texts (the caller's examples and the split's copies), ids, cached pooled states.
    let examples = (data.train_lengths.len() + data.val_lengths.len()) as u64;
    let tokens: u64 = data
        .train_lengths
        .iter()
        .chain(&data.val_lengths)
        .map(|&l| l as u64)
        .sum();
    let host_data = 2 * data.text_bytes + 2 * examples * 32 + tokens * 4 + examples * 24;
    let features = bytes(&[examples, h, f32b]);

    // The head (2 x H + 2) with the head stage's best copy; the LoRA stage's adapters, their
    // best copy and Adam's gradients and two moments.
    let head = 2 * h + 2;
    // Per adapted linear: A and B (r x (in + out)), the pass's input, middle and output
    // (in + r + out per token), and its merged weight when saving (out x in).
    let (mut adapted, mut lora_floats, mut merged) = (0u64, 0u64, 0u64);
    if let Some(lora) = &config.lora {
        let peft = lora_config(c.architecture, lora);
        let r = lora.r as u64;
        for i in 0..c.layers {
            for (name, out, input) in block_linears(c, i) {
                if peft.matches(&name) {
                    let (out, input) = (out as u64, input as u64);
                    adapted = adapted.saturating_add(bytes(&[r, out + input]));
                    lora_floats = lora_floats.saturating_add(out + input + r);
                    merged = merged.saturating_add(bytes(&[out, input]));
                }
            }
        }
        lora_floats /= c.layers.max(1) as u64;
    }
    let trainable = head.saturating_add(adapted);
    let adapters = bytes(&[2, trainable, f32b]);
    let optimizer = bytes(&[3, trainable, f32b]);

    let longest = |lengths: &[usize]| lengths.iter().copied().max().unwrap_or(0) as u64;
    let features_pass = sorted_pass_peak(c, &data.train_lengths, FEATURE_BATCH)
        .max(sorted_pass_peak(c, &data.val_lengths, FEATURE_BATCH));
    let scoring = sorted_pass_peak(c, &data.val_lengths, EVAL_BATCH).max(sorted_pass_peak(
        c,
        &data.test_lengths,
        EVAL_BATCH,
    ));
    let lora_pass = match &config.lora {
        Some(lora) => {
            let t = longest(&data.train_lengths);
            let rows = (lora.batch_size as u64).min(data.train_lengths.len() as u64);
            bytes(&[
                4,
                rows,
                t,
                c.layers as u64,
                training_floats(c, t, lora_floats),
            ])
        }
        None => 0,
    };
    let activations = features_pass.max(scoring).max(lora_pass);
    // Saving merges each adapted weight into a new tensor (the file is written from the
    // tensors themselves).
    let scratch = merged.saturating_mul(f32b);

    MemoryPlan {
        runtime: if stored.on_gpu { 0 } else { RUNTIME_BYTES },
        loading,
        weights,
        data: (host_data * u64::from(!stored.on_gpu)).saturating_add(features),
        adapters,
        optimizer,
        activations,
        kv_cache: 0,
        logits: 0,
        scratch,
        // The encoder's weights are not packed.
        packed: 0,
    }
}
