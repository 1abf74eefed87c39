//! A merged chunk → its report rows: the record-level outcome of each row, or
//! one row per sink whose outcome was decided before sending.
//!
//! Rendering runs on worker threads (`pipeline`), once the merger has decided
//! duplicates and the state, so the single report thread only appends bytes:
//! formatting ≈ 2.5 report rows per input row was that thread's serial
//! ceiling (BENCHMARKS.md, issue 11). Parquet reports cannot be appended as
//! bytes; their rows go through [`Report::write`] on the report thread.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::record::{Chunk, Layout, Outcome};
use crate::report::{ChunkCounts, Encoding, Report, ReportError, ReportRow, RowEncoder, Status};
use crate::sink::{Check, SinkKind};

/// Where a chunk's rows go: the report itself, or a byte buffer.
pub trait RowOut {
    fn put(&mut self, row: &ReportRow<'_>) -> Result<(), ReportError>;
}

impl RowOut for Report {
    fn put(&mut self, row: &ReportRow<'_>) -> Result<(), ReportError> {
        self.write(row)
    }
}

/// A chunk's report rows, encoded, with their counts.
pub struct Rendered {
    /// The chunk's place in the run (the report keeps input order).
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub counts: ChunkCounts,
}

struct Buffer {
    encoder: RowEncoder,
    bytes: Vec<u8>,
    counts: ChunkCounts,
}

impl RowOut for Buffer {
    fn put(&mut self, row: &ReportRow<'_>) -> Result<(), ReportError> {
        self.counts.add(row.sink, row.status);
        self.encoder.encode(row, &mut self.bytes);
        Ok(())
    }
}

/// Writes the report rows a chunk decides by itself.
pub struct ChunkReport<'a> {
    pub layout: &'a Layout,
    /// The sinks, in config order (the order of a row's checks).
    pub kinds: &'a [SinkKind],
    pub dry_run: bool,
    /// Every input's name, by source index (for `duplicate of <source>:<row>`).
    pub source_names: &'a [Arc<str>],
}

impl ChunkReport<'_> {
    /// The chunk's rows, encoded off the report thread into `bytes`: an empty
    /// buffer, often one the report thread handed back ([`crate::recycle`]).
    pub fn render(
        &self,
        encoding: Encoding,
        chunk: &Chunk,
        checks: &[Check],
        mut bytes: Vec<u8>,
    ) -> Rendered {
        debug_assert!(bytes.is_empty(), "rows would follow another chunk's");
        // ≈ 2.5 rows of ≈ 100 bytes per input row: one allocation per chunk
        // (none for a recycled buffer, which keeps what it grew to).
        bytes.reserve(chunk.len() * 256);
        let mut buffer = Buffer {
            encoder: RowEncoder::new(encoding),
            bytes,
            counts: ChunkCounts::new(self.kinds.len()),
        };
        // A buffer cannot fail.
        let _ = self.write(&mut buffer, chunk, checks);
        Rendered {
            seq: chunk.seq,
            bytes: buffer.bytes,
            counts: buffer.counts,
        }
    }

    /// Puts every row of `chunk` whose outcome is known (`checks`: rows × sinks).
    pub fn write<O: RowOut>(
        &self,
        out: &mut O,
        chunk: &Chunk,
        checks: &[Check],
    ) -> Result<(), ReportError> {
        let layout = self.layout;
        let sinks = self.kinds.len();
        // One detail buffer per chunk, reused row after row.
        let mut detail = String::new();
        for (i, meta) in chunk.rows.iter().enumerate() {
            let raw_of = |k: u8| chunk.cell(i, layout.phones[k as usize]);
            let mut row = ReportRow {
                source: &chunk.source_name,
                row: meta.row,
                record_id: layout.id.map(|c| chunk.cell(i, c)).unwrap_or(""),
                phone_raw: "",
                phone_e164: None,
                sink: None,
                status: Status::Malformed,
                http_status: None,
                attempts: 0,
                detail: "",
            };
            detail.clear();
            match &meta.outcome {
                Outcome::Pending => continue,
                Outcome::Malformed(why) => {
                    row.phone_raw = first_non_empty_phone(chunk, i, layout);
                    row.detail = why;
                }
                Outcome::InvalidPhone { raw_column, reason } => {
                    row.phone_raw = raw_column.map(raw_of).unwrap_or("");
                    row.status = Status::InvalidPhone;
                    let _ = write!(detail, "{reason}");
                    row.detail = &detail;
                }
                Outcome::Duplicate {
                    raw_column,
                    phone,
                    first,
                } => {
                    row.phone_raw = raw_of(*raw_column);
                    row.phone_e164 = Some(*phone);
                    row.status = Status::Duplicate;
                    let first_name = self
                        .source_names
                        .get(first.source as usize)
                        .map_or("?", |n| &**n);
                    let _ = write!(detail, "duplicate of {first_name}:{}", first.row);
                    row.detail = &detail;
                }
                Outcome::Unique { raw_column, phone } => {
                    row.phone_raw = raw_of(*raw_column);
                    row.phone_e164 = Some(*phone);
                    self.put_checks(out, &mut row, &checks[i * sinks..(i + 1) * sinks])?;
                    continue;
                }
            }
            out.put(&row)?;
        }
        Ok(())
    }

    /// One row per sink whose outcome was decided before sending.
    fn put_checks<'r, O: RowOut>(
        &self,
        out: &mut O,
        row: &mut ReportRow<'r>,
        checks: &'r [Check],
    ) -> Result<(), ReportError> {
        for (kind, check) in self.kinds.iter().zip(checks) {
            row.sink = Some(*kind);
            let (status, detail) = match check {
                // In a real run the sink reports this row when its request ends.
                Check::Ready { .. } if !self.dry_run => continue,
                Check::Ready { .. } => (Status::DryRun, ""),
                Check::Unchanged => (Status::Unchanged, ""),
                Check::Unknown(d) => (Status::Unknown, &**d),
                Check::Rejected(d) => (Status::Rejected, &**d),
                Check::Skipped(d) => (Status::Skipped, &**d),
            };
            row.status = status;
            row.detail = detail;
            out.put(row)?;
        }
        Ok(())
    }
}

/// The phone text of a malformed row: its first non-empty phone cell, if any was read.
fn first_non_empty_phone<'a>(chunk: &'a Chunk, i: usize, layout: &Layout) -> &'a str {
    layout
        .phones
        .iter()
        .map(|&c| chunk.cell(i, c))
        .find(|v| !v.trim().is_empty())
        .unwrap_or("")
}
