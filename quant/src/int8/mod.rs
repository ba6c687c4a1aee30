//! LLM.int8() (in progress).

/// Placeholder until the int8 weight lands.
pub struct Int8Weight;
/// Placeholder until the int8 linear lands.
pub struct Int8Linear;
