//! The `crm-import` binary: parse flags, run, map the outcome to an exit code
//! (0 all good, 2 some rows not delivered, 1 the run could not be done).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use crm_import::cli::{Cli, Command};
use crm_import::config::Config;
use crm_import::sandbox::Sandbox;
use crm_import::{pipeline, progress};

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("crm-import: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run() -> anyhow::Result<u8> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let config = Config::load(&args.config)?;
            let outcome = pipeline::run(config, &args.options())?;
            eprint!("{}", progress::render_summary(&outcome));
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
