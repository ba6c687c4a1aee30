//! config.json: the decoder configs (`ModelConfig::from_json_str`, with everything a loader
//! asks of an accepted one) and the reward encoders' (`EncoderConfig::from_dir`).
#![no_main]

use lathe_models::config::ModelConfig;
use lathe_reward::EncoderConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = ModelConfig::from_json_str(text, "config.json") {
            let _ = config.load_warning("config.json");
            let _ = config.bnb_int8();
            let _ = config.eos_token_ids();
            // What lathe writes back must read back as the same model.
            let written = config.to_json_string().expect("an accepted config writes");
            let again = ModelConfig::from_json_str(&written, "written config.json")
                .expect("a written config reads back");
            assert_eq!(again.to_json_string().unwrap(), written);
        }
    }
    lathe_fuzz::write_file("config.json", data);
    let _ = EncoderConfig::from_dir(&lathe_fuzz::scratch_dir());
});
