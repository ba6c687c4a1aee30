//! Every GPU op on tensors larger than one storage binding. The device here binds at most
//! `SMALL_BINDING` (16 KiB = 4096 f32) per buffer, so each op below dispatches over several
//! windows, as ops over a 50k-vocabulary's logits or a big embedding do on a real GPU with
//! its 2 GiB limit; results must equal the CPU oracle (bit for bit where the GPU kernel
//! computes in the CPU's order, else within the stated tolerance). Sizes are odd so that
//! windows end mid-row.

use lathe_core::testing::{compare, small_binding_gpu, Tolerance, SMALL_BINDING};
use lathe_core::Tensor;
use lathe_core::{Adam, AdamConfig, AttentionMask, DType, Device, GeluKind, Result, RotaryTables};

const EXACT: Tolerance = Tolerance::new(0.0, 0.0);
/// Reductions in a different order than the CPU's.
const CLOSE: Tolerance = Tolerance::new(1e-5, 1e-5);

/// A CPU tensor of uniform values in [-2, 2).
fn input(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(-2.0, 2.0, shape, seed, &Device::Cpu).unwrap()
}

fn over_a_binding(t: &Tensor) -> bool {
    t.elem_count() * 4 > 2 * SMALL_BINDING as usize
}

/// Runs `f` on the CPU and on the small-binding GPU with the same inputs (made variables, so
/// `f` may differentiate) and compares every output.
fn same_on_both(inputs: &[Tensor], tol: Tolerance, f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>) {
    let run = |device: &Device| -> Vec<Vec<f32>> {
        let on: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_device(device).unwrap())
            .collect();
        f(&on)
            .unwrap()
            .iter()
            .map(|t| match t.dtype() {
                DType::U32 => t.to_vec_u32().unwrap().iter().map(|&v| v as f32).collect(),
                _ => t.to_vec_f32().unwrap(),
            })
            .collect()
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&small_binding_gpu()));
    assert_eq!(cpu.len(), gpu.len());
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        if let Err(e) = compare(g, c, tol) {
            panic!("output {i}: {e}");
        }
    }
}

/// The outputs followed by the gradients of sum(out * w) (fixed w) with respect to `vars`.
fn with_grads(out: Tensor, vars: &[&Tensor]) -> Result<Vec<Tensor>> {
    let w = Tensor::rand_uniform(-1.0, 1.0, out.shape(), 99, out.device())?;
    let grads = out.mul(&w)?.sum_all()?.backward()?;
    let mut all = vec![out];
    for v in vars {
        all.push(grads.get(v).expect("reached").clone());
    }
    Ok(all)
}

fn var(t: &Tensor) -> Tensor {
    t.detach().into_variable()
}

#[test]
fn elementwise_ops_and_casts() {
    let x = input(&[97, 131], 1);
    assert!(over_a_binding(&x));
    same_on_both(std::slice::from_ref(&x), EXACT, |t| {
        let x = var(&t[0]);
        let half = x.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
        Ok(vec![
            x.affine(1.5, -0.25)?,
            x.relu()?,
            x.clamp(-1.0, 0.5)?,
            x.dropout(0.3, 77)?,
            half,
            Tensor::full(0.75, &[9001], x.device())?,
        ])
    });
    let x = input(&[101, 93], 2);
    same_on_both(&[x], CLOSE, |t| {
        let x = var(&t[0]);
        let mut all = with_grads(x.gelu(GeluKind::Erf)?.exp()?, &[&x])?;
        all.push(x.silu()?);
        Ok(all)
    });
}

#[test]
fn broadcasting_binary_ops_with_gradients() {
    let (a, row, col, full) = (
        input(&[97, 131], 3),
        input(&[131], 4),
        input(&[97, 1], 5),
        input(&[97, 131], 6),
    );
    same_on_both(&[a, row, col, full], CLOSE, |t| {
        let v: Vec<Tensor> = t.iter().map(var).collect();
        let out = v[0]
            .add(&v[1])?
            .mul(&v[2])?
            .sub(&v[3])?
            .div(&v[3].affine(0.0, 3.0)?)?;
        with_grads(out, &[&v[0], &v[1], &v[2], &v[3]])
    });
}

#[test]
fn matmul_in_blocks_of_rows_columns_and_depth() {
    let tol = Tolerance::new(2e-4, 1e-4);
    // (m, k, n): rows over a binding; a single row over a binding (K split into blocks that
    // accumulate); a weight over a binding (N split); tiny everything but the output.
    for (m, k, n) in [(170, 45, 153), (3, 5000, 5), (9, 20, 1900), (190, 2, 180)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a_shape = if ta { [k, m] } else { [m, k] };
            let b_shape = if tb { [n, k] } else { [k, n] };
            let (a, b) = (input(&a_shape, 7), input(&b_shape, 8));
            same_on_both(&[a, b], tol, |t| {
                let (a, b) = (var(&t[0]), var(&t[1]));
                with_grads(a.matmul_t(&b, ta, tb)?, &[&a, &b])
            });
        }
    }
    // Batched, with per-entry and shared right operands.
    let (a, b, shared) = (
        input(&[6, 40, 60], 9),
        input(&[6, 60, 50], 10),
        input(&[60, 50], 11),
    );
    same_on_both(&[a, b, shared], tol, |t| {
        let v: Vec<Tensor> = t.iter().map(var).collect();
        let mut out = with_grads(v[0].matmul(&v[1])?, &[&v[0], &v[1]])?;
        out.extend(with_grads(v[0].matmul(&v[2])?, &[&v[2]])?);
        Ok(out)
    });
    // An f16 weight over a binding, read transposed (the LM head's case).
    let (x, w) = (input(&[11, 40], 12), input(&[3000, 40], 13));
    same_on_both(&[x, w], tol, |t| {
        let w16 = t[1].to_dtype(DType::F16)?;
        Ok(vec![t[0].matmul_t(&w16, false, true)?])
    });
}

#[test]
fn embedding_tables_over_a_binding() {
    let (vocab, hidden, tokens) = (1000, 24, 400);
    let table = input(&[vocab, hidden], 14);
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|i| (i * 37 + i / 3) % vocab as u32)
        .collect();
    let ids = Tensor::from_vec(ids, &[4, tokens / 4], &Device::Cpu).unwrap();
    same_on_both(&[table, ids], EXACT, |t| {
        let w = var(&t[0]);
        let mut out = with_grads(Tensor::embedding(&w, &t[1])?, &[&w])?;
        out.push(Tensor::embedding(&t[0].to_dtype(DType::F16)?, &t[1])?);
        Ok(out)
    });
}

#[test]
fn copies_transposes_narrows_and_cats() {
    let (x, y, z) = (
        input(&[140, 70], 15),
        input(&[6, 40, 30], 16),
        input(&[140, 33], 17),
    );
    same_on_both(&[x, y, z], CLOSE, |t| {
        let v: Vec<Tensor> = t.iter().map(var).collect();
        let joined = Tensor::cat(&[&v[0], &v[2]], 1)?;
        let out = v[0]
            .transpose(0, 1)?
            .narrow(0, 13, 50)?
            .sum_keepdim(0)?
            .reshape(&[140])?;
        let mut all = with_grads(out, &[&v[0]])?;
        all.push(v[1].permute(&[2, 0, 1])?);
        all.push(joined.narrow(1, 60, 43)?);
        Ok(all)
    });
}

#[test]
fn losses_over_a_vocabulary_wider_than_a_binding() {
    let (rows, vocab) = (53, 333);
    let logits = input(&[rows, vocab], 18).affine(3.0, 0.0).unwrap();
    let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 41) % vocab as u32).collect();
    let mut with_ignored = targets.clone();
    with_ignored[4] = 7777;
    let targets = Tensor::from_vec(targets, &[rows], &Device::Cpu).unwrap();
    let with_ignored = Tensor::from_vec(with_ignored, &[rows], &Device::Cpu).unwrap();
    same_on_both(&[logits, targets, with_ignored], CLOSE, |t| {
        let x = var(&t[0]);
        let mut all = with_grads(x.log_softmax_gather(&t[1])?, &[&x])?;
        all.extend(with_grads(x.log_softmax_last()?, &[&x])?);
        all.extend(with_grads(x.cross_entropy(&t[2], Some(7777))?, &[&x])?);
        all.push(x.entropy_last()?);
        Ok(all)
    });
}

#[test]
fn masked_softmax_rows_across_windows() {
    let scores = input(&[2, 3, 40, 40], 19);
    same_on_both(&[scores], CLOSE, |t| {
        let x = var(&t[0]);
        let mask = AttentionMask {
            causal: true,
            key_ranges: Some(vec![(5, 40), (0, 33)]),
        };
        let mut all = with_grads(x.masked_softmax(&mask)?, &[&x])?;
        all.push(x.softmax_last()?);
        Ok(all)
    });
}

#[test]
fn norms_over_many_windows() {
    let (x, w, b) = (input(&[150, 96], 20), input(&[96], 21), input(&[96], 22));
    same_on_both(&[x, w, b], CLOSE, |t| {
        let v: Vec<Tensor> = t.iter().map(var).collect();
        let mut all = with_grads(
            v[0].layer_norm(Some(&v[1]), Some(&v[2]), 1e-5)?,
            &v.iter().collect::<Vec<_>>(),
        )?;
        all.extend(with_grads(
            v[0].rms_norm(Some(&v[1]), 1e-6)?,
            &[&v[0], &v[1]],
        )?);
        all.push(v[0].layer_norm(None, None, 1e-5)?);
        Ok(all)
    });
}

#[test]
fn reductions_whose_slab_exceeds_a_binding() {
    let x = input(&[9, 600, 8], 23);
    same_on_both(&[x], CLOSE, |t| {
        let x = var(&t[0]);
        let mut all = with_grads(x.sum_keepdim(1)?, &[&x])?;
        all.extend(with_grads(x.max_keepdim(1)?, &[&x])?);
        all.extend(with_grads(x.max_keepdim(2)?, &[&x])?);
        all.push(x.sum(0)?);
        all.push(x.mean_all()?);
        Ok(all)
    });
}

#[test]
fn rotary_over_head_rows_in_windows() {
    let x = input(&[2, 4, 64, 16], 24);
    let positions: Vec<u32> = (0..128).map(|i| (i % 64 + i / 64 * 3) as u32).collect();
    let positions = Tensor::from_vec(positions, &[2, 64], &Device::Cpu).unwrap();
    same_on_both(&[x, positions], CLOSE, |t| {
        let tables = RotaryTables::new(128, 12, 10_000.0, t[0].device())?;
        let x = var(&t[0]);
        with_grads(x.rotary(&tables, &t[1])?, &[&x])
    });
}

#[test]
fn adam_steps_a_parameter_larger_than_a_binding() {
    let (p, g) = (input(&[9001], 25), input(&[9001], 26));
    same_on_both(&[p, g], Tolerance::new(1e-6, 1e-6), |t| {
        let param = var(&t[0]);
        let mut adam = Adam::new(vec![param.clone()], AdamConfig::default())?;
        for _ in 0..3 {
            let grads = param.mul(&t[1])?.sum_all()?.backward()?;
            adam.step(&grads)?;
        }
        Ok(vec![param])
    });
}

#[test]
fn splitting_is_invisible_when_everything_fits() {
    // A tensor under the limit goes through one dispatch of whole buffers: same as before.
    let x = input(&[10, 20], 27);
    assert!(!over_a_binding(&x));
    same_on_both(&[x], EXACT, |t| Ok(vec![t[0].affine(2.0, 1.0)?]));
}
