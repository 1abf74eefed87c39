//! The platforms: turning records into requests, and delivering them.
//!
//! Two halves, so that a dry run validates exactly what a real run sends:
//! - **checking and building** (sync, on the pipeline's threads): per row and
//!   sink, whether the platform's own rules accept it ([`check`]) and the
//!   request payload ([`build`]);
//! - **delivering** (async, on the tokio runtime): each sink's [`run`] pulls
//!   [`SinkItem`]s from its bounded channel and sends them with
//!   `concurrency` workers through the shared [`http::Uploader`], reporting one
//!   [`SinkRow`] per record.
//!
//! Adding a platform = one file here (check, build, deliver) and one under `sandbox/`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;

use crate::config::{SinkConfig, SinkKind};
use crate::phone::E164;
use crate::record::Chunk;
use crate::report::Status;
use crate::state::StateWriter;

pub mod chatfuel;
pub mod cloudhumans;
pub mod http;
pub mod weni;

/// What a sink would do with a row, decided before any request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// The request can be built. `group` is Chatfuel's property-set hash (0 elsewhere):
    /// rows with equal groups share batches. `hash` identifies the payload, for the
    /// incremental state.
    Ready { group: u64, hash: u64 },
    /// Delivered before with the same payload (or, for CloudHumans, the same
    /// template): `unchanged`, not sent.
    Unchanged,
    /// A CloudHumans message an interrupted run may have sent: `unknown`, not resent.
    Unknown(Box<str>),
    /// The platform would refuse it by its own rules (e.g. Weni's 8–15 digits): `rejected`.
    Rejected(Box<str>),
    /// Not attempted (e.g. past `max_messages`): `skipped`.
    Skipped(Box<str>),
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

/// Checks `row` (with its normalized `phone`) against `sink`'s request rules.
///
/// `hash`: compute the payload hash (a real run records it; a dry run needs it
/// only when the state has something to compare it with). Without it, `hash` is 0.
pub fn check(sink: &SinkConfig, row: RowView<'_>, phone: E164, hash: bool) -> Check {
    match sink {
        SinkConfig::Chatfuel(c) => chatfuel::check(c, row),
        SinkConfig::Weni(c) => weni::check(c, row, phone, hash),
        SinkConfig::CloudHumans(c) => cloudhumans::check(c, row, phone, hash),
    }
}

/// What the report needs to know about a record a sink carries.
#[derive(Clone, Debug)]
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
#[derive(Clone, Debug)]
pub enum Payload {
    /// Chatfuel: the batch group and this row's property set (static + per-row).
    Chatfuel {
        group: u64,
        properties: Vec<(String, String)>,
    },
    /// Weni and CloudHumans: the JSON body (Weni delete: `Null`).
    Json(serde_json::Value),
}

/// A record handed to a sink.
#[derive(Clone, Debug)]
pub struct SinkItem {
    pub meta: ItemMeta,
    pub payload: Payload,
}

/// Builds `row`'s payload for `sink` (after [`check`] said `Ready`).
pub fn build(sink: &SinkConfig, row: RowView<'_>, phone: E164, group: u64) -> Payload {
    match sink {
        SinkConfig::Chatfuel(c) => Payload::Chatfuel {
            group,
            properties: chatfuel::properties(c, row),
        },
        SinkConfig::Weni(c) => Payload::Json(weni::body(c, row)),
        SinkConfig::CloudHumans(c) => Payload::Json(cloudhumans::body(c, row, phone)),
    }
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

/// Where a sink sends its report rows.
pub type Outcomes = Arc<dyn Fn(Vec<SinkRow>) + Send + Sync>;

/// Everything a running sink holds.
pub struct SinkRuntime {
    pub config: SinkConfig,
    pub token: String,
    pub uploader: http::Uploader,
    pub progress: Arc<SinkProgress>,
    outcomes: Outcomes,
    /// Where deliveries are recorded, and this sink's scope index in it.
    state: Option<(StateWriter, usize)>,
    /// Set by Ctrl-C: requests not started yet end `skipped`.
    interrupted: Arc<std::sync::atomic::AtomicBool>,
}

impl SinkRuntime {
    pub fn new(
        config: SinkConfig,
        token: String,
        progress: Arc<SinkProgress>,
        outcomes: Outcomes,
        state: Option<(StateWriter, usize)>,
        interrupted: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<SinkRuntime, reqwest::Error> {
        // CloudHumans sends a WhatsApp message per call: never resent when it may have landed.
        let idempotent = !matches!(config, SinkConfig::CloudHumans(_));
        let uploader = http::Uploader::new(config.kind(), config.common(), idempotent)?;
        Ok(SinkRuntime {
            config,
            token,
            uploader,
            progress,
            outcomes,
            state,
            interrupted,
        })
    }

    /// Ctrl-C was pressed: take no new request.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// Reports `metas` as not attempted because of Ctrl-C.
    pub fn report_interrupted(&self, metas: Vec<ItemMeta>) {
        self.report(
            metas,
            Status::Skipped,
            None,
            "interrupted (Ctrl-C) before sending; the next run sends it",
        );
    }

    /// CloudHumans: commits the in-flight marker before the request leaves.
    /// `false`: the state cannot be written, so the message must not be sent.
    pub async fn mark_in_flight(&self, meta: &ItemMeta) -> bool {
        match &self.state {
            Some((writer, scope)) => writer.mark_in_flight(*scope, meta.phone, meta.hash).await,
            None => true,
        }
    }

    pub fn kind(&self) -> SinkKind {
        self.config.kind()
    }

    /// Reports the same outcome for every record of a request.
    pub fn report(
        &self,
        metas: Vec<ItemMeta>,
        status: Status,
        finished: Option<&http::Finished>,
        detail: &str,
    ) {
        let n = metas.len() as u64;
        let rows = metas
            .into_iter()
            .map(|meta| SinkRow {
                meta,
                sink: self.kind(),
                status,
                http_status: finished.and_then(|f| f.http_status),
                attempts: finished.map(|f| f.attempts).unwrap_or(0),
                detail: detail.to_owned(),
            })
            .collect();
        self.progress.done.fetch_add(n, Ordering::Relaxed);
        if status.is_problem() {
            self.progress.problems.fetch_add(n, Ordering::Relaxed);
        }
        (self.outcomes)(rows);
    }

    /// Reports a finished request: `success` is the status of a success. Records
    /// deliveries in the state; clears the in-flight markers of requests the
    /// platform answered (an `unknown` keeps its marker: the message may have gone).
    pub fn report_finished(
        &self,
        metas: Vec<ItemMeta>,
        finished: &http::Finished,
        success: Status,
    ) {
        use http::Ended;
        if let Some((writer, scope)) = &self.state {
            for meta in &metas {
                match &finished.ended {
                    Ended::Success => writer.delivered(*scope, meta.phone, meta.hash),
                    Ended::Unknown(_) => {}
                    _ => writer.clear_in_flight(*scope, meta.phone),
                }
            }
        }
        let (status, detail) = match &finished.ended {
            Ended::Success => (success, String::new()),
            Ended::Rejected(r) | Ended::AuthRefused(r) => (Status::Rejected, r.clone()),
            Ended::Failed(r) => (Status::Failed, r.clone()),
            Ended::Unknown(r) => (Status::Unknown, r.clone()),
            Ended::Skipped(r) => (Status::Skipped, r.clone()),
        };
        self.report(metas, status, Some(finished), &detail);
    }
}

/// Delivers everything that arrives on `rx`, then returns.
pub async fn run(sink: Arc<SinkRuntime>, rx: mpsc::Receiver<SinkItem>) {
    match sink.config {
        SinkConfig::Chatfuel(_) => chatfuel::run(sink, rx).await,
        SinkConfig::Weni(_) => weni::run(sink, rx).await,
        SinkConfig::CloudHumans(_) => cloudhumans::run(sink, rx).await,
    }
}

/// Runs `concurrency` workers, each taking the next item from `rx` and handing it to `handle`.
pub async fn worker_pool<T, F, Fut>(concurrency: usize, rx: mpsc::Receiver<T>, handle: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let rx = rx.clone();
        let handle = handle.clone();
        workers.spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                match next {
                    Some(item) => handle(item).await,
                    None => break,
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
}
