//! Helpers shared by the CLI's integration tests: fixture paths, scratch folders, running the
//! `lathe` binary and snapshotting an output folder. (Each test binary uses some of them.)
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The tiny Llama GGUF model the CLI tests run.
pub fn fixture_model() -> PathBuf {
    repo("models/tests/fixtures/gguf_model_tied.gguf")
}

/// A fresh, empty folder `lathe-<prefix>-<pid>-<name>` in the temp dir.
pub fn scratch_in(prefix: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every file under `dir` (relative path -> bytes; folders as `<dir>`); empty when `dir`
/// does not exist.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let key = path.strip_prefix(root).unwrap().to_path_buf();
            if path.is_dir() {
                out.insert(key, b"<dir>".to_vec());
                walk(root, &path, out);
            } else {
                out.insert(key, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Runs the `lathe` binary built for these tests.
pub fn lathe(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(args)
        .output()
        .unwrap()
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn path(p: &Path) -> String {
    p.display().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
