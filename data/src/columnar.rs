//! Parquet and Arrow IPC files, a record batch at a time: the columns asked for are
//! projected, checked against the schema, and each row becomes a JSON object of them for
//! the readers of `lib.rs`.
//!
//! Arrow IPC messages are framed here (continuation marker, metadata length, flatbuffer
//! `Message`, body) so that every length is checked against what is left of the file before
//! a byte is allocated for it; the flatbuffers are verified and the batches decoded (and
//! validated) by `arrow-ipc`. A decoder panic on malformed bytes would be a bug upstream;
//! it is caught and reported as a malformed file all the same.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_buffer::{Buffer, MutableBuffer};
use arrow_ipc::{MessageHeader, MetadataVersion};
use arrow_schema::{DataType, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Number, Value};

use crate::source::{Column, Expect, Sink};
use crate::{DataError, Location, Result};

/// Rows per Parquet record batch.
const PARQUET_BATCH_ROWS: usize = 1024;

fn format_err(path: &Path, detail: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs a decoder, turning a panic into an error naming the file.
fn guarded(path: &Path, what: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(format_err(
            path,
            format!("a malformed {what} file (the decoder failed: {message})"),
        ))
    })
}

// ---------------------------------------------------------------------------------------
// Schema checks

fn is_text(dt: &DataType) -> bool {
    match dt {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null => true,
        DataType::Dictionary(_, values) => is_text(values),
        _ => false,
    }
}

fn is_label(dt: &DataType) -> bool {
    match dt {
        DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float16
        | DataType::Float32
        | DataType::Float64 => true,
        DataType::Dictionary(_, values) => is_label(values),
        other => is_text(other),
    }
}

fn is_messages(dt: &DataType) -> bool {
    let item = match dt {
        DataType::Null => return true,
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => f,
        _ => return false,
    };
    match item.data_type() {
        DataType::Struct(fields) => ["role", "content"].iter().all(|name| {
            fields
                .iter()
                .any(|f| f.name() == name && is_text(f.data_type()))
        }),
        _ => false,
    }
}

/// The schema's column for each of `columns` (its index and name); a missing column or one
/// of the wrong type is an error.
fn resolve(path: &Path, schema: &Schema, columns: &[Column]) -> Result<Vec<(usize, String)>> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for column in columns {
        let found = column
            .names
            .iter()
            .find_map(|name| schema.index_of(name).ok().map(|i| (i, name.to_string())));
        let Some((index, name)) = found else {
            return Err(DataError::MissingColumn {
                path: path.to_path_buf(),
                column: column.names[0].to_string(),
                found: schema.fields().iter().map(|f| f.name().clone()).collect(),
            });
        };
        let dt = schema.field(index).data_type();
        let (ok, expected) = match column.expect {
            Expect::Text => (is_text(dt), "a string column"),
            Expect::Label => (
                is_label(dt),
                "an integer, boolean or string (class name) column",
            ),
            Expect::Messages => (
                is_messages(dt),
                "a list of {role: string, content: string} structs",
            ),
        };
        if !ok {
            return Err(DataError::ColumnType {
                path: path.to_path_buf(),
                column: name,
                found: dt.to_string(),
                expected,
            });
        }
        if !out.iter().any(|(i, _)| *i == index) {
            out.push((index, name));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Rows as JSON

/// The dictionary key at `row` of a dictionary array's keys, as an index.
fn key_at(keys: &dyn Array, row: usize) -> Option<usize> {
    macro_rules! key {
        ($($t:ty),*) => {
            $(if let Some(k) = keys.as_primitive_opt::<$t>() {
                return usize::try_from(k.value(row)).ok();
            })*
        };
    }
    key!(Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type);
    None
}

fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

fn list_values(values: ArrayRef) -> Value {
    Value::Array((0..values.len()).map(|i| value_at(&values, i)).collect())
}

/// Element `row` of `array` as JSON (types outside the schema checks above come back as
/// null: they are never the columns read).
fn value_at(array: &dyn Array, row: usize) -> Value {
    if matches!(array.data_type(), DataType::Null) || array.is_null(row) {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int8 => array.as_primitive::<Int8Type>().value(row).into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row).into(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row).into(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).into(),
        DataType::UInt8 => array.as_primitive::<UInt8Type>().value(row).into(),
        DataType::UInt16 => array.as_primitive::<UInt16Type>().value(row).into(),
        DataType::UInt32 => array.as_primitive::<UInt32Type>().value(row).into(),
        DataType::UInt64 => array.as_primitive::<UInt64Type>().value(row).into(),
        DataType::Float16 => float(array.as_primitive::<Float16Type>().value(row).to_f64()),
        DataType::Float32 => float(array.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => float(array.as_primitive::<Float64Type>().value(row)),
        DataType::Utf8 => array.as_string::<i32>().value(row).into(),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row).into(),
        DataType::Utf8View => array.as_string_view().value(row).into(),
        DataType::List(_) => list_values(array.as_list::<i32>().value(row)),
        DataType::LargeList(_) => list_values(array.as_list::<i64>().value(row)),
        DataType::FixedSizeList(_, _) => list_values(array.as_fixed_size_list().value(row)),
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let map: Map<String, Value> = fields
                .iter()
                .zip(s.columns())
                .map(|(f, c)| (f.name().clone(), value_at(c, row)))
                .collect();
            Value::Object(map)
        }
        DataType::Dictionary(_, _) => {
            let dict = array.as_any_dictionary();
            match key_at(dict.keys(), row) {
                Some(k) if k < dict.values().len() => value_at(dict.values(), k),
                _ => Value::Null,
            }
        }
        _ => Value::Null,
    }
}

/// Feeds the rows of `batch` (holding at least the `columns`) to `sink`; `rows` counts the
/// rows of the file so far.
fn feed(
    path: &Path,
    batch: &RecordBatch,
    columns: &[(usize, String)],
    rows: &mut usize,
    sink: &mut Sink,
) -> Result<()> {
    let arrays: Vec<(&str, &ArrayRef)> = columns
        .iter()
        .map(|(_, name)| {
            batch
                .column_by_name(name)
                .map(|a| (name.as_str(), a))
                .ok_or_else(|| format_err(path, format!("a record batch without {name:?}")))
        })
        .collect::<Result<_>>()?;
    for row in 0..batch.num_rows() {
        *rows += 1;
        let record: Map<String, Value> = arrays
            .iter()
            .map(|(name, array)| (name.to_string(), value_at(array.as_ref(), row)))
            .collect();
        sink(path, Location::Row(*rows), Value::Object(record))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Parquet

pub(crate) fn scan_parquet(path: &Path, columns: &[Column], sink: &mut Sink) -> Result<()> {
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let corrupt = |e: parquet::errors::ParquetError| format_err(path, format!("Parquet: {e}"));
    guarded(path, "Parquet", || {
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(corrupt)?;
        // The column chunks lie inside the file (`ColumnChunkMetaData::byte_range` panics
        // on negative positions, and the reader would seek past the end).
        for (g, group) in builder.metadata().row_groups().iter().enumerate() {
            for chunk in group.columns() {
                let start = chunk
                    .dictionary_page_offset()
                    .unwrap_or(chunk.data_page_offset());
                let len = chunk.compressed_size();
                let inside = u64::try_from(start)
                    .ok()
                    .zip(u64::try_from(len).ok())
                    .and_then(|(s, l)| s.checked_add(l))
                    .is_some_and(|end| end <= file_len);
                if !inside {
                    return Err(format_err(
                        path,
                        format!(
                            "Parquet: row group {g}: a column chunk of {len} bytes at {start}, \
                             outside the file ({file_len} bytes)"
                        ),
                    ));
                }
            }
        }
        let resolved = resolve(path, builder.schema(), columns)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), resolved.iter().map(|c| c.0));
        let reader = builder
            .with_projection(mask)
            .with_batch_size(PARQUET_BATCH_ROWS)
            .build()
            .map_err(corrupt)?;
        let mut rows = 0;
        for batch in reader {
            let batch = batch.map_err(|e| format_err(path, format!("Parquet: {e}")))?;
            feed(path, &batch, &resolved, &mut rows, sink)?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Arrow IPC

/// Reads framed IPC messages from a file, never past `end`.
struct Messages<'p> {
    path: &'p Path,
    reader: BufReader<File>,
    pos: u64,
    end: u64,
}

impl<'p> Messages<'p> {
    fn seek(&mut self, pos: u64) -> Result<()> {
        self.reader
            .seek(SeekFrom::Start(pos))
            .map_err(io_err(self.path))?;
        self.pos = pos;
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.reader.read_exact(buf).map_err(io_err(self.path))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn left(&self) -> u64 {
        self.end.saturating_sub(self.pos)
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// The next message's metadata (flatbuffer bytes) and body; `None` at the end-of-stream
    /// marker or at the end of the bytes.
    fn next(&mut self) -> Result<Option<(Vec<u8>, Buffer)>> {
        let at = self.pos;
        match self.left() {
            0 => return Ok(None),
            1..=3 => {
                return Err(format_err(
                    self.path,
                    format!("truncated Arrow stream at byte {at}"),
                ))
            }
            _ => {}
        }
        let mut len = self.u32()?;
        if len == 0xFFFF_FFFF {
            if self.left() < 4 {
                return Err(format_err(
                    self.path,
                    format!("truncated Arrow stream at byte {at}"),
                ));
            }
            len = self.u32()?;
        }
        if len == 0 {
            return Ok(None);
        }
        if len > i32::MAX as u32 || u64::from(len) > self.left() {
            return Err(format_err(
                self.path,
                format!(
                    "truncated Arrow message at byte {at}: its metadata claims {len} bytes, {} are left",
                    self.left()
                ),
            ));
        }
        let mut meta = vec![0u8; len as usize];
        self.read_exact(&mut meta)?;
        let message = arrow_ipc::root_as_message(&meta).map_err(|e| {
            format_err(
                self.path,
                format!("invalid Arrow message at byte {at}: {e}"),
            )
        })?;
        let body_len = message.bodyLength();
        let body_len = u64::try_from(body_len)
            .ok()
            .filter(|n| *n <= self.left())
            .ok_or_else(|| {
                format_err(
                    self.path,
                    format!(
                        "truncated Arrow message body at byte {at}: it claims {body_len} bytes, {} are left",
                        self.left()
                    ),
                )
            })?;
        let mut body = MutableBuffer::from_len_zeroed(body_len as usize);
        self.read_exact(body.as_slice_mut())?;
        Ok(Some((meta, body.into())))
    }
}

fn open_messages(path: &Path) -> Result<Messages<'_>> {
    let file = File::open(path).map_err(io_err(path))?;
    let end = file.metadata().map_err(io_err(path))?.len();
    Ok(Messages {
        path,
        reader: BufReader::new(file),
        pos: 0,
        end,
    })
}

/// A stream's schema, the columns read (index, name) and their indices in order.
struct Projected {
    schema: SchemaRef,
    columns: Vec<(usize, String)>,
    indices: Vec<usize>,
}

/// The decoding state of an IPC stream or file: schema, projection, dictionaries.
struct Decoder<'a> {
    path: &'a Path,
    columns: &'a [Column<'a>],
    schema: Option<Projected>,
    dictionaries: HashMap<i64, ArrayRef>,
    rows: usize,
}

impl<'a> Decoder<'a> {
    fn new(path: &'a Path, columns: &'a [Column<'a>]) -> Decoder<'a> {
        Decoder {
            path,
            columns,
            schema: None,
            dictionaries: HashMap::new(),
            rows: 0,
        }
    }

    fn set_schema(&mut self, fb: arrow_ipc::Schema) -> Result<()> {
        let schema = arrow_ipc::convert::try_fb_to_schema(fb)
            .map_err(|e| format_err(self.path, format!("invalid Arrow schema: {e}")))?;
        let columns = resolve(self.path, &schema, self.columns)?;
        let mut indices: Vec<usize> = columns.iter().map(|c| c.0).collect();
        indices.sort_unstable();
        self.schema = Some(Projected {
            schema: Arc::new(schema),
            columns,
            indices,
        });
        Ok(())
    }

    fn arrow_err(&self, e: arrow_schema::ArrowError) -> DataError {
        format_err(self.path, format!("invalid Arrow data: {e}"))
    }

    /// Decodes one message (not a schema one): a dictionary or a record batch.
    fn message(&mut self, meta: &[u8], body: &Buffer, sink: &mut Sink) -> Result<()> {
        let path = self.path;
        let message = arrow_ipc::root_as_message(meta)
            .map_err(|e| format_err(path, format!("invalid Arrow message: {e}")))?;
        let version: MetadataVersion = message.version();
        let Some(Projected {
            schema,
            columns: resolved,
            indices: projection,
        }) = &self.schema
        else {
            return Err(format_err(path, "an Arrow message before the schema"));
        };
        match message.header_type() {
            MessageHeader::DictionaryBatch => {
                let batch = message
                    .header_as_dictionary_batch()
                    .ok_or_else(|| format_err(path, "an Arrow dictionary without its header"))?;
                let schema = schema.clone();
                arrow_ipc::reader::read_dictionary(
                    body,
                    batch,
                    &schema,
                    &mut self.dictionaries,
                    &version,
                )
                .map_err(|e| self.arrow_err(e))
            }
            MessageHeader::RecordBatch => {
                let batch = message
                    .header_as_record_batch()
                    .ok_or_else(|| format_err(path, "an Arrow record batch without its header"))?;
                let batch = arrow_ipc::reader::read_record_batch(
                    body,
                    batch,
                    schema.clone(),
                    &self.dictionaries,
                    Some(projection),
                    &version,
                )
                .map_err(|e| self.arrow_err(e))?;
                feed(path, &batch, resolved, &mut self.rows, sink)
            }
            MessageHeader::Schema => Err(format_err(path, "a second schema in an Arrow stream")),
            other => Err(format_err(
                path,
                format!("Arrow message type {other:?} is not supported"),
            )),
        }
    }
}

/// An Arrow IPC stream (HF datasets' `.arrow` files): a schema message, then dictionaries
/// and record batches.
pub(crate) fn scan_arrow_stream(path: &Path, columns: &[Column], sink: &mut Sink) -> Result<()> {
    let mut messages = open_messages(path)?;
    guarded(path, "Arrow", || {
        let mut decoder = Decoder::new(path, columns);
        while let Some((meta, body)) = messages.next()? {
            let message = arrow_ipc::root_as_message(&meta)
                .map_err(|e| format_err(path, format!("invalid Arrow message: {e}")))?;
            if message.header_type() == MessageHeader::Schema && decoder.schema.is_none() {
                let schema = message
                    .header_as_schema()
                    .ok_or_else(|| format_err(path, "an Arrow schema message without a schema"))?;
                decoder.set_schema(schema)?;
            } else {
                decoder.message(&meta, &body, sink)?;
            }
        }
        if decoder.schema.is_none() {
            return Err(format_err(path, "not an Arrow IPC stream (no schema)"));
        }
        Ok(())
    })
}

/// An Arrow IPC file: `ARROW1`, the stream, a footer (schema and the blocks' positions),
/// its length, `ARROW1`.
pub(crate) fn scan_arrow_file(path: &Path, columns: &[Column], sink: &mut Sink) -> Result<()> {
    let mut messages = open_messages(path)?;
    guarded(path, "Arrow", || {
        let len = messages.end;
        if len < 18 {
            return Err(format_err(path, "too short for an Arrow IPC file"));
        }
        messages.seek(len - 10)?;
        let mut trailer = [0u8; 10];
        messages.read_exact(&mut trailer)?;
        if &trailer[4..] != b"ARROW1" {
            return Err(format_err(
                path,
                "an Arrow IPC file without its closing ARROW1 magic (truncated?)",
            ));
        }
        let footer_len = i32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
        let footer_len = u64::try_from(footer_len)
            .ok()
            .filter(|n| *n <= len - 18)
            .ok_or_else(|| {
                format_err(
                    path,
                    format!("an Arrow footer of {footer_len} bytes in a file of {len}"),
                )
            })?;
        let footer_at = len - 10 - footer_len;
        messages.seek(footer_at)?;
        let mut footer_bytes = vec![0u8; footer_len as usize];
        messages.read_exact(&mut footer_bytes)?;
        let footer = arrow_ipc::root_as_footer(&footer_bytes)
            .map_err(|e| format_err(path, format!("invalid Arrow footer: {e}")))?;
        let schema = footer
            .schema()
            .ok_or_else(|| format_err(path, "an Arrow footer without a schema"))?;
        let mut decoder = Decoder::new(path, columns);
        decoder.set_schema(schema)?;
        let blocks: Vec<u64> = footer
            .dictionaries()
            .into_iter()
            .flatten()
            .chain(footer.recordBatches().into_iter().flatten())
            .map(|b| {
                u64::try_from(b.offset())
                    .ok()
                    .filter(|o| *o < footer_at)
                    .ok_or_else(|| {
                        format_err(
                            path,
                            format!("an Arrow block at {} outside the file", b.offset()),
                        )
                    })
            })
            .collect::<Result<_>>()?;
        messages.end = footer_at;
        for offset in blocks {
            messages.seek(offset)?;
            let (meta, body) = messages
                .next()?
                .ok_or_else(|| format_err(path, format!("no Arrow message at byte {offset}")))?;
            decoder.message(&meta, &body, sink)?;
        }
        Ok(())
    })
}
