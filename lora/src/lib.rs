//! lathe-lora: LoRA (Hu et al. 2021) adapters as peft implements them, for any base linear
//! layer.
//!
//! A LoRA adapter adds `scaling * B (A (dropout(x)))` to a frozen layer's output, with
//! A (r, in) kaiming-uniform and B (out, r) zero at the start, so training begins at the base
//! model. This crate knows nothing of models: it holds the adapter ([`LoraAdapter`]), the
//! switch that turns every adapter of a model off at once ([`AdapterSwitch`], so one set of
//! weights gives both PPO's policy and its reference), the peft configuration
//! ([`LoraConfig`], `adapter_config.json`) and the adapter files
//! (`adapter_model.safetensors`, [`peft`]). A model crate composes them with its own linear
//! layer; [`LoraLinear`] is that composition for a plain dense weight.
//!
//! ```
//! use lathe_core::{Device, Tensor};
//! use lathe_lora::{AdapterSwitch, LoraConfig, LoraLinear};
//!
//! // A frozen 8 -> 6 layer with a rank-2 adapter.
//! let weight = Tensor::randn(&[6, 8], 0, &Device::Cpu)?;
//! let config = LoraConfig::new(2, 4.0, &["proj"]);
//! let switch = AdapterSwitch::new();
//! let layer = LoraLinear::new(weight, None, &config, &switch, 7)?;
//! let x = Tensor::randn(&[3, 8], 1, &Device::Cpu)?;
//! let y = layer.forward(&x)?; // (3, 6); equals the base output while B is zero
//! let loss = y.mul(&y)?.sum_all()?;
//! let grads = loss.backward()?;
//! assert!(grads.get(layer.adapter().b()).is_some()); // only the adapter trains
//! {
//!     let _reference = switch.disable(); // adapters off: the base model
//!     let base = layer.forward(&x)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod adapter;
pub mod config;
pub mod linear;
pub mod peft;

pub use adapter::{AdapterSwitch, DisabledAdapters, LoraAdapter};
pub use config::LoraConfig;
pub use linear::LoraLinear;

/// Errors of lathe-lora; each names the file or module it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An adapter file that cannot be read, or holds the wrong tensors.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A config that does not parse, or a setting lathe does not support.
    #[error("LoRA config: {0}")]
    Config(String),
    /// An adapter that does not fit its module (shapes, rank above the layer's width).
    #[error("LoRA module {module}: {detail}")]
    Module {
        /// The module's full name.
        module: String,
        /// What does not fit.
        detail: String,
    },
    /// A tensor or device error from lathe-core.
    #[error(transparent)]
    Core(#[from] lathe_core::Error),
}

/// The result of every fallible function of lathe-lora.
pub type Result<T> = std::result::Result<T, Error>;
