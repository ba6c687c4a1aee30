//! `cargo xtask test`: the adapter check, then `cargo test --workspace`.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};

use crate::probe;

/// Runs the adapter probe, then the workspace tests with inherited stdio; returns cargo's
/// exit status. The test profile of the root Cargo.toml already optimises, so no --release.
pub fn run(extra: &[String]) -> Result<ExitCode> {
    let report = probe::require_adapter()?;
    eprintln!("xtask: GPU adapter: {report}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(&cargo);
    command
        .current_dir(crate::workspace_root())
        .args(["test", "--workspace"])
        .args(extra)
        .env("RUST_BACKTRACE", "1");
    eprintln!(
        "xtask: running `cargo test --workspace {}`",
        extra.join(" ")
    );
    let status = command
        .status()
        .with_context(|| format!("could not start `{cargo} test`"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // Killed by a signal: still a failure.
        None => ExitCode::FAILURE,
    })
}
