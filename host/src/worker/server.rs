//! The worker's HTTP/1.1 server: accept, translate requests across the
//! handler ABI, and retire gracefully.
//!
//! Retiring (drain) happens in three steps, so that no client sees an error:
//! 1. stop accepting: the shared listening socket keeps queueing new
//!    connections for the other workers;
//! 2. lame duck: every response still sent carries `Connection: close`, so
//!    busy keep-alive clients move to another worker on their own after one
//!    more answer; idle ones get the lame-duck period to send a last request;
//! 3. close what is left gracefully (hyper finishes in-flight requests first).
//!
//! The worker exits as soon as its last connection is gone, which under load
//! is one response time after the drain began, not a fixed period.
//!
//! Timeouts are coarse: once a second `expire_idle` looks at every
//! connection's phase and last progress (`connection.rs`) and flags those
//! that waited `header_timeout` for a request head or got no body bytes for
//! `body_timeout`. hyper's own header timer costs a boxed timer entry per
//! request — about a tenth of a keep-alive request's user-space
//! instructions (`scripts/profile`); here a request costs a few relaxed
//! stores.

use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use atomic_waker::AtomicWaker;
use handler_api::HandlerModuleRef;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use slab::Slab;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::access_log::AccessLog;
use super::connection::{Connection, Phase};
use super::peer::PeerAddr;
use super::serving::Serving;
use crate::config::Dispatch;
use crate::counters::{AcceptFailures, SharedCounters, Timeout, ACCEPT_RETRY};
use crate::protocol::worker::ConnectionInfo;
use crate::spread::{SpreadTable, Turn};

/// What every connection of a worker shares.
pub struct Server {
    /// What its connections' requests read.
    serving: Arc<Serving>,
    max_header_bytes: usize,
    /// `ServerOptions::header_timeout` in whole seconds of `clock`.
    header_timeout_secs: u64,
    /// `ServerOptions::body_timeout` in whole seconds of `clock`.
    body_timeout_secs: u64,
    /// Set when the connections left must close (gracefully: in-flight
    /// requests finish); each connection's waker is then woken.
    close_idle: AtomicBool,
    /// The accept loop's waker: woken when `draining` is set, and when a
    /// connection closes while `above_average`.
    accept_waker: AtomicWaker,
    /// Set while the accept loop leaves new connections to the others.
    above_average: AtomicBool,
    /// Every worker's open connections on this listener.
    spread: SpreadTable,
    /// This worker's seat in `spread`; `None` if the table was full.
    seat: Option<usize>,
    /// Notified when `counters.connections` (the open connections, shared
    /// with the master) drops to zero while draining; nobody else waits.
    all_closed: Notify,
    /// Every open connection, for `host connections`.
    connections: Mutex<Slab<Arc<Connection>>>,
}

/// How often a worker above the average looks at the spread (and at the
/// listener's queue) again when no close of its own woke it: others'
/// accepts raise the average without telling it.
const RECHECK: Duration = Duration::from_millis(10);
/// A worker above the average takes a connection anyway when connections
/// waited in the listener's queue at this many rechecks in a row (≈ 40 ms).
const OVERDUE_RECHECKS: u32 = 5;

/// Server limits and dispatch mode.
pub struct ServerOptions {
    /// Where handler calls run.
    pub dispatch: Dispatch,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Request head limit.
    pub max_header_bytes: usize,
    /// How long a connection may wait for a request head (at least 1 s;
    /// checked once a second).
    pub header_timeout: Duration,
    /// Longest pause while receiving a request body (at least 1 s).
    pub body_timeout: Duration,
    /// How long a handler call on the pool may run before its request is
    /// answered `503`; off when `None`.
    pub request_timeout: Option<Duration>,
    /// Where answered requests are logged, if anywhere.
    pub access_log: Option<AccessLog>,
}

impl Server {
    /// A server for a started handler.
    pub fn new(
        handler: HandlerModuleRef,
        counters: SharedCounters,
        spread: SpreadTable,
        options: ServerOptions,
    ) -> Arc<Server> {
        let seat = spread.claim(std::process::id());
        if seat.is_none() {
            tracing::warn!("the spread table is full; this worker accepts regardless of its share");
        }
        Arc::new(Server {
            serving: Arc::new(Serving::new(
                handler,
                options.dispatch,
                options.max_body_bytes,
                options.request_timeout,
                counters,
                options.access_log,
            )),
            max_header_bytes: options.max_header_bytes.max(8192),
            header_timeout_secs: whole_seconds(options.header_timeout),
            body_timeout_secs: whole_seconds(options.body_timeout),
            close_idle: AtomicBool::new(false),
            accept_waker: AtomicWaker::new(),
            above_average: AtomicBool::new(false),
            spread,
            seat,
            all_closed: Notify::new(),
            connections: Mutex::new(Slab::new()),
        })
    }

    /// The loaded handler module.
    pub fn handler(&self) -> HandlerModuleRef {
        self.serving.handler
    }

    /// Accepts connections until the drain begins; while this worker holds
    /// more than the group's average of open connections, leaves them to
    /// the others (see `spread.rs`). Gives the listener back so the caller
    /// decides how it is closed.
    pub async fn accept_loop(self: Arc<Self>, listener: TcpListener) -> TcpListener {
        let mut failures = AcceptFailures::default();
        let recheck = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(recheck);
        // Rechecks in a row that found connections waiting.
        let mut waited = 0;
        let mut overdue = false;
        loop {
            // A flag and a waker rather than a select! on a channel: no
            // future to build and poll per accepted connection.
            let accepted = std::future::poll_fn(|cx| {
                self.accept_waker.register(cx.waker());
                if self.serving.draining.load(Ordering::SeqCst) {
                    return Poll::Ready(None);
                }
                if self.my_turn() {
                    (waited, overdue) = (0, false);
                    self.above_average.store(false, Ordering::Relaxed);
                    return listener.poll_accept(cx).map(Some);
                }
                // Above the average: a close of our own wakes us
                // (`connection_closed`); others' accepts raising the
                // average do not, hence the timer.
                self.above_average.store(true, Ordering::Relaxed);
                if std::mem::take(&mut overdue) {
                    // Connections kept waiting: the workers below the
                    // average are not taking them (all stuck in long
                    // handler calls, say). Take one.
                    if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                        waited = 0;
                        return Poll::Ready(Some(accepted));
                    }
                }
                if recheck.as_mut().poll(cx).is_ready() {
                    waited = match accept_queue_len(&listener) {
                        0 => 0,
                        _ => waited + 1,
                    };
                    overdue = waited >= OVERDUE_RECHECKS;
                    recheck.as_mut().reset(Instant::now() + RECHECK);
                    let _ = recheck.as_mut().poll(cx);
                    if overdue {
                        cx.waker().wake_by_ref();
                    }
                }
                Poll::Pending
            })
            .await;
            match accepted {
                None => break,
                Some(Ok((stream, peer))) => self.start_connection(stream, peer),
                Some(Err(e)) => {
                    failures.record(&self.serving.counters, &e);
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
        tracing::debug!("stopped accepting");
        listener
    }

    /// Counts an accepted connection (before the accept loop looks at the
    /// spread again) and starts serving it.
    fn start_connection(self: &Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        self.serving
            .counters
            .connections
            .fetch_add(1, Ordering::SeqCst);
        if let Some(seat) = self.seat {
            self.spread.opened(seat);
        }
        let _ = stream.set_nodelay(true);
        tokio::spawn(self.clone().serve_connection(stream, peer));
    }

    /// Whether this worker holds no more than the group's average of open
    /// connections (always, without a seat in the spread table).
    fn my_turn(&self) -> bool {
        self.seat
            .is_none_or(|seat| self.spread.turn(seat) == Turn::Accept)
    }

    /// Gives this worker's seat in the spread table back (it exits).
    pub fn leave_spread(&self) {
        if let Some(seat) = self.seat {
            self.spread.release(seat);
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let connection = Arc::new(Connection::new(
            self.serving.clone(),
            PeerAddr::new(peer),
            self.serving.now(),
        ));
        let key = self.registry().insert(connection.clone());
        let service = {
            let connection = connection.clone();
            service_fn(move |req| {
                let connection = connection.clone();
                async move { Ok::<_, Infallible>(connection.respond(req).await) }
            })
        };
        let conn = http1::Builder::new()
            .max_buf_size(self.max_header_bytes)
            // One contiguous buffer per answer: one `send`, no queue of
            // buffers (see `abi::Body` for how large bodies stay bounded).
            .writev(false)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        // Not a select! on a channel: that would be polled on every wake-up
        // of the connection (every request); registering the waker and
        // reading a flag is an order of magnitude cheaper.
        let mut closing = false;
        let result = std::future::poll_fn(|cx| {
            // Registered before the checks: `close_connections` and
            // `expire_idle` set their flag first, then wake.
            connection.waker.register(cx.waker());
            if connection.expired.load(Ordering::SeqCst) && connection.phase() == Phase::WaitingHead
            {
                // Waiting for a head that did not come: nothing to answer,
                // and hyper's graceful shutdown would wait for the head.
                // (A stalled body is answered 408 by `read_body`.)
                tracing::debug!(peer = connection.peer.as_str(), "header timeout; closed");
                self.serving.counters.count_timeout(Timeout::Header);
                return Poll::Ready(Ok(()));
            }
            if !closing && self.close_idle.load(Ordering::SeqCst) {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            conn.as_mut().poll(cx)
        })
        .await;
        log_connection_end(result);
        self.registry().try_remove(key);
        if let Some(seat) = self.seat {
            self.spread.closed(seat);
            if self.above_average.load(Ordering::Relaxed) {
                self.accept_waker.wake();
            }
        }
        if self
            .serving
            .counters
            .connections
            .fetch_sub(1, Ordering::SeqCst)
            == 1
            && self.serving.draining.load(Ordering::SeqCst)
        {
            self.all_closed.notify_waiters();
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Slab<Arc<Connection>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open connections, for `host connections`.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let closing = self.serving.draining.load(Ordering::Relaxed);
        let mut list: Vec<ConnectionInfo> = self
            .registry()
            .iter()
            .map(|(_, c)| ConnectionInfo {
                peer: c.peer.as_str().to_owned(),
                state: match (c.phase() != Phase::WaitingHead, closing) {
                    (true, _) => "active",
                    (false, true) => "closing",
                    (false, false) => "idle",
                }
                .to_owned(),
                requests: c.requests.load(Ordering::Relaxed),
                age_secs: c.opened.elapsed().as_secs_f64(),
            })
            .collect();
        list.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs));
        list
    }

    /// Retires this worker: stop accepting, lame duck, close the rest.
    /// Returns whether every connection closed before `stop_timeout`.
    pub async fn drain(&self, lame_duck: Duration, stop_timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + stop_timeout;
        self.start_draining();
        // Logged once answers carry `Connection: close`: a test that reads
        // this line may count on it.
        tracing::debug!("draining");
        let lame_duck_end = tokio::time::Instant::now() + lame_duck;
        let _ = tokio::time::timeout_at(lame_duck_end.min(deadline), self.all_closed()).await;
        self.close_connections();
        tokio::time::timeout_at(deadline, self.all_closed())
            .await
            .is_ok()
    }

    /// Resolves once no connection is open; only while draining (see
    /// `serve_connection`).
    async fn all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close in between still wakes us.
            notified.as_mut().enable();
            if self.serving.counters.connections.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Stops at once: no more accepting, every connection closed.
    pub fn stop_now(&self) {
        self.start_draining();
        self.close_connections();
    }

    /// Once a second: advances `clock`, bumps the heartbeat the master
    /// watches for `request_timeout` (a handler call blocking the event loop
    /// stops it), flags (then wakes) every connection without progress for
    /// its phase's timeout, and flushes the access log. Runs for the life of
    /// the worker.
    pub async fn expire_idle(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.spread.sweep_dead();
            let now = self.serving.tick();
            self.serving
                .counters
                .heartbeat
                .fetch_add(1, Ordering::Relaxed);
            self.flush_access_log();
            for (_, connection) in self.registry().iter() {
                let limit = match connection.phase() {
                    Phase::WaitingHead => self.header_timeout_secs,
                    Phase::ReadingBody => self.body_timeout_secs,
                    Phase::Handling => continue,
                };
                let waited = now.saturating_sub(connection.since.load(Ordering::Relaxed));
                // `>`: between the timeout and a second more.
                if waited > limit && !connection.expired.swap(true, Ordering::SeqCst) {
                    connection.waker.wake();
                }
            }
        }
    }

    /// Writes the access log's buffered lines; safe from any thread.
    pub fn flush_access_log(&self) {
        if let Some(log) = &self.serving.access_log {
            log.flush();
        }
    }

    /// Reopens the access log's file (after a rotation).
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.serving.access_log {
            log.reopen();
        }
    }

    /// Answers with `Connection: close` from now on and stops the accept
    /// loop; the listening socket stays open for the other workers.
    /// Stops accepting; safe from any thread.
    pub fn start_draining(&self) {
        self.serving.draining.store(true, Ordering::SeqCst);
        if let Some(seat) = self.seat {
            self.spread.leave(seat);
        }
        self.accept_waker.wake();
    }

    /// Asks every connection to close once its in-flight request is answered.
    fn close_connections(&self) {
        self.close_idle.store(true, Ordering::SeqCst);
        for (_, connection) in self.registry().iter() {
            connection.waker.wake();
        }
    }
}

/// Connections waiting in the listener's accept queue (for a listening
/// socket, `TCP_INFO` reports its backlog as `tcpi_unacked`); 0 if unknown.
fn accept_queue_len(listener: &TcpListener) -> u32 {
    use std::os::fd::AsRawFd as _;
    // SAFETY: zeroed tcp_info is a valid out-parameter.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid fd and an out-parameter of the stated size.
    let result = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if result == 0 {
        info.tcpi_unacked
    } else {
        0
    }
}

/// A timeout in whole seconds of `Server::clock`, at least one.
fn whole_seconds(timeout: Duration) -> u64 {
    timeout.as_secs_f64().ceil().max(1.0) as u64
}

fn log_connection_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
