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
use crate::sink::{self, Check, RowView};
use crate::source::{self, SourceError};

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
        "sending to the platforms is not built yet (see the open issue \"Deliver to Chatfuel, Weni and CloudHumans\"); run with --dry-run"
    )]
    SendingNotBuilt,
}

/// What the command line asked for, beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// INPUT arguments as given.
    pub inputs: Vec<String>,
    pub dry_run: bool,
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
}

impl RunOutcome {
    /// 0 when every row ended in success or skip statuses, 2 otherwise (SPEC "Exit codes").
    pub fn exit_code(&self) -> u8 {
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
    if !options.dry_run {
        return Err(RunError::SendingNotBuilt);
    }
    let report_path = options
        .report_path
        .clone()
        .unwrap_or_else(|| config.report_path.clone());
    let report = Report::create(&report_path)?;

    let config = Arc::new(config);
    let layout = Arc::new(layout);
    let progress = Progress::start(options.progress);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(1);

    let (raw_tx, raw_rx) = bounded::<Result<Chunk, SourceError>>(CHANNEL_CHUNKS);
    let (checked_tx, checked_rx) = bounded::<Result<Checked, SourceError>>(CHANNEL_CHUNKS * 2);
    let (report_tx, report_rx) = bounded::<Checked>(CHANNEL_CHUNKS);
    let stop = AtomicBool::new(false);

    let result = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_all(&files, &config, &layout, raw_tx, &stop));
        for _ in 0..workers {
            let raw_rx = raw_rx.clone();
            let checked_tx = checked_tx.clone();
            let config = config.clone();
            let layout = layout.clone();
            scope.spawn(move || normalize_worker(&config, &layout, raw_rx, checked_tx));
        }
        drop(raw_rx);
        drop(checked_tx);
        let rows_done = progress.counter();
        let layout_ref = &layout;
        let kinds: Vec<SinkKind> = config.sinks.iter().map(SinkConfig::kind).collect();
        let writer =
            scope.spawn(move || write_report(report, layout_ref, kinds, report_rx, rows_done));
        let merged = merge(&config, checked_rx, report_tx);
        if merged.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let input_rows = reader.join().unwrap_or(0);
        let written = writer.join().map_err(|_| ReportError {
            path: report_path.clone(),
            message: "report writer stopped unexpectedly".into(),
        });
        (merged, input_rows, written)
    });
    progress.finish();
    let (merged, input_rows, written) = result;
    let (plans, unique_phones) = merged?;
    let counts = written??;
    Ok(RunOutcome {
        counts,
        input_rows,
        unique_phones,
        elapsed: started.elapsed(),
        report_path,
        plans,
        dry_run: options.dry_run,
    })
}

/// Reader thread: every input in order, cut into chunks. Returns rows read.
fn read_all(
    files: &[source::InputFile],
    config: &Config,
    layout: &Layout,
    tx: Sender<Result<Chunk, SourceError>>,
    stop: &AtomicBool,
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
            if stop.load(Ordering::Relaxed) {
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
    rx: Receiver<Result<Chunk, SourceError>>,
    tx: Sender<Result<Checked, SourceError>>,
) {
    let mut normalizer = PhoneNormalizer::new(config.input.default_region.clone());
    for message in rx {
        let out = message.map(|mut chunk| {
            let checks = normalize_chunk(config, layout, &mut normalizer, &mut chunk);
            Checked { chunk, checks }
        });
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// Fills each pending row's [`Outcome`] and returns the sinks' checks (`rows × sinks`).
pub fn normalize_chunk(
    config: &Config,
    layout: &Layout,
    normalizer: &mut PhoneNormalizer,
    chunk: &mut Chunk,
) -> Vec<Check> {
    let sinks = config.sinks.len();
    let mut checks = vec![Check::Ready { group: 0 }; chunk.len() * sinks];
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
                    checks[i * sinks + s] = sink::check(sink_config, row, phone);
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

/// Merger: back in input order, dedup, `max_messages`, the request plan.
fn merge(
    config: &Config,
    rx: Receiver<Result<Checked, SourceError>>,
    tx: Sender<Checked>,
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
                    let Check::Ready { group } = *check else {
                        continue;
                    };
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
                }
            }
            if tx.send(checked).is_err() {
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
    rx: Receiver<Checked>,
    rows_done: Arc<AtomicU64>,
) -> Result<Counts, ReportError> {
    let mut source_names: Vec<Arc<str>> = Vec::new();
    let sinks = kinds.len();
    for checked in rx {
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
                            Check::Ready { .. } => (Status::DryRun, ""),
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
