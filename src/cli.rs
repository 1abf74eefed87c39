//! Command-line flags (clap derive), turned into [`RunOptions`] in one place.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::pipeline::RunOptions;

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
    /// Write the report here instead of `[report] path` (.csv, .jsonl or .parquet).
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
    /// Do not show progress on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// CSV, CSV.gz, TSV or Parquet files, or directories of them; `-` reads CSV from stdin.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<String>,
}

impl RunArgs {
    pub fn options(&self) -> RunOptions {
        RunOptions {
            inputs: self.inputs.clone(),
            dry_run: self.dry_run,
            report_path: self.report.clone(),
            progress: !self.quiet,
        }
    }
}
