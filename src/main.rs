//! The `crm-import` binary: parse flags, run, map the outcome to an exit code
//! (0 all good, 2 some rows not delivered, 1 the run could not be done).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use crm_import::cli::{Cli, Command};
use crm_import::config::Config;
use crm_import::pipeline;
use crm_import::sandbox::Sandbox;

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("crm-import: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr when `RUST_LOG` is set or `-v` is given; otherwise none
/// (no subscriber, no cost). Nothing logged ever holds a token or a body.
fn init_logs(verbose: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => EnvFilter::new(spec),
        Err(_) if verbose => EnvFilter::new("crm_import=debug"),
        Err(_) => return,
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn run() -> anyhow::Result<u8> {
    // A bad flag is "the run could not be done" (exit 1), not clap's usage code 2,
    // which a scheduler would read as "some rows were not delivered".
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            e.print()?;
            return Ok(0);
        }
        Err(e) => {
            let _ = e.print();
            return Ok(1);
        }
    };
    match cli.command {
        Command::Run(args) => {
            init_logs(args.verbose);
            let config = Config::load(&args.config)?;
            let outcome = pipeline::run(config, &args.options())?;
            eprint!("{}", outcome.render());
            if let Some(path) = &args.summary_json {
                outcome.write_json(path).map_err(|e| {
                    anyhow::anyhow!("cannot write --summary-json {}: {e}", path.display())
                })?;
            }
            let code = outcome.exit_code();
            if code == 1 {
                eprintln!(
                    "crm-import: error: every enabled sink refused its token (see `Delivery` above)"
                );
            }
            Ok(code)
        }
        Command::Sandbox(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let sandbox = Sandbox::start(args.listen, args.options()).await?;
                // Scripts and tests read the address from this line.
                println!("crm-import sandbox: listening on {}", sandbox.base_url());
                std::io::stdout().flush()?;
                tokio::signal::ctrl_c().await?;
                Ok::<u8, anyhow::Error>(0)
            })
        }
    }
}
