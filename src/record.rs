//! A chunk of input rows, projected to the columns the run needs.
//!
//! Rows travel between stages in [`Chunk`]s of a few thousand, never one by
//! one: a chunk stores its rows' text back to back in one `String` (plus a
//! table of where each projected cell sits in it), so reading a row
//! allocates nothing and a chunk can be reused. Each row also carries its [`Outcome`], filled in by the phone and
//! dedup stages.

use std::sync::Arc;

use crate::phone::{E164, InvalidReason};

/// Where each needed column sits among the projected cells of a chunk.
#[derive(Clone, Debug)]
pub struct Layout {
    /// (column name, config key that needs it), in cell order.
    pub columns: Vec<(String, String)>,
    /// Cell index of each `phone_column`, in config order.
    pub phones: Vec<usize>,
    pub country: Option<usize>,
    pub id: Option<usize>,
}

/// Where a first occurrence was seen, for `duplicate of <source>:<row>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Index of the input in the run's list of sources.
    pub source: u32,
    /// 1-based data row within that source.
    pub row: u64,
}

/// What became of a row before the sinks.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Not processed yet.
    Pending,
    /// The row could not be parsed (wrong field count, bad encoding): `detail`.
    Malformed(Box<str>),
    /// No phone column yielded a valid number. `raw_column` is the phone column
    /// whose text is reported (the first non-empty one), if any.
    InvalidPhone {
        raw_column: Option<u8>,
        reason: InvalidReason,
    },
    /// A valid number, first seen here.
    Unique { raw_column: u8, phone: E164 },
    /// A valid number already seen at `first`.
    Duplicate {
        raw_column: u8,
        phone: E164,
        first: Position,
    },
}

/// Per-row bookkeeping.
#[derive(Clone, Debug)]
pub struct RowMeta {
    /// 1-based data row within the source (header excluded).
    pub row: u64,
    pub outcome: Outcome,
}

/// Cell text a chunk holds at most before its reader starts the next one, so
/// that rows with huge fields cannot make a chunk (and the channels) huge.
pub const MAX_CHUNK_BYTES: usize = 8 << 20;

/// A batch of rows from one source.
#[derive(Debug)]
pub struct Chunk {
    /// Position in the run's stream of chunks; stages that reorder use it.
    pub seq: u64,
    /// Index of the source in the run's list.
    pub source: u32,
    /// The source name as the report shows it.
    pub source_name: Arc<str>,
    /// Number of projected columns per row.
    pub width: usize,
    /// The rows' text, back to back: their projected cells, or (CSV) whole
    /// records, of which the cells are slices.
    text: String,
    /// Start and end offset in `text` of each cell (`width` per row).
    spans: Vec<[u32; 2]>,
    pub rows: Vec<RowMeta>,
}

impl Chunk {
    pub fn new(seq: u64, source: u32, source_name: Arc<str>, width: usize) -> Chunk {
        Chunk {
            seq,
            source,
            source_name,
            width,
            text: String::new(),
            spans: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Empties a chunk for the next rows, keeping its allocations (a chunk
    /// handed back by the render workers, see [`crate::recycle`]).
    pub fn reset(&mut self, seq: u64, source: u32, source_name: Arc<str>, width: usize) {
        self.seq = seq;
        self.source = source;
        self.source_name = source_name;
        self.width = width;
        self.text.clear();
        self.spans.clear();
        self.rows.clear();
    }

    /// Reserves room for `rows` rows and `text_bytes` of cell text up front:
    /// readers pass the previous chunk's size, so filling never reallocates.
    pub fn reserve(&mut self, rows: usize, text_bytes: usize) {
        self.rows.reserve(rows);
        self.spans.reserve(rows * self.width);
        self.text.reserve(text_bytes);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Bytes of cell text it has room for without growing.
    pub fn text_capacity(&self) -> usize {
        self.text.capacity()
    }

    /// Bytes of cell text held (readers stop filling past [`MAX_CHUNK_BYTES`]).
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Starts a new row; push exactly `width` cells with [`Chunk::push_cell`] after it.
    pub fn begin_row(&mut self, row: u64) {
        self.rows.push(RowMeta {
            row,
            outcome: Outcome::Pending,
        });
    }

    /// Appends a cell to the current row.
    pub fn push_cell(&mut self, value: &str) {
        let start = self.text.len() as u32;
        self.text.push_str(value);
        self.spans.push([start, self.text.len() as u32]);
    }

    /// Appends a whole record's text at once and takes the current row's
    /// cells as slices of it: `cells` gives each projected cell's byte range
    /// within `record`, in cell order. One copy per row instead of one per
    /// cell (the reader thread's per-cell copies and boundary checks were
    /// ≈ 5% of a messy dry run's CPU, perf, issue 11). A range that is out
    /// of bounds or not on a character boundary becomes an empty cell.
    pub fn push_record(
        &mut self,
        record: &str,
        cells: impl Iterator<Item = std::ops::Range<usize>>,
    ) {
        let base = self.text.len();
        self.text.push_str(record);
        for range in cells {
            let span = match record.get(range.clone()) {
                Some(_) => [(base + range.start) as u32, (base + range.end) as u32],
                None => [base as u32; 2],
            };
            self.spans.push(span);
        }
    }

    /// Marks the current row malformed, filling its missing cells with "".
    pub fn finish_malformed(&mut self, detail: String) {
        let expected = self.rows.len() * self.width;
        let end = self.text.len() as u32;
        self.spans.resize(expected, [end, end]);
        if let Some(last) = self.rows.last_mut() {
            last.outcome = Outcome::Malformed(detail.into_boxed_str());
        }
    }

    /// Cell `column` of row `index`.
    pub fn cell(&self, index: usize, column: usize) -> &str {
        let [start, end] = self.spans[index * self.width + column];
        &self.text[start as usize..end as usize]
    }
}

/// `str::trim`, with a shortcut for the usual cell: when its first and last
/// bytes are printable ASCII there is nothing to trim, and that is two byte
/// tests instead of decoding characters from both ends. Cells are trimmed
/// several times per row (phones, regions, every template placeholder), and
/// `trim` was 3.7% of a dry run's instructions (callgrind, issue 11).
#[inline]
pub fn trim(s: &str) -> &str {
    match s.as_bytes() {
        [first, .., last] if first.is_ascii_graphic() && last.is_ascii_graphic() => s,
        [only] if only.is_ascii_graphic() => s,
        _ => s.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The shortcut never changes what `str::trim` gives.
        #[test]
        fn trim_is_str_trim(s in "[ \t\u{a0}\u{3000}a-z0-9,+()-]{0,12}") {
            proptest::prop_assert_eq!(trim(&s), s.trim());
        }
    }

    #[test]
    fn cells_round_trip() {
        let mut c = Chunk::new(0, 0, "a.csv".into(), 2);
        c.begin_row(1);
        c.push_cell("x");
        c.push_cell("");
        c.begin_row(2);
        c.push_cell("yy");
        c.finish_malformed("short row".into());
        assert_eq!(c.cell(0, 0), "x");
        assert_eq!(c.cell(0, 1), "");
        assert_eq!(c.cell(1, 0), "yy");
        assert_eq!(c.cell(1, 1), "");
        assert!(matches!(c.rows[1].outcome, Outcome::Malformed(_)));
    }

    #[test]
    fn a_reset_chunk_holds_only_its_new_rows() {
        let mut c = Chunk::new(3, 0, "a.csv".into(), 2);
        c.begin_row(1);
        c.push_cell("old");
        c.push_cell("row");
        c.finish_malformed("was malformed".into());
        c.reset(4, 1, "b.csv".into(), 1);
        assert!(c.is_empty());
        assert_eq!(c.text_len(), 0);
        c.begin_row(7);
        c.push_cell("new");
        assert_eq!((c.seq, c.source, &*c.source_name), (4, 1, "b.csv"));
        assert_eq!(c.len(), 1);
        assert_eq!(c.cell(0, 0), "new");
        assert_eq!(c.rows[0].outcome, Outcome::Pending);
    }

    #[test]
    fn a_pushed_record_gives_its_cells_in_projection_order() {
        let mut c = Chunk::new(0, 0, "a.csv".into(), 3);
        c.begin_row(1);
        c.push_cell("before");
        c.push_record("ab", std::iter::once(1..2));
        c.push_cell("");
        c.begin_row(2);
        // Fields "id", "phone", "João" back to back; projected as phone, name, id.
        let record = "id+55 11João";
        c.push_record(record, [2..8, 8..13, 0..2].into_iter());
        c.begin_row(3);
        // Out of bounds, and inside the two bytes of "ã": both empty, never a panic.
        c.push_record(record, [2..99, 11..12, 0..0].into_iter());
        assert_eq!(
            [c.cell(0, 0), c.cell(0, 1), c.cell(0, 2)],
            ["before", "b", ""]
        );
        assert_eq!(
            [c.cell(1, 0), c.cell(1, 1), c.cell(1, 2)],
            ["+55 11", "João", "id"]
        );
        assert_eq!([c.cell(2, 0), c.cell(2, 1), c.cell(2, 2)], ["", "", ""]);
        c.begin_row(4);
        c.push_record(record, std::iter::once(0..2));
        c.finish_malformed("short".into());
        assert_eq!([c.cell(3, 0), c.cell(3, 1), c.cell(3, 2)], ["id", "", ""]);
    }
}
