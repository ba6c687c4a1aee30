//! The data-parallel section of `cargo xtask bench` (`--sections dp`): LoRA SFT of
//! SmolLM2-135M as one process with one thread against `mpirun -np 2` with one thread per
//! rank, on the same machine and the same global batch (8 blocks of 128 tokens a step: one
//! process accumulating 2 micro-batches of 4, or 2 ranks of one each). Reports both
//! throughputs, the scaling efficiency (2-rank tokens/s over twice the 1-process tokens/s)
//! and the bytes each rank receives to sum a step's gradients. Then PPO steps of SmolLM2
//! (8 samples of 8 + 16 tokens, backward batches of 2 minibatches of 2, the tiny DistilBERT
//! reward fixture so that the policy's work dominates) the same two ways. Needs Open MPI and
//! the assets; builds `lathe` with the `mpi` feature.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

const BLOCK: usize = 128;
const BATCH: usize = 4;
/// Steps timed after the first (whose time includes the first touches of every buffer).
const STEPS: usize = 6;

#[derive(Clone, Debug, Serialize)]
pub struct DpRun {
    pub ranks: usize,
    pub threads_per_rank: usize,
    pub tokens_per_step: usize,
    pub tokens_per_s: f64,
    pub seconds_per_step: f64,
    /// Bytes each rank received per step for the gradient sum (0 for one process).
    pub reduced_bytes_per_step: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PpoDpRun {
    pub ranks: usize,
    /// Mean seconds of the steps after the first.
    pub seconds_per_step: f64,
    pub generate_seconds_per_step: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DpSection {
    pub runs: Vec<DpRun>,
    pub ppo: Vec<PpoDpRun>,
    /// 1-process PPO step time / (2 x the 2-rank step time).
    pub ppo_scaling_efficiency: f64,
    /// Whether the two PPO runs logged the same rewards.
    pub ppo_same_rewards: bool,
    /// 2-rank tokens/s / (2 x 1-process tokens/s).
    pub scaling_efficiency: f64,
    /// Whether the two runs logged the same losses (they take the same micro-batches).
    pub same_losses: bool,
}

/// Builds `lathe` with MPI and runs both sides.
pub fn run() -> Result<DpSection> {
    let model = crate::bench_generate::smollm2_present()?;
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "lathe-cli", "--features", "mpi"])
        .current_dir(crate::workspace_root())
        .status()?;
    if !status.success() {
        bail!("building lathe with --features mpi failed (is libopenmpi-dev installed?)");
    }
    let dir = crate::target_dir().join("bench/dp");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("texts.txt");
    std::fs::write(&data, corpus())?;
    let one = side(&model, &data, &dir.join("one"), 1, 2)?;
    let two = side(&model, &data, &dir.join("two"), 2, 1)?;
    let same_losses = column(&dir.join("one"), "loss")? == column(&dir.join("two"), "loss")?;
    let ppo_one = ppo_side(&model, &data, &dir, 1)?;
    let ppo_two = ppo_side(&model, &data, &dir, 2)?;
    let ppo_same_rewards = column(&dir.join("ppo1"), "env/reward_mean")?
        == column(&dir.join("ppo2"), "env/reward_mean")?;
    Ok(DpSection {
        scaling_efficiency: two.tokens_per_s / (2.0 * one.tokens_per_s),
        runs: vec![one, two],
        same_losses,
        ppo_scaling_efficiency: ppo_one.seconds_per_step / (2.0 * ppo_two.seconds_per_step),
        ppo: vec![ppo_one, ppo_two],
        ppo_same_rewards,
    })
}

/// `ranks` processes (plain for 1), one thread each.
fn launcher(ranks: usize) -> Command {
    let lathe = crate::target_dir().join("release/lathe");
    let mut command = if ranks == 1 {
        Command::new(&lathe)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
            .arg(ranks.to_string())
            .args(["-x", "RAYON_NUM_THREADS=1"])
            .arg(&lathe);
        c
    };
    command.env("RAYON_NUM_THREADS", "1");
    command
}

const PPO_STEPS: usize = 3;

/// PPO steps as `ranks` processes; the time of the steps after the first.
fn ppo_side(model: &Path, texts: &Path, dir: &Path, ranks: usize) -> Result<PpoDpRun> {
    let config = dir.join("ppo.toml");
    std::fs::write(
        &config,
        "[ppo]\nbatch_size = 8\nmini_batch_size = 2\ngradient_accumulation_steps = 2\n\
         ppo_epochs = 1\n\n[run]\nquery_length = { min = 8, max = 8 }\n\
         response_length = { min = 16, max = 16 }\nsave_every = 0\n",
    )?;
    let reward = crate::workspace_root().join("reward/tests/fixtures/tiny_distilbert");
    let out = dir.join(format!("ppo{ranks}"));
    let args = [
        "ppo".to_string(),
        "--device".into(),
        "cpu".into(),
        "--model".into(),
        model.display().to_string(),
        "--reward".into(),
        reward.display().to_string(),
        "--data".into(),
        texts.display().to_string(),
        "--config".into(),
        config.display().to_string(),
        "--steps".into(),
        PPO_STEPS.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    println!("dp: {ranks} rank(s) x 1 thread: lathe {}", args.join(" "));
    let status = launcher(ranks).args(&args).status()?;
    if !status.success() {
        bail!("the {ranks}-rank PPO run failed: {status}");
    }
    let steps = column(&out, "time/step_s")?;
    let generate = column(&out, "time/generate_s")?;
    let mean = |v: &[f64]| v[1..].iter().sum::<f64>() / (v.len() - 1) as f64;
    Ok(PpoDpRun {
        ranks,
        seconds_per_step: mean(&steps),
        generate_seconds_per_step: mean(&generate),
    })
}

/// A metric of every step of a run's metrics.jsonl.
fn column(out: &Path, key: &str) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let values: Vec<f64> = text
        .lines()
        .map(|l| -> Result<f64> {
            let v: serde_json::Value = serde_json::from_str(l)?;
            v[key].as_f64().with_context(|| format!("{key} missing"))
        })
        .collect::<Result<_>>()?;
    if values.len() < 2 {
        bail!("{} logged {} steps", out.display(), values.len());
    }
    Ok(values)
}

/// Reviews-like sentences, enough for every step's blocks.
fn corpus() -> String {
    let words = [
        "the", "film", "was", "a", "quiet", "surprise", "with", "a", "story", "that", "stayed",
        "for", "days", "and", "the", "acting", "carried", "every", "scene", "but", "the", "ending",
        "felt", "rushed",
    ];
    (0..600)
        .map(|i| {
            let line: Vec<&str> = (0..40)
                .map(|j| words[(i * 7 + j * 5) % words.len()])
                .collect();
            line.join(" ") + ".\n"
        })
        .collect()
}

/// One side: `ranks` processes (plain for 1, `mpirun` for more), one thread each.
fn side(model: &Path, data: &Path, out: &Path, ranks: usize, grad_accum: usize) -> Result<DpRun> {
    let args: Vec<String> = [
        "sft",
        "--model",
        &model.display().to_string(),
        "--data",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--device",
        "cpu",
        "--block-size",
        &BLOCK.to_string(),
        "--batch-size",
        &BATCH.to_string(),
        "--grad-accum",
        &grad_accum.to_string(),
        "--max-steps",
        &(STEPS + 1).to_string(),
        "--eval-fraction",
        "0",
        "--save-every",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    println!("dp: {ranks} rank(s) x 1 thread: lathe {}", args.join(" "));
    let status = launcher(ranks)
        .args(&args)
        .status()
        .context("starting lathe (mpirun: is Open MPI installed?)")?;
    if !status.success() {
        bail!("the {ranks}-rank run failed: {status}");
    }
    let log = metrics(out)?;
    let (first, last) = (&log[0], &log[log.len() - 1]);
    let seconds = last["elapsed_s"].as_f64().unwrap_or(f64::NAN)
        - first["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    let tokens_per_step = BLOCK * BATCH * grad_accum * ranks;
    let timed_steps = (log.len() - 1) as f64;
    Ok(DpRun {
        ranks,
        threads_per_rank: 1,
        tokens_per_step,
        tokens_per_s: tokens_per_step as f64 * timed_steps / seconds,
        seconds_per_step: seconds / timed_steps,
        reduced_bytes_per_step: last["reduced_bytes"].as_u64().unwrap_or(0),
    })
}

fn metrics(out: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let log: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    if log.len() != STEPS + 1 {
        bail!(
            "{} logged {} steps, not {}",
            out.display(),
            log.len(),
            STEPS + 1
        );
    }
    Ok(log)
}

pub fn markdown(section: &DpSection) -> String {
    let mut md = format!(
        "\n## Data parallel (MPI)\n\nLoRA SFT of SmolLM2-135M (r 16 on q,v), {} tokens a step \
         ({BATCH} blocks of {BLOCK} x 2 micro-batches), on the CPU, one thread per process.\n\n\
         | processes | tokens/s | s/step | bytes received per step (each rank) |\n|---|---|---|---|\n",
        section.runs.first().map_or(0, |r| r.tokens_per_step)
    );
    for r in &section.runs {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} | {} |",
            r.ranks, r.tokens_per_s, r.seconds_per_step, r.reduced_bytes_per_step
        );
    }
    let _ = writeln!(
        md,
        "\nScaling efficiency on 2 ranks: {:.1}%; the same losses on both sides: {}.",
        100.0 * section.scaling_efficiency,
        section.same_losses
    );
    let _ = write!(
        md,
        "\nPPO of SmolLM2 (8 samples of 8 + 16 tokens a step, 2 x 2 minibatches of 2):\n\n\
         | processes | s/step | of it generating |\n|---|---|---|\n"
    );
    for r in &section.ppo {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} |",
            r.ranks, r.seconds_per_step, r.generate_seconds_per_step
        );
    }
    let _ = writeln!(
        md,
        "\nPPO scaling efficiency on 2 ranks: {:.1}%; the same rewards on both sides: {}.",
        100.0 * section.ppo_scaling_efficiency,
        section.ppo_same_rewards
    );
    md
}
