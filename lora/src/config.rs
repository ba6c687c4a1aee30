//! peft's `LoraConfig`, read from and written to `adapter_config.json` with peft's field
//! names; fields lathe does not use are kept and written back unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Which modules get an adapter: peft's `target_modules`, a list of names (a module matches
/// when its full name equals one or ends with `.` + one) or one regular expression string
/// (matched against the full name; lathe supports only plain names and `a|b` alternatives of
/// plain names there).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names, matched against the end of the full name.
    List(Vec<String>),
    /// A regular expression matched against the full name (plain names and `a|b` only).
    Pattern(String),
}

fn default_peft_type() -> String {
    "LORA".into()
}

fn default_bias() -> String {
    "none".into()
}

/// The subset of peft's LoraConfig that changes the math, plus bookkeeping fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// peft's adapter kind: only "LORA".
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// The rank of A (r, in) and B (out, r); >= 1.
    pub r: usize,
    /// The update's scale numerator: scaling = lora_alpha / r.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training, in [0, 1).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules get an adapter.
    pub target_modules: TargetModules,
    /// Only "none" is supported (peft's default): biases stay frozen.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Weights stored (in, out) as GPT-2's Conv1D; lathe's models store (out, in): false.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// scaling = alpha / sqrt(r) instead of alpha / r.
    #[serde(default)]
    pub use_rslora: bool,
    /// peft's task ("CAUSAL_LM", "SEQ_CLS"); bookkeeping only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on, as the trainer named it; bookkeeping only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// peft's flag for an adapter saved for inference; bookkeeping only.
    #[serde(default)]
    pub inference_mode: bool,
    /// Every other field of adapter_config.json, written back as read.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl LoraConfig {
    /// A causal-LM config with rank `r`, `lora_alpha` and the listed target modules, no
    /// dropout.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> LoraConfig {
        LoraConfig {
            peft_type: default_peft_type(),
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
            bias: default_bias(),
            fan_in_fan_out: false,
            use_rslora: false,
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: None,
            inference_mode: false,
            extra: Map::new(),
        }
    }

    /// The factor on B A x: alpha / r (alpha / sqrt(r) with rsLoRA), as peft.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Errors for settings lathe cannot honour or that make no sense.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::Config(m));
        if self.peft_type != "LORA" {
            return fail(format!("peft_type {:?} is not LORA", self.peft_type));
        }
        if self.r == 0 {
            return fail("r must be at least 1".into());
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return fail(format!(
                "lora_alpha must be positive, got {}",
                self.lora_alpha
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return fail(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        if self.bias != "none" {
            return fail(format!(
                "bias {:?} is not supported (only \"none\": biases stay frozen)",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            return fail("fan_in_fan_out (Conv1D weights) is not supported".into());
        }
        if self.targets().is_empty() {
            return fail("target_modules is empty".into());
        }
        // peft features that change the math and that lathe does not implement.
        if self.extra.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return fail("use_dora (DoRA) is not supported".into());
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(Value::Object(map)) = self.extra.get(key) {
                if !map.is_empty() {
                    return fail(format!("{key} (per-module r or alpha) is not supported"));
                }
            }
        }
        if let Some(v) = self
            .extra
            .get("layers_to_transform")
            .filter(|v| !v.is_null())
        {
            return fail(format!("layers_to_transform {v} is not supported"));
        }
        Ok(())
    }

    /// The target names (a pattern's `|` alternatives).
    pub fn targets(&self) -> Vec<String> {
        match &self.target_modules {
            TargetModules::List(names) => names.clone(),
            TargetModules::Pattern(p) => p
                .trim_start_matches("(?:")
                .trim_start_matches('(')
                .trim_end_matches(')')
                .split('|')
                .map(|s| s.trim_matches(|c| c == '^' || c == '$').to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    /// Whether the module named `module` (full dotted name) gets an adapter: peft's rule for
    /// a list, `name == target || name.ends_with("." + target)`.
    pub fn matches(&self, module: &str) -> bool {
        self.targets().iter().any(|t| {
            module == t
                || module
                    .strip_suffix(t.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }

    /// The config as adapter_config.json text (pretty-printed, unknown fields kept).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Config(e.to_string()))
    }

    /// Reads adapter_config.json text and validates it; an error names the bad field.
    pub fn from_json(text: &str) -> Result<LoraConfig> {
        let config: LoraConfig =
            serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }
}
