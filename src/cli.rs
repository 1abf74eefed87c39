//! Command-line flags (clap derive), turned into [`RunOptions`] in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Rate, parse_duration};
use crate::pipeline::RunOptions;
use crate::sandbox::{Faults, PlatformOptions, SANDBOX_TOKEN, SandboxOptions};
use crate::sink::Rerun;

/// Push CRM contacts (CSV/Parquet exports) into Chatfuel, Weni and CloudHumans.
#[derive(Parser, Debug)]
#[command(name = "crm-import", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Read, normalize to E.164, dedup and deliver the contacts of INPUT files; write a report.
    Run(RunArgs),
    /// Run the fake platforms standalone on loopback (for rehearsals and benchmarks).
    Sandbox(SandboxArgs),
}

fn rate(text: &str) -> Result<Rate, String> {
    Rate::parse(text).ok_or_else(|| {
        format!("\"{text}\" is not a rate; write \"50/s\", \"3000/min\" or \"3000/h\"")
    })
}

fn platform_rate(text: &str) -> Result<(String, Rate), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| {
        format!("\"{text}\" is not PLATFORM=RATE (a platform name, =, a rate such as 10/s)")
    })?;
    let name = name.trim();
    if crate::sink::SinkKind::by_name(name).is_none() {
        return Err(format!("\"{name}\" is not a platform"));
    }
    Ok((name.to_owned(), rate(value)?))
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text)
        .ok_or_else(|| format!("\"{text}\" is not a duration; write \"50ms\" or \"2s\""))
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| {
        format!("\"{text}\" is not a positive duration of at most a year; write \"30s\", \"90m\" or \"6h\"")
    })
}

fn positive_count(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("\"{text}\" is not a whole number of rows ≥ 1")),
    }
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("\"{text}\" is not a share between 0 and 1")),
    }
}

/// Options of `crm-import sandbox`.
#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    /// Address to listen on; loopback only (127.0.0.1:0 picks a free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Token the three fakes accept.
    #[arg(long, default_value = SANDBOX_TOKEN)]
    pub token: String,
    /// A platform's throttle, as PLATFORM=RATE (repeatable; e.g. `--rate weni=10/s`).
    /// Each fake answers 429 the way its platform does. Default: none.
    #[arg(long = "rate", value_name = "PLATFORM=RATE", value_parser = platform_rate)]
    pub rates: Vec<(String, Rate)>,
    /// Latency added to every request.
    #[arg(long, value_parser = duration)]
    pub latency: Option<Duration>,
    /// Share of requests answered 500 without effect.
    #[arg(long, value_parser = share, default_value = "0")]
    pub error_rate: f64,
    /// Share of connections dropped before processing.
    #[arg(long, value_parser = share, default_value = "0")]
    pub drop_before: f64,
    /// Share of connections dropped after the effect was applied.
    #[arg(long, value_parser = share, default_value = "0")]
    pub drop_after: f64,
    /// Share of answers delayed by --slow-delay (after the effect).
    #[arg(long, value_parser = share, default_value = "0")]
    pub slow_rate: f64,
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub slow_delay: Duration,
    /// Platforms the faults, hostile Retry-After and redirects apply to (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    pub faults_on: Vec<String>,
    /// Weni list page size.
    #[arg(long, default_value_t = 250)]
    pub page_size: usize,
    /// Weni's verify_ninth_digit org switch.
    #[arg(long)]
    pub weni_verify_ninth_digit: bool,
    /// Hostile throttling: answer the first --retry-after-count requests 429
    /// with this raw Retry-After value (e.g. "inf", "-5", an HTTP date).
    #[arg(long, value_name = "VALUE", allow_hyphen_values = true)]
    pub retry_after: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub retry_after_count: u64,
    /// Answer every request 307 Temporary Redirect to this URL.
    #[arg(long, value_name = "URL")]
    pub redirect_to: Option<String>,
    /// Seed of the fault dice.
    #[arg(long, default_value_t = 0x5EED)]
    pub seed: u64,
}

impl SandboxArgs {
    pub fn options(&self) -> SandboxOptions {
        let faults = Faults {
            latency: self.latency.unwrap_or_default(),
            error_rate: self.error_rate,
            drop_before: self.drop_before,
            drop_after: self.drop_after,
            slow_rate: self.slow_rate,
            slow_delay: self.slow_delay,
        };
        let faults_for = |name: &str| {
            let on = self.faults_on.is_empty() || self.faults_on.iter().any(|p| p.trim() == name);
            PlatformOptions {
                rate: None,
                faults: if on {
                    faults.clone()
                } else {
                    Faults::default()
                },
                retry_after: self
                    .retry_after
                    .clone()
                    .filter(|_| on)
                    .map(|v| (v, self.retry_after_count)),
                redirect_to: self.redirect_to.clone().filter(|_| on),
            }
        };
        let mut options = SandboxOptions {
            token: self.token.clone(),
            page_size: self.page_size,
            weni_verify_ninth_digit: self.weni_verify_ninth_digit,
            seed: self.seed,
            ..SandboxOptions::default()
        };
        for (name, platform) in options.platforms.iter_mut() {
            *platform = PlatformOptions {
                rate: self.rates.iter().find(|(n, _)| n == name).map(|(_, r)| *r),
                ..faults_for(name)
            };
        }
        options
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The TOML config file (see the README's config reference).
    #[arg(long, short = 'c', value_name = "PATH")]
    pub config: PathBuf,
    /// Read, normalize, dedup and validate every request, write the report with
    /// status dry_run, print the request plan. No network.
    #[arg(long)]
    pub dry_run: bool,
    /// Start the built-in fake platforms on 127.0.0.1 and send to them with
    /// dummy tokens: see the whole thing work without credentials.
    #[arg(long)]
    pub sandbox: bool,
    /// Ignore the incremental state: send everything again to Chatfuel and Weni
    /// (CloudHumans messages still go at most once per template; see --resend-messages).
    #[arg(long)]
    pub full: bool,
    /// Send CloudHumans template messages again even to phones the state says got them.
    #[arg(long)]
    pub resend_messages: bool,
    /// Send CloudHumans messages that an interrupted run may have sent (status unknown).
    #[arg(long)]
    pub resend_unknown: bool,
    /// Write the report here instead of `[report] path` (.csv, .jsonl or .parquet).
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
    /// The run's time box ("30s", "90m", "6h"): no request starts after it;
    /// rows not sent end `skipped` ("time limit reached"), exit 2; the next run continues.
    #[arg(long, value_name = "DUR", value_parser = positive_duration, allow_hyphen_values = true)]
    pub max_duration: Option<Duration>,
    /// A canary: each sink sends at most N rows (the first it would send); the rest end `skipped` ("limit").
    #[arg(long, value_name = "N", value_parser = positive_count, allow_hyphen_values = true)]
    pub limit: Option<u64>,
    /// Also write the end-of-run summary as one JSON object here (for cron, Airflow).
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Do not show progress on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Log every HTTP attempt on stderr (sink, method, path, status, latency,
    /// attempt); `RUST_LOG` gives finer control (e.g. `RUST_LOG=crm_import=debug`).
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// CSV, CSV.gz, TSV or Parquet files, or directories of them; `-` reads CSV from stdin.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<String>,
}

impl RunArgs {
    pub fn options(&self) -> RunOptions {
        RunOptions {
            inputs: self.inputs.clone(),
            dry_run: self.dry_run,
            sandbox: self.sandbox,
            rerun: Rerun {
                full: self.full,
                resend_messages: self.resend_messages,
                resend_unknown: self.resend_unknown,
            },
            report_path: self.report.clone(),
            progress: !self.quiet,
            max_duration: self.max_duration,
            limit: self.limit,
        }
    }
}
