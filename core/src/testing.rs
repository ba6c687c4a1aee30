//! Test helpers shared by every crate's tests: an explicit tolerance that reports the worst
//! element, a finite-difference gradient check, the GPU device tests run on, and a counting
//! allocator for the parsers' allocation bounds ([`CountingAlloc`]).

use std::cell::Cell;

use crate::{Device, Result, Tensor};

/// |got - want| <= abs + rel * |want|, element by element.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Absolute slack.
    pub abs: f32,
    /// Slack relative to |want|.
    pub rel: f32,
}

impl Tolerance {
    /// A tolerance of `abs + rel * |want|`.
    pub const fn new(abs: f32, rel: f32) -> Self {
        Tolerance { abs, rel }
    }
}

/// The worst element of a comparison.
#[derive(Clone, Debug)]
pub struct Mismatch {
    /// The element's index.
    pub index: usize,
    /// The value compared.
    pub got: f32,
    /// The value expected.
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

/// A global allocator for test binaries that counts, per thread, the heap bytes live and
/// their peak, so a parser test can assert that a file's claims (a header length, a count,
/// a shape of 2^60) never drive an allocation beyond a bound derived from the input's size.
/// A test binary installs it with
/// `#[global_allocator] static ALLOC: CountingAlloc = CountingAlloc;` and measures with
/// [`peak_alloc_during`]. Per thread, because tests run in parallel threads; the parsers
/// measured allocate on the calling thread (C code's own `malloc`, e.g. onig's regexes, is
/// not seen).
pub struct CountingAlloc;

mod counting {
    use std::cell::Cell;

    thread_local! {
        // const-initialised Cells without destructors: usable from inside the allocator
        // (no allocation, no lazy initialisation) and during thread teardown.
        pub static LIVE: Cell<isize> = const { Cell::new(0) };
        pub static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    pub fn add(bytes: usize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get().saturating_add(bytes as isize);
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    pub fn sub(bytes: usize) {
        let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(bytes as isize)));
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only
// observe sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            counting::add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            counting::add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        counting::sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new) };
        if !p.is_null() {
            // A moving realloc holds both blocks for a moment: count the new one first.
            counting::add(new);
            counting::sub(layout.size());
        }
        p
    }
}

/// Runs `f` and returns its result with the peak of heap bytes the calling thread held
/// during it beyond what it held before. Panics when [`CountingAlloc`] is not the test
/// binary's global allocator (the peak would read 0 and every bound would pass).
pub fn peak_alloc_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = counting::LIVE.with(Cell::get);
    let probe = std::hint::black_box(Box::new([0u8; 64]));
    assert!(
        counting::LIVE.with(Cell::get) >= before + 64,
        "peak_alloc_during needs `#[global_allocator] static ALLOC: CountingAlloc = CountingAlloc;`"
    );
    drop(probe);
    let start = counting::LIVE.with(Cell::get);
    counting::PEAK.with(|p| p.set(start));
    let out = f();
    let peak = counting::PEAK.with(Cell::get);
    (out, (peak - start).max(0) as usize)
}

/// The allocation bound every parser of untrusted bytes is held to by its tests: the peak
/// heap of one parse is at most 16 MiB plus 64 bytes per input byte. A claim in the input
/// (a length, a count, a shape) can then never buy more memory than the input itself
/// carries, up to the constant factor of the parsed form (a JSON `0` of 2 bytes becomes a
/// 32-byte value; a GGUF u8 array element a 32-byte value).
pub fn parse_alloc_bound(input_len: usize) -> usize {
    (16 << 20) + 64 * input_len
}
