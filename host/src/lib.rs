//! `host`: a master process supervising worker processes that serve HTTP
//! through a handler library loaded at worker start.
//!
//! - `cli`: the commands; `config`: the config file;
//! - `master/`: supervisor, reload, control socket, watcher;
//! - `versions/`: the handler store and pins, for the CLI and the master;
//! - `worker/`: handler loader, HTTP server, drain; business workers;
//! - `gateway/`: gateway processes holding WebSocket and text clients;
//! - `protocol/`: messages between CLI, master and workers;
//! - `counters`: per-worker counters in shared memory;
//! - `spread`: each worker's open connections, shared by a group's workers
//!   so that they take turns accepting;
//! - `trust`: which files the host may load (owners and modes).
//!
//! The binary is [`main`]; the library exists so the ABI benchmark can
//! measure the very call a worker makes ([`abi`]).

mod cli;
mod config;
mod counters;
mod gateway;
mod logfile;
mod master;
mod protocol;
mod spread;
mod trust;
mod versions;
mod worker;

use std::process::ExitCode;

use clap::Parser;

pub use worker::abi;

/// The `host` command.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let json = cli.log_format == cli::LogFormat::Json;
    // Workers inherit the choice through the environment.
    std::env::set_var(logfile::LOG_FORMAT_ENV, if json { "json" } else { "text" });
    logfile::init(json);
    match cli.command {
        cli::Command::Worker => return worker::run(),
        cli::Command::Inspect { file, source } => return worker::inspect(&file, &source),
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
