//! Bad input is an error that names the file (and the record, the columns there are, the
//! type found), never a panic: missing and mistyped columns, malformed records, truncated
//! and corrupted Parquet and Arrow bytes, empty files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use lathe_data::{read_labelled, read_messages, read_preferences, read_texts, DataError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "lathe-data-bad-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write(name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_missing_column_names_the_columns_there_are() {
    for ext in [
        "snappy.parquet",
        "zstd.parquet",
        "stream.arrow",
        "file.arrow",
    ] {
        let name = format!("preferences.{ext}");
        let e = read_texts(fixture(&name), "text").unwrap_err();
        assert!(matches!(e, DataError::MissingColumn { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("no column \"text\" in ")
                && msg.contains(&name)
                && msg.ends_with("(columns: prompt, chosen, rejected)"),
            "{msg}"
        );
        let e = read_preferences(
            fixture(&format!("texts.{ext}")),
            "prompt",
            "chosen",
            "rejected",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no column \"prompt\"") && e.contains("(columns: text)"),
            "{e}"
        );
        let e = read_labelled(fixture(&format!("texts.{ext}")), "text", "label")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no column \"label\""), "{e}");
    }
    // In JSON, the record and its keys.
    let path = write("prefs.jsonl", "{\"prompt\": \"p\", \"chosen\": \"a\"}\n");
    let e = read_preferences(&path, "prompt", "chosen", "rejected")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prefs.jsonl: line 1: no \"rejected\" field (keys: chosen, prompt)"),
        "{e}"
    );
    let path = write("texts.json", r#"["fine", {"body": "x"}]"#);
    let e = read_texts(&path, "text").unwrap_err().to_string();
    assert!(
        e.contains("texts.json: record 2: no \"text\" field (keys: body)"),
        "{e}"
    );
}

#[test]
fn a_column_of_the_wrong_type_is_named_with_its_type() {
    for ext in ["snappy.parquet", "stream.arrow", "file.arrow"] {
        let name = format!("labelled.{ext}");
        let e = read_texts(fixture(&name), "label").unwrap_err();
        assert!(matches!(e, DataError::ColumnType { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&name) && msg.contains("\"label\" is Int64, expected a string"),
            "{msg}"
        );
        let e = read_messages(fixture(&format!("texts.{ext}")), "text")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"text\" is Utf8") && e.contains("expected a list"),
            "{e}"
        );
        let e = read_labelled(fixture(&format!("messages.{ext}")), "messages", "messages")
            .unwrap_err()
            .to_string();
        assert!(e.contains("column \"messages\" is List"), "{e}");
    }
}

#[test]
fn bad_records_are_errors_naming_the_record() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "a.jsonl",
            "{\"text\": \"a\"}\n{oops\n",
            "a.jsonl: line 2: invalid JSON",
        ),
        (
            "b.jsonl",
            "{\"text\": 3}\n",
            "b.jsonl: line 1: \"text\" is 3, not a string",
        ),
        (
            "c.jsonl",
            "\n{\"text\": null}\n",
            "c.jsonl: line 2: \"text\" is null, not a string",
        ),
        (
            "d.json",
            "[\"a\", 7]",
            "d.json: record 2: expected a string or an object",
        ),
        ("f.json", "[\"a\", ", "f.json: invalid JSON"),
    ];
    for (name, content, want) in cases {
        let e = read_texts(write(name, content), "text")
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
    // A .json file that is not an array is read as JSONL.
    assert_eq!(
        read_texts(write("one.json", "{\"text\": \"a\"}\n"), "text").unwrap(),
        ["a"]
    );
    let e = read_texts(write("bytes.txt", b"ok\n\xff\xfe\n"), "text")
        .unwrap_err()
        .to_string();
    assert!(e.contains("bytes.txt: line 2: not UTF-8"), "{e}");

    let labelled: &[(&str, &str)] = &[
        (
            "{\"text\": \"fine\", \"label\": 1}\n{\"text\": \"no label\"}\n",
            "line 2: missing label",
        ),
        ("{\"text\": \" \", \"label\": 0}\n", "line 1: empty text"),
        (
            "[{\"text\": \"x\", \"label\": \"neutral\"}]",
            "record 1: label \"neutral\" is not binary",
        ),
        (
            "{\"text\": \"x\", \"label\": 0.5}\n",
            "label 0.5 is not an integer",
        ),
        ("[]", "no labelled examples in the file"),
        (
            "[{\"text\": \"\", \"label\": null}]",
            "no labelled examples",
        ),
    ];
    for (i, (content, want)) in labelled.iter().enumerate() {
        let ext = if content.starts_with('[') {
            "json"
        } else {
            "jsonl"
        };
        let e = read_labelled(write(&format!("l{i}.{ext}"), content), "text", "label")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(want) && e.contains(&format!("l{i}.")),
            "{content}: {e}"
        );
    }

    let prefs: &[(&str, &str)] = &[
        (
            "{\"prompt\": \"p\", \"chosen\": \"  \", \"rejected\": \"b\"}\n",
            "line 1: \"chosen\" is empty",
        ),
        (
            "{\"prompt\": 3, \"chosen\": \"a\", \"rejected\": \"b\"}\n",
            "\"prompt\" is 3, not a string",
        ),
        ("\n\n", "no preference records in the file"),
        ("[1]", "record 1: not an object"),
    ];
    for (i, (content, want)) in prefs.iter().enumerate() {
        let ext = if content.starts_with('[') {
            "json"
        } else {
            "jsonl"
        };
        let e = read_preferences(
            write(&format!("p{i}.{ext}"), content),
            "prompt",
            "chosen",
            "rejected",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want), "{content}: {e}");
    }

    let messages: &[(&str, &str)] = &[
        (
            "{\"messages\": []}\n",
            "line 1: \"messages\" has no messages",
        ),
        (
            "{\"messages\": \"hi\"}\n",
            "\"messages\" is a string, not a list of messages",
        ),
        (
            "{\"messages\": [{\"role\": \"user\"}]}\n",
            "message 1 has no string \"content\" (missing)",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": null}]}\n",
            "message 1 has no string \"content\" (null)",
        ),
        ("{\"messages\": [\"hi\"]}\n", "message 1 is a string"),
        ("{\"turns\": []}\n", "no \"messages\" field (keys: turns)"),
    ];
    for (i, (content, want)) in messages.iter().enumerate() {
        let e = read_messages(write(&format!("m{i}.jsonl"), content), "messages")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(want) && e.contains(&format!("m{i}.jsonl")),
            "{content}: {e}"
        );
    }
    // Plain text holds texts only.
    let e = read_preferences(write("pairs.txt", "a\n"), "prompt", "chosen", "rejected")
        .unwrap_err()
        .to_string();
    assert!(e.contains("pairs.txt") && e.contains("texts only"), "{e}");
}

#[test]
fn empty_and_absent_files_are_errors() {
    for ext in ["jsonl", "json", "txt", "parquet", "arrow", "feather", ""] {
        let name = format!("empty.{ext}");
        let e = read_texts(write(&name, ""), "text")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name), "{e}");
        if matches!(ext, "jsonl" | "json" | "txt" | "") {
            assert!(e.contains("no texts in the file"), "{e}");
        }
    }
    let e = read_texts(write("blank.jsonl", "\n \n"), "text")
        .unwrap_err()
        .to_string();
    assert!(e.contains("blank.jsonl: no texts in the file"), "{e}");
    let e = read_texts(scratch("absent.jsonl"), "text").unwrap_err();
    assert!(matches!(e, DataError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("absent.jsonl: cannot read"), "{e}");
    let dir = scratch("no_shards");
    std::fs::create_dir_all(&dir).unwrap();
    let e = read_texts(&dir, "text").unwrap_err().to_string();
    assert!(
        e.contains("no_shards") && e.contains("without .arrow or .parquet"),
        "{e}"
    );
}

/// Panics anywhere in the process while `f` runs, counted by a hook (a decoder panic
/// caught inside the reader still counts).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn read_all(path: &Path, name: &str, kind: &str) {
    let e = match kind {
        "texts" => read_texts(path, "text").err(),
        "labelled" => read_labelled(path, "text", "label").err(),
        "preferences" => read_preferences(path, "prompt", "chosen", "rejected").err(),
        _ => read_messages(path, "messages").err(),
    };
    if let Some(e) = e {
        assert!(e.to_string().contains(name), "error without the file: {e}");
    }
}

#[test]
fn truncated_and_corrupted_parquet_and_arrow_bytes_are_errors_not_panics() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        eprintln!("panic: {info}");
    }));
    let mut files = Vec::new();
    for name in ["texts", "labelled", "preferences", "messages"] {
        for ext in [
            "snappy.parquet",
            "zstd.parquet",
            "stream.arrow",
            "file.arrow",
        ] {
            files.push(format!("{name}.{ext}"));
        }
    }
    files.push("texts.dict.arrow".into());
    for name in &files {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let ext = name.rsplit('.').next().unwrap();
        let kind = name.split('.').next().unwrap();
        let cut_name = format!("cut-{name}");
        let path = scratch(&cut_name);
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            read_all(&path, &cut_name, kind);
        }
        // Every byte flipped, one at a time (every other one keeps the test quick).
        let flip_name = format!("flip-{name}");
        let path = scratch(&flip_name);
        for at in (0..bytes.len()).step_by(2) {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0xFF;
            std::fs::write(&path, &flipped).unwrap();
            read_all(&path, &flip_name, kind);
        }
        // Garbage under the right extension.
        let junk = format!("junk.{ext}");
        read_all(&write(&junk, "not a data file at all"), &junk, kind);
    }
    let _ = std::panic::take_hook();
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "decoders panicked (see stderr)"
    );
}
