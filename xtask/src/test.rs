//! `cargo xtask test`: the adapter check, then `cargo test --workspace` (with
//! `lathe-cli/mpi`, and so the data-parallel tests under `mpirun`, when Open MPI is
//! installed), then the release checks: the documentation builds without a warning and every
//! publishable crate packages and compiles from its package (default features: no MPI).

use std::process::{Command, ExitCode, ExitStatus};

use anyhow::{Context, Result};

use crate::probe;

/// Runs the adapter probe, then the workspace tests with inherited stdio, then (for the
/// whole workspace only) the release checks: [`doc`], then the packaging check
/// ([`crate::package`]); returns the first failing cargo's exit status. The test profile of
/// the root Cargo.toml already optimises, so no --release. A package selection among the
/// extra args (`-p NAME`) replaces `--workspace`, which would otherwise win over it, and
/// skips the release checks.
pub fn run(extra: &[String]) -> Result<ExitCode> {
    let status = run_tests(extra)?;
    if !status.success() || scope(extra).is_none() {
        return Ok(exit_code(status));
    }
    release_checks()
}

/// Whether Open MPI is installed with what building against it needs (`mpirun`, and
/// `mpicc` from the development package): then the workspace is tested with the `mpi`
/// feature, `cli/tests/mpi.rs` included. Without it the default build is tested, which
/// needs no MPI.
fn open_mpi_installed() -> bool {
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    runs("mpirun", "--version") && runs("mpicc", "--showme:version")
}

/// The docs, then the packaging check: what a user of the published crates gets.
pub fn release_checks() -> Result<ExitCode> {
    let status = doc()?;
    if !status.success() {
        return Ok(exit_code(status));
    }
    Ok(exit_code(crate::package::run()?))
}

/// `cargo doc --workspace --no-deps` with every rustdoc warning an error: broken or private
/// intra-doc links, bare URLs, stray HTML in doc comments.
fn doc() -> Result<ExitStatus> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    eprintln!("xtask: running `RUSTDOCFLAGS=\"-D warnings\" cargo doc --workspace --no-deps`");
    let started = std::time::Instant::now();
    let status = Command::new(&cargo)
        .current_dir(crate::workspace_root())
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings")
        .status()
        .with_context(|| format!("could not start `{cargo} doc`"))?;
    eprintln!(
        "xtask: `cargo doc` took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(status)
}

/// A child's exit status as ours.
fn exit_code(status: ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // Killed by a signal: still a failure.
        None => ExitCode::FAILURE,
    }
}

/// The adapter probe and `cargo test`.
fn run_tests(extra: &[String]) -> Result<ExitStatus> {
    let report = probe::require_adapter()?;
    eprintln!("xtask: GPU adapter: {report}");
    require_chromium()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let features: &[&str] = if scope(extra).is_some() && open_mpi_installed() {
        &["--features", "lathe-cli/mpi"]
    } else {
        if scope(extra).is_some() {
            eprintln!(
                "xtask: no Open MPI here: the data-parallel tests (cli/tests/mpi.rs) do not \
                 run; `apt-get install -y openmpi-bin libopenmpi-dev libclang-dev` adds them"
            );
        }
        &[]
    };
    let mut command = Command::new(&cargo);
    command
        .current_dir(crate::workspace_root())
        .arg("test")
        .args(scope(extra))
        .args(features)
        .args(extra)
        .env("RUST_BACKTRACE", "1");
    let shown: Vec<&str> = std::iter::once("test")
        .chain(scope(extra))
        .chain(features.iter().copied())
        .chain(extra.iter().map(String::as_str))
        .collect();
    eprintln!(
        "xtask: running `cargo {}` (RUST_BACKTRACE=1)",
        shown.join(" ")
    );
    let status = command
        .status()
        .with_context(|| format!("could not start `{cargo} test`"))?;
    Ok(status)
}

/// The PPO report test renders the report in a real headless browser: say so up front
/// rather than after the build.
fn require_chromium() -> Result<()> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .any(|p| std::path::Path::new(p).is_file());
    if !found {
        anyhow::bail!(
            "no chromium: the PPO report test renders report.html in Debian's headless \
             chromium. Install it with `apt-get install -y chromium` (as root)."
        );
    }
    Ok(())
}

/// `--workspace` unless the cargo args (those before `--`) already pick packages.
fn scope(extra: &[String]) -> Option<&'static str> {
    let picks_packages = extra
        .iter()
        .take_while(|a| a.as_str() != "--")
        .any(|a| a == "-p" || a.starts_with("--package") || (a.starts_with("-p") && a.len() > 2));
    (!picks_packages).then_some("--workspace")
}

#[cfg(test)]
mod tests {
    use super::scope;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn whole_workspace_unless_a_package_is_picked() {
        assert_eq!(scope(&[]), Some("--workspace"));
        assert_eq!(scope(&args(&["--", "-p"])), Some("--workspace"));
        assert_eq!(scope(&args(&["-p", "lathe-core"])), None);
        assert_eq!(scope(&args(&["--package=xtask"])), None);
        assert_eq!(scope(&args(&["-pxtask"])), None);
    }
}
