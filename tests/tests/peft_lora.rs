//! LoRA against peft 0.13.2 (scripts/golden_lora.py) and, for Qwen2, peft 0.21.2
//! (scripts/golden_qwen2.py); fixtures in lora/tests/fixtures: a
//! peft adapter loads onto the tiny GPT-NeoX and Llama and gives peft's logits with adapters
//! on and off, its loss and A/B gradients, its merged weights; lathe's saved adapter has
//! peft's keys and reloads to the same logits; bad adapters are clear errors.

use std::path::{Path, PathBuf};

use lathe_core::testing::{assert_close, gpu_with_binding_limit, test_gpu, Tolerance};
use lathe_core::{Device, Tensor};
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::attention::TokenLayout;
use lathe_models::hf::{load_hf_dir, CausalLm};

const CASES: [&str; 3] = ["neox", "llama", "qwen2"];
/// peft's f32 logits and ours, sums in different orders.
const LOGITS: Tolerance = Tolerance::new(1e-4, 1e-4);
const GRADS: Tolerance = Tolerance::new(1e-4, 1e-4);

fn case_dir(case: &str) -> PathBuf {
    lathe_tests::fixture("lora", case)
}

struct Golden(Vec<(String, Tensor)>);

impl Golden {
    fn load(case: &str) -> Golden {
        Golden(
            lathe_core::safetensors::load(&case_dir(case).join("golden.safetensors"), &Device::Cpu)
                .unwrap(),
        )
    }
    fn get(&self, key: &str) -> &Tensor {
        &self
            .0
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("golden has no {key}"))
            .1
    }
    fn f32s(&self, key: &str) -> Vec<f32> {
        self.get(key).to_vec_f32().unwrap()
    }
}

fn base(case: &str, device: &Device) -> CausalLm {
    load_hf_dir(&case_dir(case).join("base"), device).unwrap()
}

fn with_adapter(case: &str, device: &Device) -> (CausalLm, AdapterSwitch, LoraConfig) {
    let mut model = base(case, device);
    let switch = AdapterSwitch::new();
    let config = model
        .load_lora(&case_dir(case).join("adapter"), &switch)
        .unwrap();
    (model, switch, config)
}

fn logits(model: &CausalLm, ids: &Tensor, device: &Device) -> Tensor {
    let ids = ids.to_device(device).unwrap();
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    let layout = TokenLayout::contiguous(b, t, 0, device).unwrap();
    model.forward(&ids, &layout, None).unwrap()
}

/// transformers' causal-LM loss: logits[:, :-1] against ids[:, 1:], mean.
fn causal_loss(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (b, t, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let ids = ids.to_device(logits.device()).unwrap();
    let predicting = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape(&[b * (t - 1), v])
        .unwrap();
    let targets = ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .reshape(&[b * (t - 1)])
        .unwrap();
    predicting.cross_entropy(&targets, None).unwrap()
}

fn check_forward_and_gradients(case: &str, device: &Device) {
    let golden = Golden::load(case);
    let ids = golden.get("input_ids");
    let (model, switch, _) = with_adapter(case, device);
    let on = logits(&model, ids, device);
    assert_close(
        &on.to_vec_f32().unwrap(),
        &golden.f32s("logits_lora"),
        LOGITS,
    );
    {
        let _off = switch.disable();
        let off = logits(&model, ids, device).to_vec_f32().unwrap();
        assert_close(&off, &golden.f32s("logits_disabled"), LOGITS);
        // Disabled adapters are the base model, bit for bit.
        let plain = logits(&base(case, device), ids, device)
            .to_vec_f32()
            .unwrap();
        assert_eq!(
            off, plain,
            "{case}: disabled adapters differ from the base model"
        );
    }
    assert!(switch.is_enabled());
    let loss = causal_loss(&on, ids);
    assert_close(
        &loss.to_vec_f32().unwrap(),
        &golden.f32s("loss"),
        Tolerance::new(1e-5, 1e-5),
    );
    let grads = loss.backward().unwrap();
    let adapters = model.lora_adapters();
    assert!(!adapters.is_empty());
    for adapter in adapters {
        for (which, tensor) in [('A', adapter.a()), ('B', adapter.b())] {
            let key = format!("{}.grad", lathe_lora::peft::key(adapter.name(), which));
            let got = grads
                .get(tensor)
                .unwrap_or_else(|| panic!("no gradient for {key}"));
            assert_close(&got.to_vec_f32().unwrap(), &golden.f32s(&key), GRADS);
        }
    }
}

#[test]
fn peft_adapter_logits_loss_and_gradients_cpu() {
    CASES
        .iter()
        .for_each(|c| check_forward_and_gradients(c, &Device::Cpu));
}

#[test]
fn peft_adapter_logits_loss_and_gradients_gpu() {
    let gpu = test_gpu();
    CASES
        .iter()
        .for_each(|c| check_forward_and_gradients(c, &gpu));
}

#[test]
fn peft_gradients_with_tensors_over_a_binding() {
    // Bindings forced to 2 KiB: training's forward and backward (embedding scatter, LM head,
    // matmul blocks, loss rows) all run over windows and still match peft.
    let small = gpu_with_binding_limit(2 << 10);
    CASES
        .iter()
        .for_each(|c| check_forward_and_gradients(c, &small));
}

#[test]
fn merged_weights_and_logits_match_peft() {
    for case in CASES {
        let golden = Golden::load(case);
        let (mut model, _, _) = with_adapter(case, &Device::Cpu);
        model.merge_lora().unwrap();
        assert!(model.lora_adapters().is_empty());
        for (name, linear) in model.linears() {
            let key = format!("merged.{name}.weight");
            if let Some((_, want)) = golden.0.iter().find(|(k, _)| *k == key) {
                let (weight, _) = linear.dense_parts().unwrap();
                assert_close(
                    &weight.to_vec_f32().unwrap(),
                    &want.to_vec_f32().unwrap(),
                    Tolerance::new(1e-6, 1e-6),
                );
            }
        }
        let merged = logits(&model, golden.get("input_ids"), &Device::Cpu);
        assert_close(
            &merged.to_vec_f32().unwrap(),
            &golden.f32s("logits_merged"),
            LOGITS,
        );
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-lora-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn safetensors_keys(path: &Path) -> Vec<(String, Vec<usize>)> {
    let mut keys: Vec<(String, Vec<usize>)> = lathe_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.shape().to_vec()))
        .collect();
    keys.sort();
    keys
}

#[test]
fn saved_adapters_have_peft_keys_and_reload_to_the_same_logits() {
    for case in CASES {
        let golden = Golden::load(case);
        let (model, _, config) = with_adapter(case, &Device::Cpu);
        let dir = scratch(&format!("save-{case}"));
        model.save_lora(&dir, &config).unwrap();
        let peft_dir = case_dir(case).join("adapter");
        assert_eq!(
            safetensors_keys(&dir.join("adapter_model.safetensors")),
            safetensors_keys(&peft_dir.join("adapter_model.safetensors"))
        );
        let saved: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for field in [
            "peft_type",
            "r",
            "target_modules",
            "task_type",
            "bias",
            "use_rslora",
        ] {
            assert_eq!(saved[field], theirs[field], "{case}: {field}");
        }
        assert_eq!(saved["lora_alpha"].as_f64(), theirs["lora_alpha"].as_f64());
        let mut reloaded = base(case, &Device::Cpu);
        reloaded.load_lora(&dir, &AdapterSwitch::new()).unwrap();
        let ids = golden.get("input_ids");
        assert_eq!(
            logits(&reloaded, ids, &Device::Cpu).to_vec_f32().unwrap(),
            logits(&model, ids, &Device::Cpu).to_vec_f32().unwrap()
        );
    }
}

#[test]
fn trainable_parameter_line_is_peft_s() {
    for case in CASES {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case_dir(case).join("meta.json")).unwrap(),
        )
        .unwrap();
        let (model, _, _) = with_adapter(case, &Device::Cpu);
        assert_eq!(
            model.trainable_parameters_line().unwrap(),
            meta["print_trainable_parameters"].as_str().unwrap().trim()
        );
    }
}

/// A fresh adapter (B zero) leaves the model's output unchanged, and only the targeted
/// modules get one.
#[test]
fn fresh_adapters_start_at_the_base_model() {
    let golden = Golden::load("llama");
    let ids = golden.get("input_ids");
    let mut model = base("llama", &Device::Cpu);
    let want = logits(&model, ids, &Device::Cpu).to_vec_f32().unwrap();
    let config = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
    let count = model.add_lora(&config, &AdapterSwitch::new(), 3).unwrap();
    assert_eq!(count, 4, "2 layers x (q_proj, v_proj)");
    assert_eq!(
        logits(&model, ids, &Device::Cpu).to_vec_f32().unwrap(),
        want
    );
    let names: Vec<String> = model
        .lora_adapters()
        .iter()
        .map(|a| a.name().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    // A kaiming-uniform: |A| <= 1/sqrt(in), and not all zero.
    let a = model.lora_adapters()[0].a().to_vec_f32().unwrap();
    let bound = 1.0 / (32f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| *v != 0.0));
}

/// Through an LLM.int8 base the input gradient is dY @ (dequant(W) + scaling B A): the same
/// as through a dense layer holding the dequantized weight.
#[test]
fn gradients_through_an_int8_base_match_the_dequantized_reference() {
    use lathe_models::linear::Linear;
    for device in [Device::Cpu, test_gpu()] {
        let w = Tensor::randn(&[24, 40], 1, &Device::Cpu)
            .unwrap()
            .to_device(&device)
            .unwrap();
        let int8 = Linear::dense(w, None).unwrap().to_int8(6.0).unwrap();
        let (dequantized, _) = int8.dense_parts().unwrap();
        let reference = Linear::dense(dequantized, None).unwrap();
        let config = LoraConfig::new(4, 8.0, &["proj"]);
        let switch = AdapterSwitch::new();
        let lora = |base: &Linear| {
            let mut adapter =
                lathe_lora::LoraAdapter::new("proj", 40, 24, &config, &switch, 5, &device).unwrap();
            let b = Tensor::randn(&[24, 4], 9, &Device::Cpu)
                .unwrap()
                .to_device(&device)
                .unwrap();
            adapter
                .set_weights(adapter.a().clone(), b.into_variable())
                .unwrap();
            Linear::Lora {
                base: Box::new(base.clone()),
                adapter,
                merged: false,
            }
        };
        // Inputs without outliers and a linear loss: the int8 path's only error is the
        // activation rounding of the forward, which the input gradient does not see.
        let x = Tensor::rand_uniform(-1.0, 1.0, &[3, 40], 2, &Device::Cpu)
            .unwrap()
            .to_device(&device)
            .unwrap()
            .into_variable();
        let upstream = Tensor::randn(&[3, 24], 3, &Device::Cpu)
            .unwrap()
            .to_device(&device)
            .unwrap();
        let grad_x = |layer: &Linear| {
            let loss = layer
                .forward(&x)
                .unwrap()
                .mul(&upstream)
                .unwrap()
                .sum_all()
                .unwrap();
            loss.backward()
                .unwrap()
                .get(&x)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        };
        assert_close(
            &grad_x(&lora(&int8)),
            &grad_x(&lora(&reference)),
            Tolerance::new(1e-5, 1e-5),
        );
    }
}

#[test]
fn bad_adapters_are_clear_errors() {
    // An adapter made for another model: its modules do not exist here.
    let mut llama = base("llama", &Device::Cpu);
    let err = llama
        .load_lora(&case_dir("neox").join("adapter"), &AdapterSwitch::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gpt_neox.layers.0.attention.query_key_value")
            && err.contains("another model"),
        "{err}"
    );
    assert!(
        llama.lora_adapters().is_empty(),
        "a failed load changed the model"
    );
    // Shapes that do not fit: a neox adapter of rank 4 whose A is (4, 31).
    let dir = scratch("bad-shape");
    std::fs::create_dir_all(&dir).unwrap();
    let peft_dir = case_dir("neox").join("adapter");
    std::fs::copy(
        peft_dir.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors =
        lathe_core::safetensors::load(&peft_dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    tensors[0].1 = Tensor::zeros(&[4, 31], &Device::Cpu).unwrap();
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    lathe_core::safetensors::save(&dir.join("adapter_model.safetensors"), &named, None).unwrap();
    let err = base("neox", &Device::Cpu)
        .load_lora(&dir, &AdapterSwitch::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("do not fit") && err.contains("[4, 31]"),
        "{err}"
    );
    // A truncated weights file and a config that is not JSON.
    let bytes = std::fs::read(peft_dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = base("neox", &Device::Cpu)
        .load_lora(&dir, &AdapterSwitch::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    std::fs::write(dir.join("adapter_config.json"), "{ not json").unwrap();
    let err = base("neox", &Device::Cpu)
        .load_lora(&dir, &AdapterSwitch::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
    // A target module the model lacks.
    let err = base("neox", &Device::Cpu)
        .add_lora(
            &LoraConfig::new(4, 8.0, &["q_proj"]),
            &AdapterSwitch::new(),
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("match no linear layer") && err.contains("query_key_value"),
        "{err}"
    );
    // Unsupported peft features are refused, not ignored.
    let mut config = LoraConfig::new(4, 8.0, &["query_key_value"]);
    config
        .extra
        .insert("use_dora".into(), serde_json::Value::Bool(true));
    assert!(config.validate().unwrap_err().to_string().contains("DoRA"));
}

/// Gradient checkpointing per block gives the same loss and A/B gradients as keeping the
/// activations, with LoRA dropout on (the recomputation replays the masks), on both
/// devices and both architectures.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    for device in [Device::Cpu, test_gpu()] {
        for case in CASES {
            let golden = Golden::load(case);
            let ids = golden.get("input_ids");
            // peft's adapter (non-zero B) with dropout 0.3.
            let dir = scratch(&format!("dropout-{case}-{}", device.name().len()));
            std::fs::create_dir_all(&dir).unwrap();
            let peft_dir = case_dir(case).join("adapter");
            std::fs::copy(
                peft_dir.join("adapter_model.safetensors"),
                dir.join("adapter_model.safetensors"),
            )
            .unwrap();
            let mut config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap(),
            )
            .unwrap();
            config["lora_dropout"] = serde_json::json!(0.3);
            std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
            let run = |checkpointing: bool| {
                let mut model = base(case, &device);
                let switch = AdapterSwitch::new();
                model.load_lora(&dir, &switch).unwrap();
                model.set_gradient_checkpointing(checkpointing);
                switch.train(1234);
                let loss = causal_loss(&logits(&model, ids, &device), ids);
                let grads = loss.backward().unwrap();
                let mut out = vec![loss.to_vec_f32().unwrap()[0]];
                for p in model.lora_parameters() {
                    out.extend(grads.get(&p).unwrap().to_vec_f32().unwrap());
                }
                out
            };
            assert_close(&run(true), &run(false), Tolerance::new(1e-6, 1e-5));
        }
    }
}

/// Merging folds scaling * B A into the base weight (peft's merged weights) and the forward
/// then skips the adapter; unmerging restores the base weight to f32 rounding.
#[test]
fn merge_and_unmerge_round_trip() {
    let golden = Golden::load("llama");
    let ids = golden.get("input_ids");
    let (mut model, _, _) = with_adapter("llama", &Device::Cpu);
    let before: Vec<(String, Vec<f32>)> = model
        .linears()
        .iter()
        .map(|(n, l)| (n.clone(), l.dense_parts().unwrap().0.to_vec_f32().unwrap()))
        .collect();
    let unmerged_logits = logits(&model, ids, &Device::Cpu).to_vec_f32().unwrap();
    for (_, linear) in model.linears_mut() {
        linear.merge_adapter().unwrap();
    }
    assert_close(
        &logits(&model, ids, &Device::Cpu).to_vec_f32().unwrap(),
        &unmerged_logits,
        LOGITS,
    );
    for (name, linear) in model.linears() {
        let key = format!("merged.{name}.weight");
        if let Some((_, want)) = golden.0.iter().find(|(k, _)| *k == key) {
            let (w, _) = linear.dense_parts().unwrap();
            assert_close(
                &w.to_vec_f32().unwrap(),
                &want.to_vec_f32().unwrap(),
                Tolerance::new(1e-6, 1e-6),
            );
        }
    }
    for (_, linear) in model.linears_mut() {
        linear.unmerge_adapter().unwrap();
    }
    for ((name, want), (_, linear)) in before.iter().zip(model.linears()) {
        let got = linear.dense_parts().unwrap().0.to_vec_f32().unwrap();
        assert_close(&got, want, Tolerance::new(1e-6, 1e-6));
        let targeted = name.ends_with("q_proj") || name.ends_with("v_proj");
        assert_eq!(linear.adapter().is_some(), targeted, "{name}");
    }
    assert_close(
        &logits(&model, ids, &Device::Cpu).to_vec_f32().unwrap(),
        &unmerged_logits,
        LOGITS,
    );
}
