//! A minimal Arrow IPC stream reader: enough to read a utf8 text column and an integer
//! label column of flat, uncompressed record batches (HF datasets' `.arrow` cache files,
//! e.g. GLUE SST-2), without the arrow crates' dependency weight.
//!
//! The stream is a sequence of messages: `0xFFFFFFFF`, an i32 metadata length, a flatbuffer
//! `Message` (Schema first, then RecordBatches), then the message body; a zero length ends
//! it. Only what is needed of the flatbuffer schema (Arrow `Schema.fbs`/`Message.fbs`) is
//! decoded here. Unsupported: compression, dictionary-encoded or nested columns before or at
//! the columns read, big-endian data.
//!
//! Every position, length and count in the file is checked against the bytes that hold it
//! before it is used or allocated for: a malformed stream is an error naming the file, never
//! a panic, and memory grows with the file's size, not with what its headers claim.

use std::path::Path;

use crate::data::Example;
use crate::{Error, Result};

/// Arrow `Type` union tags (Schema.fbs).
const TYPE_NULL: u8 = 1;
const TYPE_INT: u8 = 2;
const TYPE_FLOAT: u8 = 3;
const TYPE_BINARY: u8 = 4;
const TYPE_UTF8: u8 = 5;
const TYPE_BOOL: u8 = 6;
const TYPE_LARGE_BINARY: u8 = 19;
const TYPE_LARGE_UTF8: u8 = 20;
/// `MessageHeader` union tags (Message.fbs).
const HEADER_SCHEMA: u8 = 1;
const HEADER_RECORD_BATCH: u8 = 3;

/// A flatbuffer: tables, vectors and strings at byte positions of `buf`.
struct Fb<'a> {
    buf: &'a [u8],
}

impl<'a> Fb<'a> {
    fn bytes<const N: usize>(&self, pos: usize) -> Result<[u8; N]> {
        // `get(pos..)` first: `pos + N` overflows for a position near usize::MAX.
        self.buf
            .get(pos..)
            .and_then(|s| s.get(..N))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::Config("arrow: flatbuffer read out of bounds".into()))
    }
    fn u32(&self, pos: usize) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(pos)?))
    }
    fn i64(&self, pos: usize) -> Result<i64> {
        Ok(i64::from_le_bytes(self.bytes(pos)?))
    }
    fn root(&self) -> Result<usize> {
        Ok(self.u32(0)? as usize)
    }
    /// The position of field `id` of the table at `table`, `None` when absent.
    fn field(&self, table: usize, id: usize) -> Result<Option<usize>> {
        let soffset = i32::from_le_bytes(self.bytes(table)?) as i64;
        let vtable = usize::try_from(table as i64 - soffset)
            .map_err(|_| Error::Config("arrow: flatbuffer vtable before the buffer".into()))?;
        let vlen = u16::from_le_bytes(self.bytes(vtable)?) as usize;
        let slot = 4 + 2 * id;
        if slot + 2 > vlen {
            return Ok(None);
        }
        let off = u16::from_le_bytes(self.bytes(vtable + slot)?) as usize;
        Ok((off != 0).then_some(table + off))
    }
    fn u8_field(&self, table: usize, id: usize) -> Result<u8> {
        Ok(match self.field(table, id)? {
            Some(p) => self.bytes::<1>(p)?[0],
            None => 0,
        })
    }
    fn i32_field(&self, table: usize, id: usize) -> Result<i32> {
        Ok(match self.field(table, id)? {
            Some(p) => i32::from_le_bytes(self.bytes(p)?),
            None => 0,
        })
    }
    fn i64_field(&self, table: usize, id: usize) -> Result<i64> {
        Ok(match self.field(table, id)? {
            Some(p) => self.i64(p)?,
            None => 0,
        })
    }
    /// Follows the offset stored at `pos`.
    fn deref(&self, pos: usize) -> Result<usize> {
        Ok(pos + self.u32(pos)? as usize)
    }
    fn table_field(&self, table: usize, id: usize) -> Result<Option<usize>> {
        self.field(table, id)?.map(|p| self.deref(p)).transpose()
    }
    /// (element start, length) of the vector field `id`, whose elements are `elem_size`
    /// bytes each: a length the buffer cannot hold is an error, so a caller may allocate
    /// for it.
    fn vector_field(&self, table: usize, id: usize, elem_size: usize) -> Result<(usize, usize)> {
        match self.field(table, id)? {
            Some(p) => {
                let v = self.deref(p)?;
                let len = self.u32(v)? as usize;
                let fits = len
                    .checked_mul(elem_size)
                    .and_then(|n| n.checked_add(v + 4))
                    .is_some_and(|end| end <= self.buf.len());
                if !fits {
                    return Err(Error::Config(format!(
                        "arrow: flatbuffer vector of {len} elements runs past the metadata"
                    )));
                }
                Ok((v + 4, len))
            }
            None => Ok((0, 0)),
        }
    }
    fn string_field(&self, table: usize, id: usize) -> Result<String> {
        let (start, len) = self.vector_field(table, id, 1)?;
        let bytes = self
            .buf
            .get(start..start + len)
            .ok_or_else(|| Error::Config("arrow: string out of bounds".into()))?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// A column of the schema: name, type tag, int width, and how many buffers it has.
#[derive(Clone, Debug)]
struct Column {
    name: String,
    type_tag: u8,
    bit_width: i32,
    buffers: usize,
}

fn read_schema(fb: &Fb, header: usize) -> Result<Vec<Column>> {
    let (start, len) = fb.vector_field(header, 1, 4)?;
    let mut columns = Vec::with_capacity(len);
    for i in 0..len {
        let field = fb.deref(start + 4 * i)?;
        let name = fb.string_field(field, 0)?;
        let type_tag = fb.u8_field(field, 2)?;
        let dictionary = fb.table_field(field, 4)?.is_some();
        let bit_width = match (type_tag, fb.table_field(field, 3)?) {
            (TYPE_INT, Some(t)) => fb.i32_field(t, 0)?,
            _ => 0,
        };
        let buffers = match type_tag {
            _ if dictionary => 0,
            TYPE_NULL => 0,
            TYPE_INT | TYPE_FLOAT | TYPE_BOOL => 2,
            TYPE_BINARY | TYPE_UTF8 | TYPE_LARGE_BINARY | TYPE_LARGE_UTF8 => 3,
            _ => 0,
        };
        columns.push(Column {
            name,
            type_tag: if dictionary { 0 } else { type_tag },
            bit_width,
            buffers,
        });
    }
    Ok(columns)
}

/// The texts and labels of one record batch.
fn read_batch(
    fb: &Fb,
    header: usize,
    body: &[u8],
    columns: &[Column],
    text_col: usize,
    label_col: usize,
) -> Result<Vec<(Option<String>, Option<i64>)>> {
    if fb.table_field(header, 3)?.is_some() {
        return Err(Error::Config(
            "arrow: compressed record batches are not supported".into(),
        ));
    }
    let rows = fb.i64_field(header, 0)?;
    let rows = usize::try_from(rows)
        .map_err(|_| Error::Config(format!("arrow: record batch of {rows} rows")))?;
    let (bufs, nbufs) = fb.vector_field(header, 2, 16)?;
    let buffer = |i: usize| -> Result<&[u8]> {
        if i >= nbufs {
            return Err(Error::Config(
                "arrow: record batch has too few buffers".into(),
            ));
        }
        let (offset, len) = (fb.i64(bufs + 16 * i)?, fb.i64(bufs + 16 * i + 8)?);
        usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(o, l)| body.get(o..o.checked_add(l)?))
            .ok_or_else(|| {
                Error::Config(format!(
                    "arrow: buffer {i} ({len} bytes at {offset}) outside the message body ({} \
                     bytes)",
                    body.len()
                ))
            })
    };
    // Each buffer must hold `rows` entries (Arrow's rule): the row count is then bounded by
    // the body's size before anything is allocated for it.
    let holds = |what: &str, buf: &[u8], need: Option<usize>| -> Result<()> {
        match need {
            Some(n) if buf.len() >= n => Ok(()),
            _ => Err(Error::Config(format!(
                "arrow: {what} buffer of {} bytes is too short for {rows} rows",
                buf.len()
            ))),
        }
    };
    let bitmap_ok = |what: &str, bitmap: &[u8]| -> Result<()> {
        if bitmap.is_empty() {
            return Ok(()); // no nulls
        }
        holds(what, bitmap, Some(rows.div_ceil(8)))
    };
    // The first buffer index of each column (flat columns only up to the ones read).
    let last = text_col.max(label_col);
    let mut first = Vec::with_capacity(last + 1);
    let mut next = 0;
    for col in &columns[..=last] {
        if col.buffers == 0 && col.type_tag != TYPE_NULL {
            return Err(Error::Config(format!(
                "arrow: column {:?} has a type lathe cannot skip (nested or dictionary)",
                col.name
            )));
        }
        first.push(next);
        next += col.buffers;
    }
    let valid = |bitmap: &[u8], i: usize| bitmap.is_empty() || bitmap[i / 8] & (1 << (i % 8)) != 0;
    // Text column.
    let text = &columns[text_col];
    let validity = buffer(first[text_col])?;
    let offsets = buffer(first[text_col] + 1)?;
    let data = buffer(first[text_col] + 2)?;
    let wide = text.type_tag == TYPE_LARGE_UTF8;
    bitmap_ok("text validity", validity)?;
    let offset_bytes = if wide { 8 } else { 4 };
    holds(
        "text offsets",
        offsets,
        rows.checked_add(1)
            .and_then(|n| n.checked_mul(offset_bytes)),
    )?;
    let offset_at = |i: usize| -> Result<usize> {
        let o = if wide {
            offsets
                .get(8 * i..8 * i + 8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
        } else {
            offsets
                .get(4 * i..4 * i + 4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as usize)
        };
        o.ok_or_else(|| Error::Config("arrow: offsets buffer too short".into()))
    };
    // Label column.
    let label = &columns[label_col];
    let lvalid = buffer(first[label_col])?;
    let ldata = buffer(first[label_col] + 1)?;
    let width = (label.bit_width / 8) as usize;
    bitmap_ok("label validity", lvalid)?;
    holds("label", ldata, rows.checked_mul(width))?;
    let mut out = Vec::with_capacity(rows);
    for i in 0..rows {
        let t = if valid(validity, i) {
            let (a, b) = (offset_at(i)?, offset_at(i + 1)?);
            let bytes = data
                .get(a..b)
                .ok_or_else(|| Error::Config("arrow: string data out of bounds".into()))?;
            Some(String::from_utf8_lossy(bytes).into_owned())
        } else {
            None
        };
        let l = if valid(lvalid, i) {
            let b = ldata
                .get(width * i..width * i + width)
                .ok_or_else(|| Error::Config("arrow: label data out of bounds".into()))?;
            let mut word = [0u8; 8];
            word[..width].copy_from_slice(b);
            // Sign-extend narrower signed ints.
            let v = i64::from_le_bytes(word);
            let shift = 64 - 8 * width as u32;
            Some(if shift > 0 { (v << shift) >> shift } else { v })
        } else {
            None
        };
        out.push((t, l));
    }
    Ok(out)
}

/// Reads `(text, label)` rows of an Arrow IPC stream: the text column is `sentence` or
/// `text` (utf8 / large utf8), the label column `label` (integer). Nulls come back as
/// `None`.
pub fn read_columns(path: &Path) -> Result<Vec<(Option<String>, Option<i64>)>> {
    let label = path.display().to_string();
    let file_err = |detail: String| Error::File {
        path: label.clone(),
        detail,
    };
    // The flatbuffer readers' errors, named by the file.
    let in_file = |e: Error| match e {
        Error::Config(detail) => file_err(detail),
        other => other,
    };
    let bytes = std::fs::read(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    let mut pos = 0usize;
    let mut columns: Option<Vec<Column>> = None;
    let mut picked = (0, 0);
    let mut rows = Vec::new();
    let read_u32 = |p: usize| -> Result<u32> {
        bytes
            .get(p..p + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| file_err("truncated Arrow stream".into()))
    };
    while pos + 4 <= bytes.len() {
        let mut len = read_u32(pos)?;
        pos += 4;
        if len == 0xFFFF_FFFF {
            len = read_u32(pos)?;
            pos += 4;
        }
        if len == 0 {
            break;
        }
        let meta = bytes
            .get(pos..pos + len as usize)
            .ok_or_else(|| file_err("truncated Arrow message".into()))?;
        pos += len as usize;
        let fb = Fb { buf: meta };
        let message = fb.root().map_err(in_file)?;
        let header_type = fb.u8_field(message, 1).map_err(in_file)?;
        let header = fb
            .table_field(message, 2)
            .map_err(in_file)?
            .ok_or_else(|| file_err("Arrow message without a header".into()))?;
        let body_len = fb.i64_field(message, 3).map_err(in_file)?;
        let body = usize::try_from(body_len)
            .ok()
            .and_then(|n| bytes.get(pos..pos.checked_add(n)?))
            .ok_or_else(|| {
                file_err(format!(
                    "truncated Arrow message body ({body_len} bytes at byte {pos}, the file has {})",
                    bytes.len()
                ))
            })?;
        let body_len = body.len();
        pos += body_len;
        match header_type {
            HEADER_SCHEMA => {
                let cols = read_schema(&fb, header).map_err(in_file)?;
                let find =
                    |names: &[&str]| cols.iter().position(|c| names.contains(&c.name.as_str()));
                let text = find(&["sentence", "text"])
                    .ok_or_else(|| file_err("no \"sentence\" or \"text\" column".into()))?;
                let lab = find(&["label"]).ok_or_else(|| file_err("no \"label\" column".into()))?;
                if !matches!(cols[text].type_tag, TYPE_UTF8 | TYPE_LARGE_UTF8) {
                    return Err(file_err(format!(
                        "column {:?} is not utf8",
                        cols[text].name
                    )));
                }
                if cols[lab].type_tag != TYPE_INT
                    || !matches!(cols[lab].bit_width, 8 | 16 | 32 | 64)
                {
                    return Err(file_err("column \"label\" is not an integer column".into()));
                }
                picked = (text, lab);
                columns = Some(cols);
            }
            HEADER_RECORD_BATCH => {
                let cols = columns
                    .as_ref()
                    .ok_or_else(|| file_err("record batch before the schema".into()))?;
                rows.extend(
                    read_batch(&fb, header, body, cols, picked.0, picked.1).map_err(in_file)?,
                );
            }
            other => {
                return Err(file_err(format!(
                    "Arrow message type {other} is not supported (dictionary batches, tensors)"
                )))
            }
        }
    }
    if columns.is_none() {
        return Err(file_err("not an Arrow IPC stream (no schema)".into()));
    }
    Ok(rows)
}

/// Labelled examples of an Arrow IPC stream, with the rules of [`crate::data`]: labels
/// must be 0 or 1 and texts non-empty (errors name the row, counting from 1).
pub fn read_labelled(path: &Path) -> Result<Vec<Example>> {
    let label = path.display().to_string();
    read_columns(path)?
        .into_iter()
        .enumerate()
        .map(|(i, (text, lab))| {
            let err = |detail: String| Error::Data {
                path: label.clone(),
                record: i + 1,
                detail,
            };
            let text = text.unwrap_or_default();
            if text.trim().is_empty() {
                return Err(err("empty text".into()));
            }
            match lab {
                Some(l @ (0 | 1)) => Ok(Example {
                    text,
                    label: l as u32,
                }),
                Some(l) => Err(err(format!("label {l} is not binary (0 or 1)"))),
                None => Err(err("missing label".into())),
            }
        })
        .collect()
}
