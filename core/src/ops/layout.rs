//! Layout ops. `reshape` only relabels the (contiguous) data; every other op here copies, and
//! every copy is one strided copy (see `CopySpec`): for each index `idx` of a copy shape,
//! `dst[dst_offset + Σ idx_k dst_stride_k] = src[src_offset + Σ idx_k src_stride_k]`.
//!
//! - `permute` / `transpose`: src strides permuted, dst contiguous. Backward: inverse permute.
//! - `narrow` (a slice along one dim): src offset to the slice start. Backward: `pad_narrow`.
//! - `pad_narrow` (narrow's inverse): zeros of the full shape, the slice written in. Backward:
//!   `narrow`.
//! - `Tensor::cat`: one copy per input into its slot of the output. Backward: `narrow` per input.
//! - `split` / `chunk`: `narrow` per piece (so their backward is narrow's).
//!
//! On the GPU all of them run the single `strided_copy` kernel of `copy.wgsl` (rank <= 8 after
//! merging dims that are contiguous in both src and dst). It moves 4-byte words, so f32 and u32
//! tensors are handled alike. GPU f16 tensors (packed two per word) take a lossless detour:
//! cast to f32, run the op, cast back; CPU f16 tensors are copied directly.

use half::f16;
use lathe_shaders::{grid_1d, GpuBuffer, GpuContext, MemCategory, Shader, View};

use crate::dtype::DType;
use crate::ops::dispatch::{span, strided_tiles, window_at, window_budget};
use crate::ops::{alloc_f32, launch_views};
use crate::shape::{check_dim, elem_count, strides};
use crate::storage::{CpuStorage, Storage};
use crate::tensor::Tensor;
use crate::{Device, Error, Result};

/// Largest rank the GPU copy kernel handles (after merging dims).
pub(crate) const MAX_COPY_RANK: usize = 8;

/// One strided copy (strides and offsets in elements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CopySpec {
    pub shape: Vec<usize>,
    pub src_offset: usize,
    pub src_strides: Vec<usize>,
    pub dst_offset: usize,
    pub dst_strides: Vec<usize>,
}

impl CopySpec {
    fn elem_count(&self) -> usize {
        elem_count(&self.shape)
    }

    /// The same copy with size-1 dims dropped and neighbouring dims merged where both sides
    /// are contiguous across them: fewer, longer dims (faster loops, and any rank fits the
    /// kernel when the data allows).
    fn coalesced(&self) -> CopySpec {
        let (mut shape, mut src_strides, mut dst_strides) = (vec![], vec![], vec![]);
        for k in 0..self.shape.len() {
            let (size, ss, ds) = (self.shape[k], self.src_strides[k], self.dst_strides[k]);
            if size == 1 {
                continue;
            }
            if let (Some(last), Some(last_ss), Some(last_ds)) = (
                shape.last_mut(),
                src_strides.last_mut(),
                dst_strides.last_mut(),
            ) {
                if *last_ss == ss * size && *last_ds == ds * size {
                    *last *= size;
                    *last_ss = ss;
                    *last_ds = ds;
                    continue;
                }
            }
            shape.push(size);
            src_strides.push(ss);
            dst_strides.push(ds);
        }
        CopySpec {
            shape,
            src_offset: self.src_offset,
            src_strides,
            dst_offset: self.dst_offset,
            dst_strides,
        }
    }
}

/// Host element types the CPU copy moves.
trait Elem: Copy + Default + Send + Sync + 'static {
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn wrap(v: Vec<Self>) -> CpuStorage;
}

macro_rules! impl_elem {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}
impl_elem!(f32, F32);
impl_elem!(f16, F16);
impl_elem!(u32, U32);

/// The CPU strided copy: rows of the innermost dim, an odometer over the outer dims.
fn cpu_copy<T: Copy>(src: &[T], dst: &mut [T], spec: &CopySpec) {
    if spec.elem_count() == 0 {
        return;
    }
    let spec = spec.coalesced();
    let Some((&inner, outer_shape)) = spec.shape.split_last() else {
        dst[spec.dst_offset] = src[spec.src_offset];
        return;
    };
    let outer = outer_shape.len();
    let (si, di) = (spec.src_strides[outer], spec.dst_strides[outer]);
    let mut idx = vec![0usize; outer];
    for _ in 0..elem_count(outer_shape) {
        let s = spec.src_offset
            + (0..outer)
                .map(|k| idx[k] * spec.src_strides[k])
                .sum::<usize>();
        let d = spec.dst_offset
            + (0..outer)
                .map(|k| idx[k] * spec.dst_strides[k])
                .sum::<usize>();
        if si == 1 && di == 1 {
            dst[d..d + inner].copy_from_slice(&src[s..s + inner]);
        } else {
            for j in 0..inner {
                dst[d + j * di] = src[s + j * si];
            }
        }
        for k in (0..outer).rev() {
            idx[k] += 1;
            if idx[k] < outer_shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CopyParams {
    n: u32,
    rank: u32,
    src_offset: u32,
    dst_offset: u32,
    shape: [u32; MAX_COPY_RANK],
    src_strides: [u32; MAX_COPY_RANK],
    dst_strides: [u32; MAX_COPY_RANK],
}

fn padded(v: &[usize]) -> [u32; MAX_COPY_RANK] {
    let mut out = [0u32; MAX_COPY_RANK];
    for (o, x) in out.iter_mut().zip(v) {
        *o = *x as u32;
    }
    out
}

/// One dispatch of the `strided_copy` kernel between buffers of 4-byte elements.
fn gpu_copy(
    op: &'static str,
    ctx: &GpuContext,
    src: &GpuBuffer,
    dst: &GpuBuffer,
    spec: &CopySpec,
) -> Result<()> {
    let n = spec.elem_count();
    if n == 0 {
        return Ok(());
    }
    let spec = spec.coalesced();
    if spec.shape.len() > MAX_COPY_RANK {
        return Err(Error::shape(
            op,
            format!(
                "the copy needs rank {} on the GPU, over the supported {MAX_COPY_RANK}",
                spec.shape.len()
            ),
        ));
    }
    let limit = ctx.binding_limit();
    if View::whole(src).size <= limit && View::whole(dst).size <= limit {
        return copy_dispatch(ctx, View::whole(src), View::whole(dst), &spec);
    }
    copy_tiles(ctx, src, dst, spec)
}

/// A copy over buffers larger than one binding: tiles whose source and destination windows
/// both fit (any strides: a transpose becomes tiles), one dispatch each.
fn copy_tiles(ctx: &GpuContext, src: &GpuBuffer, dst: &GpuBuffer, spec: CopySpec) -> Result<()> {
    let budget = window_budget(ctx, 4);
    let strides = [spec.src_strides.clone(), spec.dst_strides.clone()];
    let starts = vec![spec.src_offset, spec.dst_offset];
    for tile in strided_tiles(&spec.shape, &strides, starts, &[budget; 2]) {
        let (src_view, src_offset) =
            window_at(ctx, src, tile.starts[0], span(&tile.shape, &strides[0]), 4);
        let (dst_view, dst_offset) =
            window_at(ctx, dst, tile.starts[1], span(&tile.shape, &strides[1]), 4);
        let local = CopySpec {
            shape: tile.shape,
            src_offset,
            src_strides: strides[0].clone(),
            dst_offset,
            dst_strides: strides[1].clone(),
        };
        copy_dispatch(ctx, src_view, dst_view, &local)?;
    }
    Ok(())
}

/// One dispatch of `strided_copy` over the given windows (offsets relative to them).
fn copy_dispatch(ctx: &GpuContext, src: View, dst: View, spec: &CopySpec) -> Result<()> {
    let n = spec.elem_count();
    let params = CopyParams {
        n: n as u32,
        rank: spec.shape.len() as u32,
        src_offset: spec.src_offset as u32,
        dst_offset: spec.dst_offset as u32,
        shape: padded(&spec.shape),
        src_strides: padded(&spec.src_strides),
        dst_strides: padded(&spec.dst_strides),
    };
    launch_views(
        ctx,
        Shader::Copy,
        "strided_copy",
        &[src, dst],
        1,
        &params,
        grid_1d(n as u64, 256),
    )
}

fn assemble_cpu<T: Elem>(n: usize, parts: &[(&Tensor, CopySpec)]) -> CpuStorage {
    let mut out = vec![T::default(); n];
    for (t, spec) in parts {
        let storage = t.storage();
        let Storage::Cpu(host) = &*storage else {
            unreachable!("cpu op on a gpu tensor: devices are checked first")
        };
        let src = T::slice(host).expect("dtypes are checked first");
        cpu_copy(src, &mut out, spec);
    }
    T::wrap(out)
}

/// The storage of a new tensor of `n` elements of `dtype` on `device`, filled by the strided
/// copies `parts`; elements no part writes are zero when `zero` is set (and unspecified
/// otherwise). Inputs are already checked: same dtype and device; not f16 on the GPU.
fn assemble(
    op: &'static str,
    dtype: DType,
    device: &Device,
    n: usize,
    parts: &[(&Tensor, CopySpec)],
    zero: bool,
) -> Result<Storage> {
    match device {
        Device::Cpu => Ok(Storage::cpu(match dtype {
            DType::F32 => assemble_cpu::<f32>(n, parts),
            DType::F16 => assemble_cpu::<f16>(n, parts),
            DType::U32 => assemble_cpu::<u32>(n, parts),
        })),
        Device::Gpu(ctx) => {
            if n > u32::MAX as usize {
                return Err(Error::shape(
                    op,
                    format!("{n} elements are over the GPU limit of 2^32"),
                ));
            }
            let out = if zero {
                ctx.alloc_zeroed((n.max(1) * 4) as u64, MemCategory::Activations)?
            } else {
                alloc_f32(ctx, n)?
            };
            for (t, spec) in parts {
                let src = t.gpu_operand()?;
                gpu_copy(op, ctx, &src, &out, spec)?;
            }
            Ok(Storage::Gpu(out))
        }
    }
}

/// GPU f16 tensors are packed two per word, which the word-copy kernel cannot split; they go
/// through f32 instead (exact both ways, and gradients flow through the casts).
fn packed_f16(t: &Tensor) -> bool {
    t.dtype() == DType::F16 && t.device().is_gpu()
}

fn via_f32(t: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    f(&t.to_dtype(DType::F32)?)?.to_dtype(DType::F16)
}

/// Errors unless `dims` is a permutation of `0..rank`.
fn check_permutation(shape: &[usize], dims: &[usize]) -> Result<()> {
    let rank = shape.len();
    if dims.len() != rank {
        return Err(Error::shape(
            "permute",
            format!(
                "{dims:?} has {} dims, the tensor {shape:?} has {rank}",
                dims.len()
            ),
        ));
    }
    let mut seen = vec![false; rank];
    for &d in dims {
        check_dim("permute", d, rank)?;
        if std::mem::replace(&mut seen[d], true) {
            return Err(Error::shape(
                "permute",
                format!("{dims:?} is not a permutation: dim {d} repeats"),
            ));
        }
    }
    Ok(())
}

impl Tensor {
    /// The same elements under a new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if elem_count(shape) != self.elem_count() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "{:?} has {} elements, {shape:?} has {}",
                    self.shape(),
                    self.elem_count(),
                    elem_count(shape)
                ),
            ));
        }
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let storage = self.storage().clone();
        let in_shape = self.shape().to_vec();
        Ok(Tensor::from_op(
            storage,
            shape.to_vec(),
            self.dtype(),
            self.device(),
            "reshape",
            &[self],
            move |_, g| Ok(vec![Some(g.reshape(&in_shape)?)]),
        ))
    }

    /// Reorders the dims: output dim `i` is input dim `dims[i]` (a copy, contiguous).
    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        check_permutation(self.shape(), dims)?;
        if dims.iter().enumerate().all(|(i, &d)| i == d) {
            return Ok(self.clone());
        }
        if packed_f16(self) {
            return via_f32(self, |t| t.permute(dims));
        }
        let in_strides = strides(self.shape());
        let out_shape: Vec<usize> = dims.iter().map(|&d| self.shape()[d]).collect();
        let spec = CopySpec {
            src_offset: 0,
            src_strides: dims.iter().map(|&d| in_strides[d]).collect(),
            dst_offset: 0,
            dst_strides: strides(&out_shape),
            shape: out_shape.clone(),
        };
        let storage = assemble(
            "permute",
            self.dtype(),
            self.device(),
            self.elem_count(),
            &[(self, spec)],
            false,
        )?;
        let mut inverse = vec![0; dims.len()];
        for (i, &d) in dims.iter().enumerate() {
            inverse[d] = i;
        }
        Ok(Tensor::from_op(
            storage,
            out_shape,
            self.dtype(),
            self.device(),
            "permute",
            &[self],
            move |_, g| Ok(vec![Some(g.permute(&inverse)?)]),
        ))
    }

    /// Swaps dims `d0` and `d1` (a copy).
    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        check_dim("transpose", d0, self.rank())?;
        check_dim("transpose", d1, self.rank())?;
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        dims.swap(d0, d1);
        self.permute(&dims)
    }

    /// Elements `start..start + len` along `dim` (a copy).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        check_dim("narrow", dim, self.rank())?;
        let size = self.shape()[dim];
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::IndexOutOfRange {
                op: "narrow",
                index: if len == 0 {
                    start
                } else {
                    start.saturating_add(len - 1)
                },
                size,
            });
        }
        if start == 0 && len == size {
            return Ok(self.clone());
        }
        if packed_f16(self) {
            return via_f32(self, |t| t.narrow(dim, start, len));
        }
        let in_strides = strides(self.shape());
        let mut out_shape = self.shape().to_vec();
        out_shape[dim] = len;
        let spec = CopySpec {
            src_offset: start * in_strides[dim],
            src_strides: in_strides,
            dst_offset: 0,
            dst_strides: strides(&out_shape),
            shape: out_shape.clone(),
        };
        let n = elem_count(&out_shape);
        let storage = assemble(
            "narrow",
            self.dtype(),
            self.device(),
            n,
            &[(self, spec)],
            false,
        )?;
        Ok(Tensor::from_op(
            storage,
            out_shape,
            self.dtype(),
            self.device(),
            "narrow",
            &[self],
            move |_, g| Ok(vec![Some(g.pad_narrow(dim, start, size)?)]),
        ))
    }

    /// The inverse of `narrow`: a tensor whose `dim` has size `full`, zero everywhere except
    /// `start..start + self.shape()[dim]`, which holds `self`. `narrow`'s backward.
    pub fn pad_narrow(&self, dim: usize, start: usize, full: usize) -> Result<Tensor> {
        check_dim("pad_narrow", dim, self.rank())?;
        let len = self.shape()[dim];
        if start.checked_add(len).is_none_or(|end| end > full) {
            return Err(Error::shape(
                "pad_narrow",
                format!("a slice of {len} at {start} along dim {dim} does not fit in size {full}"),
            ));
        }
        if start == 0 && len == full {
            return Ok(self.clone());
        }
        if packed_f16(self) {
            return via_f32(self, |t| t.pad_narrow(dim, start, full));
        }
        let mut out_shape = self.shape().to_vec();
        out_shape[dim] = full;
        let out_strides = strides(&out_shape);
        let spec = CopySpec {
            shape: self.shape().to_vec(),
            src_offset: 0,
            src_strides: strides(self.shape()),
            dst_offset: start * out_strides[dim],
            dst_strides: out_strides,
        };
        let n = elem_count(&out_shape);
        let storage = assemble(
            "pad_narrow",
            self.dtype(),
            self.device(),
            n,
            &[(self, spec)],
            true,
        )?;
        Ok(Tensor::from_op(
            storage,
            out_shape,
            self.dtype(),
            self.device(),
            "pad_narrow",
            &[self],
            move |_, g| Ok(vec![Some(g.narrow(dim, start, len)?)]),
        ))
    }

    /// Concatenates tensors along `dim`; every other dim, the dtype and the device must match.
    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        let Some(first) = tensors.first() else {
            return Err(Error::shape("cat", "no tensors to concatenate"));
        };
        check_dim("cat", dim, first.rank())?;
        for t in &tensors[1..] {
            t.expect_dtype("cat", first.dtype())?;
            first.expect_same_device("cat", t)?;
            let same_rest = t.rank() == first.rank()
                && (0..first.rank()).all(|d| d == dim || t.shape()[d] == first.shape()[d]);
            if !same_rest {
                return Err(Error::shape(
                    "cat",
                    format!(
                        "{:?} and {:?} differ outside the concatenated dim {dim}",
                        first.shape(),
                        t.shape()
                    ),
                ));
            }
        }
        if tensors.len() == 1 {
            return Ok((*first).clone());
        }
        if packed_f16(first) {
            let wide = tensors
                .iter()
                .map(|t| t.to_dtype(DType::F32))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = wide.iter().collect();
            return Tensor::cat(&refs, dim)?.to_dtype(DType::F16);
        }
        let sizes: Vec<usize> = tensors.iter().map(|t| t.shape()[dim]).collect();
        let mut out_shape = first.shape().to_vec();
        out_shape[dim] = sizes.iter().sum();
        let out_strides = strides(&out_shape);
        let mut offset = 0;
        let parts: Vec<(&Tensor, CopySpec)> = tensors
            .iter()
            .map(|t| {
                let spec = CopySpec {
                    shape: t.shape().to_vec(),
                    src_offset: 0,
                    src_strides: strides(t.shape()),
                    dst_offset: offset * out_strides[dim],
                    dst_strides: out_strides.clone(),
                };
                offset += t.shape()[dim];
                (*t, spec)
            })
            .collect();
        let n = elem_count(&out_shape);
        let storage = assemble("cat", first.dtype(), first.device(), n, &parts, false)?;
        let tracks: Vec<bool> = tensors.iter().map(|t| t.tracks_grad()).collect();
        Ok(Tensor::from_op(
            storage,
            out_shape,
            first.dtype(),
            first.device(),
            "cat",
            tensors,
            move |_, g| {
                let mut start = 0;
                let mut grads = Vec::with_capacity(sizes.len());
                for (&size, &track) in sizes.iter().zip(&tracks) {
                    grads.push(if track {
                        Some(g.narrow(dim, start, size)?)
                    } else {
                        None
                    });
                    start += size;
                }
                Ok(grads)
            },
        ))
    }

    /// Splits along `dim` into consecutive pieces of the given sizes (which must sum to the
    /// size of `dim`). Each piece is a copy.
    pub fn split(&self, sizes: &[usize], dim: usize) -> Result<Vec<Tensor>> {
        check_dim("split", dim, self.rank())?;
        let total: usize = sizes.iter().sum();
        if total != self.shape()[dim] {
            return Err(Error::shape(
                "split",
                format!(
                    "sizes {sizes:?} sum to {total}, dim {dim} of {:?} has {}",
                    self.shape(),
                    self.shape()[dim]
                ),
            ));
        }
        let mut start = 0;
        sizes
            .iter()
            .map(|&size| {
                let piece = self.narrow(dim, start, size);
                start += size;
                piece
            })
            .collect()
    }

    /// Splits along `dim` into `n` pieces of `ceil(size / n)` elements, as torch.chunk: the
    /// last piece may be smaller, and there are fewer than `n` pieces when `size` runs out
    /// (a dim of size 0 gives `n` empty pieces).
    pub fn chunk(&self, n: usize, dim: usize) -> Result<Vec<Tensor>> {
        check_dim("chunk", dim, self.rank())?;
        if n == 0 {
            return Err(Error::shape("chunk", "cannot split into 0 chunks"));
        }
        let size = self.shape()[dim];
        if size == 0 {
            return self.split(&vec![0; n], dim);
        }
        let step = size.div_ceil(n);
        let sizes: Vec<usize> = (0..size)
            .step_by(step)
            .map(|start| step.min(size - start))
            .collect();
        self.split(&sizes, dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_merges_contiguous_dims_and_drops_ones() {
        // Narrowing dim 1 of (2, 5, 3, 4) to 2: the two trailing dims merge.
        let spec = CopySpec {
            shape: vec![2, 2, 1, 3, 4],
            src_offset: 12,
            src_strides: vec![60, 12, 12, 4, 1],
            dst_offset: 0,
            dst_strides: vec![24, 12, 12, 4, 1],
        };
        let c = spec.coalesced();
        assert_eq!(c.shape, vec![2, 24]);
        assert_eq!(c.src_strides, vec![60, 1]);
        assert_eq!(c.dst_strides, vec![24, 1]);
        // A full contiguous copy is one dim.
        let full = CopySpec {
            shape: vec![3, 4, 5],
            src_offset: 0,
            src_strides: vec![20, 5, 1],
            dst_offset: 7,
            dst_strides: vec![20, 5, 1],
        };
        assert_eq!(full.coalesced().shape, vec![60]);
    }
}
