//! The data-parallel section of `cargo xtask bench` (`--sections dp`): LoRA SFT of
//! SmolLM2-135M as one process with one thread against `mpirun -np 2` with one thread per
//! rank, on the same machine and the same global batch (8 blocks of 128 tokens a step: one
//! process accumulating 2 micro-batches of 4, or 2 ranks of one each). Reports both
//! throughputs, the scaling efficiency (2-rank tokens/s over twice the 1-process tokens/s)
//! and the bytes each rank receives to sum a step's gradients. Needs Open MPI and the
//! assets; builds `lathe` with the `mpi` feature.

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
pub struct DpSection {
    pub runs: Vec<DpRun>,
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
    let same_losses = losses(&dir.join("one"))? == losses(&dir.join("two"))?;
    Ok(DpSection {
        scaling_efficiency: two.tokens_per_s / (2.0 * one.tokens_per_s),
        runs: vec![one, two],
        same_losses,
    })
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
    let lathe = crate::target_dir().join("release/lathe");
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
    println!("dp: {ranks} rank(s) x 1 thread: lathe {}", args.join(" "));
    let status = command
        .args(&args)
        .env("RAYON_NUM_THREADS", "1")
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

fn losses(out: &Path) -> Result<Vec<f64>> {
    Ok(metrics(out)?
        .iter()
        .map(|m| m["loss"].as_f64().unwrap_or(f64::NAN))
        .collect())
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
    md
}
