//! lathe-cli: the `lathe` binary's commands, as a library so tests drive them directly.

pub mod demo;
pub mod device;
