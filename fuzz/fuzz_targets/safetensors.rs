//! safetensors: the whole-buffer parse (`load_bytes`) and the streaming reader
//! (`SafetensorsFile::open`, then every tensor read), on the CPU.
#![no_main]

use lathe_core::safetensors::{load_bytes, SafetensorsFile};
use lathe_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = load_bytes(data, &Device::Cpu);
    let path = lathe_fuzz::write_file("model.safetensors", data);
    if let Ok(file) = SafetensorsFile::open(&path) {
        let names: Vec<String> = file.names().map(str::to_string).collect();
        for name in names {
            let _ = file.info(&name);
            let _ = file.read_bytes(&name);
            let _ = file.read(&name, &Device::Cpu);
        }
    }
});
