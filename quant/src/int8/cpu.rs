//! The CPU kernels of LLM.int8(): the oracle for the GPU ones and the CPU fallback.
//!
//! int8 rows are kept as `i8` slices padded with zeros to a multiple of 4 elements: the same
//! bytes, on a little-endian host, as the packed u32 words of the GPU.

use half::f16;
use rayon::prelude::*;

/// Rows whose absmax is below 2^-100 quantize to zeros: 127 / absmax would overflow for
/// subnormal maxima. The WGSL kernels use the same cut.
pub(crate) const MIN_SCALE: f32 = 7.888_609e-31;

/// Rows at or below this count take the GEMV form.
pub(crate) const GEMV_MAX_ROWS: usize = 4;

/// `n` rounded up to a multiple of 4 (the padded row length).
pub(crate) fn padded(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// x rounded to the nearest f16 (ties to even), as f32: the 16-bit path's operands.
pub(crate) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The dequantized weight value `(q * scale) / 127` (one f32 product, one f32 division).
pub(crate) fn dequant(q: i8, scale: f32) -> f32 {
    (f32::from(q) * scale) / 127.0
}

/// Row-wise absmax quantization of `x` (rows, cols): per row the max |x| over columns not
/// flagged in `skip` (flagged columns quantize to 0), `inv = 127 / max` (one division, 0 for
/// tiny maxima), `q = round_ties_even(x * inv)`. Returns the padded int8 rows and the maxima.
pub(crate) fn quantize_rows(
    x: &[f32],
    rows: usize,
    cols: usize,
    skip: Option<&[bool]>,
) -> (Vec<i8>, Vec<f32>) {
    quantize_rows_over(x, rows, cols, skip, MaxOver::Kept)
}

/// Which entries of a row its absmax is taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MaxOver {
    /// The columns not skipped (lathe's variant).
    Kept,
    /// Every column (bitsandbytes' variant: its caller has zeroed the outlier entries, so
    /// this is the max over the non-outlier *entries*, skipped columns included).
    All,
}

/// [`quantize_rows`] with the absmax taken over `over`; skipped columns quantize to 0
/// either way.
pub(crate) fn quantize_rows_over(
    x: &[f32],
    rows: usize,
    cols: usize,
    skip: Option<&[bool]>,
    over: MaxOver,
) -> (Vec<i8>, Vec<f32>) {
    let stride = padded(cols);
    let mut q = vec![0i8; rows * stride];
    let mut scales = vec![0f32; rows];
    let work = |(r, (qrow, scale)): (usize, (&mut [i8], &mut f32))| {
        *scale = quantize_row(&x[r * cols..(r + 1) * cols], skip, over, &mut qrow[..cols]);
    };
    if rows * cols >= 1 << 14 {
        q.par_chunks_mut(stride.max(1))
            .zip(scales.par_iter_mut())
            .enumerate()
            .for_each(work);
    } else {
        q.chunks_mut(stride.max(1))
            .zip(scales.iter_mut())
            .enumerate()
            .for_each(work);
    }
    (q, scales)
}

/// As [`quantize_rows`] (no skipped columns), with row `r` written as f32 into a scratch
/// row by `fill(r, row)`: a weight stored in 16 bits (or in a file's bytes) is quantized
/// without ever holding it whole in f32. The same values give the same bytes.
pub(crate) fn quantize_rows_with(
    rows: usize,
    cols: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> (Vec<i8>, Vec<f32>) {
    let stride = padded(cols);
    let mut q = vec![0i8; rows * stride];
    let mut scales = vec![0f32; rows];
    q.par_chunks_mut(stride.max(1))
        .zip(scales.par_iter_mut())
        .enumerate()
        .for_each_init(
            || vec![0f32; cols],
            |row, (r, (qrow, scale))| {
                fill(r, row);
                *scale = quantize_row(row, None, MaxOver::Kept, &mut qrow[..cols]);
            },
        );
    (q, scales)
}

/// One row of [`quantize_rows`]; returns its absmax. AVX2 when the CPU has it (the same
/// code, wider vectors).
fn quantize_row(x: &[f32], skip: Option<&[bool]>, over: MaxOver, q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { quantize_row_avx2(x, skip, over, q) };
        }
    }
    quantize_row_body(x, skip, over, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], skip: Option<&[bool]>, over: MaxOver, q: &mut [i8]) -> f32 {
    quantize_row_body(x, skip, over, q)
}

/// 1.5 * 2^23: for |y| <= 2^22, `(y + ROUND_MAGIC) - ROUND_MAGIC` is `round_ties_even(y)`
/// (the sum lands in [2^23, 2^24) where the f32 step is 1, and the hardware rounds it to
/// nearest, ties to even; ROUND_MAGIC is even so the parity is y's). The sum's low mantissa
/// bits are then that integer plus `ROUND_BITS`' mantissa.
const ROUND_MAGIC: f32 = 12_582_912.0;
const ROUND_BITS: i32 = 0x4B40_0000;

/// The scalar definition, written so that it vectorizes: `round_ties_even` alone compiles
/// to a libm `rintf` call per element without SSE4.1, and `f32::max` folds to a serial chain.
/// Bit-identical to `(x * inv).round_ties_even().clamp(-127, 127) as i8` (NaN -> 0) with the
/// max of |x| (NaN ignored) over the kept columns.
#[inline(always)]
fn quantize_row_body(x: &[f32], skip: Option<&[bool]>, over: MaxOver, q: &mut [i8]) -> f32 {
    match (skip, over) {
        (None, _) => quantize_kept(x, |_| true, |_| true, q),
        (Some(s), MaxOver::Kept) => {
            let s = &s[..x.len()];
            quantize_kept(x, |j| !s[j], |j| !s[j], q)
        }
        (Some(s), MaxOver::All) => {
            let s = &s[..x.len()];
            quantize_kept(x, |_| true, |j| !s[j], q)
        }
    }
}

/// Quantizes the entries `keep` accepts (0 elsewhere) with the absmax of those `in_max`
/// accepts.
#[inline(always)]
fn quantize_kept(
    x: &[f32],
    in_max: impl Fn(usize) -> bool,
    keep: impl Fn(usize) -> bool,
    q: &mut [i8],
) -> f32 {
    // The max as 16 independent lanes; `a > m` ignores NaN like `f32::max` (m is never NaN),
    // and the max of a set does not depend on the order.
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for (c, chunk) in (&mut chunks).enumerate() {
        for l in 0..16 {
            let a = if in_max(c * 16 + l) {
                chunk[l].abs()
            } else {
                0.0
            };
            lanes[l] = if a > lanes[l] { a } else { lanes[l] };
        }
    }
    let body = x.len() - chunks.remainder().len();
    for (l, &v) in chunks.remainder().iter().enumerate() {
        let a = if in_max(body + l) { v.abs() } else { 0.0 };
        lanes[l] = if a > lanes[l] { a } else { lanes[l] };
    }
    let max = lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m });
    let inv = if max >= MIN_SCALE { 127.0 / max } else { 0.0 };
    for (j, (qv, &v)) in q.iter_mut().zip(x).enumerate() {
        let y = v * inv;
        // Clamped before rounding (the same as after), NaN kept.
        let y = y.clamp(-127.0, 127.0);
        let n = ((y + ROUND_MAGIC).to_bits() as i32).wrapping_sub(ROUND_BITS) as i8;
        *qv = if keep(j) && !y.is_nan() { n } else { 0 };
    }
    max
}

/// Columns j with any |x[r, j]| >= threshold, ascending (none when threshold <= 0).
pub(crate) fn outlier_columns(x: &[f32], rows: usize, cols: usize, threshold: f32) -> Vec<u32> {
    if threshold <= 0.0 {
        return Vec::new();
    }
    let mut flags = vec![false; cols];
    for row in x.chunks(cols.max(1)).take(rows) {
        for (f, v) in flags.iter_mut().zip(row) {
            *f |= v.abs() >= threshold;
        }
    }
    (0..cols as u32).filter(|&j| flags[j as usize]).collect()
}

/// bitsandbytes 0.50.2's `int8_vectorwise_quant` of the activations (backends/default/ops.py,
/// which `MatMul8bitLt` calls on `A.to(float16)`): x is rounded to f16 first; with a
/// threshold > 0 the entries with |x_f16| >= f16(threshold) are outliers (torch compares an
/// f16 tensor with the threshold converted to f16) and the columns holding one are the
/// outlier columns; each row's absmax is over the *other entries* (the small entries of an
/// outlier column count) and the row is quantized as lathe does (`127 / absmax` in f32,
/// round ties to even; nonzero f16 magnitudes are never below 2^-24, so [`MIN_SCALE`] only
/// catches rows of zeros, where bnb's 0 * inf = NaN casts to 0 as well); then the outlier columns
/// are zeroed. bnb zeroes them only when rows > 1, but with one row every entry of an
/// outlier column is itself an outlier, already zeroed before the quantization, so the
/// result is the same. Returns (outlier columns ascending, padded int8 rows, row absmaxes).
pub(crate) fn bnb_quantize_activations(
    x: &[f32],
    rows: usize,
    cols: usize,
    threshold: f32,
) -> (Vec<u32>, Vec<i8>, Vec<f32>) {
    let n = rows * cols;
    let mut xh = vec![0f32; n];
    let round = |(d, &v): (&mut f32, &f32)| *d = round_f16(v);
    if n >= 1 << 14 {
        xh.par_iter_mut().zip(&x[..n]).for_each(round);
    } else {
        xh.iter_mut().zip(&x[..n]).for_each(round);
    }
    let mut skip = vec![false; cols];
    if threshold > 0.0 {
        let t = round_f16(threshold);
        for row in xh.chunks_mut(cols.max(1)).take(rows) {
            for (s, v) in skip.iter_mut().zip(row.iter_mut()) {
                if v.abs() >= t {
                    *s = true;
                    *v = 0.0;
                }
            }
        }
    }
    let outliers = (0..cols as u32).filter(|&j| skip[j as usize]).collect();
    let (ca, sca) = quantize_rows_over(&xh, rows, cols, Some(&skip), MaxOver::All);
    (outliers, ca, sca)
}

#[inline(always)]
fn dot_i8_generic(a: &[i8], b: &[i8]) -> i32 {
    // i16 products summed in 16-element i32 lanes: the shape LLVM turns into pmaddwd.
    let mut lanes = [0i32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            lanes[l] += i32::from(i16::from(x[l]) * i16::from(y[l]));
        }
    }
    let tail: i32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum();
    lanes.iter().sum::<i32>() + tail
}

/// AVX2: 16 int8 widened to i16 and multiplied-added pairwise into 8 i32 lanes (vpmaddwd),
/// two accumulators per 32 elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc0 = _mm256_setzero_si256();
    let mut acc1 = _mm256_setzero_si256();
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n, so both 16-byte loads at i and i + 16 are in bounds.
        let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
        let a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pa as *const __m128i));
        let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb as *const __m128i));
        let a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pa.add(16) as *const __m128i));
        let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(pb.add(16) as *const __m128i));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(a0, b0));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(a1, b1));
        i += 32;
    }
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(
        lanes.as_mut_ptr() as *mut __m256i,
        _mm256_add_epi32(acc0, acc1),
    );
    lanes.iter().sum::<i32>() + dot_i8_generic(&a[i..n], &b[i..n])
}

/// sum_j a[j] * b[j] in exact int32 arithmetic (AVX2 when the CPU has it).
pub(crate) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { dot_i8_avx2(a, b) };
        }
    }
    dot_i8_generic(a, b)
}

/// Which loop order computes the int32 products (both give identical sums).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// Blocks of x rows, each weight row dotted with the rows of a block.
    Gemm,
    /// On the CPU: [`int8_matmul_rows`] on the best path this CPU has.
    Gemv,
}

/// acc (rows, outs) = CA @ CB^T in int32, both operands padded rows of `stride` int8.
pub(crate) fn int8_matmul(
    ca: &[i8],
    cb: &[i8],
    rows: usize,
    outs: usize,
    stride: usize,
    form: Form,
) -> Vec<i32> {
    match form {
        Form::Gemm => int8_matmul_gemm(ca, cb, rows, outs, stride),
        Form::Gemv => int8_matmul_rows(ca, cb, rows, outs, stride, Path::best()),
    }
}

/// The GEMM form: blocks of 16 x rows in parallel, each weight row streamed once per block.
fn int8_matmul_gemm(ca: &[i8], cb: &[i8], rows: usize, outs: usize, stride: usize) -> Vec<i32> {
    const BLOCK: usize = 16;
    let mut acc = vec![0i32; rows * outs];
    if rows == 0 || outs == 0 {
        return acc;
    }
    acc.par_chunks_mut(BLOCK * outs)
        .enumerate()
        .for_each(|(b, chunk)| {
            let r0 = b * BLOCK;
            let n = chunk.len() / outs;
            for o in 0..outs {
                let w = &cb[o * stride..(o + 1) * stride];
                for i in 0..n {
                    let a = &ca[(r0 + i) * stride..(r0 + i + 1) * stride];
                    chunk[i * outs + o] = dot_i8(a, w);
                }
            }
        });
    acc
}

/// Rows up to which the CPU forward takes [`int8_matmul_rows`] rather than the GEMM form when
/// only the portable path is available. With VNNI or AVX2 the few-rows kernel (x in panels)
/// beats the GEMM form at every row count measured, 1 to 1024 (`benches/int8.rs`,
/// `int8_cpu_forms`), and takes them all.
pub(crate) const GENERIC_ROWS_MAX: usize = 32;

/// Instruction paths of [`int8_matmul_rows`]; all give the same int32 sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// AVX-512 VNNI: u8 x i8 products summed four at a time into i32 lanes (vpdpbusd), x
    /// shifted to u8 (x + 128) and 128 * sum(w) subtracted.
    Vnni,
    /// AVX2: both operands widened to i16 (x once per call, each weight row once), pairwise
    /// multiply-add into i32 lanes (vpmaddwd).
    Avx2,
    /// Portable Rust with the same i16 widening.
    Generic,
}

impl Path {
    /// Whether this CPU can run the path.
    pub(crate) fn supported(self) -> bool {
        match self {
            Path::Vnni => has_vnni(),
            Path::Avx2 => has_avx2(),
            Path::Generic => true,
        }
    }

    /// The fastest path this CPU supports.
    pub(crate) fn best() -> Path {
        [Path::Vnni, Path::Avx2]
            .into_iter()
            .find(|p| p.supported())
            .unwrap_or(Path::Generic)
    }
}

#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vnni")
        && std::is_x86_feature_detected!("avx2")
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_vnni() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

/// Products (rows * outs * stride) below which [`int8_matmul_rows`] stays on the calling
/// thread: waking the pool costs more than the work (measured: 4 x 576 -> 1536 is faster on
/// one thread, 16 x 576 -> 576 on two).
const SERIAL_MAX_WORK: usize = 1 << 22;

/// How far ahead of the weight row being multiplied its successors are prefetched: without
/// it a weight streamed from memory (an LM head) runs at half speed, the loads stalling.
const PREFETCH_BYTES: usize = 4096;

/// Weight rows per rayon task of [`int8_matmul_rows`].
const WEIGHT_ROWS_PER_TASK: usize = 32;

/// acc (rows, outs) = CA @ CB^T in int32 for a few rows of x (decoding, small batches).
///
/// The x rows are prepared once per call (shifted to u8 or widened to i16) and stay in L1;
/// threads split the weight rows; each weight row is read once and dotted with every x row
/// in blocks of a few x rows by 2 weight rows (2 x R accumulators sharing each load).
/// Panics if the CPU lacks `path` (callers check [`Path::supported`]).
pub(crate) fn int8_matmul_rows(
    ca: &[i8],
    cb: &[i8],
    rows: usize,
    outs: usize,
    stride: usize,
    path: Path,
) -> Vec<i32> {
    assert!(path.supported(), "the CPU lacks the {path:?} instructions");
    assert!(stride.is_multiple_of(4) && ca.len() >= rows * stride && cb.len() >= outs * stride);
    let mut acc = vec![0i32; rows * outs];
    if rows == 0 || outs == 0 {
        return acc;
    }
    let x = Prepared::new(ca, rows, stride, path);
    let out = Columns {
        ptr: acc.as_mut_ptr(),
        rows,
        outs,
    };
    let task = |t: usize| {
        let first = t * WEIGHT_ROWS_PER_TASK;
        let n = WEIGHT_ROWS_PER_TASK.min(outs - first);
        x.weight_rows(
            &cb[first * stride..(first + n) * stride],
            stride,
            first,
            out,
        );
    };
    let tasks = outs.div_ceil(WEIGHT_ROWS_PER_TASK);
    if outs * rows * stride < SERIAL_MAX_WORK {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    acc
}

/// The (rows, outs) int32 result of [`int8_matmul_rows`], written in place by tasks that
/// each own a range of output columns (so no transposition afterwards).
#[derive(Clone, Copy)]
struct Columns {
    ptr: *mut i32,
    rows: usize,
    outs: usize,
}

// SAFETY: tasks write disjoint columns (see `Columns::write`), and the matrix outlives them.
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// Column `o`, rows r0..r0 + values.len(), from `values`.
    ///
    /// # Safety
    /// No other thread touches column `o` meanwhile.
    unsafe fn write(self, o: usize, r0: usize, values: &[i32]) {
        assert!(o < self.outs && r0 + values.len() <= self.rows);
        for (r, &v) in (r0..).zip(values) {
            // SAFETY: r * outs + o < rows * outs, the length of the matrix.
            unsafe { *self.ptr.add(r * self.outs + o) = v };
        }
    }
}

/// The x rows of one [`int8_matmul_rows`] call, in the form its path multiplies.
enum Prepared {
    /// One row of ones (its dot with a weight row is the row's sum, for the correction),
    /// then x + 128 as u8, rows padded to a multiple of 64 bytes.
    #[cfg(target_arch = "x86_64")]
    U8 { x: Vec<u8>, rows: usize, k: usize },
    /// x as i16, rows padded with zeros to a multiple of 16.
    I16 {
        x: Vec<i16>,
        rows: usize,
        k: usize,
        avx2: bool,
    },
}

impl Prepared {
    fn new(ca: &[i8], rows: usize, stride: usize, path: Path) -> Prepared {
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Vnni => {
                let k = stride.next_multiple_of(64);
                let mut x = vec![1u8; (rows + 1) * k];
                for (dst, src) in x[k..].chunks_mut(k).zip(ca.chunks(stride).take(rows)) {
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = (s as u8) ^ 0x80;
                    }
                }
                Prepared::U8 { x, rows, k }
            }
            _ => {
                let k = stride.next_multiple_of(16);
                let mut x = vec![0i16; rows * k];
                for (dst, src) in x.chunks_mut(k).zip(ca.chunks(stride).take(rows)) {
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = i16::from(s);
                    }
                }
                Prepared::I16 {
                    x,
                    rows,
                    k,
                    avx2: path == Path::Avx2,
                }
            }
        }
    }

    /// Columns first..first + n of the result, for the n weight rows of `w` (n, stride).
    fn weight_rows(&self, w: &[i8], stride: usize, first: usize, out: Columns) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Prepared::U8 { x, rows, k } => {
                // SAFETY: a U8 preparation exists only when the CPU has the VNNI path.
                unsafe { vnni::weight_rows(x, *rows, *k, w, stride, first, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Prepared::I16 {
                x,
                rows,
                k,
                avx2: true,
            } => {
                // SAFETY: the AVX2 flag is set only when the CPU has AVX2.
                unsafe { avx2::weight_rows(x, *rows, *k, w, stride, first, out) }
            }
            Prepared::I16 { x, rows, k, .. } => {
                generic_weight_rows(x, *rows, *k, w, stride, first, out)
            }
        }
    }
}

/// Bytes of prepared x rows kept in L1 while a task's weight rows pass over them: more
/// rows are taken in panels, each weight row is read once per panel.
const PANEL_BYTES: usize = 32 * 1024;

/// Splits `n` x rows into blocks of at most `max` rows, as even as possible: (first, len).
fn row_blocks(n: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let count = n.div_ceil(max);
    (0..count).map(move |b| {
        let (lo, hi) = (b * n / count, (b + 1) * n / count);
        (lo, hi - lo)
    })
}

/// The portable path: each weight row widened to i16 once, dotted with every x row.
fn generic_weight_rows(
    x: &[i16],
    rows: usize,
    k: usize,
    w: &[i8],
    stride: usize,
    first: usize,
    out: Columns,
) {
    let mut wide = vec![0i16; k];
    let mut column = vec![0i32; rows];
    for (o, wrow) in w.chunks(stride).enumerate() {
        for (d, &s) in wide.iter_mut().zip(wrow) {
            *d = i16::from(s);
        }
        for (c, xrow) in column.iter_mut().zip(x.chunks(k)) {
            *c = dot_i16(xrow, &wide);
        }
        // SAFETY: this task owns columns first..first + n.
        unsafe { out.write(first + o, 0, &column) };
    }
}

/// sum a[j] * b[j] over slices of a multiple of 16 i16, in 16 i32 lanes (pmaddwd-shaped).
fn dot_i16(a: &[i16], b: &[i16]) -> i32 {
    let mut lanes = [0i32; 16];
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for l in 0..16 {
            lanes[l] = lanes[l].wrapping_add(i32::from(x[l]) * i32::from(y[l]));
        }
    }
    lanes.iter().fold(0i32, |s, &v| s.wrapping_add(v))
}

/// Asks for the cache lines of `len` bytes [`PREFETCH_BYTES`] past `p` (past the end of the
/// weight too: a prefetch never faults).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn prefetch(p: *const i8, len: usize) {
    use std::arch::x86_64::*;
    for at in (0..len).step_by(64) {
        // (Safe to call in newer Rust; unsafe in the oldest supported.)
        #[allow(unused_unsafe)]
        // SAFETY: a prefetch is a hint: it reads nothing and never faults, whatever the
        // address; `wrapping_add` makes no claim that the address is in bounds.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES + at))
        };
    }
}

/// Eight __m256i of 8 i32 lanes each -> one __m256i of their 8 horizontal sums, in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn reduce8(v: [std::arch::x86_64::__m256i; 8]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | the same for lanes 4..8].
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    // [sum of lanes 0..4 of v0, v1, v2, v3 | sum of lanes 4..8 of v0, v1, v2, v3].
    let g0 = _mm256_hadd_epi32(h01, h23);
    let g1 = _mm256_hadd_epi32(h45, h67);
    let lo = _mm256_permute2x128_si256::<0x20>(g0, g1);
    let hi = _mm256_permute2x128_si256::<0x31>(g0, g1);
    _mm256_add_epi32(lo, hi)
}

/// Stores the 8 sums of `reduce8` for a block of `r` x rows by 2 weight rows, laid out
/// [w0: rows 0..4, w1: rows 0..4]: row j of w0 into out0[j], of w1 into out1[j].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn store_pair(sums: std::arch::x86_64::__m256i, r: usize, out0: &mut [i32], out1: &mut [i32]) {
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` holds 8 i32, the width of one unaligned 256-bit store.
    unsafe { std::arch::x86_64::_mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums) };
    out0[..r].copy_from_slice(&lanes[..r]);
    out1[..r].copy_from_slice(&lanes[4..4 + r]);
}

/// The AVX-512 VNNI path.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{reduce8, row_blocks, store_pair, Columns};

    /// Columns first..first + n of `out` = w (n, stride) @ x^T. `x`: rows + 1 prepared
    /// rows of `k` bytes (the first one all ones), taken in panels of at most
    /// [`super::PANEL_BYTES`].
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512 VNNI and AVX2; the task owns those columns.
    #[target_feature(enable = "avx512f,avx512vnni,avx2")]
    pub(super) unsafe fn weight_rows(
        x: &[u8],
        rows: usize,
        k: usize,
        w: &[i8],
        stride: usize,
        first: usize,
        out: Columns,
    ) {
        let n = w.len() / stride;
        // 128 * sum(w) per weight row, from the ones row of the first panel.
        let mut correction = vec![0i32; n];
        let max_panel = (super::PANEL_BYTES / k).max(6);
        let mut sums = vec![0i32; 2 * max_panel];
        for (p0, len) in row_blocks(rows + 1, max_panel) {
            // Prepared row p0 + q is x row p0 + q - 1 (row 0: the ones).
            let skip = usize::from(p0 == 0);
            for o in (0..n).step_by(2) {
                let w0 = &w[o * stride..(o + 1) * stride];
                // A lone last row is paired with itself.
                let w1 = if o + 1 < n {
                    &w[(o + 1) * stride..(o + 2) * stride]
                } else {
                    w0
                };
                let (s0, s1) = sums.split_at_mut(max_panel);
                super::prefetch(w.as_ptr().wrapping_add((o + 2) * stride), 2 * stride);
                for (i, r) in row_blocks(len, 6) {
                    // SAFETY: x holds rows + 1 rows of k >= stride bytes; the block's rows
                    // p0 + i.. p0 + i + r are among them.
                    unsafe { block(&x[(p0 + i) * k..], k, w0, w1, r, &mut s0[i..], &mut s1[i..]) };
                }
                for (j, s) in [s0, s1].into_iter().enumerate().take(n - o) {
                    if skip == 1 {
                        correction[o + j] = s[0].wrapping_mul(128);
                    }
                    // x . w = (x + 128) . w - 128 * sum(w), in wrapping i32 like the lanes.
                    let s = &mut s[skip..len];
                    for v in s.iter_mut() {
                        *v = v.wrapping_sub(correction[o + j]);
                    }
                    // SAFETY: the task owns this column (the caller's contract).
                    unsafe { out.write(first + o + j, (p0 + skip) - 1, s) };
                }
            }
        }
    }

    /// Dispatches a block of `r` (1..=6) x rows to its monomorphized kernel.
    #[target_feature(enable = "avx512f,avx512vnni,avx2")]
    #[inline]
    unsafe fn block(
        x: &[u8],
        k: usize,
        w0: &[i8],
        w1: &[i8],
        r: usize,
        out0: &mut [i32],
        out1: &mut [i32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match r {
                1 => block_n::<1>(x, k, w0, w1, out0, out1),
                2 => block_n::<2>(x, k, w0, w1, out0, out1),
                3 => block_n::<3>(x, k, w0, w1, out0, out1),
                4 => block_n::<4>(x, k, w0, w1, out0, out1),
                5 => block_n::<5>(x, k, w0, w1, out0, out1),
                _ => block_n::<6>(x, k, w0, w1, out0, out1),
            }
        }
    }

    /// R x rows (u8, `k` bytes apart in `x`) by weight rows w0 and w1 (i8, `stride` bytes, a
    /// multiple of 4): 2R accumulators of 16 i32 lanes; the tail of the weight rows is
    /// loaded with a dword mask (zeros past the row).
    #[target_feature(enable = "avx512f,avx512vnni,avx2")]
    #[inline]
    unsafe fn block_n<const R: usize>(
        x: &[u8],
        k: usize,
        w0: &[i8],
        w1: &[i8],
        out0: &mut [i32],
        out1: &mut [i32],
    ) {
        let stride = w0.len();
        // The bounds every load below relies on (one compare per block, not per load).
        assert!(x.len() >= R * k && k >= stride.next_multiple_of(64) && w1.len() == stride);
        let full = stride / 64;
        let mask: __mmask16 = ((1u32 << ((stride % 64) / 4)) - 1) as __mmask16;
        let xp = x.as_ptr();
        let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
        let mut a0 = [_mm512_setzero_si512(); R];
        let mut a1 = [_mm512_setzero_si512(); R];
        for c in 0..full {
            let at = c * 64;
            // SAFETY: at + 64 <= stride: inside both weight rows; inside each x row (k bytes).
            unsafe {
                let u = _mm512_loadu_si512(p0.add(at).cast());
                let v = _mm512_loadu_si512(p1.add(at).cast());
                for r in 0..R {
                    let xv = _mm512_loadu_si512(xp.add(r * k + at).cast());
                    a0[r] = _mm512_dpbusd_epi32(a0[r], xv, u);
                    a1[r] = _mm512_dpbusd_epi32(a1[r], xv, v);
                }
            }
        }
        if mask != 0 {
            let at = full * 64;
            // SAFETY: the masked loads touch only the dwords before `stride`; each x row
            // holds k >= at + 64 bytes (the assert above).
            unsafe {
                let u = _mm512_maskz_loadu_epi32(mask, p0.add(at).cast());
                let v = _mm512_maskz_loadu_epi32(mask, p1.add(at).cast());
                for r in 0..R {
                    let xv = _mm512_loadu_si512(xp.add(r * k + at).cast());
                    a0[r] = _mm512_dpbusd_epi32(a0[r], xv, u);
                    a1[r] = _mm512_dpbusd_epi32(a1[r], xv, v);
                }
            }
        }
        let fold = |v: __m512i| {
            _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
        };
        let zero = _mm256_setzero_si256();
        for first in (0..R).step_by(4) {
            let r = (R - first).min(4);
            let mut v = [zero; 8];
            for j in 0..r {
                v[j] = fold(a0[first + j]);
                v[4 + j] = fold(a1[first + j]);
            }
            store_pair(reduce8(v), r, &mut out0[first..], &mut out1[first..]);
        }
    }
}

/// The AVX2 path.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{reduce8, row_blocks, store_pair, Columns};

    /// Columns first..first + n of `out` = w (n, stride) @ x^T. `x`: rows of `k` i16 (zero
    /// padded).
    ///
    /// # Safety
    /// The CPU has AVX2; the task owns those columns.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn weight_rows(
        x: &[i16],
        rows: usize,
        k: usize,
        w: &[i8],
        stride: usize,
        first: usize,
        out: Columns,
    ) {
        let n = w.len() / stride;
        // The pair of weight rows widened to i16 (zero padded to k).
        let mut wide = vec![0i16; 2 * k];
        let max_panel = (super::PANEL_BYTES / (2 * k)).max(4);
        let mut sums = vec![0i32; 2 * max_panel];
        for (p0, len) in row_blocks(rows, max_panel) {
            for o in (0..n).step_by(2) {
                let pair = (n - o).min(2);
                super::prefetch(w.as_ptr().wrapping_add((o + 2) * stride), 2 * stride);
                for (j, dst) in wide.chunks_mut(k).enumerate() {
                    let src = &w[(o + j.min(pair - 1)) * stride..][..stride];
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = i16::from(s);
                    }
                }
                let (w0, w1) = wide.split_at(k);
                let (s0, s1) = sums.split_at_mut(max_panel);
                for (i, r) in row_blocks(len, 4) {
                    // SAFETY: x holds `rows` rows of k i16; p0 + i + r <= rows.
                    unsafe { block(&x[(p0 + i) * k..], k, w0, w1, r, &mut s0[i..], &mut s1[i..]) };
                }
                for (j, s) in [s0, s1].into_iter().enumerate().take(pair) {
                    // SAFETY: the task owns this column (the caller's contract).
                    unsafe { out.write(first + o + j, p0, &s[..len]) };
                }
            }
        }
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block(
        x: &[i16],
        k: usize,
        w0: &[i16],
        w1: &[i16],
        r: usize,
        out0: &mut [i32],
        out1: &mut [i32],
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match r {
                1 => block_n::<1>(x, k, w0, w1, out0, out1),
                2 => block_n::<2>(x, k, w0, w1, out0, out1),
                3 => block_n::<3>(x, k, w0, w1, out0, out1),
                _ => block_n::<4>(x, k, w0, w1, out0, out1),
            }
        }
    }

    /// R x rows by 2 widened weight rows, all of `k` i16 (a multiple of 16): 2R
    /// accumulators of 8 i32 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn block_n<const R: usize>(
        x: &[i16],
        k: usize,
        w0: &[i16],
        w1: &[i16],
        out0: &mut [i32],
        out1: &mut [i32],
    ) {
        // The bounds every load below relies on.
        assert!(x.len() >= R * k && k.is_multiple_of(16) && w0.len() >= k && w1.len() >= k);
        let xp = x.as_ptr();
        let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
        let mut a0 = [_mm256_setzero_si256(); R];
        let mut a1 = [_mm256_setzero_si256(); R];
        for at in (0..k).step_by(16) {
            // SAFETY: at + 16 <= k: inside the widened weight rows and each x row.
            unsafe {
                let u = _mm256_loadu_si256(p0.add(at).cast());
                let v = _mm256_loadu_si256(p1.add(at).cast());
                for r in 0..R {
                    let xv = _mm256_loadu_si256(xp.add(r * k + at).cast());
                    a0[r] = _mm256_add_epi32(a0[r], _mm256_madd_epi16(xv, u));
                    a1[r] = _mm256_add_epi32(a1[r], _mm256_madd_epi16(xv, v));
                }
            }
        }
        let mut v = [_mm256_setzero_si256(); 8];
        v[..R].copy_from_slice(&a0);
        v[4..4 + R].copy_from_slice(&a1);
        store_pair(reduce8(v), R, out0, out1);
    }
}

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
pub(crate) fn bnb_dequant(q: i8, scale: f32) -> f32 {
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
