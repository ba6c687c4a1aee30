//! The PPO section of `cargo xtask bench`: one PPO step as the seed runs it — SmolLM2-135M
//! with a fresh LoRA (r 16 on q,v) and value head, batch 16 (queries: the first 2-7 tokens
//! of IMDB sentences), responses of 4-15 sampled tokens, minibatch 4, 4 PPO epochs — on the
//! CPU, against trl 0.11.4's PPOTrainer + peft (`scripts/peer_ppo.py`). Both score with the
//! same fixed, free reward (response length / 16) so that only the PPO machinery is timed.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use lathe_core::Device;
use lathe_core::Rng;
use lathe_lora::{AdapterSwitch, LoraConfig};
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_models::sampling::SamplingConfig;
use lathe_models::value_head::ValueHead;
use lathe_ppo::rollout::{make_queries, sample_responses, LengthRange};
use lathe_ppo::{PpoConfig, PpoTrainer};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct PpoSection {
    pub generate_s: Vec<f64>,
    pub step_s: Vec<f64>,
    pub total_s: Vec<f64>,
    pub best_total_s: f64,
    pub median_total_s: f64,
    pub peer: serde_json::Value,
    /// peer best total / lathe best total: above 1, lathe is faster.
    pub speedup_vs_peer: Option<f64>,
    /// This run's f32 GEMM peak (`bench::cpu_gemm_peak`), GFLOP/s.
    pub gemm_peak_gflops: f64,
    /// The best run's phases, generation first.
    pub phases: Vec<Phase>,
}

/// (name, seconds, counted GFLOP) of one phase of a step.
pub type Phase = (String, f64, f64);

fn imdb_texts() -> Result<Vec<String>> {
    let path = crate::assets::cache_dir(None)?.join("sentiment/test/fixtures/imdb.json");
    let value: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    Ok(value
        .as_array()
        .context("imdb.json is an array")?
        .iter()
        .filter_map(|e| e["text"].as_str().map(str::to_string))
        .filter(|t| !t.is_empty())
        .collect())
}

pub fn run(threads: usize, runs: usize, peer_python: Option<&Path>) -> Result<PpoSection> {
    let model_path = crate::bench_generate::smollm2_present()?;
    let device = Device::Cpu;
    let texts = imdb_texts()?;
    let gemm_peak_gflops = crate::bench::cpu_gemm_peak()?;
    let (generate_s, step_s, total_s, phases) = lathe_core::on_cpu_pool(|| -> Result<_> {
        let mut pretrained = Pretrained::load(&model_path, &device, Precision::F32)?;
        let switch = AdapterSwitch::new();
        let mut lora = LoraConfig::new(16, 32.0, &["q_proj", "v_proj"]);
        lora.lora_dropout = 0.05;
        pretrained.model.add_lora(&lora, &switch, 0)?;
        let hidden = pretrained.model.config().hidden_size();
        let head = ValueHead::new(hidden, 0.1, 0, &device)?;
        let config = PpoConfig {
            batch_size: 16,
            mini_batch_size: 4,
            ppo_epochs: 4,
            ..PpoConfig::default()
        };
        let tokenized: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| pretrained.tokenizer.encode(t, true))
            .collect::<std::result::Result<_, _>>()?;
        let pad = pretrained.tokenizer.eos_id().unwrap_or(0);
        let mut trainer = PpoTrainer::new(pretrained.model, switch, head, config, pad, &device)?;
        let sampling = SamplingConfig {
            top_k: 0,
            ..SamplingConfig::default()
        };
        let mut rng = Rng::new(0);
        let (mut generate_s, mut step_s, mut total_s) = (Vec::new(), Vec::new(), Vec::new());
        let mut best_phases: Option<(f64, Vec<Phase>)> = None;
        for run in 0..=runs {
            let drawn: Vec<&[u32]> = (0..16)
                .map(|_| tokenized[(rng.next_u64() % tokenized.len() as u64) as usize].as_slice())
                .collect();
            let start = Instant::now();
            let flops_before = lathe_core::flops::counted();
            let queries = make_queries(&drawn, LengthRange { min: 2, max: 7 }, &mut rng);
            let responses = sample_responses(
                &trainer.model,
                &queries,
                LengthRange { min: 4, max: 15 },
                sampling,
                pad,
                run as u64,
                &mut rng,
                &device,
            )?;
            let generated = start.elapsed().as_secs_f64();
            let generate_gflop = (lathe_core::flops::counted() - flops_before) as f64 / 1e9;
            let scores: Vec<f32> = responses.iter().map(|r| r.len() as f32 / 16.0).collect();
            let step_start = Instant::now();
            let stats = trainer.step(&queries, &responses, &scores)?;
            let total = start.elapsed().as_secs_f64();
            if run > 0 && best_phases.as_ref().is_none_or(|(best, _)| total < *best) {
                let mut phases = vec![("generation".to_string(), generated, generate_gflop)];
                for (key, &seconds) in &stats {
                    let Some(phase) = key
                        .strip_prefix("time/ppo/")
                        .and_then(|k| k.strip_suffix("_s"))
                    else {
                        continue;
                    };
                    let gflop = stats
                        .get(&format!("time/ppo/{phase}_gflop"))
                        .copied()
                        .unwrap_or(0.0);
                    phases.push((phase.to_string(), f64::from(seconds), f64::from(gflop)));
                }
                best_phases = Some((total, phases));
            }
            if run > 0 {
                generate_s.push(generated);
                step_s.push(step_start.elapsed().as_secs_f64());
                total_s.push(start.elapsed().as_secs_f64());
            }
        }
        Ok((
            generate_s,
            step_s,
            total_s,
            best_phases.map(|(_, p)| p).unwrap_or_default(),
        ))
    })?;
    let mut sorted = total_s.clone();
    sorted.sort_by(f64::total_cmp);
    let (best, median) = (sorted[0], sorted[sorted.len() / 2]);
    eprintln!(
        "  ppo  cpu: best {best:.2} s per step (generate {:.2} s)",
        generate_s[0]
    );
    let peer = crate::peer::or_skipped(
        peer_python,
        "no trl peer python (LATHE_PEER_TRL_PYTHON)",
        |python| run_peer(python, &model_path, threads, runs),
    );
    let peer_best = peer["best_total_s"].as_f64();
    Ok(PpoSection {
        generate_s,
        step_s,
        total_s,
        best_total_s: best,
        median_total_s: median,
        speedup_vs_peer: peer_best.map(|p| p / best),
        peer,
        gemm_peak_gflops,
        phases,
    })
}

fn run_peer(python: &Path, model: &Path, threads: usize, runs: usize) -> Result<serde_json::Value> {
    let args: Vec<std::ffi::OsString> = vec![
        "--model".into(),
        model.into(),
        "--threads".into(),
        threads.to_string().into(),
        "--steps".into(),
        runs.to_string().into(),
    ];
    crate::peer::run_script(python, "peer_ppo.py", &args, threads)
}

pub fn markdown(section: &PpoSection) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## One PPO step: SmolLM2-135M, LoRA r 16 on q,v, batch 16, minibatch 4, 4 epochs, CPU\n"
    );
    let _ = writeln!(s, "| | generate s (lathe: best, peer: median) | step s (same) | total s (best) | total s (median) |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    let min = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    let _ = writeln!(
        s,
        "| lathe | {:.2} | {:.2} | {:.2} | {:.2} |",
        min(&section.generate_s),
        min(&section.step_s),
        section.best_total_s,
        section.median_total_s
    );
    match section.peer.get("best_total_s").and_then(|v| v.as_f64()) {
        Some(best) => {
            let _ = writeln!(
                s,
                "| trl {} + peft {} | {} | {} | {best:.2} | {} |",
                section.peer["trl"].as_str().unwrap_or("?"),
                section.peer["peft"].as_str().unwrap_or("?"),
                section.peer["median_generate_s"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}")),
                section.peer["median_step_s"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}")),
                section.peer["median_total_s"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.2}")),
            );
            let _ = writeln!(
                s,
                "\nlathe takes {:.2}x less time per step than the peer.",
                best / section.best_total_s
            );
        }
        None => {
            let _ = writeln!(s, "\npeer: {}", section.peer);
        }
    }
    let mut phases: Vec<crate::work::Work> = section
        .phases
        .iter()
        .map(|(phase, seconds, gflop)| crate::work::Work {
            case: phase.clone(),
            cpu: true,
            seconds: *seconds,
            gflop: *gflop,
        })
        .collect();
    phases.push(crate::work::Work {
        case: "all phases".into(),
        cpu: true,
        seconds: phases.iter().map(|w| w.seconds).sum(),
        gflop: phases.iter().map(|w| w.gflop).sum(),
    });
    s.push_str(&crate::work::markdown(
        "The best lathe step by phase",
        "phase",
        &phases,
        section.gemm_peak_gflops,
    ));
    s
}
