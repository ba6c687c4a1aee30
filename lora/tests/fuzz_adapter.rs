//! Bounded fuzzing in CI of peft adapter directories (`adapter_config.json` through
//! `LoraConfig::from_json`, and the whole directory through `load_adapter`): random bytes
//! and structured mutations of the fixture adapter (truncation, flipped bytes, config fields
//! replaced by out-of-range values, tensor names and shapes rewritten). Every input must
//! give `Ok` or `Err`, never a panic, and one load may allocate at most
//! `lathe_core::testing::parse_alloc_bound(both files' length)` (16 MiB + 64 x the input)
//! on the calling thread. `cargo +nightly fuzz run adapter` (fuzz/) runs it unbounded.

use std::path::PathBuf;

use lathe_core::testing::{parse_alloc_bound, peak_alloc_during, CountingAlloc};
use lathe_core::Device;
use lathe_lora::peft::{load_adapter, CONFIG_FILE, WEIGHTS_FILE};
use lathe_lora::LoraConfig;
use proptest::prelude::*;
use serde_json::Value;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/llama/adapter")
            .join(name),
    )
    .unwrap()
}

/// `load_adapter` of a directory (of this test thread) holding `config` and `weights`,
/// under the bound; whether it loaded.
fn load(config: &[u8], weights: &[u8]) -> Result<bool, TestCaseError> {
    let dir = std::env::temp_dir().join(format!(
        "lathe-fuzz-adapter-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), config).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE), weights).unwrap();
    let len = config.len() + weights.len();
    let (loaded, peak) = peak_alloc_during(|| {
        if let Ok(text) = std::str::from_utf8(config) {
            if let Ok(c) = LoraConfig::from_json(text) {
                let _ = c.matches("model.layers.0.self_attn.q_proj");
            }
        }
        load_adapter(&dir, &Device::Cpu).is_ok()
    });
    let bound = parse_alloc_bound(len);
    prop_assert!(
        peak <= bound,
        "adapter of {len} bytes allocated {peak} > {bound}"
    );
    Ok(loaded)
}

fn odd_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!(-0.5)),
        Just(serde_json::json!("LORA")),
        Just(serde_json::json!("(?:q_proj|)")),
        Just(serde_json::json!([])),
        Just(serde_json::json!(["", "."])),
        Just(serde_json::json!({"x": 1})),
        Just(serde_json::json!(true)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(config in prop::collection::vec(any::<u8>(), 0..128),
                    weights in prop::collection::vec(any::<u8>(), 0..128)) {
        load(&config, &weights)?;
        load(&fixture(CONFIG_FILE), &weights)?;
    }

    #[test]
    fn config_odd_values(edits in prop::collection::vec((any::<prop::sample::Index>(), odd_json()), 1..4)) {
        let mut value: Value = serde_json::from_slice(&fixture(CONFIG_FILE)).unwrap();
        let map = value.as_object_mut().unwrap();
        for (at, v) in edits {
            let key = map.keys().nth(at.index(map.len())).unwrap().clone();
            map.insert(key, v);
        }
        load(value.to_string().as_bytes(), &fixture(WEIGHTS_FILE))?;
    }

    #[test]
    fn weights_truncated_and_flipped(cut in any::<prop::sample::Index>(),
                                     flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..5)) {
        let config = fixture(CONFIG_FILE);
        let weights = fixture(WEIGHTS_FILE);
        prop_assert!(!load(&config, &weights[..cut.index(weights.len())])?, "truncated weights loaded");
        let mut flipped = weights;
        for (at, xor) in flips {
            let i = at.index(flipped.len());
            flipped[i] ^= xor;
        }
        load(&config, &flipped)?;
    }

    #[test]
    fn weights_with_odd_names_and_shapes(
        name in prop::sample::select(vec![
            "base_model.model.x.lora_A.weight", "base_model.model.x.lora_B.weight",
            "base_model.model..lora_A.weight", "base_model.model.lora_A.weight", "x", "",
        ]),
        dims in prop::collection::vec(prop_oneof![0usize..4, Just(1usize << 60)], 0..4),
        dtype in prop::sample::select(vec!["F32", "F16", "BF16", "U32", "I8", "F64"]),
    ) {
        let shape = dims.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let header = format!(r#"{{"{name}":{{"dtype":"{dtype}","shape":[{shape}],"data_offsets":[0,8]}}}}"#);
        let mut weights = (header.len() as u64).to_le_bytes().to_vec();
        weights.extend(header.as_bytes());
        weights.extend([0u8; 8]);
        load(&fixture(CONFIG_FILE), &weights)?;
    }
}

#[test]
fn the_mutated_adapter_is_valid() {
    assert!(load(&fixture(CONFIG_FILE), &fixture(WEIGHTS_FILE)).unwrap());
}
