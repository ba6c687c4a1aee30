//! peft adapter directories: `adapter_config.json` (`LoraConfig::from_json`) and
//! `adapter_model.safetensors`, read together by `load_adapter`. The input is split in two
//! at a fuzzed length (see `lathe_fuzz::split2`).
#![no_main]

use lathe_core::Device;
use lathe_lora::peft::{load_adapter, CONFIG_FILE, WEIGHTS_FILE};
use lathe_lora::LoraConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (config, weights) = lathe_fuzz::split2(data);
    if let Ok(text) = std::str::from_utf8(config) {
        if let Ok(c) = LoraConfig::from_json(text) {
            let _ = c.scaling();
            let _ = c.matches("model.layers.0.self_attn.q_proj");
            let _ = c.to_json();
        }
    }
    lathe_fuzz::write_file(CONFIG_FILE, config);
    lathe_fuzz::write_file(WEIGHTS_FILE, weights);
    let _ = load_adapter(&lathe_fuzz::scratch_dir(), &Device::Cpu);
});
