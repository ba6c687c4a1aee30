//! The seed's whole job on tiny models through the library crates alone (no `lathe-cli`):
//! a reward model (lathe-reward), LoRA SFT (lathe-train), the merge (lathe-models +
//! lathe-lora), and PPO towards the reward (lathe-ppo), each output read back by the next
//! stage as a user's program would. Checked across crates: the merged model computes what
//! the base model with the SFT adapter on computes; PPO's reference (the same model with
//! its adapters off) is exactly the merged SFT model; the saved reward model scores as the
//! trained one.

use std::path::{Path, PathBuf};

use lathe_core::{Device, Tensor};
use lathe_lora::AdapterSwitch;
use lathe_models::attention::TokenLayout;
use lathe_models::hf::{save_hf_dir, CausalLm};
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_ppo::rollout::LengthRange;
use lathe_ppo::{PpoFile, PpoRun};
use lathe_reward::data::Example;
use lathe_reward::{RewardModel, TrainConfig};
use lathe_train::resume::ResumeOptions;
use lathe_train::sft::{pack, SftConfig, SftRun};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

const GOOD: [&str; 4] = [
    "a great film",
    "wonderful acting",
    "I loved it",
    "superb and moving",
];
const BAD: [&str; 4] = [
    "a dull film",
    "terrible acting",
    "I hated it",
    "boring and slow",
];

fn labelled() -> Vec<Example> {
    (0..12)
        .flat_map(|i| {
            [
                Example {
                    text: GOOD[i % 4].into(),
                    label: 1,
                },
                Example {
                    text: BAD[i % 4].into(),
                    label: 0,
                },
            ]
        })
        .collect()
}

fn texts() -> Vec<String> {
    GOOD.iter()
        .chain(&BAD)
        .cycle()
        .take(40)
        .map(|t| format!("{t}, said the review of the film"))
        .collect()
}

/// Logits (1, T, V) of fixed ids.
fn logits(model: &CausalLm) -> Vec<f32> {
    let ids = [5u32, 17, 42, 99, 3, 64];
    let t = ids.len();
    let ids = Tensor::from_vec(ids.to_vec(), &[1, t], &Device::Cpu).unwrap();
    let layout = TokenLayout::contiguous(1, t, 0, &Device::Cpu).unwrap();
    let out = model.forward(&ids, &layout, None).unwrap();
    out.to_vec_f32().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn reward_sft_merge_and_ppo_run_on_the_libraries_alone() {
    let device = Device::Cpu;
    let root = std::env::temp_dir().join(format!("lathe-rlhf-libs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();

    // 1. The reward model: a head on a tiny BERT, saved and read back.
    let encoder = repo("reward/tests/fixtures/tiny_bert");
    let config = TrainConfig {
        epochs: 30,
        ..TrainConfig::default()
    };
    let mut epochs = Vec::new();
    let (reward, _report) =
        lathe_reward::train::train(&encoder, &labelled(), &config, &device, &mut |s| {
            epochs.push(s.train_loss)
        })
        .unwrap();
    assert!(
        epochs.last().unwrap() < epochs.first().unwrap(),
        "the head's loss {epochs:?}"
    );
    let reward_dir = root.join("reward");
    reward.save(&reward_dir).unwrap();
    let reward = RewardModel::load(&reward_dir, &device).unwrap();
    let probe: Vec<&str> = GOOD.iter().chain(&BAD).copied().collect();
    let trained_scores = reward.score_texts(&probe).unwrap();

    // 2. SFT: a LoRA on the tiny Llama, in a run folder.
    let base = repo("models/tests/fixtures/gguf_model_tied.gguf");
    let mut pretrained = Pretrained::load(&base, &device, Precision::F32).unwrap();
    let sft = SftConfig {
        block_size: 16,
        batch_size: 4,
        max_steps: Some(4),
        lr: 1e-2,
        lora_r: 4,
        lora_alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        eval_fraction: 0.0,
        ..SftConfig::default()
    };
    let blocks = pack(&texts(), &pretrained.tokenizer, sft.block_size, 0.0).unwrap();
    let sft_dir = root.join("sft");
    let mut run = SftRun::open(
        &mut pretrained.model,
        &blocks,
        &sft,
        &sft_dir,
        &device,
        &ResumeOptions::default(),
    )
    .unwrap();
    while !run.done() {
        let record = run.step().unwrap();
        if run.checkpoint_due() {
            run.save_checkpoint().unwrap();
        }
        assert!(record.stats.loss.is_finite());
    }
    let summary = run.finish().unwrap();
    assert_eq!(summary.losses.len(), 4);

    // 3. The merge: the base with the adapter on, then merged and saved as a HF folder.
    let mut base_model = Pretrained::load(&base, &device, Precision::F32).unwrap();
    base_model
        .model
        .load_lora(&sft_dir, &AdapterSwitch::new())
        .unwrap();
    let with_adapter = logits(&base_model.model);
    base_model.model.merge_lora().unwrap();
    let merged = logits(&base_model.model);
    assert!(
        max_diff(&with_adapter, &merged) < 1e-4,
        "merge changed the function"
    );
    let merged_dir = root.join("merged");
    std::fs::create_dir_all(&merged_dir).unwrap();
    let tensors = base_model.model.named_weights().unwrap();
    save_hf_dir(&merged_dir, &base_model.model.config(), &tensors).unwrap();
    base_model
        .tokenizer
        .inner()
        .save(merged_dir.join("tokenizer.json"), false)
        .unwrap();

    // 4. PPO on the merged model towards the reward model.
    let policy = Pretrained::load(&merged_dir, &device, Precision::F32).unwrap();
    assert!(
        max_diff(&logits(&policy.model), &merged) < 1e-5,
        "the saved merge reloads"
    );
    let mut file = PpoFile::default();
    file.ppo.batch_size = 4;
    file.ppo.mini_batch_size = 2;
    file.ppo.ppo_epochs = 1;
    file.ppo.learning_rate = 1e-2;
    file.run.steps = 2;
    file.run.lora_r = 4;
    file.run.query_length = LengthRange { min: 2, max: 3 };
    file.run.response_length = LengthRange { min: 2, max: 3 };
    let ppo_dir = root.join("ppo");
    let mut scored = 0;
    let mut score = |texts: &[String]| -> lathe_ppo::Result<Vec<f32>> {
        scored += texts.len();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        reward
            .score_texts(&refs)
            .map_err(|e| lathe_ppo::Error::Reward(e.to_string()))
    };
    let prompts = lathe_ppo::Prompts::cut_from_texts(&policy.tokenizer, &texts()).unwrap();
    let mut run = PpoRun::open(
        policy.model,
        &policy.tokenizer,
        prompts,
        &file,
        &ppo_dir,
        &device,
        &ResumeOptions::default(),
    )
    .unwrap();
    while !run.done() {
        let record = run.step(&mut score).unwrap();
        for key in ["env/reward_mean", "objective/kl", "ppo/loss/total"] {
            assert!(
                record.stats[key].is_finite(),
                "{key} at step {}",
                record.step
            );
        }
        if run.checkpoint_due() {
            run.save_checkpoint().unwrap();
        }
    }
    // The reference is the policy with its adapters off: exactly the merged SFT model.
    {
        let trainer = run.trainer();
        assert!(
            max_diff(&logits(&trainer.model), &merged) > 1e-4,
            "PPO moved the policy"
        );
        let _off = trainer.switch.disable();
        assert!(max_diff(&logits(&trainer.model), &merged) < 1e-5);
    }
    let summary = run.finish().unwrap();
    assert_eq!(summary.mean_rewards.len(), 2);
    assert_eq!(scored, 8, "two steps of four texts scored");
    let metrics = std::fs::read_to_string(ppo_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "value_head.safetensors",
        "run.json",
    ] {
        assert!(ppo_dir.join(name).is_file(), "{name}");
    }
    // The reward model the run used is the one saved in step 1.
    assert_eq!(reward.score_texts(&probe).unwrap(), trained_scores);
    let _ = std::fs::remove_dir_all(&root);
}
