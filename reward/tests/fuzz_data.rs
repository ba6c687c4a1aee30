//! Bounded fuzzing in CI of the labelled-data readers (`data::load` of `.json`, `.jsonl` and
//! `.arrow` files, read by lathe-data) and of the encoders' config.json
//! (`EncoderConfig::from_dir`): random bytes and structured mutations of valid files
//! (truncation, flipped bytes, and for Arrow every aligned word of a pyarrow-written stream,
//! its lengths, counts, offsets and row count among them, replaced by huge or negative
//! values). Every input must give `Ok` or `Err`, never a panic, and one load may
//! allocate at most `lathe_core::testing::parse_alloc_bound(file length)` (16 MiB + 64 x
//! the file) on the calling thread. `cargo +nightly fuzz run arrow|reward_data|config_json`
//! (fuzz/) runs the same entry points unbounded.

use std::path::PathBuf;

use lathe_core::testing::{parse_alloc_bound, peak_alloc_during, CountingAlloc};
use lathe_reward::data::{self, Example};
use lathe_reward::EncoderConfig;
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// `data::load` of `bytes` saved as `name` (in a directory of this test thread), under the
/// bound; whether it loaded.
fn load(name: &str, bytes: &[u8]) -> Result<bool, TestCaseError> {
    let dir = std::env::temp_dir().join(format!(
        "lathe-fuzz-data-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let (loaded, peak) = peak_alloc_during(|| data::load(&path));
    let bound = parse_alloc_bound(bytes.len());
    prop_assert!(
        peak <= bound,
        "{name} of {} bytes allocated {peak} > {bound}",
        bytes.len()
    );
    if let Err(e) = &loaded {
        prop_assert!(e.to_string().contains(name), "error without the file: {e}");
    }
    Ok(loaded.is_ok())
}

// ---------------------------------------------------------------------------------------
// Arrow IPC streams (read by lathe-data through arrow-ipc): a stream pyarrow wrote
// (tests/fixtures/tiny.arrow, from scripts/make_data_fixtures.py), mutated.

const ROWS: [(&str, i64); 3] = [("a fine film", 1), ("dull", 0), ("moving and bright", 1)];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The bytes of tests/fixtures/tiny.arrow: columns `idx` (int32), `sentence` (utf8),
/// `label` (int64), one record batch of [`ROWS`].
fn tiny_stream() -> Vec<u8> {
    std::fs::read(fixture("tiny.arrow")).unwrap()
}

/// `bytes` with the little-endian `value` (its low `width` bytes) written at `at`.
fn with_claim(bytes: &[u8], at: usize, width: usize, value: i64) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    let at = at.min(bytes.len() - width);
    bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    bytes
}

#[test]
fn the_tiny_stream_reads() {
    let loaded = data::load(fixture("tiny.arrow")).unwrap();
    let want: Vec<Example> = ROWS
        .iter()
        .map(|(t, l)| Example {
            text: t.to_string(),
            label: *l as u32,
        })
        .collect();
    assert_eq!(loaded.examples, want);
}

fn huge() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(1i64 << 60),
        Just(i64::MAX),
        Just(i64::MIN),
        Just(-1i64),
        Just(u32::MAX as i64),
        Just(1i64 << 32),
        Just((1i64 << 31) - 1),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arrow_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        load("random.arrow", &bytes)?;
        // Behind a continuation marker and a plausible length, to reach the flatbuffers.
        let mut framed = 0xFFFF_FFFFu32.to_le_bytes().to_vec();
        framed.extend((bytes.len() as u32 / 2).to_le_bytes());
        framed.extend(&bytes);
        load("framed.arrow", &framed)?;
    }

    #[test]
    fn arrow_truncated_and_flipped(cut in any::<prop::sample::Index>(),
                                   flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..5)) {
        let bytes = tiny_stream();
        load("cut.arrow", &bytes[..cut.index(bytes.len())])?;
        let mut flipped = bytes;
        for (at, xor) in flips {
            let i = at.index(flipped.len());
            flipped[i] ^= xor;
        }
        load("flipped.arrow", &flipped)?;
    }

    /// Any aligned 4 or 8 bytes (every length, count, offset and row count of the stream
    /// among them) replaced by a huge or negative value.
    #[test]
    fn arrow_huge_claims(which in any::<prop::sample::Index>(), wide in any::<bool>(), value in huge()) {
        let bytes = tiny_stream();
        let width = if wide { 8 } else { 4 };
        let at = which.index(bytes.len() / width) * width;
        load("huge.arrow", &with_claim(&bytes, at, width, value))?;
    }

    #[test]
    fn arrow_claims_off_by_some(which in any::<prop::sample::Index>(), delta in -20i64..20) {
        let bytes = tiny_stream();
        let at = which.index(bytes.len() / 4) * 4;
        let v = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        load("off.arrow", &with_claim(&bytes, at, 4, v.wrapping_add_signed(delta as i32) as i64))?;
    }

    #[test]
    fn json_random_text(text in "[\\[\\]{}\":,0-9a-z \\n]{0,200}", jsonl in any::<bool>()) {
        load(if jsonl { "random.jsonl" } else { "random.json" }, text.as_bytes())?;
    }

    #[test]
    fn json_truncated_and_flipped(cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(),
                                  xor in 1u8..128, jsonl in any::<bool>()) {
        let text: String = if jsonl {
            ROWS.iter().map(|(t, l)| format!("{{\"text\": \"{t}\", \"label\": {l}}}\n")).collect()
        } else {
            serde_json::to_string(&ROWS.iter().map(|(t, l)| serde_json::json!({"text": t, "label": l})).collect::<Vec<_>>()).unwrap()
        };
        let name = if jsonl { "data.jsonl" } else { "data.json" };
        prop_assert!(load(name, text.as_bytes())?);
        load(name, &text.as_bytes()[..cut.index(text.len())])?;
        let mut bytes = text.into_bytes();
        let i = flip.index(bytes.len());
        bytes[i] ^= xor;
        load(name, &bytes)?;
    }
}

// ---------------------------------------------------------------------------------------
// The encoders' config.json

/// `EncoderConfig::from_dir` of a directory (of this test thread) whose config.json is
/// `bytes`, under the bound; whether it was accepted.
fn encoder_config(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let path = std::env::temp_dir()
        .join(format!(
            "lathe-fuzz-encoder-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ))
        .join("config.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let (config, peak) = peak_alloc_during(|| EncoderConfig::from_dir(path.parent().unwrap()));
    let bound = parse_alloc_bound(bytes.len());
    prop_assert!(
        peak <= bound,
        "config.json of {} bytes allocated {peak} > {bound}",
        bytes.len()
    );
    Ok(config.is_ok())
}

fn odd_json() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(1u64 << 60)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!("gelu_new")),
        Just(serde_json::json!({"0": "NEGATIVE", "7": "POSITIVE"})),
        Just(serde_json::json!({"18446744073709551615": "x"})),
        Just(serde_json::json!({"pooling": "cls"})),
        Just(serde_json::json!([1, 2])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn encoder_config_odd_values(distil in any::<bool>(),
                                 edits in prop::collection::vec((any::<prop::sample::Index>(), odd_json()), 1..4),
                                 cut in any::<prop::sample::Index>()) {
        let name = if distil { "tiny_distilbert" } else { "tiny_bert" };
        let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
        prop_assert!(encoder_config(text.as_bytes())?);
        let trimmed = text.trim_end();
        prop_assert!(!encoder_config(&trimmed.as_bytes()[..cut.index(trimmed.len())])?);
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let map = value.as_object_mut().unwrap();
        for (at, v) in edits {
            let key = map.keys().nth(at.index(map.len())).unwrap().clone();
            map.insert(key, v);
        }
        encoder_config(value.to_string().as_bytes())?;
    }
}

// ---------------------------------------------------------------------------------------
// Every claim of the stream, exhaustively

#[test]
fn arrow_claims_beyond_the_file_are_errors() {
    // The hand-written reader this replaced once allocated 171 GB for a huge field count,
    // overflowed offset + length and indexed a validity bitmap past its end; every aligned
    // word of a real stream set to such values is an error naming the file (or still
    // reads), within the allocation bound.
    let bytes = tiny_stream();
    for at in (0..bytes.len()).step_by(4) {
        for (width, value) in [
            (4, u32::MAX as i64),
            (4, i32::MAX as i64),
            (8, 1i64 << 60),
            (8, -1),
            (8, i64::MAX),
            (4, 9),
        ] {
            if at + width <= bytes.len() {
                let name = format!("claim-{at}-{width}.arrow");
                load(&name, &with_claim(&bytes, at, width, value))
                    .unwrap_or_else(|e| panic!("{name} = {value}: {e}"));
            }
        }
    }
    // The body's length cut to less than its buffers: an error naming the file.
    let dir = std::env::temp_dir().join(format!("lathe-arrow-claims-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("short.arrow");
    std::fs::write(&path, &bytes[..bytes.len() - 24]).unwrap();
    let e = data::load(&path).unwrap_err().to_string();
    assert!(e.contains("short.arrow"), "{e}");
}
