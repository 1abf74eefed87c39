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

use indicatif::{ProgressBar, ProgressStyle};

use crate::pipeline::RunOutcome;

/// Seconds between log lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// A running progress display; counts rows through [`Progress::counter`].
pub struct Progress {
    rows: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts the display (or nothing when `enabled` is false).
    pub fn start(enabled: bool) -> Progress {
        let rows = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let ticker = enabled.then(|| {
            let rows = rows.clone();
            let done = done.clone();
            std::thread::spawn(move || tick(rows, done))
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

fn tick(rows: Arc<AtomicU64>, done: Arc<AtomicBool>) {
    let started = Instant::now();
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        while !done.load(Ordering::Relaxed) {
            let n = rows.load(Ordering::Relaxed);
            let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!(
                "{} rows processed ({}/s)",
                thousands(n),
                thousands(rate as u64)
            ));
            bar.tick();
            std::thread::park_timeout(Duration::from_millis(120));
        }
        bar.finish_and_clear();
    } else {
        let mut last = Instant::now();
        while !done.load(Ordering::Relaxed) {
            std::thread::park_timeout(Duration::from_millis(200));
            if last.elapsed() >= LOG_EVERY && !done.load(Ordering::Relaxed) {
                last = Instant::now();
                let n = rows.load(Ordering::Relaxed);
                let rate = n as f64 / started.elapsed().as_secs_f64().max(1e-3);
                eprintln!(
                    "crm-import: {} rows processed ({} rows/s)",
                    thousands(n),
                    thousands(rate as u64)
                );
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
