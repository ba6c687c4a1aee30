//! `cargo xtask bench`: f32 matmul throughput on the CPU, the GPU adapter found and a Python
//! peer, written to `<target>/bench/report.{json,md}` and printed.

use std::time::Instant;

use anyhow::{Context, Result};
use lathe_core::{Device, Tensor};
use lathe_shaders::AdapterChoice;

use crate::report::{GpuSection, LedgerRow, Measurement, PeerSection, Report};
use crate::{
    bench_dpo, bench_generate, bench_grpo, bench_int8, bench_plan, bench_ppo, bench_reward,
    bench_sft, peer,
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// M = N = K of the square matmul.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Untimed runs before measuring (pipeline compilation, caches, thread start-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed runs; the best is reported (and the median alongside).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Skip the Python peers even when they are available.
    #[arg(long)]
    no_peer: bool,
    /// Which sections to run (comma-separated): matmul, int8, generate, sft, ppo, reward, dpo,
    /// grpo, plan.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "matmul,int8,generate,sft,ppo,reward"
    )]
    sections: Vec<Section>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// f32 matmul GFLOP/s on CPU and GPU, numpy/torch peer.
    Matmul,
    /// LLM.int8 linear vs f32 matmul.
    Int8,
    /// SmolLM2 generation tokens/s, transformers peer (needs `cargo xtask assets`).
    Generate,
    /// SmolLM2 LoRA SFT step tokens/s, peft peer (needs `cargo xtask assets`).
    Sft,
    /// One PPO step on SmolLM2, trl peer (needs `cargo xtask assets`).
    Ppo,
    /// Reward-model scoring texts/s, transformers peer (needs `cargo xtask assets`).
    Reward,
    /// One DPO optimizer step on SmolLM2 (8 pairs of 16 + 48 tokens, LoRA r 16 on q,v), with
    /// and without gradient checkpointing, trl 1.16 DPOTrainer + peft peer (needs `cargo xtask
    /// assets`; steps of tens of seconds on 2 cores, `--warmup` and `--runs` of them on each
    /// side: not in the default list).
    Dpo,
    /// One GRPO optimizer step on SmolLM2 (8 prompts of 16 tokens × G 4 completions of at most
    /// 16 tokens, length reward, beta 0.04, LoRA r 16 on q,v), with and without gradient
    /// checkpointing, trl 1.16 GRPOTrainer + peft peer (needs `cargo xtask assets`; steps of
    /// tens of seconds on 2 cores, `--warmup` and `--runs` of them on each side: not in the
    /// default list).
    Grpo,
    /// `lathe plan` against the measured peak resident memory of real runs (SmolLM2 and two
    /// synthetic GPT-NeoX-20B-width shapes; writes ~8 GB of checkpoints to /tmp; not in the
    /// default list).
    Plan,
}

/// The interpreter of the trl peer: `LATHE_PEER_TRL_PYTHON`, else the pinned venv of
/// scripts/peer_ppo.py when it exists.
fn trl_python() -> Option<std::path::PathBuf> {
    match std::env::var_os("LATHE_PEER_TRL_PYTHON") {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => {
            let default = std::path::PathBuf::from("/tmp/venv-trl/bin/python");
            default.exists().then_some(default)
        }
    }
}

/// The interpreter of the DPO peer (trl 1.16): `LATHE_PEER_DPO_PYTHON`, else the pinned venv
/// of scripts/peer_dpo.py when it exists.
fn dpo_python() -> Option<std::path::PathBuf> {
    match std::env::var_os("LATHE_PEER_DPO_PYTHON") {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => {
            let default = std::path::PathBuf::from("/tmp/venv-tf5/bin/python");
            default.exists().then_some(default)
        }
    }
}

/// The interpreter of the GRPO peer (trl 1.16): `LATHE_PEER_GRPO_PYTHON`, else the pinned
/// venv of scripts/peer_grpo.py when it exists.
fn grpo_python() -> Option<std::path::PathBuf> {
    match std::env::var_os("LATHE_PEER_GRPO_PYTHON") {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => {
            let default = std::path::PathBuf::from("/tmp/venv-tf5/bin/python");
            default.exists().then_some(default)
        }
    }
}

/// The interpreter of the transformers peer: `LATHE_PEER_TORCH_PYTHON`, else the pinned
/// venv of scripts/peer_generate.py when it exists.
fn torch_python() -> Option<std::path::PathBuf> {
    match std::env::var_os("LATHE_PEER_TORCH_PYTHON") {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => {
            let default = std::path::PathBuf::from("/tmp/venv-models/bin/python");
            default.exists().then_some(default)
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let n = args.size;
    let threads = rayon::current_num_threads();
    let gpu_device = match Device::gpu(AdapterChoice::any()) {
        Ok(device) => Some(device),
        Err(e) => {
            eprintln!("  gpu:  none ({e})");
            None
        }
    };
    let mut json = serde_json::Map::new();
    let mut markdown = String::new();

    if args.sections.contains(&Section::Matmul) {
        eprintln!("xtask bench: f32 matmul {n}x{n}x{n}, {threads} CPU threads, best of {} runs after {} warm-up", args.runs, args.warmup);
        let a = Tensor::randn(&[n, n], 1, &Device::Cpu)?;
        let b = Tensor::randn(&[n, n], 2, &Device::Cpu)?;
        let cpu_out = a.matmul(&b)?;
        let cpu = time_op(n, args, || {
            a.matmul(&b)?;
            Ok(())
        })
        .context("CPU matmul")?;
        eprintln!("  cpu:  {:.1} GFLOP/s", cpu.gflops);
        let gpu = match &gpu_device {
            Some(device) => Some(bench_gpu(device, &a, &b, &cpu_out, args).context("GPU matmul")?),
            None => None,
        };
        let peer = if args.no_peer {
            PeerSection::skipped("--no-peer given")
        } else {
            run_peer(n, threads)
        };
        let report = Report::new([n, n, n], threads, cpu, gpu, peer);
        markdown += &report.markdown();
        json.insert("matmul".into(), serde_json::to_value(&report)?);
    }

    if args.sections.contains(&Section::Int8) {
        let mut int8_rows = bench_int8::run(&Device::Cpu, "cpu", args.warmup, args.runs)
            .context("int8 on the CPU")?;
        if let Some(device) = &gpu_device {
            // Software adapters are slow: fewer runs keep the bench short.
            let runs = if is_software(device) { 2 } else { args.runs };
            int8_rows.extend(bench_int8::run(device, "gpu", 1, runs).context("int8 on the GPU")?);
        }
        markdown += &bench_int8::markdown(&int8_rows);
        json.insert("int8".into(), serde_json::to_value(&int8_rows)?);
    }

    if args.sections.contains(&Section::Generate) {
        let mut devices = vec![(Device::Cpu, "cpu".to_string())];
        match &gpu_device {
            // A 135M model on a software rasteriser takes minutes per case and says nothing
            // about GPU speed.
            Some(device) if is_software(device) => {
                eprintln!("  generate: gpu skipped (software adapter)")
            }
            Some(device) => devices.push((device.clone(), "gpu".to_string())),
            None => {}
        }
        let peer = if args.no_peer { None } else { torch_python() };
        match bench_generate::run(&devices, threads, 3, peer.as_deref()) {
            Ok(section) => {
                markdown += &bench_generate::markdown(&section);
                json.insert("generate".into(), serde_json::to_value(&section)?);
            }
            Err(e) => {
                eprintln!("  generate: skipped ({e:#})");
                markdown += &format!("\n## Generation\n\nskipped: {e:#}\n");
                json.insert(
                    "generate".into(),
                    serde_json::json!({ "skipped": format!("{e:#}") }),
                );
            }
        }
    }

    if args.sections.contains(&Section::Sft) {
        let mut devices = vec![(Device::Cpu, "cpu".to_string())];
        if let Some(device) = gpu_device.as_ref().filter(|d| !is_software(d)) {
            devices.push((device.clone(), "gpu".to_string()));
        }
        let peer = if args.no_peer { None } else { torch_python() };
        match bench_sft::run(&devices, threads, 3, peer.as_deref()) {
            Ok(section) => {
                markdown += &bench_sft::markdown(&section);
                json.insert("sft".into(), serde_json::to_value(&section)?);
            }
            Err(e) => {
                eprintln!("  sft: skipped ({e:#})");
                markdown += &format!("\n## LoRA SFT\n\nskipped: {e:#}\n");
                json.insert(
                    "sft".into(),
                    serde_json::json!({ "skipped": format!("{e:#}") }),
                );
            }
        }
    }

    if args.sections.contains(&Section::Ppo) {
        let peer = if args.no_peer { None } else { trl_python() };
        match bench_ppo::run(threads, 3, peer.as_deref()) {
            Ok(section) => {
                markdown += &bench_ppo::markdown(&section);
                json.insert("ppo".into(), serde_json::to_value(&section)?);
            }
            Err(e) => {
                eprintln!("  ppo: skipped ({e:#})");
                markdown += &format!("\n## PPO step\n\nskipped: {e:#}\n");
                json.insert(
                    "ppo".into(),
                    serde_json::json!({ "skipped": format!("{e:#}") }),
                );
            }
        }
    }

    if args.sections.contains(&Section::Reward) {
        let mut devices = vec![(Device::Cpu, "cpu".to_string())];
        if let Some(device) = gpu_device.as_ref().filter(|d| !is_software(d)) {
            devices.push((device.clone(), "gpu".to_string()));
        }
        let peer = if args.no_peer { None } else { torch_python() };
        match bench_reward::run(&devices, threads, 3, peer.as_deref()) {
            Ok(section) => {
                markdown += &bench_reward::markdown(&section);
                json.insert("reward".into(), serde_json::to_value(&section)?);
            }
            Err(e) => {
                eprintln!("  reward: skipped ({e:#})");
                markdown += &format!("\n## Reward scoring\n\nskipped: {e:#}\n");
                json.insert(
                    "reward".into(),
                    serde_json::json!({ "skipped": format!("{e:#}") }),
                );
            }
        }
    }

    if args.sections.contains(&Section::Dpo) {
        let mut devices = vec![(Device::Cpu, "cpu".to_string())];
        if let Some(device) = gpu_device.as_ref().filter(|d| !is_software(d)) {
            devices.push((device.clone(), "gpu".to_string()));
        }
        let peer = if args.no_peer { None } else { dpo_python() };
        match bench_dpo::run(&devices, threads, args.warmup, args.runs, peer.as_deref()) {
            Ok(section) => {
                markdown += &bench_dpo::markdown(&section);
                json.insert("dpo".into(), serde_json::to_value(&section)?);
            }
            Err(e) => {
                eprintln!("  dpo: skipped ({e:#})");
                markdown += &format!("\n## DPO step\n\nskipped: {e:#}\n");
                json.insert(
                    "dpo".into(),
                    serde_json::json!({ "skipped": format!("{e:#}") }),
                );
            }
        }
    }

    if args.sections.contains(&Section::Grpo) {
        let mut devices = vec![(Device::Cpu, "cpu".to_string())];
        if let Some(device) = gpu_device.as_ref().filter(|d| !is_software(d)) {
            devices.push((device.clone(), "gpu".to_string()));
        }
        let peer = if args.no_peer { None } else { grpo_python() };
        match bench_grpo::run(&devices, threads, args.warmup, args.runs, peer.as_deref()) {
            Ok(section) => {
                markdown += &bench_grpo::markdown(&section);
                json.insert("grpo".into(), serde_json::to_value(&section)?);
            }
            Err(e) => {
                eprintln!("  grpo: skipped ({e:#})");
                markdown += &format!("\n## GRPO step\n\nskipped: {e:#}\n");
                json.insert(
                    "grpo".into(),
                    serde_json::json!({ "skipped": format!("{e:#}") }),
                );
            }
        }
    }

    if args.sections.contains(&Section::Plan) {
        match bench_plan::run() {
            Ok(section) => {
                markdown += &bench_plan::markdown(&section);
                json.insert("plan".into(), serde_json::to_value(&section)?);
            }
            Err(e) => {
                eprintln!("  plan: skipped ({e:#})");
                markdown += &format!("\n## Memory plan\n\nskipped: {e:#}\n");
                json.insert(
                    "plan".into(),
                    serde_json::json!({ "skipped": format!("{e:#}") }),
                );
            }
        }
    }

    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json_path = dir.join("report.json");
    let md_path = dir.join("report.md");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    std::fs::write(&md_path, &markdown)?;
    println!("{markdown}");
    println!("written: {} and {}", json_path.display(), md_path.display());
    Ok(())
}

fn is_software(device: &Device) -> bool {
    device.gpu_context().is_some_and(|c| c.report().is_software)
}

/// Times the GPU matmul: operands uploaded (and synced) before timing, `sync()` inside the
/// timed region so the figure is the device's work, not the host's encoding.
fn bench_gpu(
    device: &Device,
    a: &Tensor,
    b: &Tensor,
    cpu_out: &Tensor,
    args: &BenchArgs,
) -> Result<GpuSection> {
    let ctx = device.gpu_context().expect("a GPU device").clone();
    let report = ctx.report().clone();
    eprintln!("  gpu adapter: {report}");
    let ag = a.to_device(device)?;
    let bg = b.to_device(device)?;
    device.sync()?;
    let out = ag.matmul(&bg)?;
    let max_rel_diff = max_rel_diff(&out.to_vec_f32()?, &cpu_out.to_vec_f32()?);
    let measurement = time_op(args.size, args, || {
        ag.matmul(&bg)?;
        device.sync()?;
        Ok(())
    })?;
    eprintln!(
        "  gpu:  {:.1} GFLOP/s{}",
        measurement.gflops,
        if report.is_software {
            " [software adapter]"
        } else {
            ""
        }
    );
    // Taken while a, b and one output are alive: current = the working set, peak = the run's.
    let ledger = ctx.ledger_snapshot();
    Ok(GpuSection {
        adapter: report.to_string(),
        adapter_name: report.name.clone(),
        is_software: report.is_software,
        measurement,
        max_rel_diff_vs_cpu: max_rel_diff,
        ledger_rows: ledger
            .categories
            .iter()
            .map(|c| LedgerRow {
                category: c.category.name().to_string(),
                current_bytes: c.current,
                peak_bytes: c.peak,
            })
            .collect(),
        ledger_total_current_bytes: ledger.total_current,
        ledger_total_peak_bytes: ledger.total_peak,
        ledger: ledger.to_string(),
        pool_idle_bytes: ctx.pool_idle_bytes(),
    })
}

fn run_peer(n: usize, threads: usize) -> PeerSection {
    let Some(python) = peer::find_python() else {
        return PeerSection::skipped(
            "no peer: set LATHE_PEER_PYTHON to a python with torch or numpy, or run \
             `python3 -m venv /tmp/venv && /tmp/venv/bin/pip install numpy threadpoolctl`",
        );
    };
    eprintln!("  peer: {} scripts/peer_matmul.py", python.display());
    match peer::measure(&python, n, threads) {
        Ok(result) => PeerSection::measured(result),
        Err(e) => PeerSection::skipped(&format!("peer failed: {e:#}")),
    }
}

/// Best and median of `args.runs` timed calls after `args.warmup` untimed ones.
fn time_op(n: usize, args: &BenchArgs, mut op: impl FnMut() -> Result<()>) -> Result<Measurement> {
    for _ in 0..args.warmup {
        op()?;
    }
    let mut times = Vec::with_capacity(args.runs.max(1));
    for _ in 0..args.runs.max(1) {
        let start = Instant::now();
        op()?;
        times.push(start.elapsed());
    }
    Ok(Measurement::from_times(n, n, n, times))
}

/// max |got - want| / max |want|: a sanity check that the timed kernel computes the product.
fn max_rel_diff(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0.0f32, |m, w| m.max(w.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    (diff / scale) as f64
}
