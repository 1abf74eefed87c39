//! The run's outcome: the counts the report writer kept (so the summary and
//! the report can never disagree), each sink's delivery figures and plan, the
//! end-of-run table on stderr, and `--summary-json` for schedulers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::config::Rate;
use crate::progress::{human_duration, thousands};
use crate::report::Counts;
use crate::sink::{PlanCounts, SinkKind};

/// What one sink would do (the dry run's plan; a real run's backlog).
#[derive(Clone, Debug)]
pub struct SinkPlan {
    pub kind: SinkKind,
    /// Rows that would be sent.
    pub rows: u64,
    pub counts: PlanCounts,
    pub rate: Rate,
    pub concurrency: usize,
}

impl SinkPlan {
    /// Time the requests take at the configured rate (the rate is the bound, not concurrency).
    pub fn estimate(&self) -> Duration {
        self.rate
            .duration_for(self.counts.requests + self.counts.prepare_requests)
    }

    /// The request plan's line(s): the sink's requests, then any of a second
    /// kind on their own limiter (Weni's `contact_actions`) with their own estimate.
    pub fn line(&self) -> String {
        let mut line = format!(
            "  {:<12} {:>10} requests for {:>10} rows{}; ≈ {} at {}",
            self.kind.name(),
            thousands(self.counts.requests),
            thousands(self.rows),
            self.counts.note,
            human_duration(self.estimate()),
            self.rate
        );
        if let Some(more) = &self.counts.secondary {
            let _ = write!(
                line,
                "\n  {:<12} {:>10} {} requests (their own limiter); ≈ {} at {}",
                "",
                thousands(more.requests),
                more.what,
                human_duration(more.rate.duration_for(more.requests)),
                more.rate
            );
        }
        line
    }

    /// The warning when the plan does not fit in `limit` (`--max-duration`), if it does not.
    pub fn over_limit(&self, limit: Duration) -> Option<String> {
        (self.estimate() > limit).then(|| {
            format!(
                "{}: {} rows to send take ≈ {} at {}, more than --max-duration {}: this run sends what fits, the next runs continue from the state",
                self.kind.name(),
                thousands(self.rows),
                human_duration(self.estimate()),
                self.rate,
                human_duration(limit)
            )
        })
    }
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

/// The result of a run that could be done (exit 0 or 2, or 1 when every sink refused auth).
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
    /// What the sandbox received (`--sandbox` runs), as one line.
    pub sandbox_received: Option<String>,
    /// Why the run stopped early (a signal, the time limit), if it did.
    pub interrupted: Option<String>,
    /// `--max-duration`, for the plan's warnings.
    pub max_duration: Option<Duration>,
}

impl RunOutcome {
    /// 1 when every enabled sink refused auth; 2 when some row ended in a
    /// problem status or the run was stopped early; 0 otherwise (SPEC "Exit codes").
    pub fn exit_code(&self) -> u8 {
        if !self.sinks.is_empty() && self.sinks.iter().all(|s| s.auth_refused.is_some()) {
            return 1;
        }
        let problems = self
            .counts
            .iter()
            .any(|((_, status), n)| *n > 0 && status.is_problem());
        if problems || self.interrupted.is_some() {
            2
        } else {
            0
        }
    }

    /// Rows in the report.
    pub fn report_rows(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The end-of-run table for stderr.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let secs = self.elapsed.as_secs_f64().max(1e-6);
        let _ = writeln!(
            out,
            "\n{} input rows, {} unique phones, in {} ({} rows/s)",
            thousands(self.input_rows),
            thousands(self.unique_phones),
            human_duration(self.elapsed),
            thousands((self.input_rows as f64 / secs) as u64)
        );
        let _ = writeln!(out, "\n  {:<12} {:<14} {:>12}", "sink", "status", "rows");
        for ((sink, status), n) in &self.counts {
            let sink = sink.map(|k| k.name()).unwrap_or("(record)");
            let _ = writeln!(
                out,
                "  {:<12} {:<14} {:>12}",
                sink,
                status.name(),
                thousands(*n)
            );
        }
        if self.dry_run {
            let _ = writeln!(out, "\nRequest plan (no request was sent):");
            for plan in &self.plans {
                let _ = writeln!(out, "{}", plan.line());
                if let Some(warning) = self.max_duration.and_then(|d| plan.over_limit(d)) {
                    let _ = writeln!(out, "  {:<12} {warning}", "");
                }
            }
        }
        if let Some(reason) = &self.interrupted {
            let _ = writeln!(
                out,
                "\nStopped early ({reason}) after reading {} rows: rows not sent are `skipped`; run the same command again to continue (delivered rows end `unchanged`).",
                thousands(self.input_rows)
            );
        }
        self.render_delivery(&mut out);
        if let Some(line) = &self.sandbox_received {
            let _ = writeln!(out, "\nSandbox received: {line}");
        }
        let _ = writeln!(
            out,
            "\nReport: {} ({} rows)",
            self.report_path.display(),
            thousands(self.report_rows())
        );
        out
    }

    fn render_delivery(&self, out: &mut String) {
        if self.sinks.is_empty() {
            return;
        }
        let _ = writeln!(out, "\nDelivery:");
        for s in &self.sinks {
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

    /// The `--summary-json` object (SPEC "Command line").
    pub fn to_json(&self) -> Value {
        let mut statuses: Map<String, Value> = Map::new();
        for ((sink, status), n) in &self.counts {
            let key = sink.map(|k| k.name()).unwrap_or("record");
            let entry = statuses
                .entry(key.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(map) = entry {
                map.insert(status.name().to_owned(), json!(n));
            }
        }
        let sinks: Map<String, Value> = self
            .sinks
            .iter()
            .map(|s| {
                let figures = json!({
                    "requests": s.requests,
                    "rate_achieved": s.achieved_rate,
                    "throttled": s.throttled,
                    "retries": s.retries,
                });
                (s.kind.name().to_owned(), figures)
            })
            .collect();
        json!({
            "exit_code": self.exit_code(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "input_rows": self.input_rows,
            "unique_phones": self.unique_phones,
            "interrupted": self.interrupted.is_some(),
            "report": self.report_path.display().to_string(),
            "statuses": statuses,
            "sinks": sinks,
        })
    }

    /// Writes [`RunOutcome::to_json`] to `path`.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_string_pretty(&self.to_json())?;
        text.push('\n');
        std::fs::write(path, text)
    }
}
