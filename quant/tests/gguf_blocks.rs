//! GGUF block dequantization (lathe_quant::gguf) against gguf-py's own dequantizer
//! (fixtures from scripts/golden_gguf.py), hand-computed blocks, and bad input.

use lathe_quant::gguf::{
    self, dequantize, dequantize_f16, dequantize_f32, dequantize_into, dequantize_q4_0,
    dequantize_q4_1, dequantize_q8_0, GgmlType,
};
use safetensors::{Dtype, SafeTensors};

const FIXTURE: &[u8] = include_bytes!("fixtures/gguf_blocks.safetensors");

/// f16 bit patterns used in the hand-written blocks.
const F16_0_25_NEG: [u8; 2] = 0xB400u16.to_le_bytes(); // -0.25
const F16_0_5: [u8; 2] = 0x3800u16.to_le_bytes(); // 0.5
const F16_1_NEG: [u8; 2] = 0xBC00u16.to_le_bytes(); // -1.0
const F16_2: [u8; 2] = 0x4000u16.to_le_bytes(); // 2.0

fn fixture_type(prefix: &str) -> GgmlType {
    match prefix {
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        "q4_1" => GgmlType::Q4_1,
        "f16" => GgmlType::F16,
        other => panic!("fixture tensor with unknown type prefix {other}"),
    }
}

fn f32_values(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Bit-for-bit equality (so -0.0 vs 0.0 and NaN payloads count), with the first mismatch.
fn assert_bits_eq(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{name}[{i}] (block {}): lathe {g:e} ({:#010x}) vs gguf {w:e} ({:#010x})",
            i / 32,
            g.to_bits(),
            w.to_bits()
        );
    }
}

#[test]
fn fixture_metadata_names_generator_and_versions() {
    let (_, meta) = SafeTensors::read_metadata(FIXTURE).expect("fixture header");
    let meta = meta.metadata().as_ref().expect("fixture __metadata__");
    assert!(meta["generator"].contains("golden_gguf.py"), "{meta:?}");
    assert_eq!(meta["gguf"], "0.19.0");
    assert_eq!(meta["numpy"], "2.1.3");
}

/// Every fixture case: lathe's dequantization equals gguf-py's bit for bit (0 ulp). Both do
/// the same f32 operations, all exact except Q4_1's final `+ m` (one IEEE rounding on both
/// sides), so anything but exact equality is a bug.
#[test]
fn fixtures_match_gguf_py_bit_for_bit() {
    let st = SafeTensors::deserialize(FIXTURE).expect("fixture parses");
    let mut cases = 0;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for name in names.iter().filter(|n| n.ends_with(".raw")) {
        let base = name.trim_end_matches(".raw");
        let ty = fixture_type(base.split('.').next().unwrap());
        let raw = st.tensor(name).unwrap();
        let expected = st.tensor(&format!("{base}.expected")).unwrap();
        assert_eq!(raw.dtype(), Dtype::U8, "{name}");
        assert_eq!(expected.dtype(), Dtype::F32, "{base}.expected");
        let want = f32_values(expected.data());
        let got = dequantize(ty, raw.data(), want.len()).unwrap();
        assert_bits_eq(base, &got, &want);
        cases += 1;
    }
    // q8_0 / q4_0 / q4_1 × {random, quantized} + f16.random
    assert_eq!(cases, 7, "fixture cases found: {names:?}");
}

/// The per-format entry points agree with the generic one on the fixtures.
#[test]
fn per_format_functions_match_fixtures() {
    let st = SafeTensors::deserialize(FIXTURE).unwrap();
    type Deq = fn(&[u8], usize) -> lathe_quant::Result<Vec<f32>>;
    let fns: [(&str, Deq); 4] = [
        ("q8_0", dequantize_q8_0),
        ("q4_0", dequantize_q4_0),
        ("q4_1", dequantize_q4_1),
        ("f16", dequantize_f16),
    ];
    for (prefix, f) in fns {
        let base = format!("{prefix}.random");
        let raw = st.tensor(&format!("{base}.raw")).unwrap();
        let want = f32_values(st.tensor(&format!("{base}.expected")).unwrap().data());
        let got = f(raw.data(), want.len()).unwrap();
        assert_bits_eq(&base, &got, &want);
    }
}

#[test]
fn q8_0_single_block_by_hand() {
    // d = -0.25; q = [-128, 127, 0, 1, -1, 64, -64, 3, 0, ...]
    let mut block = F16_0_25_NEG.to_vec();
    let qs: [i8; 8] = [-128, 127, 0, 1, -1, 64, -64, 3];
    block.extend(qs.iter().map(|&q| q as u8));
    block.resize(34, 0);
    let got = dequantize_q8_0(&block, 32).unwrap();
    let mut want = vec![32.0, -31.75, 0.0, -0.25, 0.25, -16.0, 16.0, -0.75];
    want.resize(32, 0.0);
    assert_eq!(got, want);
}

#[test]
fn q8_0_blocks_use_their_own_scale() {
    // Block 0: d = 2, all q = 1; block 1: d = 0.5, all q = -3.
    let mut bytes = F16_2.to_vec();
    bytes.extend([1u8; 32]);
    bytes.extend(F16_0_5);
    bytes.extend([(-3i8) as u8; 32]);
    let got = dequantize_q8_0(&bytes, 64).unwrap();
    assert_eq!(&got[..32], &[2.0; 32]);
    assert_eq!(&got[32..], &[-1.5; 32]);
}

/// Nibble bytes with low nibble j and high nibble 15 - j: catches a swapped or interleaved
/// nibble order (low nibbles are elements 0..15, high nibbles 16..31).
fn ramp_nibbles() -> Vec<u8> {
    (0u8..16).map(|j| j | ((15 - j) << 4)).collect()
}

#[test]
fn q4_0_single_block_by_hand() {
    // d = 2: x[j] = (j - 8) * 2, x[16 + j] = (15 - j - 8) * 2
    let mut block = F16_2.to_vec();
    block.extend(ramp_nibbles());
    let got = dequantize_q4_0(&block, 32).unwrap();
    #[rustfmt::skip]
    let want = [
        // low nibbles
        -16.0, -14.0, -12.0, -10.0, -8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0,
        // high nibbles
        14.0, 12.0, 10.0, 8.0, 6.0, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0, -8.0, -10.0, -12.0, -14.0, -16.0,
    ];
    assert_eq!(got, want);
}

#[test]
fn q4_1_single_block_by_hand() {
    // d = 0.5, m = -1: x[j] = j / 2 - 1, x[16 + j] = (15 - j) / 2 - 1
    let mut block = F16_0_5.to_vec();
    block.extend(F16_1_NEG);
    block.extend(ramp_nibbles());
    let got = dequantize_q4_1(&block, 32).unwrap();
    #[rustfmt::skip]
    let want = [
        // low nibbles
        -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5,
        // high nibbles
        6.5, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0,
    ];
    assert_eq!(got, want);
}

#[test]
fn f16_and_f32_pass_through_by_hand() {
    // 1.0, -2.0, 65504 (max), smallest subnormal 2^-24
    let h: Vec<u8> = [0x3C00u16, 0xC000, 0x7BFF, 0x0001]
        .iter()
        .flat_map(|b| b.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize_f16(&h, 4).unwrap(),
        [1.0, -2.0, 65504.0, 2f32.powi(-24)]
    );
    let vals = [1.5f32, -0.0, f32::MAX, f32::from_bits(0x7FC0_1234)];
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let got = dequantize_f32(&bytes, 4).unwrap();
    assert_bits_eq("f32", &got, &vals);
}

/// Large inputs go through rayon (and F16 through chunked SIMD conversion); the result must
/// equal dequantizing each 32-element piece on its own.
#[test]
fn parallel_path_equals_blockwise() {
    let n = 5000 * 32; // above the parallel threshold, not a multiple of the task size
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::F16,
    ] {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut bytes: Vec<u8> = (0..ty.byte_len(n).unwrap())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        // Keep every f16 (scales, mins, F16 values) finite: clear its top exponent bit.
        let f16_offsets: &[usize] = match ty {
            GgmlType::Q4_1 => &[0, 2],
            _ => &[0],
        };
        for unit in bytes.chunks_exact_mut(ty.type_size()) {
            for &off in f16_offsets {
                unit[off + 1] &= 0b1011_1111;
            }
        }
        let piece = ty.byte_len(32).unwrap();
        let got = dequantize(ty, &bytes, n).unwrap();
        let want: Vec<f32> = bytes
            .chunks_exact(piece)
            .flat_map(|b| dequantize(ty, b, 32).unwrap())
            .collect();
        assert_bits_eq(ty.name(), &got, &want);
    }
}

#[test]
fn dequantize_into_fills_the_callers_buffer() {
    let mut block = F16_2.to_vec();
    block.extend(ramp_nibbles());
    let mut out = vec![f32::NAN; 32];
    dequantize_into(GgmlType::Q4_0, &block, &mut out).unwrap();
    assert_eq!(out, dequantize_q4_0(&block, 32).unwrap());
}

#[test]
fn empty_input_is_empty_output() {
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
    ] {
        assert!(dequantize(ty, &[], 0).unwrap().is_empty());
    }
}

#[test]
fn type_ids_and_sizes_match_ggml() {
    // (type, ggml id, block size, type size) from gguf-py's GGML_QUANT_SIZES
    let table = [
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q8_0, 8, 32, 34),
    ];
    for (ty, id, bs, ts) in table {
        assert_eq!(GgmlType::from_id(id).unwrap(), ty);
        assert_eq!(ty.id(), id);
        assert_eq!(ty.block_size(), bs, "{ty}");
        assert_eq!(ty.type_size(), ts, "{ty}");
        assert_eq!(ty.byte_len(96).unwrap(), 96 / bs * ts, "{ty}");
    }
}

fn err_text<T: std::fmt::Debug>(r: lathe_quant::Result<T>) -> String {
    let e = r.expect_err("expected an error");
    assert!(matches!(e, lathe_quant::Error::Gguf { .. }), "{e:?}");
    e.to_string()
}

#[test]
fn truncated_or_long_bytes_are_errors() {
    let cases = [
        (GgmlType::Q8_0, 33, 34),
        (GgmlType::Q4_0, 17, 18),
        (GgmlType::Q4_1, 19, 20),
    ];
    for (ty, short, want) in cases {
        let msg = err_text(dequantize(ty, &vec![0u8; short], 32));
        assert!(msg.contains(ty.name()), "{msg}");
        assert!(
            msg.contains(&format!("need {want} bytes")) && msg.contains(&format!("got {short}")),
            "{msg}"
        );
        // one byte too many, and a whole block missing
        let msg = err_text(dequantize(ty, &vec![0u8; want + 1], 32));
        assert!(msg.contains(&format!("got {}", want + 1)), "{msg}");
        let msg = err_text(dequantize(ty, &vec![0u8; want], 64));
        assert!(msg.contains(&format!("need {} bytes", 2 * want)), "{msg}");
    }
    let msg = err_text(dequantize_f16(&[0u8; 3], 2));
    assert!(msg.contains("F16") && msg.contains("got 3"), "{msg}");
    let msg = err_text(dequantize_f32(&[0u8; 7], 2));
    assert!(msg.contains("F32") && msg.contains("got 7"), "{msg}");
    let mut out = vec![0.0f32; 64];
    let msg = err_text(dequantize_into(GgmlType::Q8_0, &[0u8; 34], &mut out));
    assert!(msg.contains("need 68 bytes"), "{msg}");
}

#[test]
fn element_count_not_a_multiple_of_32_is_an_error() {
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
        for n in [1, 31, 33, 100] {
            let msg = err_text(dequantize(ty, &vec![0u8; ty.type_size() * 4], n));
            assert!(
                msg.contains(ty.name())
                    && msg.contains(&format!(
                        "{n} elements is not a multiple of the block size 32"
                    )),
                "{msg}"
            );
            let msg = err_text(ty.byte_len(n));
            assert!(msg.contains("not a multiple"), "{msg}");
        }
    }
}

#[test]
fn byte_len_overflow_is_an_error() {
    let n = usize::MAX - 31; // a multiple of 32 whose byte count overflows usize
    let msg = err_text(GgmlType::Q8_0.byte_len(n));
    assert!(msg.contains("overflow"), "{msg}");
    let msg = err_text(dequantize(GgmlType::Q8_0, &[], n));
    assert!(msg.contains("overflow"), "{msg}");
}

#[test]
fn unknown_type_ids_are_errors() {
    let msg = err_text(GgmlType::from_id(4));
    assert!(msg.contains("unknown GGML type id 4"), "{msg}");
    let msg = err_text(GgmlType::from_id(12345));
    assert!(msg.contains("unknown GGML type id 12345"), "{msg}");
    // A real GGML type lathe does not read is named.
    let msg = err_text(GgmlType::from_id(12));
    assert!(msg.contains("Q4_K (id 12) is not supported"), "{msg}");
    assert!(msg.contains("Q4_1 (3)"), "{msg}");
    // Display is the GGML name.
    assert_eq!(gguf::GgmlType::Q4_1.to_string(), "Q4_1");
}
