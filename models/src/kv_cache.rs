//! Per-layer key and value caches for incremental decoding.
//!
//! Each layer's keys (and values) are kept time-major, (T, B, kv_heads, head_dim), so
//! appending a step is one contiguous copy at the end. On a GPU the storage is a buffer
//! preallocated for a capacity (doubled when full) and charged to `MemCategory::KvCache`;
//! attention reads the valid prefix as (B, kv_heads, T, head_dim) with one permute. On the
//! CPU the storage simply grows by concatenation. The cache holds plain values: it is for
//! generation, and gradients do not flow through it.

use lathe_core::{DType, Device, MemCategory, Tensor};

use crate::{Error, Result};

/// The GPU buffer of a tensor known to live on a GPU. (A macro, not a function: lathe-models
/// does not depend on lathe-shaders, so it cannot name the buffer type.)
macro_rules! buffer {
    ($t:expr) => {
        $t.gpu_buffer()
            .ok_or_else(|| Error::Config("kv cache: expected a GPU tensor".to_string()))
    };
}

/// Keys and values of every layer, for every token seen so far.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Tokens to preallocate room for when a layer's GPU storage is first made.
    initial_capacity: usize,
}

#[derive(Debug)]
struct LayerCache {
    keys: TimeMajor,
    values: TimeMajor,
}

/// One growing (T, B, kv_heads, head_dim) tensor.
#[derive(Debug)]
struct TimeMajor {
    /// (capacity, B, kv_heads, head_dim) on a GPU (only the first `len` steps are valid),
    /// (len, B, kv_heads, head_dim) on the CPU.
    storage: Tensor,
    len: usize,
    /// B * kv_heads * head_dim: one step's elements.
    row: [usize; 3],
}

impl TimeMajor {
    /// A store holding `step` (B, kv_heads, t, d), with room for `capacity` steps on a GPU.
    fn new(step: &Tensor, capacity: usize) -> Result<TimeMajor> {
        let [b, heads, t, d] = *step.shape() else {
            unreachable!("checked by KvCache::append")
        };
        let mut store = TimeMajor {
            storage: Tensor::zeros(&[0, b, heads, d], &Device::Cpu)?,
            len: 0,
            row: [b, heads, d],
        };
        if step.device().is_gpu() {
            store.storage = alloc_steps(step.device(), capacity.max(t), store.row)?;
        }
        store.push(step)?;
        Ok(store)
    }

    fn row_elems(&self) -> usize {
        self.row.iter().product()
    }

    /// Appends (B, kv_heads, t, d).
    fn push(&mut self, step: &Tensor) -> Result<()> {
        let [b, heads, t, d] = *step.shape() else {
            unreachable!("checked by KvCache::append")
        };
        if [b, heads, d] != self.row {
            return Err(Error::Config(format!(
                "kv cache holds (B, kv_heads, d) = {:?}, got a step of {:?}",
                self.row,
                step.shape()
            )));
        }
        let time_major = step.detach().permute(&[2, 0, 1, 3])?; // (t, B, kv_heads, d)
        let device = step.device().clone();
        let Some(ctx) = device.gpu_context() else {
            self.storage = if self.len == 0 {
                time_major
            } else {
                Tensor::cat(&[&self.storage, &time_major], 0)?
            };
            self.len += t;
            return Ok(());
        };
        let row_bytes = (self.row_elems() * 4) as u64;
        let capacity = self.storage.shape()[0];
        if self.len + t > capacity {
            let grown = alloc_steps(&device, (2 * capacity).max(self.len + t), self.row)?;
            ctx.copy(
                &buffer!(&self.storage)?,
                0,
                &buffer!(&grown)?,
                0,
                self.len as u64 * row_bytes,
            );
            self.storage = grown;
        }
        ctx.copy(
            &buffer!(&time_major)?,
            0,
            &buffer!(&self.storage)?,
            self.len as u64 * row_bytes,
            t as u64 * row_bytes,
        );
        self.len += t;
        Ok(())
    }

    /// The valid steps as (B, kv_heads, len, d), a fresh tensor.
    fn read(&self) -> Result<Tensor> {
        let [b, heads, d] = self.row;
        let valid = if self.storage.device().is_gpu() {
            Tensor::from_gpu_buffer(
                buffer!(&self.storage)?,
                &[self.len, b, heads, d],
                DType::F32,
                self.storage.device(),
            )?
        } else {
            self.storage.clone()
        };
        Ok(valid.permute(&[1, 2, 0, 3])?)
    }

    fn capacity_bytes(&self) -> usize {
        self.storage.elem_count() * 4
    }

    /// Rows `rows` of every step (indices of the current rows, in the new order, repeats
    /// allowed): one gather of the valid steps (an embedding lookup over the
    /// (len * B, kv_heads * d) rows), the GPU capacity kept.
    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let [b, heads, d] = self.row;
        let len = self.len;
        let device = self.storage.device().clone();
        let valid = if device.is_gpu() {
            Tensor::from_gpu_buffer(
                buffer!(&self.storage)?,
                &[len * b, heads * d],
                DType::F32,
                &device,
            )?
        } else {
            self.storage.reshape(&[len * b, heads * d])?
        };
        // Output row (t, i) reads input row (t, rows[i]).
        let index: Vec<u32> = (0..len)
            .flat_map(|t| rows.iter().map(move |&r| (t * b + r) as u32))
            .collect();
        let index = Tensor::from_vec(index, &[len * rows.len()], &device)?;
        let selected = Tensor::embedding(&valid, &index)?; // (len * rows, kv_heads * d)
        self.row = [rows.len(), heads, d];
        let Some(ctx) = device.gpu_context() else {
            self.storage = selected.reshape(&[len, rows.len(), heads, d])?;
            return Ok(());
        };
        let capacity = self.storage.shape()[0];
        let grown = alloc_steps(&device, capacity, self.row)?;
        ctx.copy(
            &buffer!(&selected)?,
            0,
            &buffer!(&grown)?,
            0,
            (len * self.row_elems() * 4) as u64,
        );
        self.storage = grown;
        Ok(())
    }
}

/// A GPU tensor of `steps` time-major steps, charged as KV cache (contents unspecified).
fn alloc_steps(device: &Device, steps: usize, row: [usize; 3]) -> Result<Tensor> {
    let ctx = device.gpu_context().expect("a GPU device");
    let elems = steps * row.iter().product::<usize>();
    let buffer = ctx
        .alloc((elems.max(1) * 4) as u64, MemCategory::KvCache)
        .map_err(lathe_core::Error::from)?;
    Ok(Tensor::from_gpu_buffer(
        buffer,
        &[steps, row[0], row[1], row[2]],
        DType::F32,
        device,
    )?)
}

impl KvCache {
    /// An empty cache for a model of `layers` layers.
    pub fn new(layers: usize) -> KvCache {
        KvCache::with_capacity(layers, 64)
    }

    /// An empty cache that preallocates GPU room for `tokens` tokens per layer (prompt plus
    /// new tokens), so generation of a known length never regrows it.
    pub fn with_capacity(layers: usize, tokens: usize) -> KvCache {
        KvCache {
            layers: (0..layers).map(|_| None).collect(),
            initial_capacity: tokens.max(1),
        }
    }

    /// The number of layers the cache has an entry for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Tokens cached so far (per row, padding included): the key offset of the next step.
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(Option::as_ref)
            .map_or(0, |l| l.keys.len)
    }

    /// The cached length, after checking the cache was made for a model of `layers` layers.
    pub(crate) fn offset_for(&self, layers: usize) -> Result<usize> {
        if self.layers.len() != layers {
            return Err(Error::Config(format!(
                "kv cache has {} layers, the model {layers}",
                self.layers.len()
            )));
        }
        Ok(self.seq_len())
    }

    /// Appends keys and values (B, kv_heads, t, d) of `layer` and returns all of that layer's
    /// keys and values so far, (B, kv_heads, T_total, d) each.
    pub fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let layers = self.layers.len();
        let initial_capacity = self.initial_capacity;
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            Error::Config(format!("kv cache has {layers} layers, no layer {layer}"))
        })?;
        if keys.rank() != 4 || keys.shape() != values.shape() {
            return Err(Error::Config(format!(
                "kv cache: keys {:?} and values {:?} must both be (B, kv_heads, t, d)",
                keys.shape(),
                values.shape()
            )));
        }
        keys.expect_dtype("kv_cache", DType::F32)?;
        values.expect_dtype("kv_cache", DType::F32)?;
        match slot {
            Some(cache) => {
                cache.keys.push(keys)?;
                cache.values.push(values)?;
            }
            None => {
                *slot = Some(LayerCache {
                    keys: TimeMajor::new(keys, initial_capacity)?,
                    values: TimeMajor::new(values, initial_capacity)?,
                });
            }
        }
        let cache = slot.as_ref().expect("just filled");
        Ok((cache.keys.read()?, cache.values.read()?))
    }

    /// Repeats every row `group` times in a row (row b becomes rows b*group..(b+1)*group):
    /// G samples of one prompt continue from the prompt's keys and values computed once.
    pub fn repeat_rows(&mut self, group: usize) -> Result<()> {
        if group == 0 {
            return Err(Error::Config("kv cache: repeat_rows by 0".to_string()));
        }
        let batch = self.batch();
        let rows: Vec<usize> = (0..batch * group).map(|r| r / group).collect();
        self.select_rows(&rows)
    }

    /// Keeps rows `rows` (indices of the cached rows, in the new order, repeats allowed):
    /// a batch whose finished rows stop being computed continues from the others' keys and
    /// values.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let batch = self.batch();
        if let Some(&bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(Error::Config(format!(
                "kv cache holds {batch} rows, no row {bad}"
            )));
        }
        for layer in self.layers.iter_mut().flatten() {
            layer.keys.select_rows(rows)?;
            layer.values.select_rows(rows)?;
        }
        Ok(())
    }

    /// Rows cached (0 before the first append).
    fn batch(&self) -> usize {
        self.layers
            .first()
            .and_then(Option::as_ref)
            .map_or(0, |l| l.keys.row[0])
    }

    /// Forgets every cached token (the memory is freed).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Bytes held by the cache storage, capacity included.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| l.keys.capacity_bytes() + l.values.capacity_bytes())
            .sum()
    }
}
