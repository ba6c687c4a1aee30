//! `--config FILE.toml` for the training commands (`sft`, `reward-train`, `ppo`): reading
//! the file, and laying the flags the user typed on top of it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// The settings in the TOML file at `path`; `what` names them in the error ("SFT config").
pub fn read_toml<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: not a valid {what}", path.display()))
}

/// Whether the flag `id` was typed on the command line (a default does not count; without
/// `matches` nothing was typed).
pub fn given_on_command_line(matches: Option<&clap::ArgMatches>, id: &str) -> bool {
    matches.is_some_and(|m| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
}

/// `flags_win!(matches, file, flags, field, ...)`: for each field whose flag (of the same
/// name) was typed on the command line, `file.field = flags.field.clone()`.
macro_rules! flags_win {
    ($matches:expr, $file:ident, $flags:ident, $($field:ident),* $(,)?) => {
        $(if $crate::config_file::given_on_command_line($matches, stringify!($field)) {
            $file.$field = $flags.$field.clone();
        })*
    };
}
pub(crate) use flags_win;
