//! lathe-cli: the `lathe` binary's commands, as a library so tests drive them directly.

pub mod config_file;
pub mod device;
pub mod device_check;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod model_args;
pub mod output;
pub mod pipeline;
pub mod plan_cmd;
pub mod png;
pub mod ppo_cmd;
pub mod progress;
pub mod report;
pub mod resume;
pub mod reward_cmd;
pub mod reward_glue;
pub mod run_files;
pub mod sft;
pub mod texts;
