//! The int8 section of `cargo xtask bench`: LLM.int8 linear layers against the f32 matmul on
//! the CPU and the GPU found, as a GEMV (one token decoding: weight bytes dominate) and as a
//! GEMM (a training batch / prompt). GB/s counts the weight bytes each form reads.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use lathe_core::{Device, Tensor};
use lathe_quant::Int8Linear;
use serde::Serialize;

/// (name, rows, in, out).
const CASES: [(&str, usize, usize, usize); 3] = [
    ("GEMV 1x2048 -> 8192", 1, 2048, 8192),
    ("GEMV 1x576 -> 1536 (SmolLM2 MLP)", 1, 576, 1536),
    ("GEMM 384x576 -> 1536 (16 x 24 tokens)", 384, 576, 1536),
];

#[derive(Clone, Debug, Serialize)]
pub struct Int8Row {
    pub case: String,
    pub device: String,
    pub f32_best_ms: f64,
    pub int8_best_ms: f64,
    pub f32_weight_gbps: f64,
    pub int8_weight_gbps: f64,
    /// f32 time / int8 time: above 1, int8 is faster.
    pub int8_speedup: f64,
}

fn best_of(warmup: usize, runs: usize, mut op: impl FnMut() -> Result<()>) -> Result<Duration> {
    for _ in 0..warmup {
        op()?;
    }
    let mut best = Duration::MAX;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        op()?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

/// Measures every case on `device`; the GPU is synced inside the timed region.
pub fn run(device: &Device, label: &str, warmup: usize, runs: usize) -> Result<Vec<Int8Row>> {
    let mut rows = Vec::new();
    for (case, m, k, n) in CASES {
        let w = Tensor::randn(&[n, k], 5, &Device::Cpu)?.to_device(device)?;
        let x = Tensor::randn(&[m, k], 6, &Device::Cpu)?.to_device(device)?;
        let layer = Int8Linear::from_dense(&w, None, Int8Linear::DEFAULT_THRESHOLD)?;
        let _no_grad = lathe_core::no_grad();
        let f32_time = best_of(warmup, runs, || {
            x.matmul_t(&w, false, true)?;
            device.sync()?;
            Ok(())
        })?;
        let int8_time = best_of(warmup, runs, || {
            layer.forward(&x)?;
            device.sync()?;
            Ok(())
        })?;
        let gbps = |bytes: f64, t: Duration| bytes / t.as_secs_f64() / 1e9;
        let row = Int8Row {
            case: case.to_string(),
            device: label.to_string(),
            f32_best_ms: f32_time.as_secs_f64() * 1e3,
            int8_best_ms: int8_time.as_secs_f64() * 1e3,
            f32_weight_gbps: gbps((n * k * 4) as f64, f32_time),
            int8_weight_gbps: gbps(layer.weight.bytes() as f64, int8_time),
            int8_speedup: f32_time.as_secs_f64() / int8_time.as_secs_f64(),
        };
        eprintln!(
            "  int8 {label:>4} {case}: f32 {:.3} ms, int8 {:.3} ms ({:.2}x)",
            row.f32_best_ms, row.int8_best_ms, row.int8_speedup
        );
        rows.push(row);
    }
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Int8Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## LLM.int8 linear vs f32 matmul (threshold 6.0, best of runs)\n"
    );
    let _ = writeln!(
        s,
        "| case | device | f32 ms | int8 ms | f32 weight GB/s | int8 weight GB/s | int8 speed-up |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {:.1} | {:.1} | {:.2}x |",
            r.case,
            r.device,
            r.f32_best_ms,
            r.int8_best_ms,
            r.f32_weight_gbps,
            r.int8_weight_gbps,
            r.int8_speedup
        );
    }
    s
}
