//! GPU against CPU and backward against finite differences for matmul, the binary ops and sum.

use lathe_core::testing::{assert_tensors_close, check_gradients, test_gpu, Tolerance};
use lathe_core::{DType, Device, Tensor};
use proptest::prelude::*;

const GPU_TOL: Tolerance = Tolerance::new(1e-4, 1e-4);
const FD_TOL: Tolerance = Tolerance::new(2e-2, 2e-2);

fn both(shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    let cpu = Tensor::rand_uniform(-1.0, 1.0, shape, seed, &Device::Cpu).unwrap();
    let gpu = cpu.to_device(&test_gpu()).unwrap();
    (cpu, gpu)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn matmul_gpu_matches_cpu(batch in 1usize..4, m in 1usize..70, n in 1usize..70, k in 1usize..70,
                              ta in any::<bool>(), tb in any::<bool>(), seed in 0u64..1000) {
        let a_shape = if ta { vec![batch, k, m] } else { vec![batch, m, k] };
        let b_shape = if tb { vec![batch, n, k] } else { vec![batch, k, n] };
        let (a, ag) = both(&a_shape, seed);
        let (b, bg) = both(&b_shape, seed + 1);
        let want = a.matmul_t(&b, ta, tb).unwrap();
        let got = ag.matmul_t(&bg, ta, tb).unwrap();
        assert_tensors_close(&got, &want, Tolerance::new(1e-4, 1e-4));
    }

    /// A half-precision b (a frozen f16 weight): the GPU reads the packed halves; both
    /// devices must equal the f32 product of the f16-rounded values.
    #[test]
    fn matmul_half_b_matches_f32_of_rounded_weights(m in 1usize..70, n in 1usize..70, k in 1usize..70,
                                                    tb in any::<bool>(), seed in 0u64..1000) {
        let b_shape = if tb { vec![n, k] } else { vec![k, n] };
        let (a, ag) = both(&[2, m, k], seed);
        let b16 = Tensor::rand_uniform(-1.0, 1.0, &b_shape, seed + 1, &Device::Cpu).unwrap()
            .to_dtype(DType::F16).unwrap();
        let want = a.matmul_t(&b16.to_dtype(DType::F32).unwrap(), false, tb).unwrap();
        let cpu = a.matmul_t(&b16, false, tb).unwrap();
        let gpu = ag.matmul_t(&b16.to_device(&test_gpu()).unwrap(), false, tb).unwrap();
        assert_eq!(cpu.dtype(), DType::F32);
        assert_tensors_close(&cpu, &want, Tolerance::new(1e-6, 1e-6));
        assert_tensors_close(&gpu, &want, GPU_TOL);
    }

    #[test]
    fn binary_ops_broadcast_alike(d0 in 1usize..5, d1 in 1usize..37, d2 in 1usize..13, which in 0usize..4,
                                  b_kind in 0usize..3, seed in 0u64..1000) {
        let a_shape = vec![d0, d1, d2];
        let b_shape = match b_kind { 0 => vec![d0, d1, d2], 1 => vec![d2], _ => vec![d0, 1, d2] };
        let (a, ag) = both(&a_shape, seed);
        let (b, bg) = both(&b_shape, seed + 1);
        // Keep divisors away from zero.
        let (b, bg) = if which == 3 { (b.affine(1.0, 3.0).unwrap(), bg.affine(1.0, 3.0).unwrap()) } else { (b, bg) };
        let run = |x: &Tensor, y: &Tensor| match which { 0 => x.add(y), 1 => x.sub(y), 2 => x.mul(y), _ => x.div(y) }.unwrap();
        assert_tensors_close(&run(&ag, &bg), &run(&a, &b), GPU_TOL);
    }

    #[test]
    fn sum_gpu_matches_cpu(d0 in 1usize..6, d1 in 1usize..40, d2 in 1usize..9, dim in 0usize..3, seed in 0u64..1000) {
        let (a, ag) = both(&[d0, d1, d2], seed);
        assert_tensors_close(&ag.sum_keepdim(dim).unwrap(), &a.sum_keepdim(dim).unwrap(), GPU_TOL);
    }
}

#[test]
fn matmul_backward_matches_finite_differences() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = Tensor::rand_uniform(
            -1.0,
            1.0,
            &if ta { [2, 4, 3] } else { [2, 3, 4] },
            1,
            &Device::Cpu,
        )
        .unwrap();
        let b = Tensor::rand_uniform(
            -1.0,
            1.0,
            &if tb { [2, 5, 4] } else { [2, 4, 5] },
            2,
            &Device::Cpu,
        )
        .unwrap();
        check_gradients(|x| x[0].matmul_t(&x[1], ta, tb), &[a, b], 1e-2, FD_TOL).unwrap();
    }
    // A linear layer: batched input, one shared weight (out, in).
    let x = Tensor::rand_uniform(-1.0, 1.0, &[2, 3, 4], 3, &Device::Cpu).unwrap();
    let w = Tensor::rand_uniform(-1.0, 1.0, &[5, 4], 4, &Device::Cpu).unwrap();
    check_gradients(|x| x[0].matmul_t(&x[1], false, true), &[x, w], 1e-2, FD_TOL).unwrap();
}

/// Through a frozen f16 weight the input gradient is dY @ W (the widened halves), on both
/// devices; an f16 variable's gradient comes back as f16.
#[test]
fn matmul_half_b_backward() {
    let w16 = Tensor::rand_uniform(-1.0, 1.0, &[5, 4], 4, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let w32 = w16.to_dtype(DType::F32).unwrap();
    let x = Tensor::rand_uniform(-1.0, 1.0, &[2, 3, 4], 3, &Device::Cpu).unwrap();
    let grad_x = |x: &Tensor, w: &Tensor| {
        let x = x.clone().into_variable();
        let loss = x.matmul_t(w, false, true).unwrap().sum_all().unwrap();
        loss.backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .to_vec_f32()
            .unwrap()
    };
    let want = grad_x(&x, &w32);
    let gpu = test_gpu();
    for (xd, wd) in [
        (x.clone(), w16.clone()),
        (x.to_device(&gpu).unwrap(), w16.to_device(&gpu).unwrap()),
    ] {
        lathe_core::testing::assert_close(&grad_x(&xd, &wd), &want, Tolerance::new(1e-5, 1e-5));
    }
    let wv = w16.clone().into_variable();
    let loss = x.matmul_t(&wv, false, true).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(grads.get(&wv).unwrap().dtype(), DType::F16);
}

#[test]
fn binary_backward_matches_finite_differences() {
    let a = Tensor::rand_uniform(-1.0, 1.0, &[2, 3, 4], 1, &Device::Cpu).unwrap();
    let b = Tensor::rand_uniform(1.0, 2.0, &[3, 1], 2, &Device::Cpu).unwrap();
    check_gradients(|x| x[0].add(&x[1]), &[a.clone(), b.clone()], 1e-2, FD_TOL).unwrap();
    check_gradients(|x| x[0].sub(&x[1]), &[a.clone(), b.clone()], 1e-2, FD_TOL).unwrap();
    check_gradients(|x| x[0].mul(&x[1]), &[a.clone(), b.clone()], 1e-2, FD_TOL).unwrap();
    check_gradients(|x| x[0].div(&x[1]), &[a.clone(), b.clone()], 1e-2, FD_TOL).unwrap();
    let bias = Tensor::rand_uniform(-1.0, 1.0, &[4], 3, &Device::Cpu).unwrap();
    check_gradients(|x| x[0].bias_add(&x[1]), &[a.clone(), bias], 1e-2, FD_TOL).unwrap();
    check_gradients(|x| x[0].affine(-2.0, 0.5)?.sum(1), &[a], 1e-2, FD_TOL).unwrap();
}

#[test]
fn gradients_flow_through_frozen_tensors_on_both_devices() {
    for device in [Device::Cpu, test_gpu()] {
        let frozen = Tensor::rand_uniform(-1.0, 1.0, &[4, 3], 1, &device).unwrap();
        let x = Tensor::rand_uniform(-1.0, 1.0, &[2, 4], 2, &device)
            .unwrap()
            .into_variable();
        let loss = x.matmul(&frozen).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(&frozen).is_none(),
            "a frozen tensor got a gradient"
        );
        // d sum(x W) / dx = row sums of W, repeated per row of x.
        let w = frozen.to_vec_f32().unwrap();
        let row_sums: Vec<f32> = (0..4).map(|i| w[i * 3..i * 3 + 3].iter().sum()).collect();
        let want: Vec<f32> = row_sums.iter().chain(&row_sums).copied().collect();
        lathe_core::testing::assert_close(
            &grads.get(&x).unwrap().to_vec_f32().unwrap(),
            &want,
            Tolerance::new(1e-5, 1e-5),
        );
    }
}

#[test]
fn shape_and_dtype_mismatches_are_errors() {
    let a = Tensor::zeros(&[2, 3], &Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4, 5], &Device::Cpu).unwrap();
    assert!(a.matmul(&b).unwrap_err().to_string().contains("inner dims"));
    assert!(a.add(&b).unwrap_err().to_string().contains("broadcast"));
    let ids = Tensor::from_vec(vec![1u32, 2], &[2], &Device::Cpu).unwrap();
    assert!(ids.add(&ids).unwrap_err().to_string().contains("dtype"));
    assert!(Tensor::from_vec(vec![1.0f32; 5], &[2, 3], &Device::Cpu).is_err());
    assert!(a.reshape(&[7]).is_err());
    let g = a.to_device(&test_gpu()).unwrap();
    assert!(a
        .add(&g)
        .unwrap_err()
        .to_string()
        .contains("different devices"));
}

#[test]
fn f16_variables_used_twice_accumulate_their_gradients() {
    for device in [Device::Cpu, test_gpu()] {
        let x = Tensor::from_vec(vec![0.5f32, -1.0, 2.0], &[3], &device)
            .unwrap()
            .to_dtype(lathe_core::DType::F16)
            .unwrap()
            .into_variable();
        let a = x
            .narrow(0, 0, 2)
            .unwrap()
            .to_dtype(lathe_core::DType::F32)
            .unwrap();
        let b = x
            .narrow(0, 1, 2)
            .unwrap()
            .to_dtype(lathe_core::DType::F32)
            .unwrap();
        let grads = a.add(&b).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(&x).unwrap();
        assert_eq!(g.dtype(), lathe_core::DType::F16);
        assert_eq!(g.to_vec_f32().unwrap(), vec![1.0, 2.0, 1.0]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn affine_gpu_matches_cpu(n in 1usize..3000, mul in -3.0f32..3.0, add in -3.0f32..3.0, seed in 0u64..1000) {
        let (a, ag) = both(&[n], seed);
        assert_tensors_close(&ag.affine(mul, add).unwrap(), &a.affine(mul, add).unwrap(), Tolerance::new(1e-6, 1e-6));
    }

    /// The backwards of matmul, the binary ops, sum and affine give the same gradients on
    /// both devices (a graph mixing them, with broadcasting and a shared weight).
    #[test]
    fn backward_gpu_matches_cpu(b in 1usize..4, t in 1usize..9, h in 1usize..40, o in 1usize..20, seed in 0u64..1000) {
        let grads_on = |device: &Device| {
            let x = Tensor::rand_uniform(-1.0, 1.0, &[b, t, h], seed, &Device::Cpu).unwrap().to_device(device).unwrap().into_variable();
            let w = Tensor::rand_uniform(-1.0, 1.0, &[o, h], seed + 1, &Device::Cpu).unwrap().to_device(device).unwrap().into_variable();
            let bias = Tensor::rand_uniform(-1.0, 1.0, &[o], seed + 2, &Device::Cpu).unwrap().to_device(device).unwrap().into_variable();
            let scale = Tensor::rand_uniform(1.0, 2.0, &[t, 1], seed + 3, &Device::Cpu).unwrap().to_device(device).unwrap().into_variable();
            let y = x.matmul_t(&w, false, true).unwrap().bias_add(&bias).unwrap();
            let y = y.mul(&y).unwrap().div(&scale).unwrap().sub(&y.affine(0.5, 1.0).unwrap()).unwrap();
            let loss = y.sum(1).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            [&x, &w, &bias, &scale].map(|v| grads.get(v).unwrap().to_vec_f32().unwrap())
        };
        let cpu = grads_on(&Device::Cpu);
        let gpu = grads_on(&test_gpu());
        for (g, c) in gpu.iter().zip(&cpu) {
            lathe_core::testing::assert_close(g, c, Tolerance::new(1e-4, 1e-4));
        }
    }
}
