//! safetensors IO: round trips on both devices, a hand-built BF16 file, and every malformed
//! file giving an error that names it (never a panic).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::f16;
use lathe_core::safetensors::{load, load_bytes, save};
use lathe_core::testing::test_gpu;
use lathe_core::{DType, Device, Error, MemCategory, Tensor};

/// A fresh, empty directory for one test.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-st-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A safetensors file from a JSON header and raw data bytes (header padded to 8 bytes).
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

fn by_name<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn round_trip_f32_f16_u32_on_both_devices() {
    let dir = scratch_dir("round-trip");
    let halves: Vec<f16> = [0.5f32, -1.25, 65504.0, 1e-3, 0.0]
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    for (k, device) in [Device::Cpu, test_gpu()].into_iter().enumerate() {
        let w = Tensor::rand_uniform(-1.0, 1.0, &[3, 7], 1, &device).unwrap();
        let h = Tensor::from_slice(&halves, &[5], &device).unwrap();
        let ids = Tensor::from_vec(vec![0u32, 7, u32::MAX], &[3], &device).unwrap();
        let path = dir.join(format!("model-{k}.safetensors"));
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        save(&path, &[("w", &w), ("h", &h), ("ids", &ids)], Some(meta)).unwrap();
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        for target in [Device::Cpu, test_gpu()] {
            let loaded = load(&path, &target).unwrap();
            assert_eq!(loaded.len(), 3);
            let (lw, lh, li) = (
                by_name(&loaded, "w"),
                by_name(&loaded, "h"),
                by_name(&loaded, "ids"),
            );
            assert_eq!((lw.shape(), lw.dtype()), (&[3usize, 7][..], DType::F32));
            assert_eq!((lh.shape(), lh.dtype()), (&[5usize][..], DType::F16));
            assert_eq!((li.shape(), li.dtype()), (&[3usize][..], DType::U32));
            assert_eq!(lw.to_vec_f32().unwrap(), w.to_vec_f32().unwrap());
            assert_eq!(lh.to_vec_f32().unwrap(), h.to_vec_f32().unwrap());
            assert_eq!(li.to_vec_u32().unwrap(), vec![0, 7, u32::MAX]);
            assert_eq!(lw.device(), &target);
            if target.is_gpu() {
                for (_, t) in &loaded {
                    assert_eq!(t.gpu_buffer().unwrap().category(), MemCategory::Weights);
                }
            }
        }
        // The same bytes load from memory too.
        let bytes = std::fs::read(&path).unwrap();
        let from_memory = load_bytes(&bytes, &Device::Cpu).unwrap();
        assert_eq!(
            by_name(&from_memory, "w").to_vec_f32().unwrap(),
            w.to_vec_f32().unwrap()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn saving_replaces_an_existing_file_and_a_failed_save_leaves_it_intact() {
    let dir = scratch_dir("replace");
    let path = dir.join("ckpt.safetensors");
    let a = Tensor::from_vec(vec![1.0f32, 2.0], &[2], &Device::Cpu).unwrap();
    let b = Tensor::from_vec(vec![3.0f32], &[1], &Device::Cpu).unwrap();
    save(&path, &[("a", &a)], None).unwrap();
    save(&path, &[("b", &b)], None).unwrap();
    let loaded = load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(by_name(&loaded, "b").to_vec_f32().unwrap(), vec![3.0]);
    // Duplicate names: an error, and the previous file is untouched.
    let err = save(&path, &[("x", &a), ("x", &b)], None).unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
    assert_eq!(load(&path, &Device::Cpu).unwrap().len(), 1);
    // A directory that does not exist: an IO error naming the file.
    let missing_dir = dir.join("nope").join("x.safetensors");
    let err = save(&missing_dir, &[("a", &a)], None).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("x.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bf16_is_widened_to_f32_and_f16_is_kept() {
    // bf16 bit patterns of 1.0, -2.5, 0.15625 and 65536.0 (all exact).
    let bf16_bits: [u16; 4] = [0x3F80, 0xC020, 0x3E20, 0x4780];
    let f16_bits: [u16; 2] = [0x3C00, 0xC000]; // 1.0, -2.0
    let mut data: Vec<u8> = bf16_bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    data.extend(f16_bits.iter().flat_map(|b| b.to_le_bytes()));
    let file = raw_file(
        r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"h":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}}"#,
        &data,
    );
    let dir = scratch_dir("bf16");
    let path = dir.join("bf16.safetensors");
    std::fs::write(&path, &file).unwrap();
    for device in [Device::Cpu, test_gpu()] {
        let loaded = load(&path, &device).unwrap();
        // File order: w (offset 0) then h (offset 8).
        assert_eq!(loaded[0].0, "w");
        assert_eq!(loaded[1].0, "h");
        let w = &loaded[0].1;
        assert_eq!((w.shape(), w.dtype()), (&[2usize, 2][..], DType::F32));
        assert_eq!(w.to_vec_f32().unwrap(), vec![1.0, -2.5, 0.15625, 65536.0]);
        let h = &loaded[1].1;
        assert_eq!(h.dtype(), DType::F16);
        assert_eq!(h.to_vec_f32().unwrap(), vec![1.0, -2.0]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes `bytes` as a file and asserts that loading it fails with a safetensors error that
/// names the file and contains `needle`.
fn assert_rejected(dir: &Path, name: &str, bytes: &[u8], needle: &str) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = load(&path, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{name}: {err:?}");
    let message = err.to_string();
    assert!(message.contains(name), "{name}: {message}");
    assert!(message.contains(needle), "{name}: {message}");
    // In-memory loading rejects the same bytes.
    assert!(matches!(
        load_bytes(bytes, &Device::Cpu),
        Err(Error::Safetensors { .. })
    ));
}

#[test]
fn malformed_files_are_errors_naming_the_file() {
    let dir = scratch_dir("malformed");
    let good_header = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let good = raw_file(good_header, &[0u8; 16]);
    std::fs::write(dir.join("good.safetensors"), &good).unwrap();
    assert_eq!(
        load(&dir.join("good.safetensors"), &Device::Cpu)
            .unwrap()
            .len(),
        1
    );

    // Missing file: an IO error naming it.
    let missing = dir.join("missing.safetensors");
    let err = load(&missing, &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.safetensors"), "{err}");

    // Shorter than the 8-byte length prefix.
    assert_rejected(
        &dir,
        "tiny.safetensors",
        &good[..5],
        "shorter than the 8-byte",
    );
    // Empty file.
    assert_rejected(&dir, "empty.safetensors", &[], "shorter than the 8-byte");
    // Truncated in the data section.
    assert_rejected(
        &dir,
        "truncated-data.safetensors",
        &good[..good.len() - 3],
        "truncated",
    );
    // Truncated in the header.
    assert_rejected(
        &dir,
        "truncated-header.safetensors",
        &good[..20],
        "larger than the file",
    );
    // Header length larger than the file.
    let mut long = good.clone();
    long[..8].copy_from_slice(&(good.len() as u64 + 100).to_le_bytes());
    assert_rejected(
        &dir,
        "header-length.safetensors",
        &long,
        "larger than the file",
    );
    // A header length near u64::MAX (no overflow, no giant allocation).
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_rejected(&dir, "huge-header.safetensors", &huge, "");
    // Malformed JSON.
    assert_rejected(
        &dir,
        "json.safetensors",
        &raw_file(r#"{"w":{"dtype":"F32","shape":[2,2],"#, &[0u8; 16]),
        "malformed JSON",
    );
    // Valid JSON, wrong structure.
    assert_rejected(
        &dir,
        "structure.safetensors",
        &raw_file(r#"{"w":[1,2,3]}"#, &[]),
        "malformed JSON",
    );
    // Not UTF-8.
    let mut bad_utf8 = good.clone();
    bad_utf8[9] = 0xFF;
    assert_rejected(&dir, "utf8.safetensors", &bad_utf8, "UTF-8");
    // Data offsets beyond the data.
    assert_rejected(
        &dir,
        "offsets.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#,
            &[0u8; 16],
        ),
        "out of bounds",
    );
    // Offsets that skip bytes (not contiguous).
    assert_rejected(
        &dir,
        "gap.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            &[0u8; 16],
        ),
        "\"w\"",
    );
    // Shape and byte length disagree.
    assert_rejected(
        &dir,
        "shape.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#,
            &[0u8; 16],
        ),
        "does not match its shape",
    );
    // A shape whose element count overflows.
    assert_rejected(
        &dir,
        "overflow.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,16]}}"#,
            &[0u8; 16],
        ),
        "",
    );
    // A dtype lathe does not load: the error names the tensor and the dtype.
    assert_rejected(
        &dir,
        "dtype.safetensors",
        &raw_file(
            r#"{"steps":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#,
            &[0u8; 16],
        ),
        "tensor \"steps\" has dtype I64",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raw bits of a tensor's host values, for bit-for-bit comparisons.
fn bits(t: &Tensor) -> Vec<u32> {
    match t.dtype() {
        DType::U32 => t.to_vec_u32().unwrap(),
        _ => t
            .to_vec_f32()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
    }
}

#[test]
fn streaming_load_equals_the_whole_file_parse_and_reads_only_what_is_asked() {
    use lathe_core::safetensors::{SafetensorsFile, StoredDType};
    let dir = scratch_dir("streaming");
    let w = Tensor::rand_uniform(-1.0, 1.0, &[33, 17], 3, &Device::Cpu).unwrap();
    let h = Tensor::rand_uniform(-1.0, 1.0, &[40], 4, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let ids = Tensor::from_vec(vec![5u32, 1, 9], &[3], &Device::Cpu).unwrap();
    let path = dir.join("model.safetensors");
    save(&path, &[("w", &w), ("h", &h), ("ids", &ids)], None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let whole = load_bytes(&bytes, &Device::Cpu).unwrap();
    let streamed = load(&path, &Device::Cpu).unwrap();
    assert_eq!(
        whole.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        streamed.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "same names in the same (file) order"
    );
    for ((_, a), (_, b)) in whole.iter().zip(&streamed) {
        assert_eq!((a.shape(), a.dtype()), (b.shape(), b.dtype()));
        assert_eq!(bits(a), bits(b));
    }
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.info("h"), Some((StoredDType::F16, &[40usize][..])));
    assert_eq!(file.read_bytes("h").unwrap().len(), 80);
    assert_eq!(bits(&file.read("w", &Device::Cpu).unwrap()), bits(&w));
    let missing = file.read("nope", &Device::Cpu).unwrap_err().to_string();
    assert!(
        missing.contains("nope") && missing.contains("model.safetensors"),
        "{missing}"
    );
    // A file cut short after opening (a shard replaced under a running load) is an error
    // naming it when the tensor is read, not garbage.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = file.read("w", &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}
