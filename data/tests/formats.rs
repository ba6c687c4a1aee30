//! Every reader on every format gives what it gives on the JSONL the fixtures were made
//! from (scripts/make_data_fixtures.py: pyarrow and HF datasets wrote the Parquet and Arrow
//! files from data/tests/fixtures/*.jsonl).

use std::path::{Path, PathBuf};

use lathe_data::{
    read_labelled, read_messages, read_preferences, read_texts, Labelled, Location, Message,
    PreferencePair,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The Parquet and Arrow files made from `<name>.jsonl`.
fn made_from(name: &str) -> Vec<PathBuf> {
    [
        "snappy.parquet",
        "zstd.parquet",
        "stream.arrow",
        "file.arrow",
    ]
    .iter()
    .map(|ext| fixture(&format!("{name}.{ext}")))
    .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-data-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// `<name>.jsonl` rewritten as a JSON array.
fn as_json_array(name: &str) -> PathBuf {
    let text = std::fs::read_to_string(fixture(&format!("{name}.jsonl"))).unwrap();
    let values: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let path = scratch(&format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&values).unwrap()).unwrap();
    path
}

#[test]
fn texts_are_the_same_in_every_format() {
    let want = read_texts(fixture("texts.jsonl"), "text").unwrap();
    assert_eq!(want.len(), 5);
    assert_eq!(want[2], "日本語のテキストも読めます。");
    assert_eq!(want[3], "", "an empty text is kept");
    assert!(want[4].contains('\n') && want[4].contains('🙂'));
    let mut inputs = made_from("texts");
    // Dictionary-encoded, two batches; a save_to_disk folder of two shards; a JSON array.
    inputs.extend([
        fixture("texts.dict.arrow"),
        fixture("texts_dataset"),
        as_json_array("texts"),
    ]);
    for path in inputs {
        assert_eq!(
            read_texts(&path, "text").unwrap(),
            want,
            "{}",
            path.display()
        );
    }
}

#[test]
fn plain_text_and_bare_strings_are_texts() {
    let txt = scratch("plain.txt");
    std::fs::write(&txt, "one\r\n\n  \ntwo ünïcode\nthree").unwrap();
    assert_eq!(
        read_texts(&txt, "ignored").unwrap(),
        ["one", "two ünïcode", "three"]
    );
    let jsonl = scratch("strings.jsonl");
    std::fs::write(&jsonl, "\"a\"\n\n{\"t\": \"b\"}\n").unwrap();
    assert_eq!(read_texts(&jsonl, "t").unwrap(), ["a", "b"]);
    let json = scratch("strings.json");
    std::fs::write(&json, r#"  ["a", {"t": "b"}]"#).unwrap();
    assert_eq!(read_texts(&json, "t").unwrap(), ["a", "b"]);
}

/// (text, label, record number) of each example, and the blank records skipped.
fn labelled(path: &Path) -> (Vec<(String, i64, usize)>, usize) {
    let Labelled { examples, skipped } =
        read_labelled(path, "text", "label").unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let examples = examples
        .into_iter()
        .map(|e| (e.text, e.label, e.at.number()))
        .collect();
    (examples, skipped)
}

#[test]
fn labelled_texts_are_the_same_in_every_format() {
    let want = labelled(&fixture("labelled.jsonl"));
    assert_eq!(want.1, 1, "the blank record with a null label is skipped");
    assert_eq!(want.0.len(), 4);
    assert_eq!(want.0[3], ("映画はつまらなかった。".into(), 0, 5));
    let mut inputs = made_from("labelled");
    inputs.push(as_json_array("labelled"));
    for path in inputs {
        assert_eq!(labelled(&path), want, "{}", path.display());
    }
    let arrow = read_labelled(fixture("labelled.stream.arrow"), "text", "label").unwrap();
    assert_eq!(arrow.examples[0].at, Location::Row(1));
}

#[test]
fn labels_by_other_names_and_kinds() {
    // "class" for "label", "sentence" for "text" (the defaults' aliases); booleans, names
    // and integers as strings.
    let path = scratch("kinds.json");
    std::fs::write(
        &path,
        r#"[{"sentence": "good", "class": 1}, {"text": "bad", "label": false},
            {"text": "ok", "label": "POS"}, {"text": "three", "label": "3"},
            {"text": "", "class": null}]"#,
    )
    .unwrap();
    let (examples, skipped) = labelled(&path);
    let labels: Vec<i64> = examples.iter().map(|e| e.1).collect();
    assert_eq!((labels, skipped), (vec![1, 0, 1, 3], 1));
    // Named columns.
    let path = scratch("named.jsonl");
    std::fs::write(&path, "{\"review\": \"fine\", \"stars\": 4}\n").unwrap();
    let got = read_labelled(&path, "review", "stars").unwrap();
    assert_eq!(
        (got.examples[0].text.as_str(), got.examples[0].label),
        ("fine", 4)
    );
}

#[test]
fn preference_pairs_are_the_same_in_every_format() {
    let want =
        read_preferences(fixture("preferences.jsonl"), "prompt", "chosen", "rejected").unwrap();
    assert_eq!(want.len(), 4);
    assert_eq!(
        want[2],
        PreferencePair {
            prompt: String::new(),
            chosen: "An answer without a prompt.".into(),
            rejected: "…".into(),
        }
    );
    let mut inputs = made_from("preferences");
    inputs.push(as_json_array("preferences"));
    for path in inputs {
        let got = read_preferences(&path, "prompt", "chosen", "rejected").unwrap();
        assert_eq!(got, want, "{}", path.display());
    }
    // Columns by other names: chosen and rejected swapped.
    let swapped = read_preferences(
        fixture("preferences.zstd.parquet"),
        "prompt",
        "rejected",
        "chosen",
    )
    .unwrap();
    assert_eq!(swapped[0].chosen, want[0].rejected);
}

#[test]
fn conversations_are_the_same_in_every_format() {
    let want = read_messages(fixture("messages.jsonl"), "messages").unwrap();
    assert_eq!(want.len(), 4);
    assert_eq!(
        want[0][2],
        Message {
            role: "assistant".into(),
            content: "Paris.".into(),
        }
    );
    assert_eq!(
        want[2],
        [Message {
            role: "user".into(),
            content: String::new()
        }]
    );
    assert_eq!(want[3].len(), 4);
    let mut inputs = made_from("messages");
    inputs.push(as_json_array("messages"));
    for path in inputs {
        assert_eq!(
            read_messages(&path, "messages").unwrap(),
            want,
            "{}",
            path.display()
        );
    }
}

#[test]
fn the_format_is_found_by_the_magic_when_the_extension_says_nothing() {
    for (from, to) in [
        ("texts.snappy.parquet", "texts.data"),
        ("texts.file.arrow", "texts.bin"),
        ("texts.stream.arrow", "texts.hf"),
    ] {
        let path = scratch(to);
        std::fs::copy(fixture(from), &path).unwrap();
        assert_eq!(read_texts(&path, "text").unwrap().len(), 5, "{from}");
    }
    // An IPC file under a stream's extension is still read as a file.
    let path = scratch("file_format.feather");
    std::fs::copy(fixture("texts.file.arrow"), &path).unwrap();
    assert_eq!(read_texts(&path, "text").unwrap().len(), 5);
}
