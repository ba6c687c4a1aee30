//! bitsandbytes 8-bit checkpoints (transformers' `save_pretrained` of a model loaded with
//! `BitsAndBytesConfig(load_in_8bit=True)`): their int8 `weight` + `SCB` load straight into
//! `Int8Linear`, byte for byte, and the model's logits match bitsandbytes' own forward. The
//! fixtures and goldens come from scripts/golden_bnb_int8.py (real bitsandbytes 0.50.2 on the
//! CPU). Bad checkpoints (no SCB, SCB of the wrong shape or dtype, a tiled weight format, an
//! int8 weight without a quantization_config) and configs lathe cannot honour (4-bit, other
//! quantization methods, unknown keys) are errors naming the file and the tensor or key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lathe_core::safetensors::{SafetensorsFile, StoredDType};
use lathe_core::testing::test_gpu;
use lathe_core::{Device, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::config::ModelConfig;
use lathe_models::hf::{bnb_int8_note, load_hf_dir, load_hf_dir_with, CausalLm, LoadOptions};
use lathe_models::linear::{Linear, Precision};
use lathe_quant::Int8Variant;

const FIXTURES: [&str; 2] = ["neox_bnb8", "llama_bnb8"];

/// Largest |lathe - bnb| allowed on a logit (the logits are of order 1..5), bnb being the
/// golden's `logits`: bitsandbytes 0.50.2's own forward on the CPU. The loader gives the
/// stored int8 layers bnb's arithmetic ([`Int8Variant::Bitsandbytes`]: activations rounded
/// to f16 before quantizing, the row absmax over the non-outlier entries, bnb's dequant
/// constants, the outlier columns in f32), so the quantized activations and int32 sums are
/// bnb's exactly and what is left is f32 rounding in the rest of the model (attention,
/// norms, GEMM summation order, torch's addmm order on the outlier columns). Measured max
/// |lathe - bnb| (`cargo test -p lathe-models --test bnb_int8 -- --nocapture` prints them):
/// neox_bnb8 1.43e-6 on the CPU and 1.43e-6 on the GPU (lavapipe); llama_bnb8 2.26e-6 (CPU)
/// and 2.09e-6 (GPU). 1e-5 leaves 4x for other CPUs' and GPUs' f32 orders, and is 3000x
/// below the 3.3e-2 lathe's own variant is away on GPT-NeoX (3e4x the 0.33 on Llama).
const TOLERANCE: f32 = 1e-5;

/// Largest |lathe - reference| allowed when the same model's int8 layers are switched to
/// lathe's own arithmetic ([`Int8Variant::Lathe`]), the reference being the golden's
/// `logits_lathe_int8`: transformers' f32 model on the same stored CB/SCB with every
/// Linear8bitLt forward replaced by a pure-torch re-implementation of lathe's variant
/// (scripts/golden_bnb_int8.py, `lathe_int8_forward`). Measured 9.5e-7 (CPU) and 1.3e-6
/// (GPU, lavapipe) at most. Together with [`TOLERANCE`] this attributes the whole
/// difference between the two goldens (3.3e-2 for GPT-NeoX, 0.33 for Llama: single int8
/// steps that the planted outliers amplify) to the variants, none of it to the loader.
const LATHE_TOLERANCE: f32 = 1e-5;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// A fresh copy of a fixture directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(fixture: &str, tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("lathe-bnb-{}-{fixture}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixture_dir(fixture)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        Scratch(dir)
    }

    fn weights(&self) -> PathBuf {
        self.0.join("model.safetensors")
    }

    /// Edits config.json's JSON.
    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = self.0.join("config.json");
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut value);
        std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    }

    /// Rewrites model.safetensors after `edit` changed its (name, dtype, shape, bytes) list.
    fn edit_weights(&self, edit: impl FnOnce(&mut Vec<RawTensor>)) {
        let mut tensors = read_raw(&self.weights());
        edit(&mut tensors);
        write_raw(&self.weights(), &tensors);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One stored tensor: name, safetensors dtype string, shape, little-endian bytes.
type RawTensor = (String, String, Vec<usize>, Vec<u8>);

fn read_raw(path: &Path) -> Vec<RawTensor> {
    let file = SafetensorsFile::open(path).unwrap();
    let mut names: Vec<String> = file.names().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let (dtype, shape) = file.info(&name).unwrap();
            let dtype = format!("{dtype:?}");
            let shape = shape.to_vec();
            let bytes = file.read_bytes(&name).unwrap();
            (name, dtype, shape, bytes)
        })
        .collect()
}

/// A safetensors file of raw tensors (any dtype), as the format defines it.
fn write_raw(path: &Path, tensors: &[RawTensor]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape,
                               "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

/// A fixture's golden: input ids (B, T), bitsandbytes' logits (B, T, V) and the
/// re-implementation of lathe's int8 arithmetic's (see [`LATHE_TOLERANCE`]).
struct Golden {
    ids: Vec<u32>,
    shape: [usize; 2],
    bnb: Vec<f32>,
    lathe_int8: Vec<f32>,
}

fn golden(fixture: &str) -> Golden {
    let tensors: HashMap<String, Tensor> = lathe_core::safetensors::load(
        &fixture_dir(fixture).join("golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect();
    let ids = &tensors["input_ids"];
    Golden {
        ids: ids.to_vec_u32().unwrap(),
        shape: [ids.shape()[0], ids.shape()[1]],
        bnb: tensors["logits"].to_vec_f32().unwrap(),
        lathe_int8: tensors["logits_lathe_int8"].to_vec_f32().unwrap(),
    }
}

fn logits_of(model: &CausalLm, fixture: &str, device: &Device) -> Vec<f32> {
    let Golden {
        ids, shape: [b, t], ..
    } = golden(fixture);
    let ids = Tensor::from_vec(ids, &[b, t], device).unwrap();
    let layout = TokenLayout::contiguous(b, t, 0, device).unwrap();
    model
        .forward(&ids, &layout, None)
        .unwrap()
        .to_vec_f32()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load_err(dir: &Path) -> String {
    match load_hf_dir(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Checks lathe's logits on `device` against bitsandbytes' (as loaded) and, with the int8
/// layers switched to lathe's variant, against the re-implementation of lathe's variant;
/// returns both maxima.
fn check_logits(fixture: &str, device: &Device) -> (f32, f32) {
    let mut model = load_hf_dir(&fixture_dir(fixture), device).unwrap();
    let g = golden(fixture);
    let to_bnb = max_diff(&logits_of(&model, fixture, device), &g.bnb);
    for (name, linear) in model.linears_mut() {
        if let Linear::Int8(layer) = linear {
            assert_eq!(layer.variant, Int8Variant::Bitsandbytes, "{name}");
            layer.variant = Int8Variant::Lathe;
        }
    }
    let to_ref = max_diff(&logits_of(&model, fixture, device), &g.lathe_int8);
    let scale = g.bnb.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!(
        "{fixture} on {}: max |lathe - bnb| {to_bnb:e} (tolerance {TOLERANCE:e}); lathe's \
         variant: max |lathe - lathe-int8 reference| {to_ref:e}; max |logit| {scale}",
        device.name(),
    );
    assert!(to_bnb <= TOLERANCE, "{fixture}: {to_bnb} > {TOLERANCE}");
    assert!(
        to_ref <= LATHE_TOLERANCE,
        "{fixture}: {to_ref} > {LATHE_TOLERANCE}"
    );
    (to_bnb, to_ref)
}

#[test]
fn logits_match_bitsandbytes_on_the_cpu() {
    for fixture in FIXTURES {
        check_logits(fixture, &Device::Cpu);
    }
}

#[test]
fn logits_match_bitsandbytes_on_the_gpu() {
    let gpu = test_gpu();
    for fixture in FIXTURES {
        check_logits(fixture, &gpu);
    }
}

#[test]
fn int8_values_and_scales_are_the_stored_bytes() {
    for fixture in FIXTURES {
        let dir = fixture_dir(fixture);
        let model = load_hf_dir(&dir, &Device::Cpu).unwrap();
        let file = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
        let mut int8 = 0;
        for (name, linear) in model.linears() {
            let weight = format!("{name}.weight");
            match (file.info(&weight).unwrap().0, linear) {
                (StoredDType::I8, Linear::Int8(layer)) => {
                    let stored: Vec<i8> = file
                        .read_bytes(&weight)
                        .unwrap()
                        .into_iter()
                        .map(|b| b as i8)
                        .collect();
                    assert_eq!(layer.weight.values().unwrap(), stored, "{weight}");
                    let scales: Vec<u32> = layer
                        .weight
                        .scales()
                        .unwrap()
                        .iter()
                        .map(|s| s.to_bits())
                        .collect();
                    let stored: Vec<u32> = file
                        .read_bytes(&format!("{name}.SCB"))
                        .unwrap()
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    assert_eq!(scales, stored, "{name}.SCB");
                    assert_eq!(layer.threshold, 6.0);
                    assert_eq!(layer.variant, Int8Variant::Bitsandbytes, "{name}");
                    int8 += 1;
                }
                // llm_int8_skip_modules: the GPT-NeoX fixture keeps this one dense (f32).
                (StoredDType::F32, Linear::Dense { weight, .. }) => {
                    assert_eq!(name, "gpt_neox.layers.1.mlp.dense_4h_to_h");
                    assert_eq!(weight.dtype(), lathe_core::DType::F32);
                }
                (dtype, linear) => panic!("{name}: stored {dtype:?}, loaded {linear:?}"),
            }
        }
        let expected = if fixture == "neox_bnb8" { 7 } else { 14 };
        assert_eq!(int8, expected, "{fixture}");
    }
}

#[test]
fn the_checkpoint_decides_the_precision() {
    // --dtype f32 / f16 / int8 with another threshold: the block linears load int8 anyway,
    // with the checkpoint's threshold, and give the same logits; the note says so.
    let dir = fixture_dir("llama_bnb8");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(config.unknown_keys(), Vec::<String>::new());
    let reference = logits_of(
        &load_hf_dir(&dir, &Device::Cpu).unwrap(),
        "llama_bnb8",
        &Device::Cpu,
    );
    for precision in [
        Precision::F16,
        Precision::Int8 { threshold: 6.0 },
        Precision::Int8 { threshold: 3.0 },
    ] {
        let options = LoadOptions {
            precision,
            embeddings_f16: false,
        };
        let model = load_hf_dir_with(&dir, &Device::Cpu, options).unwrap();
        for (name, linear) in model.linears() {
            let Linear::Int8(layer) = linear else {
                panic!("{name} is not int8 under {precision:?}")
            };
            assert_eq!(layer.threshold, 6.0, "{name}");
            assert_eq!(layer.variant, Int8Variant::Bitsandbytes, "{name}");
        }
        let got = logits_of(&model, "llama_bnb8", &Device::Cpu);
        assert_eq!(got, reference, "{precision:?}");
        let note = bnb_int8_note(&config, &options).unwrap();
        match precision {
            Precision::Int8 { threshold: 6.0 } => assert_eq!(note, None),
            _ => assert!(
                note.unwrap().contains("bitsandbytes 8-bit"),
                "{precision:?}"
            ),
        }
    }
    // The skipped module follows the requested dense precision.
    let options = LoadOptions {
        precision: Precision::F16,
        embeddings_f16: false,
    };
    let model = load_hf_dir_with(&fixture_dir("neox_bnb8"), &Device::Cpu, options).unwrap();
    let (_, skipped) = model
        .linears()
        .into_iter()
        .find(|(n, _)| n == "gpt_neox.layers.1.mlp.dense_4h_to_h")
        .unwrap();
    let Linear::Dense { weight, .. } = skipped else {
        panic!("skipped module not dense")
    };
    assert_eq!(weight.dtype(), lathe_core::DType::F16);
}

#[test]
fn llm_int8_threshold_is_honoured() {
    let scratch = Scratch::copy_of("llama_bnb8", "threshold");
    scratch.edit_config(|c| c["quantization_config"]["llm_int8_threshold"] = 0.0.into());
    let model = load_hf_dir(&scratch.0, &Device::Cpu).unwrap();
    for (name, linear) in model.linears() {
        let Linear::Int8(layer) = linear else {
            panic!("{name} is not int8")
        };
        assert_eq!(layer.threshold, 0.0, "{name}");
    }
    // Without the outlier path the fixture's planted outliers are quantized with the rest.
    let got = logits_of(&model, "llama_bnb8", &Device::Cpu);
    assert!(max_diff(&got, &golden("llama_bnb8").bnb) > 100.0 * TOLERANCE);
}

#[test]
fn missing_or_misshapen_scb_is_an_error_naming_file_and_tensor() {
    let name = "model.layers.0.self_attn.q_proj";
    let scratch = Scratch::copy_of("llama_bnb8", "no-scb");
    scratch.edit_weights(|t| t.retain(|(n, ..)| n != &format!("{name}.SCB")));
    let err = load_err(&scratch.0);
    assert!(
        err.contains(&format!("{name}.SCB"))
            && err.contains(&format!("{name}.weight"))
            && err.contains("model.safetensors"),
        "{err}"
    );

    let scratch = Scratch::copy_of("llama_bnb8", "short-scb");
    scratch.edit_weights(|t| {
        let scb = t
            .iter_mut()
            .find(|(n, ..)| n == &format!("{name}.SCB"))
            .unwrap();
        scb.2 = vec![31];
        scb.3.truncate(31 * 4);
    });
    let err = load_err(&scratch.0);
    assert!(
        err.contains(&format!("{name}.SCB")) && err.contains("[31]") && err.contains("[32]"),
        "{err}"
    );

    let scratch = Scratch::copy_of("llama_bnb8", "f16-scb");
    scratch.edit_weights(|t| {
        let scb = t
            .iter_mut()
            .find(|(n, ..)| n == &format!("{name}.SCB"))
            .unwrap();
        scb.1 = "F16".into();
        scb.3.truncate(32 * 2);
    });
    let err = load_err(&scratch.0);
    assert!(
        err.contains(&format!("{name}.SCB")) && err.contains("F16") && err.contains("F32"),
        "{err}"
    );

    let scratch = Scratch::copy_of("llama_bnb8", "col32");
    scratch.edit_weights(|t| {
        let format = t
            .iter_mut()
            .find(|(n, ..)| n == &format!("{name}.weight_format"))
            .unwrap();
        format.3 = vec![1];
    });
    let err = load_err(&scratch.0);
    assert!(
        err.contains(&format!("{name}.weight_format")) && err.contains("row"),
        "{err}"
    );

    // Negative scales are no absmax.
    let scratch = Scratch::copy_of("llama_bnb8", "negative-scb");
    scratch.edit_weights(|t| {
        let scb = t
            .iter_mut()
            .find(|(n, ..)| n == &format!("{name}.SCB"))
            .unwrap();
        scb.3[..4].copy_from_slice(&(-1.0f32).to_le_bytes());
    });
    let err = load_err(&scratch.0);
    assert!(err.contains(&format!("{name}.SCB")), "{err}");
}

#[test]
fn int8_weights_need_a_bitsandbytes_config() {
    let scratch = Scratch::copy_of("llama_bnb8", "no-config");
    scratch.edit_config(|c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    let err = load_err(&scratch.0);
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight")
            && err.contains("quantization_config"),
        "{err}"
    );
    // A module the config keeps dense may not be stored int8.
    let scratch = Scratch::copy_of("llama_bnb8", "skip-int8");
    scratch.edit_config(|c| {
        c["quantization_config"]["llm_int8_skip_modules"] = serde_json::json!(["lm_head", "o_proj"])
    });
    let err = load_err(&scratch.0);
    assert!(
        err.contains("model.layers.0.self_attn.o_proj.weight") && err.contains("skip"),
        "{err}"
    );
}

/// (scratch tag, edit of quantization_config, what the error must mention).
type ConfigCase = (&'static str, fn(&mut serde_json::Value), &'static str);

#[test]
fn unsupported_quantization_configs_are_refused() {
    let cases: [ConfigCase; 6] = [
        (
            "4bit",
            |q| {
                q["load_in_4bit"] = true.into();
                q["_load_in_4bit"] = true.into();
                q["load_in_8bit"] = false.into();
                q["_load_in_8bit"] = false.into();
            },
            "4-bit",
        ),
        ("gptq", |q| q["quant_method"] = "gptq".into(), "\"gptq\""),
        (
            "unknown",
            |q| q["llm_int8_future_knob"] = 1.into(),
            "llm_int8_future_knob",
        ),
        (
            "fp16-weight",
            |q| q["llm_int8_has_fp16_weight"] = true.into(),
            "llm_int8_has_fp16_weight",
        ),
        (
            "regex",
            |q| q["llm_int8_skip_modules"] = serde_json::json!(["layers.*.mlp"]),
            "regular expression",
        ),
        (
            "threshold",
            |q| q["llm_int8_threshold"] = "six".into(),
            "llm_int8_threshold",
        ),
    ];
    for (tag, edit, expected) in cases {
        let scratch = Scratch::copy_of("neox_bnb8", tag);
        scratch.edit_config(|c| edit(&mut c["quantization_config"]));
        let err = load_err(&scratch.0);
        assert!(
            err.contains("config.json")
                && err.contains("quantization_config")
                && err.contains(expected),
            "{tag}: {err}"
        );
    }
}

#[test]
fn float_weights_of_a_bnb_checkpoint_are_quantized_in_lathes_variant() {
    // A block weight stored as floats in an 8-bit checkpoint is quantized by lathe (bnb
    // would quantize it rounded to f16: no bnb layer to reproduce), so it keeps lathe's
    // arithmetic; the stored int8 layers beside it take bitsandbytes'.
    let name = "model.layers.0.self_attn.q_proj";
    let scratch = Scratch::copy_of("llama_bnb8", "float-weight");
    scratch.edit_weights(|t| {
        let scb = t
            .iter()
            .find(|(n, ..)| n == &format!("{name}.SCB"))
            .unwrap()
            .3
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect::<Vec<f32>>();
        let weight = t
            .iter_mut()
            .find(|(n, ..)| n == &format!("{name}.weight"))
            .unwrap();
        let cols = weight.2[1];
        let values: Vec<u8> = weight
            .3
            .iter()
            .enumerate()
            .flat_map(|(i, &q)| (f32::from(q as i8) * scb[i / cols] / 127.0).to_le_bytes())
            .collect();
        weight.1 = "F32".into();
        weight.3 = values;
        t.retain(|(n, ..)| n != &format!("{name}.SCB") && n != &format!("{name}.weight_format"));
    });
    let model = load_hf_dir(&scratch.0, &Device::Cpu).unwrap();
    let mut int8 = 0;
    for (layer_name, linear) in model.linears() {
        let Linear::Int8(layer) = linear else {
            continue;
        };
        let want = if layer_name == name {
            Int8Variant::Lathe
        } else {
            Int8Variant::Bitsandbytes
        };
        assert_eq!(layer.variant, want, "{layer_name}");
        assert_eq!(layer.threshold, 6.0, "{layer_name}");
        int8 += 1;
    }
    assert_eq!(int8, 14);
}
