//! The adapter check that `cargo xtask test` runs before the tests.

use anyhow::{bail, Result};
use lathe_shaders::{AdapterChoice, AdapterReport, GpuContext};

/// What to do when there is no adapter: the GPU tests need one and must not skip.
pub const INSTALL_HINT: &str = "\
lathe's GPU tests need a Vulkan adapter and never skip, but none could be opened.
Install a Vulkan driver; without a GPU the software one (lavapipe) is enough:
    Debian/Ubuntu:  apt-get install -y mesa-vulkan-drivers
    Fedora:         dnf install -y mesa-vulkan-drivers
then run `cargo xtask test` again.";

/// Opens a GPU context (hardware first, software accepted) and returns its report.
pub fn require_adapter() -> Result<AdapterReport> {
    match GpuContext::new(AdapterChoice::any()) {
        Ok(ctx) => Ok(ctx.report().clone()),
        Err(e) => bail!("no usable GPU adapter: {e}\n\n{INSTALL_HINT}"),
    }
}
