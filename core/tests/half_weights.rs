//! f16 weights on the CPU: the product with an f16 second operand widens it a 4 MiB panel at a
//! time (never whole), and an f16 embedding table is gathered row by row; both equal the same
//! ops on the weight widened to f32, on both devices.

use lathe_core::testing::{assert_close, test_gpu, Tolerance};
use lathe_core::{DType, Device, Tensor};

/// Sums of up to 2500 products of order 0.3: the panels of the input-gradient product add
/// their partial sums in another order than one pass over the widened weight.
const TOL: Tolerance = Tolerance::new(1e-4, 1e-5);

fn half(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    Tensor::rand_uniform(-1.0, 1.0, shape, seed, device)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap()
}

/// Shapes whose f16 operand spans several panels (> 2^20 elements), and a few rows (the
/// decoding case) as well as many.
#[test]
fn matmul_with_an_f16_weight_equals_the_widened_weight_across_panels() {
    for device in [Device::Cpu, test_gpu()] {
        for (m, n, k) in [(3, 2500, 900), (70, 2100, 1000), (1, 5, 7)] {
            let a = Tensor::rand_uniform(-1.0, 1.0, &[m, k], 7, &device).unwrap();
            // x @ W^T with W (N, K): the LM head and every linear layer.
            let w = half(&[n, k], 8, &device);
            let got = a.matmul_t(&w, false, true).unwrap();
            let want = a
                .matmul_t(&w.to_dtype(DType::F32).unwrap(), false, true)
                .unwrap();
            assert_close(&got.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap(), TOL);
            // dY @ W with W (N, K): the input gradient of the same layer.
            let g = Tensor::rand_uniform(-1.0, 1.0, &[m, n], 9, &device).unwrap();
            let got = g.matmul_t(&w, false, false).unwrap();
            let want = g
                .matmul_t(&w.to_dtype(DType::F32).unwrap(), false, false)
                .unwrap();
            assert_close(&got.to_vec_f32().unwrap(), &want.to_vec_f32().unwrap(), TOL);
        }
    }
}

#[test]
fn gradient_flows_through_an_f16_weight_to_the_input() {
    let w = half(&[1500, 800], 3, &Device::Cpu);
    let x = Tensor::rand_uniform(-1.0, 1.0, &[4, 800], 4, &Device::Cpu)
        .unwrap()
        .into_variable();
    let grads = x
        .matmul_t(&w, false, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let w32 = w.to_dtype(DType::F32).unwrap();
    let x32 = x.detach().into_variable();
    let want = x32
        .matmul_t(&w32, false, true)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        &grads.get(&x).unwrap().to_vec_f32().unwrap(),
        &want.get(&x32).unwrap().to_vec_f32().unwrap(),
        TOL,
    );
}

#[test]
fn an_f16_embedding_table_gathers_the_widened_rows_on_both_devices() {
    for device in [Device::Cpu, test_gpu()] {
        // An odd row width, so rows start in the middle of the GPU's packed words.
        let table = half(&[11, 7], 5, &device);
        let ids = Tensor::from_vec(vec![0u32, 10, 3, 3, 7, 1], &[2, 3], &device).unwrap();
        let got = Tensor::embedding(&table, &ids).unwrap();
        let want = Tensor::embedding(&table.to_dtype(DType::F32).unwrap(), &ids).unwrap();
        assert_eq!(got.shape(), &[2, 3, 7]);
        assert_eq!(got.dtype(), DType::F32);
        // Widening f16 is exact: equal bit for bit.
        assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        let bad = Tensor::from_vec(vec![11u32], &[1], &device).unwrap();
        assert!(Tensor::embedding(&table, &bad).is_err());
    }
}
