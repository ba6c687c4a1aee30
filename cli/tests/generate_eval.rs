//! `lathe generate` and `lathe eval` end to end on the tiny random Llama GGUF fixture of
//! lathe-models (its BPE tokenizer in the metadata): the binary's output equals the library
//! computed independently here, on the CPU and the GPU, and bad input exits non-zero with a
//! message naming the problem.

use std::path::PathBuf;
use std::process::{Command, Output};

use lathe_core::testing::{assert_close, Tolerance};
use lathe_core::{Device, Tensor};
use lathe_models::attention::TokenLayout;
use lathe_models::generate::{generate, GenerateConfig};
use lathe_models::pretrained::{Precision, Pretrained};
use lathe_models::sampling::SamplingConfig;
use serde_json::Value;

fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/gguf_model_tied.gguf")
}

fn lathe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(args)
        .env("LATHE_ALLOW_SOFTWARE_GPU", "1")
        .output()
        .expect("the lathe binary runs")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "lathe failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const PROMPTS: [&str; 3] = ["hello world", "the cat sat on", "a"];

/// The tokens the library generates for PROMPTS (sampled, top-k 20, never stopping).
fn library_tokens(device: &Device) -> Vec<Vec<u32>> {
    let pretrained = Pretrained::load(&fixture_model(), device, Precision::F32).unwrap();
    let ids = pretrained.tokenizer.encode_batch(&PROMPTS, true).unwrap();
    let eos = pretrained.tokenizer.eos_id();
    let config = GenerateConfig {
        max_new_tokens: 7,
        min_new_tokens: 0,
        eos_token_id: eos,
        stop_at_eos: false,
        pad_token_id: pretrained.tokenizer.pad_id().or(eos).unwrap_or(0),
        sampling: SamplingConfig {
            temperature: 0.8,
            top_k: 20,
            top_p: 1.0,
            greedy: false,
        },
        seed: 11,
        use_cache: true,
    };
    generate(&pretrained.model, &ids, &config, device).unwrap()
}

fn generate_jsonl(device: &str) -> Vec<Value> {
    let dir = scratch(&format!("generate-{device}"));
    let prompts = dir.join("prompts.jsonl");
    let lines: Vec<String> = PROMPTS
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let out = dir.join("out.jsonl");
    let model = fixture_model();
    stdout_of(&lathe(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--device",
        device,
        "--prompts",
        prompts.to_str().unwrap(),
        "--do-sample",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--seed",
        "11",
        "--max-new-tokens",
        "7",
        "--ignore-eos",
        "--format",
        "jsonl",
        "--out",
        out.to_str().unwrap(),
    ]));
    let text = std::fs::read_to_string(&out).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check_generate(device_arg: &str, device: &Device) {
    let records = generate_jsonl(device_arg);
    let want = library_tokens(device);
    assert_eq!(records.len(), PROMPTS.len());
    for ((record, prompt), tokens) in records.iter().zip(PROMPTS).zip(&want) {
        assert_eq!(record["prompt"], prompt);
        let got: Vec<u32> = record["new_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(&got, tokens, "prompt {prompt:?}");
        assert_eq!(record["finish_reason"], "length");
    }
}

#[test]
fn generate_jsonl_equals_the_library_cpu() {
    check_generate("cpu", &Device::Cpu);
}

#[test]
fn generate_jsonl_equals_the_library_gpu() {
    check_generate("gpu", &lathe_core::testing::test_gpu());
}

/// Per-token log-probs recomputed from the logits of each window's forward, with a
/// log-softmax written out here (f64).
fn reference_logprobs(ids: &[u32], block: usize) -> Vec<f32> {
    let pretrained = Pretrained::load(&fixture_model(), &Device::Cpu, Precision::F32).unwrap();
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        let window = &ids[start..(start + block).min(ids.len())];
        let t = window.len();
        let tokens = Tensor::from_vec(window.to_vec(), &[1, t], &Device::Cpu).unwrap();
        let layout = TokenLayout::contiguous(1, t, 0, &Device::Cpu).unwrap();
        let logits = pretrained
            .model
            .forward(&tokens, &layout, None)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let v = logits.len() / t;
        for i in 0..t - 1 {
            let row = &logits[i * v..(i + 1) * v];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            out.push((row[window[i + 1] as usize] as f64 - lse) as f32);
        }
        start += block - 1;
    }
    out
}

#[test]
fn eval_json_log_probs_and_perplexity_match_a_reference() {
    let dir = scratch("eval");
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog.\nAgain and again, the dog sleeps: 1234.",
    )
    .unwrap();
    let model = fixture_model();
    for block in ["64", "9"] {
        let out = stdout_of(&lathe(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
            "--block-size",
            block,
            text.to_str().unwrap(),
        ]));
        let report: Value = serde_json::from_str(out.trim()).unwrap();
        let per_token = report["per_token"].as_array().unwrap();
        let pretrained = Pretrained::load(&model, &Device::Cpu, Precision::F32).unwrap();
        let ids = pretrained
            .tokenizer
            .encode(&std::fs::read_to_string(&text).unwrap(), true)
            .unwrap();
        assert_eq!(report["tokens"].as_u64().unwrap() as usize, ids.len());
        assert_eq!(per_token.len(), ids.len() - 1);
        let got_ids: Vec<u32> = per_token
            .iter()
            .map(|t| t["id"].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got_ids, ids[1..]);
        let got: Vec<f32> = per_token
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap() as f32)
            .collect();
        let want = reference_logprobs(&ids, block.parse().unwrap());
        assert_close(&got, &want, Tolerance::new(1e-5, 1e-5));
        let nll = -want.iter().map(|&l| l as f64).sum::<f64>() / want.len() as f64;
        let perplexity = report["perplexity"].as_f64().unwrap();
        assert!(
            (perplexity - nll.exp()).abs() <= 1e-4 * nll.exp(),
            "perplexity {perplexity} vs {}",
            nll.exp()
        );
    }
}

fn stderr_of_failure(args: &[&str]) -> String {
    let output = lathe(args);
    assert!(!output.status.success(), "lathe {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_input_is_a_clear_error() {
    let model = fixture_model();
    let model = model.to_str().unwrap();
    let missing = stderr_of_failure(&["generate", "--model", "/no/such/model.gguf", "hi"]);
    assert!(missing.contains("/no/such/model.gguf"), "{missing}");
    let both = stderr_of_failure(&[
        "generate",
        "--model",
        model,
        "--load-in-8bit",
        "--dtype",
        "f16",
        "hi",
    ]);
    assert!(both.contains("exclude each other"), "{both}");
    let none = stderr_of_failure(&["generate", "--model", model, "--device", "cpu"]);
    assert!(none.contains("no prompts"), "{none}");
    let dir = scratch("bad");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let empty_eval = stderr_of_failure(&[
        "eval",
        "--model",
        model,
        "--device",
        "cpu",
        empty.to_str().unwrap(),
    ]);
    assert!(empty_eval.contains("no text"), "{empty_eval}");
    let bad_json = dir.join("prompts.jsonl");
    std::fs::write(&bad_json, "{\"text\": \"a\"}\n").unwrap();
    let field = stderr_of_failure(&[
        "generate",
        "--model",
        model,
        "--device",
        "cpu",
        "--prompts",
        bad_json.to_str().unwrap(),
    ]);
    assert!(
        field.contains("line 1") && field.contains("no \"prompt\" field (keys: text)"),
        "{field}"
    );
    let long = stderr_of_failure(&[
        "generate",
        "--model",
        model,
        "--device",
        "cpu",
        "--max-new-tokens",
        "100000",
        "hi",
    ]);
    assert!(long.contains("positions"), "{long}");
    // A failed run leaves no output file behind, not even a partial one.
    let out = dir.join("never.jsonl");
    stderr_of_failure(&[
        "generate",
        "--model",
        model,
        "--device",
        "cpu",
        "--max-new-tokens",
        "100000",
        "--out",
        out.to_str().unwrap(),
        "hi",
    ]);
    assert!(!out.exists());
    // No temporary file of any name is left beside it either.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("never"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
