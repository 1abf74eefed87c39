//! Parquet through the arrow reader: only the needed columns are decoded
//! (`ProjectionMask`), in record batches of bounded size.
//!
//! Cells become text the way a CSV export would show them: strings as they are
//! (plain, large, view or dictionary-encoded), integers and floats as plain
//! decimal text (`5511987654321`, never `5.5e12`), nulls as empty.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{
    AsyncFileReader, ParquetRecordBatchStream, ParquetRecordBatchStreamBuilder,
};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use tokio::runtime::Handle;

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

/// A Parquet object read by ranges (footer, then only the projected column
/// chunks), counting the bytes it fetches: the reading bar, and the proof that
/// the projection reads only what it needs. (Written against `object_store`
/// directly, as parquet's docs now advise instead of `ParquetObjectReader`.)
pub struct ObjectFileReader {
    store: Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    size: u64,
    fetched: Arc<AtomicU64>,
}

fn external(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for ObjectFileReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        self.fetched
            .fetch_add(range.end - range.start, Ordering::Relaxed);
        let (store, path) = (self.store.clone(), self.path.clone());
        async move { store.get_range(&path, range).await.map_err(external) }.boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        let n: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        self.fetched.fetch_add(n, Ordering::Relaxed);
        let (store, path) = (self.store.clone(), self.path.clone());
        async move { store.get_ranges(&path, &ranges).await.map_err(external) }.boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let reader = ParquetMetaDataReader::new()
                .with_metadata_options(options.map(|o| o.metadata_options().clone()))
                .with_prefetch_hint(Some(64 * 1024));
            Ok(Arc::new(reader.load_and_finish(self, size).await?))
        })
    }
}

/// A reader not started yet (the projection is not known when the header is read).
enum Pending {
    Local(ParquetRecordBatchReaderBuilder<File>),
    Object(ParquetRecordBatchStreamBuilder<ObjectFileReader>, Handle),
}

/// Decoded batches an object's reader keeps ahead of the reader thread.
const BATCHES_AHEAD: usize = 2;

/// The started reader: a local file's batches, or an object's, decoded by a
/// task on the runtime (so fetching the next row group overlaps the reader
/// thread's work) and handed over through a bounded channel.
enum Batches {
    Local(ParquetRecordBatchReader),
    Object(tokio::sync::mpsc::Receiver<Result<RecordBatch, String>>),
}

impl Batches {
    fn object(mut stream: ParquetRecordBatchStream<ObjectFileReader>, handle: &Handle) -> Batches {
        let (tx, rx) = tokio::sync::mpsc::channel(BATCHES_AHEAD);
        handle.spawn(async move {
            while let Some(batch) = stream.next().await {
                if tx.send(batch.map_err(|e| e.to_string())).await.is_err() {
                    return;
                }
            }
        });
        Batches::Object(rx)
    }

    fn next(&mut self) -> Option<Result<RecordBatch, String>> {
        match self {
            Batches::Local(reader) => reader.next().map(|r| r.map_err(|e| e.to_string())),
            Batches::Object(rx) => rx.blocking_recv(),
        }
    }
}

pub struct ParquetReader {
    name: String,
    header: Vec<String>,
    builder: Option<Pending>,
    reader: Option<Batches>,
    /// Bytes an object reader fetched (`None` for a local file).
    fetched: Option<Arc<AtomicU64>>,
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
        let parquet_err = |message: String| SourceError::Parquet {
            source_name: name.clone(),
            message,
        };
        let (builder, file_bytes, fetched) = match (&file.path, &file.object) {
            (Some(path), _) => {
                let f = File::open(path).map_err(|error| SourceError::Open {
                    source_name: name.clone(),
                    error,
                })?;
                let file_bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
                if file_bytes == 0 {
                    return Err(SourceError::NoHeader { source_name: name });
                }
                let builder = ParquetRecordBatchReaderBuilder::try_new(f)
                    .map_err(|e| parquet_err(e.to_string()))?;
                (Pending::Local(builder), file_bytes, None)
            }
            (None, Some(object)) => {
                if object.size == 0 {
                    return Err(SourceError::NoHeader { source_name: name });
                }
                let fetched = Arc::new(AtomicU64::new(0));
                let reader = ObjectFileReader {
                    store: object.store.clone(),
                    path: object.path.clone(),
                    size: object.size,
                    fetched: fetched.clone(),
                };
                let builder = object
                    .handle
                    .block_on(ParquetRecordBatchStreamBuilder::new(reader))
                    .map_err(|e| parquet_err(e.to_string()))?;
                let pending = Pending::Object(builder, object.handle.clone());
                (pending, object.size, Some(fetched))
            }
            (None, None) => return Err(parquet_err("Parquet cannot be read from stdin".into())),
        };
        let (schema, total_rows) = match &builder {
            Pending::Local(b) => (b.schema().clone(), b.metadata().file_metadata().num_rows()),
            Pending::Object(b, _) => (b.schema().clone(), b.metadata().file_metadata().num_rows()),
        };
        let header = schema.fields().iter().map(|f| f.name().clone()).collect();
        Ok(ParquetReader {
            name,
            header,
            file_bytes,
            total_rows: total_rows.max(0) as u64,
            builder: Some(builder),
            reader: None,
            fetched,
            projection: Vec::new(),
            columns: Vec::new(),
            batch_rows: 0,
            next_in_batch: 0,
            row: 0,
        })
    }

    /// Bytes this reader fetched from an object store, if it reads an object.
    pub fn fetched_bytes(&self) -> Option<u64> {
        self.fetched.as_ref().map(|f| f.load(Ordering::Relaxed))
    }

    fn error(&self, message: String) -> SourceError {
        SourceError::Read {
            source_name: self.name.clone(),
            row: self.row,
            message,
        }
    }

    /// Starts the projected reader on first use.
    fn reader(&mut self) -> Result<&mut Batches, SourceError> {
        if self.reader.is_none() {
            let builder = self
                .builder
                .take()
                .ok_or_else(|| self.error("reader already consumed".into()))?;
            let mut roots = self.projection.clone();
            roots.sort_unstable();
            roots.dedup();
            let started = match builder {
                Pending::Local(b) => {
                    let mask = ProjectionMask::roots(b.parquet_schema(), roots);
                    b.with_projection(mask)
                        .with_batch_size(BATCH_ROWS)
                        .build()
                        .map(Batches::Local)
                }
                Pending::Object(b, handle) => {
                    let mask = ProjectionMask::roots(b.parquet_schema(), roots);
                    b.with_projection(mask)
                        .with_batch_size(BATCH_ROWS)
                        .build()
                        .map(|stream| Batches::object(stream, &handle))
                }
            };
            self.reader = Some(started.map_err(|e| self.error(e.to_string()))?);
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

    /// An object: the bytes fetched. A local file: column chunks are read per
    /// row group, so the share of rows read times the size.
    fn bytes_read(&self) -> u64 {
        if let Some(fetched) = self.fetched_bytes() {
            return fetched;
        }
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
                    None => {
                        if let Some(fetched) = self.fetched_bytes() {
                            tracing::debug!(
                                source = %self.name,
                                fetched,
                                size = self.file_bytes,
                                "parquet object read: {fetched} bytes fetched of {} (the projection's column chunks and the footer)",
                                self.file_bytes
                            );
                        }
                        return Ok(added > 0);
                    }
                    Some(Err(e)) => return Err(self.error(e)),
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
