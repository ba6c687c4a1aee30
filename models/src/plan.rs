//! Memory planning: the peak bytes a job will hold, by category, from a model's config alone
//! (no weights read), so a run that cannot fit is refused before anything loads.
//!
//! Weights, adapters, optimizer state and the KV cache are counted exactly from the shapes
//! (the same formulas the loaders and `Int8Weight::bytes` use). Activations, logits and
//! scratch are estimates from what the autodiff keeps per token: every tensor a block saves
//! for its backward (or, with gradient checkpointing, each block's input plus one block
//! recomputed), the LM head's logits and their softmax.
//!
//! Loading and running peak at different times: loading holds the weights built so far plus
//! the tensor being built (its stored bytes or its f32 form; a GGUF file is held whole), the
//! run holds the finished weights plus its working set. The total is the process's runtime
//! plus the weights plus the larger of the two.

use crate::config::ModelConfig;
use crate::linear::Precision;

/// What the model is loaded for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// Generation: no gradients, a KV cache.
    Generate,
    /// Log-probs of whole sequences (`lathe eval`): no gradients, no cache.
    Score,
    /// LoRA fine-tuning on packed blocks.
    Sft,
    /// PPO: generation for the rollout, then training on minibatches, plus a value head.
    Ppo,
    /// DPO: training on batches of chosen and rejected rows (`batch` counts rows, 2 per
    /// pair), with their full logits for the log-probs; the reference is the same model.
    Dpo,
}

/// How the checkpoint is stored: what loading holds beyond the weights built so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    /// Safetensors shards, one tensor read at a time; bytes of one stored weight element
    /// (2: f16 or bf16, 4: f32, 1: bitsandbytes int8).
    Safetensors {
        /// Bytes of one stored weight element.
        elem_bytes: u64,
    },
    /// A GGUF file: read whole and held while its tensors are dequantized one at a time.
    Gguf {
        /// The file's size in bytes.
        file_bytes: u64,
    },
}

/// What the `lathe` process holds besides the model and the run: its code, the tokenizer,
/// thread stacks and allocator arenas (measured: 30-50 MiB on the CPU).
pub const RUNTIME_BYTES: u64 = 48 << 20;

/// The settings of a job that change its memory.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSettings {
    /// What the model is loaded for.
    pub job: Job,
    /// How the block weights are held (f32, f16, int8).
    pub precision: Precision,
    /// Embeddings and LM head held in f16 (else f32).
    pub embeddings_f16: bool,
    /// Sequences per forward (generation, SFT) or per PPO batch.
    pub batch: usize,
    /// Sequences per PPO minibatch (the trained batch); the SFT batch otherwise.
    pub train_batch: usize,
    /// Tokens per sequence: prompt + new tokens for generation and PPO, the block for SFT.
    pub seq_len: usize,
    /// LoRA rank (0: no adapters).
    pub lora_r: usize,
    /// Module names the adapters target (as peft's `target_modules`), e.g. `query_key_value`.
    pub lora_targets: Vec<String>,
    /// Each block's activations recomputed in the backward instead of kept.
    pub gradient_checkpointing: bool,
    /// How the checkpoint is stored, for what loading holds.
    pub checkpoint: Checkpoint,
    /// Whether the model runs on a GPU (the plan is then of device memory): the CPU computes
    /// an f32 LM head's loss in row chunks without the logits.
    pub on_gpu: bool,
}

impl PlanSettings {
    /// Generation or scoring of one sequence in f32, no adapters: the base to override.
    pub fn inference() -> PlanSettings {
        PlanSettings {
            job: Job::Generate,
            precision: Precision::F32,
            embeddings_f16: false,
            batch: 1,
            train_batch: 1,
            seq_len: 1,
            lora_r: 0,
            lora_targets: Vec::new(),
            gradient_checkpointing: false,
            checkpoint: Checkpoint::Safetensors { elem_bytes: 2 },
            on_gpu: false,
        }
    }
}

/// Predicted peak bytes by category.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryPlan {
    /// The process itself ([`RUNTIME_BYTES`]).
    pub runtime: u64,
    /// What loading holds at its peak beyond the finished weights (0 when the last tensor
    /// read is the largest thing loading ever adds).
    pub loading: u64,
    /// The model's weights as held (precision and tying applied).
    pub weights: u64,
    /// What the job holds of its data for the whole run: texts, token ids, cached features
    /// (the reward model's training; 0 for the language-model jobs, whose data is small).
    pub data: u64,
    /// The LoRA adapters' parameters (f32).
    pub adapters: u64,
    /// Gradients and Adam's two moments of the trainable parameters (0 when not training).
    pub optimizer: u64,
    /// What the autodiff keeps for the backward, or one forward's working set (estimate).
    pub activations: u64,
    /// Generation's keys and values for every layer and token (exact).
    pub kv_cache: u64,
    /// The LM head's f32 logits and what the loss derives from them (estimate).
    pub logits: u64,
    /// A fixed allowance for temporaries (8 MiB).
    pub scratch: u64,
    /// The second copies of the frozen f32 weights a CPU trainer packs for its forward
    /// products (`CausalLm::pack_frozen_weights`; 0 on a GPU, for inference, and where the
    /// CPU has no packed kernel).
    pub packed: u64,
}

impl MemoryPlan {
    /// Every category of the run with its name, in a fixed order (loading is apart: it
    /// peaks before the run).
    pub fn rows(&self) -> [(&'static str, u64); 10] {
        [
            ("runtime", self.runtime),
            ("weights", self.weights),
            ("packed weights", self.packed),
            ("data", self.data),
            ("adapters", self.adapters),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("kv cache", self.kv_cache),
            ("logits", self.logits),
            ("scratch", self.scratch),
        ]
    }

    /// The run's working set: everything the run adds to the finished weights (the packed
    /// copies are made after loading, so they count here).
    pub fn working_set(&self) -> u64 {
        [
            self.packed,
            self.adapters,
            self.optimizer,
            self.activations,
            self.kv_cache,
            self.logits,
            self.scratch,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }

    /// The peak: runtime, weights and data, plus loading's extra or the run's working set,
    /// whichever is larger.
    pub fn total(&self) -> u64 {
        [
            self.runtime,
            self.weights,
            self.data,
            self.loading.max(self.working_set()),
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }
}

/// One linear layer of a block: its module name, (out, in) and whether it has a bias.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// The module name (`q_proj`, `query_key_value`): what LoRA's targets match.
    pub name: &'static str,
    /// Output features: rows of the weight.
    pub out: usize,
    /// Input features: columns of the weight.
    pub input: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
}

impl LinearShape {
    /// A layer `name` with an (out, input) weight.
    pub fn new(name: &'static str, out: usize, input: usize, bias: bool) -> LinearShape {
        LinearShape {
            name,
            out,
            input,
            bias,
        }
    }
}

/// The linear layers of one transformer block of `config`.
pub fn block_linears(config: &ModelConfig) -> Vec<LinearShape> {
    config.arch().block_linears()
}

/// Bytes of one block weight (out, in) in `precision` (int8: rows padded to 4 bytes, plus an
/// f32 scale per row, as `Int8Weight::bytes`).
fn weight_bytes(out: usize, input: usize, precision: Precision) -> u64 {
    let (out, input) = (out as u64, input as u64);
    match precision {
        Precision::F32 => 4 * out * input,
        Precision::F16 => 2 * out * input,
        Precision::Int8 { .. } => out * (input.next_multiple_of(4) + 4),
    }
}

/// Shape facts of a config the plan needs (each architecture's [`crate::arch::ArchConfig::plan_dims`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Width of the hidden states.
    pub hidden: u64,
    /// Width of the MLP's inner layer.
    pub ffn: u64,
    /// Transformer blocks.
    pub layers: u64,
    /// Query heads.
    pub heads: u64,
    /// Key (= value) width of one token: kv heads x head size.
    pub kv_width: u64,
    /// Rows of the embedding matrix.
    pub vocab: u64,
    /// Whether the LM head shares the embedding matrix.
    pub tied: bool,
    /// LayerNorm (weight + bias) or RMSNorm (weight) floats per norm.
    pub norm_floats: u64,
    /// f32 values of the rotary tables (max positions x rotated dims).
    pub rotary_floats: u64,
}

fn dims(config: &ModelConfig) -> Dims {
    config.arch().plan_dims()
}

/// Whether the `target_modules` list selects the block linear `name` (a leaf name such as
/// `query_key_value`: for these, peft's suffix match on the full module name is equality).
fn targeted(targets: &[String], name: &str) -> bool {
    targets.iter().any(|t| t == name)
}

/// The parameters of the model of `config` as transformers counts them: embeddings (once
/// when tied), every block's linear weights, biases and norms, the final norm.
pub fn parameter_count(config: &ModelConfig) -> u64 {
    let d = dims(config);
    let embeddings = d.vocab * d.hidden * if d.tied { 1 } else { 2 };
    let block: u64 = block_linears(config)
        .iter()
        .map(|l| (l.out * l.input) as u64 + if l.bias { l.out as u64 } else { 0 })
        .sum::<u64>()
        + 2 * d.norm_floats;
    embeddings + d.layers * block + d.norm_floats
}

/// The predicted peak of `settings` on `config`.
pub fn plan(config: &ModelConfig, s: &PlanSettings) -> MemoryPlan {
    let d = dims(config);
    let linears = block_linears(config);
    let f32b = 4u64;
    let embed_bytes = if s.embeddings_f16 { 2 } else { 4 };
    let mut weights = d.vocab * d.hidden * embed_bytes;
    if !d.tied {
        weights += d.vocab * d.hidden * embed_bytes;
    }
    for l in &linears {
        let bias = if l.bias { l.out as u64 * f32b } else { 0 };
        weights += d.layers * (weight_bytes(l.out, l.input, s.precision) + bias);
    }
    weights += (2 * d.layers + 1) * d.norm_floats * f32b + d.rotary_floats * f32b;

    // LoRA A (r, in) and B (out, r) per targeted layer; the value head (H + 1) for PPO.
    let r = s.lora_r as u64;
    let mut trainable: u64 = linears
        .iter()
        .filter(|l| r > 0 && targeted(&s.lora_targets, l.name))
        .map(|l| d.layers * r * (l.input + l.out) as u64)
        .sum();
    if s.job == Job::Ppo {
        trainable += d.hidden + 1;
    }
    let training = matches!(s.job, Job::Sft | Job::Ppo | Job::Dpo);
    let adapters = trainable * f32b;
    // Gradients and Adam's two moments, f32 each.
    let optimizer = if training { 3 * trainable * f32b } else { 0 };

    let (b, t) = (s.batch as u64, s.seq_len as u64);
    let kv_cache = match s.job {
        Job::Generate | Job::Ppo => 2 * d.layers * b * t * d.kv_width * f32b,
        Job::Sft | Job::Score | Job::Dpo => 0,
    };
    // Floats one block keeps per token for its backward: norm inputs and outputs, the
    // projections' outputs, the heads split and rotated, attention probabilities (heads x T),
    // the context, the MLP's up projections and activation, residual sums; LoRA keeps its
    // (dropped-out) input and its r-wide middle per targeted layer.
    let lora_floats: u64 = linears
        .iter()
        .filter(|l| r > 0 && targeted(&s.lora_targets, l.name))
        .map(|l| l.input as u64 + r + l.out as u64)
        .sum();
    let qkv = linears
        .iter()
        .take_while(|l| l.name != "dense" && l.name != "o_proj")
        .map(|l| l.out as u64)
        .sum::<u64>();
    let per_token_block = 8 * d.hidden + 3 * qkv + 2 * d.heads * t + 3 * d.ffn + lora_floats;
    let tb = s.train_batch as u64;
    let activations = if !training {
        // Inference keeps one block's working set at a time.
        b * t * per_token_block * f32b
    } else if s.gradient_checkpointing {
        // Every block's input, plus one block recomputed in the backward.
        tb * t * (d.layers * d.hidden + per_token_block) * f32b
    } else {
        tb * t * d.layers * per_token_block * f32b
    };
    // The LM head's logits, f32: generation keeps the prompt's prefill logits; scoring and
    // PPO's log-probs the logits and their shifted copy; SFT the logits and their softmax's
    // gradient, except on the CPU with an f32 head, whose fused loss goes through one buffer
    // of row chunks (core's `linear_cross_entropy`, 24 MiB).
    let fused_loss = !s.on_gpu && !s.embeddings_f16 && s.precision != Precision::F16;
    let logits = match s.job {
        Job::Generate => b * t * d.vocab * f32b,
        Job::Score | Job::Ppo | Job::Dpo => 2 * b * t * d.vocab * f32b,
        Job::Sft if fused_loss => (tb * t * d.vocab).min(6 << 20) * f32b,
        Job::Sft => 2 * tb * t * d.vocab * f32b,
    };
    // A CPU trainer's packed copies of the frozen f32 weights: the blocks' linears and the
    // LM head, each (out rounded up to a panel, in).
    let packed_copy = |out: usize, input: usize| {
        (out.next_multiple_of(lathe_core::ops::packed::NR) * input) as u64 * f32b
    };
    let packed = if training && !s.on_gpu && lathe_core::ops::packed::kernel_available() {
        let blocks: u64 = match s.precision {
            Precision::F32 => linears
                .iter()
                .map(|l| d.layers * packed_copy(l.out, l.input))
                .sum(),
            Precision::F16 | Precision::Int8 { .. } => 0,
        };
        let head = match s.embeddings_f16 {
            false => packed_copy(d.vocab as usize, d.hidden as usize),
            true => 0,
        };
        blocks + head
    } else {
        0
    };
    // The run's transient buffers: the f16 LM head or an int8 weight widened 4 MiB at a time.
    let scratch = 8 << 20;
    // On a GPU the plan is of device memory: the process and loading's transient forms live
    // on the host (each tensor is built there, then uploaded in its final form).
    let (runtime, loading) = if s.on_gpu {
        (0, 0)
    } else {
        (RUNTIME_BYTES, loading_extra(&d, &linears, s, weights))
    };
    MemoryPlan {
        runtime,
        loading,
        weights,
        data: 0,
        adapters,
        optimizer,
        activations,
        kv_cache,
        logits,
        scratch,
        packed,
    }
}

/// Loading's peak beyond the finished `weights`: tensors are built in file order (the
/// embedding, each block's linears, the final norm, the LM head), and while one is built the
/// store holds those before it, the tensor's intermediate form and its final form; a GGUF
/// file is held whole until the model is built.
fn loading_extra(d: &Dims, linears: &[LinearShape], s: &PlanSettings, weights: u64) -> u64 {
    let embed_final = if s.embeddings_f16 { 2 } else { 4 };
    let linear_final = |n: u64| match s.precision {
        Precision::F32 => 4 * n,
        Precision::F16 => 2 * n,
        Precision::Int8 { .. } => n,
    };
    // Bytes held while a tensor of n elements kept as `final_bytes` is built.
    let transient = |n: u64, final_bytes: u64| match s.checkpoint {
        // Read whole in its stored dtype; read straight into storage when that is the form.
        Checkpoint::Safetensors { elem_bytes } if elem_bytes * n == final_bytes => 0,
        Checkpoint::Safetensors { elem_bytes } => elem_bytes * n,
        // Dequantized to f32 first.
        Checkpoint::Gguf { .. } if 4 * n == final_bytes => 0,
        Checkpoint::Gguf { .. } => 4 * n,
    };
    let mut order: Vec<(u64, u64)> = Vec::new();
    let embedding = d.vocab * d.hidden;
    order.push((embedding, embed_final * embedding));
    for _ in 0..d.layers {
        for l in linears {
            let n = (l.out * l.input) as u64;
            order.push((n, linear_final(n)));
        }
    }
    if !d.tied {
        order.push((embedding, embed_final * embedding));
    }
    let mut built = 0u64;
    let mut peak = 0u64;
    for (n, final_bytes) in order {
        peak = peak.max(built + transient(n, final_bytes) + final_bytes);
        built += final_bytes;
    }
    let file = match s.checkpoint {
        Checkpoint::Gguf { file_bytes } => file_bytes,
        Checkpoint::Safetensors { .. } => 0,
    };
    (peak + file).saturating_sub(weights)
}

/// Bytes as GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neox_20b() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"model_type": "gpt_neox", "hidden_size": 6144, "intermediate_size": 24576,
                "num_attention_heads": 64, "num_hidden_layers": 44, "vocab_size": 50432,
                "rotary_pct": 0.25, "max_position_embeddings": 2048}"#,
            "config.json",
        )
        .unwrap()
    }

    fn settings(job: Job, precision: Precision) -> PlanSettings {
        PlanSettings {
            job,
            precision,
            embeddings_f16: true,
            batch: 16,
            train_batch: 4,
            seq_len: 24,
            lora_r: 16,
            lora_targets: vec!["query_key_value".into()],
            gradient_checkpointing: true,
            checkpoint: Checkpoint::Safetensors { elem_bytes: 2 },
            on_gpu: false,
        }
    }

    /// GPT-NeoX-20B's weights counted by hand: per block 4 linears of 3H*H + H*H + 2*H*F
    /// parameters = 453M int8 bytes (+ 4 bytes per output row, f32 biases, two LayerNorms),
    /// times 44, plus two f16 embeddings of 50432 x 6144.
    #[test]
    fn gpt_neox_20b_weights_by_hand() {
        let plan = plan(
            &neox_20b(),
            &settings(Job::Ppo, Precision::Int8 { threshold: 6.0 }),
        );
        let (h, f, l, v) = (6144u64, 24576u64, 44u64, 50432u64);
        let params = 3 * h * h + h * h + 2 * h * f;
        let rows = 3 * h + h + f + h;
        let per_block = params + 4 * rows + 4 * rows + 4 * 4 * h;
        let embeddings = 2 * v * h * 2;
        let final_norm = 2 * h * 4;
        // Rotary tables: cos and sin of 2048 positions x 12 frequencies (24 rotary dims).
        let rotary = 2048 * 24 * 4;
        assert_eq!(
            plan.weights,
            l * per_block + embeddings + final_norm + rotary
        );
        // About 19.7 GiB, the issue's floor.
        assert!((19.5..20.0).contains(&(plan.weights as f64 / (1u64 << 30) as f64)));
        // LoRA r 16 on query_key_value: 16 * (H + 3H) per block, and the value head.
        assert_eq!(plan.adapters, (l * 16 * 4 * h + h + 1) * 4);
        assert_eq!(plan.optimizer, 3 * plan.adapters);
        // KV cache: K and V of 44 layers for 16 x 24 tokens of width H.
        assert_eq!(plan.kv_cache, 2 * l * 16 * 24 * h * 4);
    }

    /// EleutherAI's published parameter count of GPT-NeoX-20B.
    #[test]
    fn gpt_neox_20b_has_its_published_parameter_count() {
        assert_eq!(parameter_count(&neox_20b()), 20_554_567_680);
    }

    #[test]
    fn precision_checkpointing_and_rank_move_the_plan_the_right_way() {
        let c = neox_20b();
        let int8 = plan(&c, &settings(Job::Sft, Precision::Int8 { threshold: 6.0 }));
        let f16 = plan(&c, &settings(Job::Sft, Precision::F16));
        let f32 = plan(&c, &settings(Job::Sft, Precision::F32));
        assert!(int8.weights < f16.weights && f16.weights < f32.weights);
        let mut no_ckpt = settings(Job::Sft, Precision::F16);
        no_ckpt.gradient_checkpointing = false;
        assert!(plan(&c, &no_ckpt).activations > 10 * f16.activations);
        let mut no_lora = settings(Job::Sft, Precision::F16);
        no_lora.lora_r = 0;
        assert_eq!(plan(&c, &no_lora).adapters, 0);
        let mut generate = settings(Job::Generate, Precision::F16);
        generate.lora_r = 0;
        let generate = plan(&c, &generate);
        assert_eq!((generate.optimizer, generate.adapters), (0, 0));
    }
}
