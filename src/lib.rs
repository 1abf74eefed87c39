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
//! - [`config`]: the TOML file → a validated [`config::Config`]; every error names
//!   its key. Each `[sinks.<name>]` table is read by its platform's folder.
//! - [`cli`]: command-line flags → [`pipeline::RunOptions`].
//! - [`source`]: input files → [`record::Chunk`]s of projected rows (CSV and Parquet readers).
//! - [`record`]: the chunk type and a row's [`record::Outcome`].
//! - [`phone`]: raw phone text → E.164, with libphonenumber's semantics, fast.
//! - [`template`]: `{column}` placeholders in config values.
//! - [`dedup`]: first-wins set of E.164 numbers, ≤ 32 bytes per phone.
//! - [`sink`]: the [`sink::Sink`] trait and its registry; one folder per platform
//!   (config, checks, requests, state scope, plan, delivery); one lane per sink
//!   (`sink::lane`: a queue spilling to disk, so each sink goes at its own pace);
//!   the shared HTTP transport (`sink::http`).
//! - [`state`]: what was delivered (SQLite), and the lock of one run per state file.
//! - [`recycle`]: buffers handed back between stages, so chunks reuse their memory.
//! - [`render`]: a merged chunk → its report rows, encoded on worker threads.
//! - [`report`]: the per-record report, the single accountant of rows.
//! - [`shutdown`]: the one stop signal (SIGTERM/SIGINT, `--max-duration`, failures).
//! - [`pipeline`]: wires the stages with bounded channels across threads, generic over sinks.
//! - [`progress`]: bars (or log lines) on stderr while the run goes.
//! - [`summary`]: the run's outcome, the end-of-run table and `--summary-json`.
//! - [`sandbox`]: faithful fakes of the platforms, on loopback.

pub mod cli;
pub mod config;
pub mod dedup;
pub mod phone;
pub mod pipeline;
pub mod progress;
pub mod record;
pub mod recycle;
pub mod render;
pub mod report;
pub mod sandbox;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod state;
pub mod summary;
pub mod template;
