//! The platforms, behind one [`Sink`] trait the pipeline drives without
//! knowing which platforms exist.
//!
//! Each platform is one folder (`chatfuel/`, `weni/`, `cloudhumans/`) holding
//! its config section, its row check, its request building, its state scope,
//! its request plan and its delivery, with their tests — Vector's
//! `src/sinks/<name>/` layout. [`REGISTRY`] is the only place that lists them:
//! adding a fourth platform is one folder here, one fake under `sandbox/`, and
//! one registry line.
//!
//! A sink has two halves, so that a dry run validates exactly what a real run sends:
//! - **checking and building** (sync, on the pipeline's threads): per row,
//!   whether the platform's own rules accept it ([`Sink::check`]) and the
//!   request payload ([`Sink::build`]);
//! - **delivering** (async, on the tokio runtime): [`Sink::deliver`] drains the
//!   sink's own [`lane::Lane`] at the sink's own pace through the shared
//!   [`http::Uploader`], reporting one [`SinkRow`] per record.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use serde::{Deserialize, Serialize};

use crate::config::{ColumnUse, ConfigError, SinkCommon};
use crate::phone::E164;
use crate::record::Chunk;
use crate::report::Status;
use crate::sandbox::SandboxOptions;
use crate::state::{Known, Scope};

/// Rows per request group of one sink (the plan). Updated for every row, so
/// hashbrown's default hasher rather than std's SipHash.
pub type GroupCounts = hashbrown::HashMap<u64, u64>;

pub mod chatfuel;
pub mod cloudhumans;
pub mod http;
pub mod lane;
pub mod weni;

/// A sink's delivery, run on the tokio runtime.
pub type Delivery = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// Reads a platform's `[sinks.<name>]` table into its sink.
pub type ParseFn =
    fn(toml::Value, SinkKind, &ParseContext<'_>) -> Result<Box<dyn Sink>, ConfigError>;

/// One platform: its name (the `[sinks.<name>]` table and the report's `sink`
/// column) and how to read its config table.
pub struct Platform {
    pub name: &'static str,
    /// Parses and validates the platform's table; `kind` is its registry position.
    pub parse: ParseFn,
}

/// Every platform, in report order. The only place that lists them.
pub const REGISTRY: &[Platform] = &[chatfuel::PLATFORM, weni::PLATFORM, cloudhumans::PLATFORM];

/// What a sink's config parser needs from the config file.
pub struct ParseContext<'a> {
    pub path: &'a std::path::Path,
}

impl ParseContext<'_> {
    /// A config error naming `key`.
    pub fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            message,
        }
    }
}

/// A sink's position in [`REGISTRY`]: cheap to copy, ordered like the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SinkKind(pub u8);

impl SinkKind {
    /// The name used in the report's `sink` column and in config tables.
    pub fn name(self) -> &'static str {
        REGISTRY.get(self.0 as usize).map(|p| p.name).unwrap_or("?")
    }

    /// Its place in [`REGISTRY`] (dense: for per-kind arrays).
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The kind at `index` in [`REGISTRY`].
    pub fn from_index(index: usize) -> SinkKind {
        SinkKind(index as u8)
    }

    /// The kind registered under `name`.
    pub fn by_name(name: &str) -> Option<SinkKind> {
        REGISTRY
            .iter()
            .position(|p| p.name == name)
            .map(|i| SinkKind(i as u8))
    }
}

/// What a sink would do with a row, decided before any request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The request can be built. `group` says which rows may share a request
    /// (Chatfuel's property-set hash; 0 elsewhere). `hash` identifies the
    /// payload, for the incremental state.
    Ready { group: u64, hash: u64 },
    /// Delivered before with the same payload: `unchanged`, not sent.
    Unchanged,
    /// A message an interrupted run may have sent: `unknown`, not resent.
    Unknown(Box<str>),
    /// The platform would refuse it by its own rules (e.g. Weni's 8–15 digits): `rejected`.
    Rejected(Box<str>),
    /// Not attempted (a cap, `--limit`, the time limit): `skipped`.
    Skipped(Box<str>),
}

/// The flags that override the incremental state.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rerun {
    /// `--full`: idempotent sinks send everything again.
    pub full: bool,
    /// `--resend-messages`: non-idempotent sinks send again what they sent before.
    pub resend_messages: bool,
    /// `--resend-unknown`: non-idempotent sinks send what an interrupted run may have sent.
    pub resend_unknown: bool,
}

/// What a sink plans to do with the rows it will send (the dry run's plan, the ETA).
#[derive(Clone, Debug, Default)]
pub struct PlanCounts {
    /// HTTP requests for the rows.
    pub requests: u64,
    /// Requests beyond the rows' own (Weni: list and create fields and groups).
    pub prepare_requests: u64,
    /// A short note for the plan line (e.g. "in 3 property set(s)").
    pub note: String,
    /// Requests of a second kind on their own limiter (Weni's `contact_actions`).
    pub secondary: Option<SecondaryPlan>,
}

/// Requests of a second kind, paced by their own rate.
#[derive(Clone, Debug)]
pub struct SecondaryPlan {
    pub what: &'static str,
    pub requests: u64,
    pub rate: crate::config::Rate,
}

/// A platform, as the pipeline drives it.
pub trait Sink: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> SinkKind;
    fn common(&self) -> &SinkCommon;
    /// `--sandbox` points the sink at the in-process fakes.
    fn common_mut(&mut self) -> &mut SinkCommon;
    /// Every input column the sink reads, with the config key that reads it.
    fn column_uses(&self) -> Vec<ColumnUse>;
    /// Binds the sink's columns and templates to projected-cell indices.
    fn bind(&mut self, index_of: &dyn Fn(&str) -> usize);
    /// Checks a row (with its normalized phone) against the platform's rules.
    /// `hash`: compute the payload hash (without it, `hash` is 0).
    fn check(&self, row: RowView<'_>, phone: E164, hash: bool) -> Check;
    /// Builds the row's payload (after `check` said `Ready`).
    fn build(&self, row: RowView<'_>, phone: E164, group: u64) -> Payload;
    /// What the state keys this sink's deliveries by (SPEC "What the state belongs to").
    fn state_scope(&self) -> Scope;
    /// `Some(check)` when the state decides a ready row; `None` to send it.
    /// The default fits idempotent sinks: unchanged payloads are skipped unless `--full`.
    fn decide(&self, known: Known<'_>, rerun: Rerun, _phone: E164, hash: u64) -> Option<Check> {
        (!rerun.full && known.delivered() == Some(hash)).then_some(Check::Unchanged)
    }
    /// Whether the payload hash takes part in [`Sink::decide`]. When it does
    /// not (CloudHumans: a template goes to a phone at most once, whatever its
    /// variables), rows are checked without it and only the rows sent are
    /// hashed, for the state's record: a re-run that sends nothing hashes nothing.
    fn hash_decides(&self) -> bool {
        true
    }
    /// A per-run cap on rows sent, with the config key that sets it.
    fn max_rows(&self) -> Option<(u64, &'static str)> {
        None
    }
    /// The plan for `rows` rows, given how many fall in each `group`.
    fn plan(&self, rows: u64, groups: &GroupCounts) -> PlanCounts;
    /// Requests needed for `rows` rows (for the ETA of a backlog).
    fn requests_for(&self, rows: u64) -> u64 {
        rows
    }
    /// May a request that might have been applied be sent again?
    fn idempotent(&self) -> bool {
        true
    }
    /// Tells the in-process fake what this config will send (ids it must accept).
    fn configure_sandbox(&self, _options: &mut SandboxOptions) {}
    /// Delivers everything its lane holds, then returns.
    fn deliver(self: Arc<Self>, lane: Arc<lane::Lane>) -> Delivery;
}

/// A row of a chunk, for building requests.
#[derive(Clone, Copy)]
pub struct RowView<'a> {
    pub chunk: &'a Chunk,
    pub index: usize,
}

impl<'a> RowView<'a> {
    /// Value of projected column `column`.
    pub fn cell(&self, column: usize) -> &'a str {
        self.chunk.cell(self.index, column)
    }
}

/// What the report needs to know about a record a sink carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemMeta {
    pub source: Arc<str>,
    pub row: u64,
    pub record_id: Box<str>,
    pub phone_raw: Box<str>,
    pub phone: E164,
    /// The payload hash recorded in the state once delivered.
    pub hash: u64,
}

/// The per-record part of a request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Payload {
    /// Records sharing `group` may share a request; `properties` are what they share.
    Grouped {
        group: u64,
        properties: Vec<(String, String)>,
    },
    /// One JSON body per record (`Null` when the request has none).
    Json(serde_json::Value),
}

/// A record handed to a sink.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SinkItem {
    pub meta: ItemMeta,
    pub payload: Payload,
}

/// One per-sink report row produced by delivery.
#[derive(Clone, Debug)]
pub struct SinkRow {
    pub meta: ItemMeta,
    pub sink: SinkKind,
    pub status: Status,
    pub http_status: Option<u16>,
    pub attempts: u32,
    pub detail: String,
}

/// Live counters of one sink, for progress.
#[derive(Debug, Default)]
pub struct SinkProgress {
    /// Records handed to the sink.
    pub queued: AtomicU64,
    /// Records with a final status.
    pub done: AtomicU64,
    /// Of those, `rejected`, `failed`, `unknown` or `skipped`.
    pub problems: AtomicU64,
}

/// The keys every sink table takes, as read. serde cannot combine `flatten`
/// with `deny_unknown_fields`, so each sink's raw table repeats them through
/// [`raw_sink_table!`] and hands them over with `common()`.
#[derive(Debug, Default)]
pub struct RawCommon {
    pub enabled: Option<bool>,
    pub base_url: Option<String>,
    pub token_env: Option<String>,
    pub rate: Option<String>,
    pub concurrency: Option<i64>,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_retries: Option<i64>,
    pub retry_backoff: Option<String>,
}

/// Declares a sink's raw config table: the common keys plus its own.
#[macro_export]
macro_rules! raw_sink_table {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct $name {
            enabled: Option<bool>,
            base_url: Option<String>,
            token_env: Option<String>,
            rate: Option<String>,
            concurrency: Option<i64>,
            timeout: Option<String>,
            connect_timeout: Option<String>,
            max_retries: Option<i64>,
            retry_backoff: Option<String>,
            $($field: $ty),*
        }
        impl $name {
            fn common(&mut self) -> $crate::sink::RawCommon {
                $crate::sink::RawCommon {
                    enabled: self.enabled.take(),
                    base_url: self.base_url.take(),
                    token_env: self.token_env.take(),
                    rate: self.rate.take(),
                    concurrency: self.concurrency.take(),
                    timeout: self.timeout.take(),
                    connect_timeout: self.connect_timeout.take(),
                    max_retries: self.max_retries.take(),
                    retry_backoff: self.retry_backoff.take(),
                }
            }
        }
    };
}

/// The accessors every sink writes the same way: a `kind` field and a
/// `config.common` section.
#[macro_export]
macro_rules! sink_accessors {
    () => {
        fn kind(&self) -> $crate::sink::SinkKind {
            self.kind
        }

        fn common(&self) -> &$crate::config::SinkCommon {
            &self.config.common
        }

        fn common_mut(&mut self) -> &mut $crate::config::SinkCommon {
            &mut self.config.common
        }
    };
}

/// Deserializes a sink's raw table, naming the table in the error.
pub fn raw_table<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    kind: SinkKind,
    ctx: &ParseContext<'_>,
) -> Result<T, ConfigError> {
    value
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: ctx.path.to_owned(),
            message: format!(
                "[sinks.{}]: {}",
                kind.name(),
                e.to_string().trim().replace('\n', " ")
            ),
        })
}
