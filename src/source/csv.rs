//! CSV/TSV (optionally gzipped, optionally windows-1252) through the `csv` crate.
//!
//! - One `ByteRecord` is reused for every row: no allocation per row.
//! - The delimiter is sniffed from the first 64 KiB unless configured.
//! - A UTF-8 BOM is stripped; under `utf-8` a row with invalid bytes is
//!   `malformed` (not fatal), with a hint to set `encoding = "windows-1252"`.
//! - A row whose field count differs from the header's is `malformed`.
//! - An I/O error (e.g. a truncated gzip) stops the run, naming the file and
//!   the last good row.

use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use encoding_rs::WINDOWS_1252;

use super::{InputFile, Reader, SourceError};
use crate::config::{Delimiter, Encoding, InputConfig};
use crate::record::{Chunk, MAX_CHUNK_BYTES};

/// How much of the input the delimiter sniffer looks at.
const SNIFF_BYTES: usize = 64 * 1024;
const CANDIDATES: [u8; 4] = [b',', b';', b'\t', b'|'];

pub struct CsvReader {
    name: String,
    /// Decoded bytes the csv reader pulled during the current record (see [`MAX_ROW_BYTES`]).
    pulled: Arc<AtomicU64>,
    /// Bytes taken from the file (compressed bytes for gzip), for progress.
    consumed: Arc<AtomicU64>,
    reader: csv::Reader<Box<dyn Read + Send>>,
    header: Vec<String>,
    header_len: usize,
    projection: Vec<usize>,
    encoding: Encoding,
    record: csv::ByteRecord,
    /// Data rows read so far (the last row's number).
    row: u64,
    done: bool,
}

/// Reads up to `SNIFF_BYTES` (less at EOF) without losing them for the real reader.
fn read_sample(reader: &mut dyn Read) -> std::io::Result<Vec<u8>> {
    let mut sample = Vec::with_capacity(SNIFF_BYTES);
    reader.take(SNIFF_BYTES as u64).read_to_end(&mut sample)?;
    Ok(sample)
}

/// Picks the delimiter that splits the sample's first lines into the same
/// number (> 1) of fields most consistently; `,` when nothing fits better.
pub fn sniff_delimiter(sample: &[u8]) -> u8 {
    let mut best = (b',', 0usize, 0usize);
    for &d in &CANDIDATES {
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(d)
            .has_headers(false)
            .flexible(true)
            .from_reader(sample);
        let mut record = csv::ByteRecord::new();
        let mut header_len = 0;
        let mut consistent = 0;
        let mut rows = 0;
        // The last record of the sample may be cut off, so only complete ones count.
        while rows < 20 && rdr.read_byte_record(&mut record).unwrap_or(false) {
            let end =
                record.position().map(|p| p.byte()).unwrap_or(0) as usize + record.as_slice().len();
            if end >= sample.len() && rows > 0 {
                break;
            }
            if rows == 0 {
                header_len = record.len();
            } else if record.len() == header_len {
                consistent += 1;
            }
            rows += 1;
        }
        if header_len > 1 && (consistent, header_len) > (best.1, best.2) {
            best = (d, consistent, header_len);
        }
    }
    best.0
}

impl CsvReader {
    pub fn open(
        file: &InputFile,
        input: &InputConfig,
        gzip: bool,
        tsv: bool,
    ) -> Result<CsvReader, SourceError> {
        let name = file.name.clone();
        let open_err = |error| SourceError::Open {
            source_name: name.clone(),
            error,
        };
        let raw: Box<dyn Read + Send> = match (&file.path, &file.object) {
            (Some(path), _) => Box::new(File::open(path).map_err(open_err)?),
            (None, Some(object)) => {
                super::object::open_stream(object).map_err(|e| SourceError::Object {
                    url: name.clone(),
                    message: super::object::describe(&e),
                })?
            }
            (None, None) => Box::new(std::io::stdin()),
        };
        let consumed = Arc::new(AtomicU64::new(0));
        let raw: Box<dyn Read + Send> = Box::new(CountingRead {
            inner: raw,
            count: consumed.clone(),
        });
        let mut raw: Box<dyn Read + Send> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
                256 * 1024,
                raw,
            )))
        } else {
            raw
        };
        let mut sample = read_sample(&mut raw).map_err(|e| SourceError::Read {
            source_name: name.clone(),
            row: 0,
            message: e.to_string(),
        })?;
        if sample.starts_with(b"\xEF\xBB\xBF") {
            sample.drain(..3);
        }
        if sample.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(SourceError::NoHeader { source_name: name });
        }
        let delimiter = match input.delimiter {
            Delimiter::Byte(d) => d,
            Delimiter::Auto if tsv => b'\t',
            Delimiter::Auto => sniff_delimiter(&sample),
        };
        let pulled = Arc::new(AtomicU64::new(0));
        let stream: Box<dyn Read + Send> = Box::new(BudgetRead {
            inner: Box::new(Cursor::new(sample).chain(raw)),
            pulled: pulled.clone(),
        });
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(true)
            .buffer_capacity(256 * 1024)
            .from_reader(stream);
        let mut record = csv::ByteRecord::new();
        let got = reader
            .read_byte_record(&mut record)
            .map_err(|e| SourceError::Read {
                source_name: name.clone(),
                row: 0,
                message: e.to_string(),
            })?;
        if !got {
            return Err(SourceError::NoHeader { source_name: name });
        }
        let header: Vec<String> = record
            .iter()
            .map(|f| match input.encoding {
                Encoding::Utf8 => String::from_utf8_lossy(f).into_owned(),
                Encoding::Windows1252 => WINDOWS_1252.decode_without_bom_handling(f).0.into_owned(),
            })
            .collect();
        Ok(CsvReader {
            name,
            pulled,
            consumed,
            reader,
            header_len: header.len(),
            header,
            projection: Vec::new(),
            encoding: input.encoding,
            record,
            row: 0,
            done: false,
        })
    }

    /// Describes invalid UTF-8 in the current record: which column, which byte.
    fn utf8_problem(&self, error_at: usize) -> String {
        let mut offset = 0;
        let mut column = 0;
        for (i, field) in self.record.iter().enumerate() {
            if error_at < offset + field.len() {
                column = i;
                break;
            }
            offset += field.len();
        }
        let column_name = self.header.get(column).map(String::as_str).unwrap_or("?");
        format!(
            "invalid UTF-8 in column \"{column_name}\" (byte {} of the field); if this file is an Excel export, set encoding = \"windows-1252\" in [input]",
            error_at - offset + 1
        )
    }
}

/// The most decoded bytes one record may pull from the input. The csv crate
/// grows a record until its closing quote, so an unterminated quote would
/// read the rest of the file into memory; no option of the crate bounds it,
/// hence this budget on the stream it reads (the crate's 256 KiB read-ahead
/// included).
pub const MAX_ROW_BYTES: u64 = 2 << 20;

/// Fails a read once the current record has pulled more than [`MAX_ROW_BYTES`].
struct BudgetRead {
    inner: Box<dyn Read + Send>,
    pulled: Arc<AtomicU64>,
}

impl Read for BudgetRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.pulled.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > MAX_ROW_BYTES {
            return Err(std::io::Error::other(ROW_TOO_LONG));
        }
        Ok(n)
    }
}

/// The marker of [`BudgetRead`]'s error.
const ROW_TOO_LONG: &str = "row over the size budget";

/// Counts the bytes read through it (the reading bar's position).
struct CountingRead {
    inner: Box<dyn Read + Send>,
    count: Arc<AtomicU64>,
}

impl Read for CountingRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Reader for CsvReader {
    fn header(&self) -> &[String] {
        &self.header
    }

    fn bytes_read(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }

    fn project(&mut self, columns: Vec<usize>) {
        self.projection = columns;
    }

    fn fill(&mut self, chunk: &mut Chunk, max_rows: usize) -> Result<bool, SourceError> {
        let mut added = 0;
        while added < max_rows && !self.done && chunk.text_len() < MAX_CHUNK_BYTES {
            let line = self.reader.position().line();
            self.pulled.store(0, Ordering::Relaxed);
            match self.reader.read_byte_record(&mut self.record) {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    break;
                }
                Err(e) if e.to_string().contains(ROW_TOO_LONG) => {
                    return Err(SourceError::RowTooLong {
                        source_name: self.name.clone(),
                        line,
                        limit_mib: MAX_ROW_BYTES >> 20,
                    });
                }
                Err(e) => {
                    return Err(SourceError::Read {
                        source_name: self.name.clone(),
                        row: self.row,
                        message: e.to_string(),
                    });
                }
            }
            // A blank line is not a row for the csv crate; a line of only delimiters is.
            self.row += 1;
            added += 1;
            chunk.begin_row(self.row);
            if self.record.len() != self.header_len {
                chunk.finish_malformed(format!(
                    "row has {} fields, the header has {}",
                    self.record.len(),
                    self.header_len
                ));
                continue;
            }
            match self.encoding {
                Encoding::Utf8 => {
                    // Validated once for the whole record, by `simdutf8` (already
                    // in the build through encoding_rs): std's `from_utf8` took
                    // 65–80 ns per messy record, simdutf8 ≈ 50 (60% of records are
                    // not ASCII, so std's ASCII fast path seldom applies).
                    let text = match simdutf8::compat::from_utf8(self.record.as_slice()) {
                        Ok(text) => text,
                        Err(e) => {
                            let detail = self.utf8_problem(e.valid_up_to());
                            chunk.finish_malformed(detail);
                            continue;
                        }
                    };
                    // Each cell is a slice of the record (fields end at ASCII
                    // delimiters, so on char boundaries).
                    let record = &self.record;
                    chunk.push_record(
                        text,
                        self.projection
                            .iter()
                            .map(|&column| record.range(column).unwrap_or_default()),
                    );
                }
                Encoding::Windows1252 => {
                    for &column in &self.projection {
                        let bytes = &self.record[column];
                        chunk.push_cell(&WINDOWS_1252.decode_without_bom_handling(bytes).0);
                    }
                }
            }
        }
        Ok(added > 0 || !self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_common_delimiters() {
        assert_eq!(
            sniff_delimiter(b"id;phone;name\n1;+55 11;Ana\n2;+55 21;Bia\n"),
            b';'
        );
        assert_eq!(sniff_delimiter(b"id\tphone\n1\t+55\n"), b'\t');
        assert_eq!(sniff_delimiter(b"id|phone\n1|x\n"), b'|');
        assert_eq!(sniff_delimiter(b"id,phone,name\n1,\"a;b\",x\n"), b',');
        assert_eq!(sniff_delimiter(b"phone\n123\n"), b',');
    }
}
