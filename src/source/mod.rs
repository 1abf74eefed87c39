//! Input files → streams of [`Chunk`]s.
//!
//! [`expand_inputs`] turns the command line's INPUTs into a list of
//! [`InputFile`]s (directories expanded in name order, `-` for stdin);
//! [`open`] picks a reader by extension. Every reader first exposes its header,
//! then — once [`Reader::project`] has told it which columns the run needs —
//! fills chunks of rows with just those cells.

use std::path::{Path, PathBuf};

use crate::config::InputConfig;
use crate::record::Chunk;

pub mod csv;
pub mod object;
pub mod parquet;

/// An input problem that stops the run (exit 1). Row-level problems are not
/// errors: they become `malformed` report rows.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_name}: cannot read: {error}")]
    Open {
        source_name: String,
        error: std::io::Error,
    },
    #[error("{source_name}: no header (the file is empty)")]
    NoHeader { source_name: String },
    #[error("{source_name}: read failed after data row {row}: {message}")]
    Read {
        source_name: String,
        row: u64,
        message: String,
    },
    #[error("{source_name}: not a readable Parquet file: {message}")]
    Parquet {
        source_name: String,
        message: String,
    },
    #[error(
        "{source_name}: column \"{column}\" (from `{key}` in the config) is not in the header; the columns are: {header}"
    )]
    MissingColumn {
        source_name: String,
        column: String,
        key: String,
        header: String,
    },
    #[error(
        "{source_name}: the row starting at line {line} is longer than {limit_mib} MiB, most likely an unterminated quote (\"); fix the quoting of that row (nothing after it was read)"
    )]
    RowTooLong {
        source_name: String,
        line: u64,
        limit_mib: u64,
    },
    #[error("{url}: {message}")]
    Object { url: String, message: String },
    #[error("{path}: no .csv, .csv.gz, .tsv or .parquet files in this directory")]
    EmptyDirectory { path: String },
    #[error("{path}: unsupported file type; use .csv, .csv.gz, .tsv, .tsv.gz or .parquet")]
    UnsupportedType { path: String },
}

/// One input as the report names it.
#[derive(Clone, Debug)]
pub struct InputFile {
    /// As given on the command line (joined with the directory for files
    /// inside one; the object's full URL for objects under a prefix); "-" for stdin.
    pub name: String,
    /// A local file.
    pub path: Option<PathBuf>,
    /// An object in a bucket (or behind an https URL).
    pub object: Option<object::ObjectInput>,
    pub kind: FileKind,
}

impl InputFile {
    /// Standard input (its header is checked only when read).
    pub fn is_stdin(&self) -> bool {
        self.path.is_none() && self.object.is_none()
    }

    /// The size in bytes, when known.
    pub fn size(&self) -> Option<u64> {
        match (&self.path, &self.object) {
            (Some(path), _) => std::fs::metadata(path).ok().map(|m| m.len()),
            (None, Some(object)) => Some(object.size),
            (None, None) => None,
        }
    }
}

/// How a file is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Csv { gzip: bool, tsv: bool },
    Parquet,
}

/// The kind of a data file found in a directory or under a prefix: `.txt`
/// is accepted only when named on the command line (a README is not data).
fn data_file_kind(name: &str) -> Option<FileKind> {
    kind_of(name).filter(|_| !name.to_ascii_lowercase().ends_with(".txt"))
}

fn kind_of(name: &str) -> Option<FileKind> {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".parquet") {
        Some(FileKind::Parquet)
    } else if lower.ends_with(".csv.gz") {
        Some(FileKind::Csv {
            gzip: true,
            tsv: false,
        })
    } else if lower.ends_with(".tsv.gz") {
        Some(FileKind::Csv {
            gzip: true,
            tsv: true,
        })
    } else if lower.ends_with(".csv") || lower.ends_with(".txt") {
        Some(FileKind::Csv {
            gzip: false,
            tsv: false,
        })
    } else if lower.ends_with(".tsv") {
        Some(FileKind::Csv {
            gzip: false,
            tsv: true,
        })
    } else {
        None
    }
}

/// Expands the command line's INPUTs: directories become their data files in
/// name order, URL prefixes their data objects in key order (`handle` drives
/// the object-store requests).
pub fn expand_inputs(
    inputs: &[String],
    handle: &tokio::runtime::Handle,
) -> Result<Vec<InputFile>, SourceError> {
    let mut files = Vec::new();
    for input in inputs {
        if input == "-" {
            files.push(InputFile {
                name: "-".into(),
                path: None,
                object: None,
                kind: FileKind::Csv {
                    gzip: false,
                    tsv: false,
                },
            });
            continue;
        }
        if object::is_url(input) {
            files.extend(object::expand(input, handle)?);
            continue;
        }
        let path = Path::new(input);
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|error| SourceError::Open {
                source_name: input.clone(),
                error,
            })?;
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| data_file_kind(n).is_some())
                .collect();
            names.sort();
            if names.is_empty() {
                return Err(SourceError::EmptyDirectory {
                    path: input.clone(),
                });
            }
            for name in names {
                let joined = path.join(&name);
                files.push(InputFile {
                    name: joined.to_string_lossy().into_owned(),
                    kind: kind_of(&name).unwrap_or(FileKind::Parquet),
                    path: Some(joined),
                    object: None,
                });
            }
        } else {
            let kind = kind_of(input).ok_or_else(|| SourceError::UnsupportedType {
                path: input.clone(),
            })?;
            files.push(InputFile {
                name: input.clone(),
                path: Some(path.to_owned()),
                object: None,
                kind,
            });
        }
    }
    Ok(files)
}

/// A source of rows: header first, then chunks.
pub trait Reader: Send {
    /// Column names, as read (BOM stripped, decoded).
    fn header(&self) -> &[String];
    /// Sets which header columns to keep, in the order cells are pushed.
    fn project(&mut self, columns: Vec<usize>);
    /// Bytes of the input consumed so far (for the reading bar).
    fn bytes_read(&self) -> u64;
    /// Appends up to `max_rows` rows to `chunk`; returns `false` when the source is exhausted.
    fn fill(&mut self, chunk: &mut Chunk, max_rows: usize) -> Result<bool, SourceError>;
}

/// The inputs' total size in bytes, when every one is a file.
pub fn total_bytes(files: &[InputFile]) -> Option<u64> {
    files.iter().map(InputFile::size).sum()
}

/// Opens a reader for `file` and reads its header.
pub fn open(file: &InputFile, input: &InputConfig) -> Result<Box<dyn Reader>, SourceError> {
    match file.kind {
        FileKind::Parquet => Ok(Box::new(parquet::ParquetReader::open(file)?)),
        FileKind::Csv { gzip, tsv } => Ok(Box::new(csv::CsvReader::open(file, input, gzip, tsv)?)),
    }
}

/// Finds each needed column in `header`: exact name first, then ignoring
/// surrounding whitespace and case (Excel exports often have " Phone").
pub fn resolve_columns(
    source_name: &str,
    header: &[String],
    needed: &[(String, String)],
) -> Result<Vec<usize>, SourceError> {
    needed
        .iter()
        .map(|(column, key)| {
            header
                .iter()
                .position(|h| h == column)
                .or_else(|| {
                    header
                        .iter()
                        .position(|h| h.trim().eq_ignore_ascii_case(column.trim()))
                })
                .ok_or_else(|| SourceError::MissingColumn {
                    source_name: source_name.to_owned(),
                    column: column.clone(),
                    key: key.clone(),
                    header: header.join(", "),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_extension() {
        assert_eq!(
            kind_of("a.CSV"),
            Some(FileKind::Csv {
                gzip: false,
                tsv: false
            })
        );
        assert_eq!(
            kind_of("a.csv.gz"),
            Some(FileKind::Csv {
                gzip: true,
                tsv: false
            })
        );
        assert_eq!(
            kind_of("a.tsv"),
            Some(FileKind::Csv {
                gzip: false,
                tsv: true
            })
        );
        assert_eq!(kind_of("a.parquet"), Some(FileKind::Parquet));
        assert_eq!(kind_of("a.xlsx"), None);
    }

    #[test]
    fn missing_column_names_key_and_header() {
        let header = vec!["id".to_string(), " Phone ".to_string()];
        let needed = vec![("phone".to_string(), "input.phone_column".to_string())];
        assert_eq!(resolve_columns("a.csv", &header, &needed).unwrap(), vec![1]);
        let needed = vec![("plan".to_string(), "sinks.crm.fields.plan".to_string())];
        let err = resolve_columns("a.csv", &header, &needed)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.csv")
                && err.contains("sinks.crm.fields.plan")
                && err.contains("id,  Phone"),
            "{err}"
        );
    }
}
