//! The DPO section of `cargo xtask bench`: one DPO optimizer step (policy and reference
//! forward, sigmoid loss with beta 0.1, backward, clipping, AdamW on the adapters) of
//! SmolLM2-135M with a fresh LoRA (r 16, alpha 32, dropout 0.05 on q_proj and v_proj) on 8
//! synthetic pairs (a 16-token prompt, 48-token chosen and rejected completions), through
//! `lathe_train::dpo::DpoTrainer`, with and without gradient checkpointing, on the CPU (and a
//! hardware GPU when found), against trl's DPOTrainer with peft (`scripts/peer_dpo.py`, same
//! model, pairs, LoRA and DPO settings; the reference is the adapter-off model on both sides).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use lathe_core::{Device, Rng};
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_train::dpo::{DpoConfig, DpoLoss, DpoTrainer, TokenPair};
use serde::Serialize;

use crate::bench_sft::{reset_peak_rss, status_mib, trim_heap};

/// B: preference pairs per step.
pub(crate) const PAIRS: usize = 8;
/// P: prompt tokens of each pair.
pub(crate) const PROMPT: usize = 16;
/// C: tokens of each completion (chosen and rejected).
pub(crate) const COMPLETION: usize = 48;
const BETA: f64 = 0.1;
/// trl's default learning rate (DPOConfig), on both sides.
const LEARNING_RATE: f32 = 1e-6;

#[derive(Clone, Debug, Serialize)]
pub struct DpoRow {
    pub device: String,
    pub gradient_checkpointing: bool,
    pub best_s: f64,
    pub median_s: f64,
    pub step_times_s: Vec<f64>,
    pub pairs_per_s: f64,
    pub peer_best_s: Option<f64>,
    pub peer_pairs_per_s: Option<f64>,
    /// lathe pairs/s / peer pairs/s: above 1, lathe is faster.
    pub ratio_vs_peer: Option<f64>,
    /// Peak resident set during the steps above the set before them, MiB (CPU rows, where the
    /// kernel lets the peak be reset).
    pub step_peak_rss_mib: Option<f64>,
    /// Resident set the built trainer holds above the process before loading, MiB (CPU
    /// rows): one model (the reference is the same weights, adapters off), the adapters
    /// and their Adam moments.
    pub held_rss_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DpoSection {
    pub pairs: usize,
    pub prompt_len: usize,
    pub completion_len: usize,
    pub warmup: usize,
    pub runs: usize,
    pub rows: Vec<DpoRow>,
    /// Each row's best step: GFLOP counted, against `gemm_peak_gflops`.
    pub work: Vec<crate::work::Work>,
    pub gemm_peak_gflops: f64,
    pub peer: serde_json::Value,
    /// The same peer with gradient checkpointing (the checkpointing rows' comparison).
    pub peer_checkpointing: serde_json::Value,
}

/// B seeded pairs of uniform random token ids: prompt P, chosen and rejected C tokens each.
fn pairs(vocab: u64) -> Vec<TokenPair> {
    let mut rng = Rng::new(0);
    let mut draw =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect() };
    (0..PAIRS)
        .map(|_| TokenPair {
            prompt: draw(PROMPT),
            chosen: draw(COMPLETION),
            rejected: draw(COMPLETION),
        })
        .collect()
}

/// (seconds, GFLOP counted) of each step (`runs` timed after `warmup` untimed), the steps'
/// peak RSS growth and the RSS the trainer holds.
fn measure(
    model_path: &Path,
    device: &Device,
    checkpointing: bool,
    warmup: usize,
    runs: usize,
) -> Result<(crate::work::Runs, Option<f64>, Option<f64>)> {
    trim_heap();
    let rss_start = status_mib("VmRSS:");
    let mut pretrained = Pretrained::load(model_path, device, Precision::F32)?;
    let pad = pretrained.tokenizer.eos_id().unwrap_or(0);
    let pairs = pairs(pretrained.model.config().vocab_size() as u64);
    let config = DpoConfig {
        beta: BETA,
        loss_type: DpoLoss::Sigmoid,
        learning_rate: LEARNING_RATE,
        per_device_train_batch_size: PAIRS,
        gradient_accumulation_steps: 1,
        max_steps: Some(warmup + runs),
        precompute_ref_log_probs: false,
        gradient_checkpointing: checkpointing,
        lora_r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..DpoConfig::default()
    };
    let mut trainer = DpoTrainer::new(&mut pretrained.model, &pairs, &config, pad, device)?;
    trim_heap();
    let rss_before = status_mib("VmRSS:");
    // What the trainer holds between steps: one model (the reference is the same weights
    // with the adapters off), the adapters and their optimizer state.
    let held_mib = match (device.is_gpu(), rss_start, rss_before) {
        (false, Some(start), Some(held)) => Some(held - start),
        _ => None,
    };
    let peak_reset = !device.is_gpu() && reset_peak_rss();
    let mut timed = Vec::with_capacity(runs);
    for step in 0..warmup + runs {
        let flops = crate::work::flops_now();
        let start = Instant::now();
        trainer.step()?;
        device.sync()?;
        if step >= warmup {
            timed.push((
                start.elapsed().as_secs_f64(),
                crate::work::gflop_since(flops),
            ));
        }
    }
    let step_peak = match (peak_reset, rss_before, status_mib("VmHWM:")) {
        (true, Some(before), Some(peak)) => Some(peak - before),
        _ => None,
    };
    Ok((timed, step_peak, held_mib))
}

pub fn run(
    devices: &[(Device, String)],
    threads: usize,
    warmup: usize,
    runs: usize,
    peer_python: Option<&Path>,
) -> Result<DpoSection> {
    let model_path = crate::bench_generate::smollm2_present()?;
    let runs = runs.max(1);
    let mut rows = Vec::new();
    let mut work = Vec::new();
    for (device, label) in devices {
        for checkpointing in [false, true] {
            let (timed, step_peak_rss_mib, held_rss_mib) = lathe_core::on_cpu_pool(|| {
                measure(&model_path, device, checkpointing, warmup, runs)
            })?;
            let case = format!(
                "{label}{}",
                if checkpointing { " checkpointing" } else { "" }
            );
            work.extend(crate::work::Work::best(case, !device.is_gpu(), &timed));
            let times: Vec<f64> = timed.iter().map(|t| t.0).collect();
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            let (best, median) = (sorted[0], sorted[sorted.len() / 2]);
            let pairs_per_s = PAIRS as f64 / best;
            eprintln!(
                "  dpo  {label:>4}{}: {best:.3} s/step ({pairs_per_s:.2} pairs/s)",
                if checkpointing { " +checkpointing" } else { "" }
            );
            rows.push(DpoRow {
                device: label.clone(),
                gradient_checkpointing: checkpointing,
                best_s: best,
                median_s: median,
                step_times_s: times,
                pairs_per_s,
                peer_best_s: None,
                peer_pairs_per_s: None,
                ratio_vs_peer: None,
                step_peak_rss_mib,
                held_rss_mib,
            });
        }
    }
    // The peer without and with gradient checkpointing: each row is compared with its like.
    let run_peer_case = |checkpointing: bool| {
        crate::peer::or_skipped(
            peer_python,
            "no trl 1.16 peer python (LATHE_PEER_DPO_PYTHON)",
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
        if let Some(pps) = like["pairs_per_s"].as_f64() {
            row.peer_best_s = like["best_s"].as_f64();
            row.peer_pairs_per_s = Some(pps);
            row.ratio_vs_peer = Some(row.pairs_per_s / pps);
        }
    }
    Ok(DpoSection {
        pairs: PAIRS,
        prompt_len: PROMPT,
        completion_len: COMPLETION,
        warmup,
        runs,
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
        ("pairs", PAIRS.to_string()),
        ("prompt-len", PROMPT.to_string()),
        ("completion-len", COMPLETION.to_string()),
        ("lr", LEARNING_RATE.to_string()),
        ("threads", threads.to_string()),
        ("steps", runs.to_string()),
        ("warmup", warmup.to_string()),
    ]);
    if checkpointing {
        args.push("--gradient-checkpointing".into());
    }
    crate::peer::run_script(python, "peer_dpo.py", &args, threads)
}

pub fn markdown(section: &DpoSection) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## DPO step: SmolLM2-135M, {PAIRS} pairs of {PROMPT} + {COMPLETION} tokens, r 16 on q,v, beta {BETA}, sigmoid (best of {} runs after {} warm-up)\n",
        section.runs, section.warmup
    );
    let describe = |peer: &serde_json::Value, what: &str| {
        crate::peer::describe_trl(peer, "DPOTrainer", what, "")
    };
    let _ = writeln!(
        s,
        "{}\n\n{}\n",
        describe(&section.peer, ""),
        describe(&section.peer_checkpointing, " with gradient checkpointing")
    );
    let _ = writeln!(
        s,
        "| device | checkpointing | s/step | median | pairs/s | peer s/step | peer pairs/s (same checkpointing) | ratio | held RSS MiB | step peak RSS MiB |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &section.rows {
        let opt = |v: Option<f64>, prec: usize, suffix: &str| {
            v.map_or("-".into(), |v| format!("{v:.prec$}{suffix}"))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.2} | {} | {} | {} | {} | {} |",
            r.device,
            crate::peer::yes_no(r.gradient_checkpointing),
            r.best_s,
            r.median_s,
            r.pairs_per_s,
            opt(r.peer_best_s, 3, ""),
            opt(r.peer_pairs_per_s, 2, ""),
            opt(r.ratio_vs_peer, 2, "x"),
            opt(r.held_rss_mib, 0, ""),
            opt(r.step_peak_rss_mib, 0, "")
        );
    }
    s.push_str(&crate::work::markdown(
        "The best step of each row",
        "case",
        &section.work,
        section.gemm_peak_gflops,
    ));
    s
}
