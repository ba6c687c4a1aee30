//! peft's adapter directory: `adapter_config.json` and `adapter_model.safetensors`, whose keys
//! are `base_model.model.{module}.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), the
//! module being the full dotted name in the base model (`model.layers.0.self_attn.q_proj`).
//! Files are written to a temporary name and renamed, so a failed save leaves no half file.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use lathe_core::{Device, Tensor};

use crate::adapter::LoraAdapter;
use crate::config::LoraConfig;
use crate::{Error, Result};

/// The config's file name in a peft adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights' file name in a peft adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// peft's saved key of a module's A (`which` = 'A') or B ('B') weight.
pub fn key(module: &str, which: char) -> String {
    format!("{PREFIX}{module}.lora_{which}.weight")
}

/// An adapter directory's contents: the config, and per module A (r, in) and B (out, r).
pub struct LoadedAdapter {
    /// adapter_config.json, validated.
    pub config: LoraConfig,
    /// Per module full name (peft's `base_model.model.` prefix removed), its (A, B).
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
}

fn file_error(path: &Path, detail: impl Into<String>) -> Error {
    Error::File {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32) for the
/// adapters; creates `dir` when missing.
pub fn save_adapter(dir: &Path, config: &LoraConfig, adapters: &[&LoraAdapter]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, format!("cannot create: {e}")))?;
    let mut names = Vec::with_capacity(adapters.len() * 2);
    for adapter in adapters {
        names.push((key(adapter.name(), 'A'), adapter.a().detach()));
        names.push((key(adapter.name(), 'B'), adapter.b().detach()));
    }
    let tensors: Vec<(&str, &Tensor)> = names.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    lathe_core::safetensors::save(&dir.join(WEIGHTS_FILE), &tensors, Some(metadata))?;
    let config_path = dir.join(CONFIG_FILE);
    let temp = dir.join(format!("{CONFIG_FILE}.tmp"));
    std::fs::write(&temp, config.to_json()?)
        .and_then(|()| std::fs::rename(&temp, &config_path))
        .map_err(|e| file_error(&config_path, format!("cannot write: {e}")))
}

/// Reads an adapter directory onto `device` (f32 tensors, not yet variables).
pub fn load_adapter(dir: &Path, device: &Device) -> Result<LoadedAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| file_error(&config_path, format!("cannot read: {e}")))?;
    let config =
        LoraConfig::from_json(&text).map_err(|e| file_error(&config_path, e.to_string()))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        return Err(file_error(
            &weights_path,
            "missing (lathe reads adapter_model.safetensors; convert a .bin adapter with peft first)",
        ));
    }
    let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, tensor) in lathe_core::safetensors::load(&weights_path, device)? {
        let parsed = name.strip_prefix(PREFIX).and_then(|rest| {
            rest.strip_suffix(".lora_A.weight")
                .map(|m| (m, 'A'))
                .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 'B')))
        });
        let Some((module, which)) = parsed else {
            return Err(file_error(
                &weights_path,
                format!("tensor {name:?} is not a LoRA weight (base_model.model.<module>.lora_A/B.weight)"),
            ));
        };
        let tensor = tensor.to_dtype(lathe_core::DType::F32)?;
        let slot = halves.entry(module.to_string()).or_default();
        match which {
            'A' => slot.0 = Some(tensor),
            _ => slot.1 = Some(tensor),
        }
    }
    if halves.is_empty() {
        return Err(file_error(&weights_path, "holds no LoRA weights"));
    }
    let mut modules = BTreeMap::new();
    for (module, pair) in halves {
        match pair {
            (Some(a), Some(b)) => {
                modules.insert(module, (a, b));
            }
            (a, _) => {
                return Err(file_error(
                    &weights_path,
                    format!(
                        "module {module} has lora_{} but not lora_{}",
                        if a.is_some() { 'A' } else { 'B' },
                        if a.is_some() { 'B' } else { 'A' }
                    ),
                ))
            }
        }
    }
    Ok(LoadedAdapter { config, modules })
}

/// peft's `print_trainable_parameters` line.
pub fn trainable_parameters_line(trainable: usize, all: usize) -> String {
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(all),
        100.0 * trainable as f64 / all.max(1) as f64
    )
}

/// 1234567 -> "1,234,567", as Python's `{:,}`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
