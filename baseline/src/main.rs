//! `baseline-server`: the sample handler's routes in a plain hyper server,
//! host's process model. See the crate docs.
//!
//! ```sh
//! baseline-server --listen 127.0.0.1:0 --workers 2
//! # listening on 127.0.0.1:NNNNN      (once every worker serves)
//! baseline-server --listen 127.0.0.1:0 --websocket 127.0.0.1:0 --text 127.0.0.1:0
//! # listening on 127.0.0.1:NNNNN
//! # websocket on 127.0.0.1:NNNNN
//! # text on 127.0.0.1:NNNNN
//! ```
//!
//! SIGTERM or SIGINT stops the parent and its workers; workers also die
//! with the parent.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Plain hyper server with sample-handler's routes compiled in: the
/// baseline that host's benchmarks compare against.
#[derive(Debug, Parser)]
#[command(name = "baseline-server", version)]
struct Cli {
    /// Address to listen on; port 0 picks a free port (printed on stdout)
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Also serve the WebSocket echo on this address (any path)
    #[arg(long)]
    websocket: Option<SocketAddr>,
    /// Also serve the newline-delimited text echo on this address
    #[arg(long)]
    text: Option<SocketAddr>,
    /// Worker processes [default: one per core]
    #[arg(long)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: a worker process, started by the parent
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Worker) => baseline::server::run_worker(),
        None => {
            let workers = cli
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let listen = baseline::server::Listen {
                http: cli.listen,
                websocket: cli.websocket,
                text: cli.text,
            };
            baseline::server::run_parent(listen, workers)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
