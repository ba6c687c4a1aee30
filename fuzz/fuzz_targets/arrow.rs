//! Arrow IPC (streams as HF datasets writes them, and files) and Parquet bytes through
//! lathe-data's readers (`read_texts`, `read_labelled`, `read_preferences`,
//! `read_messages`). The first byte picks the extension (`.arrow`, `.feather`, `.parquet`);
//! the rest is the file. Seeds: `fuzz/make_seeds.sh` (reward/tests/fixtures/tiny.arrow and
//! data/tests/fixtures/*).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let name = match pick % 3 {
        0 => "data.arrow",
        1 => "data.feather",
        _ => "data.parquet",
    };
    let path = lathe_fuzz::write_file(name, bytes);
    let _ = lathe_data::read_texts(&path, "text");
    let _ = lathe_data::read_labelled(&path, "text", "label");
    let _ = lathe_data::read_preferences(&path, "prompt", "chosen", "rejected");
    let _ = lathe_data::read_messages(&path, "messages");
    // The reward crate's rules on top (binary labels).
    let _ = lathe_reward::data::load(&path);
});
