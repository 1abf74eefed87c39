//! The per-record report: one row per input row (record-level outcomes) or
//! per enabled sink — the single place where rows are accounted for.
//!
//! The format follows the path's extension: `.csv`, `.jsonl` or `.parquet`.
//! [`Report`] also keeps the counts per (sink, status) from which the end-of-run
//! summary is printed, so the summary can never disagree with the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use arrow_array::builder::{StringBuilder, UInt16Builder, UInt32Builder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::phone::E164;
use crate::sink::SinkKind;

/// Report columns, in order (SPEC "The per-record report").
pub const COLUMNS: [&str; 10] = [
    "source",
    "row",
    "record_id",
    "phone_raw",
    "phone_e164",
    "sink",
    "status",
    "http_status",
    "attempts",
    "detail",
];

/// Every status of SPEC, record-level first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Malformed,
    InvalidPhone,
    Duplicate,
    Sent,
    Created,
    Updated,
    Deleted,
    NotFound,
    Unchanged,
    DryRun,
    Rejected,
    Failed,
    Unknown,
    Skipped,
}

/// Number of [`Status`] values (the width of [`ChunkCounts`]).
const STATUSES: usize = Status::Skipped as usize + 1;

impl Status {
    /// Every status, in declaration order (`ALL[s as usize] == s`).
    const ALL: [Status; STATUSES] = [
        Status::Malformed,
        Status::InvalidPhone,
        Status::Duplicate,
        Status::Sent,
        Status::Created,
        Status::Updated,
        Status::Deleted,
        Status::NotFound,
        Status::Unchanged,
        Status::DryRun,
        Status::Rejected,
        Status::Failed,
        Status::Unknown,
        Status::Skipped,
    ];

    fn from_index(index: usize) -> Status {
        Status::ALL[index]
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Malformed => "malformed",
            Status::InvalidPhone => "invalid_phone",
            Status::Duplicate => "duplicate",
            Status::Sent => "sent",
            Status::Created => "created",
            Status::Updated => "updated",
            Status::Deleted => "deleted",
            Status::NotFound => "not_found",
            Status::Unchanged => "unchanged",
            Status::DryRun => "dry_run",
            Status::Rejected => "rejected",
            Status::Failed => "failed",
            Status::Unknown => "unknown",
            Status::Skipped => "skipped",
        }
    }

    /// Whether a row with this status makes the run exit 2 (SPEC "Exit codes").
    pub fn is_problem(self) -> bool {
        matches!(
            self,
            Status::Rejected | Status::Failed | Status::Unknown | Status::Skipped
        )
    }
}

/// One report row, borrowing its text from wherever it lives.
#[derive(Clone, Copy, Debug)]
pub struct ReportRow<'a> {
    pub source: &'a str,
    pub row: u64,
    pub record_id: &'a str,
    pub phone_raw: &'a str,
    pub phone_e164: Option<E164>,
    pub sink: Option<SinkKind>,
    pub status: Status,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub detail: &'a str,
}

/// A problem writing the report (exit 1: the run cannot vouch for its rows).
#[derive(Debug, thiserror::Error)]
#[error("report {path}: {message}")]
pub struct ReportError {
    pub path: PathBuf,
    pub message: String,
}

/// Counts per (sink, status) of a batch of rows, in a flat array: counting a
/// row is one add, where a [`Counts`] map costs a tree walk (see BENCHMARKS.md,
/// issue 11). Merged into the report's [`Counts`] once per batch.
#[derive(Clone, Debug)]
pub struct ChunkCounts(Vec<u64>);

impl ChunkCounts {
    /// Room for record-level rows and `sinks` sink kinds.
    pub fn new(sinks: usize) -> ChunkCounts {
        ChunkCounts(vec![0; (sinks + 1) * STATUSES])
    }

    pub fn add(&mut self, sink: Option<SinkKind>, status: Status) {
        let slot = sink.map_or(0, |k| k.index() + 1) * STATUSES + status as usize;
        if slot >= self.0.len() {
            self.0.resize(slot + 1, 0);
        }
        self.0[slot] += 1;
    }

    fn merge_into(&self, counts: &mut Counts) {
        for (slot, &n) in self.0.iter().enumerate().filter(|(_, n)| **n > 0) {
            let sink = (slot / STATUSES).checked_sub(1).map(SinkKind::from_index);
            let status = Status::from_index(slot % STATUSES);
            *counts.entry((sink, status)).or_insert(0) += n;
        }
    }
}

/// How rows become bytes, for the formats that are text (CSV, JSONL). Cheap to
/// copy to other threads: the render workers encode whole chunks with it, so
/// the report thread only appends their bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Csv,
    Jsonl,
}

impl Encoding {
    /// Appends `row` and its line end to `out`.
    pub fn encode(self, row: &ReportRow<'_>, out: &mut Vec<u8>) {
        match self {
            Encoding::Csv => encode_csv(row, out),
            Encoding::Jsonl => encode_jsonl(row, out),
        }
    }
}

/// Encodes a chunk's rows one after the other into one buffer, copying the
/// first five columns (source … phone_e164) of the row before when a row
/// repeats them — as each sink's row of a record does — instead of encoding
/// them again: they are most of a row's bytes, and a record has one report row
/// per sink (callgrind, issue 11).
pub struct RowEncoder {
    encoding: Encoding,
    /// The previous row's leading columns (compared by value, so any row may
    /// come next), and where their encoded bytes are in `out`.
    previous: Lead,
    encoded: Option<std::ops::Range<usize>>,
    /// `previous.source` as a CSV field: every row of a chunk has the same
    /// source, so it is scanned for quoting once, not once per record.
    source_csv: Vec<u8>,
}

/// A row's leading columns, owned: kept from one row to the next.
#[derive(Default)]
struct Lead {
    row: u64,
    phone_e164: Option<E164>,
    source: String,
    record_id: String,
    phone_raw: String,
}

impl Lead {
    fn matches(&self, r: &ReportRow<'_>) -> bool {
        self.row == r.row
            && self.phone_e164 == r.phone_e164
            && self.phone_raw == r.phone_raw
            && self.record_id == r.record_id
            && self.source == r.source
    }

    /// Takes `r`'s columns but its source (see [`RowEncoder::encode`]).
    fn set_after_source(&mut self, r: &ReportRow<'_>) {
        self.row = r.row;
        self.phone_e164 = r.phone_e164;
        for (mine, theirs) in [
            (&mut self.record_id, r.record_id),
            (&mut self.phone_raw, r.phone_raw),
        ] {
            mine.clear();
            mine.push_str(theirs);
        }
    }
}

impl RowEncoder {
    pub fn new(encoding: Encoding) -> RowEncoder {
        RowEncoder {
            encoding,
            previous: Lead::default(),
            encoded: None,
            source_csv: Vec::new(),
        }
    }

    /// Appends `row` to `out`, which must be the buffer of this encoder's
    /// earlier rows (their bytes are copied from it).
    pub fn encode(&mut self, row: &ReportRow<'_>, out: &mut Vec<u8>) {
        if self.encoding != Encoding::Csv {
            return self.encoding.encode(row, out);
        }
        match &self.encoded {
            Some(range) if range.end <= out.len() && self.previous.matches(row) => {
                out.extend_from_within(range.clone());
            }
            _ => {
                if self.previous.source != row.source {
                    self.previous.source.clear();
                    self.previous.source.push_str(row.source);
                    self.source_csv.clear();
                    csv_field(row.source.as_bytes(), &mut self.source_csv);
                }
                let start = out.len();
                out.extend_from_slice(&self.source_csv);
                encode_csv_lead_after_source(row, out);
                self.encoded = Some(start..out.len());
                self.previous.set_after_source(row);
            }
        }
        encode_csv_rest(row, out);
    }
}

/// The header line of a CSV report.
fn csv_header() -> Vec<u8> {
    let mut out = Vec::new();
    for (i, name) in COLUMNS.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        csv_field(name.as_bytes(), &mut out);
    }
    out.push(b'\n');
    out
}

/// One CSV row, byte for byte what `csv::Writer` (default settings) writes —
/// a proptest below holds it to that.
///
/// Written by hand because this is the run's hottest serial loop: about 2.5
/// report rows per input row, and `csv::Writer::write_record` cost ≈ 180
/// instructions per field (callgrind, issue 11) in its general state machine
/// (any delimiter, quote style, terminator, buffer boundary). Our fields are
/// short and the dialect is fixed, so one scan and one copy suffice.
fn encode_csv(r: &ReportRow<'_>, out: &mut Vec<u8>) {
    encode_csv_lead(r, out);
    encode_csv_rest(r, out);
}

/// The first five columns of a CSV row, and the comma after them.
fn encode_csv_lead(r: &ReportRow<'_>, out: &mut Vec<u8>) {
    csv_field(r.source.as_bytes(), out);
    encode_csv_lead_after_source(r, out);
}

/// [`encode_csv_lead`] without the source field.
fn encode_csv_lead_after_source(r: &ReportRow<'_>, out: &mut Vec<u8>) {
    let mut numbers = itoa::Buffer::new();
    out.push(b',');
    out.extend_from_slice(numbers.format(r.row).as_bytes());
    out.push(b',');
    csv_field(r.record_id.as_bytes(), out);
    out.push(b',');
    csv_field(r.phone_raw.as_bytes(), out);
    out.push(b',');
    if let Some(p) = r.phone_e164 {
        out.push(b'+');
        out.extend_from_slice(numbers.format(p.0).as_bytes());
    }
    out.push(b',');
}

/// The columns of a CSV row after [`encode_csv_lead`]'s, and the line end.
fn encode_csv_rest(r: &ReportRow<'_>, out: &mut Vec<u8>) {
    let mut numbers = itoa::Buffer::new();
    out.extend_from_slice(r.sink.map(SinkKind::name).unwrap_or("").as_bytes());
    out.push(b',');
    out.extend_from_slice(r.status.name().as_bytes());
    out.push(b',');
    if let Some(s) = r.http_status {
        out.extend_from_slice(numbers.format(s).as_bytes());
    }
    out.push(b',');
    // Almost always 0 (a dry run, a decided row) or a few: one byte, not a
    // formatter call, for ≈ 2.5 report rows per input row.
    match r.attempts {
        n @ 0..=9 => out.push(b'0' + n as u8),
        n => out.extend_from_slice(numbers.format(n).as_bytes()),
    }
    out.push(b',');
    csv_field(r.detail.as_bytes(), out);
    out.push(b'\n');
}

/// The same row written by `csv::Writer`: the reference [`Encoding::Csv`] is
/// held to (a proptest) and timed against (`benches/pipeline.rs`).
#[doc(hidden)]
pub fn write_with_csv_crate<W: std::io::Write>(
    r: &ReportRow<'_>,
    w: &mut csv::Writer<W>,
) -> csv::Result<()> {
    let e164 = r.phone_e164.map(|p| p.to_string()).unwrap_or_default();
    let http = r.http_status.map(|s| s.to_string()).unwrap_or_default();
    w.write_record([
        r.source,
        &r.row.to_string(),
        r.record_id,
        r.phone_raw,
        &e164,
        r.sink.map(SinkKind::name).unwrap_or(""),
        r.status.name(),
        &http,
        &r.attempts.to_string(),
        r.detail,
    ])
}

/// A field as RFC 4180 wants it: quoted (quotes doubled) only when it holds a
/// comma, a quote or a line break — `csv`'s `QuoteStyle::Necessary`.
fn csv_field(field: &[u8], out: &mut Vec<u8>) {
    /// Bytes that make a field quoted: one table load per byte instead of four compares.
    const SPECIAL: [bool; 256] = {
        let mut table = [false; 256];
        table[b',' as usize] = true;
        table[b'"' as usize] = true;
        table[b'\n' as usize] = true;
        table[b'\r' as usize] = true;
        table
    };
    if !field.iter().any(|&b| SPECIAL[b as usize]) {
        out.extend_from_slice(field);
        return;
    }
    out.push(b'"');
    for &b in field {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn encode_jsonl(r: &ReportRow<'_>, out: &mut Vec<u8>) {
    let row = JsonRow {
        source: r.source,
        row: r.row,
        record_id: r.record_id,
        phone_raw: r.phone_raw,
        phone_e164: r.phone_e164.map(|p| p.to_string()),
        sink: r.sink.map(SinkKind::name),
        status: r.status.name(),
        http_status: r.http_status,
        attempts: r.attempts,
        detail: r.detail,
    };
    // Serializing plain strings and numbers into memory cannot fail.
    let _ = serde_json::to_writer(&mut *out, &row);
    out.push(b'\n');
}

/// Where [`Report`] sends rows: a text file (CSV, JSONL) or Parquet.
trait Sink {
    fn write(&mut self, row: &ReportRow<'_>) -> Result<(), String>;
    /// Appends rows already encoded (text formats only).
    fn write_encoded(&mut self, bytes: &[u8]) -> Result<(), String>;
    /// Pushes buffered rows to the file (Parquet: none until the next row group).
    fn flush(&mut self) -> Result<(), String>;
    fn finish(self: Box<Self>) -> Result<(), String>;
}

/// Counts per (sink, status): what the summary prints.
pub type Counts = BTreeMap<(Option<SinkKind>, Status), u64>;

/// The report file being written.
pub struct Report {
    path: PathBuf,
    out: Box<dyn Sink + Send>,
    encoding: Option<Encoding>,
    counts: Counts,
    /// Deletes the previous report at this path (see [`fresh_file`]).
    replaced: Option<JoinHandle<()>>,
}

impl Report {
    /// Creates the report at `path` (replacing any file there); the format
    /// follows its extension.
    pub fn create(path: &Path) -> Result<Report, ReportError> {
        let err = |message: String| ReportError {
            path: path.to_owned(),
            message,
        };
        let lower = path.to_string_lossy().to_ascii_lowercase();
        let replaced = std::cell::Cell::new(None);
        let file = || {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| err(format!("cannot create its directory: {e}")))?;
            }
            let (file, cleanup) =
                fresh_file(path).map_err(|e| err(format!("cannot create: {e}")))?;
            replaced.set(cleanup);
            Ok(file)
        };
        let text = |encoding: Encoding, header: Vec<u8>| -> Result<_, ReportError> {
            // Smaller than a chunk's encoded rows (≈ 200 KB), which BufWriter
            // then writes straight to the file instead of copying them first.
            let mut w = BufWriter::with_capacity(64 * 1024, file()?);
            w.write_all(&header).map_err(|e| err(e.to_string()))?;
            let out: Box<dyn Sink + Send> = Box::new(TextSink {
                w,
                encoding,
                scratch: Vec::new(),
            });
            Ok((out, Some(encoding)))
        };
        let (out, encoding) = if lower.ends_with(".csv") {
            text(Encoding::Csv, csv_header())?
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            text(Encoding::Jsonl, Vec::new())?
        } else if lower.ends_with(".parquet") {
            let out: Box<dyn Sink + Send> = Box::new(ParquetSink::new(file()?).map_err(err)?);
            (out, None)
        } else {
            return Err(err(
                "unknown report format; name it .csv, .jsonl or .parquet".into(),
            ));
        };
        Ok(Report {
            path: path.to_owned(),
            out,
            encoding,
            counts: Counts::new(),
            replaced: replaced.take(),
        })
    }

    /// How other threads may encode rows for [`Report::write_encoded`]; `None`
    /// for Parquet, whose rows go through [`Report::write`].
    pub fn encoding(&self) -> Option<Encoding> {
        self.encoding
    }

    /// Appends rows another thread encoded with [`Report::encoding`], and their counts.
    pub fn write_encoded(&mut self, bytes: &[u8], counts: &ChunkCounts) -> Result<(), ReportError> {
        counts.merge_into(&mut self.counts);
        self.out
            .write_encoded(bytes)
            .map_err(|message| ReportError {
                path: self.path.clone(),
                message,
            })
    }

    /// Writes one row and counts it.
    pub fn write(&mut self, row: &ReportRow<'_>) -> Result<(), ReportError> {
        *self.counts.entry((row.sink, row.status)).or_insert(0) += 1;
        self.out.write(row).map_err(|message| ReportError {
            path: self.path.clone(),
            message,
        })
    }

    /// Pushes buffered rows to the file, so a run that is killed leaves the
    /// rows it finished.
    pub fn flush(&mut self) -> Result<(), ReportError> {
        self.out.flush().map_err(|message| ReportError {
            path: self.path.clone(),
            message,
        })
    }

    /// Flushes and closes the file; returns the counts.
    pub fn finish(self) -> Result<Counts, ReportError> {
        let path = self.path;
        if let Some(cleanup) = self.replaced {
            let _ = cleanup.join();
        }
        self.out
            .finish()
            .map_err(|message| ReportError { path, message })?;
        Ok(self.counts)
    }
}

/// Opens `path` as a new, empty file, with the permissions of the file it replaces.
///
/// An existing report is moved aside and deleted on a background thread, not
/// truncated: on ext4, truncating last night's 224 MB report blocked the run
/// for 70 ms, and a file truncated to zero is flushed to disk when it is closed
/// (`auto_da_alloc`), another 100 ms — together ≈ 13% of a 1M-row dry run's
/// wall time, with both cores idle (strace of `benches/e2e.sh`'s runs).
fn fresh_file(path: &Path) -> std::io::Result<(File, Option<JoinHandle<()>>)> {
    let old = std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file() && m.len() > 0);
    let Some(old) = old else {
        return Ok((File::create(path)?, None));
    };
    let mut aside_name = std::ffi::OsString::from(".");
    aside_name.push(path.file_name().unwrap_or_default());
    aside_name.push(format!(".replaced-{}", std::process::id()));
    let aside = path.with_file_name(aside_name);
    if std::fs::rename(path, &aside).is_err() {
        // A directory we may not write in: truncate in place, as before.
        return Ok((File::create(path)?, None));
    }
    let file = match File::create(path) {
        Ok(file) => file,
        Err(e) => {
            let _ = std::fs::rename(&aside, path);
            return Err(e);
        }
    };
    let _ = file.set_permissions(old.permissions());
    let cleanup = std::thread::spawn(move || {
        let _ = std::fs::remove_file(aside);
    });
    Ok((file, Some(cleanup)))
}

/// A CSV or JSONL report: encoded rows through a buffer to the file.
struct TextSink {
    w: BufWriter<File>,
    encoding: Encoding,
    /// One row's bytes, reused.
    scratch: Vec<u8>,
}

#[derive(serde::Serialize)]
struct JsonRow<'a> {
    source: &'a str,
    row: u64,
    record_id: &'a str,
    phone_raw: &'a str,
    phone_e164: Option<String>,
    sink: Option<&'static str>,
    status: &'static str,
    http_status: Option<u16>,
    attempts: u32,
    detail: &'a str,
}

impl Sink for TextSink {
    fn write(&mut self, r: &ReportRow<'_>) -> Result<(), String> {
        self.scratch.clear();
        self.encoding.encode(r, &mut self.scratch);
        self.w.write_all(&self.scratch).map_err(|e| e.to_string())
    }

    fn write_encoded(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.w.write_all(bytes).map_err(|e| e.to_string())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.w.flush().map_err(|e| e.to_string())
    }

    fn finish(mut self: Box<Self>) -> Result<(), String> {
        self.w.flush().map_err(|e| e.to_string())
    }
}

/// Rows buffered per Parquet record batch.
const PARQUET_BATCH: usize = 8192;

struct ParquetSink {
    writer: ArrowWriter<File>,
    schema: Arc<Schema>,
    source: StringBuilder,
    row: UInt64Builder,
    record_id: StringBuilder,
    phone_raw: StringBuilder,
    phone_e164: StringBuilder,
    sink: StringBuilder,
    status: StringBuilder,
    http_status: UInt16Builder,
    attempts: UInt32Builder,
    detail: StringBuilder,
    buffered: usize,
}

impl ParquetSink {
    fn new(file: File) -> Result<ParquetSink, String> {
        let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
        let schema = Arc::new(Schema::new(vec![
            text("source", false),
            Field::new("row", DataType::UInt64, false),
            text("record_id", false),
            text("phone_raw", false),
            text("phone_e164", true),
            text("sink", true),
            text("status", false),
            Field::new("http_status", DataType::UInt16, true),
            Field::new("attempts", DataType::UInt32, false),
            text("detail", false),
        ]));
        let writer = ArrowWriter::try_new(file, schema.clone(), None).map_err(|e| e.to_string())?;
        Ok(ParquetSink {
            writer,
            schema,
            source: StringBuilder::new(),
            row: UInt64Builder::new(),
            record_id: StringBuilder::new(),
            phone_raw: StringBuilder::new(),
            phone_e164: StringBuilder::new(),
            sink: StringBuilder::new(),
            status: StringBuilder::new(),
            http_status: UInt16Builder::new(),
            attempts: UInt32Builder::new(),
            detail: StringBuilder::new(),
            buffered: 0,
        })
    }

    fn flush_batch(&mut self) -> Result<(), String> {
        if self.buffered == 0 {
            return Ok(());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.source.finish()),
            Arc::new(self.row.finish()),
            Arc::new(self.record_id.finish()),
            Arc::new(self.phone_raw.finish()),
            Arc::new(self.phone_e164.finish()),
            Arc::new(self.sink.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.http_status.finish()),
            Arc::new(self.attempts.finish()),
            Arc::new(self.detail.finish()),
        ];
        let batch =
            RecordBatch::try_new(self.schema.clone(), columns).map_err(|e| e.to_string())?;
        self.writer.write(&batch).map_err(|e| e.to_string())?;
        self.buffered = 0;
        Ok(())
    }
}

impl Sink for ParquetSink {
    fn write_encoded(&mut self, _bytes: &[u8]) -> Result<(), String> {
        Err("internal: Parquet rows cannot come pre-encoded".into())
    }

    fn write(&mut self, r: &ReportRow<'_>) -> Result<(), String> {
        self.source.append_value(r.source);
        self.row.append_value(r.row);
        self.record_id.append_value(r.record_id);
        self.phone_raw.append_value(r.phone_raw);
        self.phone_e164
            .append_option(r.phone_e164.map(|p| p.to_string()));
        self.sink.append_option(r.sink.map(SinkKind::name));
        self.status.append_value(r.status.name());
        self.http_status.append_option(r.http_status);
        self.attempts.append_value(r.attempts);
        self.detail.append_value(r.detail);
        self.buffered += 1;
        if self.buffered >= PARQUET_BATCH {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        // A Parquet file is only readable once closed; rows go out per row group.
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), String> {
        self.flush_batch()?;
        self.writer.close().map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row<'a>(
        texts: &'a [String; 4],
        numbers: (u64, Option<u64>, Option<u16>, u32),
    ) -> ReportRow<'a> {
        ReportRow {
            source: &texts[0],
            row: numbers.0,
            record_id: &texts[1],
            phone_raw: &texts[2],
            phone_e164: numbers.1.map(E164),
            sink: Some(SinkKind::from_index(1)),
            status: Status::Rejected,
            http_status: numbers.2,
            attempts: numbers.3,
            detail: &texts[3],
        }
    }

    /// What the `csv` crate writes for the same row (the reference of `encode_csv`).
    fn with_csv_crate(r: &ReportRow<'_>) -> Vec<u8> {
        let mut w = csv::Writer::from_writer(Vec::new());
        write_with_csv_crate(r, &mut w).unwrap();
        w.into_inner().unwrap()
    }

    proptest! {
        /// Byte for byte what `csv::Writer` writes, for any text (quotes, commas,
        /// CR, LF, non-ASCII, empty) and any numbers.
        #[test]
        fn csv_encoding_matches_the_csv_crate(
            texts in proptest::array::uniform4("[a-z\",\r\n é+;]{0,12}"),
            numbers in (any::<u64>(), proptest::option::of(1u64..999_999_999_999_999), any::<Option<u16>>(), any::<u32>()),
        ) {
            let r = row(&texts, numbers);
            let mut ours = Vec::new();
            Encoding::Csv.encode(&r, &mut ours);
            prop_assert_eq!(ours, with_csv_crate(&r));
        }

        /// A record's rows (same leading columns, one per sink) and the next
        /// record's come out exactly as encoded one by one: copying the
        /// leading columns changes no byte.
        #[test]
        fn row_encoder_writes_what_encode_writes(
            records in proptest::collection::vec(
                (proptest::array::uniform4("[a-z\",\r\n é+;]{0,12}"), 1usize..4, any::<u64>(), any::<Option<u16>>(),
                 // The source: often the same as the record before (the encoder keeps its field).
                 prop_oneof![Just(""), Just("a.csv"), Just("b \"x\".csv"), Just("c,d.csv")]),
                1..8,
            ),
            encoding in prop_oneof![Just(Encoding::Csv), Just(Encoding::Jsonl)],
        ) {
            let mut encoder = RowEncoder::new(encoding);
            let (mut ours, mut reference) = (Vec::new(), Vec::new());
            for (texts, sinks, number, http, source) in &records {
                let mut texts = texts.clone();
                texts[0] = source.to_string();
                let texts = &texts;
                for sink in 0..*sinks {
                    let mut r = row(texts, (*number, Some(5511987654321), *http, sink as u32));
                    r.sink = Some(SinkKind::from_index(sink));
                    encoder.encode(&r, &mut ours);
                    encoding.encode(&r, &mut reference);
                }
            }
            prop_assert_eq!(ours, reference);
        }
    }

    #[test]
    fn csv_header_matches_the_csv_crate() {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(COLUMNS).unwrap();
        assert_eq!(csv_header(), w.into_inner().unwrap());
    }

    #[test]
    fn chunk_counts_merge_into_the_summary_counts() {
        let mut chunk = ChunkCounts::new(3);
        chunk.add(None, Status::InvalidPhone);
        chunk.add(Some(SinkKind::from_index(2)), Status::DryRun);
        chunk.add(Some(SinkKind::from_index(2)), Status::DryRun);
        chunk.add(Some(SinkKind::from_index(0)), Status::Skipped);
        let mut counts = Counts::new();
        chunk.merge_into(&mut counts);
        chunk.merge_into(&mut counts);
        let expected: Counts = [
            ((None, Status::InvalidPhone), 2),
            ((Some(SinkKind::from_index(2)), Status::DryRun), 4),
            ((Some(SinkKind::from_index(0)), Status::Skipped), 2),
        ]
        .into_iter()
        .collect();
        assert_eq!(counts, expected);
    }

    /// A run replaces last night's report by a new file (not a truncated
    /// one), keeps its permissions, and leaves nothing aside once finished.
    #[test]
    fn a_replaced_report_keeps_its_permissions_and_leaves_no_file_aside() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.csv");
        std::fs::write(&path, "last night's rows\n".repeat(1000)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut report = Report::create(&path).unwrap();
        report.flush().unwrap();
        report.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), csv_header());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["report.csv"]);
    }
}
