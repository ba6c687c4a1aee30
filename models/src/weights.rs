//! The weight store: [`Weights`], tensors by HF name that the model constructors (and
//! lathe-reward's encoders) take their tensors from, read from a HF directory's
//! `model.safetensors` or the shards listed by `model.safetensors.index.json` (`weight_map`:
//! tensor name -> shard file), as transformers' `save_pretrained(safe_serialization=True)`
//! writes them; GGUF loading fills one too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use lathe_core::safetensors::{SafetensorsFile, StoredDType};
use lathe_core::{DType, Device, MemCategory, Tensor};
use lathe_quant::Int8Weight;

use crate::config::BnbInt8Config;
use crate::linear::Precision;
use crate::{Error, Result};

/// The model config's file name in a HF model folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights' file name in a HF model folder with one shard.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The shard index's file name in a HF model folder with several shards.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// How a model's weights are stored once loaded. The defaults load everything in f32.
///
/// A bitsandbytes 8-bit checkpoint (config.json's `quantization_config`, see
/// [`BnbInt8Config`]) is int8 whatever `precision` asks: its int8 block weights load as they
/// are stored (never dequantized to f32 or f16 and never requantized), with the config's
/// outlier threshold, as transformers loads such a checkpoint in 8 bits whatever `dtype` it is
/// given. `precision` then only decides the dense form (f32, or f16 for `F16`) of the block
/// linears listed in `llm_int8_skip_modules`. [`crate::hf::bnb_int8_note`] words this for the user.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// The precision of the transformer blocks' linear layers.
    pub precision: Precision,
    /// Keep the token embedding and the LM head in f16 (bitsandbytes' `load_in_8bit` leaves
    /// them 16-bit): half their bytes, which for GPT-NeoX-20B is 1.2 GB.
    pub embeddings_f16: bool,
}

/// Where a tensor of the store is: already built (GGUF, tests), or still in its
/// safetensors file, read when a model takes it.
#[derive(Debug)]
enum Source {
    Built(Tensor),
    Stored(Arc<SafetensorsFile>),
    /// Built when taken (a GGUF tensor dequantized then): the shape is known up front.
    Deferred(Deferred),
}

/// A tensor as [`Weights::remove`] hands it over: built, or still in its file.
enum Taken {
    Built(Tensor),
    Stored(Arc<SafetensorsFile>),
}

/// A host f32 tensor made on demand, with its shape.
#[derive(Clone)]
pub struct Deferred {
    shape: Vec<usize>,
    make: Arc<dyn Fn() -> Result<Tensor> + Send + Sync>,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Deferred({:?})", self.shape)
    }
}

/// Weight tensors by HF name, each remembering the file it came from, for errors that name
/// the file and the tensor. Models take what they need; leftovers (old checkpoints'
/// `attention.bias`, `rotary_emb.inv_freq` buffers) are ignored.
///
/// Tensors of safetensors files are read only when taken, one at a time, and converted at
/// once to the form the model keeps (see [`LoadOptions`]): peak host memory while loading is
/// the model built so far plus one tensor.
#[derive(Debug)]
pub struct Weights {
    tensors: HashMap<String, (Source, Arc<str>)>,
    /// Where a missing tensor was looked for: the file or index that lists the weights.
    origin: String,
    device: Device,
    options: LoadOptions,
    /// The checkpoint's bitsandbytes 8-bit settings, when its config has them.
    bnb_int8: Option<BnbInt8Config>,
}

impl Weights {
    /// An empty store; tensors taken from it end up on `device`.
    pub fn new(origin: impl Into<String>, device: &Device) -> Weights {
        Weights {
            tensors: HashMap::new(),
            origin: origin.into(),
            device: device.clone(),
            options: LoadOptions::default(),
            bnb_int8: None,
        }
    }

    /// Adds a tensor read from `file` (any device, f32 or f16).
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor, file: &str) {
        self.tensors
            .insert(name.into(), (Source::Built(tensor), Arc::from(file)));
    }

    /// Adds a tensor of `shape` that `make` builds when a model takes it, so that a whole
    /// checkpoint is never built at once (GGUF tensors are dequantized one at a time).
    pub fn insert_deferred(
        &mut self,
        name: impl Into<String>,
        shape: Vec<usize>,
        make: impl Fn() -> Result<Tensor> + Send + Sync + 'static,
        file: &str,
    ) {
        let deferred = Deferred {
            shape,
            make: Arc::new(make),
        };
        self.tensors
            .insert(name.into(), (Source::Deferred(deferred), Arc::from(file)));
    }

    /// Whether a tensor `name` is still there (not yet taken).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensors not yet taken.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether every tensor has been taken.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The device taken tensors are put on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How taken tensors are stored.
    pub fn options(&self) -> LoadOptions {
        self.options
    }

    /// Sets how the taken tensors are stored (see [`LoadOptions`]).
    pub fn set_options(&mut self, options: LoadOptions) {
        self.options = options;
    }

    /// The checkpoint's bitsandbytes 8-bit settings (see [`Weights::set_bnb_int8`]).
    pub fn bnb_int8(&self) -> Option<&BnbInt8Config> {
        self.bnb_int8.as_ref()
    }

    /// Marks the store as a bitsandbytes 8-bit checkpoint's ([`crate::config::ModelConfig::bnb_int8`]):
    /// int8 block weights with their `SCB` scales are then taken as they are stored
    /// ([`Weights::take_bnb_int8`]); without it an int8 weight is an error.
    pub fn set_bnb_int8(&mut self, config: Option<BnbInt8Config>) {
        self.bnb_int8 = config;
    }

    /// The dtype `name` has in its safetensors file (`None` when absent or built in memory).
    pub fn stored_dtype(&self, name: &str) -> Option<StoredDType> {
        match self.tensors.get(name) {
            Some((Source::Stored(f), _)) => f.info(name).map(|(dtype, _)| dtype),
            _ => None,
        }
    }

    /// The file that holds `name` (the store's origin when absent), for errors.
    pub fn file_of(&self, name: &str) -> String {
        match self.tensors.get(name) {
            Some((_, file)) => file.to_string(),
            None => self.origin.clone(),
        }
    }

    /// A bitsandbytes int8 linear weight as saved by `Linear8bitLt`: `{prefix}.weight` I8
    /// (out, in) (bnb's CB) and `{prefix}.SCB` F32 (out,) (its row absmax scales), plus an
    /// optional `{prefix}.weight_format` U8 scalar that must be 0 ("row": bnb's only layout
    /// since 0.45; older tiled layouts are refused). The values and scales are taken byte for
    /// byte (no requantization) and moved to the store's device. Errors name the file and the
    /// tensor: a weight that is not I8, a missing SCB, an SCB of the wrong shape or dtype.
    pub fn take_bnb_int8(&mut self, prefix: &str, out: usize, input: usize) -> Result<Int8Weight> {
        let name = format!("{prefix}.weight");
        let scb_name = format!("{prefix}.SCB");
        let format_name = format!("{prefix}.weight_format");
        let stored = |w: &Weights, n: &str, detail: &str| -> Result<Arc<SafetensorsFile>> {
            match w.tensors.get(n) {
                Some((Source::Stored(f), _)) => Ok(f.clone()),
                Some((Source::Built(_) | Source::Deferred(_), file)) => Err(Error::Tensor {
                    path: file.to_string(),
                    tensor: n.to_string(),
                    detail: format!("{detail}: not read from a safetensors file"),
                }),
                None => Err(Error::Tensor {
                    path: w.file_of(&name),
                    tensor: n.to_string(),
                    detail: format!("missing: {detail}"),
                }),
            }
        };
        let tensor_error = |w: &Weights, n: &str, detail: String| Error::Tensor {
            path: w.file_of(n),
            tensor: n.to_string(),
            detail,
        };
        let expect = |w: &Weights, n: &str, want: StoredDType| -> Result<()> {
            match w.stored_dtype(n) {
                Some(d) if d == want => Ok(()),
                d => Err(tensor_error(
                    w,
                    n,
                    format!("dtype {d:?}, expected {want:?} (a bitsandbytes 8-bit layer)"),
                )),
            }
        };
        let weight_file = stored(self, &name, "the int8 weight")?;
        expect(self, &name, StoredDType::I8)?;
        let scb_file = stored(
            self,
            &scb_name,
            &format!("{name} is int8 (bitsandbytes) but its row scales are not stored"),
        )?;
        expect(self, &scb_name, StoredDType::F32)?;
        if self.contains(&format_name) {
            let file = stored(self, &format_name, "the weight layout")?;
            let bytes = match self.stored_dtype(&format_name) {
                Some(StoredDType::U8) => file
                    .read_bytes(&format_name)
                    .map_err(|e| tensor_error(self, &format_name, e.to_string()))?,
                d => {
                    return Err(tensor_error(
                        self,
                        &format_name,
                        format!("dtype {d:?}, expected U8"),
                    ))
                }
            };
            if bytes != [0] {
                return Err(tensor_error(
                    self,
                    &format_name,
                    format!(
                        "weight format {bytes:?}: only bitsandbytes' row-major layout (0,                          \"row\") is supported, not the tiled col32/col_turing/col_ampere ones"
                    ),
                ));
            }
            self.tensors.remove(&format_name);
        }
        let (_, file) = self.remove(&name, &[out, input])?;
        let (_, scb_label) = self.remove(&scb_name, &[out])?;
        let values: Vec<i8> = weight_file
            .read_bytes(&name)
            .map_err(|e| Error::Tensor {
                path: file.to_string(),
                tensor: name.clone(),
                detail: e.to_string(),
            })?
            .into_iter()
            .map(|b| b as i8)
            .collect();
        let scb_error = |detail: String| Error::Tensor {
            path: scb_label.to_string(),
            tensor: scb_name.clone(),
            detail,
        };
        let scales: Vec<f32> = scb_file
            .read_bytes(&scb_name)
            .map_err(|e| scb_error(e.to_string()))?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let weight = Int8Weight::from_parts(out, input, &values, scales)
            .map_err(|e| scb_error(e.to_string()))?;
        weight.to_device(&self.device).map_err(|e| Error::Tensor {
            path: file.to_string(),
            tensor: name.clone(),
            detail: e.to_string(),
        })
    }

    /// Removes `name` from the store after checking its stored shape.
    fn remove(&mut self, name: &str, shape: &[usize]) -> Result<(Taken, Arc<str>)> {
        let Some((source, file)) = self.tensors.remove(name) else {
            return Err(Error::Tensor {
                path: self.origin.clone(),
                tensor: name.to_string(),
                detail: "missing".to_string(),
            });
        };
        let stored = match &source {
            Source::Built(t) => t.shape().to_vec(),
            Source::Stored(f) => f.info(name).map(|(_, s)| s.to_vec()).unwrap_or_default(),
            Source::Deferred(d) => d.shape.clone(),
        };
        if stored != shape {
            return Err(Error::Tensor {
                path: file.to_string(),
                tensor: name.to_string(),
                detail: format!("shape {stored:?}, expected {shape:?}"),
            });
        }
        let taken = match source {
            Source::Built(t) => Taken::Built(t),
            Source::Stored(f) => Taken::Stored(f),
            Source::Deferred(d) => Taken::Built((d.make)()?),
        };
        Ok((taken, file))
    }

    /// Removes the tensor `name`, checks its shape and returns it as f32 on the store's device
    /// (GPU bytes charged as weights). Missing or misshapen tensors are `Error::Tensor`.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.take_as(name, shape, DType::F32)
    }

    /// As [`Weights::take`], in `dtype` (f32 or f16).
    fn take_as(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (source, file) = self.remove(name, shape)?;
        let tensor_error = |detail: String| Error::Tensor {
            path: file.to_string(),
            tensor: name.to_string(),
            detail,
        };
        let tensor = match source {
            Taken::Built(t) => t,
            Taken::Stored(f) if f.info(name).map(|(d, _)| d) == Some(StoredDType::I8) => {
                return Err(tensor_error(
                    "int8 (bitsandbytes) where lathe keeps a 16/32-bit tensor: only the \
                     linear layers of the transformer blocks may be int8 (an int8 embedding, \
                     LM head or norm is not supported)"
                        .into(),
                ))
            }
            Taken::Stored(f) => f
                .read(name, &Device::Cpu)
                .map_err(|e| tensor_error(e.to_string()))?,
        };
        let tensor = match tensor.dtype() {
            DType::F32 | DType::F16 if tensor.dtype() == dtype => tensor,
            DType::F32 | DType::F16 => tensor
                .to_dtype(dtype)
                .map_err(|e| tensor_error(e.to_string()))?,
            other => return Err(tensor_error(format!("dtype {other:?}, expected a float"))),
        };
        tensor
            .to_device_as(&self.device, MemCategory::Weights)
            .map_err(|e| tensor_error(e.to_string()))
    }

    /// As [`Weights::take`], or `None` when the tensor is absent.
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// As [`Weights::take`], rounded to f16 (kept as it is when stored in f16).
    pub fn take_as_f16(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.take_as(name, shape, DType::F16)
    }

    /// A token embedding or LM head weight (V, H): f16 when the options keep embeddings
    /// in 16 bits, else f32.
    pub fn take_embedding(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let dtype = if self.options.embeddings_f16 {
            DType::F16
        } else {
            DType::F32
        };
        self.take_as(name, shape, dtype)
    }

    /// A linear weight (out, in) quantized to LLM.int8 on the host as it is read, then moved
    /// to the store's device. A stored tensor is converted a row at a time from the file's
    /// bytes (f32, f16 or bf16), so it is never whole in f32.
    pub fn take_int8(&mut self, name: &str, shape: &[usize]) -> Result<Int8Weight> {
        let [out, input] = *shape else {
            return Err(Error::Config(format!("{name}: an int8 weight must be 2-D")));
        };
        let (source, file) = self.remove(name, shape)?;
        let tensor_error = |detail: String| Error::Tensor {
            path: file.to_string(),
            tensor: name.to_string(),
            detail,
        };
        let weight = match source {
            Taken::Built(t) => Int8Weight::quantize(
                &t.to_device(&Device::Cpu)
                    .map_err(|e| tensor_error(e.to_string()))?,
            )
            .map_err(|e| tensor_error(e.to_string()))?,
            Taken::Stored(f) => {
                let dtype = f.info(name).map(|(dtype, _)| dtype);
                let (width, decode): (usize, fn(&[u8]) -> f32) = match dtype {
                    Some(StoredDType::F32) => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    Some(StoredDType::F16) => {
                        (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    }
                    Some(StoredDType::BF16) => {
                        (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    }
                    Some(other) => {
                        return Err(tensor_error(format!(
                            "dtype {other:?}, expected F32, F16 or BF16"
                        )))
                    }
                    None => return Err(tensor_error("not in its file".into())),
                };
                // The header was validated: the bytes are exactly out * in elements.
                let bytes = f
                    .read_bytes(name)
                    .map_err(|e| tensor_error(e.to_string()))?;
                Int8Weight::quantize_rows(out, input, |r, row| {
                    let bytes = &bytes[r * input * width..(r + 1) * input * width];
                    for (x, b) in row.iter_mut().zip(bytes.chunks_exact(width)) {
                        *x = decode(b);
                    }
                })
            }
        };
        weight
            .to_device(&self.device)
            .map_err(|e| tensor_error(e.to_string()))
    }

    /// Lists the tensors of one safetensors file in the store, to be read when taken; the
    /// header is read and validated now.
    pub fn add_file(&mut self, path: &Path) -> Result<Vec<String>> {
        let label = path.display().to_string();
        let file = SafetensorsFile::open(path).map_err(|e| Error::File {
            path: label.clone(),
            detail: e.to_string(),
        })?;
        let file = Arc::new(file);
        let label: Arc<str> = Arc::from(label.as_str());
        Ok(file
            .names()
            .map(|name| {
                self.tensors.insert(
                    name.to_string(),
                    (Source::Stored(file.clone()), label.clone()),
                );
                name.to_string()
            })
            .collect())
    }

    /// The weights of a HF directory: `model.safetensors`, or the shards of
    /// `model.safetensors.index.json` (every tensor of the weight map must be in its shard).
    /// Only the headers are read here (every shard's, so a missing or truncated shard is an
    /// error before any tensor is built).
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Weights> {
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            let mut weights = Weights::new(single.display().to_string(), device);
            weights.add_file(&single)?;
            return Ok(weights);
        }
        if !index.is_file() {
            return Err(Error::File {
                path: dir.display().to_string(),
                detail: format!("no {WEIGHTS_FILE} and no {INDEX_FILE}"),
            });
        }
        let weight_map = read_index(&index)?;
        let mut weights = Weights::new(index.display().to_string(), device);
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, shard) in &weight_map {
            by_shard.entry(shard).or_default().push(name);
        }
        for (shard, names) in by_shard {
            let path = dir.join(shard);
            let loaded: HashSet<String> = weights.add_file(&path)?.into_iter().collect();
            if let Some(absent) = names.iter().find(|n| !loaded.contains(**n)) {
                return Err(Error::Tensor {
                    path: path.display().to_string(),
                    tensor: absent.to_string(),
                    detail: format!("listed in {INDEX_FILE} but not in the shard"),
                });
            }
        }
        Ok(weights)
    }
}

/// The `weight_map` of a sharded checkpoint's index.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let label = path.display().to_string();
    let file_error = |detail: String| Error::File {
        path: label.clone(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_error(format!("invalid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| file_error("no \"weight_map\" object".to_string()))?;
    map.iter()
        .map(|(name, shard)| match shard.as_str() {
            Some(s) if !s.contains('/') && !s.contains('\\') => Ok((name.clone(), s.to_string())),
            _ => Err(file_error(format!(
                "weight_map entry {name:?} is not a file name in the directory: {shard}"
            ))),
        })
        .collect()
}
