//! Keep-alive HTTP/1.1 load client that counts every failure; [`echo`] is
//! its counterpart for long-lived connections (WebSocket and text), checking
//! every echoed message.
//!
//! `loadgen` exists to prove claims such as "zero failed requests during a
//! reload" and to produce benchmark numbers. Both uses need the same property:
//! **every request that did not end in a complete 2xx response is counted as a
//! failure, by kind, and nothing is hidden.**
//!
//! # Design
//!
//! * [`LoadRun::start`] spawns one dedicated OS thread that owns a tokio
//!   multi-thread runtime with 2 worker threads, so the client works from plain
//!   `#[test]` functions and from inside other runtimes without sharing their
//!   scheduler.
//! * The runtime runs [`LoadConfig::connections`] connection tasks. Each task
//!   owns at most one HTTP/1.1 connection, built with hyper's low-level client
//!   (`hyper::client::conn::http1::handshake` over a `TcpStream` with
//!   `TCP_NODELAY`), and sends requests back to back on it: ensure connected,
//!   wait until the connection is ready, send one `GET`, read the whole body,
//!   classify the outcome, repeat.
//! * **No retries, ever.** A retry would turn a server-side failure (for
//!   example a worker closing a keep-alive connection while a request is on the
//!   wire) into a success, which is exactly the bug the reload tests must see.
//!   Every attempt is classified once and then forgotten.
//! * The run is bounded: no request starts after [`LoadConfig::duration`] has
//!   elapsed, after [`LoadRun::stop`] was called, or once
//!   [`LoadConfig::max_requests`] attempts have been made; every attempt is
//!   bounded by [`LoadConfig::request_timeout`]. Memory is bounded too: fixed
//!   counters, a log-bucketed latency histogram, at most 32 distinct body keys
//!   and at most 10 error texts.
//!
//! # What counts as a failure
//!
//! | kind | meaning |
//! | --- | --- |
//! | [`FailureKind::Connect`] | TCP connect (or the HTTP/1 handshake) failed; the task pauses 10 ms before the next attempt |
//! | [`FailureKind::Send`] | the request was handed to a connection but no response came back (connection closed or reset, any hyper error from `send_request`, including "connection closed before message completed" for a request hyper had not fully written) |
//! | [`FailureKind::Status`] | a response arrived with a non-2xx status |
//! | [`FailureKind::Body`] | a 2xx response arrived but reading its body failed |
//! | [`FailureKind::Timeout`] | connect + send + full response took longer than [`LoadConfig::request_timeout`] |
//!
//! What is **not** a failure: a connection that the server closed cleanly
//! *between* requests (after a response carrying `Connection: close`, or an
//! idle keep-alive connection whose `SendRequest::ready()` reports it closed
//! before anything was sent on it). The task simply opens a new connection for
//! its next request. In both cases no request was lost, so nothing is hidden.

pub mod echo;
mod histogram;
mod run_thread;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue, CONNECTION, HOST};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::histogram::Histogram;
use crate::run_thread::{stop_requested, RunThread};

/// Maximum number of distinct response bodies kept in [`LoadReport::bodies`].
pub const MAX_BODY_KEYS: usize = 32;
/// Response bodies are truncated to this many characters before counting.
pub const BODY_KEY_CHARS: usize = 64;
/// Key in [`LoadReport::bodies`] under which bodies beyond the first
/// [`MAX_BODY_KEYS`] distinct ones are counted.
pub const OTHER_BODY_KEY: &str = "<other>";
/// Maximum number of entries in [`LoadReport::first_errors`].
pub const MAX_FIRST_ERRORS: usize = 10;
/// Pause after a failed connect, so that a refused port does not spin.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Stand-in for "no deadline" when `duration` is too large to add to now.
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What to load, how hard and for how long. Build it with [`LoadConfig::new`]
/// and adjust the public fields.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Server to send requests to. The `Host` header is this address.
    pub addr: SocketAddr,
    /// Number of concurrent connections; each sends requests back to back.
    pub connections: usize,
    /// Request target in origin form, e.g. `/` or `/status?x=1`. Every request
    /// is a `GET` of this path.
    pub path: String,
    /// No request starts after this much time has passed since the start.
    /// Requests already in flight then still complete (bounded by
    /// `request_timeout`) and are counted.
    pub duration: Duration,
    /// Optional cap on the total number of attempts across all connections
    /// (every attempt counts, including failed connects).
    pub max_requests: Option<u64>,
    /// `true`: reuse connections. `false`: send `Connection: close` and use a
    /// new TCP connection for every request.
    pub keep_alive: bool,
    /// Bound on one attempt: connect (if needed) + send + full response.
    /// Exceeding it is a [`FailureKind::Timeout`] failure.
    pub request_timeout: Duration,
}

impl LoadConfig {
    /// Config for `addr` with the defaults: 32 connections, path `/`, 10 s
    /// duration, no request cap, keep-alive on, 10 s request timeout.
    pub fn new(addr: SocketAddr) -> Self {
        LoadConfig {
            addr,
            connections: 32,
            path: "/".to_owned(),
            duration: Duration::from_secs(10),
            max_requests: None,
            keep_alive: true,
            request_timeout: Duration::from_secs(10),
        }
    }

    /// Checks that the config can be run: at least one connection and a path
    /// in origin form (starting with `/`). [`LoadRun::start`] panics on the
    /// same conditions; call this first to get an error instead.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.target_uri().map(|_| ())?;
        anyhow::ensure!(self.connections > 0, "connections must be at least 1");
        Ok(())
    }

    fn target_uri(&self) -> anyhow::Result<Uri> {
        anyhow::ensure!(
            self.path.starts_with('/'),
            "path must start with '/' (got {:?})",
            self.path
        );
        self.path
            .parse::<Uri>()
            .map_err(|e| anyhow::anyhow!("invalid path {:?}: {e}", self.path))
    }
}

/// Why one request attempt failed. Every failed attempt is counted under
/// exactly one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FailureKind {
    /// TCP connect or the HTTP/1 handshake failed.
    Connect,
    /// The request was handed to a connection, but the connection was closed
    /// or reset (or hyper reported any other error) before a response arrived.
    Send,
    /// A response arrived, but its status was not 2xx.
    Status,
    /// A 2xx response arrived, but reading its body failed.
    Body,
    /// The attempt did not complete within the request timeout.
    Timeout,
}

impl FailureKind {
    /// Every kind, in counter order.
    const ALL: [FailureKind; 5] = [
        FailureKind::Connect,
        FailureKind::Send,
        FailureKind::Status,
        FailureKind::Body,
        FailureKind::Timeout,
    ];
}

/// Result of a run: successes, failures by kind, and latency/throughput
/// figures. Serializes to the JSON line that the `loadgen` binary prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Number of 2xx responses whose body was read completely.
    pub ok: u64,
    /// Failed attempts per kind; kinds that never occurred are absent.
    pub failures: BTreeMap<FailureKind, u64>,
    /// Count per distinct body of 2xx responses (lossy UTF-8, truncated to
    /// [`BODY_KEY_CHARS`] characters). At most [`MAX_BODY_KEYS`] distinct
    /// bodies get their own key; later distinct bodies are counted under
    /// [`OTHER_BODY_KEY`].
    pub bodies: BTreeMap<String, u64>,
    /// Number of TCP connections successfully opened.
    pub connections_opened: u64,
    /// Wall time from start until every connection task had finished.
    pub elapsed_secs: f64,
    /// `ok / elapsed_secs`.
    pub requests_per_sec: f64,
    /// Median latency of ok requests (connect if needed + send + full body),
    /// in microseconds, within 1 % (log-bucketed histogram).
    pub latency_p50_us: u64,
    /// 99th percentile latency of ok requests, in microseconds, within 1 %.
    pub latency_p99_us: u64,
    /// The first [`MAX_FIRST_ERRORS`] failures as `"Kind: error text"`.
    pub first_errors: Vec<String>,
}

impl LoadReport {
    /// Total number of failed attempts, all kinds together.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// A load run in progress on its own background thread and runtime.
///
/// Created by [`LoadRun::start`]; finished by [`LoadRun::stop`] or
/// [`LoadRun::wait`]. Dropping it without either stops the run and waits for
/// the thread, so no load outlives its owner.
pub struct LoadRun {
    shared: Arc<Shared>,
    thread: RunThread<LoadReport>,
}

impl LoadRun {
    /// Starts the load on a dedicated OS thread running a tokio multi-thread
    /// runtime with 2 worker threads, and returns at once.
    ///
    /// # Panics
    ///
    /// If [`LoadConfig::validate`] fails or the thread cannot be spawned.
    pub fn start(config: LoadConfig) -> LoadRun {
        if let Err(e) = config.validate() {
            panic!("loadgen: invalid LoadConfig: {e:#}");
        }
        let settings = Arc::new(Settings::new(config));
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = RunThread::spawn("loadgen", move |stop| run(settings, thread_shared, stop));
        LoadRun { shared, thread }
    }

    /// Counters so far as `(ok, failed)`, without stopping the run. Meant for
    /// tests that wait until load is flowing before acting.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.ok.load(Ordering::Relaxed),
            self.shared.failed_total(),
        )
    }

    /// Asks every connection to stop after its current request, waits for the
    /// run to end and returns the report. Requests in flight complete (bounded
    /// by the request timeout) and are counted normally. Blocks the calling
    /// thread.
    pub fn stop(mut self) -> LoadReport {
        self.thread.stop()
    }

    /// Waits until the duration or `max_requests` ends the run and returns the
    /// report. Blocks the calling thread.
    pub fn wait(mut self) -> LoadReport {
        self.thread.join()
    }
}

/// Immutable per-run settings shared by all connection tasks.
struct Settings {
    config: LoadConfig,
    uri: Uri,
    host: HeaderValue,
}

impl Settings {
    fn new(config: LoadConfig) -> Self {
        let uri = config.target_uri().expect("validated path");
        let host = HeaderValue::from_str(&config.addr.to_string())
            .expect("a socket address is a valid header value");
        Settings { config, uri, host }
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self.uri.clone();
        req.headers_mut().insert(HOST, self.host.clone());
        if !self.config.keep_alive {
            req.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        req
    }
}

/// Counters shared by all connection tasks and the [`LoadRun`] handle.
#[derive(Default)]
struct Shared {
    ok: AtomicU64,
    failures: [AtomicU64; FailureKind::ALL.len()],
    connections_opened: AtomicU64,
    /// Attempts started, for `max_requests`.
    attempts: AtomicU64,
    samples: Mutex<Samples>,
    first_errors: Mutex<Vec<String>>,
}

/// Per-ok-request data that needs more than a counter.
#[derive(Default)]
struct Samples {
    latency_us: Histogram,
    bodies: BTreeMap<String, u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn failed_total(&self) -> u64 {
        self.failures
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn record_ok(&self, latency: Duration, body: &Bytes) {
        let text = String::from_utf8_lossy(body);
        let key = match text.char_indices().nth(BODY_KEY_CHARS) {
            Some((end, _)) => &text[..end],
            None => &text[..],
        };
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        {
            let mut samples = lock(&self.samples);
            samples.latency_us.record(latency_us);
            count_body(&mut samples.bodies, key);
        }
        // Counted last so that `progress()` never reports an ok whose sample
        // is missing.
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    fn record_failure(&self, kind: FailureKind, text: &str) {
        {
            let mut errors = lock(&self.first_errors);
            if errors.len() < MAX_FIRST_ERRORS {
                errors.push(format!("{kind:?}: {text}"));
            }
        }
        self.failures[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self, elapsed: Duration) -> LoadReport {
        let ok = self.ok.load(Ordering::Relaxed);
        let failures = FailureKind::ALL
            .iter()
            .map(|&k| (k, self.failures[k as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        let samples = lock(&self.samples);
        let elapsed_secs = elapsed.as_secs_f64();
        LoadReport {
            ok,
            failures,
            bodies: samples.bodies.clone(),
            connections_opened: self.connections_opened.load(Ordering::Relaxed),
            elapsed_secs,
            requests_per_sec: if elapsed_secs > 0.0 {
                ok as f64 / elapsed_secs
            } else {
                0.0
            },
            latency_p50_us: samples.latency_us.quantile(0.50),
            latency_p99_us: samples.latency_us.quantile(0.99),
            first_errors: lock(&self.first_errors).clone(),
        }
    }
}

/// Counts `key` in `bodies`, keeping at most [`MAX_BODY_KEYS`] distinct keys
/// besides [`OTHER_BODY_KEY`].
fn count_body(bodies: &mut BTreeMap<String, u64>, key: &str) {
    if let Some(n) = bodies.get_mut(key) {
        *n += 1;
        return;
    }
    let distinct = bodies.len() - usize::from(bodies.contains_key(OTHER_BODY_KEY));
    let key = if distinct < MAX_BODY_KEYS {
        key
    } else {
        OTHER_BODY_KEY
    };
    *bodies.entry(key.to_owned()).or_insert(0) += 1;
}

/// Runs all connection tasks to completion and builds the report.
async fn run(
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> LoadReport {
    let start = Instant::now();
    let deadline = start
        .checked_add(settings.config.duration)
        .unwrap_or_else(|| start + FAR_FUTURE);
    let mut tasks = JoinSet::new();
    for _ in 0..settings.config.connections {
        tasks.spawn(connection_task(
            Arc::clone(&settings),
            Arc::clone(&shared),
            stop.clone(),
            deadline,
        ));
    }
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    shared.report(start.elapsed())
}

/// One connection's loop: one attempt at a time until stopped, out of time or
/// out of the request budget.
async fn connection_task(
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    deadline: Instant,
) {
    let config = &settings.config;
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    loop {
        if stop_requested(&stop) || Instant::now() >= deadline {
            break;
        }
        if let Some(max) = config.max_requests {
            if shared.attempts.fetch_add(1, Ordering::Relaxed) >= max {
                break;
            }
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            config.request_timeout,
            attempt(&settings, &shared, &mut sender),
        )
        .await
        .unwrap_or_else(|_| {
            // The connection may hold a half-finished exchange: never reuse it.
            sender = None;
            Err((
                FailureKind::Timeout,
                format!("no complete response within {:?}", config.request_timeout),
            ))
        });
        match outcome {
            Ok(body) => shared.record_ok(started.elapsed(), &body),
            Err((kind, text)) => {
                shared.record_failure(kind, &text);
                if kind == FailureKind::Connect {
                    tokio::select! {
                        _ = tokio::time::sleep(CONNECT_RETRY_PAUSE) => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = stop.wait_for(|stopped| *stopped) => {}
                    }
                }
            }
        }
    }
}

type Failure = (FailureKind, String);

/// One request attempt, never retried. Returns the body of a 2xx response.
async fn attempt(
    settings: &Settings,
    shared: &Shared,
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
) -> Result<Bytes, Failure> {
    // An idle connection that the server closed since the previous response
    // is replaced; nothing was sent on it, so this is not a failure.
    if let Some(idle) = sender.as_mut() {
        if idle.is_closed() || idle.ready().await.is_err() {
            *sender = None;
        }
    }
    // A fresh connection is not polled for readiness: hyper buffers the first
    // request, and if the server closes the connection before answering, that
    // surfaces below as a `Send` failure rather than being skipped.
    let conn = match sender {
        Some(conn) => conn,
        None => sender.insert(connect(settings, shared).await?),
    };

    let response = match conn.send_request(settings.request()).await {
        Ok(response) => response,
        Err(e) => {
            *sender = None;
            return Err((FailureKind::Send, describe(&e)));
        }
    };
    let status = response.status();
    let server_closes = wants_close(response.headers());
    let body = response.into_body().collect().await;
    if server_closes || !settings.config.keep_alive || body.is_err() {
        // The next attempt opens a new connection.
        *sender = None;
    }
    if !status.is_success() {
        return Err((FailureKind::Status, format!("status {status}")));
    }
    match body {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err((FailureKind::Body, describe(&e))),
    }
}

/// Opens a TCP connection with `TCP_NODELAY` and starts an HTTP/1 client
/// connection on it.
async fn connect(
    settings: &Settings,
    shared: &Shared,
) -> Result<SendRequest<Empty<Bytes>>, Failure> {
    let addr = settings.config.addr;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| (FailureKind::Connect, format!("connect {addr}: {e}")))?;
    shared.connections_opened.fetch_add(1, Ordering::Relaxed);
    // Only a latency hint; a socket that rejects it still works.
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| (FailureKind::Connect, format!("handshake: {}", describe(&e))))?;
    // Errors of the connection itself reach the request that was in flight
    // through `send_request` or the body, where they are counted.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// True if the `Connection` header contains the `close` token.
fn wants_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// An error's text followed by its chain of sources.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_keys_are_capped() {
        let mut bodies = BTreeMap::new();
        for i in 0..MAX_BODY_KEYS + 5 {
            count_body(&mut bodies, &format!("body-{i}"));
        }
        count_body(&mut bodies, "body-0");
        count_body(&mut bodies, "body-40");
        assert_eq!(bodies.len(), MAX_BODY_KEYS + 1);
        assert_eq!(bodies["body-0"], 2);
        assert_eq!(bodies[OTHER_BODY_KEY], 6);
        assert_eq!(bodies.values().sum::<u64>(), MAX_BODY_KEYS as u64 + 7);
    }

    #[test]
    fn ok_bodies_are_truncated_to_64_chars() {
        let shared = Shared::default();
        let long = "é".repeat(100);
        shared.record_ok(Duration::from_micros(5), &Bytes::from(long));
        shared.record_ok(Duration::from_micros(7), &Bytes::from_static(b"\xffhi"));
        let report = shared.report(Duration::from_secs(1));
        assert_eq!(report.ok, 2);
        assert!(report.bodies.contains_key(&"é".repeat(64)));
        assert!(report.bodies.contains_key("\u{fffd}hi"));
        assert_eq!(report.latency_p50_us, 5);
        assert_eq!(report.latency_p99_us, 7);
    }

    #[test]
    fn first_errors_are_capped_and_failures_summed() {
        let shared = Shared::default();
        for i in 0..25 {
            let kind = FailureKind::ALL[i % FailureKind::ALL.len()];
            shared.record_failure(kind, &format!("error {i}"));
        }
        let report = shared.report(Duration::from_secs(1));
        assert_eq!(report.failed(), 25);
        assert_eq!(report.failures.len(), 5);
        assert_eq!(report.failures[&FailureKind::Send], 5);
        assert_eq!(report.first_errors.len(), MAX_FIRST_ERRORS);
        assert_eq!(report.first_errors[1], "Send: error 1");
    }

    #[test]
    fn connection_close_token_is_detected() {
        let mut headers = HeaderMap::new();
        assert!(!wants_close(&headers));
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!wants_close(&headers));
        headers.append(CONNECTION, HeaderValue::from_static("Upgrade, Close"));
        assert!(wants_close(&headers));
    }

    #[test]
    fn report_serializes_failure_kinds_as_keys() {
        let mut report = LoadReport::default();
        report.failures.insert(FailureKind::Send, 3);
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains(r#""failures":{"Send":3}"#), "{json}");
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(LoadConfig::new(addr).validate().is_ok());
        let mut c = LoadConfig::new(addr);
        c.path = "no-slash".into();
        assert!(c.validate().is_err());
        let mut c = LoadConfig::new(addr);
        c.connections = 0;
        assert!(c.validate().is_err());
    }
}
