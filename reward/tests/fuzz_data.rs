//! Bounded fuzzing in CI of the labelled-data readers (`data::load` of `.json`, `.jsonl` and
//! `.arrow` files) and of the encoders' config.json (`EncoderConfig::from_dir`): random bytes and structured mutations of valid files (truncation,
//! flipped bytes, and for Arrow every length, count, offset and row count replaced by huge
//! or negative values). Every input must give `Ok` or `Err`, never a panic, and one load may
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
// A little Arrow IPC stream writer (flatbuffers written front to back: every offset points
// forward, which is all the reader relies on), recording where each number that claims a
// size lies so the tests can corrupt exactly those.

/// A flatbuffer value: inline scalars, or an offset to a child written after its table.
enum V {
    U8(u8),
    Bool(bool),
    I32(i32),
    I64(i64),
    Table(Vec<(usize, V)>),
    Str(&'static str),
    Tables(Vec<Vec<(usize, V)>>),
    /// A vector of 16-byte structs (two i64 each).
    Pairs(Vec<(i64, i64)>),
}

#[derive(Default)]
struct Fb {
    buf: Vec<u8>,
    /// (position, width) of i64 scalars and struct fields (8) and vector lengths (4).
    claims: Vec<(usize, usize)>,
}

impl Fb {
    fn table(&mut self, fields: &[(usize, V)]) -> usize {
        let slots = fields.iter().map(|(id, _)| id + 1).max().unwrap_or(0);
        let vtable = self.buf.len();
        self.buf.extend(((4 + 2 * slots) as u16).to_le_bytes());
        self.buf.extend(0u16.to_le_bytes());
        self.buf.resize(vtable + 4 + 2 * slots, 0);
        let table = self.buf.len();
        self.buf.extend(((table - vtable) as i32).to_le_bytes());
        let mut children = Vec::new();
        for (id, v) in fields {
            let at = self.buf.len();
            self.buf[vtable + 4 + 2 * id..vtable + 6 + 2 * id]
                .copy_from_slice(&((at - table) as u16).to_le_bytes());
            match v {
                V::U8(x) => self.buf.push(*x),
                V::Bool(x) => self.buf.push(*x as u8),
                V::I32(x) => self.buf.extend(x.to_le_bytes()),
                V::I64(x) => {
                    self.claims.push((at, 8));
                    self.buf.extend(x.to_le_bytes())
                }
                _ => {
                    self.buf.extend(0u32.to_le_bytes());
                    children.push((at, v));
                }
            }
        }
        for (at, v) in children {
            let child = self.child(v);
            self.patch(at, child);
        }
        table
    }

    fn patch(&mut self, at: usize, target: usize) {
        self.buf[at..at + 4].copy_from_slice(&((target - at) as u32).to_le_bytes());
    }

    fn vector_len(&mut self, n: usize) -> usize {
        let at = self.buf.len();
        self.claims.push((at, 4));
        self.buf.extend((n as u32).to_le_bytes());
        at
    }

    fn child(&mut self, v: &V) -> usize {
        match v {
            V::Table(fields) => self.table(fields),
            V::Str(s) => {
                let at = self.vector_len(s.len());
                self.buf.extend(s.as_bytes());
                at
            }
            V::Tables(tables) => {
                let at = self.vector_len(tables.len());
                let slots: Vec<usize> = tables
                    .iter()
                    .map(|_| {
                        self.buf.extend(0u32.to_le_bytes());
                        self.buf.len() - 4
                    })
                    .collect();
                for (slot, t) in slots.into_iter().zip(tables) {
                    let table = self.table(t);
                    self.patch(slot, table);
                }
                at
            }
            V::Pairs(pairs) => {
                let at = self.vector_len(pairs.len());
                for (a, b) in pairs {
                    self.claims.push((self.buf.len(), 8));
                    self.buf.extend(a.to_le_bytes());
                    self.claims.push((self.buf.len(), 8));
                    self.buf.extend(b.to_le_bytes());
                }
                at
            }
            _ => unreachable!("scalars are inline"),
        }
    }
}

/// One stream message: continuation, metadata length, metadata, body; its claims (positions
/// in `out`, widths) are added to `claims`.
fn message(
    out: &mut Vec<u8>,
    claims: &mut Vec<(usize, usize)>,
    header_type: u8,
    header: V,
    body: &[u8],
) {
    let mut fb = Fb::default();
    fb.buf.extend(0u32.to_le_bytes());
    let root = fb.table(&[
        (1, V::U8(header_type)),
        (2, header),
        (3, V::I64(body.len() as i64)),
    ]);
    fb.buf[..4].copy_from_slice(&(root as u32).to_le_bytes());
    out.extend(0xFFFF_FFFFu32.to_le_bytes());
    claims.push((out.len(), 4));
    out.extend((fb.buf.len() as u32).to_le_bytes());
    claims.extend(fb.claims.iter().map(|&(c, w)| (c + out.len(), w)));
    out.extend(&fb.buf);
    out.extend(body);
}

fn field(name: &'static str, type_tag: u8, type_table: Vec<(usize, V)>) -> Vec<(usize, V)> {
    vec![
        (0, V::Str(name)),
        (1, V::Bool(true)),
        (2, V::U8(type_tag)),
        (3, V::Table(type_table)),
    ]
}

/// A valid stream: columns `idx` (int32), `sentence` (utf8), `label` (int64), one record
/// batch of `texts` (an empty text is a null), and its claim positions.
fn arrow_stream(rows: &[(&str, i64)]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let (mut out, mut claims) = (Vec::new(), Vec::new());
    let int = |bits: i32| vec![(0, V::I32(bits)), (1, V::Bool(true))];
    let schema = V::Table(vec![(
        1,
        V::Tables(vec![
            field("idx", 2, int(32)),
            field("sentence", 5, vec![]),
            field("label", 2, int(64)),
        ]),
    )]);
    message(&mut out, &mut claims, 1, schema, &[]);

    // Buffers: idx validity, idx data, text validity, offsets, data, label validity, data.
    let n = rows.len();
    let mut idx = Vec::new();
    let mut validity = vec![0u8; n.div_ceil(8)];
    let mut offsets = vec![0i32];
    let mut text = Vec::new();
    let mut labels = Vec::new();
    for (i, (t, l)) in rows.iter().enumerate() {
        idx.extend((i as i32).to_le_bytes());
        if !t.is_empty() {
            validity[i / 8] |= 1 << (i % 8);
        }
        text.extend(t.as_bytes());
        offsets.push(text.len() as i32);
        labels.extend(l.to_le_bytes());
    }
    let offsets: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    let parts: [&[u8]; 7] = [&[], &idx, &validity, &offsets, &text, &[], &labels];
    let mut body = Vec::new();
    let mut buffers = Vec::new();
    for p in parts {
        buffers.push((body.len() as i64, p.len() as i64));
        body.extend(p);
        body.resize(body.len().next_multiple_of(8), 0);
    }
    let batch = V::Table(vec![
        (0, V::I64(n as i64)),
        (1, V::Pairs(vec![(n as i64, 0); 3])),
        (2, V::Pairs(buffers)),
    ]);
    message(&mut out, &mut claims, 3, batch, &body);
    out.extend(0xFFFF_FFFFu32.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    (out, claims)
}

const ROWS: [(&str, i64); 3] = [("a fine film", 1), ("dull", 0), ("moving and bright", 1)];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn the_arrow_writer_makes_a_stream_the_reader_reads() {
    let (bytes, _) = arrow_stream(&ROWS);
    // The fuzzers' seed (fuzz/make_seeds.sh) is this stream.
    assert_eq!(std::fs::read(fixture("tiny.arrow")).unwrap(), bytes);
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
        let (bytes, _) = arrow_stream(&ROWS);
        load("cut.arrow", &bytes[..cut.index(bytes.len())])?;
        let mut flipped = bytes;
        for (at, xor) in flips {
            let i = at.index(flipped.len());
            flipped[i] ^= xor;
        }
        load("flipped.arrow", &flipped)?;
    }

    #[test]
    fn arrow_huge_claims(which in any::<prop::sample::Index>(), value in huge()) {
        let (mut bytes, claims) = arrow_stream(&ROWS);
        let (at, width) = claims[which.index(claims.len())];
        bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
        load("huge.arrow", &bytes)?;
    }

    #[test]
    fn arrow_claims_off_by_some(which in any::<prop::sample::Index>(), delta in -20i64..20) {
        let (mut bytes, claims) = arrow_stream(&ROWS);
        let (at, _) = claims[which.index(claims.len())];
        let v = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        bytes[at..at + 4].copy_from_slice(&v.wrapping_add_signed(delta as i32).to_le_bytes());
        load("off.arrow", &bytes)?;
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
// Regressions: inputs these tests found.
/// The stream of [`ROWS`] with claim `index` (in writing order, see [`arrow_stream`]) set to
/// `value`.
fn with_claim(index: usize, value: i64) -> Vec<u8> {
    let (mut bytes, claims) = arrow_stream(&ROWS);
    let (at, width) = claims[index];
    bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
    bytes
}

/// Claim indices of the stream of [`ROWS`]: the schema's field count, the batch's body
/// length, row count, and its buffers' (offset, length) from index 17 on (idx validity, idx
/// data, text validity, text offsets, ...).
const FIELD_COUNT: usize = 2;
const BATCH_BODY_LENGTH: usize = 7;
const ROW_COUNT: usize = 8;
const TEXT_OFFSETS_OFFSET: usize = 23;

#[test]
fn arrow_claims_beyond_the_file_are_errors() {
    let (bytes, claims) = arrow_stream(&ROWS);
    let value = |i: usize| {
        let (at, w) = claims[i];
        let mut v = [0u8; 8];
        v[..w].copy_from_slice(&bytes[at..at + w]);
        i64::from_le_bytes(v)
    };
    // The indices above name what they should.
    assert_eq!(
        [
            FIELD_COUNT,
            BATCH_BODY_LENGTH,
            ROW_COUNT,
            TEXT_OFFSETS_OFFSET
        ]
        .map(value),
        [3, 96, 3, 24]
    );
    for (index, claim, why) in [
        // Was a 171 GB allocation for the columns (the process aborted).
        (FIELD_COUNT, u32::MAX as i64, "flatbuffer vector"),
        // Were capacity overflows / huge allocations for the rows.
        (ROW_COUNT, 1 << 60, "too short"),
        (ROW_COUNT, -1, "rows"),
        // 9 rows against a 1-byte validity bitmap indexed past its end (a panic).
        (ROW_COUNT, 9, "too short"),
        // offset + length overflowed (a panic).
        (TEXT_OFFSETS_OFFSET, i64::MAX, "outside the message body"),
        // -1 as usize overflowed the body's end (a panic).
        (BATCH_BODY_LENGTH, -1, "truncated Arrow message body"),
    ] {
        let dir = std::env::temp_dir().join(format!("lathe-arrow-claims-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("claim-{index}.arrow"));
        std::fs::write(&path, with_claim(index, claim)).unwrap();
        let e = data::load(&path).unwrap_err().to_string();
        assert!(
            e.contains(&format!("claim-{index}.arrow")) && e.contains(why),
            "claim {index} = {claim}: {e}"
        );
    }
}
