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

impl Status {
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

trait Sink {
    fn write(&mut self, row: &ReportRow<'_>) -> Result<(), String>;
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
    counts: Counts,
}

impl Report {
    /// Creates (truncates) the report at `path`; the format follows its extension.
    pub fn create(path: &Path) -> Result<Report, ReportError> {
        let err = |message: String| ReportError {
            path: path.to_owned(),
            message,
        };
        let lower = path.to_string_lossy().to_ascii_lowercase();
        let file = || {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| err(format!("cannot create its directory: {e}")))?;
            }
            File::create(path).map_err(|e| err(format!("cannot create: {e}")))
        };
        let out: Box<dyn Sink + Send> = if lower.ends_with(".csv") {
            let mut w = csv::WriterBuilder::new()
                .buffer_capacity(256 * 1024)
                .from_writer(file()?);
            w.write_record(COLUMNS).map_err(|e| err(e.to_string()))?;
            Box::new(CsvSink {
                w,
                buf: String::new(),
            })
        } else if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
            Box::new(JsonlSink {
                w: BufWriter::with_capacity(256 * 1024, file()?),
            })
        } else if lower.ends_with(".parquet") {
            Box::new(ParquetSink::new(file()?).map_err(err)?)
        } else {
            return Err(err(
                "unknown report format; name it .csv, .jsonl or .parquet".into(),
            ));
        };
        Ok(Report {
            path: path.to_owned(),
            out,
            counts: Counts::new(),
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
        self.out
            .finish()
            .map_err(|message| ReportError { path, message })?;
        Ok(self.counts)
    }
}

struct CsvSink {
    w: csv::Writer<File>,
    buf: String,
}

impl Sink for CsvSink {
    fn write(&mut self, r: &ReportRow<'_>) -> Result<(), String> {
        use std::fmt::Write as _;
        // Numbers are formatted into one scratch buffer, then sliced: no allocation per row.
        self.buf.clear();
        let _ = write!(self.buf, "{}", r.row);
        let row_end = self.buf.len();
        if let Some(p) = r.phone_e164 {
            p.write_to(&mut self.buf);
        }
        let e164_end = self.buf.len();
        if let Some(s) = r.http_status {
            let _ = write!(self.buf, "{s}");
        }
        let http_end = self.buf.len();
        let _ = write!(self.buf, "{}", r.attempts);
        let fields: [&str; 10] = [
            r.source,
            &self.buf[..row_end],
            r.record_id,
            r.phone_raw,
            &self.buf[row_end..e164_end],
            r.sink.map(SinkKind::name).unwrap_or(""),
            r.status.name(),
            &self.buf[e164_end..http_end],
            &self.buf[http_end..],
            r.detail,
        ];
        self.w.write_record(fields).map_err(|e| e.to_string())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.w.flush().map_err(|e| e.to_string())
    }

    fn finish(mut self: Box<Self>) -> Result<(), String> {
        self.w.flush().map_err(|e| e.to_string())
    }
}

struct JsonlSink {
    w: BufWriter<File>,
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

impl Sink for JsonlSink {
    fn write(&mut self, r: &ReportRow<'_>) -> Result<(), String> {
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
        serde_json::to_writer(&mut self.w, &row).map_err(|e| e.to_string())?;
        self.w.write_all(b"\n").map_err(|e| e.to_string())
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
