//! lathe-tests: the cross-crate conformance suite (the design card's `tests`). Per-crate
//! unit and golden tests stay in their crates; what lives here checks several crates at once
//! against references nobody here wrote:
//! - `tests/peft_lora.rs`: LoRA on GPT-NeoX, Llama and Qwen2 (lathe-lora inside
//!   lathe-models' linears) against peft's logits, gradients, merged weights and files.
//!
//! This library holds only the fixture paths the tests share.

use std::path::PathBuf;

/// The workspace root (fixtures live under each crate's `tests/fixtures`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// `crate/tests/fixtures/<rest>` of a workspace crate.
pub fn fixture(krate: &str, rest: &str) -> PathBuf {
    workspace_root()
        .join(krate)
        .join("tests/fixtures")
        .join(rest)
}
