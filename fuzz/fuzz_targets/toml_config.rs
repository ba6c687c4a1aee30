//! `--config FILE.toml` of the training commands (`read_toml` into each command's settings,
//! then their checks).
#![no_main]

use lathe_cli::config_file::read_toml;
use lathe_cli::ppo_cmd::PpoFile;
use lathe_cli::reward_cmd::RewardTrainSettings;
use lathe_cli::sft::SftConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = lathe_fuzz::write_file("config.toml", data);
    if let Ok(c) = read_toml::<SftConfig>(&path, "SFT config") {
        let _ = c.validate();
    }
    if let Ok(c) = read_toml::<PpoFile>(&path, "PPO config") {
        let _ = c.validate();
    }
    let _ = read_toml::<RewardTrainSettings>(&path, "reward-train config");
});
