//! The SFT section of `cargo xtask bench`: one LoRA training step (forward, backward, AdamW
//! on the adapters) of SmolLM2-135M on 16 x 24 random tokens, r 16 on q_proj and v_proj,
//! f32 and LLM.int8 bases, on the CPU (and a hardware GPU when found), against peft on
//! transformers (`scripts/peer_sft.py`, same model, batch, LoRA and optimizer).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use lathe_core::optim::{Adam, AdamConfig};
use lathe_core::Device;
use lathe_core::Rng;
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::plan::{plan, Job, PlanSettings};
use lathe_models::pretrained::{Precision, Pretrained};
use serde::Serialize;

pub(crate) const BATCH: usize = 16;
pub(crate) const SEQ: usize = 24;

#[derive(Clone, Debug, Serialize)]
pub struct SftRow {
    pub device: String,
    pub base: String,
    pub gradient_checkpointing: bool,
    pub best_s: f64,
    pub median_s: f64,
    pub tokens_per_s: f64,
    pub peer_tokens_per_s: Option<f64>,
    pub ratio_vs_peer: Option<f64>,
    /// The GPU ledger's peak bytes by category during the steps (GPU rows only).
    pub gpu_peak_bytes: Option<Vec<(String, u64)>>,
    /// Resident memory by category (CPU rows only).
    pub cpu_memory: Option<CpuMemory>,
}

/// Where a CPU row's resident memory went, MiB. The adapter and optimizer figures are exact
/// (f32 parameters, Adam's two moments); the others come from the process' resident set.
#[derive(Clone, Debug, Serialize)]
pub struct CpuMemory {
    /// Growth of the resident set (free heap trimmed before and after) while loading the
    /// model, less adapters and optimizer: the base weights.
    pub weights_mib: f64,
    /// Growth of the resident set while the frozen f32 weights were packed for the forward
    /// (`CausalLm::pack_frozen_weights`), and the plan's figure for it.
    pub packed_mib: f64,
    pub planned_packed_mib: f64,
    pub adapters_mib: f64,
    pub optimizer_mib: f64,
    /// Peak resident set during the timed steps above the set before them: activations,
    /// gradients and scratch (None where the kernel cannot reset the peak).
    pub step_peak_mib: Option<f64>,
    /// `lathe plan`'s prediction for the row: the weights, and what the steps add (gradients,
    /// activations, logits, scratch), MiB.
    pub planned_weights_mib: f64,
    pub planned_steps_mib: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SftSection {
    pub rows: Vec<SftRow>,
    /// Peak resident memory of this process (all CPU rows; VmHWM), MiB.
    pub process_peak_rss_mib: Option<f64>,
    pub peer: serde_json::Value,
    /// The same peer with gradient checkpointing (the checkpointing rows' comparison).
    pub peer_checkpointing: serde_json::Value,
    /// Each row's best step: GFLOP counted, against `gemm_peak_gflops`.
    pub work: Vec<crate::work::Work>,
    pub gemm_peak_gflops: f64,
}

/// A field of /proc/self/status (VmRSS: current, VmHWM: peak resident set) in MiB.
pub(crate) fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The larger of two optional figures.
fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.into_iter().chain(b).reduce(f64::max)
}

fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// Resets the peak resident set to the current one (Linux: 5 > clear_refs).
pub(crate) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Hands the allocator's free memory back to the kernel, so that the resident set counts
/// live data only and rows measured one after another do not hide each other's growth.
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim takes any pad and only releases free memory.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// What one case measured: best and median step seconds, and the CPU memory split.
pub(crate) struct Measured {
    best_s: f64,
    median_s: f64,
    /// (seconds, GFLOP counted) of each timed step.
    runs: crate::work::Runs,
    cpu_memory: Option<CpuMemory>,
    /// The process' peak resident set up to the end of this case.
    process_peak_mib: Option<f64>,
}

pub(crate) fn measure(
    model_path: &Path,
    device: &Device,
    precision: Precision,
    checkpointing: bool,
    runs: usize,
) -> Result<Measured> {
    trim_heap();
    let rss_before = status_mib("VmRSS:");
    let mut pretrained = Pretrained::load(model_path, device, precision)?;
    let switch = AdapterSwitch::new();
    let mut config = LoraConfig::new(16, 32.0, &["q_proj", "v_proj"]);
    config.lora_dropout = 0.05;
    pretrained.model.add_lora(&config, &switch, 0)?;
    pretrained.model.set_gradient_checkpointing(checkpointing);
    let params = pretrained.model.lora_parameters();
    let adapter_mib = params.iter().map(|p| p.elem_count() * 4).sum::<usize>() as f64 / 1048576.0;
    let mut adam = Adam::new(params, AdamConfig::adamw(2e-4, 0.0))?;
    trim_heap();
    let rss_unpacked = status_mib("VmRSS:");
    // As the trainers do once the base is final.
    pretrained.model.pack_frozen_weights()?;
    let mut rng = Rng::new(0);
    let vocab = pretrained.model.config().vocab_size() as u64;
    let blocks: Vec<Vec<u32>> = (0..BATCH)
        .map(|_| (0..SEQ).map(|_| (rng.next_u64() % vocab) as u32).collect())
        .collect();
    let refs: Vec<&Vec<u32>> = blocks.iter().collect();
    trim_heap();
    let rss_loaded = status_mib("VmRSS:");
    // The peak so far (the load's), before the reset below forgets it.
    let peak_load = peak_rss_mib();
    let peak_reset = !device.is_gpu() && reset_peak_rss();
    let mut timed = Vec::new();
    for run in 0..=runs {
        switch.train(run as u64);
        let flops = crate::work::flops_now();
        let start = Instant::now();
        let loss = lathe_train::sft::block_loss(&pretrained.model, &refs, device)?;
        let grads = loss.backward()?;
        adam.step(&grads)?;
        device.sync()?;
        if run > 0 {
            timed.push((
                start.elapsed().as_secs_f64(),
                crate::work::gflop_since(flops),
            ));
        }
    }
    let mut times: Vec<f64> = timed.iter().map(|t| t.0).collect();
    times.sort_by(f64::total_cmp);
    let settings = PlanSettings {
        job: Job::Sft,
        precision,
        batch: BATCH,
        train_batch: BATCH,
        seq_len: SEQ,
        lora_r: 16,
        lora_targets: vec!["q_proj".into(), "v_proj".into()],
        gradient_checkpointing: checkpointing,
        ..PlanSettings::inference()
    };
    let planned = plan(&pretrained.model.config(), &settings);
    let mib = |b: u64| b as f64 / 1048576.0;
    let cpu_memory = match (!device.is_gpu(), rss_before, rss_unpacked, rss_loaded) {
        (true, Some(before), Some(unpacked), Some(loaded)) => Some(CpuMemory {
            weights_mib: unpacked - before - 3.0 * adapter_mib,
            packed_mib: loaded - unpacked,
            planned_packed_mib: mib(planned.packed),
            adapters_mib: adapter_mib,
            optimizer_mib: 2.0 * adapter_mib,
            step_peak_mib: peak_reset
                .then(peak_rss_mib)
                .flatten()
                .map(|peak| peak - loaded),
            planned_weights_mib: mib(planned.weights),
            // Gradients (a third of the optimizer row), activations, logits, scratch.
            planned_steps_mib: mib(planned.optimizer / 3
                + planned.activations
                + planned.logits
                + planned.scratch),
        }),
        _ => None,
    };
    Ok(Measured {
        best_s: times[0],
        median_s: times[times.len() / 2],
        runs: timed,
        cpu_memory,
        process_peak_mib: max_opt(peak_load, peak_rss_mib()),
    })
}

pub fn run(
    devices: &[(Device, String)],
    threads: usize,
    runs: usize,
    peer_python: Option<&Path>,
) -> Result<SftSection> {
    let model_path = crate::bench_generate::smollm2_present()?;
    let mut rows = Vec::new();
    let mut work = Vec::new();
    let mut process_peak_mib = None::<f64>;
    for (device, label) in devices {
        let cases = [
            ("f32", Precision::F32, false),
            ("int8", Precision::Int8 { threshold: 6.0 }, false),
            ("f32", Precision::F32, true),
        ];
        for (name, precision, checkpointing) in cases {
            if let Some(ctx) = device.gpu_context() {
                ctx.ledger().reset_peaks();
            }
            let m = lathe_core::on_cpu_pool(|| {
                measure(&model_path, device, precision, checkpointing, runs)
            })?;
            let (best, median) = (m.best_s, m.median_s);
            let case = format!(
                "{label} {name}{}",
                if checkpointing { " checkpointing" } else { "" }
            );
            work.extend(crate::work::Work::best(case, !device.is_gpu(), &m.runs));
            process_peak_mib = max_opt(process_peak_mib, m.process_peak_mib);
            let tokens_per_s = (BATCH * SEQ) as f64 / best;
            eprintln!(
                "  sft {label:>4} {name:>4}{}: {best:.3} s/step ({tokens_per_s:.0} tokens/s)",
                if checkpointing { " +checkpointing" } else { "" }
            );
            let gpu_peak_bytes = device.gpu_context().map(|ctx| {
                ctx.ledger_snapshot()
                    .categories
                    .iter()
                    .map(|c| (c.category.name().to_string(), c.peak))
                    .collect()
            });
            rows.push(SftRow {
                device: label.clone(),
                base: name.to_string(),
                gradient_checkpointing: checkpointing,
                best_s: best,
                median_s: median,
                tokens_per_s,
                peer_tokens_per_s: None,
                ratio_vs_peer: None,
                gpu_peak_bytes,
                cpu_memory: m.cpu_memory,
            });
        }
    }
    // The peer without and with gradient checkpointing: each row is compared with its like.
    let run_peer_case = |checkpointing: bool| {
        crate::peer::or_skipped(
            peer_python,
            "no peer python (LATHE_PEER_TORCH_PYTHON)",
            |python| run_peer(python, &model_path, threads, runs, checkpointing),
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
        if let Some(tps) = like["tokens_per_s"].as_f64() {
            row.peer_tokens_per_s = Some(tps);
            row.ratio_vs_peer = Some(row.tokens_per_s / tps);
        }
    }
    Ok(SftSection {
        rows,
        process_peak_rss_mib: max_opt(process_peak_mib, peak_rss_mib()),
        peer,
        peer_checkpointing,
        work,
        gemm_peak_gflops: crate::bench::cpu_gemm_peak()?,
    })
}

fn run_peer(
    python: &Path,
    model: &Path,
    threads: usize,
    runs: usize,
    checkpointing: bool,
) -> Result<serde_json::Value> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--model".into(),
        model.into(),
        "--batch".into(),
        BATCH.to_string().into(),
        "--seq".into(),
        SEQ.to_string().into(),
        "--threads".into(),
        threads.to_string().into(),
        "--steps".into(),
        runs.to_string().into(),
        "--warmup".into(),
        "1".into(),
    ];
    if checkpointing {
        args.push("--gradient-checkpointing".into());
    }
    crate::peer::run_script(python, "peer_sft.py", &args, threads)
}

pub fn markdown(section: &SftSection) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## LoRA SFT step: SmolLM2-135M, {BATCH} x {SEQ} tokens, r 16 on q,v, AdamW (best of runs)\n"
    );
    let describe = |peer: &serde_json::Value, what: &str| {
        match peer.get("tokens_per_s") {
        Some(_) => format!(
            "peer{what}: peft {} on transformers {} (torch {}), {} threads: {:.3} s/step, peak RSS {:.0} MiB",
            peer["peft"].as_str().unwrap_or("?"),
            peer["version"].as_str().unwrap_or("?"),
            peer["torch"].as_str().unwrap_or("?"),
            peer["threads"],
            peer["best_s"].as_f64().unwrap_or(f64::NAN),
            peer["peak_rss_process_mib"].as_f64().unwrap_or(f64::NAN)
        ),
        None => format!("peer{what}: {peer}"),
    }
    };
    let peer = format!(
        "{}\n\n{}",
        describe(&section.peer, ""),
        describe(&section.peer_checkpointing, " with gradient checkpointing")
    );
    let _ = writeln!(s, "{peer}\n");
    let _ = writeln!(
        s,
        "| device | base | checkpointing | s/step | tokens/s | peer tokens/s (same checkpointing) | ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|");
    for r in &section.rows {
        let opt =
            |v: Option<f64>, suffix: &str| v.map_or("-".into(), |v| format!("{v:.2}{suffix}"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.0} | {} | {} |",
            r.device,
            r.base,
            crate::peer::yes_no(r.gradient_checkpointing),
            r.best_s,
            r.tokens_per_s,
            opt(r.peer_tokens_per_s, ""),
            opt(r.ratio_vs_peer, "x")
        );
    }
    let cpu_rows: Vec<(&SftRow, &CpuMemory)> = section
        .rows
        .iter()
        .filter_map(|r| Some((r, r.cpu_memory.as_ref()?)))
        .collect();
    if !cpu_rows.is_empty() {
        let _ = writeln!(
            s,
            "\nResident memory by category, MiB (weights: growth while loading, free heap trimmed, less adapters and optimizer; packed: growth while the frozen f32 weights were packed for the forward; steps: peak during the timed steps above the set before them):\n"
        );
        let _ = writeln!(
            s,
            "| device | base | checkpointing | weights | plan | packed | plan | adapters | optimizer | steps (activations, gradients, scratch) | plan |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (r, m) in cpu_rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {} | {:.0} |",
                r.device,
                r.base,
                crate::peer::yes_no(r.gradient_checkpointing),
                m.weights_mib,
                m.planned_weights_mib,
                m.packed_mib,
                m.planned_packed_mib,
                m.adapters_mib,
                m.optimizer_mib,
                m.step_peak_mib.map_or("-".into(), |v| format!("{v:.0}")),
                m.planned_steps_mib
            );
        }
    }
    if let Some(mib) = section.process_peak_rss_mib {
        let _ = writeln!(
            s,
            "\nlathe's process peak RSS over the CPU rows: {mib:.0} MiB"
        );
    }
    s.push_str(&crate::work::markdown(
        "The best step of each row",
        "case",
        &section.work,
        section.gemm_peak_gflops,
    ));
    for r in section.rows.iter().filter(|r| r.gpu_peak_bytes.is_some()) {
        let peaks: Vec<String> = r
            .gpu_peak_bytes
            .iter()
            .flatten()
            .map(|(c, b)| format!("{c} {:.1} MiB", *b as f64 / 1048576.0))
            .collect();
        let _ = writeln!(
            s,
            "\nGPU peak by category ({} {}): {}",
            r.device,
            r.base,
            peaks.join(", ")
        );
    }
    s
}
