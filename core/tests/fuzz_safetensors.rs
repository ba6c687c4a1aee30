//! Bounded fuzzing of the safetensors readers (`load_bytes`, and `SafetensorsFile::open`
//! then every tensor read) in CI: random bytes and structured mutations of a valid file
//! (truncation, flipped bytes, huge header lengths, huge shapes, bad offsets, other dtypes).
//! Every input must give `Ok` or `Err`, never a panic, and one parse may allocate at most
//! `lathe_core::testing::parse_alloc_bound(input length)` (16 MiB + 64 x the input) on the
//! calling thread, measured by the counting allocator below. `cargo +nightly fuzz run
//! safetensors` (fuzz/) runs the same entry points unbounded.

use std::path::PathBuf;

use lathe_core::safetensors::{load_bytes, SafetensorsFile};
use lathe_core::testing::{parse_alloc_bound, peak_alloc_during, CountingAlloc};
use lathe_core::Device;
use proptest::prelude::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// A scratch file of this test thread (tests run in parallel threads).
fn scratch_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-fuzz-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!(
        "{tag}-{:?}.safetensors",
        std::thread::current().id()
    ))
}

/// A safetensors file from a JSON header and raw data bytes.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// A small valid file: an F32 (2, 3), an F16 (4,), a BF16 (2,) and a U32 (1,) tensor.
fn valid_file() -> Vec<u8> {
    let header = r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"h":{"dtype":"F16","shape":[4],"data_offsets":[24,32]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[32,36]},"i":{"dtype":"U32","shape":[1],"data_offsets":[36,40]}}"#;
    let data: Vec<u8> = (0..40u8).collect();
    raw_file(header, &data)
}

/// Runs both readers on `bytes` under the allocation bound; `Ok(true)` when both accepted
/// the file, `Ok(false)` when both refused it.
fn parse_both(bytes: &[u8], tag: &str) -> Result<bool, TestCaseError> {
    let path = scratch_file(tag);
    std::fs::write(&path, bytes).unwrap();
    let bound = parse_alloc_bound(bytes.len());
    let (in_memory, peak) = peak_alloc_during(|| load_bytes(bytes, &Device::Cpu).is_ok());
    prop_assert!(
        peak <= bound,
        "load_bytes of {} bytes allocated {peak} > {bound}",
        bytes.len()
    );
    let (streamed, peak) = peak_alloc_during(|| match SafetensorsFile::open(&path) {
        Ok(file) => {
            let names: Vec<String> = file.names().map(str::to_string).collect();
            names
                .iter()
                .all(|name| file.read(name, &Device::Cpu).is_ok())
        }
        Err(_) => false,
    });
    prop_assert!(
        peak <= bound,
        "SafetensorsFile of {} bytes allocated {peak} > {bound}",
        bytes.len()
    );
    let _ = std::fs::remove_file(&path);
    // Both readers validate the same way; only dtypes neither reads differ per tensor.
    prop_assert_eq!(in_memory, streamed);
    Ok(in_memory)
}

/// Dims that stress the shape arithmetic: small ones, and 2^31, 2^60, usize::MAX.
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..5,
        Just(1 << 31),
        Just(1 << 60),
        Just(u64::MAX),
        Just(u64::MAX / 2 + 1)
    ]
}

fn dtype() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "F32", "F16", "BF16", "U32", "I8", "U8", "F64", "BOOL", "I64", "F8_E4M3", "F4", "Q4", "",
    ])
}

/// Offsets: in range of the data, past it, or huge.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..64, Just(1 << 40), Just(1 << 62), Just(u64::MAX)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        parse_both(&bytes, "random")?;
    }

    #[test]
    fn random_bytes_behind_a_plausible_length(
        len in 0u64..300,
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut file = len.to_le_bytes().to_vec();
        file.extend(bytes);
        parse_both(&file, "length")?;
    }

    #[test]
    fn truncated(cut in 0usize..1000) {
        let file = valid_file();
        let cut = cut % file.len();
        prop_assert!(!parse_both(&file[..cut], "truncated")?, "a truncated file was accepted");
    }

    #[test]
    fn flipped_bytes(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut file = valid_file();
        for (at, xor) in flips {
            let i = at.index(file.len());
            file[i] ^= xor;
        }
        parse_both(&file, "flipped")?;
    }

    #[test]
    fn huge_header_length(len in prop_oneof![Just(1u64 << 60), Just(u64::MAX), Just(100_000_001u64), 300u64..1 << 40]) {
        let mut file = valid_file();
        file[..8].copy_from_slice(&len.to_le_bytes());
        prop_assert!(!parse_both(&file, "header-length")?, "header length {} accepted", len);
    }

    #[test]
    fn crafted_tensor(
        dims in prop::collection::vec(dim(), 0..5),
        dtype in dtype(),
        start in offset(),
        end in offset(),
        data_len in 0usize..64,
    ) {
        let shape = dims.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let header = format!(
            r#"{{"t":{{"dtype":"{dtype}","shape":[{shape}],"data_offsets":[{start},{end}]}}}}"#
        );
        let file = raw_file(&header, &vec![7u8; data_len]);
        let accepted = parse_both(&file, "crafted")?;
        // An accepted tensor's bytes lie within the file: its claims are at most the data.
        if accepted {
            prop_assert!(end as usize <= data_len && start <= end);
        }
    }
}

#[test]
fn the_mutated_file_is_valid() {
    // The structured cases mutate a file both readers accept.
    assert!(parse_both(&valid_file(), "valid").unwrap());
}
