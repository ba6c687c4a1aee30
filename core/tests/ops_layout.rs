//! Layout ops (permute, transpose, narrow, pad_narrow, cat, split, chunk), dtype casts, rotary
//! embedding and embedding lookup: GPU against CPU, backward against finite differences and
//! across devices, exact values on small cases, and bad inputs.

use half::f16;
use lathe_core::ops::rotary::RotaryTables;
use lathe_core::testing::{
    assert_close, assert_tensors_close, check_gradients, test_gpu, Tolerance,
};
use lathe_core::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;

const EXACT: Tolerance = Tolerance::new(0.0, 0.0);
const GPU_TOL: Tolerance = Tolerance::new(1e-5, 1e-5);
const FD_TOL: Tolerance = Tolerance::new(2e-2, 2e-2);

fn both(shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    let cpu = Tensor::rand_uniform(-1.0, 1.0, shape, seed, &Device::Cpu).unwrap();
    let gpu = cpu.to_device(&test_gpu()).unwrap();
    (cpu, gpu)
}

fn ids_both(values: Vec<u32>, shape: &[usize]) -> (Tensor, Tensor) {
    let cpu = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
    let gpu = cpu.to_device(&test_gpu()).unwrap();
    (cpu, gpu)
}

/// Gradients of sum(f(inputs) * w) for a fixed random w, on the inputs' device.
fn grads(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> Vec<Tensor> {
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.detach().into_variable()).collect();
    let out = f(&vars).unwrap();
    let device = out.device().clone();
    let w = Tensor::rand_uniform(-1.0, 1.0, out.shape(), 99, &Device::Cpu)
        .unwrap()
        .to_device(&device)
        .unwrap();
    let store = out.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter()
        .map(|v| store.get(v).expect("every input gets a gradient").clone())
        .collect()
}

/// The backward on the GPU equals the backward on the CPU.
fn assert_gpu_backward_matches(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, cpu_inputs: &[Tensor]) {
    let gpu_inputs: Vec<Tensor> = cpu_inputs
        .iter()
        .map(|t| t.to_device(&test_gpu()).unwrap())
        .collect();
    let (want, got) = (grads(f, cpu_inputs), grads(f, &gpu_inputs));
    for (g, w) in got.iter().zip(&want) {
        assert_tensors_close(g, w, GPU_TOL);
    }
}

/// Shapes with odd sizes, rank 1..=5.
fn odd_shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..4, 5usize..9, Just(13usize)], 1..=5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn permute_gpu_matches_cpu((shape, dims) in odd_shape().prop_flat_map(|s| {
        let rank = s.len();
        (Just(s), Just((0..rank).collect::<Vec<_>>()).prop_shuffle())
    }), seed in 0u64..1000) {
        let (x, xg) = both(&shape, seed);
        assert_tensors_close(&xg.permute(&dims).unwrap(), &x.permute(&dims).unwrap(), EXACT);
        // u32 moves the same bits.
        let ids: Vec<u32> = (0..x.elem_count() as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let (i, ig) = ids_both(ids, &shape);
        prop_assert_eq!(ig.permute(&dims).unwrap().to_vec_u32().unwrap(), i.permute(&dims).unwrap().to_vec_u32().unwrap());
    }

    #[test]
    fn narrow_and_pad_narrow_gpu_match_cpu(shape in odd_shape(), dim_pick in 0usize..5, a in 0usize..14, b in 0usize..14, seed in 0u64..1000) {
        let dim = dim_pick % shape.len();
        let size = shape[dim];
        let (start, end) = ((a % (size + 1)).min(b % (size + 1)), (a % (size + 1)).max(b % (size + 1)));
        let (x, xg) = both(&shape, seed);
        let (n, ng) = (x.narrow(dim, start, end - start).unwrap(), xg.narrow(dim, start, end - start).unwrap());
        assert_tensors_close(&ng, &n, EXACT);
        assert_tensors_close(&ng.pad_narrow(dim, start, size + 3).unwrap(), &n.pad_narrow(dim, start, size + 3).unwrap(), EXACT);
    }

    #[test]
    fn cat_split_chunk_gpu_match_cpu(base in odd_shape(), dim_pick in 0usize..5,
                                     sizes in prop::collection::vec(0usize..7, 1..5), chunks in 1usize..6, seed in 0u64..1000) {
        let dim = dim_pick % base.len();
        let parts: Vec<(Tensor, Tensor)> = sizes.iter().enumerate().map(|(k, &s)| {
            let mut shape = base.clone();
            shape[dim] = s;
            both(&shape, seed + k as u64)
        }).collect();
        let cpu: Vec<&Tensor> = parts.iter().map(|p| &p.0).collect();
        let gpu: Vec<&Tensor> = parts.iter().map(|p| &p.1).collect();
        let (c, cg) = (Tensor::cat(&cpu, dim).unwrap(), Tensor::cat(&gpu, dim).unwrap());
        assert_tensors_close(&cg, &c, EXACT);
        for (g, w) in cg.split(&sizes, dim).unwrap().iter().zip(c.split(&sizes, dim).unwrap()) {
            assert_tensors_close(g, &w, EXACT);
        }
        let (pieces, pieces_g) = (c.chunk(chunks, dim).unwrap(), cg.chunk(chunks, dim).unwrap());
        prop_assert_eq!(pieces.len(), pieces_g.len());
        for (g, w) in pieces_g.iter().zip(&pieces) {
            assert_tensors_close(g, w, EXACT);
        }
        // Splitting inverts cat exactly.
        for (piece, original) in c.split(&sizes, dim).unwrap().iter().zip(&cpu) {
            assert_tensors_close(piece, original, EXACT);
        }
    }

    #[test]
    fn casts_gpu_match_cpu_bit_for_bit(n in 1usize..700, scale_exp in -10i32..15, seed in 0u64..1000) {
        let scale = 2f32.powi(scale_exp);
        let x = Tensor::rand_uniform(-scale, scale, &[n], seed, &Device::Cpu).unwrap();
        let xg = x.to_device(&test_gpu()).unwrap();
        let (h, hg) = (x.to_dtype(DType::F16).unwrap(), xg.to_dtype(DType::F16).unwrap());
        prop_assert_eq!(hg.dtype(), DType::F16);
        let bits = |t: &Tensor| t.to_vec_f32().unwrap().iter().map(|v| f16::from_f32(*v).to_bits()).collect::<Vec<_>>();
        let (want, got) = (bits(&h), bits(&hg));
        let normal = x.to_vec_f32().unwrap().iter().map(|v| v.abs() >= 2f32.powi(-14)).collect::<Vec<_>>();
        for k in 0..n {
            if normal[k] {
                prop_assert_eq!(got[k], want[k], "element {} of {}", k, n);
            }
        }
        let (back, back_g) = (h.to_dtype(DType::F32).unwrap(), hg.to_dtype(DType::F32).unwrap());
        assert_tensors_close(&back_g, &back, EXACT);
        let ids: Vec<u32> = (0..n as u32).map(|i| i * 7919 % 100_003).collect();
        let (i, ig) = ids_both(ids, &[n]);
        assert_tensors_close(&ig.to_dtype(DType::F32).unwrap(), &i.to_dtype(DType::F32).unwrap(), EXACT);
    }

    #[test]
    fn rotary_gpu_matches_cpu(b in 1usize..3, heads in 1usize..4, t in 1usize..20, half_head in 1usize..36,
                              rot_pick in 1usize..36, seed in 0u64..1000) {
        let head_dim = 2 * half_head + (seed as usize % 2); // odd head dims too
        let rotary_dims = 2 * (rot_pick % half_head + 1);
        let max_positions = 64;
        let (x, xg) = both(&[b, heads, t, head_dim], seed);
        let pos: Vec<u32> = (0..b * t).map(|k| ((k as u64 * 37 + seed) % max_positions as u64) as u32).collect();
        let (p, pg) = ids_both(pos, &[b, t]);
        let tables = RotaryTables::new(max_positions, rotary_dims, 10_000.0, &Device::Cpu).unwrap();
        let tables_g = RotaryTables::new(max_positions, rotary_dims, 10_000.0, &test_gpu()).unwrap();
        assert_tensors_close(&xg.rotary(&tables_g, &pg).unwrap(), &x.rotary(&tables, &p).unwrap(), GPU_TOL);
    }

    #[test]
    fn embedding_gpu_matches_cpu(vocab in 1usize..50, hidden in prop_oneof![1usize..4, Just(257usize), Just(300usize)],
                                 tokens in 1usize..40, seed in 0u64..1000) {
        let (w, wg) = both(&[vocab, hidden], seed);
        let ids: Vec<u32> = (0..tokens).map(|k| ((k as u64 * 31 + seed) % vocab as u64) as u32).collect();
        let (i, ig) = ids_both(ids, &[tokens]);
        assert_tensors_close(&Tensor::embedding(&wg, &ig).unwrap(), &Tensor::embedding(&w, &i).unwrap(), EXACT);
    }
}

#[test]
fn permute_cat_split_exact_values() {
    let cpu = Device::Cpu;
    for device in [cpu.clone(), test_gpu()] {
        // (2, 3) [[0 1 2] [3 4 5]]
        let x = Tensor::from_vec((0..6).map(|v| v as f32).collect(), &[2, 3], &device).unwrap();
        let t = x.transpose(0, 1).unwrap();
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.to_vec_f32().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
        // (2, 3, 2) permuted (2, 0, 1): out[k, i, j] = x[i, j, k]
        let y = Tensor::from_vec((0..12).map(|v| v as f32).collect(), &[2, 3, 2], &device).unwrap();
        let p = y.permute(&[2, 0, 1]).unwrap();
        assert_eq!(p.shape(), &[2, 2, 3]);
        assert_eq!(
            p.to_vec_f32().unwrap(),
            vec![0., 2., 4., 6., 8., 10., 1., 3., 5., 7., 9., 11.]
        );
        let a = Tensor::from_vec(vec![1.0f32, 2.0], &[2, 1], &device).unwrap();
        let c = Tensor::cat(&[&x, &a], 1).unwrap();
        assert_eq!(c.shape(), &[2, 4]);
        assert_eq!(
            c.to_vec_f32().unwrap(),
            vec![0., 1., 2., 1., 3., 4., 5., 2.]
        );
        let r = Tensor::cat(&[&x, &x], 0).unwrap();
        assert_eq!(
            r.to_vec_f32().unwrap(),
            vec![0., 1., 2., 3., 4., 5., 0., 1., 2., 3., 4., 5.]
        );
        let parts = c.split(&[1, 3], 1).unwrap();
        assert_eq!(parts[0].to_vec_f32().unwrap(), vec![0., 3.]);
        assert_eq!(parts[1].to_vec_f32().unwrap(), vec![1., 2., 1., 4., 5., 2.]);
        let chunks = c.chunk(3, 1).unwrap();
        assert_eq!(chunks.len(), 2, "4 columns in chunks of 2");
        assert_eq!(chunks[1].to_vec_f32().unwrap(), vec![2., 1., 5., 2.]);
        let n = x.narrow(1, 1, 2).unwrap();
        assert_eq!(n.to_vec_f32().unwrap(), vec![1., 2., 4., 5.]);
        let padded = n.pad_narrow(1, 1, 4).unwrap();
        assert_eq!(
            padded.to_vec_f32().unwrap(),
            vec![0., 1., 2., 0., 0., 4., 5., 0.]
        );
        // u32 tensors go through the same copies.
        let ids = Tensor::from_vec(vec![7u32, 8, 9, 10, 11, 12], &[2, 3], &device).unwrap();
        assert_eq!(
            ids.transpose(0, 1).unwrap().to_vec_u32().unwrap(),
            vec![7, 10, 8, 11, 9, 12]
        );
        assert_eq!(
            Tensor::cat(&[&ids, &ids.narrow(1, 2, 1).unwrap()], 1)
                .unwrap()
                .to_vec_u32()
                .unwrap(),
            vec![7, 8, 9, 9, 10, 11, 12, 12]
        );
    }
}

#[test]
fn f16_layout_ops_match_on_both_devices() {
    let x = Tensor::rand_uniform(-1.0, 1.0, &[3, 5, 7], 4, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let xg = x.to_device(&test_gpu()).unwrap();
    let run = |t: &Tensor| -> Vec<Tensor> {
        vec![
            t.permute(&[2, 0, 1]).unwrap(),
            t.narrow(1, 1, 3).unwrap(),
            Tensor::cat(&[t, t], 2).unwrap(),
            t.narrow(2, 0, 3).unwrap().pad_narrow(2, 2, 9).unwrap(),
        ]
    };
    for (g, c) in run(&xg).iter().zip(run(&x)) {
        assert_eq!(g.dtype(), DType::F16);
        assert_eq!(c.dtype(), DType::F16);
        assert_tensors_close(g, &c, EXACT);
    }
}

#[test]
fn f16_round_trip_and_rounding_is_bit_exact() {
    // Values representable in f16 come back unchanged; ties round to even; GPU bits equal
    // the half crate's bits over normal-range values of every f16 binade.
    let mut values: Vec<f32> = Vec::new();
    for bits in (0x0400u16..0x7C00).step_by(7) {
        let h = f16::from_bits(bits).to_f32();
        let next = f16::from_bits(bits + 1).to_f32();
        values.extend([
            h,
            -h,
            (h + next) / 2.0,
            h + (next - h) * 0.3,
            -(h + next) / 2.0,
        ]);
    }
    values.retain(|v| v.is_finite() && v.abs() <= 65504.0);
    let n = values.len();
    let x = Tensor::from_vec(values.clone(), &[n], &Device::Cpu).unwrap();
    let xg = x.to_device(&test_gpu()).unwrap();
    let want: Vec<u16> = values.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
    let got: Vec<u16> = xg
        .to_dtype(DType::F16)
        .unwrap()
        .to_vec_f32()
        .unwrap()
        .iter()
        .map(|v| f16::from_f32(*v).to_bits())
        .collect();
    let cpu: Vec<u16> = x
        .to_dtype(DType::F16)
        .unwrap()
        .to_vec_f32()
        .unwrap()
        .iter()
        .map(|v| f16::from_f32(*v).to_bits())
        .collect();
    assert_eq!(cpu, want);
    if let Some(k) = (0..n).find(|&k| got[k] != want[k]) {
        panic!(
            "GPU f16 of {} is {:#06x}, the half crate gives {:#06x}",
            values[k], got[k], want[k]
        );
    }
    // Ties to even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10.
    let tie = Tensor::from_vec(
        vec![1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)],
        &[2],
        &test_gpu(),
    )
    .unwrap();
    assert_eq!(
        tie.to_dtype(DType::F16).unwrap().to_vec_f32().unwrap(),
        vec![1.0, 1.0 + 2.0 * 2f32.powi(-10)]
    );
    // Exactly representable values round-trip on both devices.
    for device in [Device::Cpu, test_gpu()] {
        let exact: Vec<f32> = (0..101).map(|k| (k as f32 - 50.0) * 0.125).collect();
        let t = Tensor::from_vec(exact.clone(), &[101], &device).unwrap();
        let back = t
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(back.dtype(), DType::F32);
        assert_eq!(back.to_vec_f32().unwrap(), exact);
    }
}

/// HF rotate_half reference, written out for (1, 1, T, D) with positions 0..T.
fn rotary_reference(x: &[f32], t: usize, d: usize, rot: usize, base: f32) -> Vec<f32> {
    let half = rot / 2;
    let mut out = x.to_vec();
    for pos in 0..t {
        let row = &x[pos * d..(pos + 1) * d];
        // emb = cat(freqs, freqs); rotate_half(x) = cat(-x2, x1) over the rotated part.
        let emb: Vec<f32> = (0..rot)
            .map(|j| pos as f32 / base.powf((2 * (j % half)) as f32 / rot as f32))
            .collect();
        let rotated_half: Vec<f32> = (0..rot)
            .map(|j| {
                if j < half {
                    -row[j + half]
                } else {
                    row[j - half]
                }
            })
            .collect();
        for j in 0..rot {
            out[pos * d + j] = row[j] * emb[j].cos() + rotated_half[j] * emb[j].sin();
        }
    }
    out
}

#[test]
fn rotary_matches_a_hand_written_reference() {
    // rotary_pct 0.25 of head_dim 16: 4 rotated dims, 12 passing through.
    let (t, d, rot) = (5, 16, 4);
    for device in [Device::Cpu, test_gpu()] {
        let x = Tensor::rand_uniform(-1.0, 1.0, &[1, 1, t, d], 3, &device).unwrap();
        let tables = RotaryTables::new(8, rot, 10_000.0, &device).unwrap();
        let pos = Tensor::from_vec((0..t as u32).collect(), &[1, t], &device).unwrap();
        let out = x.rotary(&tables, &pos).unwrap().to_vec_f32().unwrap();
        let xs = x.to_vec_f32().unwrap();
        assert_close(
            &out,
            &rotary_reference(&xs, t, d, rot, 10_000.0),
            Tolerance::new(1e-6, 1e-6),
        );
        // Dims past rotary_dims pass through untouched.
        for p in 0..t {
            assert_eq!(
                &out[p * d + rot..(p + 1) * d],
                &xs[p * d + rot..(p + 1) * d]
            );
        }
    }
    // Per-row positions: a left-padded row shifted by 2 rotates like the unpadded row.
    let x = Tensor::rand_uniform(-1.0, 1.0, &[1, 2, 3, 8], 5, &Device::Cpu).unwrap();
    let tables = RotaryTables::new(8, 8, 10_000.0, &Device::Cpu).unwrap();
    let padded = Tensor::cat(
        &[&Tensor::zeros(&[1, 2, 2, 8], &Device::Cpu).unwrap(), &x],
        2,
    )
    .unwrap();
    let two_rows = Tensor::cat(&[&x.pad_narrow(2, 0, 5).unwrap(), &padded], 0).unwrap();
    let pos =
        Tensor::from_vec(vec![0u32, 1, 2, 0, 0, 0, 0, 0, 1, 2], &[2, 5], &Device::Cpu).unwrap();
    let out = two_rows.rotary(&tables, &pos).unwrap();
    let first = out.narrow(0, 0, 1).unwrap().narrow(2, 0, 3).unwrap();
    let second = out.narrow(0, 1, 1).unwrap().narrow(2, 2, 3).unwrap();
    assert_tensors_close(&second, &first, EXACT);
}

/// Given the ids' host copy, the gather and its gradient are the read-back ones; a copy of
/// the wrong length or an id past the table is refused.
#[test]
fn embedding_with_host_ids_equals_embedding() {
    for device in [Device::Cpu, test_gpu()] {
        let w = Tensor::rand_uniform(-1.0, 1.0, &[5, 3], 3, &device)
            .unwrap()
            .into_variable();
        let host = vec![4u32, 0, 4, 1];
        let ids = Tensor::from_vec(host.clone(), &[2, 2], &device).unwrap();
        let given = Tensor::embedding_with_host_ids(&w, &ids, host.clone()).unwrap();
        let read = Tensor::embedding(&w, &ids).unwrap();
        assert_tensors_close(&given, &read, EXACT);
        let g = Tensor::rand_uniform(-1.0, 1.0, &[2, 2, 3], 4, &device).unwrap();
        let grad = |e: &Tensor| {
            let store = e.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            store.get(&w).unwrap().to_vec_f32().unwrap()
        };
        assert_eq!(grad(&given), grad(&read), "{}", device.name());
        assert!(Tensor::embedding_with_host_ids(&w, &ids, host[..3].to_vec()).is_err());
        let past = Tensor::from_vec(vec![5u32], &[1], &device).unwrap();
        assert!(matches!(
            Tensor::embedding_with_host_ids(&w, &past, vec![5]),
            Err(Error::IndexOutOfRange { .. })
        ));
    }
}

#[test]
fn embedding_exact_values_and_repeated_ids_sum() {
    for device in [Device::Cpu, test_gpu()] {
        // (4, 2) rows [0 1] [10 11] [20 21] [30 31]
        let w = Tensor::from_vec(vec![0., 1., 10., 11., 20., 21., 30., 31.], &[4, 2], &device)
            .unwrap()
            .into_variable();
        let ids = Tensor::from_vec(vec![2u32, 0, 2, 2, 1, 0], &[2, 3], &device).unwrap();
        let e = Tensor::embedding(&w, &ids).unwrap();
        assert_eq!(e.shape(), &[2, 3, 2]);
        assert_eq!(
            e.to_vec_f32().unwrap(),
            vec![20., 21., 0., 1., 20., 21., 20., 21., 10., 11., 0., 1.]
        );
        // d sum(e * g) / dw: row id collects the g rows of every token with that id.
        let g: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let g = Tensor::from_vec(g, &[2, 3, 2], &device).unwrap();
        let grads = e.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
        // id 0: tokens 1, 5 -> [2+10, 3+11]; id 1: token 4 -> [8, 9];
        // id 2: tokens 0, 2, 3 -> [0+4+6, 1+5+7]; id 3 unused.
        assert_eq!(
            grads.get(&w).unwrap().to_vec_f32().unwrap(),
            vec![12., 14., 8., 9., 10., 13., 0., 0.],
            "{}",
            device.name()
        );
        assert!(grads.get(&ids).is_none());
    }
}

#[test]
fn layout_backward_matches_finite_differences() {
    let cpu = Device::Cpu;
    let x = Tensor::rand_uniform(-1.0, 1.0, &[2, 3, 5], 1, &cpu).unwrap();
    let y = Tensor::rand_uniform(-1.0, 1.0, &[2, 4, 5], 2, &cpu).unwrap();
    let z = Tensor::rand_uniform(-1.0, 1.0, &[2, 1, 5], 3, &cpu).unwrap();
    check_gradients(
        |t| t[0].permute(&[2, 0, 1]),
        std::slice::from_ref(&x),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    check_gradients(
        |t| t[0].transpose(0, 2),
        std::slice::from_ref(&x),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    check_gradients(
        |t| t[0].narrow(2, 1, 3),
        std::slice::from_ref(&x),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    check_gradients(
        |t| t[0].pad_narrow(1, 2, 6),
        std::slice::from_ref(&x),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    check_gradients(
        |t| Tensor::cat(&[&t[0], &t[1], &t[2]], 1),
        &[x.clone(), y.clone(), z.clone()],
        1e-2,
        FD_TOL,
    )
    .unwrap();
    // Pieces reassembled in another order, with a different weight each.
    check_gradients(
        |t| {
            let p = t[0].split(&[1, 2, 1], 1)?;
            Tensor::cat(&[&p[2], &p[0].scale(2.0)?, &p[1].scale(-3.0)?], 1)
        },
        std::slice::from_ref(&y),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    check_gradients(
        |t| {
            let p = t[0].chunk(2, 2)?;
            p[0].narrow(2, 0, 2)?.mul(&p[1])
        },
        std::slice::from_ref(&x),
        1e-2,
        FD_TOL,
    )
    .unwrap();
    // Casts: linear, so a larger eps keeps f16 rounding out of the difference.
    check_gradients(
        |t| t[0].to_dtype(DType::F16)?.to_dtype(DType::F32),
        std::slice::from_ref(&x),
        1e-1,
        FD_TOL,
    )
    .unwrap();
}

#[test]
fn rotary_and_embedding_backward_match_finite_differences() {
    let cpu = Device::Cpu;
    let x = Tensor::rand_uniform(-1.0, 1.0, &[2, 2, 3, 6], 1, &cpu).unwrap();
    let tables = RotaryTables::new(10, 4, 10_000.0, &cpu).unwrap();
    let pos = Tensor::from_vec(vec![0u32, 1, 2, 7, 8, 9], &[2, 3], &cpu).unwrap();
    check_gradients(|t| t[0].rotary(&tables, &pos), &[x], 1e-2, FD_TOL).unwrap();
    let w = Tensor::rand_uniform(-1.0, 1.0, &[5, 3], 2, &cpu).unwrap();
    let ids = Tensor::from_vec(vec![4u32, 1, 4, 0, 4, 1, 2], &[7], &cpu).unwrap();
    check_gradients(|t| Tensor::embedding(&t[0], &ids), &[w], 1e-2, FD_TOL).unwrap();
}

#[test]
fn gpu_backward_matches_cpu_backward() {
    let x = Tensor::rand_uniform(-1.0, 1.0, &[3, 5, 7], 1, &Device::Cpu).unwrap();
    let y = Tensor::rand_uniform(-1.0, 1.0, &[3, 2, 7], 2, &Device::Cpu).unwrap();
    assert_gpu_backward_matches(&|t| t[0].permute(&[1, 2, 0]), std::slice::from_ref(&x));
    assert_gpu_backward_matches(&|t| t[0].transpose(1, 2), std::slice::from_ref(&x));
    assert_gpu_backward_matches(&|t| t[0].narrow(1, 1, 3), std::slice::from_ref(&x));
    assert_gpu_backward_matches(&|t| t[0].pad_narrow(2, 3, 11), std::slice::from_ref(&x));
    assert_gpu_backward_matches(
        &|t| Tensor::cat(&[&t[0], &t[1]], 1),
        &[x.clone(), y.clone()],
    );
    assert_gpu_backward_matches(
        &|t| {
            let p = t[0].split(&[2, 3], 1)?;
            Tensor::cat(&[&p[1], &p[0].scale(-2.0)?], 1)
        },
        std::slice::from_ref(&x),
    );
    assert_gpu_backward_matches(
        &|t| {
            let p = t[0].chunk(3, 2)?;
            Tensor::cat(&[&p[2], &p[0]], 2)
        },
        std::slice::from_ref(&x),
    );
    assert_gpu_backward_matches(
        &|t| t[0].to_dtype(DType::F16)?.to_dtype(DType::F32),
        std::slice::from_ref(&x),
    );
    // Rotary with rotary_dims < head_dim and left-padded positions.
    let q = Tensor::rand_uniform(-1.0, 1.0, &[2, 3, 5, 10], 3, &Device::Cpu).unwrap();
    let pos = vec![0u32, 0, 0, 1, 2, 0, 1, 2, 3, 4];
    let (p, pg) = ids_both(pos, &[2, 5]);
    let t_cpu = RotaryTables::new(16, 6, 10_000.0, &Device::Cpu).unwrap();
    let t_gpu = RotaryTables::new(16, 6, 10_000.0, &test_gpu()).unwrap();
    let want = grads(&|t| t[0].rotary(&t_cpu, &p), std::slice::from_ref(&q));
    let got = grads(
        &|t| t[0].rotary(&t_gpu, &pg),
        &[q.to_device(&test_gpu()).unwrap()],
    );
    assert_tensors_close(&got[0], &want[0], GPU_TOL);
    // Embedding with repeated ids over a hidden size past the workgroup.
    let w = Tensor::rand_uniform(-1.0, 1.0, &[11, 300], 4, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..37).map(|k| (k * k % 7) as u32).collect();
    let (i, ig) = ids_both(ids, &[37]);
    let want = grads(&|t| Tensor::embedding(&t[0], &i), std::slice::from_ref(&w));
    let got = grads(
        &|t| Tensor::embedding(&t[0], &ig),
        &[w.to_device(&test_gpu()).unwrap()],
    );
    // Same summation order on both devices: bit for bit.
    assert_tensors_close(&got[0], &want[0], EXACT);
}

fn message(r: Result<impl std::fmt::Debug>) -> String {
    r.expect_err("bad input must be an error").to_string()
}

#[test]
fn bad_layout_inputs_are_errors() {
    for device in [Device::Cpu, test_gpu()] {
        let x = Tensor::zeros(&[2, 3, 4], &device).unwrap();
        assert!(message(x.permute(&[0, 1])).contains("has 2 dims"));
        assert!(message(x.permute(&[0, 1, 1])).contains("not a permutation"));
        assert!(matches!(
            x.permute(&[0, 1, 3]),
            Err(Error::DimOutOfRange { dim: 3, .. })
        ));
        assert!(matches!(
            x.transpose(0, 5),
            Err(Error::DimOutOfRange { .. })
        ));
        assert!(matches!(
            x.narrow(1, 2, 2),
            Err(Error::IndexOutOfRange {
                op: "narrow",
                index: 3,
                size: 3
            })
        ));
        assert!(matches!(
            x.narrow(3, 0, 1),
            Err(Error::DimOutOfRange { .. })
        ));
        assert!(message(x.pad_narrow(2, 1, 4)).contains("does not fit"));
        let y = Tensor::zeros(&[2, 5, 3], &device).unwrap();
        assert!(message(Tensor::cat(&[&x, &y], 1)).contains("differ outside"));
        assert!(
            message(Tensor::cat(&[&x, &x.reshape(&[6, 4]).unwrap()], 0)).contains("differ outside")
        );
        assert!(message(Tensor::cat(&[], 0)).contains("no tensors"));
        let ids = Tensor::from_vec(vec![0u32; 24], &[2, 3, 4], &device).unwrap();
        assert!(matches!(
            Tensor::cat(&[&x, &ids], 0),
            Err(Error::DType { .. })
        ));
        assert!(message(x.split(&[1, 1], 1)).contains("sum to 2"));
        assert!(message(x.chunk(0, 1)).contains("0 chunks"));
        assert!(matches!(x.to_dtype(DType::U32), Err(Error::DType { .. })));
        assert!(matches!(ids.to_dtype(DType::F16), Err(Error::DType { .. })));
    }
    let (c, g) = (
        Tensor::zeros(&[2], &Device::Cpu).unwrap(),
        Tensor::zeros(&[2], &test_gpu()).unwrap(),
    );
    assert!(message(Tensor::cat(&[&c, &g], 0)).contains("different devices"));
}

#[test]
fn bad_rotary_and_embedding_inputs_are_errors() {
    assert!(message(RotaryTables::new(8, 5, 10_000.0, &Device::Cpu)).contains("even"));
    assert!(message(RotaryTables::new(8, 0, 10_000.0, &Device::Cpu)).contains("even"));
    for device in [Device::Cpu, test_gpu()] {
        let tables = RotaryTables::new(8, 4, 10_000.0, &device).unwrap();
        let x = Tensor::zeros(&[1, 2, 3, 4], &device).unwrap();
        let good = Tensor::from_vec(vec![0u32, 1, 7], &[1, 3], &device).unwrap();
        assert!(x.rotary(&tables, &good).is_ok());
        let beyond = Tensor::from_vec(vec![0u32, 8, 1], &[1, 3], &device).unwrap();
        assert!(matches!(
            x.rotary(&tables, &beyond),
            Err(Error::IndexOutOfRange {
                index: 8,
                size: 8,
                ..
            })
        ));
        let narrow_head = Tensor::zeros(&[1, 2, 3, 2], &device).unwrap();
        assert!(message(narrow_head.rotary(&tables, &good)).contains("over head_dim"));
        let wrong_pos = Tensor::from_vec(vec![0u32, 1], &[1, 2], &device).unwrap();
        assert!(message(x.rotary(&tables, &wrong_pos)).contains("do not match"));
        assert!(
            message(x.reshape(&[2, 3, 4]).unwrap().rotary(&tables, &good))
                .contains("(B, heads, T, head_dim)")
        );
        assert!(matches!(
            x.rotary(
                &tables,
                &x.narrow(3, 0, 1).unwrap().reshape(&[1, 6]).unwrap()
            ),
            Err(Error::DType { .. })
        ));

        let w = Tensor::zeros(&[5, 3], &device).unwrap();
        let ids = Tensor::from_vec(vec![0u32, 5, 1], &[3], &device).unwrap();
        assert!(matches!(
            Tensor::embedding(&w, &ids),
            Err(Error::IndexOutOfRange {
                op: "embedding",
                index: 5,
                size: 5
            })
        ));
        let float_ids = Tensor::zeros(&[3], &device).unwrap();
        assert!(matches!(
            Tensor::embedding(&w, &float_ids),
            Err(Error::DType { .. })
        ));
        let ok_ids = Tensor::from_vec(vec![0u32, 4], &[2], &device).unwrap();
        assert!(message(Tensor::embedding(&w.reshape(&[15]).unwrap(), &ok_ids)).contains("(V, H)"));
    }
}
