//! Dropout (the same mask on both devices, torch's scaling, its backward) and gradient
//! checkpointing (the same gradients as without it, for inputs and captured parameters).

use lathe_core::testing::{
    assert_close, assert_tensors_close, check_gradients, test_gpu, Tolerance,
};
use lathe_core::{checkpoint, Device, GeluKind, Tensor};

const EXACT: Tolerance = Tolerance::new(0.0, 0.0);

#[test]
fn dropout_masks_agree_across_devices_and_drop_about_p() {
    let gpu = test_gpu();
    for (n, p, seed) in [
        (1usize, 0.5f32, 1u64),
        (257, 0.1, 2),
        (100_003, 0.05, 3),
        (40_000, 0.9, 1 << 40),
    ] {
        let x = Tensor::rand_uniform(0.5, 1.5, &[n], seed, &Device::Cpu).unwrap();
        let cpu = x.dropout(p, seed).unwrap();
        let got = x.to_device(&gpu).unwrap().dropout(p, seed).unwrap();
        assert_tensors_close(&got, &cpu, EXACT);
        let (xs, ys) = (x.to_vec_f32().unwrap(), cpu.to_vec_f32().unwrap());
        let dropped = ys.iter().filter(|&&y| y == 0.0).count();
        for (x, y) in xs.iter().zip(&ys) {
            assert!(*y == 0.0 || (*y - x / (1.0 - p)).abs() <= 1e-6 * y.abs());
        }
        if n > 1000 {
            // Binomial(n, p): 5 standard deviations.
            let sd = (n as f64 * p as f64 * (1.0 - p as f64)).sqrt();
            let expected = n as f64 * p as f64;
            assert!(
                (dropped as f64 - expected).abs() <= 5.0 * sd,
                "dropped {dropped} of {n} at p {p}"
            );
        }
    }
    // Another seed draws another mask; p = 0 is the identity.
    let x = Tensor::ones(&[1000], &Device::Cpu).unwrap();
    assert_ne!(
        x.dropout(0.5, 1).unwrap().to_vec_f32().unwrap(),
        x.dropout(0.5, 2).unwrap().to_vec_f32().unwrap()
    );
    assert_eq!(
        x.dropout(0.0, 1).unwrap().to_vec_f32().unwrap(),
        vec![1.0; 1000]
    );
    assert!(x
        .dropout(1.0, 1)
        .unwrap_err()
        .to_string()
        .contains("[0, 1)"));
}

#[test]
fn dropout_backward_is_the_same_mask() {
    let x = Tensor::rand_uniform(-1.0, 1.0, &[3, 7], 4, &Device::Cpu).unwrap();
    check_gradients(
        |x| x[0].dropout(0.3, 9)?.mul(&x[0]),
        &[x],
        1e-2,
        Tolerance::new(2e-2, 2e-2),
    )
    .unwrap();
}

/// A two-layer function with captured weights: gradients with and without checkpointing
/// are equal (the recomputation replays the same dropout mask).
#[test]
fn checkpoint_gives_the_gradients_of_the_plain_graph() {
    for device in [Device::Cpu, test_gpu()] {
        let w1 = Tensor::rand_uniform(-1.0, 1.0, &[6, 5], 1, &device)
            .unwrap()
            .into_variable();
        let w2 = Tensor::rand_uniform(-1.0, 1.0, &[4, 6], 2, &device)
            .unwrap()
            .into_variable();
        let frozen = Tensor::rand_uniform(-1.0, 1.0, &[4], 3, &device).unwrap();
        let x = Tensor::rand_uniform(-1.0, 1.0, &[2, 3, 5], 4, &device)
            .unwrap()
            .into_variable();
        let block = {
            let (w1, w2, frozen) = (w1.clone(), w2.clone(), frozen.clone());
            move |ins: &[Tensor]| {
                ins[0]
                    .matmul_t(&w1, false, true)?
                    .gelu(GeluKind::Erf)?
                    .dropout(0.25, 77)?
                    .matmul_t(&w2, false, true)?
                    .bias_add(&frozen)
            }
        };
        let loss_of = |y: Tensor| y.mul(&y).unwrap().sum_all().unwrap();
        let want = loss_of(block(std::slice::from_ref(&x)).unwrap())
            .backward()
            .unwrap();
        let out = checkpoint(
            std::slice::from_ref(&x),
            &[w1.clone(), w2.clone()],
            block.clone(),
        )
        .unwrap();
        let got = loss_of(out).backward().unwrap();
        for t in [&x, &w1, &w2] {
            assert_close(
                &got.get(t).unwrap().to_vec_f32().unwrap(),
                &want.get(t).unwrap().to_vec_f32().unwrap(),
                Tolerance::new(1e-5, 1e-5),
            );
        }
        // Without recording, checkpoint is just the call.
        let _no_grad = lathe_core::no_grad();
        let y = checkpoint(std::slice::from_ref(&x), std::slice::from_ref(&w1), block).unwrap();
        assert!(!y.tracks_grad());
    }
}
