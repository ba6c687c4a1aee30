//! `--config FILE.toml` of the training commands (`read_toml` into each command's settings,
//! then their checks).
#![no_main]

use lathe_cli::config_file::read_toml;
use lathe_cli::commands::ppo::PpoFile;
use lathe_cli::commands::reward::{RewardSettings, RewardTrainSettings};
use lathe_cli::commands::sft::{SftConfig, SftSettings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = lathe_fuzz::write_file("config.toml", data);
    if let Ok(s) = read_toml::<SftSettings>(&path, "SFT config") {
        let mut c = SftConfig::default();
        s.apply_to(&mut c);
        let _ = c.validate();
    }
    if let Ok(c) = read_toml::<PpoFile>(&path, "PPO config") {
        let _ = c.validate();
    }
    if let Ok(s) = read_toml::<RewardSettings>(&path, "reward-train config") {
        let mut c = RewardTrainSettings::default();
        s.apply_to(&mut c);
        let _ = lathe_cli::commands::reward::train_config(&c);
    }
});
