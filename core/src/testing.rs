//! Test helpers shared by every crate's tests: an explicit tolerance that reports the worst
//! element, a finite-difference gradient check, and the GPU device tests run on.

use crate::{Device, Result, Tensor};

/// |got - want| <= abs + rel * |want|, element by element.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub abs: f32,
    pub rel: f32,
}

impl Tolerance {
    pub const fn new(abs: f32, rel: f32) -> Self {
        Tolerance { abs, rel }
    }
}

/// The worst element of a comparison.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub index: usize,
    pub got: f32,
    pub want: f32,
    /// How far past the tolerance, as a multiple of it (<= 1 passes).
    pub ratio: f32,
}

/// Compares two slices; `Err` names the worst element and the tolerance it broke.
pub fn compare(got: &[f32], want: &[f32], tol: Tolerance) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("length {} != {}", got.len(), want.len()));
    }
    let mut worst: Option<Mismatch> = None;
    for (index, (&g, &w)) in got.iter().zip(want).enumerate() {
        let allowed = tol.abs + tol.rel * w.abs();
        let err = (g - w).abs();
        let ratio = if err.is_nan() || g.is_nan() != w.is_nan() {
            f32::INFINITY
        } else {
            err / allowed.max(f32::MIN_POSITIVE)
        };
        if worst.as_ref().is_none_or(|m| ratio > m.ratio) {
            worst = Some(Mismatch {
                index,
                got: g,
                want: w,
                ratio,
            });
        }
    }
    match worst {
        Some(m) if m.ratio > 1.0 => Err(format!(
            "element {} is {} but should be {} (|diff| {:.3e}, {:.2}x over tolerance abs {:.1e} rel {:.1e}; {} elements)",
            m.index,
            m.got,
            m.want,
            (m.got - m.want).abs(),
            m.ratio,
            tol.abs,
            tol.rel,
            got.len()
        )),
        _ => Ok(()),
    }
}

/// Panics with the worst element when `got` and `want` differ by more than `tol`.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], tol: Tolerance) {
    if let Err(message) = compare(got, want, tol) {
        panic!("{message}");
    }
}

/// Compares two tensors' shapes and values (any devices).
#[track_caller]
pub fn assert_tensors_close(got: &Tensor, want: &Tensor, tol: Tolerance) {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    assert_close(
        &got.to_vec_f32().expect("readable"),
        &want.to_vec_f32().expect("readable"),
        tol,
    );
}

/// The GPU that tests run on: hardware or software (lavapipe). Tests never skip when there
/// is none: a missing adapter fails them, with the install hint in the message.
pub fn test_gpu() -> Device {
    match Device::shared_test_gpu() {
        Ok(device) => device,
        Err(e) => panic!(
            "GPU tests need a Vulkan adapter ({e}). Install one: `apt-get install mesa-vulkan-drivers` (software lavapipe)"
        ),
    }
}

/// The storage-binding limit of [`small_binding_gpu`]: 16 KiB.
pub const SMALL_BINDING: u64 = 16 << 10;

/// A GPU whose storage bindings are forced down to [`SMALL_BINDING`] bytes, so that ops on
/// tensors of ten thousand elements split their work over windows (what tensors over 2 GiB
/// need on real GPUs).
pub fn small_binding_gpu() -> Device {
    gpu_with_binding_limit(SMALL_BINDING)
}

/// A GPU whose storage bindings are forced down to `bytes` (one shared context per limit).
pub fn gpu_with_binding_limit(bytes: u64) -> Device {
    match Device::test_gpu_with_binding_limit(bytes) {
        Ok(device) => device,
        Err(e) => panic!(
            "GPU tests need a Vulkan adapter ({e}). Install one: `apt-get install mesa-vulkan-drivers` (software lavapipe)"
        ),
    }
}

/// Checks the gradient of `f` (a function of several CPU tensors to a tensor) at `inputs`
/// against central finite differences of the scalar `sum(f(inputs) * w)` with a fixed random
/// weight `w`, so every output element matters. f32 arithmetic: use eps around 1e-2 and
/// inputs of order one.
pub fn check_gradients(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    eps: f32,
    tol: Tolerance,
) -> std::result::Result<(), String> {
    let vars: Vec<Tensor> = inputs.iter().map(|t| t.detach().into_variable()).collect();
    let out = f(&vars).map_err(|e| e.to_string())?;
    let weight =
        Tensor::rand_uniform(-1.0, 1.0, out.shape(), 7, out.device()).map_err(|e| e.to_string())?;
    let loss = out
        .mul(&weight)
        .and_then(|t| t.sum_all())
        .map_err(|e| e.to_string())?;
    let grads = loss.backward().map_err(|e| e.to_string())?;
    let weight_host = weight.to_vec_f32().map_err(|e| e.to_string())?;
    let objective = |xs: &[Tensor]| -> std::result::Result<f64, String> {
        let _g = crate::no_grad();
        let out = f(xs)
            .map_err(|e| e.to_string())?
            .to_vec_f32()
            .map_err(|e| e.to_string())?;
        Ok(out
            .iter()
            .zip(&weight_host)
            .map(|(o, w)| (*o as f64) * (*w as f64))
            .sum())
    };
    for (i, var) in vars.iter().enumerate() {
        let analytic = match grads.get(var) {
            Some(g) => g.to_vec_f32().map_err(|e| e.to_string())?,
            None => vec![0.0; var.elem_count()],
        };
        let base = var.to_vec_f32().map_err(|e| e.to_string())?;
        let mut numeric = vec![0.0f32; base.len()];
        for j in 0..base.len() {
            let shifted = |delta: f32| -> std::result::Result<f64, String> {
                let mut values = base.clone();
                values[j] += delta;
                let mut xs: Vec<Tensor> = vars.iter().map(|v| v.detach()).collect();
                xs[i] = Tensor::from_vec(values, var.shape(), var.device())
                    .map_err(|e| e.to_string())?;
                objective(&xs)
            };
            numeric[j] = ((shifted(eps)? - shifted(-eps)?) / (2.0 * eps as f64)) as f32;
        }
        compare(&analytic, &numeric, tol).map_err(|m| format!("gradient of input {i}: {m}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_the_worst_element() {
        let err = compare(
            &[1.0, 2.0, 3.5],
            &[1.0, 2.1, 3.0],
            Tolerance::new(0.01, 0.0),
        )
        .unwrap_err();
        assert!(err.starts_with("element 2 is 3.5"), "{err}");
        assert!(compare(&[1.0, f32::NAN], &[1.0, 1.0], Tolerance::new(1.0, 1.0)).is_err());
        assert!(compare(&[1.0, 2.0], &[1.0005, 2.0], Tolerance::new(1e-3, 0.0)).is_ok());
    }
}
