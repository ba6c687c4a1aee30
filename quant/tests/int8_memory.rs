//! The GPU ledger charges an int8 weight about one byte per parameter. Alone in its test
//! binary so no other test allocates weights on the shared device meanwhile.

use lathe_core::testing::test_gpu;
use lathe_core::{MemCategory, Tensor};
use lathe_quant::Int8Weight;

#[test]
fn int8_weight_costs_at_most_1_01_bytes_per_parameter() {
    let device = test_gpu();
    let ctx = device.gpu_context().unwrap().clone();
    // SmolLM2's shapes too. (Rows are padded to whole u32 words: an `in` that is not a
    // multiple of 4 costs up to 3 more bytes per row; model widths are multiples of 64.)
    for (out, inn) in [
        (256, 512),
        (384, 1024),
        (64, 2048),
        (1536, 576),
        (576, 1536),
        (333, 516),
    ] {
        let w = Tensor::randn(&[out, inn], 3, &device).unwrap();
        let before = ctx.ledger().current(MemCategory::Weights);
        let q = Int8Weight::quantize(&w).unwrap();
        ctx.sync().unwrap();
        let charged = ctx.ledger().current(MemCategory::Weights) - before;
        let per_param = charged as f64 / (out * inn) as f64;
        println!("({out}, {inn}): {charged} bytes in the ledger, {per_param:.4} bytes/parameter ({} logical)", q.bytes());
        assert!(per_param <= 1.01, "{per_param}");
        drop(q);
        assert_eq!(ctx.ledger().current(MemCategory::Weights), before);
    }
}
