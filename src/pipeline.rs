//! The run, top to bottom: how a row travels through the stages. Generic over
//! sinks: nothing here knows which platforms exist (see `sink::REGISTRY`).
//!
//! ```text
//! reader ──chunks──► normalizers ──► merger ──┬─► lane(sink 1) ─► uploaders ─┐
//! (source/*)         (phone.rs +     (dedup,  ├─► lane(sink 2) ─► uploaders ─┼─► report thread
//!                     Sink::check)    state,  └─► lane(sink n) ─► uploaders ─┘   (the accountant)
//!                                     caps)  ──────── record-level rows ─────────►
//! ```
//!
//! 1. **Read** (`source`): one thread reads the inputs in order and cuts them
//!    into [`Chunk`]s of `CHUNK_ROWS` rows with only the needed columns.
//! 2. **Normalize** (`phone`): workers turn each row's phone cells into E.164
//!    and ask every sink whether it could build the row's request.
//! 3. **Merge** (`dedup`): the merger puts chunks back in input order, marks
//!    duplicates, lets the state decide (`unchanged`), applies `--limit` and
//!    the sinks' caps, and hands each row to each sink's **lane**. A lane never
//!    blocks the merger: it queues in memory, then on disk (`sink::lane`), so
//!    each sink goes at its own pace and the reader never waits for Weni.
//! 4. **Report**: one thread writes a report row per record (or per sink) and
//!    counts them; the summary is those counts.
//!
//! One [`Shutdown`] stops everything: SIGTERM/SIGINT (stop reading, finish the
//! requests in flight), `--max-duration` (keep reading so the report is
//! complete, send nothing new), or a failure (the report or a spool cannot be
//! written). Every channel is bounded, and at most `IN_FLIGHT_CHUNKS` chunks
//! are between the reader and the merger, so memory stays flat.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use crate::config::{Config, InputConfig};
use crate::dedup::Dedup;
use crate::phone::{E164, PhoneNormalizer};
use crate::progress::{Progress, ReadMeter, SinkMeter};
use crate::record::{Chunk, Layout, MAX_CHUNK_BYTES, Outcome, Position};
use crate::recycle::Recycler;
use crate::render::{ChunkReport, Rendered};
use crate::report::{Counts, Encoding, Report, ReportError, ReportRow};
use crate::sandbox::{SANDBOX_TOKEN, Sandbox, SandboxOptions};
use crate::shutdown::{Shutdown, StopReason};
use crate::sink::http::Uploader;
use crate::sink::lane::{Lane, Outcomes, SpoolError};
use crate::sink::{
    Check, GroupCounts, ItemMeta, Rerun, RowView, Sink, SinkItem, SinkKind, SinkRow,
};
use crate::source::{self, SourceError};
use crate::state::{Lookup, RunIndex, RunLock, Scope, StateError, StateThread, StateWriter};
use crate::summary::{RunOutcome, SinkPlan, SinkSummary};

/// Rows per chunk: big enough to amortize channel hand-offs, small enough to
/// keep memory flat. The pipeline holds about 20 chunks (text plus rendered
/// report) at once: at 4,096 rows that was ≈ 30 MB, only reached after a few
/// hundred thousand rows, which showed up as RSS growth per phone (issue 11).
pub const CHUNK_ROWS: usize = 1024;
/// Chunks per channel.
const CHANNEL_CHUNKS: usize = 4;
/// Chunks between the reader and the merger at most (bounds the merger's reorder buffer).
const IN_FLIGHT_CHUNKS: usize = 8;
/// More chunks the reader may run ahead while the state loads (≈ 48k rows,
/// ≈ 7 MB): enough for the ≈ 50 ms a re-run spends loading three snapshots.
const LOAD_AHEAD_CHUNKS: usize = 48;

/// How many rows ahead the merger prefetches the state's entries: enough to
/// cover a memory access (a TLB miss too, as mapped snapshots sit on 4 KiB
/// pages) while the rows in between are decided. 8 → 24: merger-thread perf
/// samples of a re-run −12%; 48 gained nothing more (BENCHMARKS.md "Fifth pass").
const PREFETCH_ROWS: usize = 24;

/// The merger's state until the load is done (nothing is decided before).
static EMPTY_STATE: RunIndex = RunIndex::EMPTY;

/// Why a run could not be done (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(
        "config file {path}: no sink is enabled; add a [sinks.<platform>] table (see the README)"
    )]
    NoSinks { path: PathBuf },
    #[error(
        "config file {path}: `sinks.{sink}.token_env` names the environment variable {var}, which is not set (or use --sandbox, or --dry-run)"
    )]
    MissingToken {
        path: PathBuf,
        sink: &'static str,
        var: String,
    },
    #[error(
        "the token in the environment variable {var} (for sink {sink}) cannot be sent in an HTTP header: it holds a control character or non-ASCII text; check the variable (its value is not shown)"
    )]
    BadToken { sink: &'static str, var: String },
    #[error("cannot start the HTTP runtime: {0}")]
    Runtime(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start the sandbox: {0}")]
    Sandbox(std::io::Error),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Delivery was stopped because the run could not account for its rows
    /// (the report or a spool could not be written): the message names it.
    #[error(
        "{0}; the requests in flight finished and the state was written, nothing else was sent"
    )]
    Stopped(String),
}

/// What the command line asked for, beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// INPUT arguments as given.
    pub inputs: Vec<String>,
    pub dry_run: bool,
    /// Start the fake platforms in-process and send to them with dummy tokens.
    pub sandbox: bool,
    /// `--full`, `--resend-messages`, `--resend-unknown`.
    pub rerun: Rerun,
    /// `--report`, relative to the working directory; overrides `[report] path`.
    pub report_path: Option<PathBuf>,
    /// Show progress on stderr.
    pub progress: bool,
    /// `--max-duration`: no request starts after this.
    pub max_duration: Option<Duration>,
    /// `--limit`: each sink sends at most this many rows.
    pub limit: Option<u64>,
}

/// Computes the projection of the input to the columns the run needs, and
/// binds every sink's columns to it.
pub fn bind_layout(config: &mut Config) -> Layout {
    let mut columns: Vec<(String, String)> = Vec::new();
    for u in config.column_uses() {
        if !columns.iter().any(|(c, _)| *c == u.column) {
            columns.push((u.column, u.key));
        }
    }
    let names: Vec<String> = columns.iter().map(|(c, _)| c.clone()).collect();
    let index_of = |name: &str| names.iter().position(|c| c == name).unwrap_or(0);
    let input = &config.input;
    let layout = Layout {
        phones: input.phone_columns.iter().map(|c| index_of(c)).collect(),
        country: input.country_column.as_deref().map(index_of),
        id: input.id_column.as_deref().map(index_of),
        columns,
    };
    for sink in &mut config.sinks {
        sink.bind(&index_of);
    }
    layout
}

/// What the stages share, read-only: the input settings, the sinks, the layout.
pub struct Stages {
    pub input: InputConfig,
    pub sinks: Vec<Arc<dyn Sink>>,
    pub layout: Layout,
}

/// A chunk plus what the sinks decided for its rows (`rows × sinks`, row-major).
pub struct Checked {
    chunk: Chunk,
    checks: Vec<Check>,
}

/// The buffers a chunk's journey hands back to its start (see [`crate::recycle`]).
#[derive(Clone)]
struct Recyclers {
    /// From the render workers (or the Parquet report) to the reader.
    chunks: Recycler<Chunk>,
    /// With them, to the normalizers.
    checks: Recycler<Vec<Check>>,
    /// From the report thread to the render workers.
    report_bytes: Recycler<Vec<u8>>,
}

impl Recyclers {
    /// Room for `idle` idle buffers of each kind.
    fn new(idle: usize) -> Recyclers {
        Recyclers {
            chunks: Recycler::new(idle),
            checks: Recycler::new(idle),
            report_bytes: Recycler::new(idle),
        }
    }

    /// Hands back a chunk whose report rows are written or rendered. One that
    /// grew past [`RECYCLED_BYTES_MAX`] (rows of huge cells) is freed instead.
    fn give_checked(&self, checked: Checked) {
        if checked.chunk.text_capacity() <= RECYCLED_BYTES_MAX {
            self.chunks.give(checked.chunk);
        }
        self.checks.give(checked.checks);
    }

    /// Hands back a chunk's report bytes once written (freed if huge).
    fn give_report_bytes(&self, bytes: Vec<u8>) {
        if bytes.capacity() <= RECYCLED_BYTES_MAX {
            self.report_bytes.give(bytes);
        }
    }
}

/// The largest text or report buffer kept for reuse: a typical chunk's are
/// 0.2–0.6 MB, and one grown by a few huge cells (up to [`MAX_CHUNK_BYTES`])
/// should not stay allocated for the rest of the run.
const RECYCLED_BYTES_MAX: usize = 2 << 20;

/// What the report thread receives: merged chunks, rendered (text reports) or
/// not (Parquet), and per-sink rows from the lanes.
enum ReportMsg {
    Chunk(Checked),
    Rendered(Rendered),
    Rows(Vec<SinkRow>),
}

impl ReportMsg {
    /// The place of a chunk's rows in the run (the report keeps input order).
    fn seq(&self) -> Option<u64> {
        match self {
            ReportMsg::Chunk(c) => Some(c.chunk.seq),
            ReportMsg::Rendered(r) => Some(r.seq),
            ReportMsg::Rows(_) => None,
        }
    }
}

/// A sink's lane, with the sink it delivers for.
type LaneOf = (Arc<Lane>, Arc<dyn Sink>);

/// What the state says about rows, and which flags override it.
struct Incremental {
    /// The indexes' load, started beside the reader: a re-run's tens of ms of
    /// mapping and checksumming its snapshots then overlap the first
    /// chunks' parsing instead of delaying them. Only the merger waits for it.
    loaded: Receiver<Result<RunIndex, StateError>>,
    /// What was delivered before, once loaded.
    index: OnceLock<RunIndex>,
    /// Whether the state has any of this run's scopes (else the load is instant).
    loads_anything: bool,
    /// The state file (for an error if the load thread dies).
    path: PathBuf,
    rerun: Rerun,
}

impl Incremental {
    /// Starts loading the indexes on a thread of their own.
    fn start(
        located: crate::state::Located,
        sinks: usize,
        rerun: Rerun,
    ) -> Result<Incremental, RunError> {
        let loads_anything = (0..sinks).any(|s| located.knows(s));
        let path = located.path().to_owned();
        let (tx, loaded) = bounded(1);
        std::thread::Builder::new()
            .name("crm-import-load".into())
            .spawn(move || {
                let _ = tx.send(located.load());
            })
            .map_err(|e| RunError::Runtime(format!("cannot start loading the state: {e}")))?;
        Ok(Incremental {
            loaded,
            index: OnceLock::new(),
            loads_anything,
            path,
            rerun,
        })
    }

    /// Waits for the indexes, keeping the chunks that arrive meanwhile in `pending`.
    fn wait_collecting(
        &self,
        rx: &Receiver<Result<Checked, SourceError>>,
        pending: &mut BTreeMap<u64, Checked>,
    ) -> Result<&RunIndex, RunError> {
        let mut input_open = true;
        let loaded = loop {
            if !input_open {
                break self.loaded.recv();
            }
            crossbeam_channel::select! {
                recv(self.loaded) -> loaded => break loaded,
                recv(rx) -> message => match message {
                    Ok(message) => {
                        let checked = message?;
                        pending.insert(checked.chunk.seq, checked);
                    }
                    Err(_) => input_open = false,
                },
            }
        };
        let loaded = loaded.unwrap_or_else(|_| {
            Err(StateError {
                path: self.path.clone(),
                message: "loading the state stopped unexpectedly".into(),
            })
        })?;
        Ok(self.index.get_or_init(|| loaded))
    }
}

/// Runs the pipeline.
pub fn run(mut config: Config, options: &RunOptions) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    // Signals are handled from the first moment: a SIGTERM during start-up
    // must stop the run gracefully too, not kill it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RunError::Runtime(e.to_string()))?;
    let shutdown = Shutdown::new();
    watch_signals(&runtime, &shutdown);
    if config.sinks.is_empty() {
        return Err(RunError::NoSinks { path: config.path });
    }
    let layout = bind_layout(&mut config);
    let files = source::expand_inputs(&options.inputs, runtime.handle())?;
    check_headers(&files, &config.input, &layout)?;
    let tokens = tokens(&config, options)?;
    let state_path = state_path_for(&config.state_path, options.sandbox);
    // A dry run writes nothing, so it never waits for (or blocks) a real run.
    let _lock = (!options.dry_run)
        .then(|| RunLock::acquire(&state_path))
        .transpose()?;
    let report_path = options
        .report_path
        .clone()
        .unwrap_or_else(|| config.report_path.clone());
    let report = Report::create(&report_path)?;
    // Scopes are taken from the config as written, before --sandbox repoints the sinks.
    let scopes: Vec<Scope> = config.sinks.iter().map(|s| s.state_scope()).collect();
    let located = crate::state::locate(&state_path, &scopes, options.dry_run)?;
    // The workers hash payloads only for the sinks whose state decisions
    // compare them; the merger hashes the rows the others send (see `route`).
    let hashing: Vec<bool> = config
        .sinks
        .iter()
        .enumerate()
        .map(|(s, sink)| sink.hash_decides() && (!options.dry_run || located.knows(s)))
        .collect();
    let incremental = Incremental::start(located, config.sinks.len(), options.rerun)?;
    let state = (!options.dry_run)
        .then(|| StateWriter::start(&state_path, scopes))
        .transpose()?;
    let sandbox = (options.sandbox && !options.dry_run)
        .then(|| start_sandbox(&runtime, &mut config))
        .transpose()?;
    if let (false, Some(limit)) = (options.dry_run, options.max_duration) {
        let shutdown = shutdown.clone();
        runtime.spawn(async move {
            if shutdown.sleep(limit).await {
                shutdown.stop(StopReason::TimeLimit(limit));
            }
        });
    }
    let stages = Stages {
        input: config.input.clone(),
        sinks: config.sinks.into_iter().map(Arc::from).collect(),
        layout,
    };
    let run = Run {
        stages: &stages,
        options,
        runtime: &runtime,
        shutdown: &shutdown,
        incremental: &incremental,
        hashing: &hashing,
        started,
        state_path: state_path.clone(),
    };
    let flowed = run.flow(&files, report, &report_path, tokens, state);
    let sandbox_received = sandbox.as_ref().map(|s| s.log().summary_line());
    drop(sandbox);
    let mut outcome = flowed?;
    outcome.sandbox_received = sandbox_received;
    Ok(outcome)
}

/// A run's shared context once everything is open.
struct Run<'a> {
    stages: &'a Stages,
    options: &'a RunOptions,
    runtime: &'a tokio::runtime::Runtime,
    shutdown: &'a Shutdown,
    incremental: &'a Incremental,
    hashing: &'a [bool],
    started: Instant,
    /// The state file of this run (its directory holds the lanes' spools).
    state_path: PathBuf,
}

/// What the threads of a run hand back.
struct Flowed {
    merged: Result<(Vec<SinkPlan>, u64), RunError>,
    input_rows: u64,
    counts: Result<Counts, ReportError>,
    sinks: Vec<SinkSummary>,
}

impl Run<'_> {
    /// Starts the lanes and the threads, waits for every row to be accounted
    /// for, and commits the state.
    fn flow(
        &self,
        files: &[source::InputFile],
        report: Report,
        report_path: &Path,
        tokens: Vec<String>,
        state: Option<(StateWriter, StateThread)>,
    ) -> Result<RunOutcome, RunError> {
        let (report_tx, report_rx) = bounded::<ReportMsg>(CHANNEL_CHUNKS);
        let writer = state.as_ref().map(|(w, _)| w.clone());
        let lanes = match self.options.dry_run {
            true => Vec::new(),
            false => self.start_lanes(tokens, writer, &report_tx)?,
        };
        let read = ReadMeter {
            total_bytes: source::total_bytes(files),
            ..ReadMeter::default()
        };
        let progress = Progress::start(self.options.progress, read.clone(), self.meters(&lanes));
        let flowed = self.run_threads(
            files,
            &read,
            lanes,
            (report, report_tx, report_rx),
            report_path,
        );
        progress.finish();
        // Every sink is done: the last deliveries are committed before the run ends.
        let state_result = state.map(|(writer, thread)| {
            drop(writer);
            thread.finish()
        });
        self.conclude(flowed, state_result, report_path)
    }

    /// The report thread, the reader and normalizers, the merger, and the
    /// lanes' deliveries; returns when every row is accounted for.
    fn run_threads(
        &self,
        files: &[source::InputFile],
        read: &ReadMeter,
        lanes: Vec<LaneOf>,
        (report, report_tx, report_rx): (Report, Sender<ReportMsg>, Receiver<ReportMsg>),
        report_path: &Path,
    ) -> Flowed {
        // Every lane delivers at its own pace from the start, while rows are still being read.
        let deliveries: Vec<_> = lanes
            .iter()
            .map(|(lane, sink)| self.runtime.spawn(sink.clone().deliver(lane.clone())))
            .collect();
        std::thread::scope(|scope| {
            let shutdown = self.shutdown.clone();
            let encoding = report.encoding();
            let renderers = match encoding {
                Some(_) => std::thread::available_parallelism().map_or(2, |n| n.get()),
                None => 1,
            };
            // One idle buffer of each kind per render worker: on the 1M-row
            // export, 2 idle buffers left 14–16k page faults and 6 left 10–11k
            // (≈ 6 ms of CPU), but 6 held ≈ 3 MB more at the peak (BENCHMARKS.md).
            let recyclers = Recyclers::new(renderers);
            let returned = recyclers.clone();
            let report_thread = scope.spawn(move || {
                let counts = write_report(
                    report,
                    self.stages,
                    self.options.dry_run,
                    report_rx,
                    &returned,
                );
                if let Err(e) = &counts {
                    shutdown.stop(StopReason::Failure(e.to_string()));
                }
                counts
            });
            let (merged_tx, merged_rx) = bounded::<Checked>(CHANNEL_CHUNKS);
            let names: Arc<[Arc<str>]> = files.iter().map(|f| Arc::from(f.name.as_str())).collect();
            for _ in 0..renderers {
                let (merged_rx, report_tx) = (merged_rx.clone(), report_tx.clone());
                let (names, recyclers) = (names.clone(), recyclers.clone());
                scope.spawn(move || {
                    self.render_worker(encoding, &names, &recyclers, merged_rx, report_tx);
                });
            }
            drop(merged_rx);
            let (merged, input_rows) =
                self.read_and_merge(scope, files, read, &lanes, merged_tx, &recyclers);
            drop(report_tx);
            self.finish_lanes(&lanes, deliveries, &merged);
            let sinks = lanes
                .iter()
                .map(|(lane, sink)| summarize(lane, sink.as_ref()))
                .collect();
            // The lanes' report senders must be gone before the report thread can end.
            drop(lanes);
            let counts = report_thread.join().unwrap_or_else(|_| {
                Err(ReportError {
                    path: report_path.to_owned(),
                    message: "report writer stopped unexpectedly".into(),
                })
            });
            Flowed {
                merged,
                input_rows,
                counts,
                sinks,
            }
        })
    }

    /// The outcome of a run whose threads are done, or why it could not be done.
    fn conclude(
        &self,
        flowed: Flowed,
        state_result: Option<Result<u64, StateError>>,
        report_path: &Path,
    ) -> Result<RunOutcome, RunError> {
        let (plans, unique_phones) = flowed.merged?;
        let counts = flowed.counts?;
        if let Some(result) = state_result {
            result?;
        }
        let interrupted = match self.shutdown.reason() {
            Some(StopReason::Failure(why)) => return Err(RunError::Stopped(why.clone())),
            Some(StopReason::Signal(name)) => Some(format!("{name} received")),
            Some(StopReason::TimeLimit(_)) => Some("--max-duration reached".to_owned()),
            None => None,
        };
        Ok(RunOutcome {
            counts,
            input_rows: flowed.input_rows,
            unique_phones,
            elapsed: self.started.elapsed(),
            report_path: report_path.to_owned(),
            plans,
            dry_run: self.options.dry_run,
            sinks: flowed.sinks,
            sandbox_received: None,
            interrupted,
            max_duration: self.options.max_duration,
        })
    }

    /// The reader and normalizer threads, and the merger on this thread.
    fn read_and_merge<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
        files: &'s [source::InputFile],
        read: &'s ReadMeter,
        lanes: &[LaneOf],
        merged_tx: Sender<Checked>,
        recyclers: &Recyclers,
    ) -> (Result<(Vec<SinkPlan>, u64), RunError>, u64) {
        let (raw_tx, raw_rx) = bounded::<Result<Chunk, SourceError>>(CHANNEL_CHUNKS);
        let (checked_tx, checked_rx) = bounded::<Result<Checked, SourceError>>(CHANNEL_CHUNKS * 2);
        // One token per chunk between the reader and the merger.
        let ahead = match self.incremental.loads_anything {
            true => LOAD_AHEAD_CHUNKS,
            false => 0,
        };
        let (permits_tx, permits_rx) = bounded::<()>(IN_FLIGHT_CHUNKS + ahead);
        let chunks = recyclers.chunks.clone();
        let reader = scope.spawn(move || {
            let reader = ChunkReader {
                stages: self.stages,
                shutdown: self.shutdown,
                read,
                permits: permits_tx,
                chunks,
            };
            reader.read_all(files, raw_tx)
        });
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..workers {
            let (raw_rx, checked_tx) = (raw_rx.clone(), checked_tx.clone());
            let checks = recyclers.checks.clone();
            scope.spawn(move || {
                normalize_worker(self.stages, self.hashing, &checks, raw_rx, checked_tx)
            });
        }
        drop((raw_rx, checked_tx));
        let mut merger = Merger::new(self, lanes);
        let merged = merger.merge(checked_rx, &merged_tx, (&permits_rx, ahead));
        if merged.is_err() {
            self.shutdown.stop(StopReason::Failure(
                "the input could not be read to the end".into(),
            ));
        }
        drop(permits_rx);
        (merged, reader.join().unwrap_or(0))
    }

    /// Turns merged chunks into report rows: bytes for a text report, or the
    /// chunk itself for the report thread to write (Parquet).
    fn render_worker(
        &self,
        encoding: Option<Encoding>,
        source_names: &[Arc<str>],
        recyclers: &Recyclers,
        rx: Receiver<Checked>,
        tx: Sender<ReportMsg>,
    ) {
        let kinds: Vec<SinkKind> = self.stages.sinks.iter().map(|s| s.kind()).collect();
        let chunk_report = ChunkReport {
            layout: &self.stages.layout,
            kinds: &kinds,
            dry_run: self.options.dry_run,
            source_names,
        };
        for checked in rx {
            let message = match encoding {
                Some(encoding) => {
                    let bytes = recyclers.report_bytes.take_empty();
                    let rendered =
                        chunk_report.render(encoding, &checked.chunk, &checked.checks, bytes);
                    recyclers.give_checked(checked);
                    ReportMsg::Rendered(rendered)
                }
                None => ReportMsg::Chunk(checked),
            };
            if tx.send(message).is_err() {
                return;
            }
        }
    }

    /// One lane and one delivery task per sink, on the runtime.
    fn start_lanes(
        &self,
        tokens: Vec<String>,
        state: Option<StateWriter>,
        report_tx: &Sender<ReportMsg>,
    ) -> Result<Vec<LaneOf>, RunError> {
        let spool_dir = spool_dir(&self.state_path);
        let mut lanes = Vec::new();
        for (s, (sink, token)) in self.stages.sinks.iter().zip(tokens).enumerate() {
            let to_report = report_tx.clone();
            let outcomes: Outcomes = Arc::new(move |rows: Vec<SinkRow>| {
                let _ = to_report.send(ReportMsg::Rows(rows));
            });
            let uploader = Uploader::new(
                sink.kind(),
                sink.common(),
                sink.idempotent(),
                self.shutdown.clone(),
            )
            .map_err(|e| RunError::Runtime(e.to_string()))?;
            let lane = Arc::new(Lane::new(
                sink.kind(),
                token,
                uploader,
                &spool_dir,
                outcomes,
                state.clone().map(|w| (w, s)),
                self.shutdown.clone(),
            ));
            lanes.push((lane, sink.clone()));
        }
        Ok(lanes)
    }

    /// Closes the lanes' queues (no more rows), warns about plans that do not
    /// fit the time box, and waits for every lane to report every row.
    fn finish_lanes(
        &self,
        lanes: &[LaneOf],
        tasks: Vec<tokio::task::JoinHandle<()>>,
        merged: &Result<(Vec<SinkPlan>, u64), RunError>,
    ) {
        for (lane, _) in lanes {
            lane.queue.close();
        }
        if let (Ok((plans, _)), Some(limit)) = (merged, self.options.max_duration) {
            let left = limit.saturating_sub(self.started.elapsed());
            for warning in plans.iter().filter_map(|p| p.over_limit(left)) {
                eprintln!("crm-import: {warning}");
            }
        }
        for task in tasks {
            if let Err(e) = self.runtime.block_on(task) {
                // A delivery task that panicked: its unreported rows cannot be
                // vouched for, so the run fails loudly instead of exiting 0.
                self.shutdown.stop(StopReason::Failure(format!(
                    "a sink's delivery stopped unexpectedly ({e})"
                )));
            }
        }
    }

    /// What progress shows of each sink.
    fn meters(&self, lanes: &[LaneOf]) -> Vec<SinkMeter> {
        lanes
            .iter()
            .map(|(lane, sink)| SinkMeter {
                name: sink.kind().name(),
                progress: lane.progress.clone(),
                requests_per_second: sink.common().rate.per_second(),
                rows_per_request: 1000 / sink.requests_for(1000).max(1),
            })
            .collect()
    }
}

/// The state file of a run: `--sandbox` keeps its own beside the configured
/// one, so a rehearsal can never mark anything delivered for real.
pub fn state_path_for(configured: &Path, sandbox: bool) -> PathBuf {
    if !sandbox {
        return configured.to_owned();
    }
    let mut name = configured.as_os_str().to_owned();
    name.push(".sandbox.db");
    PathBuf::from(name)
}

/// Where lanes spill their queues: beside the state (SPEC "Each sink runs at its own pace").
fn spool_dir(state_path: &Path) -> PathBuf {
    state_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Every header is checked before any row is processed (stdin is checked when read).
fn check_headers(
    files: &[source::InputFile],
    input: &InputConfig,
    layout: &Layout,
) -> Result<(), RunError> {
    for file in files.iter().filter(|f| !f.is_stdin()) {
        let reader = source::open(file, input)?;
        source::resolve_columns(&file.name, reader.header(), &layout.columns)?;
    }
    Ok(())
}

/// Each sink's token: from the environment variable its config names, trimmed
/// (a `.env` file written on Windows leaves a `\r`), and able to form a header.
fn tokens(config: &Config, options: &RunOptions) -> Result<Vec<String>, RunError> {
    if options.dry_run || options.sandbox {
        return Ok(vec![SANDBOX_TOKEN.to_owned(); config.sinks.len()]);
    }
    config
        .sinks
        .iter()
        .map(|s| {
            let (sink, var) = (s.kind().name(), s.common().token_env.clone());
            let token = std::env::var_os(&var)
                .map(|t| t.to_string_lossy().trim().to_owned())
                .filter(|t| !t.is_empty());
            let Some(token) = token else {
                return Err(RunError::MissingToken {
                    path: config.path.clone(),
                    sink,
                    var,
                });
            };
            if reqwest::header::HeaderValue::from_str(&token).is_err() || !token.is_ascii() {
                return Err(RunError::BadToken { sink, var });
            }
            Ok(token)
        })
        .collect()
}

/// SIGTERM and SIGINT stop the run gracefully; a second one quits at once.
/// The handlers are registered before this returns (not in the spawned task),
/// so no signal can arrive between start-up and their installation.
fn watch_signals(runtime: &tokio::runtime::Runtime, shutdown: &Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let _guard = runtime.enter();
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    let shutdown = shutdown.clone();
    runtime.spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if shutdown.signal(name) > 1 {
                eprintln!("\ncrm-import: {name} again: quitting now (the state is consistent)");
                std::process::exit(130);
            }
            eprintln!(
                "\ncrm-import: {name}: no new rows or requests; finishing the requests in flight and writing the state and report ({name} again quits at once)"
            );
        }
    });
}

/// Starts the in-process sandbox on a loopback ephemeral port and points every
/// sink at it. The fakes learn the config's ids so they accept them.
fn start_sandbox(
    runtime: &tokio::runtime::Runtime,
    config: &mut Config,
) -> Result<Sandbox, RunError> {
    let mut options = SandboxOptions::default();
    for sink in &config.sinks {
        sink.configure_sandbox(&mut options);
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let sandbox = runtime
        .block_on(Sandbox::start(addr, options))
        .map_err(RunError::Sandbox)?;
    for sink in &mut config.sinks {
        sink.common_mut().base_url = sandbox.base_url();
    }
    Ok(sandbox)
}

fn summarize(lane: &Lane, sink: &dyn Sink) -> SinkSummary {
    let stats = &lane.uploader.stats;
    SinkSummary {
        kind: lane.kind,
        requests: stats.requests.load(Ordering::Relaxed),
        throttled: stats.throttled.load(Ordering::Relaxed),
        retries: stats.retries.load(Ordering::Relaxed),
        achieved_rate: stats.achieved_rate(),
        rate: sink.common().rate,
        auth_refused: lane.uploader.stopped(),
    }
}

/// The reader thread's view.
struct ChunkReader<'a> {
    stages: &'a Stages,
    shutdown: &'a Shutdown,
    read: &'a ReadMeter,
    /// A place must be free here before a chunk is sent (see `IN_FLIGHT_CHUNKS`).
    permits: Sender<()>,
    /// Chunks whose rows are reported, to fill again.
    chunks: Recycler<Chunk>,
}

impl ChunkReader<'_> {
    /// Every input in order, cut into chunks. Returns rows read.
    fn read_all(&self, files: &[source::InputFile], tx: Sender<Result<Chunk, SourceError>>) -> u64 {
        let (mut seq, mut rows, mut bytes_before) = (0, 0, 0);
        // Cell text of the last chunk, plus an eighth: the next one's reservation.
        let mut text_hint = 0;
        for (index, file) in files.iter().enumerate() {
            let layout = &self.stages.layout;
            let opened = source::open(file, &self.stages.input).and_then(|mut reader| {
                reader.project(source::resolve_columns(
                    &file.name,
                    reader.header(),
                    &layout.columns,
                )?);
                Ok(reader)
            });
            let mut reader = match opened {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return rows;
                }
            };
            let name: Arc<str> = Arc::from(file.name.as_str());
            loop {
                if self.shutdown.stops_reading() {
                    return rows;
                }
                let (width, source) = (layout.columns.len(), index as u32);
                let mut chunk = match self.chunks.take() {
                    Some(mut chunk) => {
                        chunk.reset(seq, source, name.clone(), width);
                        chunk
                    }
                    None => Chunk::new(seq, source, name.clone(), width),
                };
                chunk.reserve(CHUNK_ROWS, text_hint);
                let filled = reader.fill(&mut chunk, CHUNK_ROWS);
                text_hint = (chunk.text_len() + chunk.text_len() / 8).min(MAX_CHUNK_BYTES);
                rows += chunk.len() as u64;
                self.read.rows.store(rows, Ordering::Relaxed);
                let at = bytes_before + reader.bytes_read();
                self.read.bytes.store(at, Ordering::Relaxed);
                let more = match filled {
                    Ok(more) => more,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return rows;
                    }
                };
                if !chunk.is_empty() {
                    seq += 1;
                    if self.permits.send(()).is_err() || tx.send(Ok(chunk)).is_err() {
                        return rows;
                    }
                }
                if !more {
                    break;
                }
            }
            bytes_before += reader.bytes_read();
        }
        rows
    }
}

/// Normalizer worker: phones → E.164, then each sink's check. One [`PhoneNormalizer`]
/// per worker, so compiled patterns are never shared or locked.
fn normalize_worker(
    stages: &Stages,
    hashing: &[bool],
    recycled: &Recycler<Vec<Check>>,
    rx: Receiver<Result<Chunk, SourceError>>,
    tx: Sender<Result<Checked, SourceError>>,
) {
    let mut normalizer = PhoneNormalizer::new(stages.input.default_region.clone());
    for message in rx {
        let out = message.map(|mut chunk| {
            let checks = recycled.take_empty();
            let checks = normalize_chunk(stages, hashing, &mut normalizer, &mut chunk, checks);
            Checked { chunk, checks }
        });
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// Fills each pending row's [`Outcome`] and returns the sinks' checks (`rows × sinks`),
/// in `checks`: an empty vector, often a recycled one ([`crate::recycle`]).
/// `hashing[s]`: whether sink `s` needs payload hashes (see [`Sink::check`]).
///
/// Sink by sink over the chunk's rows, not row by row over the sinks: a
/// payload hash is a chain of dependent multiplications (≈ 33 for a Weni
/// row), and with one sink's checks back to back the CPU runs the next row's
/// chain beside the last one's, where a row's phone parsing in between kept
/// them apart (BENCHMARKS.md "Seventh pass").
pub fn normalize_chunk(
    stages: &Stages,
    hashing: &[bool],
    normalizer: &mut PhoneNormalizer,
    chunk: &mut Chunk,
    mut checks: Vec<Check>,
) -> Vec<Check> {
    let sinks = stages.sinks.len();
    debug_assert!(checks.is_empty(), "checks would follow another chunk's");
    checks.resize(chunk.len() * sinks, Check::Ready { group: 0, hash: 0 });
    let mut normalized = Vec::with_capacity(chunk.len());
    for i in 0..chunk.len() {
        if !matches!(chunk.rows[i].outcome, Outcome::Pending) {
            continue;
        }
        chunk.rows[i].outcome = normalize_row(&stages.layout, normalizer, chunk, i);
        if let Outcome::Unique { phone, .. } = chunk.rows[i].outcome {
            normalized.push((i, phone));
        }
    }
    for (s, sink) in stages.sinks.iter().enumerate() {
        for &(i, phone) in &normalized {
            let row = RowView { chunk, index: i };
            checks[i * sinks + s] = sink.check(row, phone, hashing[s]);
        }
    }
    checks
}

/// Row `i`'s outcome from its phone columns: the first that normalizes, else invalid.
fn normalize_row(
    layout: &Layout,
    normalizer: &mut PhoneNormalizer,
    chunk: &Chunk,
    i: usize,
) -> Outcome {
    let region = layout.country.map(|c| chunk.cell(i, c));
    let mut first_non_empty = None;
    let mut first_reason = None;
    for (k, &column) in layout.phones.iter().enumerate() {
        let raw = chunk.cell(i, column);
        if crate::record::trim(raw).is_empty() {
            continue;
        }
        first_non_empty.get_or_insert(k as u8);
        match normalizer.normalize(raw, region) {
            Ok(phone) => {
                return Outcome::Unique {
                    raw_column: k as u8,
                    phone,
                };
            }
            Err(reason) => {
                first_reason.get_or_insert(reason);
            }
        }
    }
    Outcome::InvalidPhone {
        raw_column: first_non_empty,
        reason: first_reason.unwrap_or(crate::phone::InvalidReason::Empty),
    }
}

/// The merger: back in input order, dedup, the state, the caps, the hand-off to the lanes.
struct Merger<'a> {
    run: &'a Run<'a>,
    lanes: &'a [(Arc<Lane>, Arc<dyn Sink>)],
    /// What the state says was delivered (empty until `merge` starts).
    state: &'a RunIndex,
    dedup: Dedup,
    /// Rows handed to each sink so far (for `--limit` and the sinks' caps).
    sent: Vec<u64>,
    /// Per sink: rows per request group (the plan).
    groups: Vec<GroupCounts>,
}

impl<'a> Merger<'a> {
    fn new(run: &'a Run<'a>, lanes: &'a [(Arc<Lane>, Arc<dyn Sink>)]) -> Merger<'a> {
        let n = run.stages.sinks.len();
        Merger {
            run,
            lanes,
            state: &EMPTY_STATE,
            dedup: Dedup::new(),
            sent: vec![0; n],
            groups: vec![GroupCounts::new(); n],
        }
    }

    /// `permits`: the reader's tokens, and how many more than
    /// `IN_FLIGHT_CHUNKS` it was allowed while the state loaded: that many
    /// merged chunks keep their token, so the bound shrinks back.
    fn merge(
        &mut self,
        rx: Receiver<Result<Checked, SourceError>>,
        tx: &Sender<Checked>,
        (permits, mut withheld): (&Receiver<()>, usize),
    ) -> Result<(Vec<SinkPlan>, u64), RunError> {
        let mut pending: BTreeMap<u64, Checked> = BTreeMap::new();
        self.state = self.run.incremental.wait_collecting(&rx, &mut pending)?;
        self.dedup.know_slots(self.state.joint_slots());
        let mut next = 0u64;
        let mut input = rx.iter();
        loop {
            while let Some(mut checked) = pending.remove(&next) {
                next += 1;
                if withheld > 0 {
                    withheld -= 1;
                } else {
                    let _ = permits.try_recv();
                }
                self.merge_chunk(&mut checked)?;
                if tx.send(checked).is_err() {
                    return Err(RunError::Report(ReportError {
                        path: PathBuf::new(),
                        message: "report writer stopped".into(),
                    }));
                }
            }
            let Some(message) = input.next() else { break };
            let checked = message?;
            pending.insert(checked.chunk.seq, checked);
        }
        let plans = self
            .run
            .stages
            .sinks
            .iter()
            .enumerate()
            .map(|(s, sink)| SinkPlan {
                kind: sink.kind(),
                rows: self.sent[s],
                counts: sink.plan(self.sent[s], &self.groups[s]),
                rate: sink.common().rate,
                concurrency: sink.common().concurrency,
            })
            .collect();
        Ok((plans, self.dedup.len() as u64))
    }

    fn merge_chunk(&mut self, checked: &mut Checked) -> Result<(), SpoolError> {
        let sinks = self.run.stages.sinks.len();
        let chunk = &mut checked.chunk;
        let state = self.state;
        self.dedup
            .warm(chunk.rows.iter().filter_map(|r| match r.outcome {
                Outcome::Unique { phone, .. } => Some(phone),
                _ => None,
            }));
        for i in 0..chunk.len() {
            // A re-run looks every row up in each sink's index, and each lookup
            // misses the cache: start fetching a few rows ahead.
            if let Some(Outcome::Unique { phone, .. }) =
                chunk.rows.get(i + PREFETCH_ROWS).map(|r| &r.outcome)
            {
                state.prefetch(*phone);
            }
            let Outcome::Unique { raw_column, phone } = chunk.rows[i].outcome else {
                continue;
            };
            let at = Position {
                source: chunk.source,
                row: chunk.rows[i].row,
            };
            let known = state.lookup(phone);
            let first = match known.joint_slot() {
                Some(slot) => self.dedup.check_known(slot, phone, at),
                None => self.dedup.check(phone, at),
            };
            if let Some(first) = first {
                chunk.rows[i].outcome = Outcome::Duplicate {
                    raw_column,
                    phone,
                    first,
                };
                continue;
            }
            for s in 0..sinks {
                let check = &mut checked.checks[i * sinks + s];
                let row = RowView { chunk, index: i };
                self.route(s, row, (raw_column, phone), known, check)?;
            }
        }
        Ok(())
    }

    /// Decides a ready row for sink `s`: the state, the time box, the caps —
    /// or hands it to the sink's lane (which reports it when its request ends).
    fn route(
        &mut self,
        s: usize,
        row: RowView<'_>,
        (raw_column, phone): (u8, E164),
        known: Lookup<'_>,
        check: &mut Check,
    ) -> Result<(), SpoolError> {
        let Check::Ready { group, hash } = *check else {
            return Ok(());
        };
        let sink = &self.run.stages.sinks[s];
        let rerun = self.run.incremental.rerun;
        if let Some(decided) = sink.decide(known.for_sink(s), rerun, phone, hash) {
            *check = decided;
            return Ok(());
        }
        if let Some(reason) = self.run.shutdown.reason() {
            *check = Check::Skipped(reason.detail().into());
            return Ok(());
        }
        if self.run.options.limit.is_some_and(|n| self.sent[s] >= n) {
            *check = Check::Skipped("limit".into());
            return Ok(());
        }
        if let Some((max, key)) = sink.max_rows()
            && self.sent[s] >= max
        {
            *check = Check::Skipped(format!("{key} ({max}) reached").into());
            return Ok(());
        }
        self.sent[s] += 1;
        *self.groups[s].entry(group).or_insert(0) += 1;
        if let Some((lane, _)) = self.lanes.get(s) {
            let hash = match self.run.hashing[s] {
                true => hash,
                false => recorded_hash(sink.as_ref(), row, phone),
            };
            let layout = &self.run.stages.layout;
            let meta = ItemMeta {
                source: row.chunk.source_name.clone(),
                row: row.chunk.rows[row.index].row,
                record_id: layout.id.map(|c| row.cell(c)).unwrap_or("").into(),
                phone_raw: row.cell(layout.phones[raw_column as usize]).into(),
                phone,
                hash,
            };
            let payload = sink.build(row, phone, group);
            lane.push(SinkItem { meta, payload })?;
        }
        Ok(())
    }
}

/// The payload hash the state records for a row sent by a sink that checked
/// it without one ([`Sink::hash_decides`]).
fn recorded_hash(sink: &dyn Sink, row: RowView<'_>, phone: E164) -> u64 {
    match sink.check(row, phone, true) {
        Check::Ready { hash, .. } => hash,
        _ => 0,
    }
}

/// Report thread: the accountant. Writes chunks' rows in input order (they
/// may arrive out of order from the render workers) and lanes' rows as they
/// come. Flushed at least every second, even while no row arrives, so a
/// killed run's report holds everything up to its last second.
fn write_report(
    mut report: Report,
    stages: &Stages,
    dry_run: bool,
    rx: Receiver<ReportMsg>,
    recyclers: &Recyclers,
) -> Result<Counts, ReportError> {
    let kinds: Vec<SinkKind> = stages.sinks.iter().map(|s| s.kind()).collect();
    let mut source_names: Vec<Arc<str>> = Vec::new();
    let mut waiting: BTreeMap<u64, ReportMsg> = BTreeMap::new();
    let mut next_seq = 0u64;
    let mut last_flush = Instant::now();
    loop {
        let message = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => {
                report.flush()?;
                last_flush = Instant::now();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if last_flush.elapsed() >= Duration::from_secs(1) {
            report.flush()?;
            last_flush = Instant::now();
        }
        let Some(seq) = message.seq() else {
            if let ReportMsg::Rows(rows) = message {
                for r in &rows {
                    report.write(&sink_row(r))?;
                }
            }
            continue;
        };
        waiting.insert(seq, message);
        while let Some(message) = waiting.remove(&next_seq) {
            next_seq += 1;
            match message {
                ReportMsg::Rendered(rendered) => {
                    report.write_encoded(&rendered.bytes, &rendered.counts)?;
                    recyclers.give_report_bytes(rendered.bytes);
                }
                ReportMsg::Chunk(checked) => {
                    let chunk = &checked.chunk;
                    if source_names.len() <= chunk.source as usize {
                        source_names.resize(chunk.source as usize + 1, Arc::from(""));
                    }
                    source_names[chunk.source as usize] = chunk.source_name.clone();
                    let chunk_report = ChunkReport {
                        layout: &stages.layout,
                        kinds: &kinds,
                        dry_run,
                        source_names: &source_names,
                    };
                    chunk_report.write(&mut report, chunk, &checked.checks)?;
                    recyclers.give_checked(checked);
                }
                ReportMsg::Rows(_) => {}
            }
        }
    }
    report.finish()
}

/// A lane's report row.
fn sink_row(r: &SinkRow) -> ReportRow<'_> {
    ReportRow {
        source: &r.meta.source,
        row: r.meta.row,
        record_id: &r.meta.record_id,
        phone_raw: &r.meta.phone_raw,
        phone_e164: Some(r.meta.phone),
        sink: Some(r.sink),
        status: r.status,
        http_status: r.http_status,
        attempts: r.attempts,
        detail: &r.detail,
    }
}
