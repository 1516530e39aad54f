//! The `pgspool` binary: parse the command line, set up logging, run, map the outcome to an
//! exit code (0 ok, 64 bad usage, 78 bad configuration, 1 runtime failure, 130 an
//! interrupted bench).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pgspool::cli::{Cli, Command, DeadLettersCommand};
use pgspool::config::ConfigError;
use pgspool::logging::{self, LogFormat};

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;
/// 128 + SIGINT.
const EX_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Before any thread starts: reading the socket systemd passed clears LISTEN_FDS.
    let activated = match &cli.command {
        Command::Run(_) => match pgspool::systemd::take_activated_socket() {
            Ok(activated) => activated,
            Err(e) => {
                eprintln!("pgspool: error: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        },
        _ => None,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgspool: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ran = runtime.block_on(run(cli, activated));
    // Work left in blocking threads (a WAL count for a status request, say) is not waited
    // for: the daemon has closed its WAL by now.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match ran {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgspool: error: {e:#}");
            exit_code(&e)
        }
    }
}

/// 78 for a configuration error, 64 for bad usage found after parsing, 130 for an
/// interrupted bench, else 1.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<ConfigError>().is_some() {
        ExitCode::from(EX_CONFIG)
    } else if e.downcast_ref::<pgspool::bench::UsageError>().is_some() {
        ExitCode::from(EX_USAGE)
    } else if e.downcast_ref::<pgspool::bench::Interrupted>().is_some() {
        ExitCode::from(EX_INTERRUPTED)
    } else {
        ExitCode::FAILURE
    }
}

async fn run(
    cli: Cli,
    activated: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let config = args.config()?;
            let log = logging::init(&config.log.level, config.log.format);
            let service = pgspool::service::Service {
                activated,
                reread: match args.source.config {
                    Some(_) => Some(Box::new(move || args.config())),
                    None => None,
                },
                log,
            };
            let ran = match config.validate() {
                Ok(()) => pgspool::service::run_until_signalled(config, service).await,
                Err(e) => Err(e.into()),
            };
            // Through the log, in its format (JSON for log shippers, the journal's lines).
            Ok(ran.map_or_else(
                |e| {
                    tracing::error!(error = format!("{e:#}"), "pgspool run failed");
                    exit_code(&e)
                },
                |()| ExitCode::SUCCESS,
            ))
        }
        Command::Status(args) => {
            logging::init("warn", LogFormat::Text);
            pgspool::status::run(&args).await
        }
        Command::Quarantine(args) => {
            logging::init("error", LogFormat::Text);
            pgspool::quarantine::run(&args)
        }
        Command::DeadLetters(args) => {
            logging::init("warn", LogFormat::Text);
            match &args.command {
                DeadLettersCommand::List(args) => pgspool::dead_letters::list(args).await,
                DeadLettersCommand::Retry(args) => pgspool::dead_letters::retry(args).await,
            }
        }
        Command::Send(args) => {
            logging::init("warn", LogFormat::Text);
            pgspool::send::run(&args).await
        }
        Command::Demo(args) => {
            logging::init("warn", LogFormat::Text);
            pgspool::demo::run(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            logging::init("warn", LogFormat::Text);
            pgspool::bench::run(&args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
