//! The run, top to bottom: how a row travels through the stages.
//!
//! ```text
//! reader thread ──chunks──► normalizer workers (one per core) ──► merger ──► report thread
//!  (source/*)    bounded     (phone.rs + sink::check)          (dedup.rs,   (report.rs,
//!                                                                in order)    the accountant)
//! ```
//!
//! 1. **Read** (`source`): one thread reads the inputs in order and cuts them
//!    into [`Chunk`]s of `CHUNK_ROWS` rows with only the needed columns.
//! 2. **Normalize** (`phone`): workers turn each row's phone cells into E.164
//!    and ask every sink whether it could build the row's request
//!    (`sink::check`). Chunks may finish out of order.
//! 3. **Merge** (`dedup`): the merger puts chunks back in input order (first
//!    wins must mean first in the input), marks duplicates, applies
//!    `max_messages`, and counts the request plan. This is the hand-off point
//!    to the sinks: a real run will fan the unique rows out from here.
//! 4. **Report**: one thread writes a report row per record (or per sink) and
//!    counts them; the summary is those counts.
//!
//! Every channel is bounded, so memory stays flat whatever the input size and
//! the reader waits when downstream is slower.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::config::{Config, Rate, SinkConfig, SinkKind, WeniMode};
use crate::dedup::Dedup;
use crate::phone::PhoneNormalizer;
use crate::progress::Progress;
use crate::record::{Chunk, Outcome, Position};
use crate::report::{Counts, Report, ReportError, ReportRow, Status};
use crate::sandbox::{SANDBOX_TOKEN, Sandbox, SandboxOptions};
use crate::sink::{self, Check, ItemMeta, RowView, SinkItem, SinkProgress, SinkRow, SinkRuntime};
use crate::source::{self, SourceError};
use crate::state::{Scope, SinkIndex, StateError, StateThread, StateWriter};

/// Rows per chunk: big enough to amortize channel hand-offs, small enough to keep memory flat.
pub const CHUNK_ROWS: usize = 4096;
/// Chunks in flight per channel.
const CHANNEL_CHUNKS: usize = 4;

/// Why a run could not be done (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(
        "config file {path}: no sink is enabled; add [sinks.chatfuel], [sinks.weni] or [sinks.cloudhumans]"
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
    #[error("cannot start the HTTP runtime: {0}")]
    Runtime(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot start the sandbox: {0}")]
    Sandbox(std::io::Error),
}

/// What the command line asked for, beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// INPUT arguments as given.
    pub inputs: Vec<String>,
    pub dry_run: bool,
    /// Start the fake platforms in-process and send to them with dummy tokens.
    pub sandbox: bool,
    /// Ignore the state when deciding what to send to Chatfuel and Weni (still record).
    pub full: bool,
    /// Send CloudHumans messages again even if the state says they were sent.
    pub resend_messages: bool,
    /// Send CloudHumans messages whose outcome an interrupted run left unknown.
    pub resend_unknown: bool,
    /// `--report`, relative to the working directory; overrides `[report] path`.
    pub report_path: Option<PathBuf>,
    /// Show progress on stderr.
    pub progress: bool,
}

/// What one sink would do, as the dry run's request plan.
#[derive(Clone, Debug)]
pub struct SinkPlan {
    pub kind: SinkKind,
    /// Rows that would be sent.
    pub rows: u64,
    /// HTTP requests for those rows.
    pub requests: u64,
    /// Chatfuel: distinct property sets (each batched separately).
    pub property_sets: Option<u64>,
    /// Weni: at most this many preparation requests (list + create fields and groups).
    pub prepare_requests: u64,
    pub rate: Rate,
    pub concurrency: usize,
}

impl SinkPlan {
    /// Time the requests take at the configured rate (the rate is the bound, not concurrency).
    pub fn estimate(&self) -> Duration {
        self.rate
            .duration_for(self.requests + self.prepare_requests)
    }
}

/// The result of a run that could be done (exit 0 or 2).
#[derive(Debug)]
pub struct RunOutcome {
    pub counts: Counts,
    /// Input data rows read.
    pub input_rows: u64,
    pub unique_phones: u64,
    pub elapsed: Duration,
    pub report_path: PathBuf,
    pub plans: Vec<SinkPlan>,
    pub dry_run: bool,
    /// Delivery figures per sink (real runs).
    pub sinks: Vec<SinkSummary>,
    /// What the sandbox received (`--sandbox` runs).
    pub sandbox_log: Option<crate::sandbox::SandboxLog>,
    /// Ctrl-C stopped the run early (exit 2).
    pub interrupted: bool,
}

/// How one sink's delivery went.
#[derive(Clone, Debug)]
pub struct SinkSummary {
    pub kind: SinkKind,
    pub requests: u64,
    pub throttled: u64,
    pub retries: u64,
    /// Requests per second between the first and last request.
    pub achieved_rate: Option<f64>,
    pub rate: Rate,
    /// Set when the platform refused the token: the sink stopped.
    pub auth_refused: Option<String>,
}

impl RunOutcome {
    /// 0 when every row ended in success or skip statuses, 2 otherwise, 1 when
    /// every enabled sink refused auth (SPEC "Exit codes").
    pub fn exit_code(&self) -> u8 {
        if !self.sinks.is_empty() && self.sinks.iter().all(|s| s.auth_refused.is_some()) {
            return 1;
        }
        if self
            .counts
            .iter()
            .any(|((_, status), n)| *n > 0 && status.is_problem())
        {
            2
        } else {
            0
        }
    }

    /// Rows in the report.
    pub fn report_rows(&self) -> u64 {
        self.counts.values().sum()
    }
}

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

impl Layout {
    /// Computes the projection and binds every template of `config` to it.
    pub fn bind(config: &mut Config) -> Layout {
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
            match sink {
                SinkConfig::Chatfuel(c) => {
                    c.bound_property_columns =
                        sink::chatfuel::property_column_indices(c, &index_of);
                }
                SinkConfig::Weni(c) => {
                    for t in c
                        .name
                        .iter_mut()
                        .chain(c.language.iter_mut())
                        .chain(c.fields.values_mut())
                    {
                        t.bind(&index_of);
                    }
                }
                SinkConfig::CloudHumans(c) => {
                    for t in c
                        .header_attachment
                        .iter_mut()
                        .chain(c.buttons.iter_mut())
                        .chain(c.params.values_mut())
                    {
                        t.bind(&index_of);
                    }
                }
            }
        }
        layout
    }
}

/// A chunk plus what the sinks decided for its rows (`rows × sinks`, row-major).
struct Checked {
    chunk: Chunk,
    checks: Vec<Check>,
}

/// What the report thread receives: whole chunks (record-level outcomes and the
/// sink checks decided before sending), and per-sink rows from delivery.
enum ReportMsg {
    Chunk(Checked),
    Rows(Vec<SinkRow>),
}

/// The sinks of a real run, as the merger sees them.
struct Delivery {
    /// One channel per sink (config order).
    senders: Vec<tokio::sync::mpsc::Sender<SinkItem>>,
    progress: Vec<Arc<SinkProgress>>,
    layout: Arc<Layout>,
}

/// Records buffered per sink channel.
const SINK_CHANNEL_ITEMS: usize = 2048;

/// Runs the pipeline.
pub fn run(mut config: Config, options: &RunOptions) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    if config.sinks.is_empty() {
        return Err(RunError::NoSinks {
            path: config.path.clone(),
        });
    }
    let layout = Layout::bind(&mut config);
    let files = source::expand_inputs(&options.inputs)?;
    // Every header is checked before any row is processed (stdin is checked when read).
    for file in files.iter().filter(|f| f.path.is_some()) {
        let reader = source::open(file, &config.input)?;
        source::resolve_columns(&file.name, reader.header(), &layout.columns)?;
    }
    let tokens = if options.dry_run || options.sandbox {
        vec![SANDBOX_TOKEN.to_owned(); config.sinks.len()]
    } else {
        tokens_from_env(&config)?
    };
    let report_path = options
        .report_path
        .clone()
        .unwrap_or_else(|| config.report_path.clone());
    let report = Report::create(&report_path)?;

    // The state: read by every run (a dry run shows `unchanged` too), written only by real runs.
    let scopes: Vec<Scope> = config.sinks.iter().map(state_scope).collect();
    let incremental = Incremental {
        indexes: crate::state::load(&config.state_path, &scopes, options.dry_run)?,
        full: options.full,
        resend_messages: options.resend_messages,
        resend_unknown: options.resend_unknown,
    };
    // Payload hashes are recorded by real runs; a dry run needs them only to compare with the state.
    let hashing: Arc<Vec<bool>> = Arc::new(
        incremental
            .indexes
            .iter()
            .map(|index| !options.dry_run || index.delivered_count() > 0)
            .collect(),
    );
    let mut state: Option<(StateWriter, StateThread)> = if options.dry_run {
        None
    } else {
        Some(StateWriter::start(&config.state_path, scopes)?)
    };
    let interrupted = Arc::new(AtomicBool::new(false));

    // Real runs: the HTTP runtime, the sandbox if asked, and one task per sink.
    let runtime = if options.dry_run {
        None
    } else {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| RunError::Runtime(e.to_string()))?,
        )
    };
    let sandbox = match (&runtime, options.sandbox && !options.dry_run) {
        (Some(rt), true) => Some(start_sandbox(rt, &mut config)?),
        _ => None,
    };

    let config = Arc::new(config);
    let layout = Arc::new(layout);
    let sink_progress: Vec<Arc<SinkProgress>> =
        config.sinks.iter().map(|_| Arc::default()).collect();
    let kinds: Vec<SinkKind> = config.sinks.iter().map(SinkConfig::kind).collect();
    let progress = Progress::start(options.progress, kinds.clone(), sink_progress.clone());
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(1);

    let (raw_tx, raw_rx) = bounded::<Result<Chunk, SourceError>>(CHANNEL_CHUNKS);
    let (checked_tx, checked_rx) = bounded::<Result<Checked, SourceError>>(CHANNEL_CHUNKS * 2);
    let (report_tx, report_rx) = bounded::<ReportMsg>(CHANNEL_CHUNKS * 4);
    // Set when the merger fails: the reader stops. Ctrl-C sets `interrupted`, which stops it too.
    let stop = AtomicBool::new(false);
    if let Some(rt) = &runtime {
        let flag = interrupted.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::Relaxed);
                eprintln!(
                    "\ncrm-import: interrupted: no new rows or requests; finishing the requests in flight and writing the state and report (Ctrl-C again to quit at once)"
                );
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
    }

    let mut runtimes: Vec<Arc<SinkRuntime>> = Vec::new();
    let mut delivery = None;
    let mut sink_tasks = Vec::new();
    if let Some(rt) = &runtime {
        let mut senders = Vec::new();
        for (s, sink_config) in config.sinks.iter().enumerate() {
            let to_report = report_tx.clone();
            let outcomes: sink::Outcomes = Arc::new(move |rows: Vec<SinkRow>| {
                let _ = to_report.send(ReportMsg::Rows(rows));
            });
            let runtime_sink = SinkRuntime::new(
                sink_config.clone(),
                tokens[s].clone(),
                sink_progress[s].clone(),
                outcomes,
                state.as_ref().map(|(writer, _)| (writer.clone(), s)),
                interrupted.clone(),
            )
            .map(Arc::new)
            .map_err(|e| RunError::Runtime(e.to_string()))?;
            let (tx, rx) = tokio::sync::mpsc::channel(SINK_CHANNEL_ITEMS);
            sink_tasks.push(rt.spawn(sink::run(runtime_sink.clone(), rx)));
            runtimes.push(runtime_sink);
            senders.push(tx);
        }
        delivery = Some(Delivery {
            senders,
            progress: sink_progress.clone(),
            layout: layout.clone(),
        });
    }

    let result = std::thread::scope(|scope| {
        let stops = [&stop, &*interrupted];
        let (files, config_ref, layout_ref) = (&files, &config, &layout);
        let reader = scope.spawn(move || read_all(files, config_ref, layout_ref, raw_tx, stops));
        for _ in 0..workers {
            let raw_rx = raw_rx.clone();
            let checked_tx = checked_tx.clone();
            let config = config.clone();
            let layout = layout.clone();
            let hashing = hashing.clone();
            scope.spawn(move || normalize_worker(&config, &layout, &hashing, raw_rx, checked_tx));
        }
        drop(raw_rx);
        drop(checked_tx);
        let rows_done = progress.counter();
        let layout_ref = &layout;
        let kinds = kinds.clone();
        let dry_run = options.dry_run;
        let writer = scope
            .spawn(move || write_report(report, layout_ref, kinds, dry_run, report_rx, rows_done));
        let merged = merge(
            &config,
            checked_rx,
            report_tx.clone(),
            delivery.as_ref(),
            &incremental,
        );
        if merged.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // End of input: close the sink channels and wait for every request to finish.
        drop(delivery.take());
        if let Some(rt) = &runtime {
            for task in sink_tasks.drain(..) {
                let _ = rt.block_on(task);
            }
        }
        drop(report_tx);
        let summaries: Vec<SinkSummary> = runtimes.drain(..).map(|r| summarize(&r)).collect();
        let input_rows = reader.join().unwrap_or(0);
        let written = writer.join().map_err(|_| ReportError {
            path: report_path.clone(),
            message: "report writer stopped unexpectedly".into(),
        });
        (merged, input_rows, written, summaries)
    });
    progress.finish();
    // Every sink is done: the last deliveries are committed before the run ends.
    let state_result = state.take().map(|(writer, thread)| {
        drop(writer);
        thread.finish()
    });
    let sandbox_log = sandbox.as_ref().map(Sandbox::log);
    drop(sandbox);
    let (merged, input_rows, written, sinks) = result;
    let (plans, unique_phones) = merged?;
    let counts = written??;
    if let Some(result) = state_result {
        result?;
    }
    Ok(RunOutcome {
        counts,
        input_rows,
        unique_phones,
        elapsed: started.elapsed(),
        report_path,
        plans,
        dry_run: options.dry_run,
        sinks,
        sandbox_log,
        interrupted: interrupted.load(Ordering::Relaxed),
    })
}

/// The state scope of a sink (see `state.rs`).
fn state_scope(sink_config: &SinkConfig) -> Scope {
    let (sink, scope) = match sink_config {
        SinkConfig::Chatfuel(c) => ("chatfuel", c.automation_id.clone()),
        SinkConfig::Weni(_) => ("weni", String::new()),
        SinkConfig::CloudHumans(c) => ("cloudhumans", c.template_name.clone()),
    };
    Scope { sink, scope }
}

/// Each sink's token, from the environment variable its config names.
fn tokens_from_env(config: &Config) -> Result<Vec<String>, RunError> {
    config
        .sinks
        .iter()
        .map(|s| {
            let var = &s.common().token_env;
            std::env::var(var)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| RunError::MissingToken {
                    path: config.path.clone(),
                    sink: s.kind().name(),
                    var: var.clone(),
                })
        })
        .collect()
}

/// Starts the in-process sandbox on a loopback ephemeral port and points every
/// sink at it. The fakes learn the config's ids so they accept them.
fn start_sandbox(
    runtime: &tokio::runtime::Runtime,
    config: &mut Config,
) -> Result<Sandbox, RunError> {
    let mut options = SandboxOptions::default();
    for sink_config in &config.sinks {
        match sink_config {
            SinkConfig::Chatfuel(c) => options.chatfuel_automations.push(c.automation_id.clone()),
            SinkConfig::CloudHumans(c) => {
                options
                    .cloudhumans_accounts
                    .insert(c.account_id.clone(), vec![c.inbox_id.clone()]);
                options.cloudhumans_templates.push(c.template_name.clone());
            }
            SinkConfig::Weni(_) => {}
        }
    }
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let sandbox = runtime
        .block_on(Sandbox::start(addr, options))
        .map_err(RunError::Sandbox)?;
    for sink_config in &mut config.sinks {
        sink_config.common_mut().base_url = sandbox.base_url();
    }
    Ok(sandbox)
}

fn summarize(runtime: &SinkRuntime) -> SinkSummary {
    let stats = &runtime.uploader.stats;
    SinkSummary {
        kind: runtime.kind(),
        requests: stats.requests.load(Ordering::Relaxed),
        throttled: stats.throttled.load(Ordering::Relaxed),
        retries: stats.retries.load(Ordering::Relaxed),
        achieved_rate: stats.achieved_rate(),
        rate: runtime.config.common().rate,
        auth_refused: runtime.uploader.stopped(),
    }
}

/// Reader thread: every input in order, cut into chunks. Returns rows read.
fn read_all(
    files: &[source::InputFile],
    config: &Config,
    layout: &Layout,
    tx: Sender<Result<Chunk, SourceError>>,
    stops: [&AtomicBool; 2],
) -> u64 {
    let mut seq = 0;
    let mut rows = 0;
    for (index, file) in files.iter().enumerate() {
        let opened = source::open(file, &config.input).and_then(|mut reader| {
            let projection = source::resolve_columns(&file.name, reader.header(), &layout.columns)?;
            reader.project(projection);
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
            if stops.iter().any(|s| s.load(Ordering::Relaxed)) {
                return rows;
            }
            let mut chunk = Chunk::new(seq, index as u32, name.clone(), layout.columns.len());
            match reader.fill(&mut chunk, CHUNK_ROWS) {
                Ok(more) => {
                    rows += chunk.len() as u64;
                    if !chunk.is_empty() {
                        seq += 1;
                        if tx.send(Ok(chunk)).is_err() {
                            return rows;
                        }
                    }
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    rows += chunk.len() as u64;
                    let _ = tx.send(Err(e));
                    return rows;
                }
            }
        }
    }
    rows
}

/// Normalizer worker: phones → E.164, then each sink's check. One [`PhoneNormalizer`]
/// per worker, so compiled patterns are never shared or locked.
fn normalize_worker(
    config: &Config,
    layout: &Layout,
    hashing: &[bool],
    rx: Receiver<Result<Chunk, SourceError>>,
    tx: Sender<Result<Checked, SourceError>>,
) {
    let mut normalizer = PhoneNormalizer::new(config.input.default_region.clone());
    for message in rx {
        let out = message.map(|mut chunk| {
            let checks = normalize_chunk(config, layout, hashing, &mut normalizer, &mut chunk);
            Checked { chunk, checks }
        });
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// Fills each pending row's [`Outcome`] and returns the sinks' checks (`rows × sinks`).
/// `hashing[s]`: whether sink `s` needs payload hashes (see [`sink::check`]).
pub fn normalize_chunk(
    config: &Config,
    layout: &Layout,
    hashing: &[bool],
    normalizer: &mut PhoneNormalizer,
    chunk: &mut Chunk,
) -> Vec<Check> {
    let sinks = config.sinks.len();
    let mut checks = vec![Check::Ready { group: 0, hash: 0 }; chunk.len() * sinks];
    for i in 0..chunk.len() {
        if !matches!(chunk.rows[i].outcome, Outcome::Pending) {
            continue;
        }
        let region = layout.country.map(|c| chunk.cell(i, c));
        let mut first_non_empty = None;
        let mut first_reason = None;
        let mut found = None;
        for (k, &column) in layout.phones.iter().enumerate() {
            let raw = chunk.cell(i, column);
            if raw.trim().is_empty() {
                continue;
            }
            first_non_empty.get_or_insert(k as u8);
            match normalizer.normalize(raw, region) {
                Ok(phone) => {
                    found = Some((k as u8, phone));
                    break;
                }
                Err(reason) => {
                    first_reason.get_or_insert(reason);
                }
            }
        }
        chunk.rows[i].outcome = match found {
            Some((raw_column, phone)) => {
                let row = RowView { chunk, index: i };
                for (s, sink_config) in config.sinks.iter().enumerate() {
                    checks[i * sinks + s] = sink::check(sink_config, row, phone, hashing[s]);
                }
                Outcome::Unique { raw_column, phone }
            }
            None => Outcome::InvalidPhone {
                raw_column: first_non_empty,
                reason: first_reason.unwrap_or(crate::phone::InvalidReason::Empty),
            },
        };
    }
    checks
}

/// What the state says about rows, and which flags override it.
pub struct Incremental {
    /// Per sink (config order): what was delivered before.
    indexes: Vec<SinkIndex>,
    /// `--full`: Chatfuel and Weni send everything again.
    full: bool,
    /// `--resend-messages`: CloudHumans sends again what it sent before.
    resend_messages: bool,
    /// `--resend-unknown`: CloudHumans sends messages an interrupted run may have sent.
    resend_unknown: bool,
}

impl Incremental {
    /// `Some(check)` when the state decides the row (`unchanged` / `unknown`), `None` to send it.
    fn decide(
        &self,
        s: usize,
        sink_config: &SinkConfig,
        phone: crate::phone::E164,
        hash: u64,
    ) -> Option<Check> {
        let index = self.indexes.get(s)?;
        match sink_config {
            SinkConfig::CloudHumans(c) => {
                if !self.resend_messages && index.delivered(phone).is_some() {
                    return Some(Check::Unchanged);
                }
                if !self.resend_unknown
                    && let Some(since) = index.in_flight_since(phone)
                {
                    return Some(Check::Unknown(
                        format!(
                            "an interrupted run (at unix time {since}) may have sent template {} already; not resent (--resend-unknown sends it again)",
                            c.template_name
                        )
                        .into(),
                    ));
                }
                None
            }
            _ => (!self.full && index.delivered(phone) == Some(hash)).then_some(Check::Unchanged),
        }
    }
}

/// Merger: back in input order, dedup, `max_messages`, the request plan.
fn merge(
    config: &Config,
    rx: Receiver<Result<Checked, SourceError>>,
    tx: Sender<ReportMsg>,
    delivery: Option<&Delivery>,
    incremental: &Incremental,
) -> Result<(Vec<SinkPlan>, u64), SourceError> {
    let sinks = config.sinks.len();
    let mut dedup = Dedup::new();
    let mut pending: BTreeMap<u64, Checked> = BTreeMap::new();
    let mut next = 0u64;
    let mut sent_rows = vec![0u64; sinks];
    let mut chatfuel_groups: HashMap<u64, u64> = HashMap::new();
    for message in rx {
        let checked = message?;
        pending.insert(checked.chunk.seq, checked);
        while let Some(mut checked) = pending.remove(&next) {
            next += 1;
            let chunk = &mut checked.chunk;
            for i in 0..chunk.len() {
                let Outcome::Unique { raw_column, phone } = chunk.rows[i].outcome else {
                    continue;
                };
                let at = Position {
                    source: chunk.source,
                    row: chunk.rows[i].row,
                };
                if let Some(first) = dedup.check(phone, at) {
                    chunk.rows[i].outcome = Outcome::Duplicate {
                        raw_column,
                        phone,
                        first,
                    };
                    continue;
                }
                for (s, sink_config) in config.sinks.iter().enumerate() {
                    let check = &mut checked.checks[i * sinks + s];
                    let Check::Ready { group, hash } = *check else {
                        continue;
                    };
                    if let Some(decided) = incremental.decide(s, sink_config, phone, hash) {
                        *check = decided;
                        continue;
                    }
                    if let SinkConfig::CloudHumans(c) = sink_config
                        && c.max_messages.is_some_and(|max| sent_rows[s] >= max)
                    {
                        *check = Check::Skipped(
                            format!("max_messages ({}) reached", c.max_messages.unwrap_or(0))
                                .into(),
                        );
                        continue;
                    }
                    sent_rows[s] += 1;
                    if matches!(sink_config, SinkConfig::Chatfuel(_)) {
                        *chatfuel_groups.entry(group).or_insert(0) += 1;
                    }
                    if let Some(delivery) = delivery {
                        let row = RowView { chunk, index: i };
                        let item = SinkItem {
                            meta: item_meta(&delivery.layout, chunk, i, raw_column, phone, hash),
                            payload: sink::build(sink_config, row, phone, group),
                        };
                        delivery.progress[s].queued.fetch_add(1, Ordering::Relaxed);
                        if let Err(lost) = delivery.senders[s].blocking_send(item) {
                            // The sink's task is gone: the row is still accounted for.
                            let _ = tx.send(ReportMsg::Rows(vec![SinkRow {
                                meta: lost.0.meta,
                                sink: sink_config.kind(),
                                status: Status::Failed,
                                http_status: None,
                                attempts: 0,
                                detail: "the sink stopped unexpectedly".into(),
                            }]));
                        }
                    }
                }
            }
            if tx.send(ReportMsg::Chunk(checked)).is_err() {
                break;
            }
        }
    }
    let plans = config
        .sinks
        .iter()
        .enumerate()
        .map(|(s, sink_config)| plan_for(sink_config, sent_rows[s], &chatfuel_groups))
        .collect();
    Ok((plans, dedup.len() as u64))
}

/// The report's view of a record that goes to a sink.
fn item_meta(
    layout: &Layout,
    chunk: &Chunk,
    i: usize,
    raw_column: u8,
    phone: crate::phone::E164,
    hash: u64,
) -> ItemMeta {
    ItemMeta {
        source: chunk.source_name.clone(),
        row: chunk.rows[i].row,
        record_id: layout.id.map(|c| chunk.cell(i, c)).unwrap_or("").into(),
        phone_raw: chunk.cell(i, layout.phones[raw_column as usize]).into(),
        phone,
        hash,
    }
}

fn plan_for(sink_config: &SinkConfig, rows: u64, chatfuel_groups: &HashMap<u64, u64>) -> SinkPlan {
    let common = sink_config.common();
    let (requests, property_sets, prepare_requests) = match sink_config {
        SinkConfig::Chatfuel(c) => {
            let batch = c.batch_size as u64;
            let requests = chatfuel_groups.values().map(|n| n.div_ceil(batch)).sum();
            (requests, Some(chatfuel_groups.len() as u64), 0)
        }
        SinkConfig::Weni(c) => {
            let prepare = if rows == 0 || c.mode == WeniMode::Delete {
                0
            } else {
                2 + c.fields.len() as u64 + c.groups.len() as u64
            };
            (rows, None, prepare)
        }
        SinkConfig::CloudHumans(_) => (rows, None, 0),
    };
    SinkPlan {
        kind: sink_config.kind(),
        rows,
        requests,
        property_sets,
        prepare_requests,
        rate: common.rate,
        concurrency: common.concurrency,
    }
}

/// Report thread: the accountant. One row per record-level outcome, else one per sink.
fn write_report(
    mut report: Report,
    layout: &Layout,
    kinds: Vec<SinkKind>,
    dry_run: bool,
    rx: Receiver<ReportMsg>,
    rows_done: Arc<AtomicU64>,
) -> Result<Counts, ReportError> {
    let mut source_names: Vec<Arc<str>> = Vec::new();
    let sinks = kinds.len();
    let mut last_flush = Instant::now();
    for message in rx {
        // At most a second of finished rows is lost if the process is killed.
        if last_flush.elapsed() >= Duration::from_secs(1) {
            report.flush()?;
            last_flush = Instant::now();
        }
        let checked = match message {
            ReportMsg::Chunk(checked) => checked,
            ReportMsg::Rows(rows) => {
                for r in &rows {
                    report.write(&ReportRow {
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
                    })?;
                }
                continue;
            }
        };
        let chunk = &checked.chunk;
        if source_names.len() <= chunk.source as usize {
            source_names.resize(chunk.source as usize + 1, Arc::from(""));
        }
        source_names[chunk.source as usize] = chunk.source_name.clone();
        for (i, meta) in chunk.rows.iter().enumerate() {
            let record_id = layout.id.map(|c| chunk.cell(i, c)).unwrap_or("");
            let raw_of = |k: u8| chunk.cell(i, layout.phones[k as usize]);
            let mut row = ReportRow {
                source: &chunk.source_name,
                row: meta.row,
                record_id,
                phone_raw: "",
                phone_e164: None,
                sink: None,
                status: Status::Malformed,
                http_status: None,
                attempts: 0,
                detail: "",
            };
            match &meta.outcome {
                Outcome::Pending => {}
                Outcome::Malformed(detail) => {
                    row.phone_raw = first_non_empty_phone(chunk, i, layout);
                    row.detail = detail;
                    report.write(&row)?;
                }
                Outcome::InvalidPhone { raw_column, reason } => {
                    row.phone_raw = raw_column.map(raw_of).unwrap_or("");
                    row.status = Status::InvalidPhone;
                    let detail = reason.to_string();
                    row.detail = &detail;
                    report.write(&row)?;
                }
                Outcome::Duplicate {
                    raw_column,
                    phone,
                    first,
                } => {
                    row.phone_raw = raw_of(*raw_column);
                    row.phone_e164 = Some(*phone);
                    row.status = Status::Duplicate;
                    let first_name = source_names
                        .get(first.source as usize)
                        .cloned()
                        .unwrap_or_else(|| Arc::from("?"));
                    let detail = format!("duplicate of {first_name}:{}", first.row);
                    row.detail = &detail;
                    report.write(&row)?;
                }
                Outcome::Unique { raw_column, phone } => {
                    row.phone_raw = raw_of(*raw_column);
                    row.phone_e164 = Some(*phone);
                    for (s, kind) in kinds.iter().enumerate() {
                        row.sink = Some(*kind);
                        let (status, detail) = match &checked.checks[i * sinks + s] {
                            // In a real run the sink reports this row when its request ends.
                            Check::Ready { .. } if !dry_run => continue,
                            Check::Ready { .. } => (Status::DryRun, ""),
                            Check::Unchanged => (Status::Unchanged, ""),
                            Check::Unknown(d) => (Status::Unknown, &**d),
                            Check::Rejected(d) => (Status::Rejected, &**d),
                            Check::Skipped(d) => (Status::Skipped, &**d),
                        };
                        row.status = status;
                        row.detail = detail;
                        report.write(&row)?;
                    }
                }
            }
        }
        rows_done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    report.finish()
}

/// The phone text of a malformed row: its first non-empty phone cell, if any was read.
fn first_non_empty_phone<'a>(chunk: &'a Chunk, i: usize, layout: &Layout) -> &'a str {
    layout
        .phones
        .iter()
        .map(|&c| chunk.cell(i, c))
        .find(|v| !v.trim().is_empty())
        .unwrap_or("")
}
