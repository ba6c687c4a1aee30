//! The int32 products CA @ CB^T: the GEMM form, the few-rows form and its instruction paths
//! (the portable one here; [`super::vnni`] and [`super::avx2`]).

use rayon::prelude::*;

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
/// thread, unless its weight is big (below): waking the pool costs more than the work
/// (measured with the weight in cache: 4 x 576 -> 1536 is faster on one thread, 16 x 576 ->
/// 576 on two).
const SERIAL_MAX_WORK: usize = 1 << 22;

/// Weight bytes (outs * stride) from which [`int8_matmul_rows`] splits the weight rows over
/// every thread whatever the batch: decoding streams each layer's weight from memory once
/// per token, and one core alone cannot draw the bandwidth two can.
const PARALLEL_MIN_WEIGHT_BYTES: usize = 1 << 18;

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
    if outs * rows * stride < SERIAL_MAX_WORK && outs * stride < PARALLEL_MIN_WEIGHT_BYTES {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    acc
}

/// The (rows, outs) int32 result of [`int8_matmul_rows`], written in place by tasks that
/// each own a range of output columns (so no transposition afterwards).
#[derive(Clone, Copy)]
pub(super) struct Columns {
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
    pub(super) unsafe fn write(self, o: usize, r0: usize, values: &[i32]) {
        assert!(o < self.outs && r0 + values.len() <= self.rows);
        for (r, &v) in (r0..).zip(values) {
            // SAFETY: r * outs + o < rows * outs, the length of the matrix.
            unsafe { *self.ptr.add(r * self.outs + o) = v };
        }
    }
}

/// The x rows of one [`int8_matmul_rows`] call, in the form its path multiplies.
pub(super) enum Prepared {
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
                unsafe { super::vnni::weight_rows(x, *rows, *k, w, stride, first, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Prepared::I16 {
                x,
                rows,
                k,
                avx2: true,
            } => {
                // SAFETY: the AVX2 flag is set only when the CPU has AVX2.
                unsafe { super::avx2::weight_rows(x, *rows, *k, w, stride, first, out) }
            }
            Prepared::I16 { x, rows, k, .. } => {
                generic_weight_rows(x, *rows, *k, w, stride, first, out)
            }
        }
    }
}

/// Bytes of prepared x rows kept in L1 while a task's weight rows pass over them: more
/// rows are taken in panels, each weight row is read once per panel.
pub(super) const PANEL_BYTES: usize = 32 * 1024;

/// Splits `n` x rows into blocks of at most `max` rows, as even as possible: (first, len).
pub(super) fn row_blocks(n: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
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
pub(super) fn prefetch(p: *const i8, len: usize) {
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
pub(super) fn reduce8(v: [std::arch::x86_64::__m256i; 8]) -> std::arch::x86_64::__m256i {
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
pub(super) fn store_pair(
    sums: std::arch::x86_64::__m256i,
    r: usize,
    out0: &mut [i32],
    out1: &mut [i32],
) {
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` holds 8 i32, the width of one unaligned 256-bit store.
    unsafe { std::arch::x86_64::_mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums) };
    out0[..r].copy_from_slice(&lanes[..r]);
    out1[..r].copy_from_slice(&lanes[4..4 + r]);
}
