//! Progress on stderr while the run goes, and the summary when it ends.
//!
//! On a terminal: an indicatif spinner with rows processed and the current
//! rate. Otherwise (cron, CI, `2> log`): one log line every few seconds, so a
//! 2 a.m. log shows the run was alive and how fast it went.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::SinkKind;
use crate::pipeline::RunOutcome;
use crate::sink::SinkProgress;

/// Seconds between log lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A running progress display; counts rows through [`Progress::counter`].
pub struct Progress {
    rows: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

/// What the ticker shows: rows accounted for, and each sink's counters.
struct Watched {
    rows: Arc<AtomicU64>,
    sinks: Vec<(SinkKind, Arc<SinkProgress>)>,
    started: Instant,
    /// Rows and time at the previous display, for the current reading rate.
    last: std::sync::Mutex<(u64, Instant)>,
}

impl Watched {
    /// Rows accounted for, and the rate since the previous display (0/s once reading is done).
    fn rows_line(&self) -> String {
        let n = self.rows.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = match self.last.lock() {
            Ok(mut last) => {
                let (rows, at) = *last;
                let secs = now.duration_since(at).as_secs_f64();
                let rate = if secs > 0.0 {
                    (n - rows.min(n)) as f64 / secs
                } else {
                    0.0
                };
                *last = (n, now);
                rate
            }
            Err(_) => 0.0,
        };
        format!("rows read: {} ({}/s)", thousands(n), thousands(rate as u64))
    }

    /// `weni: 1,204/5,000 done, 3 failed, 0.83 rows/s, ETA 1h 16m` — the ETA
    /// counts what was handed to the sink so far (the input is streamed).
    fn sink_line(&self, kind: SinkKind, p: &SinkProgress) -> String {
        let (queued, done, problems) = (
            p.queued.load(Ordering::Relaxed),
            p.done.load(Ordering::Relaxed),
            p.problems.load(Ordering::Relaxed),
        );
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 && queued > done {
            format!(
                ", ETA {}",
                human_duration(Duration::from_secs_f64((queued - done) as f64 / rate))
            )
        } else {
            String::new()
        };
        format!(
            "{}: {}/{} done, {} not delivered, {:.1} rows/s{eta}",
            kind.name(),
            thousands(done),
            thousands(queued),
            thousands(problems),
            rate
        )
    }
}

impl Progress {
    /// Starts the display (or nothing when `enabled` is false).
    pub fn start(enabled: bool, kinds: Vec<SinkKind>, sinks: Vec<Arc<SinkProgress>>) -> Progress {
        let rows = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let watched = Watched {
            rows: rows.clone(),
            sinks: kinds.into_iter().zip(sinks).collect(),
            started: Instant::now(),
            last: std::sync::Mutex::new((0, Instant::now())),
        };
        let ticker = enabled.then(|| {
            let done = done.clone();
            std::thread::spawn(move || tick(watched, done))
        });
        Progress { rows, done, ticker }
    }

    /// The counter the report writer bumps for every input row it has accounted for.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.rows.clone()
    }

    pub fn finish(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn tick(watched: Watched, done: Arc<AtomicBool>) {
    // Sinks with nothing queued yet (a dry run) show no line.
    let active = |w: &Watched| -> Vec<String> {
        w.sinks
            .iter()
            .filter(|(_, p)| p.queued.load(Ordering::Relaxed) > 0)
            .map(|(k, p)| w.sink_line(*k, p))
            .collect()
    };
    if std::io::stderr().is_terminal() {
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let rows_bar = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
        let sink_bars: Vec<ProgressBar> = watched
            .sinks
            .iter()
            .map(|_| multi.add(ProgressBar::new_spinner().with_style(style.clone())))
            .collect();
        while !done.load(Ordering::Relaxed) {
            rows_bar.set_message(watched.rows_line());
            rows_bar.tick();
            for ((kind, p), bar) in watched.sinks.iter().zip(&sink_bars) {
                if p.queued.load(Ordering::Relaxed) > 0 {
                    bar.set_message(watched.sink_line(*kind, p));
                    bar.tick();
                }
            }
            std::thread::park_timeout(Duration::from_millis(120));
        }
        for bar in sink_bars.iter().chain(std::iter::once(&rows_bar)) {
            bar.finish_and_clear();
        }
    } else {
        let mut last = Instant::now();
        while !done.load(Ordering::Relaxed) {
            std::thread::park_timeout(Duration::from_millis(200));
            if last.elapsed() >= LOG_EVERY && !done.load(Ordering::Relaxed) {
                last = Instant::now();
                let mut line = format!("crm-import: {}", watched.rows_line());
                for sink in active(&watched) {
                    line.push_str("; ");
                    line.push_str(&sink);
                }
                eprintln!("{line}");
            }
        }
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

/// The end-of-run summary: counts per sink and status (from the report's own
/// counts), elapsed time and rate, and for a dry run the request plan.
pub fn render_summary(outcome: &RunOutcome) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let secs = outcome.elapsed.as_secs_f64().max(1e-6);
    let _ = writeln!(
        out,
        "\n{} input rows, {} unique phones, in {} ({} rows/s)",
        thousands(outcome.input_rows),
        thousands(outcome.unique_phones),
        human_duration(outcome.elapsed),
        thousands((outcome.input_rows as f64 / secs) as u64)
    );
    let _ = writeln!(out, "\n  {:<12} {:<14} {:>12}", "sink", "status", "rows");
    for ((sink, status), n) in &outcome.counts {
        let sink = sink.map(|k| k.name()).unwrap_or("(record)");
        let _ = writeln!(
            out,
            "  {:<12} {:<14} {:>12}",
            sink,
            status.name(),
            thousands(*n)
        );
    }
    if outcome.dry_run {
        let _ = writeln!(out, "\nRequest plan (no request was sent):");
        for plan in &outcome.plans {
            let mut line = format!(
                "  {:<12} {:>10} requests for {:>10} rows",
                plan.kind.name(),
                thousands(plan.requests),
                thousands(plan.rows)
            );
            if let Some(sets) = plan.property_sets {
                let _ = write!(line, " in {} property set(s)", thousands(sets));
            }
            if plan.prepare_requests > 0 {
                let _ = write!(
                    line,
                    " + up to {} to prepare fields and groups",
                    plan.prepare_requests
                );
            }
            let _ = write!(
                line,
                "; ≈ {} at {}",
                human_duration(plan.estimate()),
                plan.rate
            );
            let _ = writeln!(out, "{line}");
        }
    }
    if outcome.interrupted {
        let _ = writeln!(
            out,
            "\nInterrupted (Ctrl-C) after {} rows: rows not read are not in this report; run the same command again to continue (delivered rows end `unchanged`).",
            thousands(outcome.input_rows)
        );
    }
    if !outcome.sinks.is_empty() {
        let _ = writeln!(out, "\nDelivery:");
        for s in &outcome.sinks {
            let achieved = s
                .achieved_rate
                .map(|r| format!("{r:.2} req/s achieved (configured {})", s.rate))
                .unwrap_or_else(|| format!("configured {}", s.rate));
            let _ = writeln!(
                out,
                "  {:<12} {:>10} requests, {achieved}, {} × 429, {} retries",
                s.kind.name(),
                thousands(s.requests),
                s.throttled,
                s.retries
            );
            if let Some(reason) = &s.auth_refused {
                let _ = writeln!(out, "  {:<12} stopped: {reason}", "");
            }
        }
    }
    if let Some(log) = &outcome.sandbox_log {
        let _ = writeln!(
            out,
            "\nSandbox received: chatfuel {} request(s) for {} phone(s); weni {} contact(s), {} field(s), {} group(s); cloudhumans {} message(s)",
            log.chatfuel.requests.len(),
            log.chatfuel
                .requests
                .iter()
                .map(|r| r.phones.len())
                .sum::<usize>(),
            log.weni.contacts.len(),
            log.weni.fields.len(),
            log.weni.groups.len(),
            log.cloudhumans.messages.len()
        );
    }
    let _ = writeln!(
        out,
        "\nReport: {} ({} rows)",
        outcome.report_path.display(),
        thousands(outcome.report_rows())
    );
    out
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
}
