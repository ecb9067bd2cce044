//! `host`: a master process supervising worker processes that serve HTTP
//! through a handler library loaded at worker start.
//!
//! - `cli`: the commands; `config`: the config file;
//! - `master/`: supervisor, reload, control socket, handler store;
//! - `worker/`: handler loader, HTTP server, drain;
//! - `protocol/`: messages between CLI, master and workers;
//! - `counters`: per-worker counters in shared memory.

mod cli;
mod config;
mod counters;
mod master;
mod protocol;
mod worker;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging();
    match cli.command {
        cli::Command::Worker => return worker::run(),
        cli::Command::Inspect { file } => return worker::inspect(&file),
        _ => {}
    }
    match cli::run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("host: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (the log file when daemonized); `HOST_LOG` filters,
/// e.g. `HOST_LOG=debug` or `HOST_LOG=host=debug,handler=info`.
fn init_logging() {
    let filter = EnvFilter::try_from_env("HOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
