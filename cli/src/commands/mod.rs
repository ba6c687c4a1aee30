//! One file per `lathe` subcommand: its flags and its `run`.

pub mod device_check;
pub mod dpo;
pub mod eval;
pub mod generate;
pub mod grpo;
pub mod merge;
pub mod pipeline;
pub mod plan;
pub mod ppo;
pub mod reward;
pub mod sft;
