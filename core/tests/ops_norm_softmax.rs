//! Activations (GELU erf/tanh, SiLU, ReLU), LayerNorm, RMSNorm, softmax and masked attention
//! softmax: GPU against CPU (forward and backward), backward against finite differences,
//! known values, mask semantics and bad input.

use lathe_core::ops::softmax::AttentionMask;
use lathe_core::ops::unary::{erf_approx, GeluKind};
use lathe_core::testing::{
    assert_close, assert_tensors_close, check_gradients, test_gpu, Tolerance,
};
use lathe_core::{Device, Result, Tensor};
use proptest::prelude::*;

const GPU_TOL: Tolerance = Tolerance::new(1e-5, 1e-4);
const ACT_TOL: Tolerance = Tolerance::new(1e-6, 1e-5);
const FD_TOL: Tolerance = Tolerance::new(2e-2, 2e-2);

/// Row lengths worth testing: 1, odd, around and past the 256-wide workgroup.
const ROW_LENS: [usize; 10] = [1, 2, 3, 7, 33, 255, 256, 257, 300, 513];

fn both_in(lo: f32, hi: f32, shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    let cpu = Tensor::rand_uniform(lo, hi, shape, seed, &Device::Cpu).unwrap();
    let gpu = cpu.to_device(&test_gpu()).unwrap();
    (cpu, gpu)
}

fn both(shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    both_in(-1.0, 1.0, shape, seed)
}

fn cpu(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(-1.0, 1.0, shape, seed, &Device::Cpu).unwrap()
}

/// Gradients of sum(f(inputs) * w) (w fixed and random) with respect to every input, computed
/// on `device` and brought back to the CPU.
fn grads_on(
    device: &Device,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
) -> Vec<Tensor> {
    let vars: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(device).unwrap().detach().into_variable())
        .collect();
    let out = f(&vars).unwrap();
    let w = Tensor::rand_uniform(-1.0, 1.0, out.shape(), 99, device).unwrap();
    let grads = out.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter()
        .map(|v| {
            grads
                .get(v)
                .expect("every input gets a gradient")
                .to_device(&Device::Cpu)
                .unwrap()
        })
        .collect()
}

/// The GPU backward equals the CPU backward for every input.
#[track_caller]
fn assert_backward_devices_agree(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    tol: Tolerance,
) {
    let want = grads_on(&Device::Cpu, f, inputs);
    let got = grads_on(&test_gpu(), f, inputs);
    for (g, w) in got.iter().zip(&want) {
        assert_tensors_close(g, w, tol);
    }
}

fn gelu_kind(which: usize) -> GeluKind {
    if which == 0 {
        GeluKind::Erf
    } else {
        GeluKind::Tanh
    }
}

fn activation(x: &Tensor, which: usize) -> Result<Tensor> {
    match which {
        0 | 1 => x.gelu(gelu_kind(which)),
        2 => x.silu(),
        _ => x.relu(),
    }
}

/// A random key range inside [0, tk] for one batch element: full, left-padded, right-padded
/// or an arbitrary interval (possibly empty).
fn key_range(kind: usize, tk: u32, a: u32, b: u32) -> (u32, u32) {
    let (a, b) = (a % (tk + 1), b % (tk + 1));
    match kind {
        0 => (0, tk),
        1 => (a, tk),
        2 => (0, a),
        _ => (a.min(b), a.max(b)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn activations_gpu_match_cpu(which in 0usize..4, d0 in 1usize..4, d1 in 1usize..700, seed in 0u64..1000) {
        // Wide range: both tails of GELU/SiLU, where erf clamps and exp underflows.
        let (x, xg) = both_in(-9.0, 9.0, &[d0, d1], seed);
        let want = activation(&x, which).unwrap();
        let got = activation(&xg, which).unwrap();
        assert_tensors_close(&got, &want, ACT_TOL);
    }

    #[test]
    fn activation_backward_gpu_matches_cpu(which in 0usize..4, n in 1usize..1200, seed in 0u64..1000) {
        let x = Tensor::rand_uniform(-6.0, 6.0, &[n], seed, &Device::Cpu).unwrap();
        assert_backward_devices_agree(&|v| activation(&v[0], which), &[x], ACT_TOL);
    }

    #[test]
    fn layer_norm_gpu_matches_cpu(rows in 1usize..5, len in 0usize..10, extra in 0usize..3,
                                  with_w in any::<bool>(), with_b in any::<bool>(), seed in 0u64..1000) {
        let d = ROW_LENS[len] + extra;
        let (x, xg) = both_in(-3.0, 5.0, &[rows, 2, d], seed);
        let (w, wg) = both(&[d], seed + 1);
        let (b, bg) = both(&[d], seed + 2);
        let want = x.layer_norm(with_w.then_some(&w), with_b.then_some(&b), 1e-5).unwrap();
        let got = xg.layer_norm(with_w.then_some(&wg), with_b.then_some(&bg), 1e-5).unwrap();
        assert_tensors_close(&got, &want, GPU_TOL);
    }

    #[test]
    fn rms_norm_gpu_matches_cpu(rows in 1usize..7, len in 0usize..10, extra in 0usize..3,
                                with_w in any::<bool>(), seed in 0u64..1000) {
        let d = ROW_LENS[len] + extra;
        let (x, xg) = both_in(-3.0, 5.0, &[rows, d], seed);
        let (w, wg) = both(&[d], seed + 1);
        let want = x.rms_norm(with_w.then_some(&w), 1e-6).unwrap();
        let got = xg.rms_norm(with_w.then_some(&wg), 1e-6).unwrap();
        assert_tensors_close(&got, &want, GPU_TOL);
    }

    #[test]
    fn norm_backward_gpu_matches_cpu(rms in any::<bool>(), rows in 1usize..4, len in 0usize..10,
                                     seed in 0u64..1000) {
        let d = ROW_LENS[len];
        let x = cpu(&[rows, d], seed);
        let w = cpu(&[d], seed + 1);
        let b = cpu(&[d], seed + 2);
        if rms {
            assert_backward_devices_agree(&|v| v[0].rms_norm(Some(&v[1]), 1e-5), &[x, w], GPU_TOL);
        } else {
            assert_backward_devices_agree(
                &|v| v[0].layer_norm(Some(&v[1]), Some(&v[2]), 1e-5),
                &[x, w, b],
                GPU_TOL,
            );
        }
    }

    #[test]
    fn softmax_last_gpu_matches_cpu(rows in 1usize..6, len in 0usize..10, extra in 0usize..3,
                                    spread in 0.1f32..30.0, seed in 0u64..1000) {
        let d = ROW_LENS[len] + extra;
        let (x, xg) = both_in(-spread, spread, &[rows, d], seed);
        let want = x.softmax_last().unwrap();
        let got = xg.softmax_last().unwrap();
        assert_tensors_close(&got, &want, GPU_TOL);
        assert_backward_devices_agree(&|v| v[0].softmax_last(), &[x], GPU_TOL);
    }

    #[test]
    fn masked_softmax_gpu_matches_cpu(batch in 1usize..4, heads in 1usize..3, tq in 1usize..6,
                                      len in 0usize..10, rank3 in any::<bool>(), causal in any::<bool>(),
                                      range_kinds in proptest::collection::vec((0usize..4, any::<u32>(), any::<u32>()), 3),
                                      use_ranges in any::<bool>(), seed in 0u64..1000) {
        let tk = ROW_LENS[len];
        let shape = if rank3 { vec![batch, tq, tk] } else { vec![batch, heads, tq, tk] };
        let key_ranges = use_ranges.then(|| {
            range_kinds[..batch].iter().map(|&(k, a, b)| key_range(k, tk as u32, a, b)).collect()
        });
        let mask = AttentionMask { causal, key_ranges };
        let (x, xg) = both_in(-4.0, 4.0, &shape, seed);
        let want = x.masked_softmax(&mask).unwrap();
        let got = xg.masked_softmax(&mask).unwrap();
        assert_tensors_close(&got, &want, GPU_TOL);
        assert_backward_devices_agree(&|v| v[0].masked_softmax(&mask), &[x], GPU_TOL);
    }
}

#[test]
fn activation_values_match_known_values() {
    // (x, gelu erf, gelu tanh, silu), from f64 references (math.erf, math.tanh).
    let cases: [(f32, f64, f64, f64); 6] = [
        (
            1.0,
            0.8413447460685429,
            0.8411919906082768,
            0.7310585786300049,
        ),
        (
            -1.0,
            -0.15865525393145707,
            -0.15880800939172324,
            -0.2689414213699951,
        ),
        (
            0.5,
            0.34573123063700656,
            0.34571400982514394,
            0.3112296656009273,
        ),
        (
            -2.5,
            -0.015524163314440398,
            -0.015084266089998577,
            -0.18964545005310887,
        ),
        (3.0, 2.99595030590511, 2.996362607918227, 2.8577223804672998),
        (
            -0.1,
            -0.0460172162722971,
            -0.04601724895456484,
            -0.047502081252106004,
        ),
    ];
    let xs: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let col = |f: fn(&(f32, f64, f64, f64)) -> f64| {
        cases.iter().map(|c| f(c) as f32).collect::<Vec<f32>>()
    };
    for device in [Device::Cpu, test_gpu()] {
        let x = Tensor::from_slice(&xs, &[xs.len()], &device).unwrap();
        let tol = Tolerance::new(1e-6, 1e-6);
        let values = |t: Tensor| t.to_vec_f32().unwrap();
        assert_close(&values(x.gelu(GeluKind::Erf).unwrap()), &col(|c| c.1), tol);
        assert_close(&values(x.gelu(GeluKind::Tanh).unwrap()), &col(|c| c.2), tol);
        assert_close(&values(x.silu().unwrap()), &col(|c| c.3), tol);
        let relu: Vec<f32> = xs.iter().map(|x| x.max(0.0)).collect();
        assert_eq!(values(x.relu().unwrap()), relu);
        // Far tails are exact: GELU(-20) = 0 (not a rounding residue), GELU(20) = 20.
        let tails = Tensor::from_slice(&[-20.0f32, 20.0, -100.0], &[3], &device).unwrap();
        for kind in [GeluKind::Erf, GeluKind::Tanh] {
            assert_eq!(values(tails.gelu(kind).unwrap()), vec![0.0, 20.0, 0.0]);
        }
    }
}

#[test]
fn erf_approximation_is_accurate() {
    // erf references from f64 math.erf.
    let cases: [(f32, f64); 9] = [
        (0.1, 0.1124629160182849),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (2.0, 0.9953222650189527),
        (3.5, 0.9999992569016276),
        (-0.7, -0.6778011938374184),
        (6.0, 1.0),
        (-6.0, -1.0),
        (0.0, 0.0),
    ];
    for (x, want) in cases {
        let got = erf_approx(x);
        assert!(
            (got as f64 - want).abs() <= 3e-7,
            "erf({x}) = {got}, want {want}"
        );
    }
}

#[test]
fn norm_values_match_hand_computation() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    // mean 2.5, biased var 1.25.
    let s = 1.25f32.sqrt();
    let ln: Vec<f32> = x.iter().map(|v| (v - 2.5) / s * 2.0 + 0.5).collect();
    // mean of squares 7.5.
    let rms: Vec<f32> = x.iter().map(|v| v / 7.5f32.sqrt() * 2.0).collect();
    for device in [Device::Cpu, test_gpu()] {
        let xt = Tensor::from_slice(&x, &[1, 4], &device).unwrap();
        let w = Tensor::full(2.0, &[4], &device).unwrap();
        let b = Tensor::full(0.5, &[4], &device).unwrap();
        let tol = Tolerance::new(1e-6, 1e-6);
        let got = xt.layer_norm(Some(&w), Some(&b), 0.0).unwrap();
        assert_close(&got.to_vec_f32().unwrap(), &ln, tol);
        let got = xt.rms_norm(Some(&w), 0.0).unwrap();
        assert_close(&got.to_vec_f32().unwrap(), &rms, tol);
    }
}

#[test]
fn activation_backward_matches_finite_differences() {
    let x = Tensor::rand_uniform(-3.0, 3.0, &[3, 7], 11, &Device::Cpu).unwrap();
    for which in 0..3 {
        check_gradients(
            |v| activation(&v[0], which),
            std::slice::from_ref(&x),
            1e-2,
            FD_TOL,
        )
        .unwrap();
    }
    // ReLU has a kink at 0: keep the inputs at least 0.1 away from it.
    let away: Vec<f32> = x
        .to_vec_f32()
        .unwrap()
        .iter()
        .map(|v| v + 0.1 * v.signum())
        .collect();
    let away = Tensor::from_vec(away, &[3, 7], &Device::Cpu).unwrap();
    check_gradients(|v| v[0].relu(), &[away], 1e-2, FD_TOL).unwrap();
}

#[test]
fn norm_backward_matches_finite_differences() {
    // Rows of one element are covered by the device comparison: their RMSNorm is a step
    // function of x, too sharp near 0 for finite differences.
    for d in [2usize, 5, 13] {
        let x = Tensor::randn(&[2, 3, d], 21, &Device::Cpu).unwrap();
        let w = cpu(&[d], 22);
        let b = cpu(&[d], 23);
        check_gradients(
            |v| v[0].layer_norm(Some(&v[1]), Some(&v[2]), 1e-5),
            &[x.clone(), w.clone(), b.clone()],
            1e-2,
            FD_TOL,
        )
        .unwrap();
        check_gradients(
            |v| v[0].rms_norm(Some(&v[1]), 1e-5),
            &[x.clone(), w.clone()],
            1e-2,
            FD_TOL,
        )
        .unwrap();
        // Without affine parameters.
        check_gradients(
            |v| v[0].layer_norm(None, None, 1e-5),
            std::slice::from_ref(&x),
            1e-2,
            FD_TOL,
        )
        .unwrap();
        check_gradients(
            |v| v[0].rms_norm(None, 1e-5),
            std::slice::from_ref(&x),
            1e-2,
            FD_TOL,
        )
        .unwrap();
        // Only a bias (weight absent).
        check_gradients(
            |v| v[0].layer_norm(None, Some(&v[1]), 1e-5),
            &[x, b],
            1e-2,
            FD_TOL,
        )
        .unwrap();
    }
}

#[test]
fn norm_backward_skips_frozen_parameters_on_both_devices() {
    // LoRA-style: a frozen weight and bias get no gradient, x still does, on both devices.
    for device in [Device::Cpu, test_gpu()] {
        let x = Tensor::randn(&[3, 257], 1, &device)
            .unwrap()
            .into_variable();
        let w = Tensor::rand_uniform(-1.0, 1.0, &[257], 2, &device).unwrap();
        let b = Tensor::rand_uniform(-1.0, 1.0, &[257], 3, &device).unwrap();
        let loss = x
            .layer_norm(Some(&w), Some(&b), 1e-5)
            .unwrap()
            .mul(&x)
            .unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        assert_eq!(grads.get(&x).unwrap().shape(), &[3, 257]);
    }
}

#[test]
fn softmax_backward_matches_finite_differences() {
    let x = cpu(&[3, 6], 31);
    check_gradients(|v| v[0].softmax_last(), &[x], 1e-2, FD_TOL).unwrap();
    // (B=3, heads=2, Tq=3, Tk=5): causal with Tq < Tk, plus left / right / no padding.
    let scores = Tensor::randn(&[3, 2, 3, 5], 32, &Device::Cpu).unwrap();
    let masks = [
        AttentionMask::causal(),
        AttentionMask {
            causal: true,
            key_ranges: Some(vec![(2, 5), (0, 5), (1, 5)]),
        },
        AttentionMask {
            causal: false,
            key_ranges: Some(vec![(0, 3), (0, 5), (0, 1)]),
        },
        AttentionMask {
            causal: true,
            key_ranges: Some(vec![(0, 3), (0, 5), (0, 4)]),
        },
    ];
    for mask in masks {
        check_gradients(
            |v| v[0].masked_softmax(&mask),
            std::slice::from_ref(&scores),
            1e-2,
            FD_TOL,
        )
        .unwrap_or_else(|e| panic!("{mask:?}: {e}"));
    }
    // Rank 3 with causal Tq = Tk.
    let scores = Tensor::randn(&[2, 4, 4], 33, &Device::Cpu).unwrap();
    check_gradients(
        |v| v[0].masked_softmax(&AttentionMask::causal()),
        &[scores],
        1e-2,
        FD_TOL,
    )
    .unwrap();
}

#[test]
fn fully_masked_rows_are_zeros_not_nan() {
    for device in [Device::Cpu, test_gpu()] {
        // Batch 0 has no valid key at all; batch 1 is causal with Tq > Tk, so its first two
        // query rows see nothing.
        let scores = Tensor::randn(&[2, 2, 4, 2], 5, &device)
            .unwrap()
            .into_variable();
        let mask = AttentionMask {
            causal: true,
            key_ranges: Some(vec![(1, 1), (0, 2)]),
        };
        let y = scores.masked_softmax(&mask).unwrap();
        let values = y.to_vec_f32().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{values:?}");
        assert!(values[..16].iter().all(|&v| v == 0.0), "{values:?}");
        for h in 0..2 {
            let base = 16 + h * 8;
            assert_eq!(
                &values[base..base + 4],
                &[0.0; 4],
                "rows 0 and 1 see no key"
            );
            assert_close(
                &values[base + 4..base + 6],
                &[1.0, 0.0],
                Tolerance::new(1e-6, 0.0),
            );
            let sum: f32 = values[base + 6..base + 8].iter().sum();
            assert!((sum - 1.0).abs() < 1e-6);
        }
        let grads = y.mul(&y).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(&scores).unwrap().to_vec_f32().unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        assert!(g[..16].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn masked_entries_get_exactly_zero() {
    for device in [Device::Cpu, test_gpu()] {
        // Huge logits in masked positions must not leak.
        let mut data = vec![0.5f32; 2 * 3 * 6];
        for v in data.iter_mut().step_by(5) {
            *v = 80.0;
        }
        let scores = Tensor::from_vec(data, &[2, 3, 6], &device).unwrap();
        let mask = AttentionMask {
            causal: true,
            key_ranges: Some(vec![(2, 6), (0, 4)]),
        };
        let y = scores.masked_softmax(&mask).unwrap().to_vec_f32().unwrap();
        for b in 0..2 {
            let (start, end) = [(2, 6), (0, 4)][b];
            for i in 0..3 {
                let row = &y[(b * 3 + i) * 6..(b * 3 + i + 1) * 6];
                let last_visible = 6 - 3 + i;
                for (j, &p) in row.iter().enumerate() {
                    if j < start || j >= end || j > last_visible {
                        assert_eq!(p, 0.0, "b {b} i {i} j {j}");
                    } else {
                        assert!(p > 0.0);
                    }
                }
            }
        }
    }
}

#[test]
fn left_and_right_padding_give_the_same_probabilities() {
    // The same 4 valid keys in a Tk = 7 row: at the end (left padding) or the start (right).
    let valid = Tensor::randn(&[1, 2, 3, 4], 41, &Device::Cpu)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let junk = Tensor::randn(&[1, 2, 3, 3], 42, &Device::Cpu)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let mut left = Vec::new();
    let mut right = Vec::new();
    for r in 0..6 {
        let (v, j) = (&valid[r * 4..r * 4 + 4], &junk[r * 3..r * 3 + 3]);
        left.extend(j.iter().chain(v));
        right.extend(v.iter().chain(j));
    }
    for device in [Device::Cpu, test_gpu()] {
        for causal_decode in [false, true] {
            // A decode step (Tq = 1, causal) sees every key, so it must match as well.
            let tq = if causal_decode { 1 } else { 3 };
            let take = |v: &[f32]| v[..2 * tq * 7].to_vec();
            let l = Tensor::from_vec(take(&left), &[1, 2, tq, 7], &device).unwrap();
            let r = Tensor::from_vec(take(&right), &[1, 2, tq, 7], &device).unwrap();
            let lm = AttentionMask {
                causal: causal_decode,
                key_ranges: Some(vec![(3, 7)]),
            };
            let rm = AttentionMask {
                causal: causal_decode,
                key_ranges: Some(vec![(0, 4)]),
            };
            let lp = l.masked_softmax(&lm).unwrap().to_vec_f32().unwrap();
            let rp = r.masked_softmax(&rm).unwrap().to_vec_f32().unwrap();
            for row in 0..2 * tq {
                assert_close(
                    &lp[row * 7 + 3..row * 7 + 7],
                    &rp[row * 7..row * 7 + 4],
                    Tolerance::new(1e-7, 1e-6),
                );
                assert_eq!(&lp[row * 7..row * 7 + 3], &[0.0; 3]);
                assert_eq!(&rp[row * 7 + 4..row * 7 + 7], &[0.0; 3]);
            }
        }
    }
}

#[test]
fn softmax_rows_sum_to_one_and_match_manual() {
    let x = [1.0f32, 2.0, 3.0];
    let e: Vec<f32> = x.iter().map(|v| (v - 3.0f32).exp()).collect();
    let s: f32 = e.iter().sum();
    let want: Vec<f32> = e.iter().map(|v| v / s).collect();
    for device in [Device::Cpu, test_gpu()] {
        let t = Tensor::from_slice(&x, &[1, 3], &device).unwrap();
        let got = t.softmax_last().unwrap().to_vec_f32().unwrap();
        assert_close(&got, &want, Tolerance::new(1e-7, 1e-6));
        // Large logits do not overflow (max subtraction).
        let big = Tensor::from_slice(&[1000.0f32, 1000.0], &[2], &device).unwrap();
        assert_eq!(
            big.softmax_last().unwrap().to_vec_f32().unwrap(),
            vec![0.5, 0.5]
        );
    }
}

#[test]
fn bad_norm_inputs_are_errors() {
    for device in [Device::Cpu, test_gpu()] {
        let x = Tensor::zeros(&[2, 4], &device).unwrap();
        let w3 = Tensor::ones(&[3], &device).unwrap();
        let w24 = Tensor::ones(&[2, 4], &device).unwrap();
        let w4 = Tensor::ones(&[4], &device).unwrap();
        let err = x.layer_norm(Some(&w3), None, 1e-5).unwrap_err().to_string();
        assert!(
            err.contains("layer_norm") && err.contains("weight has shape [3]"),
            "{err}"
        );
        let err = x
            .layer_norm(Some(&w4), Some(&w24), 1e-5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias has shape [2, 4]"), "{err}");
        let err = x.rms_norm(Some(&w3), 1e-6).unwrap_err().to_string();
        assert!(
            err.contains("rms_norm") && err.contains("must be [4]"),
            "{err}"
        );
        let ids = Tensor::from_vec(vec![1u32; 8], &[2, 4], &device).unwrap();
        let err = ids.layer_norm(None, None, 1e-5).unwrap_err().to_string();
        assert!(err.contains("expected dtype F32"), "{err}");
        let wu = Tensor::from_vec(vec![1u32; 4], &[4], &device).unwrap();
        let err = x.rms_norm(Some(&wu), 1e-5).unwrap_err().to_string();
        assert!(err.contains("dtype"), "{err}");
        let empty = Tensor::zeros(&[2, 0], &device).unwrap();
        assert!(empty.rms_norm(None, 1e-5).is_err());
    }
    let x = Tensor::zeros(&[2, 4], &Device::Cpu).unwrap();
    let w_gpu = Tensor::ones(&[4], &test_gpu()).unwrap();
    let err = x.rms_norm(Some(&w_gpu), 1e-5).unwrap_err().to_string();
    assert!(err.contains("different devices"), "{err}");
}

#[test]
fn bad_softmax_inputs_are_errors() {
    for device in [Device::Cpu, test_gpu()] {
        let scores = Tensor::zeros(&[2, 1, 3, 5], &device).unwrap();
        let with = |ranges: Vec<(u32, u32)>| AttentionMask {
            causal: false,
            key_ranges: Some(ranges),
        };
        let err = scores
            .masked_softmax(&with(vec![(0, 6), (0, 5)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key range [0, 6) of batch element 0"), "{err}");
        let err = scores
            .masked_softmax(&with(vec![(0, 5), (4, 2)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key range [4, 2) of batch element 1"), "{err}");
        let err = scores
            .masked_softmax(&with(vec![(0, 5)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 key ranges for a batch of 2"), "{err}");
        let flat = Tensor::zeros(&[15], &device).unwrap();
        let err = flat
            .masked_softmax(&AttentionMask::none())
            .unwrap_err()
            .to_string();
        assert!(err.contains("(B, heads, Tq, Tk) or (B, Tq, Tk)"), "{err}");
        let ids = Tensor::from_vec(vec![0u32; 6], &[1, 2, 3], &device).unwrap();
        for err in [
            ids.softmax_last().unwrap_err(),
            ids.masked_softmax(&AttentionMask::none()).unwrap_err(),
            ids.gelu(GeluKind::Erf).unwrap_err(),
            ids.silu().unwrap_err(),
            ids.relu().unwrap_err(),
        ] {
            assert!(err.to_string().contains("expected dtype F32"), "{err}");
        }
    }
}

/// exp, clamp and maximum: GPU against CPU, against std, and their gradients by finite
/// differences (away from the clamp's and maximum's kinks).
#[test]
fn exp_clamp_maximum() {
    let gpu = test_gpu();
    let x = Tensor::rand_uniform(-5.0, 5.0, &[3, 257], 7, &Device::Cpu).unwrap();
    let y = Tensor::rand_uniform(-5.0, 5.0, &[3, 257], 8, &Device::Cpu).unwrap();
    let xs = x.to_vec_f32().unwrap();
    let ys = y.to_vec_f32().unwrap();
    let exp: Vec<f32> = xs.iter().map(|v| v.exp()).collect();
    assert_eq!(x.exp().unwrap().to_vec_f32().unwrap(), exp);
    let clamped: Vec<f32> = xs.iter().map(|v| v.clamp(-1.0, 2.0)).collect();
    assert_close(
        &x.clamp(-1.0, 2.0).unwrap().to_vec_f32().unwrap(),
        &clamped,
        Tolerance::new(1e-6, 0.0),
    );
    let max: Vec<f32> = xs.iter().zip(&ys).map(|(a, b)| a.max(*b)).collect();
    assert_close(
        &x.maximum(&y).unwrap().to_vec_f32().unwrap(),
        &max,
        Tolerance::new(1e-6, 0.0),
    );
    let (xg, yg) = (x.to_device(&gpu).unwrap(), y.to_device(&gpu).unwrap());
    assert_tensors_close(
        &xg.exp().unwrap(),
        &x.exp().unwrap(),
        Tolerance::new(1e-6, 1e-6),
    );
    assert_tensors_close(
        &xg.clamp(-1.0, 2.0).unwrap(),
        &x.clamp(-1.0, 2.0).unwrap(),
        Tolerance::new(1e-6, 0.0),
    );
    assert_tensors_close(
        &xg.maximum(&yg).unwrap(),
        &x.maximum(&y).unwrap(),
        Tolerance::new(1e-6, 0.0),
    );
    let small = Tensor::from_vec(vec![-1.7f32, -0.4, 0.3, 1.1, 2.6], &[5], &Device::Cpu).unwrap();
    let other = Tensor::from_vec(vec![0.2f32, -1.0, 1.0, 0.5, 2.0], &[5], &Device::Cpu).unwrap();
    check_gradients(|v| v[0].exp(), std::slice::from_ref(&small), 1e-3, FD_TOL).unwrap();
    check_gradients(
        |v| v[0].clamp(-1.0, 2.0),
        std::slice::from_ref(&small),
        1e-3,
        FD_TOL,
    )
    .unwrap();
    check_gradients(|v| v[0].maximum(&v[1]), &[small, other], 1e-3, FD_TOL).unwrap();
}
