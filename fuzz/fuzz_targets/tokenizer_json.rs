//! tokenizer.json (`Tokenizer::from_file`); an accepted tokenizer encodes and decodes a text.
#![no_main]

use lathe_models::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = lathe_fuzz::write_file("tokenizer.json", data);
    if let Ok(tokenizer) = Tokenizer::from_file(&path) {
        if let Ok(ids) = tokenizer.encode("Hello world, 123 héllo", true) {
            let _ = tokenizer.decode(&ids, false);
        }
    }
});
