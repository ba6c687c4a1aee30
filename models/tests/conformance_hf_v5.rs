//! Configs in transformers 5.x's layout, and the checks every config.json goes through.
//!
//! Goldens: the tiny random models of scripts/golden_config_v5.py (transformers 5.25.0),
//! saved with their rotary settings only in `rope_parameters` (GPT-NeoX partial_rotary_factor
//! 0.5 and Llama rope_theta 50000, neither a default), give transformers' logits and hidden
//! states on the CPU and the GPU; the same directory with `rope_parameters` removed (what a
//! reader that ignores it would see) gives other logits, so the goldens can fail.
//!
//! Checks: both layouts present and disagreeing, scaled RoPE, out-of-range numbers and sizes
//! are errors naming the key and the valid range; unknown keys and unapplied dropouts are
//! listed, not errors; a config written back keeps what was read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lathe_core::testing::{compare, test_gpu, Tolerance};
use lathe_core::{Device, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::config::{GptNeoxConfig, LlamaConfig, ModelConfig};
use lathe_models::hf::load_hf_dir;
use serde_json::{json, Value};

const GPT_NEOX_V5: [&str; 2] = ["neox_parallel_half_v5", "neox_sequential_half_v5"];
const LLAMA_V5: [&str; 1] = ["llama_gqa_v5"];
/// The 4.46.3 fixtures of scripts/golden_models.py.
const V4_FIXTURES: [&str; 5] = [
    "neox_parallel_quarter_gelu",
    "neox_sequential_full_gelu_fast",
    "neox_parallel_full_gelu_new",
    "neox_sequential_quarter_gelu",
    "llama_gqa_tied",
];

/// transformers' logits and ours, f32 both: the sums run in different orders.
const GOLDEN: Tolerance = Tolerance::new(1e-4, 1e-4);
/// The least max |diff| from the golden logits the model read without its rope_parameters
/// must show (measured: 0.03 for the Llama, whose theta changes little over 7 positions, and
/// 0.7 to 0.9 for the GPT-NeoX models).
const ROPE_IGNORED_DIFFERS_BY: f32 = 1e-2;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn config_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_dir(name).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn parse(config: &Value) -> lathe_models::Result<ModelConfig> {
    ModelConfig::from_json_str(&config.to_string(), "config.json")
}

#[track_caller]
fn parse_err(config: &Value) -> String {
    match parse(config) {
        Ok(_) => panic!("accepted {config}"),
        Err(e) => e.to_string(),
    }
}

/// `base` with `edit` applied to its object.
fn edited(base: &Value, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut v = base.clone();
    edit(v.as_object_mut().unwrap());
    v
}

fn with(base: &Value, key: &str, value: Value) -> Value {
    edited(base, |m| {
        m.insert(key.to_string(), value);
    })
}

#[track_caller]
fn assert_contains(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "{text:?} does not contain {n:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Goldens.

struct Golden(HashMap<String, Tensor>);

impl Golden {
    fn load(name: &str) -> Golden {
        let path = fixture_dir(name).join("golden.safetensors");
        let tensors = lathe_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .collect();
        Golden(tensors)
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.0[name].to_vec_f32().unwrap()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The logits and last hidden states of the model in `dir` on the golden's input ids.
fn run(dir: &Path, golden: &Golden, device: &Device) -> (Vec<f32>, Vec<f32>) {
    let model = load_hf_dir(dir, device).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let ids = golden.0["input_ids"].to_device(device).unwrap();
    let (b, t) = (ids.shape()[0], ids.shape()[1]);
    let layout = TokenLayout::contiguous(b, t, 0, device).unwrap();
    let logits = model.forward(&ids, &layout, None).unwrap();
    assert_eq!(logits.shape(), [b, t, model.config().vocab_size()]);
    let hidden = model.forward_hidden(&ids, &layout, None).unwrap();
    (logits.to_vec_f32().unwrap(), hidden.to_vec_f32().unwrap())
}

fn matches_transformers_v5(name: &str, device: &Device) {
    let golden = Golden::load(name);
    let (logits, hidden) = run(&fixture_dir(name), &golden, device);
    for (what, got, want) in [
        ("logits", logits, golden.f32s("logits")),
        ("hidden", hidden, golden.f32s("hidden")),
    ] {
        let label = format!("{name} on {}: {what}", device.name());
        eprintln!("{label}: max |diff| {:.3e}", max_abs_diff(&got, &want));
        if let Err(m) = compare(&got, &want, GOLDEN) {
            panic!("{label}: {m}");
        }
    }
}

#[test]
fn v5_models_match_transformers_5_cpu() {
    for name in GPT_NEOX_V5.iter().chain(&LLAMA_V5) {
        matches_transformers_v5(name, &Device::Cpu);
    }
}

#[test]
fn v5_models_match_transformers_5_gpu() {
    let gpu = test_gpu();
    for name in GPT_NEOX_V5.iter().chain(&LLAMA_V5) {
        matches_transformers_v5(name, &gpu);
    }
}

/// A fresh scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    /// A copy of a fixture directory (files only) with `config` as its config.json.
    fn with_config(fixture: &str, config: &Value) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("lathe-models-v5-{}-{fixture}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixture_dir(fixture)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the goldens guard against: the same weights with the rotary settings of
/// rope_parameters lost (transformers' defaults instead: GPT-NeoX rotary_pct 0.25 and base
/// 10000, Llama theta 10000) give logits far outside the tolerance.
#[test]
fn v5_models_read_without_rope_parameters_differ() {
    for name in GPT_NEOX_V5.iter().chain(&LLAMA_V5) {
        let golden = Golden::load(name);
        let config = edited(&config_json(name), |m| {
            m.remove("rope_parameters").unwrap();
        });
        let scratch = Scratch::with_config(name, &config);
        let (logits, _) = run(&scratch.0, &golden, &Device::Cpu);
        let diff = max_abs_diff(&logits, &golden.f32s("logits"));
        eprintln!("{name} without rope_parameters: max |diff| {diff:.3e}");
        assert!(
            diff > ROPE_IGNORED_DIFFERS_BY,
            "{name}: ignoring rope_parameters changes the logits by only {diff}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The 5.x layout read, and written back.

#[test]
fn v5_configs_read_rope_parameters() {
    for name in GPT_NEOX_V5 {
        let Some(c) = parse(&config_json(name))
            .unwrap()
            .downcast_ref::<GptNeoxConfig>()
            .cloned()
        else {
            panic!("{name}: not gpt_neox")
        };
        assert_eq!((c.rotary_pct, c.rotary_emb_base), (0.5, 50000.0), "{name}");
        assert_eq!(c.rotary_ndims(), 4, "{name}");
    }
    let Some(c) = parse(&config_json("llama_gqa_v5"))
        .unwrap()
        .downcast_ref::<LlamaConfig>()
        .cloned()
    else {
        panic!("not llama")
    };
    assert_eq!((c.rope_theta, c.kv_heads(), c.head_dim()), (50000.0, 2, 4));
}

#[test]
fn every_key_of_the_fixtures_is_known() {
    for name in GPT_NEOX_V5.iter().chain(&LLAMA_V5).chain(&V4_FIXTURES) {
        let config = parse(&config_json(name)).unwrap();
        assert_eq!(config.unknown_keys(), Vec::<String>::new(), "{name}");
        assert_eq!(config.unapplied_settings(), Vec::<String>::new(), "{name}");
        assert_eq!(config.load_warning("config.json"), None, "{name}");
    }
}

/// Written back, a 5.x config keeps rope_parameters (and every other key) and gains the
/// 4.46 keys with the same values, so both transformers versions read the same model.
#[test]
fn v5_configs_written_back_keep_what_was_read() {
    for name in GPT_NEOX_V5.iter().chain(&LLAMA_V5) {
        let original = config_json(name);
        let config = parse(&original).unwrap();
        let text = config.to_json_string().unwrap();
        let written: Value = serde_json::from_str(&text).unwrap();
        for (key, value) in original.as_object().unwrap() {
            assert_eq!(&written[key], value, "{name}: {key}");
        }
        let again = ModelConfig::from_json_str(&text, "written").unwrap();
        assert_eq!(again.to_json_string().unwrap(), text, "{name}");
    }
    let written: Value = serde_json::from_str(
        &parse(&config_json("neox_parallel_half_v5"))
            .unwrap()
            .to_json_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&written["rotary_pct"], &written["rotary_emb_base"]),
        (&json!(0.5), &json!(50000.0))
    );
}

/// A value changed after reading is written to both layouts.
#[test]
fn a_changed_rope_value_is_written_to_both_layouts() {
    let Some(mut c) = parse(&config_json("llama_gqa_v5"))
        .unwrap()
        .downcast_ref::<LlamaConfig>()
        .cloned()
    else {
        panic!()
    };
    c.rope_theta = 123.0;
    let text = ModelConfig::new(c).to_json_string().unwrap();
    let written: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(written["rope_theta"], json!(123.0));
    assert_eq!(written["rope_parameters"]["rope_theta"], json!(123.0));
    let Some(mut c) = parse(&config_json("neox_parallel_quarter_gelu"))
        .unwrap()
        .downcast_ref::<GptNeoxConfig>()
        .cloned()
    else {
        panic!()
    };
    c.rotary_pct = 1.0;
    let written: Value =
        serde_json::from_str(&ModelConfig::new(c).to_json_string().unwrap()).unwrap();
    // 4.46 wrote the mirror partial_rotary_factor too; it follows.
    assert_eq!(
        (&written["rotary_pct"], &written["partial_rotary_factor"]),
        (&json!(1.0), &json!(1.0))
    );
    ModelConfig::from_json_str(&written.to_string(), "written").unwrap();
}

// ---------------------------------------------------------------------------------------
// Both layouts disagreeing; RoPE kinds lathe does not implement.

#[test]
fn both_layouts_disagreeing_are_refused() {
    let neox = config_json("neox_parallel_half_v5");
    let err = parse_err(&with(&neox, "rotary_emb_base", json!(10000)));
    assert_contains(
        &err,
        &[
            "config.json",
            "rope_parameters.rope_theta 50000 disagrees with rotary_emb_base 10000",
            "make them agree",
        ],
    );
    let err = parse_err(&with(&neox, "rotary_pct", json!(0.25)));
    assert_contains(
        &err,
        &["rope_parameters.partial_rotary_factor 0.5 disagrees with rotary_pct 0.25"],
    );
    // Agreeing values in both layouts are fine.
    let both = with(
        &with(&neox, "rotary_pct", json!(0.5)),
        "rotary_emb_base",
        json!(50000),
    );
    parse(&both).unwrap();
    // gpt_neox's top-level rope_theta / partial_rotary_factor are read by no transformers
    // version: disagreeing with what is used, they are refused.
    let v4 = config_json("neox_parallel_quarter_gelu");
    let err = parse_err(&with(&v4, "rope_theta", json!(50000)));
    assert_contains(
        &err,
        &["gpt_neox: rope_theta 50000 disagrees with rotary_emb_base 10000"],
    );
    let err = parse_err(&with(&v4, "partial_rotary_factor", json!(0.5)));
    assert_contains(
        &err,
        &["partial_rotary_factor 0.5 disagrees with rotary_pct 0.25"],
    );

    let llama = config_json("llama_gqa_v5");
    let err = parse_err(&with(&llama, "rope_theta", json!(10000.0)));
    assert_contains(
        &err,
        &["llama: rope_parameters.rope_theta 50000 disagrees with rope_theta 10000"],
    );
    parse(&with(&llama, "rope_theta", json!(50000))).unwrap();
}

#[test]
fn scaled_rope_is_refused_in_either_layout() {
    let llama = config_json("llama_gqa_v5");
    for (params, kind) in [
        (
            json!({"rope_type": "linear", "rope_theta": 50000.0, "factor": 2.0}),
            "\"linear\"",
        ),
        (
            json!({"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}),
            "\"llama3\"",
        ),
        (json!({"type": "yarn", "rope_theta": 50000.0}), "\"yarn\""),
    ] {
        let err = parse_err(&with(&llama, "rope_parameters", params));
        assert_contains(
            &err,
            &[
                "rope_parameters.rope_type",
                kind,
                "not supported",
                "\"default\"",
            ],
        );
    }
    let err = parse_err(&with(
        &llama,
        "rope_parameters",
        json!({"rope_type": "default", "type": "dynamic"}),
    ));
    assert_contains(
        &err,
        &["rope_type \"default\"", "type \"dynamic\"", "disagree"],
    );
    let err = parse_err(&with(
        &llama,
        "rope_parameters",
        json!({"full_attention": {"rope_type": "default"}}),
    ));
    assert_contains(&err, &["rope_parameters.full_attention", "per-layer-type"]);
    let err = parse_err(&with(&llama, "rope_parameters", json!(3)));
    assert_contains(&err, &["rope_parameters 3 is not an object"]);
    let err = parse_err(&with(
        &llama,
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": "big"}),
    ));
    assert_contains(&err, &["rope_theta \"big\" is not a number"]);
    // 4.46's rope_scaling.
    let err = parse_err(&with(
        &config_json("neox_parallel_half_v5"),
        "rope_scaling",
        json!({"type": "dynamic", "factor": 2.0}),
    ));
    assert_contains(&err, &["gpt_neox: rope_scaling", "not supported"]);
}

#[test]
fn partial_rotary_in_llama_is_refused() {
    let llama = config_json("llama_gqa_v5");
    let err = parse_err(&with(
        &llama,
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5}),
    ));
    assert_contains(
        &err,
        &[
            "llama: rope_parameters.partial_rotary_factor 0.5 is not supported",
            "whole head_dim",
        ],
    );
    let err = parse_err(&with(&llama, "partial_rotary_factor", json!(0.25)));
    assert_contains(
        &err,
        &["llama: partial_rotary_factor 0.25 is not supported"],
    );
    parse(&with(&llama, "partial_rotary_factor", json!(1.0))).unwrap();
}

// ---------------------------------------------------------------------------------------
// Numbers against their meaning.

#[test]
fn norm_eps_must_be_positive_and_finite() {
    let neox = config_json("neox_parallel_half_v5");
    for bad in [json!(-1e-5), json!(0.0)] {
        let err = parse_err(&with(&neox, "layer_norm_eps", bad));
        assert_contains(
            &err,
            &[
                "gpt_neox: layer_norm_eps",
                "out of range",
                "finite number > 0",
            ],
        );
    }
    let llama = config_json("llama_gqa_v5");
    for bad in [json!(-1e-6), json!(0)] {
        let err = parse_err(&with(&llama, "rms_norm_eps", bad));
        assert_contains(
            &err,
            &["llama: rms_norm_eps", "out of range", "finite number > 0"],
        );
    }
    // NaN cannot be written in JSON; a config built in code (or from GGUF) can hold it.
    let Some(mut c) = parse(&llama)
        .unwrap()
        .downcast_ref::<LlamaConfig>()
        .cloned()
    else {
        panic!()
    };
    c.rms_norm_eps = f64::NAN;
    let err = c.validate().unwrap_err().to_string();
    assert_contains(
        &err,
        &["rms_norm_eps NaN is out of range: must be a finite number > 0"],
    );
}

#[test]
fn rope_base_must_be_positive_and_finite() {
    let v4 = config_json("neox_sequential_quarter_gelu");
    for bad in [json!(0), json!(-10000.0)] {
        let err = parse_err(&edited(&v4, |m| {
            m.insert("rotary_emb_base".into(), bad.clone());
            m.insert("rope_theta".into(), bad.clone());
        }));
        assert_contains(
            &err,
            &[
                "gpt_neox: rotary_emb_base",
                "out of range: must be a finite number > 0",
            ],
        );
    }
    let err = parse_err(&with(
        &config_json("neox_parallel_half_v5"),
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 0, "partial_rotary_factor": 0.5}),
    ));
    assert_contains(&err, &["rotary_emb_base 0 is out of range"]);
    let err = parse_err(&with(
        &config_json("llama_gqa_v5"),
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": -1.0}),
    ));
    assert_contains(
        &err,
        &["llama: rope_theta -1 is out of range: must be a finite number > 0"],
    );
    let Some(mut c) = parse(&v4).unwrap().downcast_ref::<GptNeoxConfig>().cloned() else {
        panic!()
    };
    c.rotary_emb_base = f64::NAN;
    c.extra.remove("rope_theta");
    let err = c.validate().unwrap_err().to_string();
    assert_contains(&err, &["rotary_emb_base NaN is out of range"]);
}

#[test]
fn rotary_fraction_must_be_in_0_1() {
    let v4 = config_json("neox_sequential_quarter_gelu");
    for bad in [json!(0.0), json!(1.5), json!(-0.25)] {
        let err = parse_err(&edited(&v4, |m| {
            m.insert("rotary_pct".into(), bad.clone());
            m.remove("partial_rotary_factor");
        }));
        assert_contains(
            &err,
            &[
                "gpt_neox: rotary_pct (partial_rotary_factor)",
                "out of range",
                "(0, 1]",
            ],
        );
    }
    let err = parse_err(&with(
        &config_json("neox_parallel_half_v5"),
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 2.0}),
    ));
    assert_contains(
        &err,
        &["rotary_pct (partial_rotary_factor) 2 is out of range"],
    );
}

#[test]
fn sizes_must_divide_and_be_positive() {
    let neox = config_json("neox_parallel_half_v5");
    let err = parse_err(&with(&neox, "num_attention_heads", json!(3)));
    assert_contains(
        &err,
        &["gpt_neox: hidden_size 16 is not a multiple of num_attention_heads 3"],
    );
    for key in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
    ] {
        let err = parse_err(&with(&neox, key, json!(0)));
        assert_contains(&err, &[&format!("gpt_neox: {key} must be positive")]);
    }
    let err = parse_err(&with(&neox, "hidden_size", json!(-16)));
    assert_contains(&err, &["config.json", "gpt_neox config", "-16"]);
    let llama = config_json("llama_gqa_v5");
    let err = parse_err(&with(&llama, "num_key_value_heads", json!(3)));
    assert_contains(
        &err,
        &["llama: num_attention_heads 4 is not a multiple of num_key_value_heads 3"],
    );
    let err = parse_err(&with(&llama, "num_key_value_heads", json!(0)));
    assert_contains(&err, &["llama: num_key_value_heads must be positive"]);
    let err = parse_err(&with(&llama, "head_dim", json!(5)));
    assert_contains(&err, &["llama: head_dim 5 must be even and positive"]);
}

#[test]
fn sizes_whose_products_overflow_are_refused() {
    let huge = json!(u64::MAX / 2);
    let err = parse_err(&with(
        &config_json("neox_parallel_half_v5"),
        "vocab_size",
        huge.clone(),
    ));
    assert_contains(
        &err,
        &[
            "gpt_neox: sizes out of range",
            "vocab_size 9223372036854775807 * hidden_size 16",
            "too large",
        ],
    );
    let err = parse_err(&with(
        &config_json("llama_gqa_v5"),
        "intermediate_size",
        huge,
    ));
    assert_contains(&err, &["llama: sizes out of range", "intermediate_size"]);
    // Each product fits, the f32 bytes do not.
    let err = parse_err(&with(
        &config_json("neox_parallel_half_v5"),
        "vocab_size",
        json!(1u64 << 58),
    ));
    assert_contains(
        &err,
        &["gpt_neox: sizes out of range", "weights is too large"],
    );
    let err = parse_err(&with(
        &config_json("llama_gqa_v5"),
        "max_position_embeddings",
        json!(u64::MAX / 4),
    ));
    assert_contains(&err, &["max_position_embeddings", "too large"]);
}

// ---------------------------------------------------------------------------------------
// Keys lathe does not know; dropouts it does not apply.

#[test]
fn unknown_keys_are_listed_once_not_refused() {
    let neox = edited(&config_json("neox_parallel_half_v5"), |m| {
        m.insert("sliding_window".into(), json!(16));
        m.insert("attn_logit_softcapping".into(), json!(30.0));
        m["rope_parameters"]
            .as_object_mut()
            .unwrap()
            .insert("original_max_position_embeddings".into(), json!(32));
    });
    let config = parse(&neox).unwrap();
    assert_eq!(
        config.unknown_keys(),
        [
            "attn_logit_softcapping",
            "rope_parameters.original_max_position_embeddings",
            "sliding_window"
        ]
    );
    let warning = config.load_warning("dir/config.json").unwrap();
    assert_eq!(warning.lines().count(), 1, "{warning}");
    assert_contains(
        &warning,
        &[
            "dir/config.json",
            "keys lathe does not know, ignored: attn_logit_softcapping, rope_parameters.original_max_position_embeddings, sliding_window",
        ],
    );
    // Written back, unknown keys are kept.
    let written: Value = serde_json::from_str(&config.to_json_string().unwrap()).unwrap();
    assert_eq!(written["sliding_window"], json!(16));
    // nanotron's rope_interleaved is harmless only as false.
    let llama = config_json("llama_gqa_v5");
    assert!(parse(&with(&llama, "rope_interleaved", json!(false)))
        .unwrap()
        .unknown_keys()
        .is_empty());
    assert_eq!(
        parse(&with(&llama, "rope_interleaved", json!(true)))
            .unwrap()
            .unknown_keys(),
        ["rope_interleaved"]
    );
}

#[test]
fn nonzero_dropouts_are_reported_as_not_applied() {
    let neox = edited(&config_json("neox_parallel_half_v5"), |m| {
        m.insert("attention_dropout".into(), json!(0.1));
        m.insert("hidden_dropout".into(), json!(0.0));
        m.insert("classifier_dropout".into(), json!(0.3));
    });
    let config = parse(&neox).unwrap();
    assert!(config.unknown_keys().is_empty());
    assert_eq!(config.unapplied_settings(), ["attention_dropout 0.1"]);
    let warning = config.load_warning("config.json").unwrap();
    assert_contains(
        &warning,
        &[
            "not applied",
            "without its own dropout",
            "attention_dropout 0.1",
        ],
    );
    assert!(!warning.contains("keys lathe does not know"), "{warning}");
}
