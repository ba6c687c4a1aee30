//! LLM.int8() on CPU and GPU: GPU == CPU (quantized activations and int32 accumulations
//! exactly, outputs to 1e-5), both matmul forms, edge cases, bad input, the backward.

use lathe_core::testing::{
    assert_close, assert_tensors_close, small_binding_gpu, test_gpu, Tolerance,
};
use lathe_core::{DType, Device, Tensor};
use lathe_quant::int8::{Int8Form, Int8Trace};
use lathe_quant::{Int8Linear, Int8Weight};
use proptest::prelude::*;

/// Deterministic pseudo-random values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// x (rows, cols) with columns `planted` scaled to outlier magnitude.
fn activations(rows: usize, cols: usize, seed: u64, planted: &[usize]) -> Vec<f32> {
    let mut x = values(rows * cols, seed, 2.0);
    for r in 0..rows {
        for (k, &j) in planted.iter().enumerate() {
            x[r * cols + j] *= 10.0 + 5.0 * k as f32;
        }
    }
    x
}

/// The same layer on both devices.
fn layers(
    gpu: &Device,
    w: &[f32],
    b: Option<&[f32]>,
    out: usize,
    inn: usize,
    t: f32,
) -> (Int8Linear, Int8Linear) {
    let make = |device: &Device| {
        let wt = Tensor::from_slice(w, &[out, inn], device).unwrap();
        let bt = b.map(|b| Tensor::from_slice(b, &[out], device).unwrap());
        Int8Linear::from_dense(&wt, bt, t).unwrap()
    };
    (make(&Device::Cpu), make(gpu))
}

/// Output tolerance: 1e-5 of the output scale.
fn output_tol(y: &[f32]) -> Tolerance {
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    Tolerance::new(1e-5 * scale, 1e-5)
}

fn assert_traces_match(gpu: &Int8Trace, cpu: &Int8Trace) {
    assert_eq!(gpu.outliers, cpu.outliers, "outlier columns");
    assert_eq!(gpu.sca, cpu.sca, "activation scales");
    assert_eq!(gpu.ca, cpu.ca, "quantized activations");
    assert_eq!(gpu.acc, cpu.acc, "int32 accumulations");
    assert_close(&gpu.y, &cpu.y, output_tol(&cpu.y));
}

fn compare_devices(rows: usize, inn: usize, out: usize, planted: &[usize], t: f32, seed: u64) {
    compare_on(&test_gpu(), (rows, inn, out), planted, t, seed);
}

fn compare_on(
    device: &Device,
    (rows, inn, out): (usize, usize, usize),
    planted: &[usize],
    t: f32,
    seed: u64,
) {
    let w = values(out * inn, seed + 1, 0.1);
    let b = values(out, seed + 2, 0.5);
    let x = activations(rows, inn, seed, planted);
    let (cpu, gpu) = layers(device, &w, Some(&b), out, inn, t);
    assert_eq!(
        gpu.weight.values().unwrap(),
        cpu.weight.values().unwrap(),
        "CB"
    );
    assert_eq!(
        gpu.weight.scales().unwrap(),
        cpu.weight.scales().unwrap(),
        "SCB"
    );
    let xc = Tensor::from_slice(&x, &[rows, inn], &Device::Cpu).unwrap();
    let xg = xc.to_device(gpu.device()).unwrap();
    let mut forms = vec![Int8Form::Gemm];
    if rows <= 4 {
        forms.push(Int8Form::Gemv);
    }
    let reference = cpu.trace(&xc, Int8Form::Gemm).unwrap();
    for form in forms {
        let c = cpu.trace(&xc, form).unwrap();
        let g = gpu.trace(&xg, form).unwrap();
        assert_traces_match(&c, &reference);
        assert_traces_match(&g, &reference);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, .. ProptestConfig::default() })]

    #[test]
    fn gpu_matches_cpu(
        rows in 1usize..80,
        inn in 1usize..300,
        out in 1usize..140,
        outliers in 0usize..4,
        threshold in prop_oneof![Just(6.0f32), Just(0.0f32)],
        seed in 0u64..1000,
    ) {
        let planted: Vec<usize> = (0..outliers.min(inn)).map(|k| (k * 37 + 5) % inn).collect();
        compare_devices(rows, inn, out, &planted, threshold, seed);
    }

    #[test]
    fn gemv_matches_gemm(
        rows in 1usize..=4,
        inn in 1usize..600,
        out in 1usize..200,
        outliers in 0usize..3,
        seed in 0u64..1000,
    ) {
        let planted: Vec<usize> = (0..outliers.min(inn)).map(|k| (k * 53 + 2) % inn).collect();
        compare_devices(rows, inn, out, &planted, 6.0, seed);
    }
}

#[test]
fn edge_cases_match_between_devices() {
    // in not a multiple of 4, odd rows, one column per outlier, big sizes.
    compare_devices(3, 7, 5, &[], 6.0, 1);
    compare_devices(65, 257, 67, &[3, 100], 6.0, 2);
    compare_devices(1, 1, 1, &[], 6.0, 3);
    compare_devices(2, 300, 3, &[0, 1, 2, 299], 6.0, 4);
}

#[test]
fn zero_rows_huge_values_and_all_outliers() {
    let (rows, inn, out) = (5, 9, 6);
    let mut w = values(out * inn, 11, 0.2);
    w[2 * inn..3 * inn].fill(0.0); // an all-zero weight row
    let mut x = values(rows * inn, 12, 1.0);
    x[inn..2 * inn].fill(0.0); // an all-zero input row
    x[3 * inn + 4] = 1.0e4; // a row with one huge value
    for t in [6.0, 0.0, 1.0e-3] {
        let (cpu, gpu) = layers(&test_gpu(), &w, None, out, inn, t);
        let scales = cpu.weight.scales().unwrap();
        assert_eq!(scales[2], 0.0);
        assert!(cpu.weight.values().unwrap()[2 * inn..3 * inn]
            .iter()
            .all(|&q| q == 0));
        let xc = Tensor::from_slice(&x, &[rows, inn], &Device::Cpu).unwrap();
        let xg = xc.to_device(gpu.device()).unwrap();
        for form in [Int8Form::Gemm, Int8Form::Auto] {
            let c = cpu.trace(&xc, form).unwrap();
            let g = gpu.trace(&xg, form).unwrap();
            assert_traces_match(&g, &c);
            assert!(c.ca[inn..2 * inn].iter().all(|&q| q == 0));
            assert!(
                c.y[2..].iter().step_by(out).all(|&v| v == 0.0),
                "zero weight row"
            );
            if t == 1.0e-3 {
                // Every nonzero column is an outlier: all through the 16-bit path.
                assert!(c.ca.iter().all(|&q| q == 0));
                assert_eq!(c.outliers.len(), inn);
            }
        }
    }
}

#[test]
fn ranks_one_and_three() {
    let (inn, out) = (10, 7);
    let w = values(out * inn, 21, 0.3);
    let (cpu, gpu) = layers(&test_gpu(), &w, None, out, inn, 6.0);
    let x = values(2 * 3 * inn, 22, 3.0);
    for (shape, out_shape) in [(vec![inn], vec![out]), (vec![2, 3, inn], vec![2, 3, out])] {
        let n: usize = shape.iter().product();
        let xc = Tensor::from_slice(&x[..n], &shape, &Device::Cpu).unwrap();
        let yc = cpu.forward(&xc).unwrap();
        let yg = gpu.forward(&xc.to_device(gpu.device()).unwrap()).unwrap();
        assert_eq!(yc.shape(), out_shape.as_slice());
        let flat = Tensor::from_slice(&x[..n], &[n / inn, inn], &Device::Cpu).unwrap();
        let y2 = cpu.forward(&flat).unwrap().to_vec_f32().unwrap();
        assert_eq!(yc.to_vec_f32().unwrap(), y2);
        assert_tensors_close(&yg, &yc, output_tol(&y2));
    }
}

#[test]
fn bad_input_is_an_error() {
    let cpu = Int8Linear::from_dense(
        &Tensor::from_slice(&values(12, 1, 1.0), &[3, 4], &Device::Cpu).unwrap(),
        None,
        6.0,
    )
    .unwrap();
    let x = Tensor::from_slice(&values(10, 2, 1.0), &[2, 5], &Device::Cpu).unwrap();
    let err = cpu.forward(&x).unwrap_err().to_string();
    assert!(err.contains("4 input features"), "{err}");
    let xh = Tensor::from_slice(&values(8, 2, 1.0), &[2, 4], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let err = cpu.forward(&xh).unwrap_err().to_string();
    assert!(err.contains("expected dtype F32"), "{err}");
    let err = Int8Weight::quantize(&Tensor::from_slice(&[1.0f32; 4], &[4], &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("(out, in)"), "{err}");
    let ids = Tensor::from_slice(&[1u32; 4], &[2, 2], &Device::Cpu).unwrap();
    assert!(Int8Weight::quantize(&ids).is_err());
    let bias = Tensor::from_slice(&[0.0f32; 4], &[4], &Device::Cpu).unwrap();
    let err = Int8Linear::new(cpu.weight.clone(), Some(bias), 6.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bias of shape [4] for 3 output features"),
        "{err}"
    );
    let xg = Tensor::from_slice(&values(8, 2, 1.0), &[2, 4], &test_gpu()).unwrap();
    assert!(cpu.forward(&xg).is_err(), "device mismatch");
    let x5 = Tensor::from_slice(&values(20, 2, 1.0), &[5, 4], &Device::Cpu).unwrap();
    let err = cpu
        .forward_with(&x5, Int8Form::Gemv)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 4 rows"), "{err}");
}

#[test]
fn f16_weights_quantize_like_their_f32_values() {
    let w = values(6 * 13, 31, 0.5);
    let gpu = test_gpu();
    for device in [Device::Cpu, gpu] {
        let w16 = Tensor::from_slice(&w, &[6, 13], &device)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let w32 = w16.to_dtype(DType::F32).unwrap();
        let a = Int8Weight::quantize(&w16).unwrap();
        let b = Int8Weight::quantize(&w32).unwrap();
        assert_eq!(a.values().unwrap(), b.values().unwrap());
        assert_eq!(a.scales().unwrap(), b.scales().unwrap());
    }
}

#[test]
fn weight_round_trips_between_devices_and_dequantizes() {
    let (out, inn) = (9, 11);
    let w = values(out * inn, 41, 0.7);
    let wc =
        Int8Weight::quantize(&Tensor::from_slice(&w, &[out, inn], &Device::Cpu).unwrap()).unwrap();
    let wg = wc.to_device(&test_gpu()).unwrap();
    let back = wg.to_device(&Device::Cpu).unwrap();
    assert_eq!(back.values().unwrap(), wc.values().unwrap());
    assert_eq!(wg.bytes(), (out * (12 + 4)) as u64);
    let dq = wc.dequantize().unwrap().to_vec_f32().unwrap();
    // Row-wise absmax int8: error at most half a step, SCB / 254.
    for o in 0..out {
        let scb = wc.scales().unwrap()[o];
        for j in 0..inn {
            assert!((dq[o * inn + j] - w[o * inn + j]).abs() <= scb / 254.0 * 1.0001);
        }
    }
    assert_tensors_close(
        &wg.dequantize().unwrap(),
        &wc.dequantize().unwrap(),
        Tolerance::new(0.0, 0.0),
    );
}

/// dx against dy @ W.dequantize() with core's CPU matmul (1e-5), bias gradient = sum of dy.
fn check_backward(rows: usize, inn: usize, out: usize, device: &Device) {
    let w = values(out * inn, 51, 0.4);
    let b = values(out, 52, 0.1);
    let x = activations(rows, inn, 53, &[inn / 2]);
    let wt = Tensor::from_slice(&w, &[out, inn], device).unwrap();
    let bias = Tensor::from_slice(&b, &[out], device)
        .unwrap()
        .into_variable();
    let layer = Int8Linear::from_dense(&wt, Some(bias.clone()), 6.0).unwrap();
    let xv = Tensor::from_slice(&x, &[rows, inn], device)
        .unwrap()
        .into_variable();
    let dyv = values(rows * out, 54, 1.0);
    let dy = Tensor::from_slice(&dyv, &[rows, out], device).unwrap();
    let loss = layer
        .forward(&xv)
        .unwrap()
        .mul(&dy)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let dx = grads.get(&xv).expect("dx").to_vec_f32().unwrap();
    let db = grads.get(&bias).expect("db").to_vec_f32().unwrap();
    let deq = layer
        .weight
        .dequantize()
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let dyc = Tensor::from_slice(&dyv, &[rows, out], &Device::Cpu).unwrap();
    let want = dyc.matmul(&deq).unwrap().to_vec_f32().unwrap();
    assert_close(&dx, &want, output_tol(&want));
    let want_db: Vec<f32> = (0..out)
        .map(|o| (0..rows).map(|r| dyv[r * out + o]).sum())
        .collect();
    assert_close(&db, &want_db, Tolerance::new(1e-5, 1e-5));
}

#[test]
fn backward_is_dy_times_dequantized_weight() {
    let gpu = test_gpu();
    for (rows, inn, out) in [(3, 7, 5), (70, 129, 66), (1, 300, 17)] {
        check_backward(rows, inn, out, &Device::Cpu);
        check_backward(rows, inn, out, &gpu);
    }
    // The CPU dequantizes the weight in panels of 2^20 elements: 1000 x 1100 takes two.
    check_backward(9, 1100, 1000, &Device::Cpu);
}

#[test]
fn layers_over_a_storage_binding_are_computed_in_blocks() {
    // Bindings of 16 KiB: the weight, the activations and the output each span several
    // windows, so the GEMM, the GEMV and the input gradient run over blocks of rows and of
    // output features. Outlier columns, scales and int32 sums stay bit-identical to the CPU's.
    // (Windows start aligned, so a chunk is a few rows: rows here stay under 2 KB.)
    let small = small_binding_gpu();
    compare_on(&small, (70, 129, 300), &[5, 100], 6.0, 3);
    compare_on(&small, (3, 500, 200), &[7], 6.0, 4);
    compare_on(&small, (40, 257, 67), &[], 0.0, 5);
    for (rows, inn, out) in [(70, 129, 300), (9, 500, 300)] {
        check_backward(rows, inn, out, &small);
    }
}

#[test]
fn no_gradient_reaches_a_frozen_input() {
    let w = Tensor::from_slice(&values(12, 1, 1.0), &[3, 4], &Device::Cpu).unwrap();
    let layer = Int8Linear::from_dense(&w, None, 6.0).unwrap();
    let x = Tensor::from_slice(&values(8, 2, 1.0), &[2, 4], &Device::Cpu).unwrap();
    let y = layer.forward(&x).unwrap();
    assert!(!y.tracks_grad());
}

/// acc[r, o] = sum_j ca[r, j] * cb[o, j] in i64, checked to fit i32: the plain reference of
/// every CPU kernel.
fn reference_acc(ca: &[i8], cb: &[i8], rows: usize, out: usize, inn: usize) -> Vec<i32> {
    let mut acc = Vec::with_capacity(rows * out);
    for r in 0..rows {
        for o in 0..out {
            let s: i64 = (0..inn)
                .map(|j| i64::from(ca[r * inn + j]) * i64::from(cb[o * inn + j]))
                .sum();
            acc.push(i32::try_from(s).expect("fits i32"));
        }
    }
    acc
}

/// Every CPU form, each row path this CPU has included, against the scalar reference
/// (exact int32 sums) and the GEMM form (identical outputs).
fn check_cpu_forms(layer: &Int8Linear, x: &[f32], rows: usize, inn: usize) {
    let out = layer.weight.out_features();
    let xc = Tensor::from_slice(x, &[rows, inn], &Device::Cpu).unwrap();
    let gemm = layer.trace(&xc, Int8Form::Gemm).unwrap();
    let want = reference_acc(&gemm.ca, &layer.weight.values().unwrap(), rows, out, inn);
    assert_eq!(gemm.acc, want, "GEMM form vs reference");
    let mut forms = vec![Int8Form::Auto];
    forms.extend(Int8Form::cpu_row_forms());
    if rows <= 4 {
        forms.push(Int8Form::Gemv);
    }
    for form in forms {
        let t = layer.trace(&xc, form).unwrap();
        assert_eq!(
            t.acc, want,
            "{form:?}: int32 accumulations ({rows}x{inn} -> {out})"
        );
        assert_eq!(t.y, gemm.y, "{form:?}: outputs");
    }
}

fn check_row_kernels(rows: usize, inn: usize, out: usize, planted: &[usize], seed: u64) {
    let w = values(out * inn, seed + 1, 0.1);
    let x = activations(rows, inn, seed, planted);
    let wt = Tensor::from_slice(&w, &[out, inn], &Device::Cpu).unwrap();
    let layer = Int8Linear::from_dense(&wt, None, 6.0).unwrap();
    check_cpu_forms(&layer, &x, rows, inn);
}

#[test]
fn cpu_row_forms_cover_the_generic_path() {
    // Every machine has the portable path; x86-64 machines list what they detect.
    let forms = Int8Form::cpu_row_forms();
    assert!(forms.contains(&Int8Form::RowsGeneric), "{forms:?}");
    println!("row kernel paths on this CPU: {forms:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Odd sizes: rows 1..=33, in not a multiple of 4/16/32/64, odd out.
    #[test]
    fn cpu_row_kernels_match_reference(
        rows in 1usize..=33,
        inn in 1usize..300,
        half_out in 0usize..70,
        outliers in 0usize..3,
        seed in 0u64..1000,
    ) {
        let planted: Vec<usize> = (0..outliers.min(inn)).map(|k| (k * 41 + 3) % inn).collect();
        check_row_kernels(rows, inn, 2 * half_out + 1, &planted, seed);
    }
}

#[test]
fn cpu_row_kernels_on_big_and_extreme_inputs() {
    // Full 64-byte chunks plus a masked tail; x in several panels; threads over several
    // 32-row weight tasks (the last one odd).
    check_row_kernels(17, 577, 101, &[5], 7);
    check_row_kernels(32, 1536, 67, &[], 8);
    check_row_kernels(100, 1001, 65, &[17], 11);
    check_row_kernels(33, 64, 65, &[], 9);
    check_row_kernels(1, 2051, 129, &[100, 2000], 10);
    // Saturated operands: every product +-127 * 127 (the u8 shift and its correction at
    // their extremes), over long rows.
    let (rows, inn, out) = (7, 4099, 5);
    let x: Vec<f32> = (0..rows * inn)
        .map(|i| if (i / inn) % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let w: Vec<f32> = (0..out * inn)
        .map(|i| {
            if (i / inn + i % 3) % 2 == 0 {
                0.5
            } else {
                -0.5
            }
        })
        .collect();
    let wt = Tensor::from_slice(&w, &[out, inn], &Device::Cpu).unwrap();
    let layer = Int8Linear::from_dense(&wt, None, 0.0).unwrap();
    check_cpu_forms(&layer, &x, rows, inn);
}

#[test]
fn row_forms_are_cpu_only() {
    let gpu = test_gpu();
    let w = Tensor::from_slice(&values(12, 1, 1.0), &[3, 4], &gpu).unwrap();
    let layer = Int8Linear::from_dense(&w, None, 6.0).unwrap();
    let x = Tensor::from_slice(&values(8, 2, 1.0), &[2, 4], &gpu).unwrap();
    let err = layer
        .forward_with(&x, Int8Form::RowsGeneric)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CPU only"), "{err}");
}

/// The scalar definition of the row-wise quantization (REFERENCE §3).
fn reference_quantize(x: &[f32], cols: usize, skip: &[bool]) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::new();
    let mut scales = Vec::new();
    for row in x.chunks(cols) {
        let max = row
            .iter()
            .zip(skip)
            .filter(|(_, &s)| !s)
            .fold(0f32, |m, (v, _)| m.max(v.abs()));
        let inv = if max >= 7.888_609e-31 {
            127.0 / max
        } else {
            0.0
        };
        q.extend(row.iter().zip(skip).map(|(&v, &s)| {
            if s {
                0
            } else {
                (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8
            }
        }));
        scales.push(max);
    }
    (q, scales)
}

fn check_quantization(w: &[f32], rows: usize, cols: usize) {
    let wt = Tensor::from_slice(w, &[rows, cols], &Device::Cpu).unwrap();
    let q = Int8Weight::quantize(&wt).unwrap();
    let (want_q, want_s) = reference_quantize(w, cols, &vec![false; cols]);
    assert_eq!(q.values().unwrap(), want_q, "weight values ({rows}x{cols})");
    assert_eq!(q.scales().unwrap(), want_s, "weight scales");
    // Activations: outlier columns (threshold 6) quantize to 0 and leave the max.
    let layer = Int8Linear::new(q, None, 6.0).unwrap();
    let t = layer.trace(&wt, Int8Form::Gemm).unwrap();
    let mut skip = vec![false; cols];
    for &j in &t.outliers {
        skip[j as usize] = true;
    }
    let (want_ca, want_sca) = reference_quantize(w, cols, &skip);
    assert_eq!(t.ca, want_ca, "activation values");
    assert_eq!(t.sca, want_sca, "activation scales");
}

#[test]
fn quantization_matches_round_ties_even_on_special_values() {
    // Exact ties (scale 127: x * inv = x), NaN, infinities, subnormal and zero rows.
    let row = |v: &[f32]| {
        let mut r = vec![0f32; 21];
        r[..v.len()].copy_from_slice(v);
        r
    };
    let rows = [
        row(&[
            127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, 4.5, -0.0, 6.0,
        ]),
        row(&[1.0, f32::NAN, -0.25, 0.75, 5.9]),
        row(&[f32::INFINITY, 1.0, -2.0]),
        row(&[-f32::INFINITY, f32::NAN, 3.0]),
        row(&[1e-35, -3e-36, 2e-31]),
        row(&[]),
        row(&[1e30, -7e29, 3.3e29, 1e-30]),
        row(&[f32::MIN_POSITIVE, -f32::MIN_POSITIVE * 0.5]),
    ];
    let w: Vec<f32> = rows.concat();
    check_quantization(&w, rows.len(), 21);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn quantization_matches_round_ties_even(
        rows in 1usize..9,
        cols in 1usize..200,
        scale in prop_oneof![Just(1.0f32), Just(10.0f32), Just(1e-3f32)],
        seed in 0u64..1000,
    ) {
        let mut w = values(rows * cols, seed, scale);
        // Some exact ties: a row max of 127 makes inv 1.
        if cols > 2 {
            w[0] = 127.0;
            w[1] = 2.5;
            w[2] = -0.5;
        }
        check_quantization(&w, rows, cols);
    }
}
