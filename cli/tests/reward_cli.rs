//! `lathe reward-train` and `lathe score` on the tiny BERT fixture of lathe-reward.

use std::path::{Path, PathBuf};

use clap::Parser;
use lathe_cli::commands::reward::{run_train, score, RewardTrainArgs, ScoreArgs};

#[derive(Parser)]
struct Train {
    #[command(flatten)]
    args: RewardTrainArgs,
}

#[derive(Parser)]
struct Score {
    #[command(flatten)]
    args: ScoreArgs,
}

fn tiny_bert() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../reward/tests/fixtures/tiny_bert")
        .display()
        .to_string()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-cli-reward-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_data(dir: &Path) -> PathBuf {
    let pos = ["good", "great", "excellent", "wonderful", "loved"];
    let neg = ["bad", "terrible", "awful", "boring", "hated"];
    let mut lines = String::new();
    for i in 0..60 {
        let (word, label) = if i % 2 == 0 {
            (pos[i / 2 % 5], 1)
        } else {
            (neg[i / 2 % 5], 0)
        };
        lines += &format!("{{\"text\": \"the movie was {word}\", \"label\": {label}}}\n");
    }
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

fn train_args(extra: &[&str]) -> RewardTrainArgs {
    let mut argv = vec!["lathe"];
    argv.extend_from_slice(extra);
    Train::try_parse_from(argv).unwrap().args
}

#[test]
fn reward_train_then_score() {
    let dir = scratch("ok");
    let data = write_data(&dir);
    let out = dir.join("model");
    let (enc, data_s, out_s) = (
        tiny_bert(),
        data.display().to_string(),
        out.display().to_string(),
    );
    let args = train_args(&[
        "--encoder",
        &enc,
        "--data",
        &data_s,
        "--test-data",
        &data_s,
        "--out",
        &out_s,
        "--epochs",
        "5",
        "--lora",
        "--lora-epochs",
        "1",
        "--lora-r",
        "2",
    ]);
    run_train(&args).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "train_report.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["lathe_reward"]["pooling"], "mean");
    assert_eq!(config["lathe_reward"]["reward_label"], "POSITIVE");
    assert_eq!(config["id2label"]["1"], "POSITIVE");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| l["stage"] == "head"));
    assert!(lines.iter().any(|l| l["stage"] == "lora"));
    assert!(lines.iter().all(|l| l["val_accuracy"].is_number()));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["lora_layers"], 4);
    assert!(report["test"][&data_s]["accuracy"].is_number());

    // Score texts from arguments and from a file.
    let texts = dir.join("texts.txt");
    std::fs::write(&texts, "the movie was great\nthe movie was awful\n").unwrap();
    let argv = [
        "lathe",
        "--reward",
        &out_s,
        "--file",
        &texts.display().to_string(),
        "--json",
        "one more text",
    ];
    let args = Score::try_parse_from(argv).unwrap().args;
    let mut buf = Vec::new();
    score(&args, &mut buf).unwrap();
    let out_text = String::from_utf8(buf).unwrap();
    let rows: Vec<serde_json::Value> = out_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["text"], "one more text");
    assert!(rows
        .iter()
        .all(|r| r["score"].as_f64().unwrap().is_finite()));

    // Plain output, negative label.
    let args =
        Score::try_parse_from(["lathe", "--reward", &out_s, "--label", "NEGATIVE", "a", "b"])
            .unwrap()
            .args;
    let mut buf = Vec::new();
    score(&args, &mut buf).unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text
        .lines()
        .all(|l| l.split('\t').next().unwrap().parse::<f32>().is_ok()));
}

#[test]
fn reward_cli_errors() {
    let dir = scratch("bad");
    let data = write_data(&dir);
    let (enc, data_s) = (tiny_bert(), data.display().to_string());
    // A non-empty --out is refused.
    let args = train_args(&[
        "--encoder",
        &enc,
        "--data",
        &data_s,
        "--out",
        &dir.display().to_string(),
    ]);
    let e = run_train(&args).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    // Bad labels name the record.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"x\", \"label\": 1}\n{\"text\": \"y\", \"label\": 7}\n",
    )
    .unwrap();
    let out = dir.join("never").display().to_string();
    let args = train_args(&[
        "--encoder",
        &enc,
        "--data",
        &bad.display().to_string(),
        "--out",
        &out,
    ]);
    let e = format!("{:#}", run_train(&args).unwrap_err());
    assert!(e.contains("line 2") && e.contains("not binary"), "{e}");
    // Unknown pooling.
    let args = train_args(&[
        "--encoder",
        &enc,
        "--data",
        &data_s,
        "--out",
        &out,
        "--pooling",
        "max",
    ]);
    let e = run_train(&args).unwrap_err().to_string();
    assert!(e.contains("pooling"), "{e}");
    // Scoring: no texts; an encoder without a head.
    let args = Score::try_parse_from(["lathe", "--reward", &enc])
        .unwrap()
        .args;
    let e = score(&args, &mut Vec::new()).unwrap_err().to_string();
    assert!(e.contains("no texts"), "{e}");
    let args = Score::try_parse_from(["lathe", "--reward", &enc, "hello"])
        .unwrap()
        .args;
    let e = format!("{:#}", score(&args, &mut Vec::new()).unwrap_err());
    assert!(e.contains("no classification head"), "{e}");
}

/// `lathe reward-train --config FILE`: the file's settings with command-line flags on top
/// (recorded in train_report.json); an unknown key is refused.
#[test]
fn reward_train_config_file_with_flag_overrides() {
    let dir = scratch("config");
    let data = write_data(&dir);
    let config = dir.join("reward.toml");
    std::fs::write(
        &config,
        "epochs = 3\nlr = 0.01\nseed = 4\npooling = \"first\"\n",
    )
    .unwrap();
    let run = |extra: &[&str], out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lathe"))
            .arg("reward-train")
            .args(["--encoder", &tiny_bert()])
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
    let out = dir.join("model");
    let output = run(&["--seed", "7"], &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_report.json")).unwrap())
            .unwrap();
    let s = &report["settings"];
    assert_eq!(s["epochs"], 3);
    assert_eq!(s["pooling"], "first");
    assert_eq!(s["seed"], 7, "the flag wins: {s}");
    assert!((s["lr"].as_f64().unwrap() - 0.01).abs() < 1e-6);
    std::fs::write(&config, "epochz = 3\n").unwrap();
    let bad = run(&[], &dir.join("bad"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("epochz"));
}
