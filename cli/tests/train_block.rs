//! The tiny attention block trains to the same losses on the CPU and the GPU, and learns.

use lathe_cli::commands::device_check::{train, DeviceCheckConfig};
use lathe_core::testing::{assert_close, test_gpu, Tolerance};
use lathe_core::Device;

#[test]
fn attention_block_reaches_the_same_loss_on_cpu_and_gpu() {
    let config = DeviceCheckConfig {
        steps: 12,
        ..DeviceCheckConfig::default()
    };
    let cpu = train(&config, &Device::Cpu).unwrap();
    let gpu = train(&config, &test_gpu()).unwrap();
    // f32 on two devices with different summation orders: the curves drift apart slowly.
    assert_close(&gpu, &cpu, Tolerance::new(2e-3, 2e-3));
    assert!(
        cpu[config.steps - 1] < 0.5 * cpu[0],
        "loss did not fall: {cpu:?}"
    );
}
