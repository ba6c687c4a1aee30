//! The files users already have: a model in the local Hugging Face cache named as on the
//! Hub (`--model ORG/NAME`), its chat template applied to prompts (`--chat`) and to SFT
//! conversations (`{"messages": [...]}`, the loss on the assistant's turns) and to DPO's
//! conversational preference records, and the template carried into a model directory
//! lathe writes.
//!
//! The model: the tiny random Llama GGUF fixture of lathe-models, written as a HF model
//! directory with a ChatML-style template, laid out as huggingface_hub caches it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lathe_core::Device;
use lathe_models::pretrained::{Precision, Pretrained};
use serde_json::Value;

const TEMPLATE: &str = "{% for m in messages %}<{{ m.role }}> {{ m.content }} </{{ m.role }}>\n\
                        {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A Hub cache under `root` holding `tiny-org/tiny-chat` at commit `abc123` (refs/main).
fn hub_cache(root: &Path) -> PathBuf {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/gguf_model_tied.gguf");
    let pretrained = Pretrained::load(&fixture, &Device::Cpu, Precision::F32).unwrap();
    let repo = root.join("hub/models--tiny-org--tiny-chat");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    let snapshot = repo.join("snapshots/abc123");
    lathe_cli::commands::merge::write_model_dir(&pretrained, Some(TEMPLATE), &snapshot).unwrap();
    root.join("hub")
}

fn lathe(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lathe"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .output()
        .expect("the lathe binary runs")
}

/// `lathe <command>` on the cached model, on the CPU, reading `data` and writing `out`.
fn train(cache: &Path, command: &str, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let args = [command, "--model", "tiny-org/tiny-chat", "--device", "cpu"];
    lathe(
        cache,
        &[&args[..], &["--data", data, "--out", out], extra].concat(),
    )
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "lathe failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn generated(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn hub_names_chat_prompts_and_conversations() {
    let root = scratch("chat-hub");
    let cache = hub_cache(&root);
    let snapshot = cache.join("models--tiny-org--tiny-chat/snapshots/abc123");
    let common = [
        "--device",
        "cpu",
        "--max-new-tokens",
        "5",
        "--format",
        "jsonl",
    ];

    // --chat renders the prompt through the template and adds no special tokens: the same
    // tokens as the rendered text given as it is, from the model named by its Hub name.
    let by_name = ok(lathe(
        &cache,
        &[
            &["generate", "--model", "tiny-org/tiny-chat", "--chat"],
            &common[..],
            &["hello"],
        ]
        .concat(),
    ));
    let rendered = "<user> hello </user>\n<assistant>";
    let by_path = ok(lathe(
        &cache,
        &[
            &[
                "generate",
                "--model",
                snapshot.to_str().unwrap(),
                "--no-special-tokens",
            ],
            &common[..],
            &[rendered],
        ]
        .concat(),
    ));
    let (a, b) = (generated(&by_name), generated(&by_path));
    assert_eq!(a[0]["new_token_ids"], b[0]["new_token_ids"]);
    assert_eq!(a[0]["prompt"], "hello");
    // A revision by commit hash, and names that are not there.
    ok(lathe(
        &cache,
        &[
            &["generate", "--model", "tiny-org/tiny-chat@abc123"],
            &common[..],
            &["hi"],
        ]
        .concat(),
    ));
    for (name, says) in [
        ("nobody/nothing", "models--nobody--nothing"),
        ("tiny-org/tiny-chat@v9", "refs/v9"),
    ] {
        let out = lathe(
            &cache,
            &[&["generate", "--model", name], &common[..], &["x"]].concat(),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}");
        assert!(
            err.contains(says) && err.contains("looked for"),
            "{name}: {err}"
        );
    }

    // SFT on conversations: the records have no "text", so their "messages" are taken.
    let data = root.join("chats.jsonl");
    let record = |q: &str, a: &str| {
        serde_json::json!({"messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ]})
        .to_string()
    };
    let lines: Vec<String> = (0..6)
        .map(|i| {
            record(
                &format!("question {i} about lathes"),
                &format!("answer {i}: turn it"),
            )
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = root.join("sft");
    let steps = [
        "--block-size",
        "16",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
    ];
    ok(train(
        &cache,
        "sft",
        &data,
        &out,
        &[&steps[..], &["--eval-fraction", "0"]].concat(),
    ));
    assert!(out.join("adapter_model.safetensors").is_file());
    // A conversation file without an assistant turn is refused before training.
    let bad = root.join("bad.jsonl");
    std::fs::write(&bad, r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
    let refused = train(&cache, "sft", &bad, &root.join("sft-bad"), &[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no assistant turn"));

    // DPO on trl's conversational preference records, through the same template.
    let prefs = root.join("prefs.jsonl");
    let pair = |q: &str, good: &str, bad: &str| {
        serde_json::json!({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        })
        .to_string()
    };
    let lines: Vec<String> = (0..4)
        .map(|i| pair(&format!("review {i}?"), "a fine film", "dull"))
        .collect();
    std::fs::write(&prefs, lines.join("\n")).unwrap();
    let dpo = root.join("dpo");
    let batch = ["--max-steps", "1", "--per-device-train-batch-size", "2"];
    ok(train(&cache, "dpo", &prefs, &dpo, &batch));
    assert!(dpo.join("adapter_model.safetensors").is_file());

    // Merging writes the template into tokenizer_config.json (transformers 4.x and 5.x).
    let merged = root.join("merged");
    ok(lathe(
        &cache,
        &[
            "merge",
            "--model",
            "tiny-org/tiny-chat",
            "--adapter",
            out.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
    ));
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(merged.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["chat_template"], TEMPLATE);
    std::fs::remove_dir_all(&root).unwrap();
}
