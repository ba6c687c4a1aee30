//! GGUF (llama.cpp) tensor dequantization: F32, F16 and the Q8_0, Q4_0, Q4_1 block formats
//! (docs/REFERENCE.md §2).
//!
//! A quantized GGUF tensor is a flat run of fixed-size blocks, each covering 32 consecutive
//! elements (of the innermost dimension; rows are a multiple of 32 long, so a flat view is
//! enough). All multi-byte fields are little-endian (big-endian GGUF files exist but are not
//! handled here). Block layouts, in bytes:
//!
//! ```text
//! Q8_0  (34 B): d: f16 | qs: [i8; 32]                   x[i] = qs[i] * d
//! Q4_0  (18 B): d: f16 | qs: [u8; 16] (nibbles)         x[i] = (q[i] - 8) * d
//! Q4_1  (20 B): d: f16 | m: f16 | qs: [u8; 16]          x[i] = q[i] * d + m
//! nibbles: q[j] = qs[j] & 0x0F and q[j + 16] = qs[j] >> 4, for j in 0..16
//! ```
//!
//! The arithmetic is done in f32 as ggml's `dequantize_row_*` and gguf-py's `gguf.quants` do
//! it: the f16 scale widens to f32 exactly, and q * d is exact too (a ≤ 8-bit integer times an
//! 11-bit significand fits f32's 24 bits), so the only rounding anywhere is Q4_1's `+ m`.
//! The results are therefore bit-identical to theirs (fused or not); the tests check this
//! against fixtures made by gguf-py (scripts/golden_gguf.py).

use half::{f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use crate::{Error, Result};

/// Elements per block of the quantized formats.
const QK: usize = 32;

/// Below this many blocks, dequantize on the calling thread (rayon's fork/join costs more
/// than the work).
const PAR_MIN_BLOCKS: usize = 2048;

/// Blocks per rayon task: big enough to amortize scheduling, small enough to balance.
const BLOCKS_PER_TASK: usize = 512;

/// The GGML tensor types lathe can read, with their GGUF type ids (`ggml_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit floats (id 0).
    F32,
    /// 16-bit floats (id 1).
    F16,
    /// Blocks of 32 4-bit values with an f16 scale (id 2).
    Q4_0,
    /// Blocks of 32 4-bit values with an f16 scale and offset (id 3).
    Q4_1,
    /// Blocks of 32 8-bit values with an f16 scale (id 8).
    Q8_0,
}

impl GgmlType {
    /// The type for a GGUF tensor-info type id; unknown or unsupported ids are an error
    /// naming the id (and the GGML type, when it is one lathe does not read).
    pub fn from_id(id: u32) -> Result<Self> {
        match id {
            0 => Ok(Self::F32),
            1 => Ok(Self::F16),
            2 => Ok(Self::Q4_0),
            3 => Ok(Self::Q4_1),
            8 => Ok(Self::Q8_0),
            _ => {
                let what = match ggml_type_name(id) {
                    Some(name) => format!("GGML type {name} (id {id}) is not supported"),
                    None => format!("unknown GGML type id {id}"),
                };
                Err(Error::Gguf {
                    format: "tensor type",
                    detail: format!(
                        "{what}; lathe reads F32 (0), F16 (1), Q4_0 (2), Q4_1 (3), Q8_0 (8)"
                    ),
                })
            }
        }
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        }
    }

    /// The GGML name ("Q4_1", ...), as in llama.cpp and gguf-py.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }

    /// Elements per block (1 for the plain float types).
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => QK,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Bytes holding `n_elements` values; an error when `n_elements` is not a multiple of
    /// the block size (or the byte count overflows).
    pub fn byte_len(self, n_elements: usize) -> Result<usize> {
        let bs = self.block_size();
        if !n_elements.is_multiple_of(bs) {
            return Err(self.error(format!(
                "{n_elements} elements is not a multiple of the block size {bs}"
            )));
        }
        (n_elements / bs)
            .checked_mul(self.type_size())
            .ok_or_else(|| self.error(format!("{n_elements} elements overflow the byte count")))
    }

    fn error(self, detail: String) -> Error {
        Error::Gguf {
            format: self.name(),
            detail,
        }
    }

    /// Checks that `bytes` holds exactly `n_elements` values of this type.
    fn check(self, bytes: &[u8], n_elements: usize) -> Result<()> {
        let want = self.byte_len(n_elements)?;
        if bytes.len() != want {
            return Err(self.error(format!(
                "{n_elements} elements need {want} bytes ({} blocks of {} bytes), got {}",
                n_elements / self.block_size(),
                self.type_size(),
                bytes.len()
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Names of the GGML types lathe does not read, for error messages (gguf-py 0.19 ids).
fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Dequantizes `n_elements` values of type `ty` from `bytes` (exactly
/// `ty.byte_len(n_elements)` bytes) to f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    // Check before allocating: a bogus element count from a corrupt header must be an
    // error, not a huge allocation.
    ty.check(bytes, n_elements)?;
    let mut out = vec![0.0f32; n_elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Dequantizes into a caller's buffer: `out.len()` is the element count, `bytes` must hold
/// exactly that many values of type `ty`.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    ty.check(bytes, out.len())?;
    match ty {
        GgmlType::F32 => run_blocks::<4, 1>(bytes, out, f32_block),
        GgmlType::F16 => f16_into(bytes, out),
        GgmlType::Q4_0 => run_blocks::<18, QK>(bytes, out, q4_0_block),
        GgmlType::Q4_1 => run_blocks::<20, QK>(bytes, out, q4_1_block),
        GgmlType::Q8_0 => run_blocks::<34, QK>(bytes, out, q8_0_block),
    }
    Ok(())
}

/// Q8_0 blocks (34 bytes: f16 d, 32 × i8 q; x = q * d) to f32.
pub fn dequantize_q8_0(bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    dequantize(GgmlType::Q8_0, bytes, n_elements)
}

/// Q4_0 blocks (18 bytes: f16 d, 16 bytes of nibbles; x = (q - 8) * d) to f32.
pub fn dequantize_q4_0(bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    dequantize(GgmlType::Q4_0, bytes, n_elements)
}

/// Q4_1 blocks (20 bytes: f16 d, f16 m, 16 bytes of nibbles; x = q * d + m) to f32.
pub fn dequantize_q4_1(bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    dequantize(GgmlType::Q4_1, bytes, n_elements)
}

/// Little-endian f16 values to f32 (exact widening).
pub fn dequantize_f16(bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    dequantize(GgmlType::F16, bytes, n_elements)
}

/// Little-endian f32 values (bit patterns kept, NaN payloads included).
pub fn dequantize_f32(bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    dequantize(GgmlType::F32, bytes, n_elements)
}

/// Applies a per-block kernel over all blocks (`TS` bytes → `BS` values). The caller has
/// checked `bytes.len() / TS == out.len() / BS`.
fn run_blocks<const TS: usize, const BS: usize>(
    bytes: &[u8],
    out: &mut [f32],
    block: fn(&[u8; TS], &mut [f32; BS]),
) {
    split_work::<TS, BS>(bytes, out, |bytes, out| {
        let (src, _) = bytes.as_chunks::<TS>();
        let (dst, _) = out.as_chunks_mut::<BS>();
        for (b, o) in src.iter().zip(dst) {
            block(b, o);
        }
    });
}

/// Runs `work` over matching pieces of `bytes` and `out` (`TS` bytes per `BS` values), on
/// rayon when the input is large, on the calling thread otherwise. Pieces hold whole blocks.
fn split_work<const TS: usize, const BS: usize>(
    bytes: &[u8],
    out: &mut [f32],
    work: impl Fn(&[u8], &mut [f32]) + Sync,
) {
    // Elements per task: as many as BLOCKS_PER_TASK quantized blocks, for every type.
    let per_task = BLOCKS_PER_TASK * QK / BS;
    if out.len() < PAR_MIN_BLOCKS * QK {
        work(bytes, out);
    } else {
        bytes
            .par_chunks(per_task * TS)
            .zip(out.par_chunks_mut(per_task * BS))
            .for_each(|(b, o)| work(b, o));
    }
}

/// f16 → f32 through `half`'s slice conversion (F16C SIMD where the CPU has it), staged in a
/// stack buffer because GGUF data need not be 2-byte aligned.
fn f16_into(bytes: &[u8], out: &mut [f32]) {
    const CHUNK: usize = 1024;
    split_work::<2, 1>(bytes, out, |bytes, out| {
        let mut buf = [f16::ZERO; CHUNK];
        for (b, o) in bytes.chunks(2 * CHUNK).zip(out.chunks_mut(CHUNK)) {
            let h = &mut buf[..o.len()];
            for (x, c) in h.iter_mut().zip(b.as_chunks::<2>().0) {
                *x = f16::from_le_bytes(*c);
            }
            h.convert_to_f32_slice(o);
        }
    });
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline]
fn f32_block(b: &[u8; 4], o: &mut [f32; 1]) {
    o[0] = f32::from_le_bytes(*b);
}

#[inline]
fn q8_0_block(b: &[u8; 34], o: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    for (x, &q) in o.iter_mut().zip(&b[2..]) {
        *x = f32::from(q as i8) * d;
    }
}

#[inline]
fn q4_0_block(b: &[u8; 18], o: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let (lo, hi) = o.split_at_mut(QK / 2);
    for ((xl, xh), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
        *xl = f32::from((q & 0x0F) as i8 - 8) * d;
        *xh = f32::from((q >> 4) as i8 - 8) * d;
    }
}

#[inline]
fn q4_1_block(b: &[u8; 20], o: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = o.split_at_mut(QK / 2);
    // q * d is exact (4-bit q, 11-bit d), so the add is the one rounding, as in ggml.
    for ((xl, xh), &q) in lo.iter_mut().zip(hi).zip(&b[4..]) {
        *xl = f32::from(q & 0x0F) * d + m;
        *xh = f32::from(q >> 4) * d + m;
    }
}
