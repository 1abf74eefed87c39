//! Progress on stderr while the run goes.
//!
//! On a terminal: indicatif bars — reading (bytes of the inputs, with an ETA)
//! and one bar per sink (rows done of its known total, its achieved rate, and
//! an ETA from its *configured* rate and its backlog, because a Weni backlog
//! of 100,000 rows at 3000/h takes 33 h however fast the first minute went).
//! Otherwise (cron, Kubernetes, `2> log`): the same figures as one log line
//! every [`LOG_EVERY`], so a 2 a.m. log shows the run is alive and when it ends.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::sink::SinkProgress;

/// Seconds between log lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What progress knows of one sink: its counters and its pace.
pub struct SinkMeter {
    pub name: &'static str,
    pub progress: Arc<SinkProgress>,
    /// The configured rate, in requests per second.
    pub requests_per_second: f64,
    /// Rows one request carries (Chatfuel: the batch size; others 1).
    pub rows_per_request: u64,
}

impl SinkMeter {
    /// `weni: 1,204/100,000 sent (3 not delivered), 0.83 rows/s, ETA 33h 20m`.
    fn line(&self, started: Instant) -> String {
        let p = &self.progress;
        let (queued, done, problems) = (
            p.queued.load(Ordering::Relaxed),
            p.done.load(Ordering::Relaxed),
            p.problems.load(Ordering::Relaxed),
        );
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{}: {}/{} done ({} not delivered), {:.1} rows/s, ETA {}",
            self.name,
            thousands(done),
            thousands(queued),
            thousands(problems),
            rate,
            human_duration(self.eta(queued.saturating_sub(done)))
        )
    }

    /// Time to send `backlog` rows at the configured rate.
    fn eta(&self, backlog: u64) -> Duration {
        let requests = backlog.div_ceil(self.rows_per_request.max(1));
        Duration::try_from_secs_f64(requests as f64 / self.requests_per_second.max(1e-9))
            .unwrap_or(Duration::MAX)
    }
}

/// What the reader reports: rows and bytes so far, and the total bytes if known.
#[derive(Clone, Default)]
pub struct ReadMeter {
    pub rows: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
    /// Sum of the inputs' sizes (`None` with stdin).
    pub total_bytes: Option<u64>,
}

/// A running progress display.
pub struct Progress {
    done: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts the display (or nothing when `enabled` is false).
    pub fn start(enabled: bool, read: ReadMeter, sinks: Vec<SinkMeter>) -> Progress {
        let done = Arc::new(AtomicBool::new(false));
        let ticker = enabled.then(|| {
            let done = done.clone();
            std::thread::spawn(move || {
                if std::io::stderr().is_terminal() {
                    bars(&read, &sinks, &done)
                } else {
                    log_lines(&read, &sinks, &done)
                }
            })
        });
        Progress { done, ticker }
    }

    pub fn finish(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// `rows read: 1,234,567 (612,000/s), 120 MB of 400 MB`.
fn read_line(read: &ReadMeter, started: Instant) -> String {
    let rows = read.rows.load(Ordering::Relaxed);
    let rate = rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
    let mut line = format!(
        "rows read: {} ({}/s)",
        thousands(rows),
        thousands(rate as u64)
    );
    if let Some(total) = read.total_bytes {
        let bytes = read.bytes.load(Ordering::Relaxed).min(total);
        line.push_str(&format!(", {} of {} MB", bytes >> 20, total >> 20));
    }
    line
}

fn bars(read: &ReadMeter, sinks: &[SinkMeter], done: &AtomicBool) {
    let started = Instant::now();
    let multi = MultiProgress::new();
    let style = |template: &str| {
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
    };
    let reading = multi.add(match read.total_bytes {
        Some(total) => ProgressBar::new(total).with_style(style(
            "reading  [{bar:30}] {bytes}/{total_bytes} ETA {eta} {msg}",
        )),
        None => ProgressBar::new_spinner().with_style(style("reading  {spinner} {msg}")),
    });
    let sink_bars: Vec<ProgressBar> = sinks
        .iter()
        .map(|s| {
            multi.add(
                ProgressBar::new(0)
                    .with_style(style("{prefix:<11} [{bar:30}] {pos}/{len} {msg}"))
                    .with_prefix(s.name),
            )
        })
        .collect();
    while !done.load(Ordering::Relaxed) {
        reading.set_position(read.bytes.load(Ordering::Relaxed));
        reading.set_message(read_line(read, started));
        for (sink, bar) in sinks.iter().zip(&sink_bars) {
            let p = &sink.progress;
            let (queued, finished) = (
                p.queued.load(Ordering::Relaxed),
                p.done.load(Ordering::Relaxed),
            );
            bar.set_length(queued);
            bar.set_position(finished);
            let rate = finished as f64 / started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!(
                "{rate:.1} rows/s, ETA {}",
                human_duration(sink.eta(queued.saturating_sub(finished)))
            ));
        }
        std::thread::park_timeout(Duration::from_millis(200));
    }
    for bar in sink_bars.iter().chain(std::iter::once(&reading)) {
        bar.finish_and_clear();
    }
}

fn log_lines(read: &ReadMeter, sinks: &[SinkMeter], done: &AtomicBool) {
    let started = Instant::now();
    let mut last = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::park_timeout(Duration::from_millis(200));
        if last.elapsed() < LOG_EVERY || done.load(Ordering::Relaxed) {
            continue;
        }
        last = Instant::now();
        let mut line = format!("crm-import: {}", read_line(read, started));
        for sink in sinks
            .iter()
            .filter(|s| s.progress.queued.load(Ordering::Relaxed) > 0)
        {
            line.push_str("; ");
            line.push_str(&sink.line(started));
        }
        eprintln!("{line}");
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `3725s` → `1h 2m 5s`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        return format!("{secs:.1}s");
    }
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h {m}m {s}s")
    } else {
        format!("{m}m {s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers_and_durations() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(human_duration(Duration::from_secs(3725)), "1h 2m 5s");
        assert_eq!(human_duration(Duration::from_millis(2500)), "2.5s");
    }

    #[test]
    fn a_sink_eta_comes_from_its_configured_rate_and_backlog() {
        let slow = SinkMeter {
            name: "slow",
            progress: Arc::default(),
            requests_per_second: 3000.0 / 3600.0,
            rows_per_request: 1,
        };
        // 100,000 rows at 3000/h (Weni's limit): 33 h 20 m, however fast the first minute went.
        assert_eq!(human_duration(slow.eta(100_000)), "33h 20m 0s");
        let batched = SinkMeter {
            name: "batched",
            progress: Arc::default(),
            requests_per_second: 1.0,
            rows_per_request: 1000,
        };
        assert_eq!(human_duration(batched.eta(100_001)), "1m 41s");
    }
}
