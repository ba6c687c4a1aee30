//! Settings that make no sense are refused before anything is written, and a run that
//! diverges stops at the first non-finite value, keeping its last good checkpoint: one
//! table of argv -> expected error per training command (`sft`, `ppo`, `reward-train`),
//! each asserting a non-zero exit, the message and an untouched `--out`; then divergence
//! (SFT lr 1e30 after a checkpoint, PPO lr 1e30), a NaN setting against an earlier PPO
//! checkpoint, and Ctrl-C's exit status.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use lathe_cli::commands::sft::SftConfig;
use lathe_core::Device;
use lathe_models::pretrained::{Precision, Pretrained};

mod common;
use common::{fixture_model, lathe, path, snapshot, strings};

fn scratch(name: &str) -> PathBuf {
    common::scratch_in("bad", name)
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../reward/tests/fixtures")
        .join(name)
}

/// Runs each case (extra argv or a TOML file's text, expected error text) against `out`,
/// asserting a non-zero exit, the message on stderr and `out` unchanged.
fn check_table(
    command: &str,
    base: &[String],
    dir: &Path,
    out: &Path,
    cases: &[(&[&str], Option<&str>, &str)],
) {
    let before = snapshot(out);
    let existed = out.exists();
    let mut failures = Vec::new();
    for (i, (extra, toml, expected)) in cases.iter().enumerate() {
        let mut argv = base.to_vec();
        if let Some(text) = toml {
            let config = dir.join(format!("case{i}.toml"));
            std::fs::write(&config, text).unwrap();
            argv.extend(["--config".to_string(), path(&config)]);
        }
        argv.extend(strings(extra));
        argv.extend(["--out".to_string(), path(out)]);
        let output = lathe(&argv);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() || !stderr.contains(expected) {
            failures.push(format!(
                "{command} {extra:?} {toml:?}: status {:?}, expected {expected:?} in: {stderr}",
                output.status.code()
            ));
        }
        assert_eq!(out.exists(), existed, "{command} {extra:?} {toml:?}");
        assert!(
            snapshot(out) == before,
            "{command} {extra:?} {toml:?} changed {}",
            out.display()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn sft_texts(dir: &Path) -> PathBuf {
    let words = ["the", "film", "was", "great", "and", "cast", "fine"];
    let lines: Vec<String> = (0..60)
        .map(|i| {
            (0..10)
                .map(|j| words[(i * 5 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let data = dir.join("texts.txt");
    std::fs::write(&data, lines.join("\n")).unwrap();
    data
}

#[test]
fn sft_refuses_bad_settings() {
    let dir = scratch("sft");
    let data = sft_texts(&dir);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "an earlier file").unwrap();
    let base = strings(&[
        "sft",
        "--device",
        "cpu",
        "--model",
        &path(&fixture_model()),
        "--data",
        &path(&data),
    ]);
    let huge = "18446744073709551615";
    let cases: &[(&[&str], Option<&str>, &str)] = &[
        // The memory plan refuses the run before the model loads, with what it needs.
        (&["--budget", "64KiB"], None, "this run needs about"),
        (&["--budget", "12 parsecs"], None, "unknown unit"),
        (&["--lr", "0"], None, "lr must be finite and > 0"),
        (&["--lr=-1e-3"], None, "lr must be finite and > 0"),
        (&["--lr", "NaN"], None, "lr must be finite and > 0"),
        (&["--lr", "inf"], None, "lr must be finite and > 0"),
        (
            &["--weight-decay=-0.1"],
            None,
            "weight_decay must be finite and >= 0",
        ),
        (
            &["--weight-decay", "NaN"],
            None,
            "weight_decay must be finite and >= 0",
        ),
        (&["--max-grad-norm", "0"], None, "max_grad_norm must be > 0"),
        (&["--max-grad-norm=-1"], None, "max_grad_norm must be > 0"),
        (
            &["--max-grad-norm", "NaN"],
            None,
            "max_grad_norm must be > 0",
        ),
        (&["--max-steps", "0"], None, "max_steps must be in 1..="),
        (&["--epochs", "inf"], None, "epochs must be finite and > 0"),
        (
            &["--batch-size", huge],
            None,
            "batch_size must be in 1..=1048576",
        ),
        (
            &["--batch-size", "0"],
            None,
            "batch_size must be in 1..=1048576",
        ),
        (
            &["--grad-accum", "9223372036854775808"],
            None,
            "grad_accum must be in 1..=",
        ),
        (&["--block-size", "1"], None, "block_size must be in 2..="),
        (
            &["--eval-fraction", "NaN"],
            None,
            "eval_fraction must be in [0, 1)",
        ),
        (
            &["--lora-r", "1099511627776"],
            None,
            "exceeds the layer's width",
        ),
        (&["--lora-r", "0"], None, "lora_r must be >= 1"),
        (
            &["--lora-alpha", "NaN"],
            None,
            "lora_alpha must be finite and > 0",
        ),
        (
            &["--lora-dropout", "1"],
            None,
            "lora_dropout must be in [0, 1)",
        ),
        (
            &["--load-in-8bit", "--int8-threshold", "NaN"],
            None,
            "--int8-threshold must be finite and >= 0",
        ),
        (
            &[],
            Some("max_grad_norm = nan\n"),
            "max_grad_norm must be > 0",
        ),
        (&[], Some("lr = -1.0\n"), "lr must be finite and > 0"),
        (
            &[],
            Some("weight_decay = nan\n"),
            "weight_decay must be finite",
        ),
        (&[], Some("max_steps = 0\n"), "max_steps must be in 1..="),
        (
            &[],
            Some("grad_accum = 9223372036854775807\n"),
            "grad_accum must be in 1..=",
        ),
    ];
    check_table("sft", &base, &dir, &out, cases);
}

fn ppo_texts(dir: &Path) -> PathBuf {
    let data = dir.join("texts.txt");
    std::fs::write(
        &data,
        "The film was great\nA slow, boring plot\nActors did well here\nI loved it\n",
    )
    .unwrap();
    data
}

const PPO_TOML: &str = "[ppo]\nbatch_size = 4\nmini_batch_size = 2\nppo_epochs = 1\n\
    learning_rate = 1e-3\n\n[run]\nsteps = 2\nsave_every = 1\nlora_r = 2\nlora_alpha = 4.0\n\
    query_length = { min = 2, max = 3 }\nresponse_length = { min = 2, max = 3 }\n";

fn ppo_base(data: &Path) -> Vec<String> {
    strings(&[
        "ppo",
        "--device",
        "cpu",
        "--model",
        &path(&fixture_model()),
        "--reward",
        &path(&fixture("tiny_distilbert")),
        "--data",
        &path(data),
    ])
}

#[test]
fn ppo_refuses_bad_settings() {
    let dir = scratch("ppo");
    let data = ppo_texts(&dir);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "an earlier file").unwrap();
    let with = |extra: &str| format!("{PPO_TOML}{extra}");
    let ppo = |extra: &str| PPO_TOML.replace("[ppo]\n", &format!("[ppo]\n{extra}\n"));
    let cases: Vec<(Vec<&str>, Option<String>, &str)> = vec![
        (vec!["--budget", "64KiB"], None, "this run needs about"),
        (
            vec!["--learning-rate", "0"],
            None,
            "learning_rate must be finite and > 0",
        ),
        (
            vec!["--learning-rate", "NaN"],
            None,
            "learning_rate must be finite and > 0",
        ),
        (
            vec!["--init-kl-coef=-0.1"],
            None,
            "init_kl_coef must be finite and >= 0",
        ),
        (
            vec!["--init-kl-coef", "NaN"],
            None,
            "init_kl_coef must be finite and >= 0",
        ),
        (vec!["--steps", "0"], None, "steps must be in 1..="),
        (
            vec!["--batch-size", "18446744073709551615"],
            None,
            "batch_size must be in 1..=",
        ),
        (
            vec![
                "--batch-size",
                "2",
                "--mini-batch-size",
                "9223372036854775809",
            ],
            None,
            "mini_batch_size must be in 1..=",
        ),
        (
            vec!["--ppo-epochs", "0"],
            None,
            "ppo_epochs must be in 1..=",
        ),
        (vec![], Some(ppo("gamma = nan")), "gamma must be in [0, 1]"),
        (vec![], Some(ppo("gamma = 1.5")), "gamma must be in [0, 1]"),
        (vec![], Some(ppo("lam = -0.1")), "lam must be in [0, 1]"),
        (
            vec![],
            Some(ppo("vf_coef = nan")),
            "vf_coef must be finite and >= 0",
        ),
        (
            vec![],
            Some(ppo("vf_coef = -1.0")),
            "vf_coef must be finite and >= 0",
        ),
        (
            vec![],
            Some(ppo("cliprange = nan")),
            "cliprange must be finite and >= 0",
        ),
        (
            vec![],
            Some(ppo("cliprange_value = -0.2")),
            "cliprange_value must be finite",
        ),
        (
            vec![],
            Some(ppo("ratio_threshold = 0.0")),
            "ratio_threshold must be > 0",
        ),
        (
            vec![],
            Some(ppo("target_kl = nan")),
            "target_kl must be finite and >= 0",
        ),
        (
            vec![],
            Some(ppo("max_grad_norm = 0.0")),
            "max_grad_norm must be > 0",
        ),
        (
            vec![],
            Some(ppo("init_kl_coef = inf")),
            "init_kl_coef must be finite",
        ),
        (
            vec![],
            Some(ppo("target = nan")),
            "needs target finite and > 0",
        ),
        (
            vec![],
            Some(ppo("gradient_accumulation_steps = 9223372036854775807")),
            "gradient_accumulation_steps must be in 1..=",
        ),
        (
            vec![],
            Some(PPO_TOML.replace("max = 3 }\n", "max = 3, mx = 4 }\n")),
            "unknown field `mx`",
        ),
        (
            vec![],
            Some(with("temperature = 0.0\n")),
            "temperature must be finite and > 0",
        ),
        (
            vec![],
            Some(with("top_p = nan\n")),
            "top_p must be in (0, 1]",
        ),
        (
            vec![],
            Some(with("lora_dropout = 1.0\n")),
            "lora_dropout must be in [0, 1)",
        ),
        (
            vec![],
            Some(with("value_head_dropout = nan\n")),
            "value_head_dropout must be in",
        ),
        (
            vec![],
            Some(PPO_TOML.replace("lora_r = 2", "lora_r = 1099511627776")),
            "exceeds the layer's width",
        ),
    ];
    // Cases without a TOML text use the good file, so that only the flag is wrong.
    let cases: Vec<(Vec<&str>, Option<String>, &str)> = cases
        .into_iter()
        .map(|(argv, toml, e)| (argv, Some(toml.unwrap_or_else(|| PPO_TOML.into())), e))
        .collect();
    let table: Vec<(&[&str], Option<&str>, &str)> = cases
        .iter()
        .map(|(argv, toml, e)| (argv.as_slice(), toml.as_deref(), *e))
        .collect();
    check_table("ppo", &ppo_base(&data), &dir, &out, &table);
}

#[test]
fn grpo_refuses_bad_settings() {
    let dir = scratch("grpo");
    let data = ppo_texts(&dir);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "an earlier file").unwrap();
    let base = {
        let mut argv = ppo_base(&data);
        argv[0] = "grpo".into();
        argv.extend(strings(&[
            "--max-steps",
            "2",
            "--max-completion-length",
            "3",
            "--lora-r",
            "2",
        ]));
        argv
    };
    let cases: Vec<(&[&str], Option<&str>, &str)> = vec![
        (
            &["--num-generations", "1"],
            None,
            "num_generations must be in 2..=",
        ),
        (
            &[
                "--num-generations",
                "4",
                "--per-device-train-batch-size",
                "6",
            ],
            None,
            "is not a multiple of num_generations 4",
        ),
        (
            &["--reward-funcs", "model,brevity"],
            None,
            "reward function \"brevity\" does not exist",
        ),
        (
            &["--reward-weights", "1,2"],
            None,
            "one per reward function",
        ),
        (&["--beta=-0.1"], None, "beta must be finite and >= 0"),
        (&["--loss-type", "ppo"], None, "loss_type"),
        (
            &["--num-iterations", "2", "--save-steps", "3"],
            None,
            "multiples of num_iterations",
        ),
        (
            &[],
            Some("num_generatoins = 4\n"),
            "unknown field `num_generatoins`",
        ),
        (
            &[],
            Some("temperature = nan\n"),
            "temperature must be finite and > 0",
        ),
    ];
    check_table("grpo", &base, &dir, &out, &cases);
}

#[test]
fn dpo_refuses_bad_settings_and_bad_preference_records() {
    let dir = scratch("dpo");
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "an earlier file").unwrap();
    let write = |name: &str, text: &str| {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        path(&file)
    };
    let good = write(
        "good.jsonl",
        "{\"prompt\": \"The film\", \"chosen\": \" was great\", \"rejected\": \" was dull\"}\n",
    );
    let no_rejected = write(
        "no_rejected.jsonl",
        "{\"prompt\": \"The film\", \"chosen\": \" was great\"}\n",
    );
    let empty_chosen = write(
        "empty_chosen.json",
        "[{\"prompt\": \"The film\", \"chosen\": \" \", \"rejected\": \" was dull\"}]",
    );
    let not_json = write("not_json.jsonl", "prompt,chosen,rejected\n");
    let base = strings(&["dpo", "--device", "cpu", "--model", &path(&fixture_model())]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--data", &no_rejected], "no \"rejected\" field"),
        (vec!["--data", &empty_chosen], "\"chosen\" is empty"),
        (vec!["--data", &not_json], "line 1: invalid JSON"),
        (
            vec!["--data", &good, "--chosen-field", "answer"],
            "no \"answer\" field (keys: chosen, prompt, rejected)",
        ),
        (vec!["--data", &good, "--beta", "0"], "beta"),
        (
            vec!["--data", &good, "--learning-rate", "NaN"],
            "learning_rate",
        ),
        (
            vec!["--data", &good, "--max-length", "1"],
            "max_length must be in 2..=",
        ),
        (vec!["--data", &good, "--loss-type", "kto"], "loss_type"),
        (
            vec!["--data", &good, "--label-smoothing", "0.1"],
            "label_smoothing",
        ),
    ];
    let table: Vec<(&[&str], Option<&str>, &str)> = cases
        .iter()
        .map(|(argv, e)| (argv.as_slice(), None, *e))
        .collect();
    check_table("dpo", &base, &dir, &out, &table);
}

#[test]
fn reward_train_refuses_bad_settings() {
    let dir = scratch("reward");
    let mut lines = String::new();
    for i in 0..20 {
        let (word, label) = if i % 2 == 0 { ("good", 1) } else { ("bad", 0) };
        lines += &format!("{{\"text\": \"the movie was {word}\", \"label\": {label}}}\n");
    }
    let data = dir.join("data.jsonl");
    std::fs::write(&data, lines).unwrap();
    // reward-train wants a new (or empty) folder: it must not appear.
    let out = dir.join("model");
    let base = strings(&[
        "reward-train",
        "--encoder",
        &path(&fixture("tiny_bert")),
        "--data",
        &path(&data),
    ]);
    let cases: &[(&[&str], Option<&str>, &str)] = &[
        // Planned from the tokenized data and config.json, refused before the encoder loads.
        (&["--budget", "64KiB"], None, "this run needs about"),
        (
            &["--lora", "--budget", "64KiB"],
            None,
            "a smaller --lora-batch-size",
        ),
        (
            &["--weight-decay", "NaN"],
            None,
            "weight decay must be finite and >= 0",
        ),
        (
            &["--weight-decay=-1"],
            None,
            "weight decay must be finite and >= 0",
        ),
        (&["--lr", "0"], None, "learning rate must be finite and > 0"),
        (
            &["--lr", "inf"],
            None,
            "learning rate must be finite and > 0",
        ),
        (
            &["--batch-size", "2305843009213693952"],
            None,
            "batch size must be in 1..=",
        ),
        (
            &["--batch-size", "18446744073709551615"],
            None,
            "batch size must be in 1..=",
        ),
        (&["--epochs", "0"], None, "epochs must be in 1..="),
        // Valid, but diverges at the first update: stopped, nothing written.
        (
            &["--lr", "1e30"],
            None,
            "head stage, epoch 1: trainable parameter",
        ),
        (
            &["--val-fraction", "1"],
            None,
            "held-out fraction must be in [0, 1)",
        ),
        (
            &["--val-fraction", "NaN"],
            None,
            "held-out fraction must be in [0, 1)",
        ),
        (
            &["--lora", "--lora-lr", "NaN"],
            None,
            "LoRA learning rate must be finite",
        ),
        (
            &["--lora", "--lora-alpha", "0"],
            None,
            "LoRA alpha must be finite and > 0",
        ),
        (
            &["--lora", "--lora-r", "1099511627776"],
            None,
            "exceeds the encoder's hidden size",
        ),
        (
            &["--lora", "--lora-batch-size", "0"],
            None,
            "LoRA batch size must be in 1..=",
        ),
        (
            &[],
            Some("weight_decay = nan\n"),
            "weight decay must be finite and >= 0",
        ),
        (
            &[],
            Some("batch_size = 2305843009213693952\n"),
            "batch size must be in 1..=",
        ),
        // Columns by name, as flags and as config keys.
        (
            &["--label-field", "stars"],
            None,
            "line 1: missing label (\"stars\")",
        ),
        (&[], Some("text_field = \"review\"\n"), "line 1: empty text"),
    ];
    check_table("reward-train", &base, &dir, &out, cases);
}

fn sft_divergence_config() -> &'static str {
    // Warm-up: step 1 runs at lr 0 (a good checkpoint), step 2 at 5e29.
    "block_size = 16\nbatch_size = 2\nmax_steps = 4\nlr = 1e30\nwarmup_steps = 2\n\
     schedule = \"constant\"\nlora_r = 2\nlora_alpha = 4.0\neval_every = 1\nsave_every = 1\n\
     seed = 3\n"
}

/// SFT at lr 1e30: the step that blows up is an error naming it and the likely cause, the
/// exit is non-zero, and the checkpoint of the step before stays byte for byte; no adapter
/// or run.json is written.
#[test]
fn sft_divergence_stops_and_keeps_the_last_checkpoint() {
    let dir = scratch("sft-diverge");
    let data = sft_texts(&dir);
    let config_path = dir.join("sft.toml");
    std::fs::write(&config_path, sft_divergence_config()).unwrap();
    let config: SftConfig = lathe_cli::config_file::read_toml(&config_path, "SFT config").unwrap();
    let out = dir.join("out");
    // Step 1 (lr 0) through the library, stopped there as an interrupted run would be.
    let mut pretrained = Pretrained::load(&fixture_model(), &Device::Cpu, Precision::F32).unwrap();
    let texts = lathe_cli::texts::read_texts(&data, "text").unwrap();
    let blocks = lathe_cli::commands::sft::pack(
        &texts,
        &pretrained.tokenizer,
        config.block_size,
        config.eval_fraction,
    )
    .unwrap();
    lathe_cli::commands::sft::train_until(
        &mut pretrained.model,
        &blocks,
        &config,
        &out,
        &Device::Cpu,
        Some(1),
    )
    .unwrap();
    let checkpoint = snapshot(&out.join("checkpoint"));
    assert!(!checkpoint.is_empty());
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap();

    let output = lathe(&strings(&[
        "sft",
        "--device",
        "cpu",
        "--model",
        &path(&fixture_model()),
        "--data",
        &path(&data),
        "--config",
        &path(&config_path),
        "--out",
        &path(&out),
    ]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("step 2:"), "{stderr}");
    assert!(stderr.contains("learning rate"), "{stderr}");
    assert_eq!(snapshot(&out.join("checkpoint")), checkpoint, "{stderr}");
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(!out.join("run.json").exists());
    // The resume rewrote metrics.jsonl with the step before; the bad step left no line.
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
        metrics_before
    );
}

/// PPO at lr 1e30 stops at step 1 with an error (no checkpoint, adapter or value head).
#[test]
fn ppo_divergence_is_an_error() {
    let dir = scratch("ppo-diverge");
    let out = dir.join("out");
    let mut file: lathe_cli::commands::ppo::PpoFile =
        toml::from_str(PPO_TOML).expect("the test's PPO config");
    file.ppo.learning_rate = 1e30;
    file.run.steps = 3;
    let pretrained = Pretrained::load(&fixture_model(), &Device::Cpu, Precision::F32).unwrap();
    let mut reward = |texts: &[String]| -> lathe_ppo::Result<Vec<f32>> {
        Ok(texts.iter().map(|t| t.len() as f32 / 10.0).collect())
    };
    let texts: Vec<String> = ["The film was great", "A slow plot", "I loved it"]
        .map(String::from)
        .to_vec();
    let prompts = lathe_ppo::Prompts::cut_from_texts(&pretrained.tokenizer, &texts).unwrap();
    let err = lathe_cli::commands::ppo::train(
        pretrained.model,
        &pretrained.tokenizer,
        prompts,
        &mut reward,
        &file,
        &out,
        &Device::Cpu,
        &AtomicBool::new(false),
        None,
    )
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("diverged"), "{message}");
    assert!(message.contains("learning rate"), "{message}");
    for name in [
        "checkpoint",
        "adapter_model.safetensors",
        "value_head.safetensors",
        "run.json",
    ] {
        assert!(!out.join(name).exists(), "{name} written: {message}");
    }
}

/// A PPO run with a checkpoint, rerun with `vf_coef = nan`: refused, the folder unchanged.
/// Then the finished run rerun as it was: it says so and keeps run.json's summary.
#[test]
fn ppo_nan_setting_keeps_the_earlier_run_and_a_rerun_keeps_the_summary() {
    let dir = scratch("ppo-nan");
    let data = ppo_texts(&dir);
    let good = dir.join("good.toml");
    std::fs::write(&good, PPO_TOML).unwrap();
    let out = dir.join("out");
    let mut argv = ppo_base(&data);
    argv.extend(strings(&["--out", &path(&out)]));
    let run = |config: &Path| {
        let mut argv = argv.clone();
        argv.extend(["--config".to_string(), path(config)]);
        lathe(&argv)
    };
    let first = run(&good);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let before = snapshot(&out);
    let run_json = |out: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap()
    };
    let summary = run_json(&out)["summary"].clone();
    assert_eq!(summary["mean_rewards"].as_array().unwrap().len(), 2);

    let nan = dir.join("nan.toml");
    std::fs::write(&nan, PPO_TOML.replace("[ppo]\n", "[ppo]\nvf_coef = nan\n")).unwrap();
    let bad = run(&nan);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{stderr}");
    assert!(
        stderr.contains("vf_coef must be finite and >= 0"),
        "{stderr}"
    );
    assert!(
        snapshot(&out) == before,
        "the NaN run changed {}",
        out.display()
    );

    let again = run(&good);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("already holds a finished run"), "{stderr}");
    assert_eq!(run_json(&out)["summary"], summary);
    assert!(
        snapshot(&out) == before,
        "the rerun changed {}",
        out.display()
    );
}

/// Ctrl-C during `lathe ppo`: the step finishes, a checkpoint is saved, the exit is 130.
#[test]
fn ppo_ctrl_c_saves_and_exits_130() {
    let dir = scratch("ppo-ctrlc");
    let data = ppo_texts(&dir);
    let config = dir.join("long.toml");
    std::fs::write(&config, PPO_TOML.replace("steps = 2", "steps = 100000")).unwrap();
    let out = dir.join("out");
    let mut argv = ppo_base(&data);
    argv.extend(strings(&["--config", &path(&config), "--out", &path(&out)]));
    let child = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(&argv)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.lines().count() >= 1) {
        assert!(
            started.elapsed().as_secs() < 300,
            "no PPO step within 300 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted; saved a checkpoint"),
        "{stderr}"
    );
    assert!(out.join("checkpoint/trainer_state.json").is_file());
    assert!(!out.join("run.json").exists());
}

/// Rerunning a finished SFT run trains nothing, says so, and leaves run.json (its losses)
/// and the adapter as they were.
#[test]
fn sft_rerun_of_a_finished_run_keeps_its_summary() {
    let dir = scratch("sft-rerun");
    let data = sft_texts(&dir);
    let out = dir.join("out");
    let argv = strings(&[
        "sft",
        "--device",
        "cpu",
        "--model",
        &path(&fixture_model()),
        "--data",
        &path(&data),
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--lora-r",
        "2",
        "--max-steps",
        "2",
        "--out",
        &path(&out),
    ]);
    let first = lathe(&argv);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let before = snapshot(&out);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["summary"]["losses"].as_array().unwrap().len(), 2);
    let again = lathe(&argv);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("already holds a finished run"), "{stderr}");
    assert!(!stderr.contains("NaN"), "{stderr}");
    assert!(
        snapshot(&out) == before,
        "the rerun changed {}",
        out.display()
    );
}

#[test]
fn a_malformed_binding_limit_in_the_environment_is_refused() {
    // A typo in the test-only binding limit must not quietly run unsplit.
    for value in ["abc", "0", "-5"] {
        let out = Command::new(env!("CARGO_BIN_EXE_lathe"))
            .args([
                "generate",
                "--model",
                &path(&fixture_model()),
                "--device",
                "gpu",
                "--allow-software-gpu",
                "hi",
            ])
            .env("LATHE_GPU_MAX_BINDING", value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{value}: {stderr}");
        assert!(
            stderr.contains("LATHE_GPU_MAX_BINDING") && stderr.contains("positive byte count"),
            "{value}: {stderr}"
        );
    }
}
