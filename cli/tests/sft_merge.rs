//! LoRA SFT and merge on the tiny random Llama GGUF fixture: the loss falls (f32 and int8
//! bases), CPU and GPU train alike, an interrupted run resumes exactly, the merged model
//! equals model + adapter, and bad input is a clear error.

use std::path::{Path, PathBuf};

use lathe_cli::commands::sft::{eval_loss, pack, train, train_until, Blocks, SftConfig};
use lathe_core::testing::{assert_close, test_gpu, Tolerance};
use lathe_core::{Device, Tensor};
use lathe_lora::AdapterSwitch;
use lathe_models::attention::TokenLayout;
use lathe_models::pretrained::{Precision, Pretrained};

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/gguf_model_tied.gguf")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-sft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A small repetitive corpus a 2-layer model can learn something of.
fn texts() -> Vec<String> {
    let words = [
        "the", "film", "was", "great", "and", "the", "cast", "was", "fine",
    ];
    (0..120)
        .map(|i| {
            (0..10)
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn config(max_steps: usize) -> SftConfig {
    SftConfig {
        block_size: 24,
        batch_size: 4,
        grad_accum: 2,
        max_steps: Some(max_steps),
        lr: 3e-3,
        warmup_steps: 2,
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        eval_fraction: 0.1,
        seed: 5,
        ..SftConfig::default()
    }
}

fn load(device: &Device, precision: Precision) -> Pretrained {
    Pretrained::load(&fixture_model(), device, precision).unwrap()
}

fn blocks(pretrained: &Pretrained, config: &SftConfig) -> Blocks {
    pack(
        &texts(),
        &pretrained.tokenizer,
        config.block_size,
        config.eval_fraction,
    )
    .unwrap()
}

#[test]
fn training_lowers_the_loss_on_f32_and_int8_bases() {
    for precision in [Precision::F32, Precision::Int8 { threshold: 6.0 }] {
        let mut pretrained = load(&Device::Cpu, precision);
        // Every linear adapted and a high rate: a tiny random model learns visibly in 40 steps.
        let config = SftConfig {
            lr: 1e-2,
            lora_r: 8,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            ..config(40)
        };
        let data = blocks(&pretrained, &config);
        let before = eval_loss(
            &pretrained.model,
            &AdapterSwitch::new(),
            &data.eval,
            4,
            &Device::Cpu,
        )
        .unwrap()
        .unwrap();
        let out = scratch(&format!("learn-{precision:?}").replace([' ', '{', '}', ':', '.'], ""));
        let summary = train(&mut pretrained.model, &data, &config, &out, &Device::Cpu).unwrap();
        let (_, after) = *summary.eval_losses.last().unwrap();
        let head: f32 = summary.losses[..5].iter().sum::<f32>() / 5.0;
        let tail: f32 = summary.losses[35..].iter().sum::<f32>() / 5.0;
        eprintln!(
            "{precision:?}: eval loss {before:.3} -> {after:.3}, train {head:.3} -> {tail:.3}"
        );
        assert!(
            tail < 0.8 * head,
            "{precision:?}: train loss {head} -> {tail}"
        );
        assert!(
            after < 0.8 * before,
            "{precision:?}: eval loss {before} -> {after}"
        );
        for file in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "metrics.jsonl",
            "run.json",
        ] {
            assert!(out.join(file).is_file(), "{file} missing");
        }
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 40);
    }
}

#[test]
fn cpu_and_gpu_train_alike() {
    let config = config(6);
    let run = |device: &Device| {
        let mut pretrained = load(device, Precision::F32);
        let data = blocks(&pretrained, &config);
        let out = scratch(&format!("device-{}", device.is_gpu()));
        train(&mut pretrained.model, &data, &config, &out, device)
            .unwrap()
            .losses
    };
    let cpu = run(&Device::Cpu);
    let gpu = run(&test_gpu());
    assert_close(&gpu, &cpu, Tolerance::new(1e-4, 1e-4));
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = lathe_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_vec_f32().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn losses_of(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn an_interrupted_run_resumes_exactly() {
    let mut config = config(8);
    config.save_every = 3;
    let straight_dir = scratch("straight");
    let mut pretrained = load(&Device::Cpu, Precision::F32);
    let data = blocks(&pretrained, &config);
    train(
        &mut pretrained.model,
        &data,
        &config,
        &straight_dir,
        &Device::Cpu,
    )
    .unwrap();

    // Interrupted after step 4: the last checkpoint is step 3, step 4's metrics line is
    // written but will be redone.
    let resumed_dir = scratch("resumed");
    let mut first = load(&Device::Cpu, Precision::F32);
    train_until(
        &mut first.model,
        &data,
        &config,
        &resumed_dir,
        &Device::Cpu,
        Some(4),
    )
    .unwrap();
    let mut second = load(&Device::Cpu, Precision::F32);
    let summary = train(
        &mut second.model,
        &data,
        &config,
        &resumed_dir,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(summary.resumed_from, Some(3));
    assert_eq!(
        tensors(&resumed_dir.join("adapter_model.safetensors")),
        tensors(&straight_dir.join("adapter_model.safetensors"))
    );
    assert_eq!(
        losses_of(&resumed_dir.join("metrics.jsonl")),
        losses_of(&straight_dir.join("metrics.jsonl"))
    );
    // A different config does not resume silently.
    let mut other = config.clone();
    other.lr = 1e-3;
    let mut third = load(&Device::Cpu, Precision::F32);
    let err = train(&mut third.model, &data, &other, &resumed_dir, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("another config"), "{err}");
}

fn logits(pretrained: &Pretrained, ids: &[u32]) -> Vec<f32> {
    let t = ids.len();
    let x = Tensor::from_vec(ids.to_vec(), &[1, t], &Device::Cpu).unwrap();
    let layout = TokenLayout::contiguous(1, t, 0, &Device::Cpu).unwrap();
    pretrained
        .model
        .forward(&x, &layout, None)
        .unwrap()
        .to_vec_f32()
        .unwrap()
}

#[test]
fn merged_model_equals_model_plus_adapter() {
    let config = config(10);
    let out = scratch("for-merge");
    let mut trained = load(&Device::Cpu, Precision::F32);
    let data = blocks(&trained, &config);
    train(&mut trained.model, &data, &config, &out, &Device::Cpu).unwrap();
    let merged_dir = scratch("merged");
    lathe_cli::commands::merge::merge(&fixture_model(), &out, &merged_dir).unwrap();
    let merged = Pretrained::load(&merged_dir, &Device::Cpu, Precision::F32).unwrap();
    let ids = &data.eval[0];
    assert_eq!(
        merged.tokenizer.encode("the film", true).unwrap(),
        trained.tokenizer.encode("the film", true).unwrap()
    );
    assert_close(
        &logits(&merged, ids),
        &logits(&trained, ids),
        Tolerance::new(1e-5, 1e-5),
    );
    // Disabling the trained adapters gives the base model exactly.
    let base = load(&Device::Cpu, Precision::F32);
    let switch = AdapterSwitch::new();
    let mut with_adapter = load(&Device::Cpu, Precision::F32);
    with_adapter.model.load_lora(&out, &switch).unwrap();
    let _off = switch.disable();
    assert_eq!(logits(&with_adapter, ids), logits(&base, ids));
    // Merging into a non-empty folder is refused.
    let err = lathe_cli::commands::merge::merge(&fixture_model(), &out, &merged_dir).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}

#[test]
fn bad_data_is_a_clear_error() {
    let pretrained = load(&Device::Cpu, Precision::F32);
    let err = pack(&["tiny".to_string()], &pretrained.tokenizer, 64, 0.1).unwrap_err();
    assert!(err.to_string().contains("fewer than one block"), "{err}");
    let dir = scratch("bad-data");
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let err = lathe_cli::texts::read_texts(&empty, "text").unwrap_err();
    assert!(err.to_string().contains("no texts"), "{err}");
    let mut bad = config(5);
    bad.schedule = "sawtooth".into();
    let mut model = load(&Device::Cpu, Precision::F32);
    let data = blocks(&model, &config(5));
    let err = train(
        &mut model.model,
        &data,
        &bad,
        &dir.join("out"),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("sawtooth"), "{err}");
}

/// `lathe sft --config FILE`: the file's settings, with flags given on the command line on
/// top; unknown keys are refused.
#[test]
fn sft_config_file_with_flag_overrides() {
    let dir = scratch("config");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("texts.txt");
    std::fs::write(&data, texts().join("\n")).unwrap();
    let config = dir.join("sft.toml");
    std::fs::write(
        &config,
        "block_size = 16\nbatch_size = 2\nmax_steps = 2\nlr = 0.001\nlora_r = 2\nseed = 9\n",
    )
    .unwrap();
    let out = dir.join("out");
    let run = |extra: &[&str], out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args(["sft", "--device", "cpu", "--model"])
            .arg(fixture_model())
            .arg("--data")
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let output = run(&["--lr", "0.002"], &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let c = &recorded["config"];
    assert_eq!(c["block_size"], 16);
    assert_eq!(c["lora_r"], 2);
    assert_eq!(c["seed"], 9);
    assert_eq!(c["max_steps"], 2);
    assert!(
        (c["lr"].as_f64().unwrap() - 0.002).abs() < 1e-9,
        "the flag wins: {c}"
    );
    std::fs::write(&config, "block_sise = 16\n").unwrap();
    let bad = run(&[], &dir.join("bad"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("block_sise"));
}
