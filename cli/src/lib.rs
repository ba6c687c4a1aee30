//! lathe-cli: the `lathe` binary's commands, as a library so tests drive them directly.
//! Each command (`commands/`, one file each) parses its flags (and `--config FILE.toml`,
//! the one settings pattern of `config_file.rs`), builds the settings and calls the library
//! crates; what is the binary's own:
//! - `commands/pipeline.rs`, the main job: reward model, SFT, merge, PPO, report, stage folders under
//!   `--out`; a stage is skipped only when its `<stage>.stage.json` record matches the
//!   settings and input fingerprints and its outputs parse.
//! - `model_args.rs`: the flags for loading a model and the memory preflight every training
//!   and generation command runs before loading (`commands/plan.rs` is `lathe plan`).
//! - `output.rs`: outputs written through temp files (a regular `--out` replaced by rename,
//!   a symlink written through, a FIFO or character device streamed into, a directory
//!   refused up front; whole output folders built in a temporary sibling).
//! - `parallel.rs`: the MPI job a process is a rank of (feature `mpi`, started by `mpirun`;
//!   `sft`, `reward-train` and `ppo` are data parallel, the other commands refuse several ranks).
//! - `reward_glue.rs` (the reward model as PPO's `Reward`), `texts.rs`, `progress.rs`,
//!   `report.rs` and `plot.rs` (the run report and its plots), `commands/device_check.rs` (`lathe device-check`).

pub mod chat;
pub mod commands;
pub mod config_file;
pub mod device;
pub mod model_args;
pub mod output;
pub mod parallel;
pub mod plot;
pub mod progress;
pub mod report;
pub mod resume;
pub mod reward_glue;
pub mod run_files;
pub mod texts;
