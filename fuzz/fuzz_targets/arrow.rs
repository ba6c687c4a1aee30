//! Arrow IPC streams of labelled text (`lathe_reward::data::load` of a `.arrow` file, which
//! reads the columns and then checks the labels).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = lathe_fuzz::write_file("data.arrow", data);
    let _ = lathe_reward::data::load(&path);
});
