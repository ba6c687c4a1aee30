//! Reward-model training on the tiny random BERT / DistilBERT fixtures with a synthetic
//! sentiment task (positive and negative words in templates): the head learns, LoRA
//! learns, early stopping, and the saved directory loads back with the same scores on CPU
//! and GPU.

use std::path::PathBuf;

use lathe_core::testing::{assert_close, test_gpu, Tolerance};
use lathe_core::Device;
use lathe_reward::data::SplitMix64;
use lathe_reward::train::{evaluate, train};
use lathe_reward::{Example, LoraSettings, Pooling, RewardModel, TrainConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("lathe-reward-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Sentences of the tiny vocabulary: a template with one sentiment word.
fn synthetic(n: usize, seed: u64) -> Vec<Example> {
    let pos = [
        "good",
        "great",
        "excellent",
        "wonderful",
        "loved",
        "best",
        "fun",
        "nice",
        "beautiful",
    ];
    let neg = [
        "bad", "terrible", "awful", "boring", "hated", "worst", "poor", "slow", "ugly",
    ];
    let templates = [
        "the movie was {}",
        "{} food and the service",
        "i thought this film was really {}",
        "the acting was {} and the plot too",
        "{}",
        "we ate at this place , it was {} !",
    ];
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            let label = (rng.next_u64() % 2) as u32;
            let words = if label == 1 { &pos } else { &neg };
            let word = words[(rng.next_u64() % words.len() as u64) as usize];
            let template = templates[(rng.next_u64() % templates.len() as u64) as usize];
            Example {
                text: template.replace("{}", word),
                label,
            }
        })
        .collect()
}

#[test]
fn head_training_learns_and_round_trips() {
    let data = synthetic(240, 1);
    let test = synthetic(100, 2);
    let config = TrainConfig {
        epochs: 300,
        lr: 0.1,
        weight_decay: 0.0,
        patience: 20,
        ..TrainConfig::default()
    };
    let mut seen = 0;
    let (model, report) = train(
        fixture("tiny_bert"),
        &data,
        &config,
        &Device::Cpu,
        &mut |_| seen += 1,
    )
    .unwrap();
    assert_eq!(seen, report.epochs.len());
    assert_eq!(report.train_examples + report.val_examples, 240);
    assert_eq!(report.val_examples, 24);
    let first = &report.epochs[0];
    let best = &report.epochs[report.best_head_epoch - 1];
    assert!(best.val_loss < first.val_loss, "{report:?}");
    let eval = evaluate(&model, &test).unwrap();
    eprintln!(
        "tiny BERT head-only: test accuracy {:.3}, {} epochs, best {}",
        eval.accuracy,
        report.epochs.len(),
        report.best_head_epoch
    );
    assert!(eval.accuracy >= 0.7, "accuracy {}", eval.accuracy);

    // Save, load back (CPU and GPU): same scores.
    let dir = scratch("head");
    model.save(&dir).unwrap();
    let texts: Vec<&str> = test.iter().map(|e| e.text.as_str()).take(20).collect();
    let want = model.score_texts(&texts).unwrap();
    let cpu = RewardModel::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(cpu.reward_label(), "POSITIVE");
    assert_eq!(cpu.pooling(), Pooling::Mean);
    assert_close(
        &cpu.score_texts(&texts).unwrap(),
        &want,
        Tolerance::new(1e-5, 1e-5),
    );
    let gpu = RewardModel::load(&dir, &test_gpu()).unwrap();
    assert_close(
        &gpu.score_texts(&texts).unwrap(),
        &want,
        Tolerance::new(1e-4, 1e-4),
    );
    // Positive texts score higher than negative ones on average.
    let scores = cpu
        .score_texts(&test.iter().map(|e| e.text.as_str()).collect::<Vec<_>>())
        .unwrap();
    let mean = |label| {
        let v: Vec<f32> = scores
            .iter()
            .zip(&test)
            .filter(|(_, e)| e.label == label)
            .map(|(s, _)| *s)
            .collect();
        v.iter().sum::<f32>() / v.len() as f32
    };
    assert!(mean(1) > mean(0));
}

fn lora_run(device: &Device, encoder: &str) -> (f32, f32, TrainConfig) {
    let data = synthetic(320, 3);
    let test = synthetic(80, 4);
    let config = TrainConfig {
        epochs: 5,
        lr: 1e-2,
        patience: 0,
        pooling: Pooling::First,
        lora: Some(LoraSettings {
            r: 4,
            alpha: 8.0,
            lr: 3e-3,
            epochs: 10,
            batch_size: 16,
            ..LoraSettings::default()
        }),
        ..TrainConfig::default()
    };
    let (model, report) = train(fixture(encoder), &data, &config, device, &mut |_| {}).unwrap();
    assert_eq!(report.lora_layers, 4, "query and value of 2 layers");
    let lora_epochs: Vec<_> = report.epochs.iter().filter(|e| e.stage == "lora").collect();
    assert!(!lora_epochs.is_empty());
    let head_best = report.epochs[report.best_head_epoch - 1].val_loss;
    let eval = evaluate(&model, &test).unwrap();
    eprintln!(
        "tiny {encoder} on {}: head-stage val loss {head_best:.4}, LoRA epochs {:?}, test accuracy {:.3}",
        device.name(),
        lora_epochs.iter().map(|e| (e.train_loss, e.val_loss, e.val_accuracy)).collect::<Vec<_>>(),
        eval.accuracy
    );
    // LoRA improves the held-out loss over the head stage (5 short epochs).
    let best_lora = lora_epochs
        .iter()
        .map(|e| e.val_loss)
        .fold(f32::INFINITY, f32::min);
    assert!(
        best_lora < head_best,
        "LoRA did not improve: {head_best} -> {best_lora}"
    );
    // The saved directory (LoRA merged) scores as the trained model.
    let dir = scratch(&format!("lora-{encoder}-{}", device.is_gpu()));
    model.save(&dir).unwrap();
    let texts: Vec<&str> = test.iter().map(|e| e.text.as_str()).take(16).collect();
    let want = model.score_texts(&texts).unwrap();
    let loaded = RewardModel::load(&dir, device).unwrap();
    assert_close(
        &loaded.score_texts(&texts).unwrap(),
        &want,
        Tolerance::new(1e-4, 1e-4),
    );
    (eval.accuracy, best_lora, config)
}

#[test]
fn lora_training_improves_on_the_head_cpu() {
    lora_run(&Device::Cpu, "tiny_bert");
}

#[test]
fn lora_training_on_distilbert_cpu() {
    let data = synthetic(20, 5);
    let config = TrainConfig {
        epochs: 2,
        lora: Some(LoraSettings {
            epochs: 1,
            ..LoraSettings::default()
        }),
        ..TrainConfig::default()
    };
    let (model, report) = train(
        fixture("tiny_distilbert"),
        &data,
        &config,
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.lora_layers, 4, "q_lin and v_lin of 2 layers");
    // The trained model replaces DistilBERT's own head by lathe's linear head.
    let dir = scratch("distil");
    model.save(&dir).unwrap();
    let loaded = RewardModel::load(&dir, &Device::Cpu).unwrap();
    assert!(matches!(
        loaded.head(),
        Some(lathe_reward::head::Head::Linear { .. })
    ));
}

#[test]
fn lora_training_gpu() {
    lora_run(&test_gpu(), "tiny_bert");
}
