//! Text files of `--texts` (`read_texts`: plain lines, JSONL or JSON by extension; the first
//! byte picks it).
#![no_main]

use lathe_cli::texts::read_texts;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let name = ["texts.txt", "texts.json", "texts.jsonl"][pick as usize % 3];
    let path = lathe_fuzz::write_file(name, body);
    let _ = read_texts(&path, "text");
});
