//! Criterion benches of the LLM.int8() linear (threshold 6.0, inputs without outliers)
//! against the f32 `matmul_t(w, false, true)` of the same layer, on CPU and GPU: a GEMM
//! (384 x 576 -> 1536, a batch of prompts through an MLP) and GEMVs (one decoding row,
//! 576 -> 1536 and 2048 -> 8192) and decoding batches (16 rows, 576 -> 1536 and SmolLM2's LM
//! head 576 -> 49152). Throughput is in weight bytes per iteration, so criterion's
//! GB/s figure is the weight stream (int8: 1 byte/parameter; f32: 4). GPU iterations end
//! with `device.sync()`. Runs on software adapters (lavapipe) with small sample counts.
//! `int8_cpu_forms`: the CPU's GEMM form against its few-rows kernel from 1 to 1024 rows (the
//! crossover `Int8Form::Auto` uses), and the quantization of an LM-head-sized weight.
//!
//! `cargo bench -p lathe-quant --bench int8 [-- FILTER]`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lathe_core::{testing::test_gpu, Device, Tensor};
use lathe_quant::int8::Int8Form;
use lathe_quant::Int8Linear;

/// (label, rows, in, out).
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("gemm_384x576x1536", 384, 576, 1536),
    ("gemv_1x576x1536", 1, 576, 1536),
    ("gemv_1x2048x8192", 1, 2048, 8192),
    ("rows_16x576x1536", 16, 576, 1536),
    ("rows_16x576x49152", 16, 576, 49152),
];

fn configure(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    gpu: bool,
) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(if gpu { 500 } else { 1000 }))
        .measurement_time(Duration::from_secs(if gpu { 2 } else { 4 }));
}

fn operands(rows: usize, inn: usize, out: usize, device: &Device) -> (Tensor, Tensor, Int8Linear) {
    let x = Tensor::randn(&[rows, inn], 1, device).expect("x");
    let w = Tensor::randn(&[out, inn], 2, device)
        .and_then(|w| w.scale(0.05))
        .expect("w");
    let layer = Int8Linear::from_dense(&w, None, Int8Linear::DEFAULT_THRESHOLD).expect("int8");
    (x, w, layer)
}

/// Times `f` per iteration, syncing the device after each.
fn timed(device: &Device, iters: u64, f: impl Fn() -> Tensor) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        let out = f();
        device.sync().expect("sync");
        total += start.elapsed();
        drop(out);
    }
    total
}

fn bench_device(c: &mut Criterion, name: &str, device: Device) {
    let mut group = c.benchmark_group(name);
    configure(&mut group, device.is_gpu());
    for &(label, rows, inn, out) in SHAPES {
        let (x, w, layer) = operands(rows, inn, out, &device);
        device.sync().expect("upload");
        group.throughput(Throughput::Bytes(layer.weight.bytes()));
        group.bench_function(BenchmarkId::new("int8", label), |b| {
            b.iter_custom(|iters| {
                timed(&device, iters, || {
                    black_box(layer.forward(&x).expect("int8"))
                })
            })
        });
        group.throughput(Throughput::Bytes((out * inn * 4) as u64));
        group.bench_function(BenchmarkId::new("f32", label), |b| {
            b.iter_custom(|iters| {
                timed(&device, iters, || {
                    black_box(x.matmul_t(&w, false, true).expect("f32"))
                })
            })
        });
    }
    group.finish();
}

fn bench_cpu(c: &mut Criterion) {
    bench_device(c, "int8_cpu", Device::Cpu);
}

/// The CPU's GEMM form against the few-rows kernel (best path) over row counts at 576 ->
/// 1536: where `Auto` should switch. And the quantization of a weight (the load-time cost).
fn bench_cpu_forms(c: &mut Criterion) {
    let device = Device::Cpu;
    let mut group = c.benchmark_group("int8_cpu_forms");
    configure(&mut group, false);
    let rows_form = Int8Form::cpu_row_forms()[0];
    for rows in [1, 8, 16, 32, 48, 64, 128, 384, 1024] {
        let (x, _, layer) = operands(rows, 576, 1536, &device);
        for (name, form) in [("gemm", Int8Form::Gemm), ("rows", rows_form)] {
            group.bench_function(BenchmarkId::new(name, rows), |b| {
                b.iter(|| black_box(layer.forward_with(&x, form).expect("int8")))
            });
        }
    }
    let w = Tensor::randn(&[49152, 576], 3, &device).expect("w");
    group.throughput(Throughput::Bytes((49152 * 576 * 4) as u64));
    group.bench_function("quantize_49152x576", |b| {
        b.iter(|| black_box(lathe_quant::Int8Weight::quantize(&w).expect("quantize")))
    });
    group.finish();
}

fn bench_gpu(c: &mut Criterion) {
    bench_device(c, "int8_gpu", test_gpu());
}

criterion_group!(benches, bench_cpu, bench_cpu_forms, bench_gpu);
criterion_main!(benches);
