//! # crm-import
//!
//! Streams CRM exports (CSV, CSV.gz, TSV, Parquet) through phone normalization
//! and dedup into messaging platforms, writing a report line for every input row.
//!
//! # Layout
//!
//! A row's path through the modules, in order (read `pipeline.rs` top to bottom
//! for the wiring):
//!
//! - [`config`]: the TOML file → a validated [`config::Config`]; every error names its key.
//! - [`cli`]: command-line flags → [`pipeline::RunOptions`].
//! - [`source`]: input files → [`record::Chunk`]s of projected rows (CSV and Parquet readers).
//! - [`record`]: the chunk type and a row's [`record::Outcome`].
//! - [`phone`]: raw phone text → E.164, with libphonenumber's semantics, fast.
//! - [`template`]: `{column}` placeholders in config values.
//! - [`dedup`]: first-wins set of E.164 numbers, ≤ 32 bytes per phone.
//! - [`sink`]: per-platform request rules (Chatfuel, Weni, CloudHumans).
//! - [`report`]: the per-record report, the single accountant of rows.
//! - [`pipeline`]: wires the stages with bounded channels across threads.
//! - [`progress`]: progress on stderr and the end-of-run summary.

pub mod cli;
pub mod config;
pub mod dedup;
pub mod phone;
pub mod pipeline;
pub mod progress;
pub mod record;
pub mod report;
pub mod sandbox;
pub mod sink;
pub mod source;
pub mod state;
pub mod template;
