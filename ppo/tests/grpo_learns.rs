//! GRPO end to end on the tiny random Llama GGUF fixture: prompts cut from texts, G sampled
//! completions each, a text reward a policy can learn (the share of ASCII letters), the
//! length reward beside it, the KL term and two iterations per generation batch. The mean
//! reward rises, the run is deterministic under a seed, the reference (adapters off) stays
//! the base model, and settings GRPO cannot run are refused before anything is built.

use std::path::PathBuf;

use lathe_core::{Device, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::hf::CausalLm;
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_ppo::grpo::{GrpoConfig, GrpoLoss, GrpoTrainer};
use lathe_ppo::rollout::LengthRange;
use lathe_ppo::{Prompts, Result};

fn fixture(precision: Precision) -> Pretrained {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/gguf_model_tied.gguf");
    Pretrained::load(&path, &Device::Cpu, precision).unwrap()
}

fn letters(texts: &[String]) -> Result<Vec<f32>> {
    Ok(texts
        .iter()
        .map(|t| {
            let n = t.chars().count().max(1) as f32;
            5.0 * t.chars().filter(char::is_ascii_alphabetic).count() as f32 / n
        })
        .collect())
}

/// Logits of fixed ids.
fn logits(model: &CausalLm) -> Vec<f32> {
    let ids = Tensor::from_vec(vec![5u32, 17, 42, 99], &[1, 4], &Device::Cpu).unwrap();
    let layout = TokenLayout::contiguous(1, 4, 0, &Device::Cpu).unwrap();
    model
        .forward(&ids, &layout, None)
        .unwrap()
        .to_vec_f32()
        .unwrap()
}

fn config() -> GrpoConfig {
    GrpoConfig {
        num_generations: 4,
        max_completion_length: 6,
        beta: 0.04,
        loss_type: GrpoLoss::Dapo,
        num_iterations: 2,
        reward_funcs: vec!["model".into(), "length".into()],
        reward_weights: Some(vec![1.0, 0.1]),
        learning_rate: 2e-2,
        per_device_train_batch_size: 8,
        gradient_accumulation_steps: 2,
        max_steps: 24,
        lora_r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: ["q_proj", "v_proj", "o_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        prompt_length: LengthRange { min: 1, max: 3 },
        seed: 7,
        ..GrpoConfig::default()
    }
}

/// The mean reward of each generation batch, and the final adapters' logits check.
fn run(config: &GrpoConfig) -> Vec<f64> {
    run_on(config, Precision::F32)
}

fn run_on(config: &GrpoConfig, precision: Precision) -> Vec<f64> {
    let pretrained = fixture(precision);
    let texts: Vec<String> = [
        "the film was great",
        "a slow plot",
        "actors did well",
        "bad",
    ]
    .map(String::from)
    .to_vec();
    let prompts = Prompts::cut_from_texts(&pretrained.tokenizer, &texts).unwrap();
    let base = logits(&pretrained.model);
    let vocab = pretrained.model.config().vocab_size() as f64;
    let mut trainer = GrpoTrainer::new(
        pretrained.model,
        None,
        config,
        &pretrained.tokenizer,
        &Device::Cpu,
    )
    .unwrap();
    let mut rewards = Vec::new();
    let mut reward = letters;
    let mut tokens_seen = 0.0;
    while !trainer.done() {
        let stats = trainer
            .step(&prompts, &pretrained.tokenizer, &mut reward)
            .unwrap();
        for key in [
            "loss",
            "grad_norm",
            "kl",
            "reward",
            "clip_ratio/region_mean",
            "completions/mean_terminated_length",
        ] {
            assert!(stats.get(key).is_finite(), "{key} at step {}", stats.step);
        }
        // The policy's mean token entropy lies in (0, ln V].
        let entropy = stats.get("entropy");
        assert!(
            entropy > 0.0 && entropy <= vocab.ln() + 1e-9,
            "entropy {entropy}"
        );
        // num_tokens counts every generation batch's prompt and completion tokens.
        let num_tokens = stats.get("num_tokens");
        if stats.samples.is_empty() {
            assert_eq!(num_tokens, tokens_seen);
        } else {
            assert!(num_tokens > tokens_seen, "{num_tokens} after {tokens_seen}");
        }
        tokens_seen = num_tokens;
        if !stats.samples.is_empty() {
            rewards.push(stats.get("rewards/model/mean"));
        }
    }
    let _off = trainer.switch.disable();
    assert_eq!(logits(&trainer.model), base);
    rewards
}

#[test]
fn the_reward_rises_and_the_run_repeats_under_its_seed() {
    let rewards = run(&config());
    assert_eq!(
        rewards.len(),
        12,
        "24 steps of 2 iterations per generation batch"
    );
    let head: f64 = rewards[..3].iter().sum::<f64>() / 3.0;
    let tail: f64 = rewards[9..].iter().sum::<f64>() / 3.0;
    assert!(tail > head + 0.3, "rewards {rewards:?}");
    assert_eq!(run(&config()), rewards);
}

/// The frozen base in LLM.int8 or f16: LoRA trains through it (over a longer run than the
/// test above, the mean reward of the last six generation batches beats the first six's, as
/// on f32) and the adapter-off reference stays the base, to the bit (checked in `run_on`).
#[test]
fn an_int8_or_f16_base_learns_too() {
    let config = GrpoConfig {
        max_steps: 72,
        ..config()
    };
    for precision in [
        Precision::F32,
        Precision::F16,
        Precision::Int8 { threshold: 6.0 },
    ] {
        let rewards = run_on(&config, precision);
        let n = rewards.len();
        let head: f64 = rewards[..6].iter().sum::<f64>() / 6.0;
        let tail: f64 = rewards[n - 6..].iter().sum::<f64>() / 6.0;
        // Measured (rows packed): f32 +0.55, f16 +0.49, int8 +0.29.
        assert!(tail > head + 0.2, "{precision:?}: rewards {rewards:?}");
    }
}

#[test]
fn settings_grpo_cannot_run_are_refused() {
    for (config, want) in [
        (
            GrpoConfig {
                num_generations: 1,
                ..config()
            },
            "num_generations",
        ),
        (
            GrpoConfig {
                per_device_train_batch_size: 3,
                gradient_accumulation_steps: 1,
                ..config()
            },
            "multiple of num_generations",
        ),
        (
            GrpoConfig {
                reward_funcs: vec!["no_such".into()],
                reward_weights: None,
                ..config()
            },
            "does not exist",
        ),
        (
            GrpoConfig {
                reward_weights: Some(vec![1.0]),
                ..config()
            },
            "reward_weights",
        ),
        (
            GrpoConfig {
                max_steps: 5,
                ..config()
            },
            "multiples of num_iterations",
        ),
        (
            GrpoConfig {
                epsilon: 1.5,
                ..config()
            },
            "epsilon",
        ),
        (
            GrpoConfig {
                beta: -0.1,
                ..config()
            },
            "beta",
        ),
    ] {
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn a_run_resumed_from_its_checkpoint_equals_the_uninterrupted_one() {
    use lathe_ppo::grpo::GrpoRun;
    use lathe_train::resume::ResumeOptions;
    let root = std::env::temp_dir().join(format!("lathe-grpo-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let config = GrpoConfig {
        max_steps: 8,
        save_steps: 4,
        lora_dropout: 0.1,
        ..config()
    };
    let texts: Vec<String> = ["the film was great", "a slow plot", "actors did well"]
        .map(String::from)
        .to_vec();
    let run_to = |out: &std::path::Path, stop_after: Option<usize>| {
        let pretrained = fixture(Precision::F32);
        let prompts = Prompts::cut_from_texts(&pretrained.tokenizer, &texts).unwrap();
        let mut run = GrpoRun::open(
            pretrained.model,
            &pretrained.tokenizer,
            prompts,
            &config,
            out,
            &Device::Cpu,
            &ResumeOptions::default(),
        )
        .unwrap();
        let mut reward = letters;
        while !run.done() {
            let stats = run.step(&mut reward).unwrap();
            if run.checkpoint_due() {
                run.save_checkpoint().unwrap();
            }
            if stop_after == Some(stats.step) {
                return;
            }
        }
        run.finish().unwrap();
    };
    let (whole, split) = (root.join("whole"), root.join("split"));
    run_to(&whole, None);
    run_to(&split, Some(4));
    assert!(!split.join("run.json").exists());
    run_to(&split, None);
    let read = |dir: &std::path::Path, name: &str| std::fs::read(dir.join(name)).unwrap();
    assert_eq!(
        read(&whole, "adapter_model.safetensors"),
        read(&split, "adapter_model.safetensors")
    );
    let without_time = |dir: &std::path::Path| -> Vec<serde_json::Value> {
        String::from_utf8(read(dir, "metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("time/step_s");
                v
            })
            .collect()
    };
    assert_eq!(without_time(&whole), without_time(&split));
    assert_eq!(without_time(&whole).len(), 8);
    assert_eq!(read(&whole, "samples.jsonl"), read(&split, "samples.jsonl"));
    let _ = std::fs::remove_dir_all(&root);
}
