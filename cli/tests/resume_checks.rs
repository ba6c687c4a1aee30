//! A resume continues only the run it belongs to: another model, data, reward or setting is
//! refused naming what differs (`--resume-anyway` warns instead); a hand-edited trainer state
//! and checkpoint files with tensors the run does not use are refused; each refusal exits
//! non-zero and leaves `--out` byte for byte. A checkpoint left as `checkpoint.old` by a
//! crash mid-save is resumed from, keeping the metrics of its steps.

use std::path::{Path, PathBuf};

use lathe_cli::commands::sft::SftConfig;
use lathe_core::{Device, Tensor};
use lathe_models::pretrained::{Precision, Pretrained};

mod common;
use common::{fixture_model, lathe, path, repo, snapshot, stderr, strings};

fn scratch(name: &str) -> PathBuf {
    common::scratch_in("resume", name)
}

fn texts(dir: &Path, name: &str, salt: usize) -> PathBuf {
    let words = ["the", "film", "was", "great", "and", "cast", "fine"];
    let lines: Vec<String> = (0..60)
        .map(|i| {
            (0..10)
                .map(|j| words[(i * 5 + j * 3 + salt) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let data = dir.join(name);
    std::fs::write(&data, lines.join("\n")).unwrap();
    data
}

fn sft_argv(model: &Path, data: &Path, out: &Path) -> Vec<String> {
    strings(&[
        "sft",
        "--device",
        "cpu",
        "--model",
        &path(model),
        "--data",
        &path(data),
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--lora-r",
        "2",
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--out",
        &path(out),
    ])
}

/// Runs `argv`, asserting a non-zero exit with `expected` on stderr and `out` unchanged.
fn refused(argv: &[String], out: &Path, expected: &str) {
    let before = snapshot(out);
    let o = lathe(argv);
    let err = stderr(&o);
    assert!(!o.status.success(), "{argv:?} succeeded: {err}");
    assert!(
        err.contains(expected),
        "{argv:?}: expected {expected:?} in {err}"
    );
    assert!(
        snapshot(out) == before,
        "{argv:?} changed {}",
        out.display()
    );
}

#[test]
fn sft_resume_refuses_other_inputs_and_settings() {
    let dir = scratch("sft-inputs");
    let data = texts(&dir, "a.txt", 0);
    let other_data = texts(&dir, "b.txt", 3);
    let out = dir.join("out");
    let first = lathe(&sft_argv(&fixture_model(), &data, &out));
    assert!(first.status.success(), "{}", stderr(&first));
    let stored: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(stored["inputs"]["model"].is_string(), "{stored}");
    assert!(stored["inputs"]["data"].is_string(), "{stored}");

    let untied = repo("models/tests/fixtures/gguf_model_untied.gguf");
    refused(
        &sft_argv(&fixture_model(), &other_data, &out),
        &out,
        "the training data (--data, --text-field or the tokenizer) differs",
    );
    refused(&sft_argv(&untied, &data, &out), &out, "the model (--model");
    let mut int8 = sft_argv(&fixture_model(), &data, &out);
    int8.push("--load-in-8bit".into());
    refused(&int8, &out, "the model (--model, its precision");
    let mut lr = sft_argv(&fixture_model(), &data, &out);
    lr.extend(strings(&["--lr", "1e-3"]));
    refused(&lr, &out, "setting lr: 0.0002");
    // LoRA shapes are not overridable.
    let mut rank = sft_argv(&fixture_model(), &data, &out);
    let at = rank.iter().position(|a| a == "--lora-r").unwrap();
    rank[at + 1] = "4".into();
    rank.push("--resume-anyway".into());
    refused(&rank, &out, "not even with --resume-anyway");

    // --resume-anyway turns the data difference into a warning.
    let mut anyway = sft_argv(&fixture_model(), &other_data, &out);
    anyway.push("--resume-anyway".into());
    let o = lathe(&anyway);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("warning: resuming"), "{err}");
    assert!(err.contains("the training data"), "{err}");
}

fn state_path(out: &Path) -> PathBuf {
    out.join("checkpoint/trainer_state.json")
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Adds `name` (a small f32 tensor) to a safetensors file.
fn add_tensor(file: &Path, name: &str, shape: &[usize]) {
    let mut tensors = lathe_core::safetensors::load(file, &Device::Cpu).unwrap();
    let n: usize = shape.iter().product();
    tensors.push((
        name.to_string(),
        Tensor::from_vec(vec![0.5f32; n], shape, &Device::Cpu).unwrap(),
    ));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    lathe_core::safetensors::save(file, &refs, None).unwrap();
}

#[test]
fn sft_refuses_hand_edited_states_and_foreign_tensors() {
    let dir = scratch("sft-edited");
    let data = texts(&dir, "a.txt", 0);
    let out = dir.join("out");
    let argv = sft_argv(&fixture_model(), &data, &out);
    let first = lathe(&argv);
    assert!(first.status.success(), "{}", stderr(&first));
    let good = snapshot(&out);
    let restore = || {
        let _ = std::fs::remove_dir_all(&out);
        for (rel, bytes) in &good {
            let p = out.join(rel);
            if bytes == b"<dir>" {
                std::fs::create_dir_all(&p).unwrap();
            } else {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, bytes).unwrap();
            }
        }
    };
    type Edit = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "step 10^6",
            Box::new(|out| edit_json(&state_path(out), |v| v["step"] = 1_000_000.into())),
            "step 1000000 is beyond the run's 2 steps",
        ),
        (
            "adam step 0",
            Box::new(|out| edit_json(&state_path(out), |v| v["adam_step"] = 0.into())),
            "the optimizer has taken 0 steps at step 2",
        ),
        (
            "negative step",
            Box::new(|out| edit_json(&state_path(out), |v| v["step"] = (-1).into())),
            "parsing the checkpoint state",
        ),
        (
            "NaN lr",
            Box::new(|out| {
                let p = state_path(out);
                let text = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, text.replace("\"lr\": 0.0002", "\"lr\": NaN")).unwrap();
            }),
            "parsing the checkpoint state",
        ),
        (
            "step 0",
            Box::new(|out| {
                edit_json(&state_path(out), |v| {
                    v["step"] = 0.into();
                    v["adam_step"] = 0.into();
                })
            }),
            "step 0",
        ),
        (
            "metrics behind the step",
            Box::new(|out| {
                let p = out.join("metrics.jsonl");
                let text = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, text.lines().next().unwrap().to_string() + "\n").unwrap();
            }),
            "records steps only up to 1",
        ),
        (
            "extra optimizer tensor",
            Box::new(|out| add_tensor(&out.join("checkpoint/optimizer.safetensors"), "m.99", &[2])),
            "holds tensors this run has no parameter for: m.99",
        ),
        (
            "extra adapter module",
            Box::new(|out| {
                // k_proj is in the model but not among the run's targets (q_proj, v_proj).
                let file = out.join("checkpoint/adapter_model.safetensors");
                let saved = lathe_core::safetensors::load(&file, &Device::Cpu).unwrap();
                let (name, a) = saved
                    .iter()
                    .find(|(k, _)| k.contains("q_proj.lora_A"))
                    .unwrap();
                let k = name.replace("q_proj", "k_proj");
                let mut tensors = saved.clone();
                tensors.push((k.clone(), a.clone()));
                // k_proj's output may be narrower than q_proj's (GQA): B takes its width
                // from the model.
                let pretrained =
                    Pretrained::load(&fixture_model(), &Device::Cpu, Precision::F32).unwrap();
                let k_out = pretrained
                    .model
                    .linears()
                    .into_iter()
                    .find(|(n, _)| k.contains(&format!("{n}.")))
                    .map(|(_, l)| l.out_features())
                    .unwrap();
                let r = a.shape()[0];
                tensors.push((
                    k.replace("lora_A", "lora_B"),
                    Tensor::from_vec(vec![0.0f32; k_out * r], &[k_out, r], &Device::Cpu).unwrap(),
                ));
                let refs: Vec<(&str, &Tensor)> =
                    tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
                lathe_core::safetensors::save(&file, &refs, None).unwrap();
            }),
            "modules not targeted",
        ),
    ];
    for (what, edit, expected) in &cases {
        restore();
        edit(&out);
        eprintln!("case: {what}");
        refused(&argv, &out, expected);
    }
}

const PPO_TOML: &str = "[ppo]\nbatch_size = 4\nmini_batch_size = 2\nppo_epochs = 1\n\
    learning_rate = 1e-3\n\n[run]\nsteps = 2\nsave_every = 1\nlora_r = 2\nlora_alpha = 4.0\n\
    query_length = { min = 2, max = 3 }\nresponse_length = { min = 2, max = 3 }\n";

#[test]
fn ppo_resume_says_so_and_refuses_another_reward_or_a_foreign_state() {
    let dir = scratch("ppo");
    let data = dir.join("texts.txt");
    std::fs::write(
        &data,
        "The film was great\nA slow, boring plot\nActors did well here\nI loved it\n",
    )
    .unwrap();
    let config = dir.join("ppo.toml");
    std::fs::write(&config, PPO_TOML).unwrap();
    let reward = repo("reward/tests/fixtures/tiny_distilbert");
    // The same reward model with one more key in its config: loads alike, another file.
    let other_reward = dir.join("other_reward");
    std::fs::create_dir_all(&other_reward).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(reward.join(f), other_reward.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reward.join("config.json")).unwrap())
            .unwrap();
    cfg["lathe_test_note"] = "another reward model".into();
    std::fs::write(other_reward.join("config.json"), cfg.to_string()).unwrap();
    let out = dir.join("out");
    let argv = |reward: &Path| {
        strings(&[
            "ppo",
            "--device",
            "cpu",
            "--model",
            &path(&fixture_model()),
            "--reward",
            &path(reward),
            "--data",
            &path(&data),
            "--config",
            &path(&config),
            "--out",
            &path(&out),
        ])
    };
    // A finished run's checkpoint is still resumed from (to find there is nothing left to
    // do), so it is checked like any other.
    let first = lathe(&argv(&reward));
    assert!(first.status.success(), "{}", stderr(&first));
    let again = lathe(&argv(&reward));
    let err = stderr(&again);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("ppo: resuming at step 2 of 2"), "{err}");

    refused(
        &argv(&other_reward),
        &out,
        "the reward model (--reward) differs",
    );
    let state = out.join("checkpoint/trainer_state.json");
    let original = std::fs::read(&state).unwrap();
    // The controller is {"Adaptive": {...}} or {"Fixed": {...}}: set whichever value.
    edit_json(&state, |v| {
        for variant in v["kl"].as_object_mut().unwrap().values_mut() {
            variant["value"] = (-0.5).into();
        }
    });
    refused(&argv(&reward), &out, "the KL coefficient is -0.5");
    std::fs::write(&state, &original).unwrap();
    edit_json(&state, |v| v["adam_step"] = 1_000_000.into());
    refused(
        &argv(&reward),
        &out,
        "the optimizer has taken 1000000 steps",
    );
    std::fs::write(&state, &original).unwrap();
    add_tensor(
        &out.join("checkpoint/value_head.safetensors"),
        "v_head.extra",
        &[1],
    );
    refused(&argv(&reward), &out, "a value head does not have");
}

/// A crash inside the checkpoint swap leaves `checkpoint.old` and no `checkpoint/`: the
/// rerun resumes from it (saying so), keeps the metrics of its steps, and finishes the run
/// as an uninterrupted one would.
#[test]
fn sft_resumes_from_checkpoint_old() {
    let dir = scratch("sft-old");
    let data = texts(&dir, "a.txt", 0);
    let out = dir.join("out");
    let config = SftConfig {
        block_size: 16,
        batch_size: 2,
        lora_r: 2,
        max_steps: Some(3),
        save_every: 1,
        ..SftConfig::default()
    };
    let mut pretrained = Pretrained::load(&fixture_model(), &Device::Cpu, Precision::F32).unwrap();
    let texts = lathe_cli::texts::read_texts(&data, "text").unwrap();
    let blocks =
        lathe_cli::commands::sft::pack(&texts, &pretrained.tokenizer, 16, config.eval_fraction)
            .unwrap();
    lathe_cli::commands::sft::train_until(
        &mut pretrained.model,
        &blocks,
        &config,
        &out,
        &Device::Cpu,
        Some(2),
    )
    .unwrap();
    let metrics_before = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics_before.lines().count(), 2);
    // The crash: the old checkpoint moved aside, the new one not yet in place.
    std::fs::rename(out.join("checkpoint"), out.join("checkpoint.old")).unwrap();

    let mut argv = sft_argv(&fixture_model(), &data, &out);
    let at = argv.iter().position(|a| a == "--max-steps").unwrap();
    argv[at + 1] = "3".into();
    let o = lathe(&argv);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming from"), "{err}");
    assert!(err.contains("checkpoint.old"), "{err}");
    assert!(err.contains("resuming at step 2"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    assert!(metrics.starts_with(&metrics_before), "{metrics}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state_path(&out)).unwrap()).unwrap();
    assert_eq!(state["step"], 3);
    // Replaced by the newer checkpoint, so removed; the run is complete.
    assert!(!out.join("checkpoint.old").exists());
    assert!(out.join("run.json").is_file());
}
