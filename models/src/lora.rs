//! LoRA on a [`CausalLm`]: adapters added to the block linear layers peft's `target_modules`
//! name, loaded from and saved to peft adapter directories, merged into the base weights,
//! and counted as peft's `print_trainable_parameters` does.
//!
//! Module names are the HF ones (`gpt_neox.layers.0.attention.query_key_value`,
//! `model.layers.0.self_attn.q_proj`), so adapter files are interchangeable with peft's.

use std::path::Path;

use lathe_core::Tensor;
use lathe_lora::peft::{load_adapter, save_adapter, trainable_parameters_line};
use lathe_lora::{AdapterSwitch, LoraAdapter, LoraConfig};

use crate::hf::CausalLm;
use crate::linear::Linear;
use crate::{Error, Result};

impl CausalLm {
    /// Every linear layer of the transformer blocks under its HF module name.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        self.arch().linears()
    }

    /// The same, mutable (for swapping a layer's form).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.arch_mut().linears_mut()
    }

    /// Wraps every block linear `config` targets with a fresh adapter (A drawn from
    /// `seed` and the layer's index, B zero), all on `switch`. Returns how many layers got
    /// one; no match is an error listing the module names there are.
    pub fn add_lora(
        &mut self,
        config: &LoraConfig,
        switch: &AdapterSwitch,
        seed: u64,
    ) -> Result<usize> {
        config.validate()?;
        let mut names = Vec::new();
        let mut count = 0;
        for (index, (name, linear)) in self.linears_mut().into_iter().enumerate() {
            if !config.matches(&name) {
                names.push(name);
                continue;
            }
            if linear.adapter().is_some() {
                return Err(Error::Config(format!("{name} already has a LoRA adapter")));
            }
            let device = linear.dense_device();
            let adapter = LoraAdapter::new(
                &name,
                linear.in_features(),
                linear.out_features(),
                config,
                switch,
                seed.wrapping_add(index as u64),
                &device,
            )?;
            wrap(linear, adapter);
            count += 1;
        }
        if count == 0 {
            return Err(Error::Config(format!(
                "LoRA target_modules {:?} match no linear layer of this model; its modules are \
                 e.g. {}",
                config.targets(),
                names.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(count)
    }

    /// Loads a peft adapter directory onto this model's block linears (on the model's
    /// device), all on `switch`. Every module the file names must exist here with matching
    /// shapes: otherwise the adapter belongs to another model and nothing is changed.
    pub fn load_lora(&mut self, dir: &Path, switch: &AdapterSwitch) -> Result<LoraConfig> {
        let loaded = load_adapter(dir, &lathe_core::Device::Cpu)?;
        let file = dir
            .join(lathe_lora::peft::WEIGHTS_FILE)
            .display()
            .to_string();
        let mut linears = self.linears_mut();
        // Check everything first, so a mismatch leaves the model untouched.
        let mut plan = Vec::with_capacity(loaded.modules.len());
        for (module, (a, b)) in &loaded.modules {
            let Some(position) = linears.iter().position(|(name, _)| name == module) else {
                return Err(Error::Tensor {
                    path: file,
                    tensor: module.clone(),
                    detail: "the model has no such module: the adapter was made for another \
                             model"
                        .into(),
                });
            };
            let linear = &linears[position].1;
            let (want_a, want_b) = (
                [loaded.config.r, linear.in_features()],
                [linear.out_features(), loaded.config.r],
            );
            if a.shape() != want_a || b.shape() != want_b {
                return Err(Error::Tensor {
                    path: file,
                    tensor: module.clone(),
                    detail: format!(
                        "lora_A {:?} / lora_B {:?} do not fit the layer: expected {want_a:?} / \
                         {want_b:?} (in {}, out {}, r {})",
                        a.shape(),
                        b.shape(),
                        linear.in_features(),
                        linear.out_features(),
                        loaded.config.r
                    ),
                });
            }
            if linear.adapter().is_some() {
                return Err(Error::Config(format!(
                    "{module} already has a LoRA adapter"
                )));
            }
            plan.push((position, a.clone(), b.clone()));
        }
        for (position, a, b) in plan {
            let (name, linear) = &mut linears[position];
            let device = linear.dense_device();
            let adapter = LoraAdapter::from_weights(name, a, b, &loaded.config, switch, &device)?;
            wrap(linear, adapter);
        }
        Ok(loaded.config)
    }

    /// Every adapter, in module order.
    pub fn lora_adapters(&self) -> Vec<&LoraAdapter> {
        self.linears()
            .into_iter()
            .filter_map(|(_, linear)| linear.adapter())
            .collect()
    }

    /// The trainable tensors (A and B of every adapter), in module order.
    pub fn lora_parameters(&self) -> Vec<Tensor> {
        self.lora_adapters()
            .iter()
            .flat_map(|a| a.parameters().into_iter().cloned())
            .collect()
    }

    /// Writes the adapters as a peft adapter directory.
    pub fn save_lora(&self, dir: &Path, config: &LoraConfig) -> Result<()> {
        let adapters = self.lora_adapters();
        if adapters.is_empty() {
            return Err(Error::Config(
                "the model has no LoRA adapters to save".into(),
            ));
        }
        let mut config = config.clone();
        config.inference_mode = true;
        Ok(save_adapter(dir, &config, &adapters)?)
    }

    /// Folds every adapter into its base weight and removes it (peft's `merge_and_unload`).
    pub fn merge_lora(&mut self) -> Result<()> {
        for (_, linear) in self.linears_mut() {
            linear.merge_and_unload()?;
        }
        Ok(())
    }

    /// (trainable, all) parameter counts as peft counts them: all = the base model's
    /// parameters (tied embeddings once) plus the adapters'. Counted from the shapes: no
    /// weight is read (dequantizing an int8 model to count it held it whole in f32).
    pub fn parameter_counts(&self) -> Result<(usize, usize)> {
        let trainable: usize = self.lora_parameters().iter().map(Tensor::elem_count).sum();
        let base = crate::plan::parameter_count(&self.config()) as usize;
        Ok((trainable, base + trainable))
    }

    /// peft's `print_trainable_parameters` line for this model.
    pub fn trainable_parameters_line(&self) -> Result<String> {
        let (trainable, all) = self.parameter_counts()?;
        Ok(trainable_parameters_line(trainable, all))
    }
}

/// Replaces `linear` by itself with `adapter` on top.
fn wrap(linear: &mut Linear, adapter: LoraAdapter) {
    let base = linear.clone();
    *linear = Linear::Lora {
        base: Box::new(base),
        adapter,
        merged: false,
    };
}
