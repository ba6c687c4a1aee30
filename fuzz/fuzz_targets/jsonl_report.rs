//! The JSONL logs of a run folder: `parse_jsonl`, and `lathe report` over a folder whose
//! `metrics.jsonl` and `samples.jsonl` are the fuzzer's (split at a fuzzed length).
#![no_main]

use lathe_cli::run_files::parse_jsonl;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (metrics, samples) = lathe_fuzz::split2(data);
    if let Ok(text) = std::str::from_utf8(metrics) {
        let _ = parse_jsonl(text);
    }
    lathe_fuzz::write_file("metrics.jsonl", metrics);
    lathe_fuzz::write_file("samples.jsonl", samples);
    let _ = lathe_cli::report::write_report(&lathe_fuzz::scratch_dir());
});
