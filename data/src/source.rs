//! Records of a file, whatever its format: each record goes to a callback as a JSON value
//! with where it was. JSON and text files here; Parquet and Arrow in [`crate::columnar`].

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{columnar, DataError, Location, Result};

/// What a reader needs of a column, checked against a Parquet or Arrow schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Strings.
    Text,
    /// Integers, booleans, whole floats or strings.
    Label,
    /// A list of `{role, content}` structs.
    Messages,
}

/// A column a reader reads: the first of `names` present (the others are aliases).
#[derive(Clone, Debug)]
pub(crate) struct Column<'a> {
    pub names: Vec<&'a str>,
    pub expect: Expect,
}

impl<'a> Column<'a> {
    pub fn new(names: &[&'a str], expect: Expect) -> Column<'a> {
        Column {
            names: names.to_vec(),
            expect,
        }
    }
}

/// Whether a plain text file (one record per line) is a valid input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Texts: `.txt` and unknown extensions are text files.
    Texts,
    /// Records with fields: unknown extensions are JSON or JSONL.
    Records,
}

/// The callback a scan feeds: the file (one of a directory's), where, the record.
pub(crate) type Sink<'s> = dyn FnMut(&Path, Location, Value) -> Result<()> + 's;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Text,
    Parquet,
    ArrowFile,
    ArrowStream,
}

/// Feeds every record of `path` (a file, or a directory of `.arrow`/`.parquet` files) to
/// `sink`, stopping at the first error.
pub(crate) fn scan(path: &Path, kind: Kind, columns: &[Column], sink: &mut Sink) -> Result<()> {
    if path.is_dir() {
        for file in directory_files(path)? {
            scan_file(&file, kind, columns, sink)?;
        }
        return Ok(());
    }
    scan_file(path, kind, columns, sink)
}

/// The `.arrow` and `.parquet` files of a directory, by name.
fn directory_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let file = entry.map_err(io)?.path();
        let ext = extension(&file);
        if file.is_file() && (ext == "arrow" || ext == "parquet") {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::Format {
            path: dir.to_path_buf(),
            detail: "a directory without .arrow or .parquet files".into(),
        });
    }
    Ok(files)
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The format of a file: by extension, then (for unknown ones) by the first bytes.
fn format_of(path: &Path, kind: Kind) -> Result<Format> {
    let mut head = [0u8; 8];
    let mut n = 0;
    let mut file = open(path)?;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(DataError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    let head = &head[..n];
    let arrow = || {
        if head.starts_with(b"ARROW1") {
            Format::ArrowFile
        } else {
            Format::ArrowStream
        }
    };
    Ok(match extension(path).as_str() {
        "jsonl" | "json" | "ndjson" => Format::Json,
        "txt" => Format::Text,
        "parquet" | "pq" => Format::Parquet,
        "arrow" | "arrows" | "feather" | "ipc" | "stream" => arrow(),
        _ if head.starts_with(b"PAR1") => Format::Parquet,
        _ if head.starts_with(b"ARROW1") || head.starts_with(&[0xFF; 4]) => arrow(),
        _ => match kind {
            Kind::Texts => Format::Text,
            Kind::Records => Format::Json,
        },
    })
}

fn scan_file(path: &Path, kind: Kind, columns: &[Column], sink: &mut Sink) -> Result<()> {
    match format_of(path, kind)? {
        Format::Json => scan_json(path, sink),
        Format::Text if kind == Kind::Texts => scan_text(path, sink),
        Format::Text => Err(DataError::Format {
            path: path.to_path_buf(),
            detail: "a text file holds texts only; these records need JSONL, JSON, Parquet \
                     or Arrow"
                .into(),
        }),
        Format::Parquet => columnar::scan_parquet(path, columns, sink),
        Format::ArrowFile => columnar::scan_arrow_file(path, columns, sink),
        Format::ArrowStream => columnar::scan_arrow_stream(path, columns, sink),
    }
}

/// Lines of a file, one at a time, with their numbers (from 1); invalid UTF-8 is an error
/// naming the line.
fn for_each_line(path: &Path, mut f: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let mut reader = BufReader::new(open(path)?);
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let line = std::str::from_utf8(&buf).map_err(|e| DataError::Record {
            path: path.to_path_buf(),
            at: Location::Line(number),
            detail: format!("not UTF-8 text: {e}"),
        })?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        f(number, line)?;
    }
}

/// One text per non-empty line.
fn scan_text(path: &Path, sink: &mut Sink) -> Result<()> {
    for_each_line(path, |number, line| {
        if line.trim().is_empty() {
            return Ok(());
        }
        sink(
            path,
            Location::Line(number),
            Value::String(line.to_string()),
        )
    })
}

/// The first byte of `path` that is not ASCII whitespace.
fn first_byte(path: &Path) -> Result<Option<u8>> {
    let mut reader = BufReader::new(open(path)?);
    loop {
        let buf = reader.fill_buf().map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(&b) = buf.iter().find(|b| !b.is_ascii_whitespace()) {
            return Ok(Some(b));
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// A JSON array (the file starts with `[`) or JSONL.
fn scan_json(path: &Path, sink: &mut Sink) -> Result<()> {
    if first_byte(path)? == Some(b'[') {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| DataError::Format {
            path: path.to_path_buf(),
            detail: format!("invalid JSON: {e}"),
        })?;
        drop(text);
        let Value::Array(items) = value else {
            return Err(DataError::Format {
                path: path.to_path_buf(),
                detail: "expected a JSON array of records".into(),
            });
        };
        for (i, item) in items.into_iter().enumerate() {
            sink(path, Location::Record(i + 1), item)?;
        }
        return Ok(());
    }
    for_each_line(path, |number, line| {
        if line.trim().is_empty() {
            return Ok(());
        }
        let at = Location::Line(number);
        let value: Value = serde_json::from_str(line).map_err(|e| DataError::Record {
            path: path.to_path_buf(),
            at,
            detail: format!("invalid JSON: {e}"),
        })?;
        sink(path, at, value)
    })
}
