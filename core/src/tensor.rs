//! The tensor: a contiguous row-major array of one dtype on one device, plus (when it tracks
//! gradients) the op that made it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::f16;
use lathe_shaders::{GpuBuffer, MemCategory};

use crate::backprop::{self, GradFn};
use crate::device::Device;
use crate::dtype::DType;
use crate::ops::packed::PackedWeight;
use crate::shape;
use crate::storage::{CpuStorage, Storage};
use crate::{Error, Result};

/// A unique tensor identity, used as the key of gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn next() -> TensorId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A tensor; cloning is cheap and shares the storage.
#[derive(Clone)]
pub struct Tensor(Arc<TensorInner>);

struct TensorInner {
    id: TensorId,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    /// Behind a lock only so optimizers can update parameters in place.
    storage: RwLock<Storage>,
    /// A trainable leaf: gradients are kept for it.
    is_variable: bool,
    /// How this tensor was computed, when any input tracks gradients.
    grad_fn: Option<GradFn>,
    /// A frozen (N, K) CPU weight's second copy, packed for `x @ selfᵀ`
    /// ([`Tensor::packed_for_cpu_forward`]).
    packed: Option<Arc<PackedWeight>>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {:?}, {}",
            self.shape(),
            self.dtype(),
            self.device().name()
        )?;
        if self.0.is_variable {
            write!(f, ", variable")?;
        }
        write!(f, ")")
    }
}

impl Tensor {
    pub(crate) fn from_storage(
        storage: Storage,
        shape: Vec<usize>,
        dtype: DType,
        device: Device,
    ) -> Tensor {
        Tensor(Arc::new(TensorInner {
            id: TensorId::next(),
            shape,
            dtype,
            device,
            storage: RwLock::new(storage),
            is_variable: false,
            grad_fn: None,
            packed: None,
        }))
    }

    /// The result of an op: records `backward` when gradients are enabled and any input tracks.
    /// `backward(output, grad_output)` returns one optional gradient per input, in order.
    pub(crate) fn from_op(
        storage: Storage,
        shape: Vec<usize>,
        dtype: DType,
        device: &Device,
        name: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        let grad_fn =
            (backprop::grad_enabled() && inputs.iter().any(|t| t.tracks_grad())).then(|| GradFn {
                name,
                inputs: inputs.iter().map(|t| (*t).clone()).collect(),
                backward: Box::new(backward),
            });
        Tensor(Arc::new(TensorInner {
            id: TensorId::next(),
            shape,
            dtype,
            device: device.clone(),
            storage: RwLock::new(storage),
            is_variable: false,
            grad_fn,
            packed: None,
        }))
    }

    /// Wraps a GPU buffer holding `shape` elements of `dtype`: the way crates with their own
    /// kernels (lathe-quant) return results. The buffer must belong to `device`.
    pub fn from_gpu_buffer(
        buffer: GpuBuffer,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let needed = (shape::elem_count(shape) * dtype.size_in_bytes()) as u64;
        if !device.is_gpu() || buffer.len() < needed {
            return Err(Error::shape(
                "from_gpu_buffer",
                format!(
                    "a buffer of {} bytes on {} cannot hold {shape:?} {dtype:?}",
                    buffer.len(),
                    device.name()
                ),
            ));
        }
        Ok(Tensor::from_storage(
            Storage::Gpu(buffer),
            shape.to_vec(),
            dtype,
            device.clone(),
        ))
    }

    /// Records how this freshly computed tensor depends on `inputs`: the extension point for
    /// ops defined outside lathe-core. `backward(output, grad_output)` returns one optional
    /// gradient per input, in order; it runs with gradient recording off. The result shares
    /// this tensor's storage.
    pub fn with_backward(
        &self,
        name: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        Tensor::from_op(
            self.storage().clone(),
            self.shape().to_vec(),
            self.dtype(),
            self.device(),
            name,
            inputs,
            backward,
        )
    }

    /// Builds a tensor from host data on a device.
    pub fn from_vec<T: HostElement>(
        data: Vec<T>,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let expected = shape::elem_count(shape);
        if data.len() != expected {
            return Err(Error::DataLength {
                len: data.len(),
                shape: shape.to_vec(),
                expected,
            });
        }
        Tensor::from_storage(
            Storage::cpu(T::wrap(data)),
            shape.to_vec(),
            T::DTYPE,
            Device::Cpu,
        )
        .to_device_as(device, MemCategory::Activations)
    }

    /// As [`Tensor::from_vec`], copying `data`.
    pub fn from_slice<T: HostElement>(
        data: &[T],
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// An f32 tensor of zeros.
    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, device)
    }

    /// An f32 tensor of ones.
    pub fn ones(shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, device)
    }

    /// An f32 tensor with every element `value` (filled on the device itself on a GPU).
    pub fn full(value: f32, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape::elem_count(shape);
        match device {
            Device::Cpu => Tensor::from_vec(vec![value; n], shape, device),
            Device::Gpu(ctx) => {
                let buffer = ctx.alloc((n * 4) as u64, MemCategory::Activations)?;
                crate::ops::unary::gpu_fill(ctx, &buffer, n, value)?;
                Ok(Tensor::from_storage(
                    Storage::Gpu(buffer),
                    shape.to_vec(),
                    DType::F32,
                    device.clone(),
                ))
            }
        }
    }

    /// Uniform values in [lo, hi) from a seeded generator (same values on every device).
    pub fn rand_uniform(
        lo: f32,
        hi: f32,
        shape: &[usize],
        seed: u64,
        device: &Device,
    ) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(Error::shape(
                "rand_uniform",
                format!("bad range [{lo}, {hi})"),
            ));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data = (0..shape::elem_count(shape))
            .map(|_| lo + (hi - lo) * rng.random::<f32>())
            .collect();
        Tensor::from_vec::<f32>(data, shape, device)
    }

    /// Standard-normal values from a seeded generator (Box-Muller).
    pub fn randn(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data = (0..shape::elem_count(shape))
            .map(|_| {
                let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                let u2: f32 = rng.random();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        Tensor::from_vec::<f32>(data, shape, device)
    }

    /// A new tensor over this one's storage: a new identity, no history.
    fn sharing_storage(&self, is_variable: bool, packed: Option<Arc<PackedWeight>>) -> Tensor {
        Tensor(Arc::new(TensorInner {
            id: TensorId::next(),
            shape: self.0.shape.clone(),
            dtype: self.0.dtype,
            device: self.0.device.clone(),
            storage: RwLock::new(self.storage().clone()),
            is_variable,
            grad_fn: None,
            packed,
        }))
    }

    /// This tensor as a trainable leaf (same storage, new identity, no history).
    pub fn into_variable(self) -> Tensor {
        self.sharing_storage(true, None)
    }

    /// The same values without history: gradients stop here. A packed copy
    /// ([`Tensor::packed_for_cpu_forward`]) goes with the values.
    pub fn detach(&self) -> Tensor {
        self.sharing_storage(false, self.0.packed.clone())
    }

    /// This frozen f32 (N, K) CPU weight with a second copy of its values packed for the
    /// forward product `x @ selfᵀ` (see [`crate::ops::packed`]): every CPU product of more
    /// than a few rows through it, and the fused LM-head losses, read the panels instead of
    /// packing the weight again on each call. The backward reads the weight as stored.
    ///
    /// Costs [`Tensor::packed_bytes`] more memory. Returns the tensor unchanged where
    /// packing does not apply: on a GPU, for other dtypes or ranks, for a variable (its
    /// values change every step), or on a CPU without the kernel (AVX-512).
    pub fn packed_for_cpu_forward(&self) -> Result<Tensor> {
        let applies = !self.device().is_gpu()
            && self.dtype() == DType::F32
            && self.rank() == 2
            && !self.tracks_grad()
            && self.0.packed.is_none()
            && crate::ops::packed::kernel_available();
        if !applies {
            return Ok(self.clone());
        }
        let (n, k) = (self.0.shape[0], self.0.shape[1]);
        let packed =
            self.with_cpu_f32("packed_for_cpu_forward", |w| PackedWeight::pack(w, n, k))?;
        Ok(self.sharing_storage(false, packed.map(Arc::new)))
    }

    /// Bytes of the packed copy [`Tensor::packed_for_cpu_forward`] made (0 without one).
    pub fn packed_bytes(&self) -> usize {
        self.0.packed.as_ref().map_or(0, |p| p.bytes())
    }

    /// The packed copy, when there is one.
    pub(crate) fn packed(&self) -> Option<&PackedWeight> {
        self.0.packed.as_deref()
    }

    /// The tensor's identity: clones share it, [`into_variable`](Tensor::into_variable)
    /// and ops make new ones.
    pub fn id(&self) -> TensorId {
        self.0.id
    }
    /// The dims, outermost first (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    /// The number of dims (0 for a scalar).
    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }
    /// The number of elements: the product of the dims.
    pub fn elem_count(&self) -> usize {
        shape::elem_count(&self.0.shape)
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    /// The device the storage is on.
    pub fn device(&self) -> &Device {
        &self.0.device
    }
    /// Whether this is a trainable leaf (made with [`into_variable`](Tensor::into_variable)).
    pub fn is_variable(&self) -> bool {
        self.0.is_variable
    }
    /// Whether gradients flow into this tensor (a variable, or computed from one).
    pub fn tracks_grad(&self) -> bool {
        self.0.is_variable || self.0.grad_fn.is_some()
    }
    pub(crate) fn grad_fn(&self) -> Option<&GradFn> {
        self.0.grad_fn.as_ref()
    }
    pub(crate) fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The GPU buffer of a GPU tensor.
    pub fn gpu_buffer(&self) -> Option<GpuBuffer> {
        match &*self.storage() {
            Storage::Gpu(b) => Some(b.clone()),
            Storage::Cpu(_) => None,
        }
    }

    /// The GPU buffer of an operand a GPU kernel reads or writes: an error (not a panic)
    /// when the tensor lives on the host.
    pub fn gpu_operand(&self) -> Result<GpuBuffer> {
        self.gpu_buffer().ok_or_else(|| Error::DeviceMismatch {
            op: "gpu kernel",
            a: self.device().name(),
            b: "a GPU".into(),
        })
    }

    /// Errors unless the dtype is `expected`.
    pub fn expect_dtype(&self, op: &'static str, expected: DType) -> Result<()> {
        if self.dtype() != expected {
            return Err(Error::DType {
                op,
                expected,
                got: self.dtype(),
            });
        }
        Ok(())
    }

    /// Errors unless `other` lives on the same device.
    pub fn expect_same_device(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.device() != other.device() {
            return Err(Error::DeviceMismatch {
                op,
                a: self.device().name(),
                b: other.device().name(),
            });
        }
        Ok(())
    }

    /// Host copy of the storage (downloads GPU buffers).
    pub(crate) fn to_cpu_storage(&self) -> Result<CpuStorage> {
        let storage = self.storage().clone();
        match storage {
            Storage::Cpu(s) => Ok(Arc::unwrap_or_clone(s)),
            Storage::Gpu(buffer) => {
                let ctx = self
                    .device()
                    .gpu_context()
                    .expect("gpu storage on a gpu device");
                let bytes = ctx.read(&buffer)?;
                let n = self.elem_count();
                Ok(match self.dtype() {
                    DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(&bytes[..n * 4])),
                    DType::U32 => CpuStorage::U32(bytemuck::pod_collect_to_vec(&bytes[..n * 4])),
                    DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(&bytes[..n * 2])),
                })
            }
        }
    }

    /// Copies the tensor to `device`, charging GPU bytes to `category`. Gradients flow back.
    pub fn to_device_as(&self, device: &Device, category: MemCategory) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let storage = match device {
            Device::Cpu => Storage::cpu(self.to_cpu_storage()?),
            Device::Gpu(ctx) => {
                let host = self.to_cpu_storage()?;
                let bytes: &[u8] = match &host {
                    CpuStorage::F32(v) => bytemuck::cast_slice(v),
                    CpuStorage::U32(v) => bytemuck::cast_slice(v),
                    CpuStorage::F16(v) => bytemuck::cast_slice(v),
                };
                Storage::Gpu(ctx.upload(bytes, category)?)
            }
        };
        let source_device = self.device().clone();
        Ok(Tensor::from_op(
            storage,
            self.shape().to_vec(),
            self.dtype(),
            device,
            "to_device",
            &[self],
            move |_, g| Ok(vec![Some(g.to_device(&source_device)?)]),
        ))
    }

    /// Copies the tensor to `device` (GPU bytes counted as activations).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        self.to_device_as(device, MemCategory::Activations)
    }

    /// The values as f32 on the host (f16 widened; u32 is an error).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        match self.to_cpu_storage()? {
            CpuStorage::F32(v) => Ok(v),
            CpuStorage::F16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
            CpuStorage::U32(_) => Err(Error::DType {
                op: "to_vec_f32",
                expected: DType::F32,
                got: DType::U32,
            }),
        }
    }

    /// The elements of a u32 tensor on the host, row-major (read back from a GPU); an error
    /// for float tensors.
    pub fn to_vec_u32(&self) -> Result<Vec<u32>> {
        match self.to_cpu_storage()? {
            CpuStorage::U32(v) => Ok(v),
            _ => Err(Error::DType {
                op: "to_vec_u32",
                expected: DType::U32,
                got: self.dtype(),
            }),
        }
    }

    /// The single value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        let v = self.to_vec_f32()?;
        if v.len() != 1 {
            return Err(Error::shape(
                "to_scalar",
                format!("tensor of shape {:?} is not a scalar", self.shape()),
            ));
        }
        Ok(v[0])
    }

    /// The host storage of a CPU tensor, borrowed; a GPU tensor is an error.
    fn with_cpu<R>(&self, op: &'static str, f: impl FnOnce(&CpuStorage) -> Result<R>) -> Result<R> {
        match &*self.storage() {
            Storage::Cpu(host) => f(host),
            Storage::Gpu(_) => Err(Error::DeviceMismatch {
                op,
                a: "cpu".into(),
                b: self.device().name(),
            }),
        }
    }

    /// The f32 values of a CPU tensor, borrowed.
    pub(crate) fn with_cpu_f32<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<R> {
        self.with_cpu(op, |host| match host {
            CpuStorage::F32(v) => Ok(f(v)),
            _ => Err(Error::DType {
                op,
                expected: DType::F32,
                got: self.dtype(),
            }),
        })
    }

    /// The u32 values of a CPU tensor, borrowed.
    pub(crate) fn with_cpu_u32<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&[u32]) -> R,
    ) -> Result<R> {
        self.with_cpu(op, |host| match host {
            CpuStorage::U32(v) => Ok(f(v)),
            _ => Err(Error::DType {
                op,
                expected: DType::U32,
                got: self.dtype(),
            }),
        })
    }

    /// A CPU f32 result of an op.
    pub(crate) fn cpu_f32(data: Vec<f32>, shape: Vec<usize>) -> Storage {
        debug_assert_eq!(data.len(), shape::elem_count(&shape));
        Storage::cpu(CpuStorage::F32(data))
    }

    /// Converts between f32 and f16 (u32 converts to nothing else). Gradients flow through.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        crate::ops::cast::to_dtype(self, dtype)
    }

    /// Runs reverse-mode autodiff from this scalar (or, with a seed of ones, any) tensor.
    pub fn backward(&self) -> Result<crate::GradStore> {
        backprop::backward(self)
    }
}

/// Host element types a tensor can be built from.
pub trait HostElement: Copy + Send + Sync + 'static {
    /// The dtype of a tensor built from this type.
    const DTYPE: DType;
    /// `data` as host storage.
    fn wrap(data: Vec<Self>) -> CpuStorage;
}

impl HostElement for f32 {
    const DTYPE: DType = DType::F32;
    fn wrap(data: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(data)
    }
}
impl HostElement for f16 {
    const DTYPE: DType = DType::F16;
    fn wrap(data: Vec<Self>) -> CpuStorage {
        CpuStorage::F16(data)
    }
}
impl HostElement for u32 {
    const DTYPE: DType = DType::U32;
    fn wrap(data: Vec<Self>) -> CpuStorage {
        CpuStorage::U32(data)
    }
}
