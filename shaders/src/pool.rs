//! A pool of storage buffers. Dropping a [`GpuBuffer`] returns its wgpu buffer to the pool
//! (and releases its bytes from the ledger); the next allocation of the same size class reuses it.
//!
//! Reuse is safe without fences because all work goes through one queue in order: a buffer
//! freed while a pending pass still reads it is only written by passes encoded after that one.
//! Host writes into a reused buffer go through [`crate::GpuContext::write`], which first
//! submits pending passes for the same reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::ledger::{MemCategory, MemoryLedger};

/// Usage of every pooled buffer: bound as storage, copied to and from.
const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Rounds a request up to its size class: eight classes per power of two (at most 12.5%
/// waste), at least 256 bytes so tiny tensors share classes. Always a multiple of 4.
pub fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256);
    let floor_power = 1u64 << (63 - bytes.leading_zeros());
    let step = (floor_power / 8).max(4);
    bytes.div_ceil(step) * step
}

/// The capacity allocated for a request. Weights are long-lived and sized once, so they get
/// their exact size (rounded to 4 bytes): a size class would add up to 12.5% to a model.
/// Everything else is rounded to its size class so that buffers recycle.
pub fn capacity_for(bytes: u64, category: MemCategory) -> u64 {
    match category {
        MemCategory::Weights => bytes.max(4).next_multiple_of(4),
        _ => size_class(bytes),
    }
}

#[derive(Debug, Default)]
pub(crate) struct PoolShared {
    free: Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    idle_bytes: std::sync::atomic::AtomicU64,
}

/// A storage buffer on the device, counted in the ledger under one category.
/// Cloning shares the same buffer.
#[derive(Clone, Debug)]
pub struct GpuBuffer {
    inner: Arc<BufferInner>,
}

#[derive(Debug)]
struct BufferInner {
    buffer: Option<wgpu::Buffer>,
    /// Bytes the caller asked for (the logical size).
    len: u64,
    capacity: u64,
    category: MemCategory,
    pool: Arc<PoolShared>,
    ledger: Arc<MemoryLedger>,
}

impl GpuBuffer {
    /// The wgpu buffer (its size is [`capacity`](Self::capacity)).
    pub fn raw(&self) -> &wgpu::Buffer {
        self.inner
            .buffer
            .as_ref()
            .expect("buffer present until drop")
    }
    /// Logical size in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }
    /// Whether the logical size is 0.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
    /// Allocated size in bytes (the size class).
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }
    /// The category its bytes are charged to.
    pub fn category(&self) -> MemCategory {
        self.inner.category
    }
    /// Whether two handles share one buffer.
    pub fn same_buffer(&self, other: &GpuBuffer) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Drop for BufferInner {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.ledger.release(self.category, self.capacity);
            self.pool
                .idle_bytes
                .fetch_add(self.capacity, std::sync::atomic::Ordering::Relaxed);
            let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
            free.entry(self.capacity).or_default().push(buffer);
        }
    }
}

/// The pool itself; owned by the [`crate::GpuContext`].
#[derive(Debug)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
    ledger: Arc<MemoryLedger>,
}

impl BufferPool {
    /// An empty pool whose buffers are charged to `ledger`.
    pub fn new(ledger: Arc<MemoryLedger>) -> Self {
        BufferPool {
            shared: Arc::new(PoolShared::default()),
            ledger,
        }
    }

    /// A buffer of at least `bytes` bytes; contents are unspecified (reused buffers keep old data).
    pub fn alloc(&self, device: &wgpu::Device, bytes: u64, category: MemCategory) -> GpuBuffer {
        let capacity = capacity_for(bytes, category);
        let reused = {
            let mut free = self.shared.free.lock().unwrap_or_else(|e| e.into_inner());
            free.get_mut(&capacity).and_then(Vec::pop)
        };
        let buffer = match reused {
            Some(buffer) => {
                self.shared
                    .idle_bytes
                    .fetch_sub(capacity, std::sync::atomic::Ordering::Relaxed);
                buffer
            }
            None => device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(category.name()),
                size: capacity,
                usage: USAGE,
                mapped_at_creation: false,
            }),
        };
        self.ledger.charge(category, capacity);
        GpuBuffer {
            inner: Arc::new(BufferInner {
                buffer: Some(buffer),
                len: bytes,
                capacity,
                category,
                pool: self.shared.clone(),
                ledger: self.ledger.clone(),
            }),
        }
    }

    /// Bytes held by the pool but not in use (not in the ledger's categories).
    pub fn idle_bytes(&self) -> u64 {
        self.shared
            .idle_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Frees every idle buffer.
    pub fn trim(&self) {
        let mut free = self.shared.free.lock().unwrap_or_else(|e| e.into_inner());
        free.clear();
        self.shared
            .idle_bytes
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::{capacity_for, size_class};
    use crate::MemCategory;

    #[test]
    fn weights_get_their_exact_size() {
        assert_eq!(
            capacity_for(576 * 1536 + 1536 * 4, MemCategory::Weights),
            576 * 1536 + 1536 * 4
        );
        assert_eq!(capacity_for(1001, MemCategory::Weights), 1004);
        assert_eq!(
            capacity_for(1001, MemCategory::Activations),
            size_class(1001)
        );
    }

    #[test]
    fn size_classes_waste_at_most_an_eighth() {
        for bytes in [
            1u64,
            4,
            255,
            256,
            257,
            1000,
            4096,
            4097,
            1 << 20,
            (1 << 20) + 1,
            123_456_789,
        ] {
            let class = size_class(bytes);
            assert!(
                class >= bytes && class.is_multiple_of(4),
                "{bytes} -> {class}"
            );
            if bytes > 256 {
                assert!(
                    class as f64 <= bytes as f64 * 1.125 + 4.0,
                    "{bytes} -> {class}"
                );
            }
        }
    }
}
