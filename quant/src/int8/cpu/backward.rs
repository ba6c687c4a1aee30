//! The input gradient through the frozen int8 weight.

use rayon::prelude::*;

use super::dequant;

/// f32 elements of one dequantized weight panel in [`backward_dx`] (4 MiB): large enough
/// for the packed GEMM to run at speed, small enough that a 20B model's widest layer never
/// exists dequantized in full.
const DX_PANEL_ELEMS: usize = 1 << 20;

/// dx (rows, cols) = dy (rows, outs) @ dequant(W), accumulated in f32. The weight is
/// dequantized a panel of output rows at a time, and each panel enters one packed GEMM
/// `dx += dy[:, panel] @ W[panel, :]`.
pub(crate) fn backward_dx(
    dy: &[f32],
    cb: &[i8],
    scb: &[f32],
    rows: usize,
    outs: usize,
    cols: usize,
    stride: usize,
) -> lathe_core::Result<Vec<f32>> {
    let mut dx = vec![0f32; rows * cols];
    if cols == 0 || rows == 0 {
        return Ok(dx);
    }
    let panel_rows = (DX_PANEL_ELEMS / cols).clamp(1, outs.max(1));
    let mut panel = vec![0f32; panel_rows * cols];
    for o0 in (0..outs).step_by(panel_rows) {
        let n = panel_rows.min(outs - o0);
        panel[..n * cols]
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, w)| {
                let o = o0 + i;
                for (wv, &q) in w.iter_mut().zip(&cb[o * stride..o * stride + cols]) {
                    *wv = dequant(q, scb[o]);
                }
            });
        lathe_core::ops::matmul::cpu_matmul_accumulate(
            &mut dx,
            &dy[o0..],
            outs,
            &panel[..n * cols],
            (rows, cols, n),
        )?;
    }
    Ok(dx)
}
