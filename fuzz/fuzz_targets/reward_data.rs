//! Labelled reward data as JSON or JSONL (`lathe_reward::data::load`; the first byte picks
//! the extension, the rest is the file).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let name = if pick & 1 == 0 {
        "data.json"
    } else {
        "data.jsonl"
    };
    let path = lathe_fuzz::write_file(name, body);
    let _ = lathe_reward::data::load(&path);
});
