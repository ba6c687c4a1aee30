//! The one settings pattern of the training commands (`sft`, `reward-train`, `ppo`): each
//! has a settings struct, written with `settings!`, that is both the flags (clap) and the
//! `--config FILE.toml` keys (serde). Every field is an `Option`: `None` means "not given",
//! so a file and the command line overlay without telling a typed value from a default
//! (`flags.over(file)`), and the defaults are written once, in the library's config type
//! that the settings are applied to.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// The settings in the TOML file at `path`; `what` names them in the error ("SFT config").
pub fn read_toml<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}: not a valid {what}", path.display()))
}

/// `settings! { /// doc  pub struct Name => Config { /// doc  field: Type, ... } }` defines `Name`
/// with every field an `Option<Type>` flag `--field` (doc comments are the help) and TOML
/// key `field` (unknown keys refused), and:
/// - `over(self, base)`: these settings where given, `base`'s elsewhere (flags over a file);
/// - `apply_to(&self, config: &mut Config)`: each given setting written into the field of
///   the same name of `config` (through `Into`, so a `T` fills an `Option<T>`), every other
///   field keeping `config`'s value, the default.
///
/// Extra clap attributes go on a field as usual: `#[arg(value_delimiter = ',')]`, and on a
/// `bool` `#[arg(num_args = 0..=1, default_missing_value = "true")]`, so that `--flag`
/// alone means true (`--flag false` turns it off).
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident => $config:ty {
            $( $(#[$field_meta:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(clap::Args, serde::Serialize, serde::Deserialize, Clone, Debug, Default, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                #[arg(long)]
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        impl $name {
            /// These settings where given, `base`'s elsewhere.
            pub fn over(self, base: $name) -> $name {
                $name { $( $field: self.$field.or(base.$field), )* }
            }

            /// Writes each given setting into `config`; the others keep its values.
            pub fn apply_to(&self, config: &mut $config) {
                $( if let Some(v) = &self.$field {
                    config.$field = v.clone().into();
                } )*
            }
        }
    };
}
pub(crate) use settings;

/// The defaults `config` holds, as the TOML lines of a `--config` file: what `--help`
/// shows after the flags, so the defaults are written in one place (the library's).
pub fn defaults_help<T: serde::Serialize>(config: &T) -> String {
    let text = toml::to_string(config).unwrap_or_default();
    format!(
        "Defaults (a --config file of these keys overrides them, flags override the file):\n{}",
        text.lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}
