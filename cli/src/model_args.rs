//! The flags every command that loads a language model shares: `--model`, `--device`,
//! `--dtype`, `--load-in-8bit`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_core::Device;
use lathe_models::pretrained::{Precision, Pretrained};

use crate::device::{self, DeviceArg};

/// Weight precision of the linear layers, when not int8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A HF model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file.
    #[arg(long, value_name = "DIR|FILE.gguf")]
    pub model: PathBuf,
    /// cpu, gpu (an error when none is usable) or auto (a GPU when present, else the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// Accept a software adapter (lavapipe) when no hardware GPU exists.
    #[arg(long)]
    pub allow_software_gpu: bool,
    /// Precision of the transformer blocks' linear weights (embeddings, norms, LM head stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// LLM.int8 weights for the blocks' linear layers (as transformers' load_in_8bit).
    #[arg(long)]
    pub load_in_8bit: bool,
    /// Outlier threshold of LLM.int8 (0 disables the 16-bit outlier path).
    #[arg(long, default_value_t = 6.0, requires = "load_in_8bit")]
    pub int8_threshold: f32,
}

impl ModelArgs {
    pub fn precision(&self) -> Result<Precision> {
        if !(self.int8_threshold.is_finite() && self.int8_threshold >= 0.0) {
            bail!(
                "--int8-threshold must be finite and >= 0 (0 disables the outlier path), got {}",
                self.int8_threshold
            );
        }
        match (self.load_in_8bit, self.dtype) {
            (true, DTypeArg::F16) => bail!("--load-in-8bit and --dtype f16 exclude each other"),
            (true, DTypeArg::F32) => Ok(Precision::Int8 {
                threshold: self.int8_threshold,
            }),
            (false, DTypeArg::F16) => Ok(Precision::F16),
            (false, DTypeArg::F32) => Ok(Precision::F32),
        }
    }

    /// Opens the device and loads the model onto it, saying what it loaded on stderr.
    pub fn load(&self) -> Result<(Pretrained, Device)> {
        let precision = self.precision()?;
        let device = device::open(self.device, self.allow_software_gpu)?;
        let start = Instant::now();
        let pretrained = Pretrained::load(&self.model, &device, precision)
            .with_context(|| format!("loading the model {}", self.model.display()))?;
        let config = pretrained.model.config();
        eprintln!(
            "loaded {} ({}, {} layers, hidden {}, vocab {}) on {} as {:?} in {:.1} s",
            self.model.display(),
            config.model_type(),
            config.num_hidden_layers(),
            config.hidden_size(),
            config.vocab_size(),
            device.name(),
            precision,
            start.elapsed().as_secs_f64()
        );
        Ok((pretrained, device))
    }
}
