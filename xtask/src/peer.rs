//! The Python peer: `scripts/peer_matmul.py` timing torch.matmul (or numpy.matmul) on the
//! same problem with the same thread count, so lathe's figures have a yardstick.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The virtualenv that developers set up for the peer (see the README of `cargo xtask bench`).
const DEFAULT_VENV_PYTHON: &str = "/tmp/venv/bin/python";

/// What the peer script printed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerResult {
    /// "torch" or "numpy".
    pub library: String,
    pub version: String,
    pub threads: usize,
    pub best_s: f64,
    pub median_s: f64,
    pub gflops: f64,
    /// threadpoolctl's view of the BLAS in use (kernel architecture, threads), when installed.
    #[serde(default)]
    pub blas: Option<serde_json::Value>,
    #[serde(default)]
    pub python: String,
    /// The interpreter that ran the script (filled in here, not by the script).
    #[serde(default)]
    pub interpreter: String,
}

impl PeerResult {
    /// A one-line description of the BLAS kernel, e.g. "openblas 0.3.27 SkylakeX, 2 threads".
    pub fn blas_summary(&self) -> Option<String> {
        let libs = self.blas.as_ref()?.as_array()?;
        let parts: Vec<String> = libs
            .iter()
            .map(|lib| {
                let field = |k: &str| {
                    lib.get(k)
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                        .unwrap_or_default()
                };
                format!(
                    "{} {} {}, {} threads",
                    field("internal_api"),
                    field("version"),
                    field("architecture"),
                    field("num_threads")
                )
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Which interpreter to use: `LATHE_PEER_PYTHON` when set, else the default virtualenv
/// when it exists; `None` when neither.
pub fn find_python() -> Option<PathBuf> {
    match std::env::var_os("LATHE_PEER_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            let default = PathBuf::from(DEFAULT_VENV_PYTHON);
            default.exists().then_some(default)
        }
    }
}

/// Runs the peer script. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed for this command
/// only: some machines set them for old OpenBLAS builds, and they push a current numpy onto a
/// slower kernel. The thread count is pinned through the usual env vars as well as inside the
/// script.
pub fn measure(python: &PathBuf, size: usize, threads: usize) -> Result<PeerResult> {
    let script = crate::workspace_root().join("scripts/peer_matmul.py");
    let threads_s = threads.to_string();
    let output = Command::new(python)
        .arg(&script)
        .args(["--size", &size.to_string(), "--threads", &threads_s])
        .env_remove("OPENBLAS_CORETYPE")
        .env_remove("OPENBLAS_L2_SIZE")
        .env("OMP_NUM_THREADS", &threads_s)
        .env("OPENBLAS_NUM_THREADS", &threads_s)
        .env("MKL_NUM_THREADS", &threads_s)
        .output()
        .with_context(|| format!("could not start {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    let Some(line) = line else {
        bail!(
            "{} {} printed no JSON (exit {:?}): {}",
            python.display(),
            script.display(),
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    };
    let value: serde_json::Value =
        serde_json::from_str(line).context("peer script printed invalid JSON")?;
    if let Some(error) = value.get("error") {
        bail!(
            "{}: {}",
            python.display(),
            error.as_str().unwrap_or_default()
        );
    }
    let mut result: PeerResult =
        serde_json::from_value(value).context("peer script's JSON lacks a field")?;
    result.interpreter = python.display().to_string();
    Ok(result)
}

/// The JSON a peer printed, or `{"skipped": why}` when there is no `python` for it
/// (`missing` says which) or it failed: a section reports without its peer rather than fail.
pub fn or_skipped(
    python: Option<&std::path::Path>,
    missing: &str,
    run: impl FnOnce(&std::path::Path) -> Result<serde_json::Value>,
) -> serde_json::Value {
    match python {
        None => serde_json::json!({ "skipped": missing }),
        Some(python) => run(python)
            .unwrap_or_else(|e| serde_json::json!({ "skipped": format!("peer failed: {e:#}") })),
    }
}

/// Runs `scripts/<script>` with `python` and `args` on `threads` threads and returns the JSON
/// object it prints last (the peers of the generation, SFT, PPO and scoring sections).
pub fn run_script(
    python: &std::path::Path,
    script: &str,
    args: &[std::ffi::OsString],
    threads: usize,
) -> Result<serde_json::Value> {
    let script = crate::workspace_root().join("scripts").join(script);
    eprintln!("  peer: {} {}", python.display(), script.display());
    let threads_s = threads.to_string();
    let output = Command::new(python)
        .arg(&script)
        .args(args)
        .env("OMP_NUM_THREADS", &threads_s)
        .env("MKL_NUM_THREADS", &threads_s)
        .output()
        .with_context(|| format!("could not start {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(line) = stdout.lines().rev().find(|l| l.starts_with('{')) else {
        bail!(
            "{} printed no JSON (exit {:?}): {}",
            script.display(),
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    };
    Ok(serde_json::from_str(line)?)
}

/// `--name value` pairs as a peer script's arguments.
pub fn flags(pairs: &[(&str, String)]) -> Vec<std::ffi::OsString> {
    pairs
        .iter()
        .flat_map(|(name, value)| [format!("--{name}").into(), value.into()])
        .collect()
}

/// One line on a trl peer's result: "peer{what}: trl V {trainer}, peft V, transformers V
/// (torch V), N threads: best s/step (median m{extra}), peak RSS P MiB", or what it said when
/// it was skipped.
pub fn describe_trl(peer: &serde_json::Value, trainer: &str, what: &str, extra: &str) -> String {
    if peer.get("best_s").is_none() {
        return format!("peer{what}: {peer}");
    }
    let text = |key: &str| peer[key].as_str().unwrap_or("?").to_string();
    let number = |key: &str| peer[key].as_f64().unwrap_or(f64::NAN);
    format!(
        "peer{what}: trl {} {trainer}, peft {}, transformers {} (torch {}), {} threads: {:.3} s/step (median {:.3}{extra}), peak RSS {:.0} MiB",
        text("trl"),
        text("peft"),
        text("version"),
        text("torch"),
        peer["threads"],
        number("best_s"),
        number("median_s"),
        number("peak_rss_process_mib")
    )
}

/// "yes" or "no", for the tables.
pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_scripts_json_and_summarises_blas() {
        let line = r#"{"library": "numpy", "version": "2.1.3", "threads": 2, "best_s": 0.005,
            "median_s": 0.006, "blas": [{"internal_api": "openblas", "version": "0.3.27",
            "architecture": "SkylakeX", "num_threads": 2, "threading_layer": "pthreads"}],
            "size": [1024, 1024, 1024], "gflops": 429.5, "python": "3.11.7"}"#;
        let result: PeerResult = serde_json::from_str(line).unwrap();
        assert_eq!(result.library, "numpy");
        assert_eq!(
            result.blas_summary().unwrap(),
            "openblas 0.3.27 SkylakeX, 2 threads"
        );
    }
}
