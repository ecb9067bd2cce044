//! Echo load over long-lived connections (WebSocket or newline-delimited
//! text) that checks every echo.
//!
//! This is the client behind the gateway's claims — "no message lost,
//! reordered or duplicated across a reload, no client dropped" — so, as for
//! HTTP, nothing is hidden: every message carries its client number, a
//! sequence number and its send time, and every echo is checked against what
//! that connection sent.
//!
//! # Design
//!
//! * [`EchoRun::start`] runs [`EchoConfig::clients`] client tasks on a tokio
//!   multi-thread runtime (2 threads) on a dedicated OS thread, like
//!   [`crate::LoadRun`].
//! * Each client keeps one connection. It sends `C:S:T` messages (client,
//!   sequence, send time in µs since the run started, padded to
//!   [`EchoConfig::payload`] bytes), either at a fixed rate or keeping a
//!   window of K unanswered ([`Pace`]), and matches each echo with a
//!   [`Tracker`]. When sending ends (duration, [`EchoRun::stop`], or the
//!   per-client message cap), the client waits up to
//!   [`EchoConfig::drain_timeout`] for its outstanding echoes, then closes
//!   (WebSocket close 1000; text: shuts down its write side). With a
//!   window, every echo already readable is checked before the window is
//!   topped up in one write, so under load the client costs about 1 µs of
//!   CPU per echo and is not what limits a flood on 2 cores.
//! * A disconnect the client did not ask for is counted by kind
//!   ([`DisconnectKind`]); what that connection still had outstanding is
//!   lost. The client then reconnects (after 10 ms) with a fresh tracker —
//!   never resending: a retry would hide the loss.
//! * Idle ([`Pace::Idle`]): clients connect and send nothing until the
//!   duration ends, answering the server's WebSocket pings, then close; the
//!   report says when all of them were connected at once
//!   ([`EchoReport::all_connected_secs`]). Connects in progress are bounded
//!   ([`EchoConfig::max_connecting`]), as a listener's backlog is.
//! * Broadcast: with [`EchoConfig::broadcast_every`], client 0 sends `bT`
//!   (send time) at that interval once every client's connection has had an
//!   echo (so the server surely knows them all); the server
//!   is expected to pass a message starting with `b` to every client, and
//!   every client records the fan-out latency of each one it receives.
//! * The run raises its own `RLIMIT_NOFILE` soft limit to the hard limit,
//!   spreads its connections over [`EchoConfig::sources`] (127.0.0.2, ...) so
//!   that many connections do not exhaust one address's ephemeral ports, and
//!   reports the CPU time its process used, so a benchmark can tell whether
//!   the client was the bottleneck.
//! * Bounded: only loopback targets and sources, no message starts after the
//!   duration, drains and connects are bounded by the drain timeout, and
//!   memory per client is a set of outstanding sequence numbers (at most the
//!   window, or what the rate sent within the drain timeout).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::histogram::Histogram;
use crate::run_thread::{stop_requested, RunThread};

/// Longest message (WebSocket) or line (text) the client accepts.
const MAX_INCOMING: usize = 1 << 20;
/// How often a draining client checks whether the broadcasts sent have all
/// reached it.
const BROADCAST_DRAIN_POLL: Duration = Duration::from_millis(10);
/// Pause before reconnecting after a failed connect or a disconnect.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);
/// Latency samples a client buffers before adding them to the shared
/// histogram (one lock per batch instead of per echo).
const SAMPLE_BATCH: usize = 256;
/// Most entries in [`EchoReport::gaps_by_second_us`] (one hour).
pub const MAX_GAP_SECONDS: usize = 3600;
/// Maximum number of entries in [`EchoReport::first_errors`].
const MAX_FIRST_ERRORS: usize = 10;
/// Stand-in for "no deadline" when the duration is too large to add to now.
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The protocol the clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// RFC 6455 WebSocket; messages go as text frames.
    WebSocket,
    /// One message per line (`\n`) over plain TCP.
    Text,
}

/// How fast each client sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// This many messages per second per client, evenly spaced, whatever the
    /// echoes do (the clients' phases are spread over one period).
    Rate(f64),
    /// Keep this many messages unanswered: send a new one per echo (flood).
    Window(usize),
    /// Send nothing: hold the connection (answering WebSocket pings) until
    /// the duration ends, then close it. For measuring what idle clients
    /// cost a server.
    Idle,
}

/// What to load and how. Build it with [`EchoConfig::new`] and adjust the
/// public fields.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// Server to connect to; a loopback address.
    pub addr: SocketAddr,
    /// WebSocket or text.
    pub protocol: Protocol,
    /// WebSocket request path.
    pub path: String,
    /// Number of clients, one connection each.
    pub clients: usize,
    /// Rate or window.
    pub pace: Pace,
    /// No message starts after this much time since the start.
    pub duration: Duration,
    /// Optional cap on the messages each client sends.
    pub messages_per_client: Option<u64>,
    /// Each message is padded to this many bytes (never shorter than its
    /// `C:S:T` header).
    pub payload: usize,
    /// Local addresses to connect from, client `i` from `sources[i % len]`;
    /// empty: the system chooses. Loopback addresses only.
    pub sources: Vec<IpAddr>,
    /// Client 0 sends a broadcast message at this interval.
    pub broadcast_every: Option<Duration>,
    /// Bound on one connect (TCP and WebSocket handshake) and on the wait
    /// for outstanding echoes once sending ended.
    pub drain_timeout: Duration,
    /// Connects (TCP and handshake) in progress at once, all clients
    /// together. Below the server's listen backlog (often 1024; the sum
    /// over every process connecting to it), so that tens of thousands of
    /// clients starting together do not overflow its accept queue and wait
    /// out SYN retransmissions (1 s, 3 s, 7 s, ...).
    pub max_connecting: usize,
}

impl EchoConfig {
    /// WebSocket on path `/`, 64 clients with a window of 16, 10 s, 32-byte
    /// messages, no broadcast, 5 s drain timeout.
    pub fn new(addr: SocketAddr, protocol: Protocol) -> Self {
        EchoConfig {
            addr,
            protocol,
            path: "/".to_owned(),
            clients: 64,
            pace: Pace::Window(16),
            duration: Duration::from_secs(10),
            messages_per_client: None,
            payload: 32,
            sources: Vec::new(),
            broadcast_every: None,
            drain_timeout: Duration::from_secs(5),
            max_connecting: 512,
        }
    }

    /// Checks that the config can be run: loopback target and sources, at
    /// least one client, a positive finite rate or window, a path in origin
    /// form. [`EchoRun::start`] panics on the same conditions.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            self.addr.ip().is_loopback(),
            "only loopback targets (got {})",
            self.addr
        );
        for source in &self.sources {
            ensure!(
                source.is_loopback() && source.is_ipv4() == self.addr.is_ipv4(),
                "source {source} is not a loopback address of the target's family"
            );
        }
        ensure!(self.clients > 0, "clients must be at least 1");
        ensure!(self.max_connecting > 0, "max_connecting must be at least 1");
        match self.pace {
            Pace::Rate(rate) => ensure!(
                rate.is_finite() && rate > 0.0 && rate <= 1e6,
                "rate must be in (0, 1e6] messages per second (got {rate})"
            ),
            Pace::Window(window) => ensure!(window > 0, "window must be at least 1"),
            Pace::Idle => ensure!(
                self.broadcast_every.is_none() && self.messages_per_client.is_none(),
                "idle clients send no broadcasts and no messages"
            ),
        }
        ensure!(
            self.path.starts_with('/'),
            "path must start with '/' (got {:?})",
            self.path
        );
        format!("ws://{}{}", self.addr, self.path)
            .parse::<tokio_tungstenite::tungstenite::http::Uri>()
            .with_context(|| format!("invalid path {:?}", self.path))?;
        Ok(())
    }
}

/// Why a connection ended without the client asking for it. The report
/// counts disconnects under [`DisconnectKind::key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectKind {
    /// WebSocket close frame from the server, with its code (`None`: no code).
    Close(Option<u16>),
    /// The connection ended without a close frame (WebSocket) or was reset
    /// (either protocol).
    Abrupt,
    /// Text: the server closed its side (end of stream).
    Eof,
    /// The server broke the protocol (invalid frame, overlong message).
    Error,
}

impl DisconnectKind {
    /// The key in [`EchoReport::disconnects`]: `close 1001`,
    /// `close (no code)`, `abrupt`, `eof` or `error`.
    pub fn key(self) -> String {
        match self {
            DisconnectKind::Close(Some(code)) => format!("close {code}"),
            DisconnectKind::Close(None) => "close (no code)".to_owned(),
            DisconnectKind::Abrupt => "abrupt".to_owned(),
            DisconnectKind::Eof => "eof".to_owned(),
            DisconnectKind::Error => "error".to_owned(),
        }
    }
}

/// Result of a run. Serializes to the JSON line the `loadgen` binary prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EchoReport {
    /// Protocol spoken.
    pub protocol: Option<Protocol>,
    /// Clients run.
    pub clients: usize,
    /// Messages sent (broadcasts excluded).
    pub sent: u64,
    /// Echoes received that matched a message sent and not yet echoed.
    pub received: u64,
    /// Messages never echoed: outstanding when their connection ended, or
    /// when the drain timeout passed.
    pub lost: u64,
    /// Echoes that arrived after an echo of a later message of the same
    /// connection.
    pub reordered: u64,
    /// Echoes of a message already echoed.
    pub duplicated: u64,
    /// Echoes of a message this connection never sent (another client's,
    /// or unparsable).
    pub unexpected: u64,
    /// Disconnects the clients did not ask for, by [`DisconnectKind::key`].
    pub disconnects: BTreeMap<String, u64>,
    /// Connection attempts that failed (TCP connect or handshake).
    pub connect_failures: u64,
    /// Connections established.
    pub connections_opened: u64,
    /// Time from the start until every client was connected at once, s
    /// (`None`: never).
    pub all_connected_secs: Option<f64>,
    /// Wall time until every client had finished.
    pub elapsed_secs: f64,
    /// `received / elapsed_secs`.
    pub messages_per_sec: f64,
    /// Echo latency percentiles (send to echo), µs, within 1 %.
    pub latency_p50_us: u64,
    /// 99th percentile echo latency, µs.
    pub latency_p99_us: u64,
    /// Largest echo latency, µs.
    pub latency_max_us: u64,
    /// Longest time between two consecutive echoes on one connection, µs.
    pub longest_gap_us: u64,
    /// When that gap ended, seconds since the start (to match it with, e.g.,
    /// a reload).
    pub longest_gap_at_secs: f64,
    /// For each second of the run, the longest gap between two echoes on one
    /// connection that ended in it, µs (0: none): the gaps around each
    /// reload. At most [`MAX_GAP_SECONDS`] entries; later gaps count in the
    /// last.
    pub gaps_by_second_us: Vec<u64>,
    /// Broadcast messages client 0 sent.
    pub broadcasts_sent: u64,
    /// Broadcast messages received, all clients together (ideally
    /// `broadcasts_sent * clients`).
    pub broadcasts_received: u64,
    /// Fan-out latency (broadcast sent to received by a client), µs.
    pub fanout_p50_us: u64,
    /// 99th percentile fan-out latency, µs.
    pub fanout_p99_us: u64,
    /// Largest fan-out latency, µs.
    pub fanout_max_us: u64,
    /// The open-files soft limit the run raised itself to.
    pub fd_limit: u64,
    /// CPU time (user + system) this whole process used during the run, s.
    pub cpu_secs: f64,
    /// `cpu_secs / elapsed_secs` in percent of one core.
    pub cpu_percent: f64,
    /// The first few errors (connect failures, disconnects) as text.
    pub first_errors: Vec<String>,
}

impl EchoReport {
    /// Total unasked-for disconnects, all kinds together.
    pub fn disconnected(&self) -> u64 {
        self.disconnects.values().sum()
    }
}

/// A snapshot of a run's counters ([`EchoRun::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Messages sent.
    pub sent: u64,
    /// Echoes received in order or reordered (not duplicates).
    pub received: u64,
    /// Clients whose current connection has had at least one echo.
    pub serving: usize,
    /// Clients connected now.
    pub connected: usize,
    /// Broadcasts client 0 sent.
    pub broadcasts_sent: u64,
}

/// A run in progress on its own thread and runtime; finish it with
/// [`EchoRun::stop`] or [`EchoRun::wait`]. Dropping it stops the run.
pub struct EchoRun {
    shared: Arc<Shared>,
    thread: RunThread<EchoReport>,
}

impl EchoRun {
    /// Raises the fd limit and starts the run; returns at once.
    ///
    /// # Panics
    ///
    /// If [`EchoConfig::validate`] fails or the thread cannot be spawned.
    pub fn start(config: EchoConfig) -> EchoRun {
        if let Err(e) = config.validate() {
            panic!("loadgen: invalid EchoConfig: {e:#}");
        }
        let fd_limit = raise_fd_limit();
        let shared = Arc::new(Shared::new(&config));
        let thread_shared = Arc::clone(&shared);
        let thread = RunThread::spawn("loadgen-echo", move |stop| async move {
            let mut report = run(Arc::new(config), thread_shared, stop).await;
            report.fd_limit = fd_limit;
            report
        });
        EchoRun { shared, thread }
    }

    /// Counters so far, for tests that wait on progress.
    pub fn progress(&self) -> Progress {
        Progress {
            sent: self.shared.sent.load(Ordering::Relaxed),
            received: self.shared.received.load(Ordering::Relaxed),
            serving: self.shared.serving.load(Ordering::Relaxed),
            connected: self.shared.connected.load(Ordering::Relaxed),
            broadcasts_sent: self.shared.broadcasts_sent.load(Ordering::Relaxed),
        }
    }

    /// Ends sending now; clients drain their outstanding echoes (bounded by
    /// the drain timeout) and close. Returns the report.
    pub fn stop(mut self) -> EchoReport {
        self.thread.stop()
    }

    /// Waits until the duration or the message cap ends the run.
    pub fn wait(mut self) -> EchoReport {
        self.thread.join()
    }

    /// True once the run has ended ([`EchoRun::wait`] returns at once).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

/// Raises `RLIMIT_NOFILE`'s soft limit to the hard limit; returns the soft
/// limit in force afterwards.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// User + system CPU time of this process so far.
fn process_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return Duration::ZERO;
    };
    let secs = |t: nix::sys::time::TimeVal| {
        Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) as u32) * 1000)
    };
    secs(usage.user_time()) + secs(usage.system_time())
}

// ---------------------------------------------------------------- checking

/// What one echo was, for one connection's [`Tracker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The echo of an outstanding message, after every earlier echo.
    InOrder,
    /// The echo of an outstanding message, after the echo of a later one.
    Reordered,
    /// The echo of a message already echoed.
    Duplicate,
    /// The echo of a message never sent on this connection.
    Unexpected,
}

/// One connection's bookkeeping: which sequence numbers are sent and not yet
/// echoed, and the highest echoed so far.
#[derive(Debug, Default)]
pub struct Tracker {
    first: u64,
    next: u64,
    outstanding: BTreeSet<u64>,
    highest: Option<u64>,
}

impl Tracker {
    /// A tracker whose first message is number `first`.
    pub fn starting_at(first: u64) -> Tracker {
        Tracker {
            first,
            next: first,
            ..Tracker::default()
        }
    }

    /// Takes the next sequence number for a message about to be sent.
    pub fn send(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.outstanding.insert(seq);
        seq
    }

    /// Classifies the echo of message `seq`.
    pub fn echo(&mut self, seq: u64) -> Verdict {
        if self.outstanding.remove(&seq) {
            let later_seen = self.highest.is_some_and(|h| h > seq);
            self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
            if later_seen {
                Verdict::Reordered
            } else {
                Verdict::InOrder
            }
        } else if (self.first..self.next).contains(&seq) {
            Verdict::Duplicate
        } else {
            Verdict::Unexpected
        }
    }

    /// Messages sent and not echoed yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// The number the next message will get.
    pub fn next(&self) -> u64 {
        self.next
    }
}

/// A message as the clients write it, parsed back from an echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// `C:S:T`: client, sequence, send time (µs since the run's start).
    Echo {
        /// Client number.
        client: u64,
        /// Sequence number on that client's connection.
        seq: u64,
        /// Send time, µs since the run's start.
        sent_us: u64,
    },
    /// `bT`: a broadcast sent at T µs since the run's start.
    Broadcast {
        /// Send time, µs since the run's start.
        sent_us: u64,
    },
    /// Anything else.
    Garbage,
}

impl Payload {
    /// Writes `self` (not [`Payload::Garbage`]) padded with `.` to `size`
    /// bytes, without a line end.
    pub fn encode(self, size: usize) -> String {
        let mut text = match self {
            Payload::Echo {
                client,
                seq,
                sent_us,
            } => format!("{client}:{seq}:{sent_us}"),
            Payload::Broadcast { sent_us } => format!("b{sent_us}"),
            Payload::Garbage => String::new(),
        };
        if text.len() < size {
            text.extend(std::iter::repeat_n('.', size - text.len()));
        }
        text
    }

    /// Parses a received message (trailing padding and line end ignored).
    pub fn parse(bytes: &[u8]) -> Payload {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return Payload::Garbage;
        };
        let text = text.trim_end_matches(['\n', '\r']).trim_end_matches('.');
        if let Some(sent) = text.strip_prefix('b') {
            return sent
                .parse()
                .map_or(Payload::Garbage, |sent_us| Payload::Broadcast { sent_us });
        }
        let mut parts = text.split(':').map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(client)), Some(Ok(seq)), Some(Ok(sent_us)), None) => Payload::Echo {
                client,
                seq,
                sent_us,
            },
            _ => Payload::Garbage,
        }
    }
}

// ---------------------------------------------------------------- shared state

/// Counters shared by the client tasks and the [`EchoRun`] handle.
#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    received: AtomicU64,
    /// Clients whose current connection has had an echo.
    serving: AtomicUsize,
    /// Clients connected now.
    connected: AtomicUsize,
    /// Bounds the connects in progress ([`EchoConfig::max_connecting`]).
    connecting: Permits,
    connections_opened: AtomicU64,
    connect_failures: AtomicU64,
    lost: AtomicU64,
    reordered: AtomicU64,
    duplicated: AtomicU64,
    unexpected: AtomicU64,
    broadcasts_sent: AtomicU64,
    broadcasts_received: AtomicU64,
    /// Set once client 0 sends no more broadcasts, so that the others know
    /// how many to wait for before closing.
    broadcasts_done: AtomicBool,
    /// Longest gap ending in each second, µs ([`EchoReport::gaps_by_second_us`]).
    gaps_by_second: Vec<AtomicU64>,
    samples: Mutex<Samples>,
}

/// A semaphore, with no permits by default.
struct Permits(Semaphore);

impl Default for Permits {
    fn default() -> Permits {
        Permits(Semaphore::new(0))
    }
}

#[derive(Default)]
struct Samples {
    /// When every client was connected at once, first.
    all_connected: Option<Duration>,
    latency_us: Histogram,
    fanout_us: Histogram,
    disconnects: BTreeMap<String, u64>,
    /// `(gap, when it ended)`, the longest over all connections.
    longest_gap: (Duration, Duration),
    first_errors: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Counters for a run of `config`, with a gap slot per second it can
    /// last (sending, then draining).
    fn new(config: &EchoConfig) -> Shared {
        let seconds = (config.duration + config.drain_timeout)
            .as_secs()
            .saturating_add(2)
            .min(MAX_GAP_SECONDS as u64);
        Shared {
            gaps_by_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            connecting: Permits(Semaphore::new(config.max_connecting)),
            ..Shared::default()
        }
    }

    fn error(&self, text: String) {
        let mut samples = lock(&self.samples);
        if samples.first_errors.len() < MAX_FIRST_ERRORS {
            samples.first_errors.push(text);
        }
    }
}

/// A client's latency samples and longest gap, added to [`Shared`] in
/// batches.
#[derive(Default)]
struct Local {
    latency_us: Vec<u64>,
    fanout_us: Vec<u64>,
    longest_gap: (Duration, Duration),
    /// `(second, gap µs)`: the longest gap this client has put into
    /// `Shared::gaps_by_second` for that second, so that only a longer one
    /// touches the shared slot again.
    second_gap: (usize, u64),
}

impl Local {
    /// Counts a gap of `gap` between two echoes that ended at `at` since the
    /// start.
    fn gap(&mut self, shared: &Shared, gap: Duration, at: Duration) {
        if gap > self.longest_gap.0 {
            self.longest_gap = (gap, at);
        }
        let Some(last) = shared.gaps_by_second.len().checked_sub(1) else {
            return;
        };
        let second = usize::try_from(at.as_secs()).map_or(last, |s| s.min(last));
        let micros = u64::try_from(gap.as_micros()).unwrap_or(u64::MAX);
        if self.second_gap.0 != second || micros > self.second_gap.1 {
            self.second_gap = (second, micros);
            shared.gaps_by_second[second].fetch_max(micros, Ordering::Relaxed);
        }
    }

    fn flush_if_full(&mut self, shared: &Shared) {
        if self.latency_us.len() + self.fanout_us.len() >= SAMPLE_BATCH {
            self.flush(shared);
        }
    }

    fn flush(&mut self, shared: &Shared) {
        let mut samples = lock(&shared.samples);
        for v in self.latency_us.drain(..) {
            samples.latency_us.record(v);
        }
        for v in self.fanout_us.drain(..) {
            samples.fanout_us.record(v);
        }
        if self.longest_gap.0 > samples.longest_gap.0 {
            samples.longest_gap = self.longest_gap;
        }
    }
}

// ---------------------------------------------------------------- run

async fn run(
    config: Arc<EchoConfig>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> EchoReport {
    let cpu_before = process_cpu();
    let start = Instant::now();
    let deadline = start
        .checked_add(config.duration)
        .unwrap_or_else(|| start + FAR_FUTURE);
    let mut tasks = JoinSet::new();
    for id in 0..config.clients {
        tasks.spawn(client(
            id,
            Arc::clone(&config),
            Arc::clone(&shared),
            stop.clone(),
            Clock { start, deadline },
        ));
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    let elapsed = start.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    report(&config, &shared, elapsed, cpu)
}

fn report(config: &EchoConfig, shared: &Shared, elapsed: Duration, cpu: Duration) -> EchoReport {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let samples = lock(&shared.samples);
    let elapsed_secs = elapsed.as_secs_f64();
    let per_sec = |n: f64| {
        if elapsed_secs > 0.0 {
            n / elapsed_secs
        } else {
            0.0
        }
    };
    let received = load(&shared.received);
    EchoReport {
        protocol: Some(config.protocol),
        clients: config.clients,
        sent: load(&shared.sent),
        received,
        lost: load(&shared.lost),
        reordered: load(&shared.reordered),
        duplicated: load(&shared.duplicated),
        unexpected: load(&shared.unexpected),
        disconnects: samples.disconnects.clone(),
        connect_failures: load(&shared.connect_failures),
        connections_opened: load(&shared.connections_opened),
        all_connected_secs: samples.all_connected.map(|d| d.as_secs_f64()),
        elapsed_secs,
        messages_per_sec: per_sec(received as f64),
        latency_p50_us: samples.latency_us.quantile(0.50),
        latency_p99_us: samples.latency_us.quantile(0.99),
        latency_max_us: samples.latency_us.quantile(1.0),
        longest_gap_us: u64::try_from(samples.longest_gap.0.as_micros()).unwrap_or(u64::MAX),
        longest_gap_at_secs: samples.longest_gap.1.as_secs_f64(),
        gaps_by_second_us: shared
            .gaps_by_second
            .iter()
            .take((elapsed.as_secs() as usize).saturating_add(1))
            .map(|slot| slot.load(Ordering::Relaxed))
            .collect(),
        broadcasts_sent: load(&shared.broadcasts_sent),
        broadcasts_received: load(&shared.broadcasts_received),
        fanout_p50_us: samples.fanout_us.quantile(0.50),
        fanout_p99_us: samples.fanout_us.quantile(0.99),
        fanout_max_us: samples.fanout_us.quantile(1.0),
        fd_limit: 0,
        cpu_secs: cpu.as_secs_f64(),
        cpu_percent: per_sec(cpu.as_secs_f64() * 100.0),
        first_errors: samples.first_errors.clone(),
    }
}

/// The run's time base: message times are µs since `start`.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    deadline: Instant,
}

impl Clock {
    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// One client: connect, exchange until sending ends, reconnect after an
/// unasked-for disconnect.
async fn client(
    id: usize,
    config: Arc<EchoConfig>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    clock: Clock,
) {
    let mut local = Local::default();
    let mut next_seq = 0;
    let mut budget = config.messages_per_client.unwrap_or(u64::MAX);
    loop {
        if stop_requested(&stop) || Instant::now() >= clock.deadline || budget == 0 {
            break;
        }
        let connected = {
            let _permit = shared.connecting.0.acquire().await;
            tokio::time::timeout(config.drain_timeout, connect(id, &config)).await
        };
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            failed => {
                let text = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => format!("no connection within {:?}", config.drain_timeout),
                };
                shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                shared.error(format!("client {id}: connect: {text}"));
                pause(&mut stop, clock.deadline).await;
                continue;
            }
        };
        shared.connections_opened.fetch_add(1, Ordering::Relaxed);
        if shared.connected.fetch_add(1, Ordering::Relaxed) + 1 == config.clients {
            let mut samples = lock(&shared.samples);
            if samples.all_connected.is_none() {
                samples.all_connected = Some(clock.start.elapsed());
            }
        }
        let mut tracker = Tracker::starting_at(next_seq);
        let mut exchange = Exchange {
            id: id as u64,
            config: &config,
            shared: &shared,
            clock,
            local: &mut local,
            tracker: &mut tracker,
            budget: &mut budget,
            serving: false,
        };
        let ended = exchange.run(&mut conn, &mut stop).await;
        // Answers a server's close frame, or closes our side.
        conn.close().await;
        shared.connected.fetch_sub(1, Ordering::Relaxed);
        if exchange.serving {
            shared.serving.fetch_sub(1, Ordering::Relaxed);
        }
        shared
            .lost
            .fetch_add(tracker.outstanding() as u64, Ordering::Relaxed);
        next_seq = tracker.next();
        match ended {
            None => break,
            Some(kind) => {
                lock(&shared.samples)
                    .disconnects
                    .entry(kind.key())
                    .and_modify(|n| *n += 1)
                    .or_insert(1);
                shared.error(format!(
                    "client {id}: disconnected ({}), {} outstanding",
                    kind.key(),
                    tracker.outstanding()
                ));
                pause(&mut stop, clock.deadline).await;
            }
        }
    }
    local.flush(&shared);
}

async fn pause(stop: &mut watch::Receiver<bool>, deadline: Instant) {
    tokio::select! {
        _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
        _ = tokio::time::sleep_until(deadline) => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

/// One connection's exchange, borrowing its client's state.
struct Exchange<'a> {
    id: u64,
    config: &'a EchoConfig,
    shared: &'a Shared,
    clock: Clock,
    local: &'a mut Local,
    tracker: &'a mut Tracker,
    budget: &'a mut u64,
    /// This connection has had an echo (and counts in `Shared::serving`).
    serving: bool,
}

impl Exchange<'_> {
    /// Sends and checks until sending ended and the echoes are in (or the
    /// drain timeout passed). Returns the disconnect, if the server ended the
    /// connection first.
    async fn run(
        &mut self,
        conn: &mut Connection,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<DisconnectKind> {
        let config = self.config;
        let mut sending = true;
        let mut drain_until = None;
        let mut broadcasts_seen = 0;
        let mut last_echo: Option<Instant> = None;
        let mut rate = match config.pace {
            Pace::Rate(rate) => {
                let period = Duration::from_secs_f64(1.0 / rate);
                let phase = period.mul_f64(self.id as f64 / config.clients as f64);
                let mut ticker = tokio::time::interval_at(Instant::now() + phase, period);
                ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                Some(ticker)
            }
            Pace::Window(_) | Pace::Idle => None,
        };
        let mut broadcast = match config.broadcast_every {
            Some(every) if self.id == 0 => {
                let mut ticker = tokio::time::interval(every);
                ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                Some(ticker)
            }
            _ => None,
        };
        loop {
            if sending
                && (stop_requested(stop)
                    || Instant::now() >= self.clock.deadline
                    || *self.budget == 0)
            {
                sending = false;
                if broadcast.is_some() {
                    self.shared.broadcasts_done.store(true, Ordering::Relaxed);
                }
            }
            if sending {
                if let Pace::Window(window) = config.pace {
                    let mut wrote = false;
                    while self.tracker.outstanding() < window && *self.budget > 0 {
                        if let Err(kind) = self.send_one(conn).await {
                            return Some(kind);
                        }
                        wrote = true;
                    }
                    if wrote {
                        if let Err(kind) = conn.flush().await {
                            return Some(kind);
                        }
                    }
                }
            } else {
                if self.tracker.outstanding() == 0 && self.broadcasts_in(broadcasts_seen) {
                    break;
                }
                let until = *drain_until.get_or_insert(Instant::now() + config.drain_timeout);
                if Instant::now() >= until {
                    break;
                }
            }
            let drain_deadline = drain_until.unwrap_or(self.clock.deadline + FAR_FUTURE);
            tokio::select! {
                incoming = conn.recv() => {
                    // Everything already readable is checked before the
                    // window is topped up, so that the top-up is one write.
                    let mut incoming = Some(incoming);
                    while let Some(message) = incoming {
                        match message {
                            Ok(bytes) => {
                                if self.check(&bytes, &mut last_echo) {
                                    broadcasts_seen += 1;
                                }
                            }
                            Err(kind) => return Some(kind),
                        }
                        incoming = conn.recv().now_or_never();
                    }
                }
                _ = tick(&mut rate), if sending => {
                    if let Err(kind) = self.send_one(conn).await {
                        return Some(kind);
                    }
                    if let Err(kind) = conn.flush().await {
                        return Some(kind);
                    }
                }
                _ = tick(&mut broadcast), if sending && self.everyone_served() => {
                    let message = Payload::Broadcast { sent_us: self.clock.now_us() }.encode(config.payload);
                    if let Err(kind) = conn.send(&message).await {
                        return Some(kind);
                    }
                    if let Err(kind) = conn.flush().await {
                        return Some(kind);
                    }
                    self.shared.broadcasts_sent.fetch_add(1, Ordering::Relaxed);
                }
                _ = tokio::time::sleep_until(self.clock.deadline), if sending => {}
                _ = stop.changed(), if sending => {}
                _ = tokio::time::sleep_until(drain_deadline), if !sending => {}
                _ = tokio::time::sleep(BROADCAST_DRAIN_POLL), if !sending && config.broadcast_every.is_some() => {}
            }
        }
        if broadcast.is_some() {
            self.shared.broadcasts_done.store(true, Ordering::Relaxed);
        }
        None
    }

    /// True when no broadcast can still be on its way to this connection,
    /// which has received `seen`.
    fn broadcasts_in(&self, seen: u64) -> bool {
        self.config.broadcast_every.is_none()
            || (self.shared.broadcasts_done.load(Ordering::Relaxed)
                && seen >= self.shared.broadcasts_sent.load(Ordering::Relaxed))
    }

    fn everyone_served(&self) -> bool {
        self.shared.serving.load(Ordering::Relaxed) >= self.config.clients
    }

    async fn send_one(&mut self, conn: &mut Connection) -> Result<(), DisconnectKind> {
        let seq = self.tracker.send();
        *self.budget -= 1;
        let message = Payload::Echo {
            client: self.id,
            seq,
            sent_us: self.clock.now_us(),
        }
        .encode(self.config.payload);
        conn.send(&message).await?;
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Checks and counts one incoming message; true if it was a broadcast.
    fn check(&mut self, bytes: &[u8], last_echo: &mut Option<Instant>) -> bool {
        let shared = self.shared;
        match Payload::parse(bytes) {
            Payload::Echo {
                client,
                seq,
                sent_us,
            } if client == self.id => {
                let counter = match self.tracker.echo(seq) {
                    Verdict::InOrder => None,
                    Verdict::Reordered => Some(&shared.reordered),
                    Verdict::Duplicate => {
                        shared.duplicated.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    Verdict::Unexpected => {
                        shared.unexpected.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                };
                if let Some(counter) = counter {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                let now = Instant::now();
                if let Some(last) = last_echo.replace(now) {
                    self.local.gap(shared, now - last, now - self.clock.start);
                }
                self.local
                    .latency_us
                    .push(self.clock.now_us().saturating_sub(sent_us));
                self.local.flush_if_full(shared);
                if !self.serving {
                    self.serving = true;
                    shared.serving.fetch_add(1, Ordering::Relaxed);
                }
                shared.received.fetch_add(1, Ordering::Relaxed);
                false
            }
            Payload::Broadcast { sent_us } => {
                self.local
                    .fanout_us
                    .push(self.clock.now_us().saturating_sub(sent_us));
                self.local.flush_if_full(shared);
                shared.broadcasts_received.fetch_add(1, Ordering::Relaxed);
                true
            }
            Payload::Echo { .. } | Payload::Garbage => {
                shared.unexpected.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// The next tick of an optional ticker; never, without one.
async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------- transport

/// One client connection, either protocol.
enum Connection {
    WebSocket(Box<WebSocketStream<TcpStream>>),
    Text {
        reader: BufReader<OwnedReadHalf>,
        writer: BufWriter<OwnedWriteHalf>,
        /// Kept across calls: `read_until` appends what a cancelled call
        /// read, so `recv` is cancel-safe.
        line: Vec<u8>,
    },
}

async fn connect(id: usize, config: &EchoConfig) -> anyhow::Result<Connection> {
    let socket = if config.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .context("socket")?;
    if !config.sources.is_empty() {
        let source = config.sources[id % config.sources.len()];
        // Let `connect` pick the port, for the whole address pair: a bind to
        // port 0 would pick one unused by any socket of that address, a
        // search that grows with the connections (and TIME_WAITs) there and
        // runs out at the ephemeral range.
        #[cfg(target_os = "linux")]
        if source.is_ipv4() {
            use std::os::fd::AsFd as _;
            let _ = nix::sys::socket::setsockopt(
                &socket.as_fd(),
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            );
        }
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("bind {source}"))?;
    }
    let stream = socket
        .connect(config.addr)
        .await
        .with_context(|| format!("connect {}", config.addr))?;
    let _ = stream.set_nodelay(true);
    Ok(match config.protocol {
        Protocol::WebSocket => {
            let url = format!("ws://{}{}", config.addr, config.path);
            let ws_config = WebSocketConfig::default()
                .max_message_size(Some(MAX_INCOMING))
                .max_frame_size(Some(MAX_INCOMING))
                // tungstenite's 128 KiB default would cost ~80 KiB per
                // connection: too much for tens of thousands of clients.
                .read_buffer_size(4 << 10);
            let (ws, _response) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config))
                    .await
                    .context("WebSocket handshake")?;
            Connection::WebSocket(Box::new(ws))
        }
        Protocol::Text => {
            let (reader, writer) = stream.into_split();
            Connection::Text {
                reader: BufReader::new(reader),
                writer: BufWriter::new(writer),
                line: Vec::new(),
            }
        }
    })
}

impl Connection {
    /// The next message (text: without its line end). Cancel-safe.
    async fn recv(&mut self) -> Result<Vec<u8>, DisconnectKind> {
        match self {
            Connection::WebSocket(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => return Ok(text.as_bytes().to_vec()),
                    Some(Ok(Message::Binary(bytes))) => return Ok(bytes.to_vec()),
                    Some(Ok(Message::Close(frame))) => {
                        return Err(DisconnectKind::Close(frame.map(|f| u16::from(f.code))))
                    }
                    // Pings are answered by tungstenite with the next write.
                    Some(Ok(_)) => {}
                    Some(Err(tokio_tungstenite::tungstenite::Error::Io(_)))
                    | Some(Err(tokio_tungstenite::tungstenite::Error::Protocol(
                        tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    )))
                    | None => return Err(DisconnectKind::Abrupt),
                    Some(Err(_)) => return Err(DisconnectKind::Error),
                }
            },
            Connection::Text { reader, line, .. } => loop {
                let limited = line.len() > MAX_INCOMING;
                match reader.read_until(b'\n', line).await {
                    _ if limited => return Err(DisconnectKind::Error),
                    Ok(0) => return Err(DisconnectKind::Eof),
                    Err(_) => return Err(DisconnectKind::Abrupt),
                    Ok(_) if line.ends_with(b"\n") => {
                        line.pop();
                        return Ok(std::mem::take(line));
                    }
                    // End of stream within a line: the next read says so.
                    Ok(_) => {}
                }
            },
        }
    }

    /// Queues one message; [`Connection::flush`] sends what is queued.
    async fn send(&mut self, message: &str) -> Result<(), DisconnectKind> {
        let sent = match self {
            Connection::WebSocket(ws) => ws.feed(Message::text(message)).await.is_ok(),
            Connection::Text { writer, .. } => {
                writer.write_all(message.as_bytes()).await.is_ok()
                    && writer.write_all(b"\n").await.is_ok()
            }
        };
        sent.then_some(()).ok_or(DisconnectKind::Abrupt)
    }

    async fn flush(&mut self) -> Result<(), DisconnectKind> {
        let flushed = match self {
            Connection::WebSocket(ws) => ws.flush().await.is_ok(),
            Connection::Text { writer, .. } => writer.flush().await.is_ok(),
        };
        flushed.then_some(()).ok_or(DisconnectKind::Abrupt)
    }

    /// Closes politely (bounded): WebSocket close 1000 and its reply; text:
    /// end of the write side.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            match self {
                Connection::WebSocket(ws) => {
                    let frame = CloseFrame {
                        code: CloseCode::Normal,
                        reason: "done".into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                    while let Some(Ok(_)) = ws.next().await {}
                }
                Connection::Text { writer, .. } => {
                    let _ = writer.shutdown().await;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_tells_in_order_reordered_duplicate_and_unexpected() {
        let mut t = Tracker::starting_at(10);
        let seqs: Vec<u64> = (0..4).map(|_| t.send()).collect();
        assert_eq!(seqs, [10, 11, 12, 13]);
        assert_eq!(t.echo(10), Verdict::InOrder);
        assert_eq!(t.echo(12), Verdict::InOrder);
        assert_eq!(t.echo(11), Verdict::Reordered);
        assert_eq!(t.echo(12), Verdict::Duplicate);
        assert_eq!(t.echo(99), Verdict::Unexpected);
        assert_eq!(t.echo(3), Verdict::Unexpected);
        assert_eq!(t.outstanding(), 1, "13 is still out");
        assert_eq!(t.next(), 14);
    }

    #[test]
    fn payloads_round_trip_with_padding_and_line_ends() {
        let echo = Payload::Echo {
            client: 7,
            seq: 42,
            sent_us: 123_456,
        };
        let text = echo.encode(32);
        assert_eq!(text.len(), 32);
        assert_eq!(Payload::parse(text.as_bytes()), echo);
        assert_eq!(Payload::parse(format!("{text}\n").as_bytes()), echo);
        assert_eq!(
            Payload::parse(b"7:42:9"),
            Payload::Echo {
                client: 7,
                seq: 42,
                sent_us: 9
            }
        );
        let broadcast = Payload::Broadcast { sent_us: 5 };
        assert_eq!(Payload::parse(broadcast.encode(4).as_bytes()), broadcast);
        assert_eq!(Payload::parse(b"b5..."), broadcast);
        for garbage in [&b"hello"[..], b"1:2", b"1:2:3:4", b"\xff", b"bx"] {
            assert_eq!(Payload::parse(garbage), Payload::Garbage, "{garbage:?}");
        }
    }

    #[test]
    fn gaps_are_kept_per_second_and_the_longest_overall() {
        let mut config = EchoConfig::new("127.0.0.1:1".parse().unwrap(), Protocol::Text);
        config.duration = Duration::from_secs(3);
        config.drain_timeout = Duration::from_secs(1);
        let shared = Shared::new(&config);
        assert_eq!(shared.gaps_by_second.len(), 6);
        let (mut a, mut b) = (Local::default(), Local::default());
        let ms = Duration::from_millis;
        a.gap(&shared, ms(50), ms(200));
        b.gap(&shared, ms(70), ms(900));
        a.gap(&shared, ms(60), ms(950));
        a.gap(&shared, ms(20), ms(2100));
        b.gap(&shared, ms(90), Duration::from_secs(99));
        let seconds: Vec<u64> = shared
            .gaps_by_second
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        assert_eq!(seconds, [70_000, 0, 20_000, 0, 0, 90_000]);
        assert_eq!(a.longest_gap, (ms(60), ms(950)));
        assert_eq!(b.longest_gap, (ms(90), Duration::from_secs(99)));
    }

    #[test]
    fn disconnect_keys_name_the_close_code() {
        assert_eq!(DisconnectKind::Close(Some(1013)).key(), "close 1013");
        assert_eq!(DisconnectKind::Close(None).key(), "close (no code)");
        assert_eq!(DisconnectKind::Abrupt.key(), "abrupt");
    }

    #[test]
    fn configs_outside_loopback_or_without_pace_are_rejected() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(EchoConfig::new(addr, Protocol::Text).validate().is_ok());
        let mut c = EchoConfig::new("10.0.0.1:1".parse().unwrap(), Protocol::WebSocket);
        assert!(c.validate().is_err());
        c = EchoConfig::new(addr, Protocol::WebSocket);
        c.sources = vec!["127.0.0.2".parse().unwrap()];
        assert!(c.validate().is_ok());
        c.sources = vec!["192.168.1.1".parse().unwrap()];
        assert!(c.validate().is_err());
        c = EchoConfig::new(addr, Protocol::WebSocket);
        c.pace = Pace::Window(0);
        assert!(c.validate().is_err());
        c.pace = Pace::Rate(0.0);
        assert!(c.validate().is_err());
        c = EchoConfig::new(addr, Protocol::WebSocket);
        c.clients = 0;
        assert!(c.validate().is_err());
    }
}
