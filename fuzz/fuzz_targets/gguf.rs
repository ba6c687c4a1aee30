//! GGUF: header, metadata and tensor infos (`GgufFile::from_bytes`), then everything built
//! from them: every tensor dequantized, the Llama config and the tokenizer.
#![no_main]

use lathe_models::gguf::GgufFile;
use lathe_models::gguf_model::llama_config_from_gguf;
use lathe_models::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    let names: Vec<String> = file.tensor_infos().iter().map(|t| t.name.clone()).collect();
    for name in &names {
        let _ = file.tensor_f32(name);
    }
    let _ = llama_config_from_gguf(&file);
    if let Ok(tokenizer) = Tokenizer::from_gguf(&file) {
        if let Ok(ids) = tokenizer.encode("Hello world 123", true) {
            let _ = tokenizer.decode(&ids, true);
        }
    }
});
