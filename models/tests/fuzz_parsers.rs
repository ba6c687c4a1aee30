//! Bounded fuzzing in CI of the models crate's parsers of untrusted bytes: GGUF (header,
//! metadata, tensor infos, every tensor dequantized, the Llama config and the tokenizer
//! built from it), config.json (`ModelConfig::from_json_str`) and tokenizer.json
//! (`Tokenizer::from_file`). Inputs are random bytes and structured mutations of valid
//! files: truncation, flipped bytes, counts / lengths / dims / offsets replaced by huge
//! values such as 2^60, JSON fields replaced by out-of-range values. Every input must give
//! `Ok` or `Err`, never a panic, and one parse may allocate at most
//! `lathe_core::testing::parse_alloc_bound(input length)` (16 MiB + 64 x the input) on the
//! calling thread. `cargo +nightly fuzz run gguf|config_json|tokenizer_json` (fuzz/) runs
//! the same entry points unbounded.

use std::path::PathBuf;

use lathe_core::testing::{parse_alloc_bound, peak_alloc_during, CountingAlloc};
use lathe_models::config::ModelConfig;
use lathe_models::gguf::GgufFile;
use lathe_models::gguf_model::llama_config_from_gguf;
use lathe_models::tokenizer::Tokenizer;
use proptest::prelude::*;
use serde_json::Value as Json;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Asserts the allocation bound for one parse of `len` input bytes.
fn within_bound(what: &str, len: usize, peak: usize) -> Result<(), TestCaseError> {
    let bound = parse_alloc_bound(len);
    prop_assert!(
        peak <= bound,
        "{what} of {len} bytes allocated {peak} > {bound}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// GGUF

/// What a numeric field of the header claims, for the structured mutations.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Claim {
    /// tensor_count, kv_count, an array's length: each item needs bytes of the file.
    Count,
    /// A string's byte length.
    Length,
    /// A tensor dimension (a huge one is harmless next to a zero one).
    Dim,
    /// A tensor's data offset.
    Offset,
}

/// A little GGUF writer that records where every count, length, dim and offset lies.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
    claims: Vec<(usize, Claim)>,
}

impl Writer {
    fn claim(&mut self, v: u64, kind: Claim) {
        self.claims.push((self.buf.len(), kind));
        self.buf.extend(v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend(v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.claim(s.len() as u64, Claim::Length);
        self.buf.extend(s.as_bytes());
    }
    fn kv_str(&mut self, k: &str, v: &str) {
        self.str(k);
        self.u32(8);
        self.str(v);
    }
    fn kv_u32(&mut self, k: &str, v: u32) {
        self.str(k);
        self.u32(4);
        self.u32(v);
    }
    fn kv_strs(&mut self, k: &str, items: &[&str]) {
        self.str(k);
        self.u32(9);
        self.u32(8);
        self.claim(items.len() as u64, Claim::Count);
        for s in items {
            self.str(s);
        }
    }
}

/// A small valid Llama GGUF with a byte-level BPE tokenizer: an F32 embedding (5, 8), a Q8_0
/// (1, 32) and an F16 (4,) tensor, an i32 array and a nested array.
fn valid_gguf() -> Vec<u8> {
    let mut w = Writer::default();
    w.buf.extend(b"GGUF");
    w.u32(3);
    w.claim(3, Claim::Count);
    w.claim(14, Claim::Count);
    w.kv_str("general.architecture", "llama");
    w.kv_u32("llama.embedding_length", 8);
    w.kv_u32("llama.attention.head_count", 2);
    w.kv_u32("llama.block_count", 1);
    w.kv_u32("llama.feed_forward_length", 16);
    w.kv_u32("llama.context_length", 32);
    w.kv_str("tokenizer.ggml.model", "gpt2");
    w.kv_strs("tokenizer.ggml.tokens", &["a", "b", "c", "ab", "<s>"]);
    w.kv_strs("tokenizer.ggml.merges", &["a b"]);
    w.kv_u32("tokenizer.ggml.bos_token_id", 4);
    // token_type: an i32 array.
    w.str("tokenizer.ggml.token_type");
    w.u32(9);
    w.u32(5);
    w.claim(5, Claim::Count);
    for t in [1i32, 1, 1, 1, 3] {
        w.buf.extend(t.to_le_bytes());
    }
    w.kv_str("tokenizer.ggml.pre", "smollm");
    // An array of arrays of u8.
    w.str("test.nested");
    w.u32(9);
    w.u32(9);
    w.claim(2, Claim::Count);
    for n in [3u64, 1] {
        w.u32(0);
        w.claim(n, Claim::Count);
        w.buf.extend(std::iter::repeat_n(7u8, n as usize));
    }
    w.kv_u32("general.alignment", 32);
    // Tensor infos: name, n_dims, dims (innermost first), type, offset.
    let tensors: [(&str, &[u64], u32, u64); 3] = [
        ("token_embd.weight", &[8, 5], 0, 0),
        ("blk.0.q8", &[32, 1], 8, 160),
        ("blk.0.f16", &[4], 1, 224),
    ];
    for (name, dims, ty, offset) in tensors {
        w.str(name);
        w.u32(dims.len() as u32);
        for &d in dims {
            w.claim(d, Claim::Dim);
        }
        w.u32(ty);
        w.claim(offset, Claim::Offset);
    }
    w.buf.resize(w.buf.len().next_multiple_of(32), 0);
    let data = w.buf.len();
    w.buf.resize(data + 232, 0);
    for (i, x) in (0..40).map(|i| i as f32 * 0.25).enumerate() {
        w.buf[data + 4 * i..data + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
    w.buf[data + 160..data + 162].copy_from_slice(&half::f16::ONE.to_bits().to_le_bytes());
    let claims = w.claims.clone();
    CLAIMS.with(|c| *c.borrow_mut() = claims);
    w.buf
}

thread_local! {
    /// The claim positions of the last [`valid_gguf`] built on this thread.
    static CLAIMS: std::cell::RefCell<Vec<(usize, Claim)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn gguf_claims() -> (Vec<u8>, Vec<(usize, Claim)>) {
    let bytes = valid_gguf();
    (bytes, CLAIMS.with(|c| c.borrow().clone()))
}

/// Everything lathe builds from a GGUF file, under the bound; whether the file opened.
fn parse_gguf(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let (opened, peak) = peak_alloc_during(|| {
        let Ok(file) = GgufFile::from_bytes("fuzz.gguf", bytes.to_vec()) else {
            return false;
        };
        let names: Vec<String> = file.tensor_infos().iter().map(|t| t.name.clone()).collect();
        for name in &names {
            let _ = file.tensor_f32(name);
        }
        let _ = llama_config_from_gguf(&file);
        if let Ok(tokenizer) = Tokenizer::from_gguf(&file) {
            let _ = tokenizer.encode("abc 12", true);
        }
        true
    });
    within_bound("GGUF", bytes.len(), peak)?;
    Ok(opened)
}

fn huge() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1u64 << 60),
        Just(u64::MAX),
        Just(1u64 << 63),
        Just((1u64 << 32) + 3),
        Just(1u64 << 40),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gguf_random_bytes(tail in prop::collection::vec(any::<u8>(), 0..256), version in 2u32..4) {
        // Behind a valid magic and version, so the bytes reach the counts and metadata.
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(&tail);
        parse_gguf(&bytes)?;
        parse_gguf(&tail)?;
    }

    #[test]
    fn gguf_truncated(cut in any::<prop::sample::Index>()) {
        let bytes = valid_gguf();
        let cut = cut.index(bytes.len());
        prop_assert!(!parse_gguf(&bytes[..cut])?, "a GGUF file cut at {} opened", cut);
    }

    #[test]
    fn gguf_flipped_bytes(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut bytes = valid_gguf();
        for (at, xor) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        parse_gguf(&bytes)?;
    }

    #[test]
    fn gguf_huge_claims(which in any::<prop::sample::Index>(), value in huge()) {
        let (mut bytes, claims) = gguf_claims();
        let (at, kind) = claims[which.index(claims.len())];
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        let opened = parse_gguf(&bytes)?;
        // Counts, lengths and offsets this large cannot fit the file; a huge dim can (next
        // to a zero one it claims no bytes), and is refused later if it claims too many.
        prop_assert!(!opened || kind == Claim::Dim, "{:?} {} at byte {} accepted", kind, value, at);
    }

    #[test]
    fn gguf_claims_off_by_some(which in any::<prop::sample::Index>(), delta in -40i64..40) {
        let (mut bytes, claims) = gguf_claims();
        let (at, _) = claims[which.index(claims.len())];
        let v = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        bytes[at..at + 8].copy_from_slice(&v.wrapping_add_signed(delta).to_le_bytes());
        parse_gguf(&bytes)?;
    }
}

#[test]
fn the_mutated_gguf_is_valid() {
    let file = GgufFile::from_bytes("valid.gguf", valid_gguf()).unwrap();
    for t in file.tensor_infos() {
        file.tensor_f32(&t.name).unwrap();
    }
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(tokenizer.encode("ab", false).unwrap(), vec![3]);
    assert_eq!(llama_config_from_gguf(&file).unwrap().vocab_size, 5);
}

// ---------------------------------------------------------------------------------------
// config.json

const CONFIGS: [&str; 3] = [
    "tests/fixtures/models/llama_gqa_tied/config.json",
    "tests/fixtures/models/neox_bnb8/config.json",
    "tests/fixtures/models/neox_parallel_half_v5/config.json",
];

fn config_text(pick: usize) -> String {
    std::fs::read_to_string(fixture(CONFIGS[pick % CONFIGS.len()])).unwrap()
}

/// `from_json_str` under the bound; an accepted config also writes and reads back.
fn parse_config(text: &str) -> Result<bool, TestCaseError> {
    let (parsed, peak) = peak_alloc_during(|| ModelConfig::from_json_str(text, "config.json"));
    within_bound("config.json", text.len(), peak)?;
    let Ok(config) = parsed else {
        return Ok(false);
    };
    let _ = config.load_warning("config.json");
    let written = config.to_json_string().unwrap();
    let again = ModelConfig::from_json_str(&written, "written");
    prop_assert!(
        again.is_ok(),
        "written config does not read back: {:?}",
        again.err()
    );
    Ok(true)
}

/// JSON values that stress a config's fields.
fn odd_json() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(1u64 << 60)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!(-1e-308)),
        Just(serde_json::json!(0.5)),
        Just(serde_json::json!("gelu")),
        Just(serde_json::json!([1, 2, 3])),
        Just(serde_json::json!({"rope_type": "linear", "factor": 2.0})),
        Just(serde_json::json!({"nested": {"deeper": [null]}})),
        Just(serde_json::json!(true)),
        (0u64..100_000).prop_map(|n| serde_json::json!(n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_random_text(text in ".{0,200}") {
        parse_config(&text)?;
    }

    #[test]
    fn config_truncated_and_flipped(pick in 0usize..3, cut in any::<prop::sample::Index>(),
                                    flip in any::<prop::sample::Index>(), xor in 1u8..128) {
        // Trimmed: a cut through trailing whitespace would leave whole JSON.
        let text = config_text(pick).trim_end().to_string();
        prop_assert!(!parse_config(&text[..cut.index(text.len())])?, "a truncated config parsed");
        let mut bytes = text.into_bytes();
        let i = flip.index(bytes.len());
        bytes[i] ^= xor;
        if let Ok(text) = String::from_utf8(bytes) {
            parse_config(&text)?;
        }
    }

    #[test]
    fn config_odd_values(pick in 0usize..3, edits in prop::collection::vec((any::<prop::sample::Index>(), odd_json()), 1..4)) {
        let mut value: Json = serde_json::from_str(&config_text(pick)).unwrap();
        let map = value.as_object_mut().unwrap();
        for (at, v) in edits {
            let key = map.keys().nth(at.index(map.len())).unwrap().clone();
            map.insert(key, v);
        }
        parse_config(&value.to_string())?;
    }
}

#[test]
fn the_mutated_configs_are_valid() {
    for (pick, name) in CONFIGS.iter().enumerate() {
        ModelConfig::from_json_str(&config_text(pick), name).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// tokenizer.json

fn tokenizer_text() -> String {
    std::fs::read_to_string(fixture("../reward/tests/fixtures/tiny_bert/tokenizer.json")).unwrap()
}

/// `Tokenizer::from_file` of `bytes` (through a file of this thread) under the bound.
fn parse_tokenizer(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let dir = std::env::temp_dir().join(format!(
        "lathe-fuzz-tok-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, bytes).unwrap();
    let (loaded, peak) = peak_alloc_during(|| match Tokenizer::from_file(&path) {
        Ok(t) => {
            if let Ok(ids) = t.encode("hello world", true) {
                let _ = t.decode(&ids, false);
            }
            true
        }
        Err(_) => false,
    });
    within_bound("tokenizer.json", bytes.len(), peak)?;
    Ok(loaded)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tokenizer_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        parse_tokenizer(&bytes)?;
    }

    #[test]
    fn tokenizer_truncated_and_flipped(cut in any::<prop::sample::Index>(),
                                       flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)) {
        let text = tokenizer_text().trim_end().as_bytes().to_vec();
        prop_assert!(!parse_tokenizer(&text[..cut.index(text.len())])?, "a truncated tokenizer.json loaded");
        let mut bytes = text;
        for (at, xor) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        parse_tokenizer(&bytes)?;
    }

    #[test]
    fn tokenizer_odd_ids(edits in prop::collection::vec((any::<prop::sample::Index>(), prop_oneof![Just(u32::MAX as u64), Just(1u64 << 40), Just(1u64 << 31), 0u64..64]), 1..4)) {
        // Vocabulary ids and added-token ids replaced by huge or colliding ones.
        let mut value: Json = serde_json::from_str(&tokenizer_text()).unwrap();
        let vocab = value["model"]["vocab"].as_object_mut().unwrap();
        for (at, id) in &edits {
            let key = vocab.keys().nth(at.index(vocab.len())).unwrap().clone();
            vocab.insert(key, serde_json::json!(id));
        }
        if let Some(added) = value["added_tokens"].as_array_mut() {
            if let Some((at, id)) = edits.first() {
                let n = added.len();
                if n > 0 {
                    added[at.index(n)]["id"] = serde_json::json!(id);
                }
            }
        }
        parse_tokenizer(value.to_string().as_bytes())?;
    }
}

#[test]
fn the_mutated_tokenizer_is_valid() {
    assert!(parse_tokenizer(tokenizer_text().as_bytes()).unwrap());
}

// ---------------------------------------------------------------------------------------
// Regressions: inputs these tests found.

#[test]
fn gguf_offset_near_2_pow_64_is_an_error() {
    // An aligned offset of 2^64 - 32 overflowed the "runs past the end" message.
    let (mut bytes, claims) = gguf_claims();
    let (at, _) = claims
        .iter()
        .copied()
        .find(|&(_, kind)| kind == Claim::Offset)
        .unwrap();
    bytes[at..at + 8].copy_from_slice(&0u64.wrapping_sub(32).to_le_bytes());
    let e = GgufFile::from_bytes("near.gguf", bytes)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("near.gguf") && e.contains("runs past the end"),
        "{e}"
    );
}

#[test]
fn tokenizer_json_cut_in_its_decoder_is_an_error() {
    // tokenizers 0.22 panicked ("Helper") on a decoder value cut short or nested too deep.
    let text = tokenizer_text();
    let cut = text.find("\"decoder\"").unwrap() + "\"decoder\": {".len();
    assert!(!parse_tokenizer(&text.as_bytes()[..cut]).unwrap());
    let deep = format!(r#"{{"decoder": {}{}}}"#, "[".repeat(200), "]".repeat(200));
    assert!(!parse_tokenizer(deep.as_bytes()).unwrap());
}

#[test]
fn tokenizer_json_with_a_template_encoding_would_panic_on_is_an_error() {
    // Found by `cargo fuzz run tokenizer_json`: "[SEP]" of the single template mutated to
    // "[SEPU" loaded, then encoding panicked ("no entry found for key", template.rs).
    let edits: [(&str, serde_json::Value); 3] = [
        ("/post_processor/single/2/SpecialToken/id", "[SEPU".into()),
        ("/post_processor/single/1/Sequence/id", "B".into()),
        (
            "/post_processor/special_tokens/[SEP]/ids",
            serde_json::json!([102, 103]),
        ),
    ];
    for (pointer, value) in edits {
        let mut json: Json = serde_json::from_str(&tokenizer_text()).unwrap();
        *json.pointer_mut(pointer).unwrap() = value;
        let dir = std::env::temp_dir().join(format!("lathe-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let e = Tokenizer::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("post_processor"),
            "{pointer}: {e}"
        );
    }
}
