//! `loadgen` command: runs a [`loadgen::LoadRun`] against a loopback address
//! and prints the [`loadgen::LoadReport`] as one JSON line on stdout, plus a
//! human summary on stderr. Exits 0 whenever the run completed, even with
//! failures: scripts read the counts from the JSON.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use loadgen::{LoadConfig, LoadReport, LoadRun};

/// Keep-alive HTTP/1.1 load client that counts every failure by kind and
/// never retries.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// Server address; must be a loopback address (127.0.0.0/8 or ::1).
    #[arg(long)]
    addr: SocketAddr,
    /// Concurrent connections, each sending requests back to back.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Run time in seconds (float); no request starts after it.
    #[arg(long, default_value_t = 10.0, value_parser = parse_secs)]
    duration: f64,
    /// Request path (GET).
    #[arg(long, default_value = "/")]
    path: String,
    /// Optional cap on the total number of requests across connections.
    #[arg(long)]
    requests: Option<u64>,
    /// Send `Connection: close` and open a new connection per request.
    #[arg(long)]
    close: bool,
    /// Per-request timeout in seconds (float): connect + send + full response.
    #[arg(long, default_value_t = 10.0, value_parser = parse_secs)]
    timeout: f64,
}

/// Parses a positive, finite number of seconds.
fn parse_secs(s: &str) -> Result<f64, String> {
    let secs: f64 = s
        .parse()
        .map_err(|e| format!("not a number of seconds: {e}"))?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err("must be a positive number of seconds".to_owned());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())?;
    Ok(secs)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Validates the arguments, runs the load and prints the report.
fn run(args: Args) -> anyhow::Result<()> {
    if !args.addr.ip().is_loopback() {
        bail!(
            "loadgen only targets loopback addresses (got {})",
            args.addr
        );
    }
    let mut config = LoadConfig::new(args.addr);
    config.connections = args.connections;
    config.path = args.path;
    config.duration = Duration::from_secs_f64(args.duration);
    config.max_requests = args.requests;
    config.keep_alive = !args.close;
    config.request_timeout = Duration::from_secs_f64(args.timeout);
    config.validate().context("invalid arguments")?;

    let report = LoadRun::start(config).wait();
    println!(
        "{}",
        serde_json::to_string(&report).context("serializing the report")?
    );
    eprintln!("{}", summary(&report));
    Ok(())
}

/// One human-readable line describing the run.
fn summary(report: &LoadReport) -> String {
    let failures = if report.failures.is_empty() {
        String::new()
    } else {
        let kinds: Vec<String> = report
            .failures
            .iter()
            .map(|(kind, n)| format!("{kind:?}={n}"))
            .collect();
        format!(" ({})", kinds.join(" "))
    };
    format!(
        "loadgen: ok={} failed={}{} connections_opened={} elapsed={:.2}s rps={:.0} p50={}us p99={}us",
        report.ok,
        report.failed(),
        failures,
        report.connections_opened,
        report.elapsed_secs,
        report.requests_per_sec,
        report.latency_p50_us,
        report.latency_p99_us,
    )
}
