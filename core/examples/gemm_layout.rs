use lathe_core::Tensor;
use std::time::Instant;
fn time(f: &dyn Fn()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..20 {
        f()
    }
    t.elapsed().as_secs_f64() / 20.0
}
fn main() {
    for &(m, n, k) in &[
        (68, 1536, 576),
        (68, 576, 1536),
        (68, 576, 576),
        (68, 192, 576),
        (320, 1536, 576),
        (320, 576, 1536),
        (320, 576, 576),
        (128, 49152, 576),
        (1024, 1536, 576),
    ] {
        let x = Tensor::from_vec(
            (0..m * k)
                .map(|i| (i % 7) as f32 * 0.1)
                .collect::<Vec<f32>>(),
            &[m, k],
            &lathe_core::Device::Cpu,
        )
        .unwrap();
        let w = Tensor::from_vec(
            (0..n * k)
                .map(|i| (i % 5) as f32 * 0.1)
                .collect::<Vec<f32>>(),
            &[n, k],
            &lathe_core::Device::Cpu,
        )
        .unwrap();
        let p = w.packed_for_cpu_forward().unwrap();
        let a = time(&|| {
            x.matmul_t(&w, false, true).unwrap();
        });
        let b = time(&|| {
            x.matmul_t(&p, false, true).unwrap();
        });
        let f = 2.0 * (m * n * k) as f64 / 1e9;
        println!(
            "{m}x{n}x{k}: gemm {:.0} GFLOP/s, packed {:.0} GFLOP/s",
            f / a,
            f / b
        );
    }
}
