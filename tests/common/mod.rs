//! Helpers shared by the integration tests: reading a report and checking
//! SPEC's invariant (one record-level row, or exactly one row per sink).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

pub mod rig;

/// One report row: column → value.
pub type Row = HashMap<String, String>;

/// Reads a CSV report (empty when the file does not exist), checking its columns.
pub fn read_report(path: &Path) -> Vec<Row> {
    let Ok(mut rdr) = csv::Reader::from_path(path) else {
        return Vec::new();
    };
    let headers = rdr.headers().unwrap().clone();
    assert_eq!(
        headers.iter().collect::<Vec<_>>(),
        crm_import::report::COLUMNS,
        "report columns in SPEC order"
    );
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            headers
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

/// A Parquet report's rows as column → text (empty for null), like [`read_report`].
pub fn read_parquet_report(path: &Path) -> Vec<Row> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let schema = batch.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            crm_import::report::COLUMNS,
            "report columns in SPEC order"
        );
        let columns: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| arrow_cast::cast(c, &arrow_schema::DataType::Utf8).unwrap())
            .collect();
        for i in 0..batch.num_rows() {
            let row = schema.fields().iter().zip(&columns).map(|(field, column)| {
                let text = column
                    .as_any()
                    .downcast_ref::<arrow_array::StringArray>()
                    .unwrap();
                let value = if arrow_array::Array::is_null(text, i) {
                    ""
                } else {
                    text.value(i)
                };
                (field.name().clone(), value.to_owned())
            });
            rows.push(row.collect());
        }
    }
    rows
}

/// SPEC invariant: each input row of each `(source, rows)` has exactly one
/// record-level report row, or exactly one row per sink in `sinks`.
pub fn assert_invariant(report: &[Row], sinks: &[&str], inputs: &[(&str, u64)]) {
    let mut per_row: HashMap<(String, String), Vec<String>> = HashMap::new();
    for r in report {
        per_row
            .entry((r["source"].clone(), r["row"].clone()))
            .or_default()
            .push(r["sink"].clone());
    }
    let expected_rows: u64 = inputs.iter().map(|(_, n)| n).sum();
    assert_eq!(
        per_row.len() as u64,
        expected_rows,
        "every input row is in the report"
    );
    let mut want: Vec<String> = sinks.iter().map(|s| s.to_string()).collect();
    want.sort();
    for (source, n) in inputs {
        for row in 1..=*n {
            let seen = per_row
                .get(&(source.to_string(), row.to_string()))
                .unwrap_or_else(|| panic!("{source}:{row} missing from the report"));
            let mut sorted = seen.clone();
            sorted.sort();
            assert!(
                sorted == vec![String::new()] || sorted == want,
                "{source}:{row} has report rows for sinks {sorted:?}"
            );
        }
    }
}
