//! `cargo xtask bench`: f32 matmul throughput on the CPU, the GPU adapter found and a Python
//! peer, written to `<target>/bench/report.{json,md}` and printed.

use std::time::Instant;

use anyhow::{Context, Result};
use lathe_core::{Device, Tensor};
use lathe_shaders::AdapterChoice;

use crate::report::{GpuSection, LedgerRow, Measurement, PeerSection, Report};
use crate::{
    bench_dp, bench_dpo, bench_generate, bench_grpo, bench_int8, bench_plan, bench_ppo,
    bench_reward, bench_sft, peer,
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
    /// grpo, plan, dp.
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
    /// LoRA SFT on SmolLM2 as 1 process x 1 thread against `mpirun -np 2` x 1 thread: the
    /// scaling efficiency and the bytes reduced per step (needs Open MPI and `cargo xtask
    /// assets`; builds lathe with `--features mpi`; not in the default list).
    Dp,
}

/// A peer's interpreter: the path in the environment variable `var`, else `venv`'s python
/// (the pinned venv its script's docstring builds) when it exists.
fn peer_python(var: &str, venv: &str) -> Option<std::path::PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(p.into()),
        _ => {
            let default = std::path::Path::new(venv).join("bin/python");
            default.exists().then_some(default)
        }
    }
}

/// The trl 0.11.4 peer of the PPO section (scripts/peer_ppo.py).
fn trl_python() -> Option<std::path::PathBuf> {
    peer_python("LATHE_PEER_TRL_PYTHON", "/tmp/venv-trl")
}

/// The trl 1.16 peer of the DPO section (scripts/peer_dpo.py).
fn dpo_python() -> Option<std::path::PathBuf> {
    peer_python("LATHE_PEER_DPO_PYTHON", "/tmp/venv-tf5")
}

/// The trl 1.16 peer of the GRPO section (scripts/peer_grpo.py).
fn grpo_python() -> Option<std::path::PathBuf> {
    peer_python("LATHE_PEER_GRPO_PYTHON", "/tmp/venv-tf5")
}

/// The transformers peer of the generation, SFT and reward sections
/// (scripts/peer_generate.py and its siblings).
fn torch_python() -> Option<std::path::PathBuf> {
    peer_python("LATHE_PEER_TORCH_PYTHON", "/tmp/venv-models")
}

/// Adds a section's result to the report: its markdown and JSON, or, when it failed, a
/// "skipped" line under its `title` (the other sections still run).
fn add_section<S: serde::Serialize>(
    report: (&mut String, &mut serde_json::Map<String, serde_json::Value>),
    key: &str,
    title: &str,
    result: Result<S>,
    markdown: impl FnOnce(&S) -> String,
) -> Result<()> {
    let (md, json) = report;
    match result {
        Ok(section) => {
            *md += &markdown(&section);
            json.insert(key.into(), serde_json::to_value(&section)?);
        }
        Err(e) => {
            eprintln!("  {key}: skipped ({e:#})");
            *md += &format!("\n## {title}\n\nskipped: {e:#}\n");
            json.insert(
                key.into(),
                serde_json::json!({ "skipped": format!("{e:#}") }),
            );
        }
    }
    Ok(())
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
    // The CPU, and the GPU when it is hardware: the training sections on a software
    // rasteriser take minutes per case and say nothing about GPU speed.
    let mut hardware = vec![(Device::Cpu, "cpu".to_string())];
    if let Some(device) = gpu_device.as_ref().filter(|d| !is_software(d)) {
        hardware.push((device.clone(), "gpu".to_string()));
    }

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
        add_section(
            (&mut markdown, &mut json),
            "generate",
            "Generation",
            bench_generate::run(&devices, threads, 3, peer.as_deref()),
            bench_generate::markdown,
        )?;
    }

    if args.sections.contains(&Section::Sft) {
        let peer = if args.no_peer { None } else { torch_python() };
        add_section(
            (&mut markdown, &mut json),
            "sft",
            "LoRA SFT",
            bench_sft::run(&hardware, threads, 3, peer.as_deref()),
            bench_sft::markdown,
        )?;
    }

    if args.sections.contains(&Section::Ppo) {
        let peer = if args.no_peer { None } else { trl_python() };
        add_section(
            (&mut markdown, &mut json),
            "ppo",
            "PPO step",
            bench_ppo::run(threads, 3, peer.as_deref()),
            bench_ppo::markdown,
        )?;
    }

    if args.sections.contains(&Section::Reward) {
        let peer = if args.no_peer { None } else { torch_python() };
        add_section(
            (&mut markdown, &mut json),
            "reward",
            "Reward scoring",
            bench_reward::run(&hardware, threads, 3, peer.as_deref()),
            bench_reward::markdown,
        )?;
    }

    if args.sections.contains(&Section::Dpo) {
        let peer = if args.no_peer { None } else { dpo_python() };
        add_section(
            (&mut markdown, &mut json),
            "dpo",
            "DPO step",
            bench_dpo::run(&hardware, threads, args.warmup, args.runs, peer.as_deref()),
            bench_dpo::markdown,
        )?;
    }

    if args.sections.contains(&Section::Grpo) {
        let peer = if args.no_peer { None } else { grpo_python() };
        add_section(
            (&mut markdown, &mut json),
            "grpo",
            "GRPO step",
            bench_grpo::run(&hardware, threads, args.warmup, args.runs, peer.as_deref()),
            bench_grpo::markdown,
        )?;
    }

    if args.sections.contains(&Section::Plan) {
        add_section(
            (&mut markdown, &mut json),
            "plan",
            "Memory plan",
            bench_plan::run(),
            bench_plan::markdown,
        )?;
    }

    if args.sections.contains(&Section::Dp) {
        add_section(
            (&mut markdown, &mut json),
            "dp",
            "Data parallel (MPI)",
            bench_dp::run(),
            bench_dp::markdown,
        )?;
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

/// This box's f32 GEMM peak as lathe reaches it, GFLOP/s: the best of 20 products of 1024³
/// on the CPU pool (after two warm-ups), the yardstick of the sections' achieved GFLOP/s.
/// On a shared box the best of many is the box's, not a busy moment's.
pub fn cpu_gemm_peak() -> Result<f64> {
    // Measured once per run: every section compares with the same figure.
    static PEAK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    if let Some(&peak) = PEAK.get() {
        return Ok(peak);
    }
    let peak = measure_cpu_gemm_peak()?;
    Ok(*PEAK.get_or_init(|| peak))
}

fn measure_cpu_gemm_peak() -> Result<f64> {
    let n = 1024;
    let a = Tensor::randn(&[n, n], 1, &Device::Cpu)?;
    let b = Tensor::randn(&[n, n], 2, &Device::Cpu)?;
    lathe_core::on_cpu_pool(|| {
        a.matmul(&b)?;
        a.matmul(&b)?;
        let mut best = f64::MAX;
        for _ in 0..20 {
            let start = Instant::now();
            a.matmul(&b)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n * n * n) as f64 / best / 1e9)
    })
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
