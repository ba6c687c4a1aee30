//! Turning `--device` into a [`Device`], with no silent fallback.

use anyhow::{bail, Result};
use lathe_core::Device;
use lathe_shaders::AdapterChoice;

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The host CPU.
    Cpu,
    /// A GPU; fails when none is usable (a software adapter only with --allow-software-gpu).
    Gpu,
    /// A hardware GPU when one exists, else the CPU (says which it picked).
    Auto,
}

/// Opens the device. `gpu` never falls back to the CPU: it errors with the reason.
pub fn open(arg: DeviceArg, allow_software_gpu: bool) -> Result<Device> {
    let env = AdapterChoice::from_env()?;
    let choice = AdapterChoice {
        allow_software: allow_software_gpu || env.allow_software,
        // One rank per GPU: the ranks of a data-parallel job on one node take the node's
        // GPUs in turn, by local rank.
        index: crate::parallel::local_rank(),
        ..env
    };
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Gpu => match Device::gpu(choice) {
            Ok(device) => Ok(device),
            Err(e) => bail!("--device gpu: {e}"),
        },
        DeviceArg::Auto => match Device::gpu(choice) {
            Ok(device) => Ok(device),
            Err(e) => {
                eprintln!("no usable GPU ({e}); running on the CPU");
                Ok(Device::Cpu)
            }
        },
    }
}
