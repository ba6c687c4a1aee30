//! Training data for lathe: one reader for the files users have.
//!
//! Four kinds of table, each from any of the formats below:
//! - [`read_texts`]: texts (SFT, PPO and GRPO prompts, `lathe generate`, `lathe score`);
//! - [`read_labelled`]: labelled texts (reward-model training);
//! - [`read_preferences`]: preference pairs `{prompt, chosen, rejected}` (DPO);
//! - [`read_messages`]: conversations, trl's `{"messages": [{"role", "content"}, ...]}`.
//!
//! Formats, chosen by the extension, then by the first bytes:
//! - `.jsonl`: one JSON value a line (blank lines skipped); `.json`: an array of values (a
//!   `.json` or `.jsonl` file is read as an array when it starts with `[`, as lines
//!   otherwise). A value is an object with the named fields; for texts a bare string is a
//!   text too.
//! - `.txt` (and, for texts, any unknown extension): one text per non-empty line.
//! - `.parquet` (the `PAR1` magic): through the `parquet` crate (snappy and zstd pages).
//! - Arrow IPC: the *file* format (`.arrow`, `.feather`, `.ipc`, ... recognised by the
//!   `ARROW1` magic, not the extension) and the *stream* format, which is what Hugging Face
//!   `datasets` writes (`save_to_disk` and the cache's `.arrow` files).
//! - A directory: its `.arrow` and `.parquet` files in name order (a `save_to_disk` folder,
//!   `data-00000-of-00002.arrow`, ...).
//!
//! Invariants:
//! - Bad input is a [`DataError`], never a panic; every error names the file, and a record's
//!   error names the record ([`Location`]: JSONL and text `line N`, JSON `record N`, Parquet
//!   and Arrow `row N`, all counting from 1). A column that is not there names the columns
//!   that are; a column of the wrong type names its type.
//! - Parquet and Arrow files are read a record batch at a time, only the columns asked for;
//!   every length an Arrow message claims is checked against the file before anything is
//!   allocated for it. JSONL and text are read a line at a time.
//! - A file without records is an error ("no texts in the file", ...).
#![warn(missing_docs)]

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod columnar;
mod source;

use source::{Column, Expect, Kind};

/// Where a record is in its file, counting from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// A line of a JSONL or text file.
    Line(usize),
    /// An entry of a JSON array.
    Record(usize),
    /// A row of a Parquet or Arrow file.
    Row(usize),
}

impl Location {
    /// The number, counting from 1.
    pub fn number(&self) -> usize {
        match *self {
            Location::Line(n) | Location::Record(n) | Location::Row(n) => n,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Record(n) => write!(f, "record {n}"),
            Location::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// Why a file could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file as a whole is malformed: not JSON, a corrupt Parquet or Arrow file, ...
    #[error("{}: {detail}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// One record is malformed or does not hold what the reader needs.
    #[error("{}: {at}: {detail}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// Where the record is.
        at: Location,
        /// What is wrong with it.
        detail: String,
    },
    /// A Parquet or Arrow file without the column asked for.
    #[error("no column {column:?} in {} (columns: {})", path.display(), found.join(", "))]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column asked for.
        column: String,
        /// The columns the file has.
        found: Vec<String>,
    },
    /// A Parquet or Arrow column whose type is not what the reader needs.
    #[error("{}: column {column:?} is {found}, expected {expected}", path.display())]
    ColumnType {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// Its Arrow type.
        found: String,
        /// What the reader needs ("a string column").
        expected: &'static str,
    },
    /// The file holds no records.
    #[error("{}: no {what} in the file", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was looked for ("texts", "preference records").
        what: &'static str,
    },
}

impl DataError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            DataError::Io { path, .. }
            | DataError::Format { path, .. }
            | DataError::Record { path, .. }
            | DataError::MissingColumn { path, .. }
            | DataError::ColumnType { path, .. }
            | DataError::Empty { path, .. } => path,
        }
    }
}

/// The result of every fallible function of lathe-data.
pub type Result<T> = std::result::Result<T, DataError>;

/// One preference record: `{"prompt", "chosen", "rejected"}` (trl's standard format).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The prompt both completions answer.
    pub prompt: String,
    /// The preferred completion.
    pub chosen: String,
    /// The dispreferred completion.
    pub rejected: String,
}

/// One turn of a conversation (trl's conversational format).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks: "system", "user" or "assistant".
    pub role: String,
    /// The turn's text.
    pub content: String,
}

/// One labelled text and where it was.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelledText {
    /// The text.
    pub text: String,
    /// The label as an integer (names such as "pos" already mapped to 1).
    pub label: i64,
    /// Where the record is in its file.
    pub at: Location,
}

/// The labelled texts of a file and how many blank records (an empty text without a label)
/// were skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct Labelled {
    /// The labelled texts, in file order.
    pub examples: Vec<LabelledText>,
    /// Blank records skipped.
    pub skipped: usize,
}

/// The texts of `path`: the string column (or JSON field) `column`; a JSON record that is a
/// string is taken as it is, and a text file gives one text per non-empty line. Empty texts
/// are kept; a null or missing one is an error.
pub fn read_texts(path: impl AsRef<Path>, column: &str) -> Result<Vec<String>> {
    let path = path.as_ref();
    let mut texts = Vec::new();
    let columns = [Column::new(&[column], Expect::Text)];
    source::scan(path, Kind::Texts, &columns, &mut |file, at, record| {
        let text = match record {
            Value::String(s) => s,
            Value::Object(mut map) => match map.remove(column) {
                Some(Value::String(s)) => s,
                Some(other) => return Err(not_a_string(file, at, column, &other)),
                None => return Err(no_field(file, at, &[column], &map)),
            },
            other => {
                return Err(record_err(
                    file,
                    at,
                    format!("expected a string or an object with a {column:?} field, got {other}"),
                ))
            }
        };
        texts.push(text);
        Ok(())
    })?;
    require_records(texts.len(), path, "texts")?;
    Ok(texts)
}

/// The labelled texts of `path`: a text column and a label column. With the default names
/// the conventional others are read too: `sentence` for `text` (GLUE) and `class` for
/// `label`. Labels are integers, booleans (0/1) or the names `neg`/`pos`,
/// `negative`/`positive` and `"0"`/`"1"` (any case), or integers as strings.
///
/// A blank record (an empty or missing text and a null or missing label) is skipped and
/// counted; a missing label on a text, or a label on an empty text, is an error naming the
/// record, and so is a file without any example.
pub fn read_labelled(
    path: impl AsRef<Path>,
    text_column: &str,
    label_column: &str,
) -> Result<Labelled> {
    let path = path.as_ref();
    let text_names: Vec<&str> = match text_column {
        "text" => vec!["text", "sentence"],
        other => vec![other],
    };
    let label_names: Vec<&str> = match label_column {
        "label" => vec!["label", "class"],
        other => vec![other],
    };
    let columns = [
        Column::new(&text_names, Expect::Text),
        Column::new(&label_names, Expect::Label),
    ];
    let mut out = Labelled {
        examples: Vec::new(),
        skipped: 0,
    };
    source::scan(path, Kind::Records, &columns, &mut |file, at, record| {
        let Value::Object(map) = record else {
            return Err(record_err(
                file,
                at,
                format!("not an object with {text_column:?} and {label_column:?} fields"),
            ));
        };
        let text = match first(&map, &text_names) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => return Err(not_a_string(file, at, text_names[0], other)),
        };
        let label = match first(&map, &label_names) {
            None => None,
            Some(v) => parse_label(v).map_err(|detail| record_err(file, at, detail))?,
        };
        match (text.trim().is_empty(), label) {
            (true, None) => out.skipped += 1,
            (true, Some(_)) => return Err(record_err(file, at, "empty text".into())),
            (false, None) => {
                return Err(record_err(
                    file,
                    at,
                    format!("missing label ({})", quoted(&label_names)),
                ))
            }
            (false, Some(label)) => out.examples.push(LabelledText { text, label, at }),
        }
        Ok(())
    })?;
    require_records(out.examples.len(), path, "labelled examples")?;
    Ok(out)
}

/// The preference pairs of `path`: three string columns (or fields). A record without one
/// of them, or with an empty chosen or rejected text, is an error naming it.
pub fn read_preferences(
    path: impl AsRef<Path>,
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> Result<Vec<PreferencePair>> {
    let path = path.as_ref();
    let names = [prompt, chosen, rejected];
    let columns = names.map(|n| Column::new(&[n], Expect::Text));
    let mut pairs = Vec::new();
    source::scan(path, Kind::Records, &columns, &mut |file, at, record| {
        let Value::Object(map) = record else {
            return Err(record_err(
                file,
                at,
                format!("not an object with {} fields", quoted(&names)),
            ));
        };
        if let Some(name) = names.iter().find(|n| !map.contains_key(**n)) {
            return Err(no_field(file, at, &[name], &map));
        }
        let take = |name: &str| match map.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(not_a_string(file, at, name, other)),
            None => Err(no_field(file, at, &[name], &map)),
        };
        let pair = PreferencePair {
            prompt: take(prompt)?,
            chosen: take(chosen)?,
            rejected: take(rejected)?,
        };
        for (name, text) in [(chosen, &pair.chosen), (rejected, &pair.rejected)] {
            if text.trim().is_empty() {
                return Err(record_err(file, at, format!("{name:?} is empty")));
            }
        }
        pairs.push(pair);
        Ok(())
    })?;
    require_records(pairs.len(), path, "preference records")?;
    Ok(pairs)
}

/// The conversations of `path`: column (or field) `column` holds a list of
/// `{"role", "content"}` (in Parquet and Arrow a `list<struct<role: string, content:
/// string>>`). An empty conversation, or a turn without a string role or content, is an
/// error naming the record.
pub fn read_messages(path: impl AsRef<Path>, column: &str) -> Result<Vec<Vec<Message>>> {
    let path = path.as_ref();
    let columns = [Column::new(&[column], Expect::Messages)];
    let mut conversations = Vec::new();
    source::scan(path, Kind::Records, &columns, &mut |file, at, record| {
        let Value::Object(mut map) = record else {
            return Err(record_err(
                file,
                at,
                format!("not an object with a {column:?} field"),
            ));
        };
        let messages = take_messages(file, at, column, &mut map)?;
        conversations.push(messages);
        Ok(())
    })?;
    require_records(conversations.len(), path, "conversations")?;
    Ok(conversations)
}

/// The non-empty list of `{"role", "content"}` turns in field `column` of a record.
fn take_messages(
    file: &Path,
    at: Location,
    column: &str,
    map: &mut serde_json::Map<String, Value>,
) -> Result<Vec<Message>> {
    let turns = match map.remove(column) {
        Some(Value::Array(turns)) => turns,
        Some(other) => {
            return Err(record_err(
                file,
                at,
                format!("{column:?} is {}, not a list of messages", kind_of(&other)),
            ))
        }
        None => return Err(no_field(file, at, &[column], map)),
    };
    if turns.is_empty() {
        return Err(record_err(file, at, format!("{column:?} has no messages")));
    }
    turns
        .into_iter()
        .enumerate()
        .map(|(i, turn)| {
            let get = |turn: &mut serde_json::Map<String, Value>, key: &str| match turn.remove(key)
            {
                Some(Value::String(s)) => Ok(s),
                other => Err(record_err(
                    file,
                    at,
                    format!(
                        "message {} has no string {key:?} ({})",
                        i + 1,
                        other.map_or("missing".into(), |v| kind_of(&v).to_string())
                    ),
                )),
            };
            match turn {
                Value::Object(mut turn) => Ok(Message {
                    role: get(&mut turn, "role")?,
                    content: get(&mut turn, "content")?,
                }),
                other => Err(record_err(
                    file,
                    at,
                    format!(
                        "message {} is {}, not a {{\"role\", \"content\"}} object",
                        i + 1,
                        kind_of(&other)
                    ),
                )),
            }
        })
        .collect()
}

/// One conversational preference record (trl's conversational preference format): the
/// prompt's turns, then the chosen and the rejected continuation's turns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConversationPair {
    /// The conversation so far.
    pub prompt: Vec<Message>,
    /// The preferred continuation's turns.
    pub chosen: Vec<Message>,
    /// The dispreferred continuation's turns.
    pub rejected: Vec<Message>,
}

/// The conversational preference pairs of `path`: three columns (or fields) of message
/// lists, `{"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
/// "rejected": [...]}`. A record missing one, or with an empty list, is an error naming it.
pub fn read_preference_conversations(
    path: impl AsRef<Path>,
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> Result<Vec<ConversationPair>> {
    let path = path.as_ref();
    let names = [prompt, chosen, rejected];
    let columns = names.map(|n| Column::new(&[n], Expect::Messages));
    let mut pairs = Vec::new();
    source::scan(path, Kind::Records, &columns, &mut |file, at, record| {
        let Value::Object(mut map) = record else {
            return Err(record_err(
                file,
                at,
                format!("not an object with {} fields", quoted(&names)),
            ));
        };
        pairs.push(ConversationPair {
            prompt: take_messages(file, at, prompt, &mut map)?,
            chosen: take_messages(file, at, chosen, &mut map)?,
            rejected: take_messages(file, at, rejected, &mut map)?,
        });
        Ok(())
    })?;
    require_records(pairs.len(), path, "preference records")?;
    Ok(pairs)
}

/// [`DataError::Empty`] when a file gave no record (`count` 0) of `what`.
fn require_records(count: usize, path: &Path, what: &'static str) -> Result<()> {
    if count == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            what,
        });
    }
    Ok(())
}

/// A label: `None` for null.
fn parse_label(value: &Value) -> std::result::Result<Option<i64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(i64::from(*b))),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
            _ => Err(format!("label {n} is not an integer")),
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "neg" | "negative" => Ok(Some(0)),
            "pos" | "positive" => Ok(Some(1)),
            other => other.trim().parse::<i64>().map(Some).map_err(|_| {
                format!("label {s:?} is not binary (0/1, neg/pos, negative/positive) or an integer")
            }),
        },
        other => Err(format!("label {other} is not an integer")),
    }
}

fn first<'a>(map: &'a serde_json::Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names.iter().find_map(|n| map.get(*n))
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(" or ")
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn record_err(path: &Path, at: Location, detail: String) -> DataError {
    DataError::Record {
        path: path.to_path_buf(),
        at,
        detail,
    }
}

fn not_a_string(path: &Path, at: Location, field: &str, value: &Value) -> DataError {
    let shown = match value {
        Value::Null => "null".to_string(),
        other => {
            let s = other.to_string();
            if s.len() > 60 {
                let head: String = s.chars().take(50).collect();
                format!("{} ({head}...)", kind_of(other))
            } else {
                s
            }
        }
    };
    record_err(path, at, format!("{field:?} is {shown}, not a string"))
}

fn no_field(
    path: &Path,
    at: Location,
    names: &[&str],
    map: &serde_json::Map<String, Value>,
) -> DataError {
    record_err(
        path,
        at,
        format!(
            "no {} field (keys: {})",
            quoted(names),
            map.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    )
}
