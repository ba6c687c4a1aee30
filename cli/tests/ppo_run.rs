//! `lathe ppo`'s run on the tiny random Llama GGUF fixture with a reward closure: outputs
//! (metrics, samples, adapter, value head, report), an interrupted run resuming exactly,
//! and the HTML report rendered by a real headless browser (Debian's chromium).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use lathe_cli::commands::ppo::{train, PpoFile};
use lathe_core::Device;
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_ppo::rollout::LengthRange;
use lathe_ppo::Prompts;

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/gguf_model_tied.gguf")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-ppo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn texts() -> Vec<String> {
    [
        "The film was great",
        "A slow, boring plot",
        "Actors did well here",
        "Bad",
        "I loved it",
    ]
    .map(String::from)
    .to_vec()
}

/// Five times the share of characters below code point 80 (digits, capitals, punctuation).
fn score(texts: &[String]) -> lathe_ppo::Result<Vec<f32>> {
    Ok(texts
        .iter()
        .map(|t| {
            let n = t.chars().count().max(1) as f32;
            5.0 * t.chars().filter(|&c| (c as u32) < 80).count() as f32 / n
        })
        .collect())
}

fn settings(steps: usize) -> PpoFile {
    let mut file = PpoFile::default();
    file.ppo.batch_size = 8;
    file.ppo.mini_batch_size = 4;
    file.ppo.ppo_epochs = 2;
    file.ppo.learning_rate = 1e-3;
    file.ppo.seed = 4;
    file.run.steps = steps;
    file.run.save_every = 2;
    file.run.query_length = LengthRange { min: 2, max: 4 };
    file.run.response_length = LengthRange { min: 2, max: 5 };
    file.run.lora_r = 4;
    file.run.lora_alpha = 8.0;
    file
}

fn run(
    out: &Path,
    steps: usize,
    stop_after: Option<usize>,
) -> lathe_cli::commands::ppo::PpoSummary {
    let pretrained = Pretrained::load(&fixture_model(), &Device::Cpu, Precision::F32).unwrap();
    let mut reward = score;
    let prompts = Prompts::cut_from_texts(&pretrained.tokenizer, &texts()).unwrap();
    train(
        pretrained.model,
        &pretrained.tokenizer,
        prompts,
        &mut reward,
        &settings(steps),
        out,
        &Device::Cpu,
        &AtomicBool::new(false),
        stop_after,
    )
    .unwrap()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A metrics line without its wall-clock timings.
fn without_times(mut v: serde_json::Value) -> serde_json::Value {
    let map = v.as_object_mut().unwrap();
    map.retain(|k, _| !k.starts_with("time/"));
    v
}

#[test]
fn a_run_writes_its_outputs_and_resumes_exactly() {
    let straight = scratch("straight");
    let summary = run(&straight, 5, None);
    assert_eq!(summary.steps_done, 5);
    for file in [
        "metrics.jsonl",
        "samples.jsonl",
        "adapter_config.json",
        "adapter_model.safetensors",
        "value_head.safetensors",
        "run.json",
        "report.html",
        "plot_reward.png",
        "plot_kl.png",
        "plot_entropy.png",
        "plot_losses.png",
    ] {
        assert!(straight.join(file).is_file(), "{file} missing");
    }
    let metrics = lines(&straight.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 5);
    for key in [
        "objective/kl",
        "objective/kl_coef",
        "objective/entropy",
        "ppo/mean_scores",
        "ppo/mean_non_score_reward",
        "ppo/loss/policy",
        "ppo/loss/value",
        "ppo/loss/total",
        "ppo/policy/entropy",
        "ppo/policy/approxkl",
        "ppo/policy/policykl",
        "ppo/policy/clipfrac",
        "ppo/returns/mean",
        "ppo/returns/var",
        "ppo/val/vpred",
        "ppo/val/error",
        "ppo/val/clipfrac",
        "ppo/val/var_explained",
        "env/reward_mean",
        "env/reward_std",
    ] {
        assert!(metrics[0][key].is_number(), "metrics lack {key}");
    }
    assert_eq!(lines(&straight.join("samples.jsonl")).len(), 5 * 8);

    // Interrupted after step 3 (last checkpoint: step 2), then rerun.
    let resumed = scratch("resumed");
    run(&resumed, 5, Some(3));
    let again = run(&resumed, 5, None);
    assert_eq!(again.resumed_from, Some(2));
    let a: Vec<_> = lines(&straight.join("metrics.jsonl"))
        .into_iter()
        .map(without_times)
        .collect();
    let b: Vec<_> = lines(&resumed.join("metrics.jsonl"))
        .into_iter()
        .map(without_times)
        .collect();
    assert_eq!(a, b);
    assert_eq!(
        std::fs::read(straight.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(resumed.join("adapter_model.safetensors")).unwrap()
    );
    assert_eq!(
        lines(&straight.join("samples.jsonl")),
        lines(&resumed.join("samples.jsonl"))
    );
}

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("the report test needs Debian's chromium: apt-get install -y chromium")
}

#[test]
fn the_report_renders_in_a_headless_browser() {
    let out = scratch("report");
    run(&out, 3, None);
    let page = out.join("report.html");
    let browser = |args: &[&str]| {
        let output = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
            ])
            .args(args)
            .arg(format!("file://{}", page.display()))
            .output()
            .expect("chromium runs");
        assert!(
            output.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    };
    // The DOM after parsing: four plots with their series, the summary and sample tables.
    let dom = String::from_utf8(browser(&["--dump-dom"]).stdout).unwrap();
    assert_eq!(dom.matches("<svg").count(), 4, "{dom}");
    assert!(dom.contains("data-key=\"env/reward_mean\""));
    assert!(dom.contains("data-key=\"ppo/loss/value\""));
    assert!(dom.contains("id=\"summary\""));
    assert_eq!(dom.matches("class=\"samples\"").count(), 2);
    // A screenshot: a real PNG, not blank.
    let shot = out.join("shot.png");
    browser(&[
        "--window-size=1280,900",
        &format!("--screenshot={}", shot.display()),
    ]);
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        png.len() > 10_000,
        "the screenshot is suspiciously small: {} bytes",
        png.len()
    );
}

/// The binary end to end: `lathe ppo` with a reward-model directory (the tiny random
/// DistilBERT classifier of lathe-reward's fixtures), a TOML config overridden by flags,
/// then `lathe report` on the run.
#[test]
fn the_ppo_command_runs_with_a_reward_model_directory() {
    let out = scratch("cli");
    std::fs::create_dir_all(&out).unwrap();
    let data = out.join("texts.jsonl");
    let records: Vec<String> = texts()
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string())
        .collect();
    std::fs::write(&data, records.join("\n")).unwrap();
    let config = out.join("ppo.toml");
    std::fs::write(
        &config,
        "[ppo]\nbatch_size = 4\nmini_batch_size = 2\nppo_epochs = 1\nlearning_rate = 1e-3\n\n\
         [run]\nsteps = 99\nlora_r = 4\nlora_alpha = 8.0\nquery_length = { min = 2, max = 3 }\n\
         response_length = { min = 2, max = 4 }\n",
    )
    .unwrap();
    let reward =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../reward/tests/fixtures/tiny_distilbert");
    let run_dir = out.join("run");
    let status = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(["ppo", "--device", "cpu", "--model"])
        .arg(fixture_model())
        .arg("--reward")
        .arg(&reward)
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .args(["--steps", "2"])
        .arg("--out")
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(
        lines(&run_dir.join("metrics.jsonl")).len(),
        2,
        "--steps overrides the file"
    );
    assert_eq!(lines(&run_dir.join("samples.jsonl")).len(), 2 * 4);
    std::fs::remove_file(run_dir.join("report.html")).unwrap();
    let report = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .arg("report")
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(report.status.success());
    assert!(run_dir.join("report.html").is_file());
    // A config with a key trl does not have is refused, naming it.
    std::fs::write(&config, "[ppo]\nbatch_sise = 4\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(["ppo", "--device", "cpu", "--model"])
        .arg(fixture_model())
        .arg("--reward")
        .arg(&reward)
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(out.join("bad"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("batch_sise"), "{err}");
}
