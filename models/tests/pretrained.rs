//! `Pretrained::load`: a GGUF file or a HF directory in each precision, and the errors for
//! paths that are not models.

use std::path::PathBuf;

use lathe_core::Device;
use lathe_models::hf::CausalLm;
use lathe_models::linear::Linear;
use lathe_models::pretrained::{Precision, Pretrained};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn error_of(path: &std::path::Path) -> String {
    match Pretrained::load(path, &Device::Cpu, Precision::F32) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

/// The first block's linear layers, whatever their form.
fn block_linears(model: &mut CausalLm) -> Vec<Linear> {
    model
        .linears_mut()
        .into_iter()
        .map(|(_, l)| l.clone())
        .collect()
}

#[test]
fn gguf_loads_in_every_precision() {
    let path = fixture("gguf_model_tied.gguf");
    for (precision, check) in [
        (Precision::F32, lathe_core::DType::F32),
        (Precision::F16, lathe_core::DType::F16),
    ] {
        let mut loaded = Pretrained::load(&path, &Device::Cpu, precision).unwrap();
        for linear in block_linears(&mut loaded.model) {
            match linear {
                Linear::Dense { weight, .. } => assert_eq!(weight.dtype(), check),
                other => panic!("{precision:?} gave {other:?}"),
            }
        }
    }
    let mut loaded =
        Pretrained::load(&path, &Device::Cpu, Precision::Int8 { threshold: 6.0 }).unwrap();
    assert!(block_linears(&mut loaded.model)
        .iter()
        .all(|l| matches!(l, Linear::Int8(_))));
    assert!(loaded.tokenizer.eos_id().is_some());
}

#[test]
fn paths_that_are_not_models_are_clear_errors() {
    let dir = fixture("models/llama_gqa_tied");
    let err = error_of(&dir);
    assert!(err.contains("no tokenizer.json"), "{err}");
    let err = error_of(&fixture("tokenizer_tiny.json"));
    assert!(err.contains("not a model"), "{err}");
    let err = error_of(&fixture("no_such_model.gguf"));
    assert!(
        err.contains("no_such_model.gguf") && err.contains("No such file"),
        "{err}"
    );
}
