//! Loading a tensor at a time: the streamed load equals the old whole-file parse bit for bit;
//! int8 block weights quantized as they are read from f16 shards equal quantizing the f32
//! model; f16 embeddings at load equal converting them afterwards; and a checkpoint whose
//! shards are truncated, missing or of the wrong dtype is an error naming the file and the
//! tensor before any model exists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lathe_core::testing::{assert_close, test_gpu, Tolerance};
use lathe_core::{DType, Device, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::config::ModelConfig;
use lathe_models::hf::{load_hf_dir, load_hf_dir_with, CausalLm, LoadOptions, Weights};
use lathe_models::linear::{Linear, Precision};

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// A fresh scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("lathe-stream-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const FIXTURES: [&str; 3] = [
    "neox_parallel_quarter_gelu",
    "neox_sequential_full_gelu_fast",
    "llama_gqa_tied",
];

fn logits(model: &CausalLm, device: &Device) -> Vec<f32> {
    let ids = Tensor::from_vec(vec![3u32, 7, 1, 9, 4, 4], &[2, 3], device).unwrap();
    let layout = TokenLayout::contiguous(2, 3, 0, device).unwrap();
    model
        .forward(&ids, &layout, None)
        .unwrap()
        .to_vec_f32()
        .unwrap()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|x| x.to_bits()).collect()
}

/// The fixture's tensors parsed from whole files in memory (the loading of before).
fn whole_file_weights(dir: &Path) -> Weights {
    let mut weights = Weights::new(dir.display().to_string(), &Device::Cpu);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            for (name, t) in lathe_core::safetensors::load_bytes(&bytes, &Device::Cpu).unwrap() {
                weights.insert(name, t, &path.display().to_string());
            }
        }
    }
    weights
}

#[test]
fn streamed_loading_equals_the_whole_file_parse_bit_for_bit() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let old = CausalLm::from_weights(config, &mut whole_file_weights(&dir)).unwrap();
        let new = load_hf_dir(&dir, &Device::Cpu).unwrap();
        assert_eq!(
            bits(&logits(&old, &Device::Cpu)),
            bits(&logits(&new, &Device::Cpu)),
            "{name}"
        );
    }
}

/// Writes `dir`'s model with every tensor in f16, split over two shards with an index, as
/// transformers saves a half-precision checkpoint.
fn write_f16_shards(model: &CausalLm, dir: &Path) {
    let tensors: Vec<(String, Tensor)> = model
        .named_weights()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::F16).unwrap()))
        .collect();
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (k, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let named: Vec<(&str, &Tensor)> = part.iter().map(|(n, t)| (n.as_str(), t)).collect();
        lathe_core::safetensors::save(&dir.join(&file), &named, None).unwrap();
        for (n, _) in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        model.config().to_json_string().unwrap(),
    )
    .unwrap();
}

fn int8_parts(model: &CausalLm) -> Vec<(Vec<i8>, Vec<f32>)> {
    let linears: Vec<&Linear> = model.linears().into_iter().map(|(_, l)| l).collect();
    linears
        .into_iter()
        .map(|l| match l {
            Linear::Int8(q) => (q.weight.values().unwrap(), q.weight.scales().unwrap()),
            other => panic!("not int8: {other:?}"),
        })
        .collect()
}

#[test]
fn int8_from_f16_shards_equals_quantizing_the_f32_model() {
    for name in FIXTURES {
        let scratch = Scratch::new(&format!("int8-{name}"));
        write_f16_shards(
            &load_hf_dir(&fixture_dir(name), &Device::Cpu).unwrap(),
            &scratch.0,
        );
        let options = LoadOptions {
            precision: Precision::Int8 { threshold: 6.0 },
            embeddings_f16: false,
        };
        let streamed = load_hf_dir_with(&scratch.0, &Device::Cpu, options).unwrap();
        let mut reference = load_hf_dir(&scratch.0, &Device::Cpu).unwrap();
        reference.quantize_int8(6.0).unwrap();
        assert_eq!(int8_parts(&streamed), int8_parts(&reference), "{name}");
        assert_eq!(
            bits(&logits(&streamed, &Device::Cpu)),
            bits(&logits(&reference, &Device::Cpu)),
            "{name}"
        );
        // Straight onto the GPU (quantized on the host, then uploaded): the same int8 bytes.
        let gpu = test_gpu();
        let on_gpu = load_hf_dir_with(&scratch.0, &gpu, options).unwrap();
        assert_eq!(
            int8_parts(&on_gpu),
            int8_parts(&reference),
            "{name} on the GPU"
        );
        assert_close(
            &logits(&on_gpu, &gpu),
            &logits(&reference, &Device::Cpu),
            Tolerance::new(1e-4, 1e-4),
        );
        // f16 block weights straight from the f16 shards equal rounding the f32 model.
        let f16 = LoadOptions {
            precision: Precision::F16,
            embeddings_f16: false,
        };
        let streamed = load_hf_dir_with(&scratch.0, &Device::Cpu, f16).unwrap();
        let mut reference = load_hf_dir(&scratch.0, &Device::Cpu).unwrap();
        reference.to_f16().unwrap();
        assert_eq!(
            bits(&logits(&streamed, &Device::Cpu)),
            bits(&logits(&reference, &Device::Cpu)),
            "{name} f16"
        );
    }
}

#[test]
fn f16_embeddings_at_load_equal_converting_afterwards() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let options = LoadOptions {
            precision: Precision::Int8 { threshold: 6.0 },
            embeddings_f16: true,
        };
        for device in [Device::Cpu, test_gpu()] {
            let streamed = load_hf_dir_with(&dir, &device, options).unwrap();
            let mut streamed = streamed;
            let (embed, _) = streamed.arch_mut().embedding_and_head();
            let embed = embed.clone();
            assert_eq!(embed.dtype(), DType::F16, "{name}");
            let mut reference = load_hf_dir(&dir, &device).unwrap();
            reference.quantize_int8(6.0).unwrap();
            reference.embeddings_to_f16().unwrap();
            assert_close(
                &logits(&streamed, &device),
                &logits(&reference, &device),
                Tolerance::new(1e-5, 1e-5),
            );
            // With f32 blocks, against the f32 embeddings: close (f16 rounding of the
            // embedding and head), not equal.
            let f32_blocks = LoadOptions {
                precision: Precision::F32,
                embeddings_f16: true,
            };
            let half_embed = load_hf_dir_with(&dir, &device, f32_blocks).unwrap();
            let full = load_hf_dir(&dir, &device).unwrap();
            let (got, want) = (logits(&half_embed, &device), logits(&full, &device));
            assert_close(&got, &want, Tolerance::new(5e-3, 5e-3));
            assert_ne!(got, want, "{name}: the embeddings were not rounded");
        }
    }
}

fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

fn load_error(dir: &Path) -> String {
    let options = LoadOptions {
        precision: Precision::Int8 { threshold: 6.0 },
        embeddings_f16: true,
    };
    match load_hf_dir_with(dir, &Device::Cpu, options) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_missing_or_mistyped_shards_are_errors_naming_file_and_tensor() {
    let model = load_hf_dir(&fixture_dir("neox_parallel_quarter_gelu"), &Device::Cpu).unwrap();
    // A truncated shard: refused when the headers are read, before any tensor is built.
    let scratch = Scratch::new("truncated");
    write_f16_shards(&model, &scratch.0);
    let shard = &shard_files(&scratch.0)[1];
    let bytes = std::fs::read(shard).unwrap();
    std::fs::write(shard, &bytes[..bytes.len() - 3]).unwrap();
    let err = load_error(&scratch.0);
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    // A missing shard.
    let scratch = Scratch::new("missing");
    write_f16_shards(&model, &scratch.0);
    std::fs::remove_file(&shard_files(&scratch.0)[0]).unwrap();
    let err = load_error(&scratch.0);
    assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");
    // A block weight stored as u32: named with its file.
    let scratch = Scratch::new("dtype");
    write_f16_shards(&model, &scratch.0);
    let name = "gpt_neox.layers.0.attention.query_key_value.weight";
    let shard = scratch.0.join("model-00001-of-00002.safetensors");
    let mut tensors: HashMap<String, Tensor> = lathe_core::safetensors::load(&shard, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let shape = tensors[name].shape().to_vec();
    let count: usize = shape.iter().product();
    tensors.insert(
        name.to_string(),
        Tensor::from_vec(vec![1u32; count], &shape, &Device::Cpu).unwrap(),
    );
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    lathe_core::safetensors::save(&shard, &named, None).unwrap();
    let err = load_error(&scratch.0);
    assert!(
        err.contains(name) && err.contains("model-00001-of-00002.safetensors"),
        "{err}"
    );
    // A shape the config does not expect.
    let scratch = Scratch::new("shape");
    write_f16_shards(&model, &scratch.0);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(scratch.0.join("config.json")).unwrap())
            .unwrap();
    config["intermediate_size"] = 96.into();
    std::fs::write(scratch.0.join("config.json"), config.to_string()).unwrap();
    let err = load_error(&scratch.0);
    assert!(
        err.contains("dense_h_to_4h.weight") && err.contains("expected"),
        "{err}"
    );
}
