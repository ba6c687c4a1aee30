//! Files a training run keeps in its folder, shared by `lathe sft` and `lathe ppo`: the
//! library's (`lathe_train::run_dir`), and the error of a run stopped by Ctrl-C.

pub use lathe_train::run_dir::*;

/// The error a training command returns when Ctrl-C stopped it after saving a checkpoint:
/// `main` prints it and exits with 130 (as a shell reports SIGINT), so a caller can tell an
/// interrupted run from a finished one.
#[derive(Debug)]
pub struct Interrupted {
    pub command: &'static str,
    pub step: usize,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: interrupted; saved a checkpoint at step {} (rerun the same command to resume)",
            self.command, self.step
        )
    }
}

impl std::error::Error for Interrupted {}
