//! The LoRA adapter of one linear layer and the switch shared by all adapters of a model.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use lathe_core::{DType, Device, MemCategory, Tensor};

use crate::config::LoraConfig;
use crate::{Error, Result};

/// "No dropout" in the switch's seed slot: the adapters are in evaluation mode.
const EVAL: u64 = u64::MAX;

#[derive(Debug)]
struct SwitchState {
    enabled: AtomicBool,
    dropout_seed: AtomicU64,
}

/// Shared by every adapter of a model: turns them all off at once (PPO's reference model is
/// the policy with its adapters disabled, as peft's `disable_adapter()`), and carries the
/// training state (dropout on, with the seed of the current step, or off).
#[derive(Clone, Debug)]
pub struct AdapterSwitch(Arc<SwitchState>);

impl Default for AdapterSwitch {
    fn default() -> Self {
        AdapterSwitch::new()
    }
}

impl AdapterSwitch {
    /// Adapters enabled, in evaluation mode (no dropout).
    pub fn new() -> AdapterSwitch {
        AdapterSwitch(Arc::new(SwitchState {
            enabled: AtomicBool::new(true),
            dropout_seed: AtomicU64::new(EVAL),
        }))
    }

    /// Whether the adapters add their update (false inside a [`DisabledAdapters`] guard).
    pub fn is_enabled(&self) -> bool {
        self.0.enabled.load(Ordering::SeqCst)
    }

    /// Disables every adapter until the guard drops (guards nest; the state before the
    /// outermost one comes back).
    pub fn disable(&self) -> DisabledAdapters {
        let was = self.0.enabled.swap(false, Ordering::SeqCst);
        DisabledAdapters {
            switch: self.clone(),
            was,
        }
    }

    /// Training mode: LoRA dropout on, its masks drawn from `seed` (set a new seed for each
    /// micro-batch; a checkpointed recomputation reads the same seed and replays the masks).
    pub fn train(&self, seed: u64) {
        self.0
            .dropout_seed
            .store(if seed == EVAL { seed - 1 } else { seed }, Ordering::SeqCst);
    }

    /// Evaluation mode: no dropout.
    pub fn eval(&self) {
        self.0.dropout_seed.store(EVAL, Ordering::SeqCst);
    }

    /// The dropout seed of the current step, None in evaluation mode.
    pub fn dropout_seed(&self) -> Option<u64> {
        let seed = self.0.dropout_seed.load(Ordering::SeqCst);
        (seed != EVAL).then_some(seed)
    }
}

/// While alive, the adapters of a switch are off. See [`AdapterSwitch::disable`].
#[must_use = "the adapters are re-enabled when this guard drops"]
pub struct DisabledAdapters {
    switch: AdapterSwitch,
    was: bool,
}

impl Drop for DisabledAdapters {
    fn drop(&mut self) {
        self.switch.0.enabled.store(self.was, Ordering::SeqCst);
    }
}

/// FNV-1a of a module name: a stable per-module salt for dropout seeds.
fn name_salt(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The adapter of one linear layer (in -> out): A (r, in), B (out, r), both trainable
/// variables, and the output `scaling * B A dropout(x)` added to the frozen layer's.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// The module's full name (peft's key stem), e.g. `model.layers.0.self_attn.q_proj`.
    name: String,
    a: Tensor,
    b: Tensor,
    scaling: f32,
    dropout: f32,
    switch: AdapterSwitch,
}

impl LoraAdapter {
    /// A fresh adapter as peft initialises it: A kaiming-uniform (torch's `nn.Linear` init,
    /// U(-1/sqrt(in), 1/sqrt(in))) drawn from `seed`, B zero. On `device`, charged to the
    /// ledger's adapters category.
    pub fn new(
        name: &str,
        in_features: usize,
        out_features: usize,
        config: &LoraConfig,
        switch: &AdapterSwitch,
        seed: u64,
        device: &Device,
    ) -> Result<LoraAdapter> {
        config.validate()?;
        // A rank above the layer's width adds nothing a full-rank update lacks, and a huge
        // one would only fail (or abort) allocating A and B.
        let width = in_features.min(out_features);
        if config.r > width {
            return Err(Error::Module {
                module: name.to_string(),
                detail: format!(
                    "LoRA rank r = {} exceeds the layer's width min(in {in_features}, out \
                     {out_features}) = {width}: give r in 1..={width}",
                    config.r
                ),
            });
        }
        let bound = 1.0 / (in_features.max(1) as f32).sqrt();
        let a = Tensor::rand_uniform(-bound, bound, &[config.r, in_features], seed, &Device::Cpu)?;
        let b = Tensor::zeros(&[out_features, config.r], &Device::Cpu)?;
        LoraAdapter::from_weights(name, a, b, config, switch, device)
    }

    /// An adapter from given A (r, in) and B (out, r) (a loaded adapter file), moved to
    /// `device` as trainable variables.
    pub fn from_weights(
        name: &str,
        a: Tensor,
        b: Tensor,
        config: &LoraConfig,
        switch: &AdapterSwitch,
        device: &Device,
    ) -> Result<LoraAdapter> {
        let module_error = |detail: String| Error::Module {
            module: name.to_string(),
            detail,
        };
        let (&[r, _], &[_, rb]) = (a.shape(), b.shape()) else {
            return Err(module_error(format!(
                "lora_A {:?} and lora_B {:?} must both be matrices",
                a.shape(),
                b.shape()
            )));
        };
        if r != config.r || rb != config.r {
            return Err(module_error(format!(
                "lora_A {:?} and lora_B {:?} do not have the config's rank r = {}",
                a.shape(),
                b.shape(),
                config.r
            )));
        }
        let to_variable = |t: Tensor| -> Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?
                .to_device_as(device, MemCategory::Adapters)?
                .into_variable())
        };
        Ok(LoraAdapter {
            name: name.to_string(),
            a: to_variable(a)?,
            b: to_variable(b)?,
            scaling: config.scaling() as f32,
            dropout: config.lora_dropout as f32,
            switch: switch.clone(),
        })
    }

    /// The adapted module's full name (`model.layers.0.self_attn.q_proj`); salts its dropout.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A (r, in).
    pub fn a(&self) -> &Tensor {
        &self.a
    }

    /// B (out, r).
    pub fn b(&self) -> &Tensor {
        &self.b
    }

    /// The adapted layer's input width: columns of A.
    pub fn in_features(&self) -> usize {
        self.a.shape()[1]
    }

    /// The adapted layer's output width: rows of B.
    pub fn out_features(&self) -> usize {
        self.b.shape()[0]
    }

    /// r: rows of A.
    pub fn rank(&self) -> usize {
        self.a.shape()[0]
    }

    /// The factor on `B A x`: alpha / r (alpha / sqrt(r) with rsLoRA).
    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// The switch this adapter obeys (shared with the other adapters of its model).
    pub fn switch(&self) -> &AdapterSwitch {
        &self.switch
    }

    /// The trainable tensors, A then B.
    pub fn parameters(&self) -> [&Tensor; 2] {
        [&self.a, &self.b]
    }

    /// Replaces A and B (after an optimizer step that produced new tensors, or a restore),
    /// keeping their shapes.
    pub fn set_weights(&mut self, a: Tensor, b: Tensor) -> Result<()> {
        if a.shape() != self.a.shape() || b.shape() != self.b.shape() {
            return Err(Error::Module {
                module: self.name.clone(),
                detail: format!(
                    "new A {:?} / B {:?} do not match {:?} / {:?}",
                    a.shape(),
                    b.shape(),
                    self.a.shape(),
                    self.b.shape()
                ),
            });
        }
        self.a = a;
        self.b = b;
        Ok(())
    }

    /// `scaling * B A dropout(x)` for x (..., in) -> (..., out), or None while the switch
    /// is off.
    pub fn delta(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.switch.is_enabled() {
            return Ok(None);
        }
        let x = match self.switch.dropout_seed() {
            Some(seed) if self.dropout > 0.0 => {
                x.dropout(self.dropout, seed ^ name_salt(&self.name))?
            }
            _ => x.clone(),
        };
        let down = x.matmul_t(&self.a, false, true)?; // (..., r)
        let up = down.matmul_t(&self.b, false, true)?; // (..., out)
        Ok(Some(up.affine(self.scaling, 0.0)?))
    }

    /// `scaling * B A` (out, in): what merging adds to the base weight.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let _no_grad = lathe_core::no_grad();
        Ok(self.b.matmul(&self.a)?.affine(self.scaling, 0.0)?)
    }
}
