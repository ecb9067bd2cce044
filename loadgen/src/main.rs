//! `loadgen` command: runs a [`loadgen::LoadRun`] (HTTP, the default) or an
//! [`loadgen::echo::EchoRun`] (`--protocol ws` or `text`) against a loopback
//! address and prints the report as one JSON line on stdout, plus a human
//! summary on stderr. Exits 0 whenever the run completed, even with
//! failures: scripts read the counts from the JSON.
//!
//! ```sh
//! loadgen --addr 127.0.0.1:8080 --connections 64 --duration 10
//! loadgen --protocol ws --addr 127.0.0.1:8282 --connections 64 --window 16
//! loadgen --protocol text --addr 127.0.0.1:8283 --connections 1000 --rate 20 \
//!     --source 127.0.0.2 --source 127.0.0.3
//! loadgen --protocol ws --addr 127.0.0.1:8282 --idle --connections 10000 --duration 30
//! ```
//!
//! With `--idle`, a line `loadgen: all N clients connected` goes
//! to stderr once every client is connected, so that a script can measure
//! the server while they are held. SIGINT or SIGTERM ends a ws/text run
//! early, as its duration would: the clients close and the report is
//! printed.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use loadgen::echo::{EchoConfig, EchoReport, EchoRun, Pace};
use loadgen::{LoadConfig, LoadReport, LoadRun};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Load client that counts every failure by kind and never retries:
/// keep-alive HTTP/1.1 requests, or WebSocket / text echo checking every
/// message.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// What to speak.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Http)]
    protocol: ProtocolArg,
    /// Server address; must be a loopback address (127.0.0.0/8 or ::1).
    #[arg(long)]
    addr: SocketAddr,
    /// Concurrent connections (HTTP: each sending requests back to back;
    /// ws/text: one client each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Run time in seconds (float); no request or message starts after it.
    #[arg(long, default_value_t = 10.0, value_parser = parse_secs)]
    duration: f64,
    /// Request path (HTTP: GET; ws: the upgrade request's path).
    #[arg(long, default_value = "/")]
    path: String,
    /// HTTP: optional cap on the total number of requests across connections.
    #[arg(long)]
    requests: Option<u64>,
    /// HTTP: send `Connection: close` and open a new connection per request.
    #[arg(long)]
    close: bool,
    /// Timeout in seconds (float). HTTP: per request, connect + send + full
    /// response. ws/text: per connect, and for the echoes still outstanding
    /// once sending ended.
    #[arg(long, default_value_t = 10.0, value_parser = parse_secs)]
    timeout: f64,
    /// ws/text: keep this many messages unanswered per client [default: 16
    /// unless --rate or --idle].
    #[arg(long, conflicts_with_all = ["rate", "idle"])]
    window: Option<usize>,
    /// ws/text: connects (TCP and handshake) in progress at once; keep the
    /// sum over every loadgen below the server's listen backlog.
    #[arg(long, default_value_t = 512)]
    connecting: usize,
    /// ws/text: send nothing; hold the connections (answering pings) for the
    /// duration, then close them.
    #[arg(long, conflicts_with_all = ["rate", "messages", "broadcast_every"])]
    idle: bool,
    /// ws/text: send this many messages per second per client instead.
    #[arg(long)]
    rate: Option<f64>,
    /// ws/text: optional cap on the messages each client sends.
    #[arg(long)]
    messages: Option<u64>,
    /// ws/text: pad each message to this many bytes.
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// ws/text: connect from this local address (repeat to spread clients
    /// over several, e.g. 127.0.0.2 127.0.0.3, when ephemeral ports run short).
    #[arg(long = "source")]
    sources: Vec<IpAddr>,
    /// ws/text: client 0 sends a broadcast (`b...`) every this many seconds
    /// (float), once every client is connected.
    #[arg(long, value_parser = parse_secs)]
    broadcast_every: Option<f64>,
}

/// `--protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    /// Keep-alive HTTP/1.1 GET requests.
    Http,
    /// WebSocket echo.
    Ws,
    /// Newline-delimited text echo over TCP.
    Text,
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
    let protocol = match args.protocol {
        ProtocolArg::Http => {
            let echo_only = args.window.is_some()
                || args.idle
                || args.rate.is_some()
                || args.messages.is_some()
                || !args.sources.is_empty()
                || args.broadcast_every.is_some();
            if echo_only {
                bail!("--window, --idle, --rate, --messages, --source and --broadcast-every are for --protocol ws or text");
            }
            return run_http(args);
        }
        ProtocolArg::Ws => loadgen::echo::Protocol::WebSocket,
        ProtocolArg::Text => loadgen::echo::Protocol::Text,
    };
    if args.requests.is_some() || args.close {
        bail!("--requests and --close are for --protocol http");
    }
    let mut config = EchoConfig::new(args.addr, protocol);
    config.clients = args.connections;
    config.path = args.path;
    config.duration = Duration::from_secs_f64(args.duration);
    config.pace = match (args.rate, args.window) {
        _ if args.idle => Pace::Idle,
        (Some(rate), _) => Pace::Rate(rate),
        (None, window) => Pace::Window(window.unwrap_or(16)),
    };
    config.messages_per_client = args.messages;
    config.payload = args.payload;
    config.sources = args.sources;
    config.broadcast_every = args.broadcast_every.map(Duration::from_secs_f64);
    config.drain_timeout = Duration::from_secs_f64(args.timeout);
    config.max_connecting = args.connecting;
    config.validate().context("invalid arguments")?;

    // Blocked before the run's threads start, so that they inherit the
    // mask and the signals wait in the signalfd.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("blocking SIGINT and SIGTERM")?;
    let signalled = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("signalfd")?;
    let clients = config.clients;
    let run = EchoRun::start(config);
    let mut announced = !args.idle;
    let report = loop {
        if run.is_finished() {
            break run.wait();
        }
        if matches!(signalled.read_signal(), Ok(Some(_))) {
            break run.stop();
        }
        if !announced && run.progress().connected >= clients {
            eprintln!("loadgen: all {clients} clients connected");
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "{}",
        serde_json::to_string(&report).context("serializing the report")?
    );
    eprintln!("{}", echo_summary(&report));
    Ok(())
}

/// Runs the HTTP load and prints its report.
fn run_http(args: Args) -> anyhow::Result<()> {
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

/// One human-readable line describing an echo run.
fn echo_summary(report: &EchoReport) -> String {
    let disconnects: Vec<String> = report
        .disconnects
        .iter()
        .map(|(kind, n)| format!("{kind}={n}"))
        .collect();
    let mut line = format!(
        "loadgen: sent={} received={} lost={} reordered={} duplicated={} unexpected={} disconnects={}{} connect_failures={} elapsed={:.2}s msgs/s={:.0} p50={}us p99={}us longest_gap={}us cpu={:.0}%",
        report.sent,
        report.received,
        report.lost,
        report.reordered,
        report.duplicated,
        report.unexpected,
        report.disconnected(),
        if disconnects.is_empty() { String::new() } else { format!(" ({})", disconnects.join(" ")) },
        report.connect_failures,
        report.elapsed_secs,
        report.messages_per_sec,
        report.latency_p50_us,
        report.latency_p99_us,
        report.longest_gap_us,
        report.cpu_percent,
    );
    if let Some(secs) = report.all_connected_secs {
        line += &format!(
            " connections_opened={} all_connected_after={secs:.2}s",
            report.connections_opened
        );
    }
    if report.broadcasts_sent > 0 {
        line += &format!(
            " broadcasts={} received={} fanout_p50={}us fanout_p99={}us",
            report.broadcasts_sent,
            report.broadcasts_received,
            report.fanout_p50_us,
            report.fanout_p99_us
        );
    }
    line
}
