//! Bad input: clear errors, no panics (and the documented handling of long and empty
//! texts).

use std::path::{Path, PathBuf};

use lathe_core::Device;
use lathe_reward::{data, LoadOptions, RewardModel};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// A fresh scratch directory under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-reward-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn err_of<T: std::fmt::Debug>(r: lathe_reward::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = scratch("no-tok");
    copy_dir(&fixture("tiny_distilbert"), &dir);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = err_of(RewardModel::load(&dir, &Device::Cpu));
    assert!(e.contains("no tokenizer.json"), "{e}");
}

#[test]
fn tokenizer_larger_than_the_embedding_is_a_mismatch() {
    // The MiniLM-sized config claims fewer rows than the tokenizer has ids.
    let dir = scratch("mismatch");
    copy_dir(&fixture("tiny_distilbert"), &dir);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = serde_json::json!(100);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let e = err_of(RewardModel::load(&dir, &Device::Cpu));
    assert!(e.contains("do not belong together"), "{e}");
}

#[test]
fn misshapen_weights_name_the_tensor() {
    // A config whose hidden size disagrees with the weights.
    let dir = scratch("shape");
    copy_dir(&fixture("tiny_distilbert"), &dir);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["dim"] = serde_json::json!(48);
    config["n_heads"] = serde_json::json!(4);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let e = err_of(RewardModel::load(&dir, &Device::Cpu));
    assert!(
        e.contains("word_embeddings.weight") && e.contains("shape"),
        "{e}"
    );
}

#[test]
fn unsupported_model_type() {
    let dir = scratch("gpt");
    copy_dir(&fixture("tiny_distilbert"), &dir);
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt_neox"}"#).unwrap();
    let e = err_of(RewardModel::load(&dir, &Device::Cpu));
    assert!(e.contains("gpt_neox") && e.contains("not supported"), "{e}");
}

#[test]
fn encoder_without_head_cannot_score_but_embeds() {
    let model = RewardModel::load(fixture("tiny_bert"), &Device::Cpu).unwrap();
    assert_eq!(model.embed(&["fine"]).unwrap()[0].len(), 32);
    let e = err_of(model.score_texts(&["fine"]));
    assert!(e.contains("no classification head"), "{e}");
}

#[test]
fn unknown_reward_label_and_zero_batch() {
    let options = LoadOptions {
        reward_label: Some("NEUTRAL".into()),
        ..LoadOptions::default()
    };
    let e = err_of(RewardModel::load_with(
        fixture("tiny_distilbert"),
        &Device::Cpu,
        &options,
    ));
    assert!(e.contains("NEUTRAL") && e.contains("POSITIVE"), "{e}");
    let options = LoadOptions {
        batch_size: 0,
        ..LoadOptions::default()
    };
    let e = err_of(RewardModel::load_with(
        fixture("tiny_distilbert"),
        &Device::Cpu,
        &options,
    ));
    assert!(e.contains("batch size"), "{e}");
}

#[test]
fn long_texts_are_truncated_and_counted_empty_texts_scored() {
    let model = RewardModel::load(fixture("tiny_distilbert"), &Device::Cpu).unwrap();
    let long = "good ".repeat(200);
    let scores = model.score_texts(&[&long, "", "good"]).unwrap();
    assert!(scores.iter().all(|s| s.is_finite()));
    assert_eq!(model.truncated_count(), 1);
    let ids = model.encode(&[&long]).unwrap().ids;
    assert_eq!(ids[0].len(), 24);
    assert_eq!(ids[0][23], 3, "the final [SEP] is kept");
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn data_files_bad_labels_and_texts() {
    let dir = scratch("data");
    let cases = [
        (
            "missing.jsonl",
            "{\"text\": \"fine\", \"label\": 1}\n{\"text\": \"no label\"}\n",
            "line 2: missing label",
        ),
        (
            "ternary.jsonl",
            "{\"text\": \"meh\", \"label\": 2}\n",
            "line 1: label 2 is not binary",
        ),
        (
            "word.json",
            r#"[{"text": "x", "label": "neutral"}]"#,
            "is not binary",
        ),
        (
            "empty.jsonl",
            "{\"text\": \"  \", \"label\": 0}\n",
            "line 1: empty text",
        ),
        (
            "notjson.jsonl",
            "{\"text\": \"a\", \"label\": 0}\nnot json\n",
            "line 2: invalid JSON",
        ),
        ("nothing.json", "[]", "no labelled examples"),
        (
            "textnum.jsonl",
            "{\"text\": 5, \"label\": 0}\n",
            "not a string",
        ),
    ];
    for (name, content, want) in cases {
        let e = err_of(data::load(write(&dir, name, content)));
        assert!(e.contains(want), "{name}: {e}");
        assert!(e.contains(name), "{name}: {e}");
    }
    // Blank records (the sentiment fixtures' trailing {"text": "", "class": null}) are
    // skipped; "class" is read as the label; bools and names are labels too.
    let ok = write(
        &dir,
        "ok.json",
        r#"[{"text": "good", "class": 1}, {"text": "bad", "label": false}, {"text": "ok", "label": "POS"}, {"text": "", "class": null}]"#,
    );
    let loaded = data::load(ok).unwrap();
    assert_eq!(loaded.skipped, 1);
    let labels: Vec<u32> = loaded.examples.iter().map(|e| e.label).collect();
    assert_eq!(labels, [1, 0, 1]);
    let e = err_of(data::load(dir.join("absent.jsonl")));
    assert!(
        e.contains("absent.jsonl") && e.contains("cannot read"),
        "{e}"
    );
    let e = err_of(data::load(write(&dir, "junk.arrow", "not arrow at all")));
    assert!(e.contains("junk.arrow"), "{e}");
}

#[test]
fn training_needs_both_classes_and_sane_settings() {
    use lathe_reward::train::train;
    use lathe_reward::{Example, TrainConfig};
    let only_pos: Vec<Example> = (0..10)
        .map(|i| Example {
            text: format!("good {i}"),
            label: 1,
        })
        .collect();
    let e = err_of(train(
        fixture("tiny_bert"),
        &only_pos,
        &TrainConfig::default(),
        &Device::Cpu,
        &mut |_| {},
    ));
    assert!(e.contains("no example labelled 0"), "{e}");
    let mut mixed = only_pos.clone();
    mixed.push(Example {
        text: "bad".into(),
        label: 0,
    });
    let config = TrainConfig {
        val_fraction: 1.5,
        ..TrainConfig::default()
    };
    let e = err_of(train(
        fixture("tiny_bert"),
        &mixed,
        &config,
        &Device::Cpu,
        &mut |_| {},
    ));
    assert!(e.contains("held-out fraction"), "{e}");
    let config = TrainConfig {
        lora: Some(lathe_reward::LoraSettings {
            targets: vec!["nonexistent".into()],
            ..Default::default()
        }),
        epochs: 1,
        ..TrainConfig::default()
    };
    let e = err_of(train(
        fixture("tiny_bert"),
        &mixed,
        &config,
        &Device::Cpu,
        &mut |_| {},
    ));
    assert!(
        e.contains("no linear layer") && e.contains("nonexistent"),
        "{e}"
    );
}
