//! Parquet through the arrow reader: only the needed columns are decoded
//! (`ProjectionMask`), in record batches of bounded size.
//!
//! Cells become text the way a CSV export would show them: strings as they are
//! (plain, large, view or dictionary-encoded), integers and floats as plain
//! decimal text (`5511987654321`, never `5.5e12`), nulls as empty.

use std::fs::File;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::{InputFile, Reader, SourceError};
use crate::record::{Chunk, MAX_CHUNK_BYTES};

/// Rows per decoded batch: large enough to amortize decoding, small enough to keep memory flat.
const BATCH_ROWS: usize = 8192;

pub struct ParquetReader {
    name: String,
    header: Vec<String>,
    builder: Option<ParquetRecordBatchReaderBuilder<File>>,
    reader: Option<ParquetRecordBatchReader>,
    /// Header indices to keep, in cell order.
    projection: Vec<usize>,
    /// Current batch's columns converted to text arrays, in projection order.
    columns: Vec<ArrayRef>,
    batch_rows: usize,
    next_in_batch: usize,
    row: u64,
    /// File size and row count, to turn rows read into bytes for progress.
    file_bytes: u64,
    total_rows: u64,
}

impl ParquetReader {
    pub fn open(file: &InputFile) -> Result<ParquetReader, SourceError> {
        let name = file.name.clone();
        let path = file.path.as_ref().ok_or_else(|| SourceError::Parquet {
            source_name: name.clone(),
            message: "Parquet cannot be read from stdin".into(),
        })?;
        let f = File::open(path).map_err(|error| SourceError::Open {
            source_name: name.clone(),
            error,
        })?;
        let file_bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
        if file_bytes == 0 {
            return Err(SourceError::NoHeader { source_name: name });
        }
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| SourceError::Parquet {
                source_name: name.clone(),
                message: e.to_string(),
            })?;
        let header = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let total_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        Ok(ParquetReader {
            name,
            header,
            file_bytes,
            total_rows,
            builder: Some(builder),
            reader: None,
            projection: Vec::new(),
            columns: Vec::new(),
            batch_rows: 0,
            next_in_batch: 0,
            row: 0,
        })
    }

    fn error(&self, message: String) -> SourceError {
        SourceError::Read {
            source_name: self.name.clone(),
            row: self.row,
            message,
        }
    }

    /// Starts the projected reader on first use.
    fn reader(&mut self) -> Result<&mut ParquetRecordBatchReader, SourceError> {
        if self.reader.is_none() {
            let builder = self
                .builder
                .take()
                .ok_or_else(|| self.error("reader already consumed".into()))?;
            let mut roots = self.projection.clone();
            roots.sort_unstable();
            roots.dedup();
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            let reader = builder
                .with_projection(mask)
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| self.error(e.to_string()))?;
            self.reader = Some(reader);
        }
        Ok(self.reader.as_mut().expect("just set"))
    }

    /// Converts the batch's projected columns to text arrays (Utf8 or LargeUtf8/Utf8View).
    fn load(&mut self, batch: RecordBatch) -> Result<(), SourceError> {
        let schema = batch.schema();
        let mut columns = Vec::with_capacity(self.projection.len());
        for &index in &self.projection {
            let name = &self.header[index];
            let position = schema
                .index_of(name)
                .map_err(|e| self.error(e.to_string()))?;
            columns.push(to_text(batch.column(position)).map_err(|e| self.error(e))?);
        }
        self.batch_rows = batch.num_rows();
        self.next_in_batch = 0;
        self.columns = columns;
        Ok(())
    }
}

/// Any arrow column → a string-typed column with CSV-like text.
fn to_text(array: &ArrayRef) -> Result<ArrayRef, String> {
    match array.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(array.clone()),
        DataType::Float64 => Ok(floats(array.as_primitive::<Float64Type>().iter())),
        DataType::Float32 => Ok(floats(
            array
                .as_primitive::<Float32Type>()
                .iter()
                .map(|v| v.map(f64::from)),
        )),
        _ => arrow_cast::cast(array, &DataType::Utf8).map_err(|e| {
            format!(
                "column of type {} cannot be read as text: {e}",
                array.data_type()
            )
        }),
    }
}

/// Floats as plain decimal text: Rust's `Display` never uses exponents, and an
/// integral value prints without ".0" (`5511987654321`).
fn floats(values: impl Iterator<Item = Option<f64>>) -> ArrayRef {
    let strings: arrow_array::StringArray = values.map(|v| v.map(|f| f.to_string())).collect();
    Arc::new(strings)
}

/// Text of row `i` of a text column (see [`to_text`]); nulls are "".
fn text_at(array: &dyn Array, i: usize) -> &str {
    if array.is_null(i) {
        return "";
    }
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(i),
        DataType::LargeUtf8 => array.as_string::<i64>().value(i),
        DataType::Utf8View => array.as_string_view().value(i),
        _ => "",
    }
}

impl Reader for ParquetReader {
    fn header(&self) -> &[String] {
        &self.header
    }

    /// Column chunks are read per row group, so this is the share of rows read times the size.
    fn bytes_read(&self) -> u64 {
        if self.total_rows == 0 {
            return 0;
        }
        (self.file_bytes as u128 * self.row as u128 / self.total_rows as u128) as u64
    }

    fn project(&mut self, columns: Vec<usize>) {
        self.projection = columns;
    }

    fn fill(&mut self, chunk: &mut Chunk, max_rows: usize) -> Result<bool, SourceError> {
        let mut added = 0;
        while added < max_rows && chunk.text_len() < MAX_CHUNK_BYTES {
            if self.next_in_batch >= self.batch_rows {
                match self.reader()?.next() {
                    None => return Ok(added > 0),
                    Some(Err(e)) => return Err(self.error(e.to_string())),
                    Some(Ok(batch)) => self.load(batch)?,
                }
                continue;
            }
            let i = self.next_in_batch;
            self.next_in_batch += 1;
            self.row += 1;
            added += 1;
            chunk.begin_row(self.row);
            for column in &self.columns {
                chunk.push_cell(text_at(column.as_ref(), i));
            }
        }
        Ok(true)
    }
}
