//! The reward-training memory plan: exact parts against the tensors the encoder holds, the
//! estimated parts against hand-computed batches.

use std::path::PathBuf;

use lathe_core::Device;
use lathe_reward::plan::{encoder_parameters, training_plan, DataShape, Stored};
use lathe_reward::train::prepare;
use lathe_reward::{EncoderConfig, Example, LoraSettings, RewardModel, TrainConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

const CPU_F32: Stored = Stored {
    elem_bytes: 4,
    on_gpu: false,
};

#[test]
fn planned_weights_are_the_tensors_the_encoder_holds() {
    for name in ["tiny_bert", "tiny_distilbert"] {
        let model = RewardModel::load(fixture(name), &Device::Cpu).unwrap();
        let held: usize = model
            .encoder()
            .named_tensors()
            .unwrap()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(encoder_parameters(model.config()) as usize, held, "{name}");
    }
}

#[test]
fn plan_of_hand_computed_batches() {
    // tiny_bert: H 32, F 64, 4 heads, 2 layers, 24 positions, vocab 165, 2 token types.
    let c = EncoderConfig::from_dir(&fixture("tiny_bert")).unwrap();
    let data = DataShape {
        train_lengths: vec![3, 9, 5, 7],
        val_lengths: vec![4],
        test_lengths: vec![],
        text_bytes: 100,
    };
    let head_only = training_plan(&c, &TrainConfig::default(), &data, CPU_F32);
    // Weights: embeddings (165 + 24 + 2) x 32 + 64; per block 4 x (32x32 + 32) +
    // (32x64 + 64) + (64x32 + 32) + 4 x 32 = 8544; 4 bytes each.
    assert_eq!(head_only.weights, 4 * ((165 + 24 + 2) * 32 + 64 + 2 * 8544));
    assert_eq!(
        head_only.loading, 0,
        "an f32 file is read straight into place"
    );
    // The pooled states of all four texts in one batch padded to 9 tokens, per token
    // 9 H + 2 F + heads x T = 288 + 128 + 36 floats.
    assert_eq!(head_only.activations, 4 * 4 * 9 * (288 + 128 + 36));
    // Head (2 x 32 + 2) and its best copy; gradients and two moments.
    assert_eq!(head_only.adapters, 4 * 2 * 66);
    assert_eq!(head_only.optimizer, 4 * 3 * 66);
    // Texts twice, 32 bytes per example twice, ids (28 tokens), 24 bytes a row, states.
    assert_eq!(
        head_only.data,
        2 * 100 + 2 * 5 * 32 + 28 * 4 + 5 * 24 + 5 * 32 * 4
    );
    assert_eq!(head_only.scratch, 0);

    let lora = TrainConfig {
        lora: Some(LoraSettings {
            r: 2,
            batch_size: 3,
            ..LoraSettings::default()
        }),
        ..TrainConfig::default()
    };
    let with_lora = training_plan(&c, &lora, &data, CPU_F32);
    // query and value adapted in both blocks: r (32 + 32) each.
    let adapted = 4 * 2 * 64;
    assert_eq!(with_lora.adapters, 4 * 2 * (66 + adapted));
    assert_eq!(with_lora.optimizer, 4 * 3 * (66 + adapted));
    // Three texts padded to the longest (9); per token per block 18 H + 4 F + 3 heads T +
    // the two adapted layers' (32 + 2 + 32).
    let per_block = 18 * 32 + 4 * 64 + 3 * 4 * 9 + 2 * 66;
    assert_eq!(with_lora.activations, 4 * 3 * 9 * 2 * per_block);
    // Saving merges four 32 x 32 weights.
    assert_eq!(with_lora.scratch, 4 * 4 * 32 * 32);

    // A 16-bit file holds the word embedding's stored bytes while it is widened.
    let f16 = training_plan(
        &c,
        &lora,
        &data,
        Stored {
            elem_bytes: 2,
            on_gpu: false,
        },
    );
    assert_eq!(f16.loading, 2 * 165 * 32);
}

#[test]
fn prepared_data_plans_its_own_token_counts() {
    let examples: Vec<Example> = (0..20)
        .map(|i| Example {
            text: "good fun ".repeat(i % 5 + 1),
            label: (i % 2) as u32,
        })
        .collect();
    let config = TrainConfig::default();
    let prepared = prepare(fixture("tiny_bert"), &examples, &config).unwrap();
    let shape = prepared.data_shape(Vec::new());
    assert_eq!(shape.train_lengths.len() + shape.val_lengths.len(), 20);
    // Each text is [CLS] + words + [SEP], at most the 24 positions.
    let longest = shape
        .train_lengths
        .iter()
        .chain(&shape.val_lengths)
        .max()
        .copied();
    assert_eq!(longest, Some(12));
    assert_eq!(
        prepared.memory_plan(Vec::new(), CPU_F32),
        training_plan(prepared.encoder_config(), &config, &shape, CPU_F32)
    );
}

/// Sizes no machine holds plan as "more than any budget", never as a wrapped small number
/// (or an overflow panic).
#[test]
fn absurd_sizes_saturate_instead_of_wrapping() {
    let mut c = EncoderConfig::from_dir(&fixture("tiny_bert")).unwrap();
    c.hidden = 1 << 40;
    c.intermediate = 1 << 42;
    c.vocab_size = 1 << 40;
    let data = DataShape {
        train_lengths: vec![1 << 20; 4],
        val_lengths: vec![1 << 20],
        test_lengths: vec![],
        text_bytes: 100,
    };
    let lora = TrainConfig {
        lora: Some(LoraSettings::default()),
        ..TrainConfig::default()
    };
    let plan = training_plan(&c, &lora, &data, CPU_F32);
    assert_eq!(plan.weights, u64::MAX);
    assert_eq!(plan.total(), u64::MAX);
}
