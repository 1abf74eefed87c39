//! One lane per sink: its queue, its uploader, its own pace.
//!
//! The platforms' limits differ by 1,000× (Weni ≈ 0.8 requests/s, Chatfuel
//! 1,000 phones a request), so no sink may wait for another. The merger hands
//! each sink's rows to that sink's [`LaneQueue`] and never blocks on it: the
//! queue keeps up to [`MEMORY_ITEMS`] rows in memory and spills the rest to a
//! spool file on disk, so a sink that falls days behind costs disk, not memory.
//!
//! Why a spool file and not the state as the queue: the state records what was
//! *delivered*, which is what a later run needs; what is merely *waiting* only
//! matters to this run (the next run re-reads the input and asks the state).
//! So the spool is a temporary file beside the state whose name is removed
//! as soon as it is open: it disappears with the process, `kill -9` included,
//! and never needs cleaning. It is append-only JSON lines, read back in order;
//! when the reader catches up, the file is truncated to reclaim the space.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc};
use tokio::task::JoinSet;

use super::http::{Ended, Finished, Uploader};
use super::{ItemMeta, SinkItem, SinkKind, SinkProgress, SinkRow};
use crate::report::Status;
use crate::shutdown::Shutdown;
use crate::state::StateWriter;

/// Rows a lane keeps in memory before it spills to its spool file.
pub const MEMORY_ITEMS: usize = 2048;

/// A spool that cannot be written or read back (exit 1: rows would be lost).
#[derive(Debug, thiserror::Error)]
#[error("spool file in {dir} (the queue of sink {sink}): {message}")]
pub struct SpoolError {
    pub dir: PathBuf,
    pub sink: &'static str,
    pub message: String,
}

/// The rows waiting for one sink: memory first, then a spool file, in order.
pub struct LaneQueue {
    inner: Mutex<QueueInner>,
    notify: Notify,
    sink: &'static str,
    dir: PathBuf,
}

struct QueueInner {
    memory: VecDeque<SinkItem>,
    spool: Option<Spool>,
    /// Rows in the spool not read back yet.
    spooled: u64,
    closed: bool,
}

/// The spool file: one writer, one reader, on the same unnamed file.
struct Spool {
    writer: BufWriter<File>,
    reader: BufReader<File>,
    line: String,
}

impl LaneQueue {
    /// A queue whose spool (if ever needed) lives in `dir`.
    pub fn new(sink: SinkKind, dir: &Path) -> LaneQueue {
        LaneQueue {
            inner: Mutex::new(QueueInner {
                memory: VecDeque::new(),
                spool: None,
                spooled: 0,
                closed: false,
            }),
            notify: Notify::new(),
            sink: sink.name(),
            dir: dir.to_owned(),
        }
    }

    fn error(&self, message: String) -> SpoolError {
        SpoolError {
            dir: self.dir.clone(),
            sink: self.sink,
            message,
        }
    }

    /// Adds a row; never waits for the sink. Rows go to disk once memory is
    /// full, and keep going there until the reader has caught up (FIFO order).
    pub fn push(&self, item: SinkItem) -> Result<(), SpoolError> {
        let mut inner = self.inner.lock().map_err(|_| self.error("lock".into()))?;
        if inner.spooled == 0 && inner.memory.len() < MEMORY_ITEMS {
            inner.memory.push_back(item);
        } else {
            if inner.spool.is_none() {
                inner.spool = Some(self.open_spool()?);
            }
            let spool = inner.spool.as_mut().expect("just opened");
            serde_json::to_writer(&mut spool.writer, &item)
                .map_err(std::io::Error::from)
                .and_then(|_| spool.writer.write_all(b"\n"))
                .map_err(|e| self.error(format!("cannot write: {e}")))?;
            inner.spooled += 1;
        }
        drop(inner);
        self.notify.notify_one();
        Ok(())
    }

    /// Two handles with their own offsets (a `dup` would share one), then the
    /// name is removed: the file lives exactly as long as the process.
    fn open_spool(&self) -> Result<Spool, SpoolError> {
        let named = tempfile::Builder::new()
            .prefix(".crm-import-spool-")
            .tempfile_in(&self.dir)
            .map_err(|e| self.error(format!("cannot create: {e}")))?;
        let reader = named
            .reopen()
            .map_err(|e| self.error(format!("cannot open: {e}")))?;
        let file = named.into_file();
        Ok(Spool {
            writer: BufWriter::with_capacity(256 * 1024, file),
            reader: BufReader::with_capacity(256 * 1024, reader),
            line: String::new(),
        })
    }

    /// No more rows will be pushed.
    pub fn close(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.closed = true;
        }
        self.notify.notify_one();
    }

    /// Rows waiting (in memory and on disk).
    pub fn len(&self) -> u64 {
        self.inner
            .lock()
            .map(|i| i.memory.len() as u64 + i.spooled)
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next row, waiting for one; `None` once closed and empty.
    pub async fn pop(&self) -> Result<Option<SinkItem>, SpoolError> {
        loop {
            if let Some(next) = self.try_pop()? {
                return Ok(next);
            }
            self.notify.notified().await;
        }
    }

    /// `Some(next)` when decided now (`Some(None)`: closed and empty), `None` to wait.
    fn try_pop(&self) -> Result<Option<Option<SinkItem>>, SpoolError> {
        let mut inner = self.inner.lock().map_err(|_| self.error("lock".into()))?;
        if let Some(item) = inner.memory.pop_front() {
            return Ok(Some(Some(item)));
        }
        if inner.spooled > 0 {
            let item = self.read_spooled(&mut inner)?;
            return Ok(Some(Some(item)));
        }
        Ok(inner.closed.then_some(None))
    }

    fn read_spooled(&self, inner: &mut QueueInner) -> Result<SinkItem, SpoolError> {
        let spool = inner.spool.as_mut().expect("rows were spooled");
        let read_err = |e: &dyn std::fmt::Display| self.error(format!("cannot read back: {e}"));
        spool.writer.flush().map_err(|e| read_err(&e))?;
        spool.line.clear();
        spool
            .reader
            .read_line(&mut spool.line)
            .map_err(|e| read_err(&e))?;
        let item: SinkItem = serde_json::from_str(&spool.line).map_err(|e| read_err(&e))?;
        inner.spooled -= 1;
        if inner.spooled == 0 {
            // Caught up: start the file over so a long run's spool never grows past its backlog.
            let file = spool.writer.get_mut();
            file.set_len(0)
                .and_then(|_| file.seek(SeekFrom::Start(0)).map(|_| ()))
                .and_then(|_| spool.reader.seek(SeekFrom::Start(0)).map(|_| ()))
                .map_err(|e| read_err(&e))?;
        }
        Ok(item)
    }
}

/// Where a sink sends its report rows.
pub type Outcomes = Arc<dyn Fn(Vec<SinkRow>) + Send + Sync>;

/// Everything a running sink holds besides its config.
pub struct Lane {
    pub kind: SinkKind,
    /// The token (trimmed, checked to form a header). Sinks send it only
    /// through [`Lane::secret`], to their own `base_url`.
    pub token: String,
    pub uploader: Uploader,
    pub progress: Arc<SinkProgress>,
    pub queue: LaneQueue,
    outcomes: Outcomes,
    /// Where deliveries are recorded, and this sink's scope index in it.
    state: Option<(StateWriter, usize)>,
    pub shutdown: Shutdown,
}

impl Lane {
    pub fn new(
        kind: SinkKind,
        token: String,
        uploader: Uploader,
        spool_dir: &Path,
        outcomes: Outcomes,
        state: Option<(StateWriter, usize)>,
        shutdown: Shutdown,
    ) -> Lane {
        Lane {
            kind,
            token,
            uploader,
            progress: Arc::default(),
            queue: LaneQueue::new(kind, spool_dir),
            outcomes,
            state,
            shutdown,
        }
    }

    /// `value` (a header holding the token) marked sensitive, so that no
    /// Debug output or log of the request ever shows it.
    pub fn secret(&self, value: &str) -> reqwest::header::HeaderValue {
        let mut header = reqwest::header::HeaderValue::from_str(value)
            .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static("invalid"));
        header.set_sensitive(true);
        header
    }

    /// Takes a row for this sink (the merger's hand-off).
    pub fn push(&self, item: SinkItem) -> Result<(), SpoolError> {
        self.progress.queued.fetch_add(1, Ordering::Relaxed);
        self.queue.push(item)
    }

    /// The lane's rows as a channel, `buffer` at a time: a pump task moves them
    /// from the queue (memory, then disk). Rows still queued when the run stops
    /// are reported `skipped` by the pump, so none is lost.
    pub fn receiver(self: &Arc<Self>, buffer: usize) -> mpsc::Receiver<SinkItem> {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let lane = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = lane.queue.pop() => next,
                    _ = lane.shutdown.stopped() => lane.queue.pop().await,
                };
                match next {
                    Ok(Some(item)) if lane.shutdown.is_stopping() => {
                        lane.report_not_sent(vec![item.meta])
                    }
                    Ok(Some(item)) => {
                        if let Err(lost) = tx.send(item).await {
                            lane.report_not_sent(vec![lost.0.meta]);
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        lane.shutdown
                            .stop(crate::shutdown::StopReason::Failure(e.to_string()));
                        return;
                    }
                }
            }
        });
        rx
    }

    /// The reason rows are not sent any more, once the run is stopping.
    pub fn stop_detail(&self) -> Option<String> {
        self.shutdown.reason().map(|r| r.detail())
    }

    /// Reports rows that were not attempted because the run is stopping.
    pub fn report_not_sent(&self, metas: Vec<ItemMeta>) {
        let detail = self
            .stop_detail()
            .unwrap_or_else(|| "the sink stopped unexpectedly".into());
        self.report(metas, Status::Skipped, None, &detail);
    }

    /// Commits the in-flight marker before a non-idempotent request leaves.
    /// `false`: the state cannot be written, so the request must not be sent.
    pub async fn mark_in_flight(&self, meta: &ItemMeta) -> bool {
        match &self.state {
            Some((writer, scope)) => writer.mark_in_flight(*scope, meta.phone, meta.hash).await,
            None => true,
        }
    }

    /// Reports the same outcome for every record of a request.
    pub fn report(
        &self,
        metas: Vec<ItemMeta>,
        status: Status,
        finished: Option<&Finished>,
        detail: &str,
    ) {
        let n = metas.len() as u64;
        let rows = metas
            .into_iter()
            .map(|meta| SinkRow {
                meta,
                sink: self.kind,
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
    pub fn report_finished(&self, metas: Vec<ItemMeta>, finished: &Finished, success: Status) {
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

/// Runs `concurrency` workers, each taking the next item from `rx` and handing it to `handle`.
pub async fn worker_pool<T, F, Fut>(concurrency: usize, rx: mpsc::Receiver<T>, handle: F)
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let rx = Arc::new(AsyncMutex::new(rx));
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
    while let Some(joined) = workers.join_next().await {
        // A worker that panicked may hold rows nobody will report: re-raise it
        // so the sink's task fails and the run ends with a clear error (exit 1)
        // instead of a report with rows silently missing.
        if let Err(e) = joined
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::E164;
    use crate::sink::Payload;

    fn item(n: u64) -> SinkItem {
        SinkItem {
            meta: ItemMeta {
                source: Arc::from("in.csv"),
                row: n,
                record_id: n.to_string().into(),
                phone_raw: "x\n\"y\"".into(),
                phone: E164(5511900000000 + n),
                hash: n,
            },
            payload: Payload::Json(serde_json::json!({"name": format!("n{n}\n")})),
        }
    }

    #[test]
    fn rows_past_memory_spill_to_disk_and_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let queue = LaneQueue::new(SinkKind(0), dir.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let total = MEMORY_ITEMS as u64 * 2 + 10;
        for n in 0..total {
            queue.push(item(n)).unwrap();
        }
        assert_eq!(queue.inner.lock().unwrap().memory.len(), MEMORY_ITEMS);
        assert_eq!(queue.len(), total);
        // Read a little, push more: the order stays first in, first out.
        let mut seen = Vec::new();
        for _ in 0..MEMORY_ITEMS + 5 {
            seen.push(rt.block_on(queue.pop()).unwrap().unwrap().meta.row);
        }
        queue.push(item(total)).unwrap();
        queue.close();
        while let Some(next) = rt.block_on(queue.pop()).unwrap() {
            assert_eq!(next.meta.phone_raw.as_ref(), "x\n\"y\"");
            seen.push(next.meta.row);
        }
        assert_eq!(seen, (0..=total).collect::<Vec<_>>());
        assert!(queue.is_empty());
    }
}
