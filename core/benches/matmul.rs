//! Criterion benches of f32 matmul on the CPU (gemm) and the GPU (tiled WGSL kernel).
//!
//! Throughput is reported in elements/s with one "element" per floating-point operation
//! (2*M*N*K per product), so criterion's Gelem/s reads as GFLOP/s. GPU operands are uploaded
//! before timing; each timed GPU iteration ends with `device.sync()`, so the figure is the
//! device's work, not just the host's encoding. Runs on software adapters (lavapipe) too.
//!
//! `cargo bench -p lathe-core --bench matmul [-- FILTER]`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lathe_core::{testing::test_gpu, Device, Tensor};

/// (label, M, K, N).
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("256", 256, 256, 256),
    ("512", 512, 512, 512),
    ("1024", 1024, 1024, 1024),
    // A linear layer: 16 sequences of 24 tokens, hidden 576, MLP width 1536.
    ("linear_384x576x1536", 16 * 24, 576, 1536),
];

fn operands(m: usize, k: usize, n: usize, device: &Device) -> (Tensor, Tensor) {
    let a = Tensor::randn(&[m, k], 1, device).expect("operand a");
    let b = Tensor::randn(&[k, n], 2, device).expect("operand b");
    (a, b)
}

/// Fewer samples and a shorter window for the large shapes: a software GPU takes a
/// noticeable fraction of a second per 1024^3 product.
fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
}

fn bench_cpu(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_cpu");
    configure(&mut group);
    for &(label, m, k, n) in SHAPES {
        let (a, b) = operands(m, k, n, &Device::Cpu);
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::from_parameter(label), |bench| {
            bench.iter(|| black_box(a.matmul(&b).expect("cpu matmul")))
        });
    }
    group.finish();
}

fn bench_gpu(c: &mut Criterion) {
    let device = test_gpu();
    let mut group = c.benchmark_group("matmul_gpu");
    configure(&mut group);
    for &(label, m, k, n) in SHAPES {
        let (a, b) = operands(m, k, n, &device);
        device.sync().expect("upload");
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::from_parameter(label), |bench| {
            bench.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let out = a.matmul(&b).expect("gpu matmul");
                    device.sync().expect("gpu sync");
                    total += start.elapsed();
                    // Dropped outside the timed region (returns the buffer to the pool).
                    drop(out);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_cpu, bench_gpu);
criterion_main!(benches);
