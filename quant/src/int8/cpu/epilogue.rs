//! The output stage: int32 sums scaled back to f32, plus the outlier columns' 16-bit
//! products and the bias, in lathe's and in bitsandbytes' arithmetic.

use rayon::prelude::*;

use super::{dequant, round_f16};

/// Inputs of the output stage.
pub(crate) struct Epilogue<'a> {
    pub x: &'a [f32],
    pub cols: usize,
    pub sca: &'a [f32],
    pub cb: &'a [i8],
    pub scb: &'a [f32],
    pub stride: usize,
    pub outliers: &'a [u32],
    pub bias: Option<&'a [f32]>,
}

/// y[r, o] = acc * (SCA[r] * SCB[o] / 127^2) + sum over outliers of f16(x) * f16(dequant(w))
/// (products exact in f32, summed in ascending column order) + bias[o].
pub(crate) fn epilogue(acc: &[i32], rows: usize, outs: usize, e: &Epilogue<'_>) -> Vec<f32> {
    // (n_out, outs): the f16-rounded dequantized weights of the outlier columns, one row per
    // column so the loop below runs along outputs (and vectorizes).
    let wo_t: Vec<f32> = e
        .outliers
        .iter()
        .flat_map(|&j| {
            (0..outs).map(move |o| round_f16(dequant(e.cb[o * e.stride + j as usize], e.scb[o])))
        })
        .collect();
    let mut y = vec![0f32; rows * outs];
    let work = |(r, yrow): (usize, &mut [f32])| {
        // The 16-bit path first (0 without outliers), then the same f32 operations in the
        // same order as the definition, in loops simple enough to vectorize. Each output's
        // outlier sum starts at 0 and adds the columns in ascending order.
        for (&j, wcol) in e.outliers.iter().zip(wo_t.chunks(outs.max(1))) {
            let xv = round_f16(e.x[r * e.cols + j as usize]);
            for (yv, &wv) in yrow.iter_mut().zip(wcol) {
                *yv += xv * wv;
            }
        }
        let sca = e.sca[r];
        let accrow = &acc[r * outs..(r + 1) * outs];
        for (yv, (&a, &scb)) in yrow.iter_mut().zip(accrow.iter().zip(&e.scb[..outs])) {
            *yv += a as f32 * (sca * scb / 16129.0);
        }
        if let Some(b) = e.bias {
            for (yv, &bv) in yrow.iter_mut().zip(&b[..outs]) {
                *yv += bv;
            }
        }
    };
    if rows * outs >= 1 << 14 {
        y.par_chunks_mut(outs.max(1)).enumerate().for_each(work);
    } else {
        y.chunks_mut(outs.max(1)).enumerate().for_each(work);
    }
    y
}

/// bitsandbytes' `int8_mm_dequant` constant, 6.200124e-05 as torch rounds it to f32 (bits
/// given so no parser rounds it differently): about 1 / 127^2, 1.8e-5 above it relatively.
pub(crate) const BNB_MM_DEQUANT: f32 = f32::from_bits(0x3882_06aa);

/// bitsandbytes' `int8_vectorwise_dequant` constant 7.874015718698502e-3 = f32(1 / 127): it
/// multiplies where lathe divides by 127.
pub(crate) const BNB_INV_127: f32 = f32::from_bits(0x3c01_0204);

/// bitsandbytes' dequantized weight `(q * scale) * f32(1 / 127)` (two f32 products).
fn bnb_dequant(q: i8, scale: f32) -> f32 {
    (f32::from(q) * scale) * BNB_INV_127
}

/// bitsandbytes 0.50.2's output stage (`int8_mixed_scaled_mm`: `int8_scaled_mm` then
/// `addmm`): y[r, o] = (f32(acc) * (SCA[r] * SCB[o])) * [`BNB_MM_DEQUANT`] + bias[o], to
/// which is added the sum over outlier columns of x[r, j] (f32, not rounded) times the
/// [`bnb_dequant`] weight, in f32. The products are summed from 0 in ascending column order
/// and the sum added last; torch's addmm sums them in its BLAS' order, which can differ in
/// the last bits (the only step of bnb's forward not reproduced bit for bit).
pub(crate) fn epilogue_bnb(acc: &[i32], rows: usize, outs: usize, e: &Epilogue<'_>) -> Vec<f32> {
    let wo_t: Vec<f32> = e
        .outliers
        .iter()
        .flat_map(|&j| {
            (0..outs).map(move |o| bnb_dequant(e.cb[o * e.stride + j as usize], e.scb[o]))
        })
        .collect();
    let mut y = vec![0f32; rows * outs];
    let work = |(r, yrow): (usize, &mut [f32])| {
        let sca = e.sca[r];
        let accrow = &acc[r * outs..(r + 1) * outs];
        for (yv, (&a, &scb)) in yrow.iter_mut().zip(accrow.iter().zip(&e.scb[..outs])) {
            *yv = (a as f32 * (sca * scb)) * BNB_MM_DEQUANT;
        }
        if let Some(b) = e.bias {
            for (yv, &bv) in yrow.iter_mut().zip(&b[..outs]) {
                *yv += bv;
            }
        }
        if !e.outliers.is_empty() {
            let mut sum = vec![0f32; outs];
            for (&j, wcol) in e.outliers.iter().zip(wo_t.chunks(outs.max(1))) {
                let xv = e.x[r * e.cols + j as usize];
                for (s, &wv) in sum.iter_mut().zip(wcol) {
                    *s += xv * wv;
                }
            }
            for (yv, s) in yrow.iter_mut().zip(&sum) {
                *yv += s;
            }
        }
    };
    if rows * outs >= 1 << 14 {
        y.par_chunks_mut(outs.max(1)).enumerate().for_each(work);
    } else {
        y.chunks_mut(outs.max(1)).enumerate().for_each(work);
    }
    y
}
