//! The GRPO section of `cargo xtask bench`: one GRPO optimizer step of SmolLM2-135M with a
//! fresh LoRA (r 16, alpha 32, dropout 0.05 on q_proj and v_proj) through
//! `lathe_ppo::grpo::GrpoTrainer`: one generation batch of 8 prompts of 16 tokens × G 4
//! sampled completions of at most 16 tokens (temperature 1, no top-k / top-p filtering, KV
//! cache, stopping at EOS), scored by the "length" reward, group advantages, the reference
//! log-probs (beta 0.04: the adapter-off model), then 4 micro-batches of 8 completions (policy
//! forward, dapo loss, backward), clipping and AdamW on the adapters; with and without gradient
//! checkpointing, on the CPU (and a hardware GPU when found), against trl's GRPOTrainer with
//! peft (`scripts/peer_grpo.py`, same model, prompts, LoRA, sampling and GRPO settings).
//!
//! The generation split: lathe's trainer reports no timings, so a zero-weight "model" reward
//! stands in for the reward model as a probe: it returns zeros (the advantages are the length
//! reward's alone) and its call, right after sampling and decoding, marks the end of the
//! generation; the rest of the step (rewards, advantages, reference forward, training) is
//! "train". trl's side times its own `_generate` (tokenize, `model.generate`, decode).

use std::cell::Cell;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use lathe_core::Device;
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_ppo::grpo::{GrpoConfig, GrpoLoss, GrpoTrainer};
use lathe_ppo::rollout::LengthRange;
use serde::Serialize;

use crate::bench_sft::{reset_peak_rss, status_mib, trim_heap};

/// P: prompts per generation batch.
pub(crate) const PROMPTS: usize = 8;
/// G: completions per prompt (num_generations).
pub(crate) const GENERATIONS: usize = 4;
/// Tokens of each prompt (every text below is exactly this long with SmolLM2's tokenizer).
pub(crate) const PROMPT: usize = 16;
/// max_completion_length (sampling stops earlier at EOS).
pub(crate) const MAX_COMPLETION: usize = 16;
/// per_device_train_batch_size × gradient_accumulation_steps = P × G: one optimizer step
/// covers the whole generation batch.
const MICRO_BATCH: usize = 8;
const ACCUMULATION: usize = 4;
const BETA: f64 = 0.04;
/// trl's default learning rate (GRPOConfig), on both sides.
const LEARNING_RATE: f32 = 1e-6;

/// The prompts, plain text (no chat template on either side); `scripts/peer_grpo.py` holds
/// the same list as its default and the bench passes these.
pub(crate) const PROMPT_TEXTS: [&str; PROMPTS] = [
    "The old lighthouse keeper climbed the narrow stairs every single night to light the lamp and",
    "In the small village by the river, the old baker woke before dawn to prepare",
    "Scientists studying the deep ocean floor have recently discovered a strange and beautiful new kind of",
    "When the train finally arrived at the little station, the tired passengers rushed out onto",
    "My grandmother always said that the real secret to a good soup is patience, and",
    "The committee met on Tuesday to discuss the budget for next year, and soon after",
    "After a long winter, the first warm day of spring brought everyone out to the",
    "The robot looked at the broken vase on the floor and then slowly began to explain",
];

#[derive(Clone, Debug, Serialize)]
pub struct GrpoRow {
    pub device: String,
    pub gradient_checkpointing: bool,
    pub best_s: f64,
    pub median_s: f64,
    pub step_times_s: Vec<f64>,
    /// Sampling and decoding of each timed step (up to the reward probe's call).
    pub generate_times_s: Vec<f64>,
    pub generate_median_s: f64,
    /// Step minus generation, median over the timed steps.
    pub train_median_s: f64,
    pub completions_per_s: f64,
    /// Completion tokens per completion (through the first EOS), mean of the timed steps.
    pub mean_completion_len: f64,
    pub peer_best_s: Option<f64>,
    pub peer_completions_per_s: Option<f64>,
    pub peer_generate_median_s: Option<f64>,
    pub peer_mean_completion_len: Option<f64>,
    /// lathe completions/s / peer completions/s: above 1, lathe is faster.
    pub ratio_vs_peer: Option<f64>,
    /// Peak resident set during the steps above the set before them, MiB (CPU rows, where the
    /// kernel lets the peak be reset).
    pub step_peak_rss_mib: Option<f64>,
    /// Resident set the built trainer holds above the process before loading, MiB (CPU
    /// rows): one model (no value head; the reference is the same weights, adapters off),
    /// the adapters and their Adam moments.
    pub held_rss_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GrpoSection {
    pub prompts: usize,
    pub num_generations: usize,
    pub prompt_len: usize,
    pub max_completion_length: usize,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub warmup: usize,
    pub runs: usize,
    /// Whether lathe's tokenization of the prompts is the peer's (token for token).
    pub prompts_match_peer: Option<bool>,
    pub rows: Vec<GrpoRow>,
    /// Each row's best step (generation included): GFLOP counted, against `gemm_peak_gflops`.
    pub work: Vec<crate::work::Work>,
    pub gemm_peak_gflops: f64,
    pub peer: serde_json::Value,
    /// The same peer with gradient checkpointing (the checkpointing rows' comparison).
    pub peer_checkpointing: serde_json::Value,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// What the timed steps of one configuration measured.
struct Measured {
    step_times: Vec<f64>,
    /// GFLOP counted during each timed step.
    step_gflop: Vec<f64>,
    generate_times: Vec<f64>,
    mean_completion_len: f64,
    step_peak_rss_mib: Option<f64>,
    held_rss_mib: Option<f64>,
    prompt_ids: Vec<Vec<u32>>,
}

fn measure(
    model_path: &Path,
    device: &Device,
    checkpointing: bool,
    warmup: usize,
    runs: usize,
) -> Result<Measured> {
    trim_heap();
    let rss_start = status_mib("VmRSS:");
    let pretrained = Pretrained::load(model_path, device, Precision::F32)?;
    let tokenizer = pretrained.tokenizer;
    let texts: Vec<Vec<u32>> = PROMPT_TEXTS
        .iter()
        .map(|t| tokenizer.encode(t, true))
        .collect::<std::result::Result<_, _>>()?;
    if let Some((t, ids)) = PROMPT_TEXTS
        .iter()
        .zip(&texts)
        .find(|(_, ids)| ids.len() != PROMPT)
    {
        bail!("{t:?} is {} tokens, not {PROMPT}", ids.len());
    }
    let strings: Vec<String> = PROMPT_TEXTS.iter().map(|t| t.to_string()).collect();
    let prompts = lathe_ppo::Prompts::cut_from_texts(&tokenizer, &strings)?;
    let config = GrpoConfig {
        num_generations: GENERATIONS,
        max_completion_length: MAX_COMPLETION,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        beta: BETA,
        loss_type: GrpoLoss::Dapo,
        num_iterations: 1,
        // "model" is the zero-weight timing probe (the module docs).
        reward_funcs: vec!["length".into(), "model".into()],
        reward_weights: Some(vec![1.0, 0.0]),
        learning_rate: LEARNING_RATE,
        per_device_train_batch_size: MICRO_BATCH,
        gradient_accumulation_steps: ACCUMULATION,
        max_steps: warmup + runs,
        gradient_checkpointing: checkpointing,
        prompt_length: LengthRange {
            min: PROMPT,
            max: PROMPT,
        },
        lora_r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..GrpoConfig::default()
    };
    assert_eq!(config.generation_batch(), PROMPTS * GENERATIONS);
    let mut trainer = GrpoTrainer::new(pretrained.model, None, &config, &tokenizer, device)?;
    let scored_at: Cell<Option<Instant>> = Cell::new(None);
    let mut probe = |texts: &[String]| -> lathe_ppo::Result<Vec<f32>> {
        scored_at.set(Some(Instant::now()));
        Ok(vec![0.0; texts.len()])
    };
    trim_heap();
    let rss_before = status_mib("VmRSS:");
    // What the trainer holds between steps: one model (the reference is the same weights
    // with the adapters off), the adapters and their optimizer state.
    let held_mib = match (device.is_gpu(), rss_start, rss_before) {
        (false, Some(start), Some(held)) => Some(held - start),
        _ => None,
    };
    let peak_reset = !device.is_gpu() && reset_peak_rss();
    let (mut step_times, mut generate_times, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
    let mut step_gflop = Vec::new();
    for step in 0..warmup + runs {
        scored_at.set(None);
        let flops = crate::work::flops_now();
        let start = Instant::now();
        let stats = trainer.step(&prompts, &tokenizer, &mut probe)?;
        device.sync()?;
        let elapsed = start.elapsed().as_secs_f64();
        let Some(scored) = scored_at.get() else {
            bail!("step {step} did not generate");
        };
        if step >= warmup {
            step_times.push(elapsed);
            step_gflop.push(crate::work::gflop_since(flops));
            generate_times.push(scored.duration_since(start).as_secs_f64());
            lengths.push(stats.get("completions/mean_length"));
        }
    }
    let step_peak_rss_mib = match (peak_reset, rss_before, status_mib("VmHWM:")) {
        (true, Some(before), Some(peak)) => Some(peak - before),
        _ => None,
    };
    Ok(Measured {
        step_times,
        step_gflop,
        generate_times,
        mean_completion_len: lengths.iter().sum::<f64>() / lengths.len() as f64,
        step_peak_rss_mib,
        held_rss_mib: held_mib,
        prompt_ids: texts,
    })
}

pub fn run(
    devices: &[(Device, String)],
    threads: usize,
    warmup: usize,
    runs: usize,
    peer_python: Option<&Path>,
) -> Result<GrpoSection> {
    let model_path = crate::bench_generate::smollm2_present()?;
    let runs = runs.max(1);
    let mut rows = Vec::new();
    let mut work = Vec::new();
    let mut prompt_ids = Vec::new();
    for (device, label) in devices {
        for checkpointing in [false, true] {
            let m = lathe_core::on_cpu_pool(|| {
                measure(&model_path, device, checkpointing, warmup, runs)
            })?;
            let (best, median_s) = (
                m.step_times.iter().copied().fold(f64::INFINITY, f64::min),
                median(&m.step_times),
            );
            let train: Vec<f64> = m
                .step_times
                .iter()
                .zip(&m.generate_times)
                .map(|(s, g)| s - g)
                .collect();
            let completions_per_s = (PROMPTS * GENERATIONS) as f64 / best;
            let timed: crate::work::Runs = m
                .step_times
                .iter()
                .copied()
                .zip(m.step_gflop.iter().copied())
                .collect();
            let case = format!(
                "{label}{}",
                if checkpointing { " checkpointing" } else { "" }
            );
            work.extend(crate::work::Work::best(case, !device.is_gpu(), &timed));
            eprintln!(
                "  grpo {label:>4}{}: {best:.3} s/step ({completions_per_s:.2} completions/s, generation {:.3} s)",
                if checkpointing { " +checkpointing" } else { "" },
                median(&m.generate_times)
            );
            rows.push(GrpoRow {
                device: label.clone(),
                gradient_checkpointing: checkpointing,
                best_s: best,
                median_s,
                generate_median_s: median(&m.generate_times),
                train_median_s: median(&train),
                step_times_s: m.step_times,
                generate_times_s: m.generate_times,
                completions_per_s,
                mean_completion_len: m.mean_completion_len,
                peer_best_s: None,
                peer_completions_per_s: None,
                peer_generate_median_s: None,
                peer_mean_completion_len: None,
                ratio_vs_peer: None,
                step_peak_rss_mib: m.step_peak_rss_mib,
                held_rss_mib: m.held_rss_mib,
            });
            prompt_ids = m.prompt_ids;
        }
    }
    // The peer without and with gradient checkpointing: each row is compared with its like.
    let run_peer_case = |checkpointing: bool| {
        crate::peer::or_skipped(
            peer_python,
            "no trl 1.16 peer python (LATHE_PEER_GRPO_PYTHON)",
            |python| run_peer(python, &model_path, threads, warmup, runs, checkpointing),
        )
    };
    let peer = run_peer_case(false);
    let peer_checkpointing = run_peer_case(true);
    for row in &mut rows {
        let like = if row.gradient_checkpointing {
            &peer_checkpointing
        } else {
            &peer
        };
        if let Some(cps) = like["completions_per_s"].as_f64() {
            row.peer_best_s = like["best_s"].as_f64();
            row.peer_completions_per_s = Some(cps);
            row.peer_generate_median_s = like["generate_median_s"].as_f64();
            row.peer_mean_completion_len = like["mean_completion_len"].as_f64();
            row.ratio_vs_peer = Some(row.completions_per_s / cps);
        }
    }
    let prompts_match_peer = peer
        .get("prompt_ids")
        .and_then(|ids| serde_json::from_value::<Vec<Vec<u32>>>(ids.clone()).ok())
        .map(|ids| ids == prompt_ids);
    Ok(GrpoSection {
        prompts: PROMPTS,
        num_generations: GENERATIONS,
        prompt_len: PROMPT,
        max_completion_length: MAX_COMPLETION,
        per_device_train_batch_size: MICRO_BATCH,
        gradient_accumulation_steps: ACCUMULATION,
        warmup,
        runs,
        prompts_match_peer,
        rows,
        work,
        gemm_peak_gflops: crate::bench::cpu_gemm_peak()?,
        peer,
        peer_checkpointing,
    })
}

fn run_peer(
    python: &Path,
    model: &Path,
    threads: usize,
    warmup: usize,
    runs: usize,
    checkpointing: bool,
) -> Result<serde_json::Value> {
    let mut args = crate::peer::flags(&[
        ("model", model.display().to_string()),
        ("prompts-json", serde_json::to_string(&PROMPT_TEXTS)?),
        ("num-generations", GENERATIONS.to_string()),
        ("prompt-len", PROMPT.to_string()),
        ("max-completion-length", MAX_COMPLETION.to_string()),
        ("micro-batch", MICRO_BATCH.to_string()),
        ("accumulation", ACCUMULATION.to_string()),
        ("beta", BETA.to_string()),
        ("lr", LEARNING_RATE.to_string()),
        ("threads", threads.to_string()),
        ("steps", runs.to_string()),
        ("warmup", warmup.to_string()),
    ]);
    if checkpointing {
        args.push("--gradient-checkpointing".into());
    }
    crate::peer::run_script(python, "peer_grpo.py", &args, threads)
}

pub fn markdown(section: &GrpoSection) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## GRPO step: SmolLM2-135M, {PROMPTS} prompts of {PROMPT} tokens × G {GENERATIONS}, completions of at most {MAX_COMPLETION} tokens, {MICRO_BATCH} × {ACCUMULATION} micro-batches, r 16 on q,v, beta {BETA}, dapo, length reward (best of {} runs after {} warm-up)\n",
        section.runs, section.warmup
    );
    let describe = |peer: &serde_json::Value, what: &str| {
        let extra = format!(
            "; `_generate` {:.3}, generate and score {:.3}",
            peer["generate_median_s"].as_f64().unwrap_or(f64::NAN),
            peer["generate_and_score_median_s"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
        crate::peer::describe_trl(peer, "GRPOTrainer", what, &extra)
    };
    let _ = writeln!(
        s,
        "{}\n\n{}\n",
        describe(&section.peer, ""),
        describe(&section.peer_checkpointing, " with gradient checkpointing")
    );
    let _ = writeln!(
        s,
        "generation: sampling and decoding (lathe: up to a zero-weight probe reward's call; trl: `_generate`), median s per step; train: the rest of the step. Completion length: mean tokens through EOS (sampling: the two sides' lengths differ by chance).{}\n",
        match section.prompts_match_peer {
            Some(true) => " The prompts tokenize to the same ids on both sides.",
            Some(false) => " The prompts tokenize DIFFERENTLY on the two sides.",
            None => "",
        }
    );
    let _ = writeln!(
        s,
        "| device | checkpointing | s/step | median | generation | train | completions/s | completion len | peer s/step | peer generation | peer completion len | peer completions/s (same checkpointing) | ratio | held RSS MiB | step peak RSS MiB |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &section.rows {
        let opt = |v: Option<f64>, prec: usize, suffix: &str| {
            v.map_or("-".into(), |v| format!("{v:.prec$}{suffix}"))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            r.device,
            crate::peer::yes_no(r.gradient_checkpointing),
            r.best_s,
            r.median_s,
            r.generate_median_s,
            r.train_median_s,
            r.completions_per_s,
            r.mean_completion_len,
            opt(r.peer_best_s, 3, ""),
            opt(r.peer_generate_median_s, 3, ""),
            opt(r.peer_mean_completion_len, 1, ""),
            opt(r.peer_completions_per_s, 2, ""),
            opt(r.ratio_vs_peer, 2, "x"),
            opt(r.held_rss_mib, 0, ""),
            opt(r.step_peak_rss_mib, 0, "")
        );
    }
    s.push_str(&crate::work::markdown(
        "The best step of each row, generation included",
        "case",
        &section.work,
        section.gemm_peak_gflops,
    ));
    s
}
