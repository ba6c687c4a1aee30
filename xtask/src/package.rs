//! The packaging check of `cargo xtask test` (and `cargo xtask package`): every publishable
//! crate packaged as crates.io would receive it, then the packaged sources compiled together.
//!
//! `cargo package --workspace` verifies each tarball by building it alone, in its own build
//! folder with cargo's default dev profile: on CI's 2-core machine that rebuilt every
//! dependency unoptimized and took far longer than the rest of the check. This check
//! packages with `--no-verify`, unpacks the tarballs side by side into one workspace under
//! `<target>/package-check/` whose `[patch.crates-io]` points each internal dependency at
//! its unpacked tarball, and runs `cargo check` there with the root's profiles and lock file
//! and the root's target folder, so the dependencies `cargo doc` already checked are
//! reused. It fails where verification would on the crates' own code: a file included from
//! outside a crate's folder or left out of its package, an internal dependency without a
//! version, a manifest crates.io would refuse (cargo package's own checks). It also unpacks
//! afresh on every run, where verification (cargo 1.95) unpacks the tarballs of its local
//! overlay under `$CARGO_HOME/registry/src/` once and then keeps building those sources: a
//! second `cargo package --workspace` in one CARGO_HOME verified a dependent crate against
//! the first run's sources of lathe-models.

use std::fs;
use std::path::Path;
use std::process::{Command, ExitStatus};

use anyhow::{bail, Context, Result};

/// Packages, unpacks and checks; the first failing cargo's status, or success.
pub fn run() -> Result<ExitStatus> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let root = crate::workspace_root();
    let target = crate::target_dir();
    let crates = publishable(&cargo, root)?;

    let mut package = Command::new(&cargo);
    package
        .current_dir(root)
        .args(["package", "--no-verify", "--allow-dirty"]);
    for (name, _) in &crates {
        package.args(["-p", name]);
    }
    let status = run_shown(&mut package)?;
    if !status.success() {
        return Ok(status);
    }

    let dir = target.join("package-check");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut members = Vec::new();
    let mut patch = toml::Table::new();
    for (name, version) in &crates {
        let folder = format!("{name}-{version}");
        let tarball = target.join("package").join(format!("{folder}.crate"));
        let file =
            fs::File::open(&tarball).with_context(|| format!("opening {}", tarball.display()))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        // cargo package stamps every file with one fixed date: kept, a rerun's changed
        // sources would look older than the last check's outputs, and cargo would not
        // check them again.
        archive.set_preserve_mtime(false);
        archive
            .unpack(&dir)
            .with_context(|| format!("unpacking {}", tarball.display()))?;
        if !dir.join(&folder).join("Cargo.toml").is_file() {
            bail!("{} holds no {folder}/Cargo.toml", tarball.display());
        }
        let mut path = toml::Table::new();
        path.insert("path".into(), folder.clone().into());
        patch.insert(name.clone(), path.into());
        members.push(toml::Value::from(folder));
    }
    fs::write(dir.join("Cargo.toml"), manifest(root, members, patch)?)
        .context("writing the package-check manifest")?;
    fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).context("copying Cargo.lock")?;

    let mut check = Command::new(&cargo);
    check
        .current_dir(&dir)
        .args(["check", "--workspace"])
        .env("CARGO_TARGET_DIR", &target);
    run_shown(&mut check)
}

/// The workspace's members that may be published (`publish` not `false`), with versions.
fn publishable(cargo: &str, root: &Path) -> Result<Vec<(String, String)>> {
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("could not start `cargo metadata`")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading cargo metadata's output")?;
    let packages = metadata["packages"]
        .as_array()
        .context("cargo metadata lists no packages")?;
    let mut crates = Vec::new();
    for package in packages {
        // `publish = false` is an empty registry list; absent is null (any registry).
        let publish = &package["publish"];
        if publish.as_array().is_some_and(|list| list.is_empty()) {
            continue;
        }
        let field = |key: &str| {
            package[key]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("a package without a {key} in cargo metadata"))
        };
        crates.push((field("name")?, field("version")?));
    }
    if crates.is_empty() {
        bail!("no publishable crate in the workspace");
    }
    Ok(crates)
}

/// The package-check workspace: the unpacked crates as members, each internal dependency
/// patched to its unpacked folder, the root manifest's profiles (so that the dependencies'
/// builds match the root's and are reused).
fn manifest(root: &Path, members: Vec<toml::Value>, patch: toml::Table) -> Result<String> {
    let text = fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    let root_manifest: toml::Table = text.parse().context("parsing Cargo.toml")?;
    let resolver = root_manifest
        .get("workspace")
        .and_then(|w| w.get("resolver"))
        .cloned()
        .unwrap_or_else(|| "2".into());
    let mut workspace = toml::Table::new();
    workspace.insert("resolver".into(), resolver);
    workspace.insert("members".into(), members.into());
    let mut patches = toml::Table::new();
    patches.insert("crates-io".into(), patch.into());
    let mut out = toml::Table::new();
    out.insert("workspace".into(), workspace.into());
    out.insert("patch".into(), patches.into());
    if let Some(profile) = root_manifest.get("profile") {
        out.insert("profile".into(), profile.clone());
    }
    Ok(format!(
        "# Written by `cargo xtask package` (xtask/src/package.rs); rewritten on every run.\n{}",
        toml::to_string(&out).context("writing the package-check manifest")?
    ))
}

/// Runs a cargo command with inherited stdio, saying what and how long.
fn run_shown(command: &mut Command) -> Result<ExitStatus> {
    let shown: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let shown = format!("cargo {}", shown.join(" "));
    eprintln!("xtask: running `{shown}`");
    let started = std::time::Instant::now();
    let status = command
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    eprintln!(
        "xtask: `{shown}` took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(status)
}
