//! GPT-NeoX and Llama against transformers 4.46.3 on the tiny random models of
//! scripts/golden_models.py (models/tests/fixtures/models/NAME/: the HF directory plus
//! golden.safetensors with inputs, logits and last hidden states), on the CPU and the GPU:
//! full batches, left-padded batches, and KV-cache decoding against the full forward.

use std::collections::HashMap;
use std::path::PathBuf;

use lathe_core::testing::{compare, gpu_with_binding_limit, test_gpu, Tolerance};
use lathe_core::{Device, Tensor};
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::attention::TokenLayout;
use lathe_models::hf::{load_hf_dir, CausalLm};
use lathe_models::logprobs::{next_tokens, packed_token_logprobs, token_logprobs_and_entropy};

/// A binding limit under the tiny models' embeddings, weights, logits and KV caches
/// (every row still fits, with the alignment steps of chunked rows).
const TINY_BINDING: u64 = 2 << 10;

const GPT_NEOX: [&str; 4] = [
    "neox_parallel_quarter_gelu",
    "neox_sequential_full_gelu_fast",
    "neox_parallel_full_gelu_new",
    "neox_sequential_quarter_gelu",
];
const LLAMA: [&str; 1] = ["llama_gqa_tied"];

/// Written by transformers 5.x (scripts/golden_qwen2.py): q/k/v biases, GQA, rope_theta
/// 50000 in `rope_parameters`; tied and untied heads.
const QWEN2: [&str; 2] = ["qwen2_tiny", "qwen2_untied"];

/// transformers' logits and ours, f32 both: the sums run in different orders.
const GOLDEN: Tolerance = Tolerance::new(1e-4, 1e-4);
/// A KV-cache decode against the full forward of the same implementation.
const SAME_MODEL: Tolerance = Tolerance::new(1e-5, 1e-5);

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

struct Golden {
    tensors: HashMap<String, Tensor>,
}

impl Golden {
    fn load(name: &str) -> Golden {
        let path = fixture_dir(name).join("golden.safetensors");
        let tensors = lathe_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .collect();
        Golden { tensors }
    }

    fn get(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.get(name).to_vec_f32().unwrap()
    }

    fn u32s(&self, name: &str) -> Vec<u32> {
        self.get(name).to_vec_u32().unwrap()
    }

    fn dims(&self) -> (usize, usize) {
        let s = self.get("input_ids").shape();
        (s[0], s[1])
    }
}

fn load(name: &str, device: &Device) -> CausalLm {
    load_hf_dir(&fixture_dir(name), device).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: Tolerance) {
    eprintln!("{what}: max |diff| {:.3e}", max_abs_diff(got, want));
    if let Err(m) = compare(got, want, tol) {
        panic!("{what}: {m}");
    }
}

/// The rows of `values` (B, T, W) at positions where `mask` (B, T) is 1, flattened.
fn valid_rows<T: Copy>(values: &[T], mask: &[u32], width: usize) -> Vec<T> {
    mask.iter()
        .enumerate()
        .filter(|(_, &m)| m != 0)
        .flat_map(|(i, _)| values[i * width..(i + 1) * width].iter().copied())
        .collect()
}

/// Full batch: logits and last hidden states equal transformers'.
fn full_batch_matches(name: &str, device: &Device) {
    let golden = Golden::load(name);
    let model = load(name, device);
    let (b, t) = golden.dims();
    let ids = golden.get("input_ids").to_device(device).unwrap();
    let layout = TokenLayout::contiguous(b, t, 0, device).unwrap();
    let logits = model.forward(&ids, &layout, None).unwrap();
    assert_eq!(logits.shape(), [b, t, model.config().vocab_size()]);
    let hidden = model.forward_hidden(&ids, &layout, None).unwrap();
    let label = format!("{name} on {}", device.name());
    check(
        &format!("{label}: logits"),
        &logits.to_vec_f32().unwrap(),
        &golden.f32s("logits"),
        GOLDEN,
    );
    check(
        &format!("{label}: hidden"),
        &hidden.to_vec_f32().unwrap(),
        &golden.f32s("hidden"),
        GOLDEN,
    );
}

/// Left-padded batch: the real positions equal transformers' padded run and the same
/// tokens' logits in the unpadded batch.
fn padded_batch_matches(name: &str, device: &Device) {
    let golden = Golden::load(name);
    let model = load(name, device);
    let (b, t) = golden.dims();
    let vocab = model.config().vocab_size();
    let mask = golden.u32s("padded_attention_mask");
    let ids = golden.get("padded_input_ids").to_device(device).unwrap();
    let layout = TokenLayout::from_attention_mask(&mask, b, t, device).unwrap();
    let logits = model
        .forward(&ids, &layout, None)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let label = format!("{name} on {}", device.name());
    check(
        &format!("{label}: padded logits"),
        &valid_rows(&logits, &mask, vocab),
        &valid_rows(&golden.f32s("padded_logits"), &mask, vocab),
        GOLDEN,
    );
    // Row r holds the first len_r tokens of unpadded row r, ending at the last position.
    let full = golden.f32s("logits");
    let lengths = golden.u32s("padded_lengths");
    let unpadded_mask: Vec<u32> = (0..b)
        .flat_map(|r| {
            let len = lengths[r] as usize;
            (0..t).map(move |i| u32::from(i < len))
        })
        .collect();
    check(
        &format!("{label}: padded vs unpadded logits"),
        &valid_rows(&logits, &mask, vocab),
        &valid_rows(&full, &unpadded_mask, vocab),
        GOLDEN,
    );
}

/// The left-padded batch's real tokens packed back to back into one row: every token's
/// logits equal transformers' padded run and our own padded forward, and the gradients of a
/// loss over those logits reach the LoRA adapters equal.
fn packed_batch_matches(name: &str, device: &Device) {
    let golden = Golden::load(name);
    let mut model = load(name, device);
    let targets: Vec<String> = model
        .linears()
        .iter()
        .map(|(name, _)| name.rsplit('.').next().unwrap().to_string())
        .collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let switch = AdapterSwitch::new();
    model
        .add_lora(&LoraConfig::new(4, 8.0, &targets), &switch, 11)
        .unwrap();
    let (b, t) = golden.dims();
    let vocab = model.config().vocab_size();
    let mask = golden.u32s("padded_attention_mask");
    let ids_host = golden.u32s("padded_input_ids");
    let real: Vec<u32> = valid_rows(&ids_host, &mask, 1);
    let lengths: Vec<usize> = mask
        .chunks(t)
        .map(|row| row.iter().filter(|&&m| m != 0).count())
        .collect();
    assert!(
        lengths.iter().any(|&len| len != lengths[0]),
        "the fixture's rows must differ in length"
    );
    let layout = TokenLayout::packed(&lengths, device).unwrap();
    let ids = Tensor::from_vec(real.clone(), &[1, real.len()], device).unwrap();
    let packed_logits = model.forward(&ids, &layout, None).unwrap();
    assert_eq!(packed_logits.shape(), [1, real.len(), vocab]);
    let packed = packed_logits.to_vec_f32().unwrap();
    let padded_layout = TokenLayout::from_attention_mask(&mask, b, t, device).unwrap();
    let padded_ids = Tensor::from_vec(ids_host, &[b, t], device).unwrap();
    let padded_logits = model.forward(&padded_ids, &padded_layout, None).unwrap();
    let padded = padded_logits.to_vec_f32().unwrap();
    let label = format!("{name} on {}", device.name());
    check(
        &format!("{label}: packed vs transformers' padded logits"),
        &packed,
        &valid_rows(&golden.f32s("padded_logits"), &mask, vocab),
        GOLDEN,
    );
    check(
        &format!("{label}: packed vs padded logits"),
        &packed,
        &valid_rows(&padded, &mask, vocab),
        SAME_MODEL,
    );
    assert!(
        model
            .forward(&ids, &layout, Some(&mut model.new_cache()))
            .is_err(),
        "a packed layout must refuse a KV cache"
    );

    // Per-token log-probs and entropies of right-padded rows, packed or not.
    let seq = t;
    let mut right_padded = Vec::with_capacity(b * seq);
    let mut start = 0;
    for &len in &lengths {
        right_padded.extend_from_slice(&real[start..start + len]);
        right_padded.resize(right_padded.len() + seq - len, real[0]);
        start += len;
    }
    let wanted: Vec<bool> = (0..b * (seq - 1))
        .map(|i| i % (seq - 1) + 1 < lengths[i / (seq - 1)])
        .collect();
    let targets = next_tokens(&right_padded, seq, Some(&wanted)).unwrap();
    let (padded_logps, padded_entropy) = token_logprobs_and_entropy(
        &model,
        &Tensor::from_vec(right_padded.clone(), &[b, seq], device).unwrap(),
        &TokenLayout::contiguous(b, seq, 0, device).unwrap(),
        &targets,
    )
    .unwrap();
    let (packed_logps, packed_entropy) = packed_token_logprobs(
        &model,
        &right_padded,
        (b, seq),
        &lengths,
        &targets,
        true,
        device,
    )
    .unwrap();
    let masked = |x: &Tensor| -> Vec<f32> {
        let v = x.to_vec_f32().unwrap();
        v.iter()
            .zip(&wanted)
            .map(|(&x, &w)| if w { x } else { 0.0 })
            .collect()
    };
    check(
        &format!("{label}: packed vs padded token log-probs"),
        &packed_logps.to_vec_f32().unwrap(),
        &padded_logps.to_vec_f32().unwrap(),
        SAME_MODEL,
    );
    check(
        &format!("{label}: packed vs padded entropies"),
        &masked(&packed_entropy.unwrap()),
        &masked(&padded_entropy),
        SAME_MODEL,
    );

    // sum(logits * w) over the real tokens, w fixed: the same loss both ways.
    let n = real.len();
    let weights: Vec<f32> = (0..n * vocab).map(|i| (i as f32 * 0.37).sin()).collect();
    let weights = Tensor::from_vec(weights, &[n, vocab], device).unwrap();
    let loss = |logits: &Tensor| logits.mul(&weights).unwrap().sum_all().unwrap();
    let real_slots: Vec<u32> = (0..(b * t) as u32)
        .filter(|&i| mask[i as usize] != 0)
        .collect();
    let padded_real = Tensor::embedding(
        &padded_logits.reshape(&[b * t, vocab]).unwrap(),
        &Tensor::from_vec(real_slots, &[n], device).unwrap(),
    )
    .unwrap();
    let packed_grads = loss(&packed_logits.reshape(&[n, vocab]).unwrap())
        .backward()
        .unwrap();
    let padded_grads = loss(&padded_real).backward().unwrap();
    let params = model.lora_parameters();
    assert!(!params.is_empty());
    for (i, param) in params.iter().enumerate() {
        let grad = |store: &lathe_core::GradStore| {
            store
                .get(param)
                .unwrap_or_else(|| panic!("{label}: LoRA parameter {i} got no gradient"))
                .to_vec_f32()
                .unwrap()
        };
        check(
            &format!("{label}: LoRA parameter {i}'s gradient, packed vs padded"),
            &grad(&packed_grads),
            &grad(&padded_grads),
            SAME_MODEL,
        );
    }
}

/// Prefill of the first tokens of a left-padded batch, then one token at a time with a KV
/// cache: every step's logits equal the full forward's.
fn kv_cache_matches_full_forward(name: &str, device: &Device) {
    let golden = Golden::load(name);
    let model = load(name, device);
    let (b, t) = golden.dims();
    let vocab = model.config().vocab_size();
    let mask = golden.u32s("padded_attention_mask");
    let ids_host = golden.u32s("padded_input_ids");
    let ids = Tensor::from_vec(ids_host.clone(), &[b, t], device).unwrap();
    let layout = TokenLayout::from_attention_mask(&mask, b, t, device).unwrap();
    let full = model
        .forward(&ids, &layout, None)
        .unwrap()
        .to_vec_f32()
        .unwrap();

    // Every row's real tokens end at T, so the first `prompt` columns (padding included)
    // form the prompt and the rest are decoded one by one.
    let prompt = t - 2;
    let prompt_mask: Vec<u32> = (0..b)
        .flat_map(|r| mask[r * t..r * t + prompt].iter().copied())
        .collect();
    let prompt_ids = ids.narrow(1, 0, prompt).unwrap();
    let mut step_layout =
        TokenLayout::from_attention_mask(&prompt_mask, b, prompt, device).unwrap();
    let mut cache = model.new_cache();
    let mut decoded = vec![Vec::new(); b];
    let push = |decoded: &mut Vec<Vec<f32>>, logits: &Tensor| {
        let [_, steps, _] = *logits.shape() else {
            panic!()
        };
        let v = logits.to_vec_f32().unwrap();
        for (r, row) in decoded.iter_mut().enumerate() {
            row.extend_from_slice(&v[r * steps * vocab..(r + 1) * steps * vocab]);
        }
    };
    push(
        &mut decoded,
        &model
            .forward(&prompt_ids, &step_layout, Some(&mut cache))
            .unwrap(),
    );
    for i in prompt..t {
        step_layout = step_layout.next(1).unwrap();
        let token = ids.narrow(1, i, 1).unwrap();
        let logits = model
            .forward(&token, &step_layout, Some(&mut cache))
            .unwrap();
        push(&mut decoded, &logits);
    }
    assert_eq!(cache.seq_len(), t);
    let decoded: Vec<f32> = decoded.concat();
    check(
        &format!(
            "{name} on {}: kv-cache decode vs full forward",
            device.name()
        ),
        &valid_rows(&decoded, &mask, vocab),
        &valid_rows(&full, &mask, vocab),
        SAME_MODEL,
    );
}

#[test]
fn gpt_neox_packed_batch_matches_padded_cpu() {
    GPT_NEOX
        .iter()
        .for_each(|n| packed_batch_matches(n, &Device::Cpu));
}

#[test]
fn gpt_neox_packed_batch_matches_padded_gpu() {
    GPT_NEOX
        .iter()
        .for_each(|n| packed_batch_matches(n, &test_gpu()));
}

#[test]
fn llama_packed_batch_matches_padded_cpu() {
    LLAMA
        .iter()
        .for_each(|n| packed_batch_matches(n, &Device::Cpu));
}

#[test]
fn llama_packed_batch_matches_padded_gpu() {
    LLAMA
        .iter()
        .for_each(|n| packed_batch_matches(n, &test_gpu()));
}

#[test]
fn qwen2_packed_batch_matches_padded_cpu() {
    QWEN2
        .iter()
        .for_each(|n| packed_batch_matches(n, &Device::Cpu));
}

#[test]
fn qwen2_packed_batch_matches_padded_gpu() {
    QWEN2
        .iter()
        .for_each(|n| packed_batch_matches(n, &test_gpu()));
}

#[test]
fn gpt_neox_full_batch_matches_transformers_cpu() {
    GPT_NEOX
        .iter()
        .for_each(|n| full_batch_matches(n, &Device::Cpu));
}

#[test]
fn gpt_neox_full_batch_matches_transformers_gpu() {
    GPT_NEOX
        .iter()
        .for_each(|n| full_batch_matches(n, &test_gpu()));
}

/// Both architectures on a GPU whose storage bindings are forced to 2 KiB: embeddings, LM
/// head, logits, attention and KV caches all span several windows, and every result still
/// matches transformers as on the plain GPU.
#[test]
fn models_match_transformers_with_tensors_over_a_binding() {
    let small = gpu_with_binding_limit(TINY_BINDING);
    for name in [GPT_NEOX[0], LLAMA[0]] {
        full_batch_matches(name, &small);
        padded_batch_matches(name, &small);
        kv_cache_matches_full_forward(name, &small);
    }
}

#[test]
fn gpt_neox_padded_batch_matches_transformers_cpu() {
    GPT_NEOX
        .iter()
        .for_each(|n| padded_batch_matches(n, &Device::Cpu));
}

#[test]
fn gpt_neox_padded_batch_matches_transformers_gpu() {
    GPT_NEOX
        .iter()
        .for_each(|n| padded_batch_matches(n, &test_gpu()));
}

#[test]
fn gpt_neox_kv_cache_decode_equals_full_forward_cpu() {
    GPT_NEOX
        .iter()
        .for_each(|n| kv_cache_matches_full_forward(n, &Device::Cpu));
}

#[test]
fn gpt_neox_kv_cache_decode_equals_full_forward_gpu() {
    GPT_NEOX
        .iter()
        .for_each(|n| kv_cache_matches_full_forward(n, &test_gpu()));
}

#[test]
fn llama_full_batch_matches_transformers_cpu() {
    LLAMA
        .iter()
        .for_each(|n| full_batch_matches(n, &Device::Cpu));
}

#[test]
fn llama_full_batch_matches_transformers_gpu() {
    LLAMA
        .iter()
        .for_each(|n| full_batch_matches(n, &test_gpu()));
}

#[test]
fn llama_padded_batch_matches_transformers_cpu() {
    LLAMA
        .iter()
        .for_each(|n| padded_batch_matches(n, &Device::Cpu));
}

#[test]
fn llama_padded_batch_matches_transformers_gpu() {
    LLAMA
        .iter()
        .for_each(|n| padded_batch_matches(n, &test_gpu()));
}

#[test]
fn llama_kv_cache_decode_equals_full_forward_cpu() {
    LLAMA
        .iter()
        .for_each(|n| kv_cache_matches_full_forward(n, &Device::Cpu));
}

#[test]
fn llama_kv_cache_decode_equals_full_forward_gpu() {
    LLAMA
        .iter()
        .for_each(|n| kv_cache_matches_full_forward(n, &test_gpu()));
}

#[test]
fn qwen2_full_batch_matches_transformers_cpu() {
    QWEN2
        .iter()
        .for_each(|n| full_batch_matches(n, &Device::Cpu));
}

#[test]
fn qwen2_full_batch_matches_transformers_gpu() {
    QWEN2
        .iter()
        .for_each(|n| full_batch_matches(n, &test_gpu()));
}

#[test]
fn qwen2_padded_batch_matches_transformers_cpu() {
    QWEN2
        .iter()
        .for_each(|n| padded_batch_matches(n, &Device::Cpu));
}

#[test]
fn qwen2_padded_batch_matches_transformers_gpu() {
    QWEN2
        .iter()
        .for_each(|n| padded_batch_matches(n, &test_gpu()));
}

#[test]
fn qwen2_kv_cache_decode_equals_full_forward_cpu() {
    QWEN2
        .iter()
        .for_each(|n| kv_cache_matches_full_forward(n, &Device::Cpu));
}

#[test]
fn qwen2_kv_cache_decode_equals_full_forward_gpu() {
    QWEN2
        .iter()
        .for_each(|n| kv_cache_matches_full_forward(n, &test_gpu()));
}

/// The same Qwen2 model with its config in transformers 4.46's layout (top-level
/// `rope_theta`, `torch_dtype`, `sliding_window` 4096 with `use_sliding_window` false, no
/// `layer_types`): the same logits.
#[test]
fn qwen2_config_in_the_4_46_layout_gives_the_same_logits() {
    let source = fixture_dir("qwen2_untied");
    let dir = std::env::temp_dir().join(format!("lathe-qwen2-v4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        source.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(source.join("config_v4.json"), dir.join("config.json")).unwrap();
    let golden = Golden::load("qwen2_untied");
    let (b, t) = golden.dims();
    let model = load_hf_dir(&dir, &Device::Cpu).unwrap();
    let ids = golden.get("input_ids").clone();
    let layout = TokenLayout::contiguous(b, t, 0, &Device::Cpu).unwrap();
    let logits = model.forward(&ids, &layout, None).unwrap();
    check(
        "qwen2 4.46 config: logits",
        &logits.to_vec_f32().unwrap(),
        &golden.f32s("logits"),
        GOLDEN,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--load-in-8bit`: every block linear as LLM.int8 (threshold 6.0). The logits stay within
/// 10% of the f32 model's largest logit on both devices (measured: 1.7% to 5.7% on these
/// tiny random models, whose 32-wide rows quantize coarsely), and the two devices agree.
#[test]
fn int8_models_stay_close_to_f32() {
    let gpu = test_gpu();
    for name in GPT_NEOX.iter().chain(&LLAMA).chain(&QWEN2) {
        let golden = Golden::load(name);
        let (b, t) = golden.dims();
        let want = golden.f32s("logits");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut per_device = Vec::new();
        for device in [Device::Cpu, gpu.clone()] {
            let mut model = load(name, &device);
            model.quantize_int8(6.0).unwrap();
            let ids = golden.get("input_ids").to_device(&device).unwrap();
            let layout = TokenLayout::contiguous(b, t, 0, &device).unwrap();
            let got = model
                .forward(&ids, &layout, None)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            let diff = max_abs_diff(&got, &want);
            eprintln!("{name} int8 on {}: max |logit - f32 logit| {diff:.3e} ({:.2e} of the largest logit)", device.name(), diff / scale);
            assert!(
                diff <= 0.1 * scale,
                "{name}: int8 logits {diff} off (largest logit {scale})"
            );
            per_device.push(got);
        }
        // Same algorithm on both devices, but the float ops between layers sum in different
        // orders, and a last-bit difference can flip one activation's int8 rounding in the
        // next layer: a jump of one quantization step, hence the looser bound than f32's.
        check(
            &format!("{name}: int8 GPU vs CPU"),
            &per_device[1],
            &per_device[0],
            Tolerance::new(2e-3, 2e-3),
        );
    }
}

/// f16 linear weights (embeddings, norms and LM head f32): within 1% of the f32 model's
/// largest logit on both devices (f16 keeps 11 significant bits, a relative rounding of
/// 2^-11 per weight), and the two devices agree to f32 rounding.
#[test]
fn f16_models_stay_close_to_f32() {
    let gpu = test_gpu();
    for name in GPT_NEOX.iter().chain(&LLAMA).chain(&QWEN2) {
        let golden = Golden::load(name);
        let (b, t) = golden.dims();
        let want = golden.f32s("logits");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut per_device = Vec::new();
        for device in [Device::Cpu, gpu.clone()] {
            let mut model = load(name, &device);
            model.to_f16().unwrap();
            let ids = golden.get("input_ids").to_device(&device).unwrap();
            let layout = TokenLayout::contiguous(b, t, 0, &device).unwrap();
            let got = model
                .forward(&ids, &layout, None)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            let diff = max_abs_diff(&got, &want);
            eprintln!(
                "{name} f16 on {}: max |logit - f32 logit| {diff:.3e} ({:.2e} of the largest logit)",
                device.name(),
                diff / scale
            );
            assert!(
                diff <= 0.01 * scale,
                "{name}: f16 logits {diff} off (largest logit {scale})"
            );
            per_device.push(got);
        }
        check(
            &format!("{name}: f16 GPU vs CPU"),
            &per_device[1],
            &per_device[0],
            Tolerance::new(1e-4, 1e-4),
        );
    }
}
