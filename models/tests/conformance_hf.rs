//! HF directories: configs, single and sharded safetensors, saving, and the errors for bad
//! input (unknown model_type, unsupported activation, missing tensor, wrong shape), which
//! must name the file and the tensor. Also the value head.

use std::path::{Path, PathBuf};

use lathe_core::testing::{assert_close, Tolerance};
use lathe_core::{Device, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::config::{GptNeoxConfig, LlamaConfig, ModelConfig};
use lathe_models::hf::{load_hf_dir, save_hf_dir, Weights, INDEX_FILE, WEIGHTS_FILE};
use lathe_models::value_head::ValueHead;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// A fresh scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("lathe-models-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A copy of a fixture directory (files only).
    fn copy_of(fixture: &str) -> Scratch {
        let scratch = Scratch::new(fixture);
        for entry in std::fs::read_dir(fixture_dir(fixture)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, scratch.0.join(path.file_name().unwrap())).unwrap();
        }
        scratch
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn logits_of(dir: &Path) -> Vec<f32> {
    let model = load_hf_dir(dir, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(vec![3u32, 7, 1, 9, 4, 4], &[2, 3], &Device::Cpu).unwrap();
    let layout = TokenLayout::contiguous(2, 3, 0, &Device::Cpu).unwrap();
    model
        .forward(&ids, &layout, None)
        .unwrap()
        .to_vec_f32()
        .unwrap()
}

fn load_err(dir: &Path) -> String {
    match load_hf_dir(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configs_parse_with_transformers_fields() {
    let Some(neox) =
        ModelConfig::from_file(&fixture_dir("neox_parallel_quarter_gelu").join("config.json"))
            .unwrap()
            .downcast_ref::<GptNeoxConfig>()
            .cloned()
    else {
        panic!("not gpt_neox")
    };
    assert_eq!(
        (
            neox.hidden_size,
            neox.num_attention_heads,
            neox.rotary_ndims()
        ),
        (32, 4, 2)
    );
    assert!(neox.use_parallel_residual);
    assert_eq!(
        neox.gelu_kind().unwrap(),
        lathe_core::ops::unary::GeluKind::Erf
    );
    let Some(llama) = ModelConfig::from_file(&fixture_dir("llama_gqa_tied").join("config.json"))
        .unwrap()
        .downcast_ref::<LlamaConfig>()
        .cloned()
    else {
        panic!("not llama")
    };
    assert_eq!((llama.kv_heads(), llama.head_dim()), (2, 8));
    assert!(llama.tie_word_embeddings);
    assert_eq!(llama.rope_theta, 100000.0);
    // A config written back reads back the same, unknown keys included.
    let config = ModelConfig::new(llama);
    let text = config.to_json_string().unwrap();
    assert!(text.contains("\"architectures\""), "{text}");
    let again = ModelConfig::from_json_str(&text, "written").unwrap();
    assert_eq!(again.to_json_string().unwrap(), text);
    assert_eq!(again.eos_token_ids(), vec![2]);
}

#[test]
fn unknown_model_type_is_an_error_naming_it_and_the_file() {
    let err = ModelConfig::from_json_str(r#"{"model_type": "mamba"}"#, "dir/config.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dir/config.json") && err.contains("\"mamba\""),
        "{err}"
    );
    let err = ModelConfig::from_json_str(r#"{"hidden_size": 3}"#, "c.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("c.json") && err.contains("model_type"),
        "{err}"
    );
    let err = ModelConfig::from_json_str("{", "c.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid JSON"), "{err}");
}

#[test]
fn bad_config_values_are_errors() {
    let base =
        std::fs::read_to_string(fixture_dir("neox_sequential_quarter_gelu").join("config.json"))
            .unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
        v[key] = value;
        ModelConfig::from_json_str(&v.to_string(), "config.json")
            .unwrap_err()
            .to_string()
    };
    let err = with("hidden_act", "relu".into());
    assert!(err.contains("hidden_act \"relu\""), "{err}");
    let err = with("num_attention_heads", 5.into());
    assert!(err.contains("not a multiple"), "{err}");
    let err = with(
        "rope_scaling",
        serde_json::json!({"type": "linear", "factor": 2.0}),
    );
    assert!(err.contains("rope_scaling"), "{err}");
    let err = with("hidden_size", "big".into());
    assert!(
        err.contains("config.json") && err.contains("gpt_neox config"),
        "{err}"
    );
}

#[test]
fn sharded_checkpoint_loads_every_shard() {
    let dir = fixture_dir("neox_parallel_quarter_gelu");
    assert!(dir.join(INDEX_FILE).is_file() && !dir.join(WEIGHTS_FILE).exists());
    let shards = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name().into_string().unwrap();
            name.starts_with("model-") && name.ends_with(".safetensors")
        })
        .count();
    assert!(
        shards >= 2,
        "the fixture should be sharded, has {shards} shard(s)"
    );
    let weights = Weights::from_hf_dir(&dir, &Device::Cpu).unwrap();
    // 2 layers of 12 tensors, embeddings, final norm, embed_out.
    assert!(weights.len() >= 2 * 12 + 4, "{} tensors", weights.len());
    // Merged into one file, the same model gives the same logits.
    let scratch = Scratch::new("merged-shards");
    let model = load_hf_dir(&dir, &Device::Cpu).unwrap();
    save_hf_dir(&scratch.0, &model.config(), &model.named_weights().unwrap()).unwrap();
    assert_eq!(logits_of(&dir), logits_of(&scratch.0));
}

#[test]
fn save_hf_dir_round_trips_and_leaves_no_temp_files() {
    for name in ["llama_gqa_tied", "neox_sequential_full_gelu_fast"] {
        let scratch = Scratch::new(&format!("save-{name}"));
        let model = load_hf_dir(&fixture_dir(name), &Device::Cpu).unwrap();
        save_hf_dir(&scratch.0, &model.config(), &model.named_weights().unwrap()).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(&scratch.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["config.json", "model.safetensors"]);
        assert_eq!(logits_of(&fixture_dir(name)), logits_of(&scratch.0));
    }
    // Tied Llama saves no lm_head, as transformers does.
    let model = load_hf_dir(&fixture_dir("llama_gqa_tied"), &Device::Cpu).unwrap();
    let names: Vec<String> = model
        .named_weights()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
}

/// Rewrites a single-file fixture's weights through `edit`.
fn with_edited_weights(fixture: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> Scratch {
    let scratch = Scratch::copy_of(fixture);
    let path = scratch.0.join(WEIGHTS_FILE);
    let mut tensors = lathe_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    lathe_core::safetensors::save(&path, &named, None).unwrap();
    scratch
}

#[test]
fn missing_tensor_is_an_error_naming_the_file_and_tensor() {
    let tensor = "model.layers.1.self_attn.k_proj.weight";
    let scratch = with_edited_weights("llama_gqa_tied", |t| t.retain(|(n, _)| n != tensor));
    let err = load_err(&scratch.0);
    assert!(
        err.contains(tensor) && err.contains(WEIGHTS_FILE) && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_an_error_naming_the_file_and_tensor() {
    let tensor = "gpt_neox.layers.0.attention.query_key_value.weight";
    let scratch = with_edited_weights("neox_sequential_full_gelu_fast", |t| {
        let entry = t.iter_mut().find(|(n, _)| n == tensor).unwrap();
        entry.1 = Tensor::zeros(&[32, 32], &Device::Cpu).unwrap();
    });
    let err = load_err(&scratch.0);
    assert!(
        err.contains(tensor) && err.contains(WEIGHTS_FILE) && err.contains("[32, 32]"),
        "{err}"
    );
    assert!(err.contains("expected [96, 32]"), "{err}");
}

#[test]
fn missing_shard_and_bad_index_are_errors_naming_the_file() {
    let scratch = Scratch::copy_of("neox_parallel_quarter_gelu");
    let shard = std::fs::read_dir(&scratch.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("model-")
        })
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let err = load_err(&scratch.0);
    assert!(
        err.contains(&*shard.file_name().unwrap().to_string_lossy()),
        "{err}"
    );
    std::fs::write(scratch.0.join(INDEX_FILE), "{\"metadata\": {}}").unwrap();
    let err = load_err(&scratch.0);
    assert!(
        err.contains(INDEX_FILE) && err.contains("weight_map"),
        "{err}"
    );
    let empty = Scratch::new("empty");
    let err = load_err(&empty.0);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn unknown_model_type_in_a_directory_is_an_error() {
    let scratch = Scratch::copy_of("llama_gqa_tied");
    let config = scratch.0.join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"llama\"", "\"falcon\"");
    std::fs::write(&config, text).unwrap();
    let err = load_err(&scratch.0);
    assert!(
        err.contains("config.json") && err.contains("\"falcon\""),
        "{err}"
    );
}

#[test]
fn value_head_is_linear_at_eval_and_drops_out_in_training() {
    let device = Device::Cpu;
    let mut head = ValueHead::new(8, 0.5, 3, &device).unwrap();
    let hidden = Tensor::rand_uniform(-1.0, 1.0, &[2, 3, 8], 1, &device).unwrap();
    let values = head.forward(&hidden).unwrap();
    assert_eq!(values.shape(), [2, 3]);
    // Eval: exactly summary(hidden).
    let (w, b) = head.summary.dense_parts().unwrap();
    let h = hidden.to_vec_f32().unwrap();
    let (w, b) = (w.to_vec_f32().unwrap(), b.unwrap().to_vec_f32().unwrap());
    let want: Vec<f32> = h
        .chunks(8)
        .map(|row| row.iter().zip(&w).map(|(x, w)| x * w).sum::<f32>() + b[0])
        .collect();
    assert_close(
        &values.to_vec_f32().unwrap(),
        &want,
        Tolerance::new(1e-6, 1e-6),
    );
    // Training: dropout changes the values, the same for a seed, differently for another;
    // gradients reach summary.
    head.train(1);
    let a = head.forward(&hidden).unwrap();
    assert_eq!(
        a.to_vec_f32().unwrap(),
        head.forward(&hidden).unwrap().to_vec_f32().unwrap()
    );
    head.train(2);
    let c = head.forward(&hidden).unwrap();
    assert_ne!(a.to_vec_f32().unwrap(), want);
    assert_ne!(a.to_vec_f32().unwrap(), c.to_vec_f32().unwrap());
    let grads = a.sum_all().unwrap().backward().unwrap();
    for p in head.parameters().unwrap() {
        assert!(grads.get(&p).is_some());
    }
    let err = head
        .forward(&Tensor::zeros(&[2, 3, 7], &device).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("hidden size 8"), "{err}");
    assert!(ValueHead::new(8, 1.0, 0, &device).is_err());
}

#[test]
fn value_head_weights_round_trip_under_trl_names() {
    let head = ValueHead::new(4, 0.1, 5, &Device::Cpu).unwrap();
    let named = head.named_weights().unwrap();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["v_head.summary.weight", "v_head.summary.bias"]);
    let mut weights = Weights::new("memory", &Device::Cpu);
    for (n, t) in &named {
        weights.insert(n.clone(), t.detach(), "memory");
    }
    let loaded = ValueHead::from_weights(&mut weights, 4, 0.1).unwrap();
    let x = Tensor::ones(&[1, 2, 4], &Device::Cpu).unwrap();
    assert_eq!(
        loaded.forward(&x).unwrap().to_vec_f32().unwrap(),
        head.forward(&x).unwrap().to_vec_f32().unwrap()
    );
}

#[test]
fn attention_mask_must_be_one_run_per_row() {
    let err = TokenLayout::from_attention_mask(&[1, 0, 1, 1, 1, 1], 2, 3, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 0"), "{err}");
    let layout = TokenLayout::from_attention_mask(&[0, 0, 1, 1, 1, 1], 2, 3, &Device::Cpu).unwrap();
    assert_eq!(layout.key_ranges(), Some(&[(2, 3), (0, 3)][..]));
    assert_eq!(layout.positions().to_vec_u32().unwrap(), [0, 0, 0, 0, 1, 2]);
    let next = layout.next(1).unwrap();
    assert_eq!(next.positions().to_vec_u32().unwrap(), [1, 3]);
    assert_eq!(next.key_ranges(), Some(&[(2, 4), (0, 4)][..]));
}

#[test]
fn ids_that_do_not_match_the_layout_are_errors() {
    let model = load_hf_dir(&fixture_dir("llama_gqa_tied"), &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(vec![1u32, 2, 3], &[1, 3], &Device::Cpu).unwrap();
    let layout = TokenLayout::contiguous(1, 2, 0, &Device::Cpu).unwrap();
    let err = model.forward(&ids, &layout, None).unwrap_err().to_string();
    assert!(err.contains("do not match"), "{err}");
    // A position past max_position_embeddings (64) is an error, not garbage.
    let layout = TokenLayout::contiguous(1, 3, 63, &Device::Cpu).unwrap();
    assert!(model.forward(&ids, &layout, None).is_err());
    let mut cache = lathe_models::kv_cache::KvCache::new(5);
    let layout = TokenLayout::contiguous(1, 3, 0, &Device::Cpu).unwrap();
    let err = model
        .forward(&ids, &layout, Some(&mut cache))
        .unwrap_err()
        .to_string();
    assert!(err.contains("5 layers"), "{err}");
}
