//! The flags every command that loads a language model shares: `--model`, `--device`,
//! `--dtype`, `--load-in-8bit`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lathe_core::Device;
use lathe_models::hf::LoadOptions;
use lathe_models::plan::PlanSettings;
use lathe_models::pretrained::{Precision, Pretrained};

use crate::device::{self, DeviceArg};

/// `--model`'s value as a path: itself, or the snapshot of a Hub name in the local Hugging
/// Face cache (see [`lathe_models::hub_cache`]).
pub fn model_path(value: &str) -> Result<PathBuf, String> {
    lathe_models::hub_cache::resolve_model(value).map_err(|e| e.to_string())
}

/// Weight precision of the linear layers, when not int8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
}

/// The memory check a command runs before it loads anything.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PreflightArgs {
    /// The memory the run must fit in (e.g. 24GiB; default on the CPU: this machine's RAM).
    /// The run is planned from config.json first and refused when it will not fit.
    #[arg(long)]
    pub budget: Option<String>,
    /// Skip the memory plan before loading.
    #[arg(long)]
    pub no_preflight: bool,
}

impl PreflightArgs {
    /// The budget to check against: `--budget`, else this machine's RAM on the CPU; `None`
    /// (no check) with `--no-preflight`, or on a GPU without `--budget` (wgpu does not report
    /// device memory), or when the RAM cannot be read.
    pub fn budget(&self, device: DeviceArg) -> Result<Option<u64>> {
        if self.no_preflight {
            return Ok(None);
        }
        Ok(match (&self.budget, device) {
            (Some(text), _) => Some(crate::commands::plan::parse_bytes(text)?),
            (None, DeviceArg::Cpu | DeviceArg::Auto) => crate::commands::plan::machine_ram(),
            (None, _) => None,
        })
    }

    /// Prints the plan's summary line and refuses a plan above the budget, advising
    /// `advice` (what to change).
    pub fn check(
        &self,
        plan: &lathe_models::plan::MemoryPlan,
        device: DeviceArg,
        advice: &[&str],
    ) -> Result<()> {
        let Some(budget) = self.budget(device)? else {
            return Ok(());
        };
        eprintln!("{}", crate::commands::plan::summary(plan, budget));
        crate::commands::plan::check_fits(plan, budget, advice)
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A HF model directory (config.json, *.safetensors, tokenizer.json), a .gguf file, or
    /// a Hub name `ORG/NAME[@REVISION]` already in the local Hugging Face cache.
    #[arg(long, value_name = "DIR|FILE.gguf|ORG/NAME", value_parser = model_path)]
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
    /// Keep the token embedding and the LM head in f16, as bitsandbytes' load_in_8bit
    /// leaves them 16-bit (half their bytes: 1.2 GB less for GPT-NeoX-20B).
    #[arg(long)]
    pub embeddings_f16: bool,
    #[command(flatten)]
    pub preflight: PreflightArgs,
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

    /// The model's fingerprint as a training run records it for resuming: its files, the
    /// precision it is loaded in, and an adapter merged into it.
    pub fn fingerprint(&self, adapter: Option<&std::path::Path>) -> Result<String> {
        let precision = format!(
            "{:?} embeddings_f16={}",
            self.precision()?,
            self.embeddings_f16
        );
        Ok(crate::resume::model_fingerprint(
            &self.model,
            &precision,
            adapter,
        )?)
    }

    /// Plans the job's memory from the model's config.json (or a GGUF file's header) and
    /// refuses it, before anything loads, when it will not fit the budget (`--budget`, else
    /// this machine's RAM for `--device cpu|auto`; with `--device gpu` only given
    /// `--budget`, as wgpu does not report device memory). A LoRA rank above a targeted
    /// layer's width is refused here too.
    pub fn preflight(&self, mut settings: PlanSettings) -> Result<()> {
        if self.preflight.no_preflight || !self.model.exists() {
            return Ok(());
        }
        let config = crate::commands::plan::read_config(&self.model)?;
        settings.checkpoint = crate::commands::plan::checkpoint_of(&self.model)?;
        settings.on_gpu = self.device == DeviceArg::Gpu;
        settings.precision = self.precision()?;
        settings.embeddings_f16 = self.embeddings_f16;
        if settings.lora_targets.is_empty() {
            settings.lora_targets = crate::commands::plan::default_targets(&config);
        }
        // No sequence outruns the model's positions: a longer request is refused by the run's
        // own check, with its reason, not planned as a sequence the model cannot hold.
        settings.seq_len = settings
            .seq_len
            .min(config.max_position_embeddings().max(1));
        // A rank above a targeted layer's width is refused here, as the adapter would refuse
        // it, rather than planned as terabytes.
        for layer in lathe_models::plan::block_linears(&config) {
            let width = layer.out.min(layer.input);
            if settings.lora_r > width && settings.lora_targets.iter().any(|t| t == layer.name) {
                bail!(
                    "{}: LoRA rank r = {} exceeds the layer's width min(in {}, out {}) = {width}: \
                     give r in 1..={width}",
                    layer.name,
                    settings.lora_r,
                    layer.input,
                    layer.out
                );
            }
        }
        let plan = lathe_models::plan::plan(&config, &settings);
        self.preflight
            .check(
                &plan,
                self.device,
                &crate::commands::plan::advice(&settings),
            )
            .with_context(|| format!("memory plan of {}", self.model.display()))
    }

    /// The model's tokenizer alone (a directory's tokenizer.json, or a GGUF file's header), to
    /// count tokens for the memory plan before the model loads.
    pub fn tokenizer(&self) -> Result<lathe_models::tokenizer::Tokenizer> {
        use lathe_models::tokenizer::Tokenizer;
        let tokenizer = if self.model.is_dir() {
            Tokenizer::from_file(self.model.join("tokenizer.json"))?
        } else {
            let header = lathe_models::gguf::GgufFile::open_header(&self.model)?;
            Tokenizer::from_gguf(&header)?
        };
        Ok(tokenizer)
    }

    /// Opens the device and loads the model onto it, saying what it loaded on stderr.
    pub fn load(&self) -> Result<(Pretrained, Device)> {
        let precision = self.precision()?;
        let device = device::open(self.device, self.allow_software_gpu)?;
        let start = Instant::now();
        let options = LoadOptions {
            precision,
            embeddings_f16: self.embeddings_f16,
        };
        let pretrained = Pretrained::load_with(&self.model, &device, options)
            .with_context(|| format!("loading the model {}", self.model.display()))?;
        let config = pretrained.model.config();
        if let Some(warning) = config.load_warning(&self.model.display().to_string()) {
            eprintln!("{warning}");
        }
        if let Some(note) = lathe_models::hf::bnb_int8_note(&config, &options)? {
            eprintln!("{note}");
        }
        let ids = pretrained.tokenizer.vocab_size();
        if ids < config.vocab_size() {
            eprintln!(
                "note: the embedding has {} rows and the tokenizer {ids} ids: ids {ids} and up \
                 are never sampled",
                config.vocab_size()
            );
        }
        eprintln!(
            "loaded {} ({}, {} layers, hidden {}, vocab {}) on {} as {:?}{} in {:.1} s",
            self.model.display(),
            config.model_type(),
            config.num_hidden_layers(),
            config.hidden_size(),
            config.vocab_size(),
            device.name(),
            precision,
            if self.embeddings_f16 {
                " (f16 embeddings)"
            } else {
                ""
            },
            start.elapsed().as_secs_f64()
        );
        Ok((pretrained, device))
    }
}
