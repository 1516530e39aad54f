//! The `pgspool` binary: parse the command line, set up logging, run, map the outcome to an
//! exit code (0 ok, 64 bad usage, 78 bad configuration, 1 runtime failure).

use std::process::ExitCode;

use clap::Parser;
use pgspool::cli::{Cli, Command, DeadLettersCommand};
use pgspool::config::ConfigError;
use tracing_subscriber::EnvFilter;

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgspool: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgspool: error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let config = args.config()?;
            init_logging(&config.log.level);
            config.validate()?;
            pgspool::app::run_until_signalled(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            init_logging("warn");
            pgspool::status::run(&args).await
        }
        Command::Quarantine(args) => {
            init_logging("error");
            pgspool::quarantine::run(&args)
        }
        Command::DeadLetters(args) => {
            init_logging("warn");
            match &args.command {
                DeadLettersCommand::List(args) => pgspool::dead_letters::list(args).await,
                DeadLettersCommand::Retry(args) => pgspool::dead_letters::retry(args).await,
            }
        }
        Command::Demo(args) => {
            init_logging("warn");
            pgspool::demo::run(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
