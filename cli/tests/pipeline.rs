//! The whole pipeline (reward model -> SFT -> merge -> PPO -> report) on tiny random models
//! (the Llama GGUF fixture of lathe-models, the BERT fixture of lathe-reward) and a tiny
//! dataset: every stage's output and the manifest appear; a rerun skips every stage;
//! deleting one stage's folder redoes only that stage.

use std::path::{Path, PathBuf};

use lathe_cli::commands::pipeline::{run_pipeline, Inputs, Settings};
use lathe_cli::commands::sft::SftConfig;
use lathe_core::Device;
use lathe_ppo::rollout::LengthRange;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn tiny_inputs(dir: &Path) -> Inputs {
    std::fs::create_dir_all(dir).unwrap();
    let good = [
        "a great film",
        "wonderful acting",
        "I loved it",
        "superb and moving",
    ];
    let bad = [
        "a dull film",
        "terrible acting",
        "I hated it",
        "boring and slow",
    ];
    let mut labelled = Vec::new();
    for i in 0..10 {
        labelled.push(serde_json::json!({"text": good[i % 4], "label": 1}).to_string());
        labelled.push(serde_json::json!({"text": bad[i % 4], "label": 0}).to_string());
    }
    let reward_data = dir.join("labelled.jsonl");
    std::fs::write(&reward_data, labelled.join("\n")).unwrap();
    let texts: Vec<String> = good
        .iter()
        .chain(&bad)
        .cycle()
        .take(40)
        .map(|t| {
            serde_json::json!({ "text": format!("{t}, said the review of the film") }).to_string()
        })
        .collect();
    let texts_path = dir.join("texts.jsonl");
    std::fs::write(&texts_path, texts.join("\n")).unwrap();
    Inputs {
        model: repo("models/tests/fixtures/gguf_model_tied.gguf"),
        encoder: repo("reward/tests/fixtures/tiny_bert"),
        reward_data: vec![reward_data.clone()],
        reward_test: vec![reward_data],
        texts: texts_path,
    }
}

fn tiny_settings() -> Settings {
    let mut settings = Settings::demo();
    settings.sft = SftConfig {
        block_size: 16,
        batch_size: 4,
        max_steps: Some(3),
        lora_r: 4,
        lora_alpha: 8.0,
        ..SftConfig::default()
    };
    settings.ppo.ppo.batch_size = 4;
    settings.ppo.ppo.mini_batch_size = 2;
    settings.ppo.ppo.ppo_epochs = 1;
    settings.ppo.run.steps = 2;
    settings.ppo.run.lora_r = 4;
    settings.ppo.run.query_length = LengthRange { min: 2, max: 3 };
    settings.ppo.run.response_length = LengthRange { min: 2, max: 3 };
    settings
}

fn statuses(outcome: &lathe_cli::commands::pipeline::Outcome) -> Vec<(String, String)> {
    outcome
        .stages
        .iter()
        .map(|(s, st, _)| (s.clone(), st.clone()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn the_pipeline_runs_skips_finished_stages_and_redoes_deleted_ones() {
    let root = std::env::temp_dir().join(format!("lathe-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let inputs = tiny_inputs(&root.join("data"));
    let out = root.join("run");
    let settings = tiny_settings();
    let first = run_pipeline(&inputs, &settings, &out, &Device::Cpu, false).unwrap();
    assert_eq!(
        statuses(&first),
        pairs(&[
            ("reward", "ran"),
            ("sft", "ran"),
            ("merged", "ran"),
            ("ppo", "ran")
        ])
    );
    for file in [
        "reward/model.safetensors",
        "sft/adapter_model.safetensors",
        "merged/model.safetensors",
        "merged/tokenizer.json",
        "ppo/adapter_model.safetensors",
        "ppo/report.html",
        "ppo/metrics.jsonl",
        "manifest.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["input_sha256"].as_object().unwrap().len() >= 4);
    assert_eq!(manifest["seed"], 0);

    let again = run_pipeline(&inputs, &settings, &out, &Device::Cpu, false).unwrap();
    assert_eq!(
        statuses(&again),
        pairs(&[
            ("reward", "skipped"),
            ("sft", "skipped"),
            ("merged", "skipped"),
            ("ppo", "skipped")
        ])
    );

    std::fs::remove_dir_all(out.join("sft")).unwrap();
    let redo = run_pipeline(&inputs, &settings, &out, &Device::Cpu, false).unwrap();
    assert_eq!(
        statuses(&redo),
        pairs(&[
            ("reward", "skipped"),
            ("sft", "ran"),
            ("merged", "skipped"),
            ("ppo", "skipped")
        ])
    );
}

/// A rerun with other settings reruns the stages they change and those after them (the
/// old record said "done", the manifest now records the new settings truthfully); a stage
/// whose output no longer parses is rerun, saying why; what is still valid is skipped.
#[test]
fn the_pipeline_reruns_stages_whose_settings_changed_or_whose_output_is_damaged() {
    let root = std::env::temp_dir().join(format!("lathe-pipeline-valid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let inputs = tiny_inputs(&root.join("data"));
    let out = root.join("run");
    let settings = tiny_settings();
    run_pipeline(&inputs, &settings, &out, &Device::Cpu, false).unwrap();

    // Another SFT learning rate: SFT reruns; its adapter differs, so merge and PPO do too.
    let mut other = tiny_settings();
    other.sft.lr = 1e-3;
    let changed = run_pipeline(&inputs, &other, &out, &Device::Cpu, false).unwrap();
    assert_eq!(
        statuses(&changed),
        pairs(&[
            ("reward", "skipped"),
            ("sft", "ran"),
            ("merged", "ran"),
            ("ppo", "ran")
        ])
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["settings"]["sft"]["lr"].as_f64().unwrap() as f32,
        1e-3
    );
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sft/run.json")).unwrap()).unwrap();
    assert_eq!(run_json["config"]["lr"].as_f64().unwrap() as f32, 1e-3);
    assert!(!out.join("sft.previous").exists());

    // A truncated merged model: merge reruns (to the same files, so PPO stays valid).
    let merged = out.join("merged/model.safetensors");
    let bytes = std::fs::read(&merged).unwrap();
    std::fs::write(&merged, &bytes[..bytes.len() / 2]).unwrap();
    let repaired = run_pipeline(&inputs, &other, &out, &Device::Cpu, false).unwrap();
    assert_eq!(
        statuses(&repaired),
        pairs(&[
            ("reward", "skipped"),
            ("sft", "skipped"),
            ("merged", "ran"),
            ("ppo", "skipped")
        ])
    );
    assert_eq!(std::fs::read(&merged).unwrap(), bytes);
}

/// A rerun with changed settings on a full disk (a filled tmpfs; needs root, skipped with a
/// message otherwise): the stage fails naming the full disk and the run folder is exactly as
/// before (the earlier output and its record put back, no temporary left).
#[test]
fn a_stage_rerun_on_a_full_disk_keeps_the_earlier_run() {
    let root = std::env::temp_dir().join(format!("lathe-pipeline-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let inputs = tiny_inputs(&root.join("data"));
    let out = root.join("run");
    std::fs::create_dir_all(&out).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&out)
        .output();
    if !mounted.as_ref().is_ok_and(|o| o.status.success()) {
        println!("SKIPPED: cannot mount a tmpfs (the disk-full test needs root): {mounted:?}");
        eprintln!("SKIPPED: cannot mount a tmpfs (the disk-full test needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(out.clone());
    run_pipeline(&inputs, &tiny_settings(), &out, &Device::Cpu, false).unwrap();
    let snapshot = |dir: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut all = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.file_name().is_some_and(|n| n == ".filler") {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p.clone());
                    all.push((p, Vec::new()));
                } else {
                    all.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        all.sort();
        all
    };
    // Fill the disk.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(out.join(".filler")).unwrap();
        for chunk in [1 << 16, 1 << 12, 1] {
            let bytes = vec![0u8; chunk];
            while filler.write_all(&bytes).is_ok() {}
        }
    }
    let before = snapshot(&out);
    let mut other = tiny_settings();
    other.sft.lr = 1e-3;
    let err = run_pipeline(&inputs, &other, &out, &Device::Cpu, false).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("No space left on device"), "{message}");
    assert!(message.contains("stage sft"), "{message}");
    assert!(
        snapshot(&out) == before,
        "the failed rerun changed the run folder: {message}"
    );
}

/// `--algorithm grpo|dpo`: the third stage is GRPO (on the same reward model) or DPO (on
/// pairs built from the labelled sentences), in its own folder with its adapter, metrics and
/// report; switching the algorithm keeps the finished first stages.
#[test]
fn the_pipeline_runs_grpo_or_dpo_as_its_third_stage() {
    use lathe_cli::commands::pipeline::Algorithm;
    let root = std::env::temp_dir().join(format!("lathe-pipeline-algo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let inputs = tiny_inputs(&root.join("data"));
    let out = root.join("run");
    let mut settings = tiny_settings();
    settings.algorithm = Algorithm::Grpo;
    settings.grpo.num_generations = 2;
    settings.grpo.per_device_train_batch_size = 4;
    settings.grpo.gradient_accumulation_steps = 1;
    settings.grpo.max_completion_length = 3;
    settings.grpo.max_steps = 2;
    settings.grpo.lora_r = 4;
    settings.grpo.prompt_length = LengthRange { min: 2, max: 3 };
    let grpo = run_pipeline(&inputs, &settings, &out, &Device::Cpu, false).unwrap();
    assert_eq!(
        statuses(&grpo),
        pairs(&[
            ("reward", "ran"),
            ("sft", "ran"),
            ("merged", "ran"),
            ("grpo", "ran")
        ])
    );
    let (algorithm, rewards) = grpo.third.as_ref().unwrap();
    assert_eq!(*algorithm, Algorithm::Grpo);
    assert_eq!(rewards.len(), 2);
    assert!(rewards.iter().all(|r| r.is_finite()));
    for file in [
        "grpo/adapter_model.safetensors",
        "grpo/metrics.jsonl",
        "grpo/report.html",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }

    settings.algorithm = Algorithm::Dpo;
    settings.dpo.per_device_train_batch_size = 2;
    settings.dpo.max_steps = Some(2);
    settings.dpo.max_length = 32;
    settings.dpo.lora_r = 4;
    let dpo = run_pipeline(&inputs, &settings, &out, &Device::Cpu, false).unwrap();
    assert_eq!(
        statuses(&dpo),
        pairs(&[
            ("reward", "skipped"),
            ("sft", "skipped"),
            ("merged", "skipped"),
            ("dpo", "ran")
        ])
    );
    let (algorithm, margins) = dpo.third.as_ref().unwrap();
    assert_eq!(*algorithm, Algorithm::Dpo);
    assert_eq!(margins.len(), 2);
    // The first step's policy is the reference (fresh adapters): a zero reward margin; the
    // second step's, after one update, is not.
    assert_eq!(margins[0], 0.0, "{margins:?}");
    assert!(margins[1].is_finite() && margins[1] != 0.0, "{margins:?}");
    for file in [
        "dpo/adapter_model.safetensors",
        "dpo/metrics.jsonl",
        "dpo/report.html",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let _ = std::fs::remove_dir_all(&root);
}
