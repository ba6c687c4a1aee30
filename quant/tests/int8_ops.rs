//! LLM.int8() on CPU and GPU: GPU == CPU (quantized activations and int32 accumulations
//! exactly, outputs to 1e-5), both matmul forms, edge cases, bad input, the backward; the
//! same for the bitsandbytes variant, and that variant against bitsandbytes' definition.

use lathe_core::testing::{
    assert_close, assert_tensors_close, small_binding_gpu, test_gpu, Tolerance,
};
use lathe_core::{DType, Device, Tensor};
use lathe_quant::int8::{Int8Form, Int8Trace};
use lathe_quant::{Int8Linear, Int8Variant, Int8Weight};
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

fn compare_on(device: &Device, dims: (usize, usize, usize), planted: &[usize], t: f32, seed: u64) {
    compare_variant_on(device, dims, planted, t, seed, Int8Variant::Lathe);
}

fn compare_variant_on(
    device: &Device,
    (rows, inn, out): (usize, usize, usize),
    planted: &[usize],
    t: f32,
    seed: u64,
    variant: Int8Variant,
) {
    let w = values(out * inn, seed + 1, 0.1);
    let b = values(out, seed + 2, 0.5);
    let x = activations(rows, inn, seed, planted);
    let (cpu, gpu) = layers(device, &w, Some(&b), out, inn, t);
    let (cpu, gpu) = (cpu.with_variant(variant), gpu.with_variant(variant));
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
    let variants = [Int8Variant::Lathe, Int8Variant::Bitsandbytes];
    for (t, variant) in [6.0, 0.0, 1.0e-3]
        .into_iter()
        .flat_map(|t| variants.map(|v| (t, v)))
    {
        let (cpu, gpu) = layers(&test_gpu(), &w, None, out, inn, t);
        let (cpu, gpu) = (cpu.with_variant(variant), gpu.with_variant(variant));
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
    // The bitsandbytes variant over the same blocks.
    let bnb = Int8Variant::Bitsandbytes;
    compare_variant_on(&small, (70, 129, 300), &[5, 100], 6.0, 3, bnb);
    compare_variant_on(&small, (3, 500, 200), &[7], 6.0, 4, bnb);
    compare_variant_on(&small, (40, 257, 67), &[], 0.0, 5, bnb);
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

// ---- the bitsandbytes variant ----

/// bitsandbytes 0.50.2's eval-mode CPU forward, written from its source with scalars
/// (`MatMul8bitLt.forward` in autograd/_functions.py; `int8_vectorwise_quant`,
/// `int8_mixed_scaled_mm`, `int8_scaled_mm`, `int8_mm_dequant` in backends/default/ops.py;
/// `int8_vectorwise_dequant` in _ops.py), its constants as the literals of that source.
/// `cb` (out, cols) unpadded. Returns the trace it defines (y with the outlier products
/// summed in ascending column order, where torch's addmm has its BLAS' order).
#[allow(clippy::too_many_arguments, clippy::excessive_precision)] // bnb's literals as written
fn reference_bnb(
    x: &[f32],
    rows: usize,
    cols: usize,
    cb: &[i8],
    scb: &[f32],
    bias: Option<&[f32]>,
    out: usize,
    threshold: f32,
) -> Int8Trace {
    use half::f16;
    // A.to(torch.float16); `A.abs() >= threshold` compares in f16.
    let mut a: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    let t = f16::from_f32(threshold).to_f32();
    let mut is_outlier_col = vec![false; cols];
    if threshold > 0.0 {
        for r in 0..rows {
            for j in 0..cols {
                if a[r * cols + j].abs() >= t {
                    is_outlier_col[j] = true;
                    a[r * cols + j] = 0.0; // A[outliers] = 0
                }
            }
        }
    }
    let outliers: Vec<u32> = (0..cols as u32)
        .filter(|&j| is_outlier_col[j as usize])
        .collect();
    let mut ca = vec![0i8; rows * cols];
    let mut sca = vec![0f32; rows];
    for r in 0..rows {
        let row = &a[r * cols..(r + 1) * cols];
        sca[r] = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        for j in 0..cols {
            // round(A * (127 / row_stats)); a zero row gives 0 * inf = NaN, cast to 0.
            let v = (row[j] * (127.0 / sca[r])).round_ties_even();
            if !is_outlier_col[j] && !v.is_nan() {
                ca[r * cols + j] = v as i8;
            }
        }
    }
    let mut acc = vec![0i32; rows * out];
    let mut y = vec![0f32; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let s: i64 = (0..cols)
                .map(|j| i64::from(ca[r * cols + j]) * i64::from(cb[o * cols + j]))
                .sum();
            let s = i32::try_from(s).expect("fits i32");
            acc[r * out + o] = s;
            let mut v = (s as f32 * (sca[r] * scb[o])) * 6.200124e-05_f32;
            if let Some(b) = bias {
                v += b[o];
            }
            let mut sub = 0f32;
            for &j in &outliers {
                let w = (f32::from(cb[o * cols + j as usize]) * scb[o]) * 7.874015718698502e-3_f32;
                sub += x[r * cols + j as usize] * w;
            }
            y[r * out + o] = v + sub;
        }
    }
    Int8Trace {
        ca,
        sca,
        outliers,
        acc,
        y,
    }
}

/// The CPU's bitsandbytes variant against [`reference_bnb`]: outliers, scales, int8 values
/// and int32 sums exactly, outputs to 1e-6 of their scale (the f32 order of one sum).
fn check_bnb_reference(layer: &Int8Linear, x: &[f32], rows: usize) {
    let (out, inn) = (layer.weight.out_features(), layer.weight.in_features());
    let bias = layer.bias.as_ref().map(|b| b.to_vec_f32().unwrap());
    let want = reference_bnb(
        x,
        rows,
        inn,
        &layer.weight.values().unwrap(),
        &layer.weight.scales().unwrap(),
        bias.as_deref(),
        out,
        layer.threshold,
    );
    let xc = Tensor::from_slice(x, &[rows, inn], &Device::Cpu).unwrap();
    for form in [Int8Form::Auto, Int8Form::Gemm] {
        let got = layer.trace(&xc, form).unwrap();
        assert_eq!(got.outliers, want.outliers, "outlier columns");
        assert_eq!(got.sca, want.sca, "activation scales");
        assert_eq!(got.ca, want.ca, "quantized activations");
        assert_eq!(got.acc, want.acc, "int32 accumulations");
        let scale = want.y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        assert_close(&got.y, &want.y, Tolerance::new(1e-6 * scale, 1e-6));
    }
}

fn bnb_layer(w: &[f32], b: &[f32], out: usize, inn: usize, t: f32) -> Int8Linear {
    let wt = Tensor::from_slice(w, &[out, inn], &Device::Cpu).unwrap();
    let bt = Tensor::from_slice(b, &[out], &Device::Cpu).unwrap();
    Int8Linear::from_dense(&wt, Some(bt), t)
        .unwrap()
        .with_variant(Int8Variant::Bitsandbytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn bnb_variant_gpu_matches_cpu(
        rows in 1usize..80,
        inn in 1usize..300,
        out in 1usize..140,
        outliers in 0usize..4,
        threshold in prop_oneof![Just(6.0f32), Just(0.0f32), Just(3.2995f32)],
        seed in 0u64..1000,
    ) {
        let planted: Vec<usize> = (0..outliers.min(inn)).map(|k| (k * 37 + 5) % inn).collect();
        let dims = (rows, inn, out);
        compare_variant_on(&test_gpu(), dims, &planted, threshold, seed, Int8Variant::Bitsandbytes);
    }

    #[test]
    fn bnb_variant_matches_its_definition(
        rows in 1usize..40,
        inn in 1usize..200,
        out in 1usize..60,
        outliers in 0usize..4,
        threshold in prop_oneof![Just(6.0f32), Just(0.0f32), Just(3.2995f32)],
        seed in 0u64..1000,
    ) {
        let planted: Vec<usize> = (0..outliers.min(inn)).map(|k| (k * 29 + 1) % inn).collect();
        let layer = bnb_layer(&values(out * inn, seed + 1, 0.1), &values(out, seed + 2, 0.5), out, inn, threshold);
        check_bnb_reference(&layer, &activations(rows, inn, seed, &planted), rows);
    }
}

#[test]
fn bnb_variant_edge_cases() {
    // GEMV and GEMM forms, one row (bnb skips its column zeroing there), an all-zero row,
    // values beyond f16 (65504: an outlier, through the f32 path), CPU row kernels.
    let gpu = test_gpu();
    let bnb = Int8Variant::Bitsandbytes;
    compare_variant_on(&gpu, (3, 7, 5), &[], 6.0, 1, bnb);
    compare_variant_on(&gpu, (65, 257, 67), &[3, 100], 6.0, 2, bnb);
    compare_variant_on(&gpu, (1, 1, 1), &[], 6.0, 3, bnb);
    compare_variant_on(&gpu, (2, 300, 3), &[0, 1, 2, 299], 6.0, 4, bnb);
    compare_variant_on(&gpu, (1, 40, 9), &[4, 30], 6.0, 5, bnb);
    let (rows, inn, out) = (4, 9, 6);
    let mut x = values(rows * inn, 12, 1.0);
    x[inn..2 * inn].fill(0.0);
    x[2 * inn + 3] = 1.0e5;
    x[3 * inn + 3] = -70000.0;
    let layer = bnb_layer(
        &values(out * inn, 11, 0.2),
        &values(out, 13, 0.1),
        out,
        inn,
        6.0,
    );
    check_bnb_reference(&layer, &x, rows);
    let t = layer
        .trace(
            &Tensor::from_slice(&x, &[rows, inn], &Device::Cpu).unwrap(),
            Int8Form::Auto,
        )
        .unwrap();
    assert_eq!(t.outliers, [3]);
    assert!(t.y.iter().all(|v| v.is_finite()), "{:?}", t.y);
    let gl = layer.clone();
    let gl = Int8Linear::new(
        gl.weight.to_device(&gpu).unwrap(),
        gl.bias.map(|b| b.to_device(&gpu).unwrap()),
        6.0,
    )
    .unwrap()
    .with_variant(bnb);
    let xg = Tensor::from_slice(&x, &[rows, inn], &gpu).unwrap();
    for form in [Int8Form::Gemm, Int8Form::Gemv] {
        let g = gl.trace(&xg, form).unwrap();
        assert_traces_match(&g, &t);
    }
    let (rows, inn, out) = (17, 577, 101);
    let layer = bnb_layer(
        &values(out * inn, 8, 0.1),
        &values(out, 9, 0.1),
        out,
        inn,
        6.0,
    );
    let x = activations(rows, inn, 7, &[5, 300]);
    check_cpu_forms(&layer, &x, rows, inn);
    check_bnb_reference(&layer, &x, rows);
}

#[test]
fn bnb_variant_differs_from_lathe_where_bitsandbytes_does() {
    // Row 1's absmax: lathe's is over the non-outlier columns, bitsandbytes' over the
    // non-outlier entries, so column 0's 3.0 counts (column 0 is an outlier column through
    // row 0's 7.0 only). 5.999 rounds to 6.0 in f16: an outlier for bitsandbytes, not for
    // lathe. Row 2: 0.098422 * 127 = 12.4996 -> 12 for lathe; bitsandbytes quantizes its f16
    // value 0.09845, 12.503 -> 13; and zeroes column 2, an outlier column.
    let x = [
        7.0f32, 1.0, 2.0, 0.5, //
        3.0, 1.5, 5.999, -2.5, //
        0.0, 0.098422, 1.0, 0.25,
    ];
    let (rows, inn, out) = (3, 4, 2);
    let w = Tensor::from_slice(&values(out * inn, 3, 0.5), &[out, inn], &Device::Cpu).unwrap();
    let lathe = Int8Linear::from_dense(&w, None, 6.0).unwrap();
    let bnb = lathe.clone().with_variant(Int8Variant::Bitsandbytes);
    assert_eq!(lathe.variant, Int8Variant::Lathe, "the default");
    let xt = Tensor::from_slice(&x, &[rows, inn], &Device::Cpu).unwrap();
    let tl = lathe.trace(&xt, Int8Form::Auto).unwrap();
    let tb = bnb.trace(&xt, Int8Form::Auto).unwrap();
    assert_eq!(tl.outliers, [0]);
    assert_eq!(tb.outliers, [0, 2]);
    assert_eq!(tl.sca, [2.0, 5.999, 1.0]);
    assert_eq!(tb.sca, [2.0, 3.0, 1.0]);
    assert_eq!(tl.ca[8..], [0, 12, 127, 32]);
    assert_eq!(tb.ca[8..], [0, 13, 0, 32]);
    let gpu = test_gpu();
    let to_gpu = |l: &Int8Linear| {
        Int8Linear::new(l.weight.to_device(&gpu).unwrap(), None, 6.0)
            .unwrap()
            .with_variant(l.variant)
    };
    let xg = xt.to_device(&gpu).unwrap();
    assert_traces_match(&to_gpu(&lathe).trace(&xg, Int8Form::Auto).unwrap(), &tl);
    assert_traces_match(&to_gpu(&bnb).trace(&xg, Int8Form::Auto).unwrap(), &tb);
    check_bnb_reference(&bnb, &x, rows);
}
