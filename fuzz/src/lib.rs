//! Helpers shared by the fuzz targets: the parsers that take a path get the fuzzer's bytes
//! through a file in a per-process scratch directory (libFuzzer runs one input at a time
//! per process, so one directory per process is never shared).

use std::path::PathBuf;

/// A scratch directory of this process, created on first use.
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
    dir
}

/// Writes `bytes` to `name` in the scratch directory and returns its path.
pub fn write_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, bytes).expect("write a fuzz input file");
    path
}

/// Splits `data` in two at a length read from its first two bytes (little-endian), for
/// targets that take two files: the split point is itself fuzzed.
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    rest.split_at(n.min(rest.len()))
}
