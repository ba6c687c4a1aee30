//! mean / max reductions, log-softmax (full and fused with a gather), cross-entropy and
//! Adam / AdamW: GPU against CPU, backward against finite differences and across devices,
//! known values, and bad input.

use lathe_core::optim::{Adam, AdamConfig};
use lathe_core::testing::{
    assert_close, assert_tensors_close, check_gradients, test_gpu, Tolerance,
};
use lathe_core::{Device, Error, GradStore, MemCategory, Tensor};
use proptest::prelude::*;

const GPU_TOL: Tolerance = Tolerance::new(1e-5, 1e-4);
const FD_TOL: Tolerance = Tolerance::new(2e-2, 2e-2);

/// The same uniform values in [lo, hi) on the CPU and the GPU.
fn both(shape: &[usize], lo: f32, hi: f32, seed: u64) -> (Tensor, Tensor) {
    let cpu = Tensor::rand_uniform(lo, hi, shape, seed, &Device::Cpu).unwrap();
    let gpu = cpu.to_device(&test_gpu()).unwrap();
    (cpu, gpu)
}

/// Deterministic class ids in [0, v) for `n` rows.
fn ids_for(n: usize, v: usize, seed: u64) -> Vec<u32> {
    (0..n)
        .map(|i| ((seed as usize * 31 + i * 17 + i * i * 7) % v) as u32)
        .collect()
}

/// Distinct values (gaps of 0.05, shuffled) so max has no near-ties for finite differences.
fn distinct(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|i| ((i * 37) % n) as f32 * 0.05 - 1.0).collect();
    Tensor::from_vec::<f32>(data, shape, &Device::Cpu).unwrap()
}

/// Gradients of sum(f(x) * w) with respect to `x` (a CPU tensor copied to `device`), for a
/// fixed random weight w, as host vectors: compares backwards across devices.
fn grad_on(
    device: &Device,
    x: &Tensor,
    f: impl Fn(&Tensor) -> lathe_core::Result<Tensor>,
) -> Vec<f32> {
    let var = x.to_device(device).unwrap().detach().into_variable();
    let out = f(&var).unwrap();
    let w = Tensor::rand_uniform(-1.0, 1.0, out.shape(), 99, &Device::Cpu)
        .unwrap()
        .to_device(device)
        .unwrap();
    let grads = out.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
    grads.get(&var).unwrap().to_vec_f32().unwrap()
}

/// `f` on the GPU (forward and backward) against `f` on the CPU.
fn assert_gpu_matches_cpu(
    x: &Tensor,
    f: impl Fn(&Tensor) -> lathe_core::Result<Tensor>,
    tol: Tolerance,
) {
    let gpu = test_gpu();
    let want = f(x).unwrap();
    let got = f(&x.to_device(&gpu).unwrap()).unwrap();
    assert_tensors_close(&got, &want, tol);
    assert_close(&grad_on(&gpu, x, &f), &grad_on(&Device::Cpu, x, &f), tol);
}

fn vocab() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(7),
        Just(300),
        Just(1031),
        Just(257),
        2usize..600
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn mean_gpu_matches_cpu(d0 in 1usize..6, d1 in 1usize..40, d2 in 1usize..9, dim in 0usize..3, seed in 0u64..1000) {
        let (x, _) = both(&[d0, d1, d2], -1.0, 1.0, seed);
        assert_gpu_matches_cpu(&x, |t| t.mean_keepdim(dim), GPU_TOL);
        assert_gpu_matches_cpu(&x, |t| t.mean(dim), GPU_TOL);
        assert_gpu_matches_cpu(&x, |t| t.mean_all(), GPU_TOL);
    }

    #[test]
    fn max_gpu_matches_cpu(d0 in 1usize..6, d1 in 1usize..300, d2 in 1usize..9, dim in 0usize..3, seed in 0u64..1000) {
        let (x, _) = both(&[d0, d1, d2], -1.0, 1.0, seed);
        assert_gpu_matches_cpu(&x, |t| t.max_keepdim(dim), Tolerance::new(0.0, 0.0));
        assert_gpu_matches_cpu(&x, |t| t.max(dim), Tolerance::new(0.0, 0.0));
    }

    #[test]
    fn log_softmax_gather_gpu_matches_cpu(n in 1usize..9, v in vocab(), seed in 0u64..1000) {
        let (x, _) = both(&[n, v], -6.0, 6.0, seed);
        let ids = ids_for(n, v, seed);
        let f = |t: &Tensor| {
            let ids = Tensor::from_slice(&ids, &[n], t.device())?;
            t.log_softmax_gather(&ids)
        };
        assert_gpu_matches_cpu(&x, f, GPU_TOL);
    }

    #[test]
    fn log_softmax_last_gpu_matches_cpu(d0 in 1usize..4, d1 in 1usize..5, v in vocab(), seed in 0u64..1000) {
        let (x, _) = both(&[d0, d1, v], -6.0, 6.0, seed);
        assert_gpu_matches_cpu(&x, |t| t.log_softmax_last(), GPU_TOL);
    }

    #[test]
    fn cross_entropy_gpu_matches_cpu(n in 1usize..12, v in vocab(), ignore_some in any::<bool>(), seed in 0u64..1000) {
        let (x, _) = both(&[n, v], -6.0, 6.0, seed);
        let mut targets = ids_for(n, v, seed);
        let ignore = ignore_some.then_some(u32::MAX);
        if ignore_some {
            // Ignore every third row (row 1 stays, so at least one row counts when n > 1).
            for t in targets.iter_mut().step_by(3) {
                *t = u32::MAX;
            }
        }
        let f = |t: &Tensor| {
            let targets = Tensor::from_slice(&targets, &[n], t.device())?;
            t.cross_entropy(&targets, ignore)
        };
        if n == 1 && ignore_some {
            // Every row ignored: NaN on both devices.
            prop_assert!(f(&x).unwrap().to_scalar().unwrap().is_nan());
            prop_assert!(f(&x.to_device(&test_gpu()).unwrap()).unwrap().to_scalar().unwrap().is_nan());
        } else {
            assert_gpu_matches_cpu(&x, f, GPU_TOL);
        }
    }
}

#[test]
fn reduction_backwards_match_finite_differences() {
    let x = Tensor::rand_uniform(-1.0, 1.0, &[3, 4, 5], 1, &Device::Cpu).unwrap();
    for dim in 0..3 {
        check_gradients(
            |t| t[0].mean_keepdim(dim),
            std::slice::from_ref(&x),
            1e-2,
            FD_TOL,
        )
        .unwrap();
        check_gradients(|t| t[0].mean(dim), std::slice::from_ref(&x), 1e-2, FD_TOL).unwrap();
    }
    check_gradients(|t| t[0].mean_all(), &[x], 1e-2, FD_TOL).unwrap();
    let d = distinct(&[3, 4, 5]);
    for dim in 0..3 {
        check_gradients(
            |t| t[0].max_keepdim(dim),
            std::slice::from_ref(&d),
            1e-2,
            FD_TOL,
        )
        .unwrap();
        check_gradients(|t| t[0].max(dim), std::slice::from_ref(&d), 1e-2, FD_TOL).unwrap();
    }
}

#[test]
fn max_backward_sends_ties_to_the_first_index_on_both_devices() {
    for device in [Device::Cpu, test_gpu()] {
        let x = Tensor::from_vec(vec![1.0f32, 3.0, 3.0, 2.0, 5.0, 5.0], &[2, 3], &device)
            .unwrap()
            .into_variable();
        let m = x.max(1).unwrap();
        assert_eq!(m.to_vec_f32().unwrap(), vec![3.0, 5.0]);
        let grads = m.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get(&x).unwrap().to_vec_f32().unwrap(),
            vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
        );
    }
}

#[test]
fn loss_backwards_match_finite_differences() {
    let x = Tensor::rand_uniform(-2.0, 2.0, &[5, 7], 3, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(ids_for(5, 7, 3), &[5], &Device::Cpu).unwrap();
    check_gradients(
        |t| t[0].log_softmax_gather(&ids),
        std::slice::from_ref(&x),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    check_gradients(
        |t| t[0].log_softmax_last(),
        std::slice::from_ref(&x),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    let x3 = Tensor::rand_uniform(-2.0, 2.0, &[2, 3, 4], 4, &Device::Cpu).unwrap();
    check_gradients(|t| t[0].log_softmax_last(), &[x3], 1e-2, FD_TOL).unwrap();
    let targets = Tensor::from_vec(vec![1u32, 100, 6, 0, 100], &[5], &Device::Cpu).unwrap();
    check_gradients(
        |t| t[0].cross_entropy(&targets, Some(100)),
        std::slice::from_ref(&x),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    check_gradients(|t| t[0].cross_entropy(&ids, None), &[x], 1e-2, FD_TOL).unwrap();
    // A single class: log-softmax is identically 0, so is its gradient.
    let one = Tensor::rand_uniform(-2.0, 2.0, &[4, 1], 5, &Device::Cpu).unwrap();
    let zeros = Tensor::from_vec(vec![0u32; 4], &[4], &Device::Cpu).unwrap();
    check_gradients(|t| t[0].log_softmax_gather(&zeros), &[one], 1e-2, FD_TOL).unwrap();
}

#[test]
fn cross_entropy_matches_hand_computed_values() {
    for device in [Device::Cpu, test_gpu()] {
        let logits =
            Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 1.0, 1.0, 1.0], &[2, 3], &device).unwrap();
        // Row 0: log(e + e^2 + e^3) - 3; row 1: log 3.
        let row0 = ((1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0) as f32;
        let row1 = 3f64.ln() as f32;
        let tol = Tolerance::new(1e-6, 1e-6);
        let t = Tensor::from_vec(vec![2u32, 0], &[2], &device).unwrap();
        let loss = logits.cross_entropy(&t, None).unwrap();
        assert_eq!(loss.shape(), &[1]);
        assert_close(&loss.to_vec_f32().unwrap(), &[(row0 + row1) / 2.0], tol);
        let lp = logits.log_softmax_gather(&t).unwrap();
        assert_close(&lp.to_vec_f32().unwrap(), &[-row0, -row1], tol);
        // Ignored rows drop out of the mean.
        let t = Tensor::from_vec(vec![2u32, 100], &[2], &device).unwrap();
        let loss = logits.cross_entropy(&t, Some(100)).unwrap();
        assert_close(&loss.to_vec_f32().unwrap(), &[row0], tol);
        // The ignored row gets no gradient; the kept one gets softmax - onehot.
        let var = logits.detach().into_variable();
        let grads = var
            .cross_entropy(&t, Some(100))
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(&var).unwrap().to_vec_f32().unwrap();
        let z: f64 = (1..=3).map(|k| (k as f64).exp()).sum();
        let want: Vec<f32> = (1..=3)
            .map(|k| ((k as f64).exp() / z) as f32)
            .enumerate()
            .map(|(j, p)| if j == 2 { p - 1.0 } else { p })
            .chain([0.0; 3])
            .collect();
        assert_close(&g, &want, tol);
        // Every row ignored: 0/0 = NaN, as torch.
        let t = Tensor::from_vec(vec![100u32, 100], &[2], &device).unwrap();
        assert!(logits
            .cross_entropy(&t, Some(100))
            .unwrap()
            .to_scalar()
            .unwrap()
            .is_nan());
    }
}

#[test]
fn log_softmax_is_stable_for_large_logits() {
    for device in [Device::Cpu, test_gpu()] {
        let x = Tensor::from_vec(vec![1000.0f32, 0.0, -1000.0, 80.0], &[1, 4], &device).unwrap();
        let y = x.log_softmax_last().unwrap().to_vec_f32().unwrap();
        assert_close(
            &y,
            &[0.0, -1000.0, -2000.0, -920.0],
            Tolerance::new(1e-3, 1e-6),
        );
        let ids = Tensor::from_vec(vec![3u32], &[1], &device).unwrap();
        let g = x.log_softmax_gather(&ids).unwrap().to_vec_f32().unwrap();
        assert_close(&g, &[-920.0], Tolerance::new(1e-3, 1e-6));
    }
}

#[test]
fn long_rows_and_many_rows_match_cpu() {
    // A GPT-2-sized vocabulary row, and more rows than one dispatch dimension of small ones.
    let (x, xg) = both(&[2, 50_257], -8.0, 8.0, 11);
    let ids = ids_for(2, 50_257, 11);
    let (ic, ig) = (
        Tensor::from_slice(&ids, &[2], &Device::Cpu).unwrap(),
        Tensor::from_slice(&ids, &[2], &test_gpu()).unwrap(),
    );
    assert_tensors_close(
        &xg.log_softmax_gather(&ig).unwrap(),
        &x.log_softmax_gather(&ic).unwrap(),
        GPU_TOL,
    );
    let (x, xg) = both(&[70_000, 3], -2.0, 2.0, 12);
    let ids = ids_for(70_000, 3, 12);
    let (ic, ig) = (
        Tensor::from_slice(&ids, &[70_000], &Device::Cpu).unwrap(),
        Tensor::from_slice(&ids, &[70_000], &test_gpu()).unwrap(),
    );
    assert_tensors_close(
        &xg.log_softmax_gather(&ig).unwrap(),
        &x.log_softmax_gather(&ic).unwrap(),
        GPU_TOL,
    );
    assert_tensors_close(
        &xg.log_softmax_last().unwrap(),
        &x.log_softmax_last().unwrap(),
        GPU_TOL,
    );
}

/// torch.optim.Adam / AdamW, straight from the documented algorithm, in f64.
fn reference_adam(p0: &[f32], grads: &[Vec<f32>], c: &AdamConfig) -> Vec<f64> {
    let (lr, b1, b2, eps, wd) = (
        c.lr as f64,
        c.beta1 as f64,
        c.beta2 as f64,
        c.eps as f64,
        c.weight_decay as f64,
    );
    let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
    let mut m = vec![0.0f64; p.len()];
    let mut v = vec![0.0f64; p.len()];
    for (t, grad) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..p.len() {
            let mut g = grad[i] as f64;
            if c.decoupled {
                p[i] -= lr * wd * p[i];
            } else {
                g += wd * p[i];
            }
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let m_hat = m[i] / (1.0 - b1.powi(t));
            let v_hat = v[i] / (1.0 - b2.powi(t));
            p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
    p
}

#[test]
fn adam_and_adamw_match_the_torch_reference_on_both_devices() {
    let configs = [
        AdamConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..AdamConfig::default()
        },
        AdamConfig {
            lr: 1e-2,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-6,
            ..AdamConfig::adamw(1e-2, 0.1)
        },
        AdamConfig::default(),
    ];
    let steps = 5;
    for device in [Device::Cpu, test_gpu()] {
        for config in configs {
            let shapes: [&[usize]; 2] = [&[3, 37], &[301]];
            let params: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Tensor::rand_uniform(-1.0, 1.0, s, i as u64, &device)
                        .unwrap()
                        .into_variable()
                })
                .collect();
            let initial: Vec<Vec<f32>> = params.iter().map(|p| p.to_vec_f32().unwrap()).collect();
            // Handles the model keeps: the optimizer updates their storage in place.
            let handles = params.clone();
            let mut adam = Adam::new(params, config).unwrap();
            let mut history: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 2];
            for step in 0..steps {
                let mut grads = GradStore::default();
                for (i, p) in handles.iter().enumerate() {
                    let g = Tensor::rand_uniform(
                        -1.0,
                        1.0,
                        p.shape(),
                        100 + step * 2 + i as u64,
                        &device,
                    )
                    .unwrap();
                    history[i].push(g.to_vec_f32().unwrap());
                    grads.insert(p, g);
                }
                adam.step(&grads).unwrap();
            }
            assert_eq!(adam.step_count(), steps);
            for (i, p) in handles.iter().enumerate() {
                let want: Vec<f32> = reference_adam(&initial[i], &history[i], &config)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect();
                assert_close(&p.to_vec_f32().unwrap(), &want, Tolerance::new(2e-6, 1e-5));
            }
            if let Device::Gpu(_) = device {
                let (m, v) = adam.moments(0).unwrap();
                assert_eq!(m.gpu_buffer().unwrap().category(), MemCategory::Optimizer);
                assert_eq!(v.gpu_buffer().unwrap().category(), MemCategory::Optimizer);
            }
        }
    }
}

#[test]
fn adam_steps_from_backward_and_skips_params_without_gradients() {
    for device in [Device::Cpu, test_gpu()] {
        let p = Tensor::rand_uniform(-1.0, 1.0, &[4, 3], 1, &device)
            .unwrap()
            .into_variable();
        let unused = Tensor::rand_uniform(-1.0, 1.0, &[5], 2, &device)
            .unwrap()
            .into_variable();
        let p0 = p.to_vec_f32().unwrap();
        let unused0 = unused.to_vec_f32().unwrap();
        let config = AdamConfig::adamw(0.05, 0.01);
        let mut adam = Adam::new(vec![p.clone(), unused.clone()], config).unwrap();
        let mut grads_seen = Vec::new();
        for _ in 0..3 {
            // loss = sum(p^2): gradient 2p at the current p.
            let grads = p.mul(&p).unwrap().sum_all().unwrap().backward().unwrap();
            grads_seen.push(grads.get(&p).unwrap().to_vec_f32().unwrap());
            assert!(grads.get(&unused).is_none());
            adam.step(&grads).unwrap();
        }
        let want: Vec<f32> = reference_adam(&p0, &grads_seen, &config)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        assert_close(&p.to_vec_f32().unwrap(), &want, Tolerance::new(2e-6, 1e-5));
        assert_eq!(unused.to_vec_f32().unwrap(), unused0);
    }
}

#[test]
fn adam_rejects_bad_input() {
    let frozen = Tensor::zeros(&[3], &Device::Cpu).unwrap();
    let err = Adam::new(vec![frozen], AdamConfig::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a variable"), "{err}");
    let ids = Tensor::from_vec(vec![1u32], &[1], &Device::Cpu)
        .unwrap()
        .into_variable();
    assert!(matches!(
        Adam::new(vec![ids], AdamConfig::default()),
        Err(Error::DType { .. })
    ));
    for device in [Device::Cpu, test_gpu()] {
        let p = Tensor::zeros(&[3], &device).unwrap().into_variable();
        let mut adam = Adam::new(vec![p.clone()], AdamConfig::default()).unwrap();
        let mut grads = GradStore::default();
        grads.insert(&p, Tensor::zeros(&[4], &device).unwrap());
        let err = adam.step(&grads).unwrap_err();
        assert!(
            err.to_string().contains("does not match parameter 0"),
            "{err}"
        );
        assert_eq!(adam.step_count(), 0, "a rejected step does not count");
    }
}

#[test]
fn losses_reject_bad_input() {
    for device in [Device::Cpu, test_gpu()] {
        let logits = Tensor::zeros(&[3, 5], &device).unwrap();
        let bad = Tensor::from_vec(vec![0u32, 5, 1], &[3], &device).unwrap();
        for err in [
            logits.log_softmax_gather(&bad).unwrap_err(),
            logits.cross_entropy(&bad, None).unwrap_err(),
            logits.cross_entropy(&bad, Some(1)).unwrap_err(),
        ] {
            assert!(
                matches!(
                    err,
                    Error::IndexOutOfRange {
                        index: 5,
                        size: 5,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(
                err.to_string().contains("index 5 out of range for size 5"),
                "{err}"
            );
        }
        // The out-of-range id is fine when it is the ignore index.
        assert!(logits.cross_entropy(&bad, Some(5)).is_ok());
        let short = Tensor::from_vec(vec![0u32, 1], &[2], &device).unwrap();
        let err = logits.log_softmax_gather(&short).unwrap_err();
        assert!(
            err.to_string().contains("do not match the leading dims"),
            "{err}"
        );
        let err = logits.cross_entropy(&short, None).unwrap_err();
        assert!(
            err.to_string().contains("do not match the leading dims"),
            "{err}"
        );
        let float_ids = Tensor::zeros(&[3], &device).unwrap();
        assert!(matches!(
            logits.log_softmax_gather(&float_ids),
            Err(Error::DType { .. })
        ));
        let empty = Tensor::zeros(&[3, 0], &device).unwrap();
        let err = empty.log_softmax_last().unwrap_err();
        assert!(err.to_string().contains("no classes"), "{err}");
        let err = empty.max(1).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        assert!(matches!(logits.mean(2), Err(Error::DimOutOfRange { .. })));
        assert!(matches!(
            logits.max_keepdim(2),
            Err(Error::DimOutOfRange { .. })
        ));
    }
    let cpu_ids = Tensor::from_vec(vec![0u32, 1, 2], &[3], &Device::Cpu).unwrap();
    let gpu_logits = Tensor::zeros(&[3, 5], &test_gpu()).unwrap();
    let err = gpu_logits.log_softmax_gather(&cpu_ids).unwrap_err();
    assert!(err.to_string().contains("different devices"), "{err}");
}

/// transformers' schedules at a few steps (peak 1, 2 warm-up steps of 10).
#[test]
fn lr_schedules_match_transformers() {
    use lathe_core::{LrSchedule, ScheduleKind};
    let at = |kind, step| {
        LrSchedule {
            peak: 1.0,
            warmup_steps: 2,
            total_steps: 10,
            kind,
        }
        .lr(step)
    };
    for kind in [
        ScheduleKind::Constant,
        ScheduleKind::Linear,
        ScheduleKind::Cosine,
    ] {
        assert_eq!(at(kind, 0), 0.0);
        assert_eq!(at(kind, 1), 0.5);
        assert_eq!(at(kind, 2), 1.0);
    }
    assert_eq!(at(ScheduleKind::Constant, 9), 1.0);
    assert!((at(ScheduleKind::Linear, 6) - 0.5).abs() < 1e-7);
    assert!((at(ScheduleKind::Cosine, 6) - 0.5).abs() < 1e-7);
    assert!((at(ScheduleKind::Cosine, 4) - 0.853_553_4).abs() < 1e-6);
    assert_eq!(at(ScheduleKind::Linear, 10), 0.0);
    assert_eq!(at(ScheduleKind::Linear, 12), 0.0);
}

/// torch.nn.utils.clip_grad_norm_: the global norm over all gradients, scaled by
/// max_norm / (norm + 1e-6) only when that is below 1.
#[test]
fn clip_grad_norm_scales_by_the_global_norm() {
    let a = Tensor::from_vec(vec![3.0f32, 0.0], &[2], &Device::Cpu)
        .unwrap()
        .into_variable();
    let b = Tensor::from_vec(vec![0.0f32, 4.0], &[2], &Device::Cpu)
        .unwrap()
        .into_variable();
    let loss = a
        .mul(&a)
        .unwrap()
        .sum_all()
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap()
        .add(
            &b.mul(&b)
                .unwrap()
                .sum_all()
                .unwrap()
                .affine(0.5, 0.0)
                .unwrap(),
        )
        .unwrap();
    // Gradients are a and b themselves: norm 5.
    let mut grads = loss.backward().unwrap();
    let norm = lathe_core::clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let coef = 1.0 / (5.0 + 1e-6);
    assert_close(
        &grads.get(&a).unwrap().to_vec_f32().unwrap(),
        &[3.0 * coef, 0.0],
        Tolerance::new(1e-7, 1e-6),
    );
    assert_close(
        &grads.get(&b).unwrap().to_vec_f32().unwrap(),
        &[0.0, 4.0 * coef],
        Tolerance::new(1e-7, 1e-6),
    );
    // Under the bound nothing changes.
    let mut grads = loss.backward().unwrap();
    lathe_core::clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 10.0).unwrap();
    assert_eq!(grads.get(&a).unwrap().to_vec_f32().unwrap(), vec![3.0, 0.0]);
}

/// Saving (step, moments) and restoring them into a fresh optimizer continues the run
/// exactly.
#[test]
fn adam_restore_continues_exactly() {
    let run = |steps: usize, p: &Tensor, adam: &mut Adam| {
        for _ in 0..steps {
            let loss = p.mul(p).unwrap().sum_all().unwrap();
            adam.step(&loss.backward().unwrap()).unwrap();
        }
    };
    let init = Tensor::rand_uniform(-1.0, 1.0, &[5], 3, &Device::Cpu).unwrap();
    let straight = init.affine(1.0, 0.0).unwrap().into_variable();
    let mut adam = Adam::new(vec![straight.clone()], AdamConfig::adamw(0.1, 0.01)).unwrap();
    run(4, &straight, &mut adam);

    let first = init.affine(1.0, 0.0).unwrap().into_variable();
    let mut adam1 = Adam::new(vec![first.clone()], AdamConfig::adamw(0.1, 0.01)).unwrap();
    run(2, &first, &mut adam1);
    let (m, v) = adam1.moments(0).unwrap();
    let saved = (m.detach(), v.detach());
    let resumed = first.detach().affine(1.0, 0.0).unwrap().into_variable();
    let mut adam2 = Adam::new(vec![resumed.clone()], AdamConfig::adamw(0.1, 0.01)).unwrap();
    adam2.restore(adam1.step_count(), vec![saved]).unwrap();
    run(2, &resumed, &mut adam2);
    assert_eq!(
        resumed.to_vec_f32().unwrap(),
        straight.to_vec_f32().unwrap()
    );
    let bad = Tensor::zeros(&[4], &Device::Cpu).unwrap();
    assert!(adam2.restore(1, vec![(bad.clone(), bad)]).is_err());
}

/// entropy_last: the entropy of the softmax of each row, against an f64 reference on the
/// CPU and the GPU (rows shorter and longer than a workgroup, a large common offset, a
/// peaked row); no gradient is recorded.
#[test]
fn entropy_last_matches_an_f64_reference() {
    let gpu = lathe_core::testing::test_gpu();
    for (rows, v, offset, scale) in [
        (3usize, 5usize, 0.0f32, 1.0f32),
        (4, 300, 100.0, 5.0),
        (2, 49152, 0.0, 8.0),
    ] {
        let x = Tensor::randn(&[rows, v], 11, &Device::Cpu)
            .unwrap()
            .affine(scale, offset)
            .unwrap();
        let xs = x.to_vec_f32().unwrap();
        let want: Vec<f32> = xs
            .chunks(v)
            .map(|r| {
                let m = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let s: f64 = r.iter().map(|&l| (l as f64 - m).exp()).sum();
                let lse = m + s.ln();
                let mean: f64 = r.iter().map(|&l| (l as f64 - m).exp() / s * l as f64).sum();
                (lse - mean) as f32
            })
            .collect();
        let tol = Tolerance::new(2e-4, 1e-4);
        assert_close(&x.entropy_last().unwrap().to_vec_f32().unwrap(), &want, tol);
        let on_gpu = x.to_device(&gpu).unwrap().entropy_last().unwrap();
        assert_eq!(on_gpu.shape(), [rows]);
        assert_close(&on_gpu.to_vec_f32().unwrap(), &want, tol);
    }
    let v = Tensor::randn(&[2, 3], 1, &Device::Cpu)
        .unwrap()
        .into_variable();
    assert!(!v.entropy_last().unwrap().tracks_grad());
}

/// loss, dh and dw of `3 * loss(h, w)` (an upstream gradient other than one) for a loss of
/// (h, w), on h's device.
fn loss_and_grads(
    h: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> lathe_core::Result<Tensor>,
) -> (f32, Vec<f32>, Vec<f32>) {
    let (h, w) = (h.detach().into_variable(), w.detach().into_variable());
    let loss = f(&h, &w).unwrap();
    assert_eq!(loss.shape(), &[1]);
    let grads = loss.affine(3.0, 0.0).unwrap().backward().unwrap();
    (
        loss.to_scalar().unwrap(),
        grads.get(&h).unwrap().to_vec_f32().unwrap(),
        grads.get(&w).unwrap().to_vec_f32().unwrap(),
    )
}

#[test]
fn linear_cross_entropy_equals_the_composed_ops_on_both_devices() {
    let tol = Tolerance::new(1e-5, 1e-5);
    // 300 x 30000 logits: the CPU's fused pass takes chunks of 192 rows, so two run.
    for (n, hd, v) in [(5, 3, 7), (300, 16, 30_000)] {
        let h = Tensor::rand_uniform(-1.0, 1.0, &[n, hd], 11, &Device::Cpu).unwrap();
        let w = Tensor::rand_uniform(-1.0, 1.0, &[v, hd], 12, &Device::Cpu).unwrap();
        let mut ids = ids_for(n, v, 13);
        ids[1] = u32::MAX;
        ids[n - 1] = u32::MAX;
        for ignore in [None, Some(u32::MAX)] {
            let ids: Vec<u32> = ids
                .iter()
                .map(|&t| {
                    if ignore.is_none() && t == u32::MAX {
                        0
                    } else {
                        t
                    }
                })
                .collect();
            let targets = |d: &Device| Tensor::from_slice(&ids, &[n], d).unwrap();
            let composed = |h: &Tensor, w: &Tensor| {
                h.matmul_t(w, false, true)?
                    .cross_entropy(&targets(h.device()), ignore)
            };
            let fused =
                |h: &Tensor, w: &Tensor| h.linear_cross_entropy(w, &targets(h.device()), ignore);
            let want = loss_and_grads(&h, &w, composed);
            let gpu = test_gpu();
            let (hg, wg) = (h.to_device(&gpu).unwrap(), w.to_device(&gpu).unwrap());
            for got in [
                loss_and_grads(&h, &w, fused),
                loss_and_grads(&hg, &wg, fused),
            ] {
                assert_close(&[got.0], &[want.0], tol);
                assert_close(&got.1, &want.1, tol);
                assert_close(&got.2, &want.2, tol);
            }
        }
    }
    // A frozen weight gets no gradient; the input still does.
    let h = Tensor::rand_uniform(-1.0, 1.0, &[4, 3], 1, &Device::Cpu)
        .unwrap()
        .into_variable();
    let w = Tensor::rand_uniform(-1.0, 1.0, &[6, 3], 2, &Device::Cpu).unwrap();
    let t = Tensor::from_vec(vec![0u32, 5, 2, 2], &[4], &Device::Cpu).unwrap();
    let grads = h
        .linear_cross_entropy(&w, &t, None)
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&h).is_some() && grads.get(&w).is_none());
}

#[test]
fn linear_cross_entropy_matches_finite_differences() {
    let h = Tensor::rand_uniform(-1.0, 1.0, &[5, 4], 21, &Device::Cpu).unwrap();
    let w = Tensor::rand_uniform(-1.0, 1.0, &[7, 4], 22, &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(vec![1u32, 100, 6, 0, 3], &[5], &Device::Cpu).unwrap();
    check_gradients(
        |t| t[0].linear_cross_entropy(&t[1], &targets, Some(100)),
        &[h, w],
        1e-2,
        FD_TOL,
    )
    .unwrap();
}

#[test]
fn linear_cross_entropy_rejects_bad_input_and_is_nan_when_all_ignored() {
    let cpu = Device::Cpu;
    let h = Tensor::rand_uniform(-1.0, 1.0, &[3, 4], 1, &cpu).unwrap();
    let w = Tensor::rand_uniform(-1.0, 1.0, &[5, 4], 2, &cpu).unwrap();
    let t = |v: Vec<u32>| Tensor::from_vec(v.clone(), &[v.len()], &cpu).unwrap();
    let ignored = h
        .linear_cross_entropy(&w, &t(vec![9, 9, 9]), Some(9))
        .unwrap();
    assert!(ignored.to_scalar().unwrap().is_nan());
    let w_bad = Tensor::rand_uniform(-1.0, 1.0, &[5, 3], 2, &cpu).unwrap();
    let h3 = h.reshape(&[1, 3, 4]).unwrap();
    assert!(matches!(
        h.linear_cross_entropy(&w_bad, &t(vec![0, 1, 2]), None),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        h3.linear_cross_entropy(&w, &t(vec![0, 1, 2]), None),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy(&w, &t(vec![0, 1]), None),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        h.linear_cross_entropy(&w, &t(vec![0, 5, 1]), None),
        Err(Error::IndexOutOfRange {
            index: 5,
            size: 5,
            ..
        })
    ));
    let f_targets = Tensor::from_vec(vec![0f32, 1.0, 2.0], &[3], &cpu).unwrap();
    assert!(h.linear_cross_entropy(&w, &f_targets, None).is_err());
    let gpu_w = w.to_device(&test_gpu()).unwrap();
    assert!(matches!(
        h.linear_cross_entropy(&gpu_w, &t(vec![0, 1, 2]), None),
        Err(Error::DeviceMismatch { .. })
    ));
}

/// log-probs, entropy and the gradients of a weighted sum of the log-probs (weights other
/// than one per row: the policy-gradient losses' shape), on h's device.
fn token_logps_and_grads(
    h: &Tensor,
    w: &Tensor,
    ids: &[u32],
    ignore: Option<u32>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (h, w) = (h.detach().into_variable(), w.detach());
    let (logps, entropy) = h.linear_log_softmax_gather(&w, ids, ignore, true).unwrap();
    let n = ids.len();
    let weights: Vec<f32> = (0..n).map(|i| 1.5 - 0.25 * (i % 7) as f32).collect();
    let weights = Tensor::from_vec(weights, &[n], h.device()).unwrap();
    let grads = logps
        .mul(&weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let entropy = entropy.unwrap();
    assert!(!entropy.tracks_grad());
    (
        logps.to_vec_f32().unwrap(),
        entropy.to_vec_f32().unwrap(),
        grads.get(&h).unwrap().to_vec_f32().unwrap(),
    )
}

#[test]
fn linear_log_softmax_gather_equals_the_composed_ops_on_both_devices() {
    let tol = Tolerance::new(1e-5, 1e-5);
    // 300 x 30000 logits: the CPU's pass takes chunks of 192 rows, so two run.
    for (n, hd, v) in [(5, 3, 7), (300, 16, 30_000)] {
        let h = Tensor::rand_uniform(-1.0, 1.0, &[n, hd], 31, &Device::Cpu).unwrap();
        let w = Tensor::rand_uniform(-1.0, 1.0, &[v, hd], 32, &Device::Cpu).unwrap();
        let mut ids = ids_for(n, v, 33);
        ids[1] = u32::MAX;
        ids[n - 1] = u32::MAX;
        let kept: Vec<f32> = ids
            .iter()
            .map(|&t| if t == u32::MAX { 0.0 } else { 1.0 })
            .collect();
        // The composed ops, every row computed (class 0 for ignored ones), then masked.
        let (want_logps, want_entropy, want_dh) = {
            let hv = h.detach().into_variable();
            let safe: Vec<u32> = ids
                .iter()
                .map(|&t| if t == u32::MAX { 0 } else { t })
                .collect();
            let logits = hv.matmul_t(&w, false, true).unwrap();
            let mask = Tensor::from_vec(kept.clone(), &[n], &Device::Cpu).unwrap();
            let logps = logits
                .log_softmax_gather(&Tensor::from_vec(safe, &[n], &Device::Cpu).unwrap())
                .unwrap()
                .mul(&mask)
                .unwrap();
            let entropy = logits.entropy_last().unwrap().mul(&mask).unwrap();
            let weights: Vec<f32> = (0..n).map(|i| 1.5 - 0.25 * (i % 7) as f32).collect();
            let weights = Tensor::from_vec(weights, &[n], &Device::Cpu).unwrap();
            let grads = logps
                .mul(&weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (
                logps.to_vec_f32().unwrap(),
                entropy.to_vec_f32().unwrap(),
                grads.get(&hv).unwrap().to_vec_f32().unwrap(),
            )
        };
        let gpu = test_gpu();
        let (hg, wg) = (h.to_device(&gpu).unwrap(), w.to_device(&gpu).unwrap());
        for (logps, entropy, dh) in [
            token_logps_and_grads(&h, &w, &ids, Some(u32::MAX)),
            token_logps_and_grads(&hg, &wg, &ids, Some(u32::MAX)),
        ] {
            assert_close(&logps, &want_logps, tol);
            assert_close(&entropy, &want_entropy, tol);
            assert_close(&dh, &want_dh, tol);
            assert_eq!((logps[1], entropy[1]), (0.0, 0.0), "an ignored row is 0");
            assert!(dh[hd..2 * hd].iter().all(|&g| g == 0.0));
        }
    }
    // Bad targets: out of range, or not one per row.
    let h = Tensor::rand_uniform(-1.0, 1.0, &[2, 3], 1, &Device::Cpu).unwrap();
    let w = Tensor::rand_uniform(-1.0, 1.0, &[4, 3], 2, &Device::Cpu).unwrap();
    assert!(matches!(
        h.linear_log_softmax_gather(&w, &[0, 4], None, false),
        Err(Error::IndexOutOfRange { .. })
    ));
    assert!(h.linear_log_softmax_gather(&w, &[0], None, false).is_err());
}

#[test]
fn linear_log_softmax_gather_matches_finite_differences() {
    let h = Tensor::rand_uniform(-1.0, 1.0, &[5, 4], 41, &Device::Cpu).unwrap();
    let w = Tensor::rand_uniform(-1.0, 1.0, &[7, 4], 42, &Device::Cpu).unwrap();
    let weights = Tensor::from_vec(vec![1.0f32, -2.0, 0.5, 3.0, -1.0], &[5], &Device::Cpu).unwrap();
    let targets = [1u32, 100, 6, 0, 3];
    // A frozen weight: the fused pass (h's gradient only).
    check_gradients(
        |t| {
            t[0].linear_log_softmax_gather(&w, &targets, Some(100), false)?
                .0
                .mul(&weights)?
                .sum_all()
        },
        std::slice::from_ref(&h),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    // A weight that trains: the composed ops, both gradients.
    check_gradients(
        |t| {
            t[0].linear_log_softmax_gather(&t[1], &targets, Some(100), false)?
                .0
                .mul(&weights)?
                .sum_all()
        },
        &[h, w],
        1e-2,
        FD_TOL,
    )
    .unwrap();
}
