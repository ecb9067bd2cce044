//! One connection's request cycle, as the timeouts see it: waiting for a
//! head, reading a body, handled. The connection's task is the only writer
//! of its phase and progress stamp; `Server::expire_idle` reads them once a
//! second and flags (then wakes) a connection that made no progress for its
//! phase's timeout. A flagged connection waiting for a head is dropped by
//! `Server::serve_connection` (nothing to answer); one reading a body is
//! answered `408` by `read_body`; a handled request has no timeout but the
//! drain's `stop_timeout`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::StatusCode;
use smallvec::SmallVec;

use super::abi::{call_handler, plain, HttpResponse};
use super::access_log::Noted;
use super::peer::PeerAddr;
use super::serving::Serving;
use crate::config::Dispatch;
use crate::counters::Timeout;

/// One connection: what its requests need, and what `host connections`
/// shows of it (written by the connection's own task, read rarely).
pub(super) struct Connection {
    serving: Arc<Serving>,
    pub(super) peer: PeerAddr,
    pub(super) opened: Instant,
    pub(super) requests: AtomicU64,
    /// A [`Phase`] (HTTP/1: one request at a time).
    pub(super) phase: AtomicU8,
    /// `Server::clock` at the last progress: the phase began, or body
    /// bytes arrived.
    pub(super) since: AtomicU64,
    /// Set by `expire_idle`: no progress for the phase's timeout.
    pub(super) expired: AtomicBool,
    /// The connection task's waker, for `close_idle`.
    pub(super) waker: AtomicWaker,
}

/// Where a connection is in its request cycle: what the timeouts look at.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    /// Waiting for (the rest of) a request head: `header_timeout`.
    WaitingHead = 0,
    /// Receiving a request body: `body_timeout` between bytes.
    ReadingBody = 1,
    /// The handler has the request: no timeout but `stop_timeout` at drain.
    Handling = 2,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            1 => Phase::ReadingBody,
            2 => Phase::Handling,
            _ => Phase::WaitingHead,
        }
    }
}

impl Connection {
    /// A connection from `peer` to a worker serving with `serving`, opened
    /// at `now` (its clock).
    pub(super) fn new(serving: Arc<Serving>, peer: PeerAddr, now: u64) -> Connection {
        Connection {
            serving,
            peer,
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::WaitingHead as u8),
            since: AtomicU64::new(now),
            expired: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Where the connection is now.
    pub(super) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Moves to `phase` at `now` (single writer: this connection's task).
    pub(super) fn enter(&self, phase: Phase, now: u64) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.since.store(now, Ordering::Relaxed);
    }

    /// Answers one request: counters, phases, `Connection: close` while
    /// draining, the access log.
    pub(super) async fn respond(self: &Arc<Self>, req: hyper::Request<Incoming>) -> HttpResponse {
        let serving = &*self.serving;
        let noted = serving
            .access_log
            .as_ref()
            .map(|log| (log, Noted::new(&req)));
        serving.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        self.enter(Phase::Handling, serving.now());
        let mut response = self.answer(req).await;
        self.enter(Phase::WaitingHead, serving.now());
        // A 408 answer is the end of this connection (`Connection: close`),
        // not a reason to drop it before the answer is out. (Read first: no
        // locked write on every request.)
        if self.expired.load(Ordering::Relaxed) {
            self.expired.store(false, Ordering::SeqCst);
        }
        // Only this connection's task writes it: no read-modify-write needed.
        let requests = self.requests.load(Ordering::Relaxed);
        self.requests.store(requests + 1, Ordering::Relaxed);
        if serving.draining.load(Ordering::Relaxed) {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        serving.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        serving.counters.count_response(response.status().as_u16());
        if let Some((log, noted)) = noted {
            let bytes = response.body().size_hint().exact().unwrap_or(0);
            log.record(&noted, &self.peer, response.status().as_u16(), bytes);
        }
        response
    }

    /// Reads the request body, then calls the handler where the dispatch
    /// says.
    async fn answer(self: &Arc<Self>, req: hyper::Request<Incoming>) -> HttpResponse {
        let serving = &*self.serving;
        let (parts, body) = req.into_parts();
        let body = match self.read_body(body, serving.max_body_bytes).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        match serving.dispatch {
            Dispatch::Inline => call_handler(serving.handler, &parts, &body, self.peer.as_str()),
            Dispatch::Pool => {
                let handler = serving.handler;
                let connection = self.clone();
                let call = tokio::task::spawn_blocking(move || {
                    call_handler(handler, &parts, &body, connection.peer.as_str())
                });
                let joined = match serving.request_timeout {
                    None => call.await,
                    Some(limit) => match tokio::time::timeout(limit, call).await {
                        Ok(joined) => joined,
                        Err(_) => return self.call_stuck(limit),
                    },
                };
                joined.unwrap_or_else(|_| {
                    plain(StatusCode::INTERNAL_SERVER_ERROR, "handler call failed\n")
                })
            }
        }
    }

    /// A pool call ran past `request_timeout`: its thread cannot be
    /// reclaimed, so the master is told (it replaces this worker) and the
    /// request is answered `503`.
    fn call_stuck(&self, limit: std::time::Duration) -> HttpResponse {
        tracing::warn!(
            peer = self.peer.as_str(),
            "handler call still running after request_timeout ({limit:?}); answered 503"
        );
        self.serving
            .counters
            .stuck_calls
            .fetch_add(1, Ordering::Relaxed);
        let mut refusal = plain(StatusCode::SERVICE_UNAVAILABLE, "handler call timed out\n");
        refusal
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        refusal
    }

    /// The whole request body, or the answer to send instead (413, 408,
    /// 400). Progress is recorded per frame for `body_timeout`.
    async fn read_body(
        &self,
        body: Incoming,
        max_body_bytes: usize,
    ) -> Result<Bytes, HttpResponse> {
        let now = || self.serving.now();
        if body.is_end_stream() {
            return Ok(Bytes::new());
        }
        self.enter(Phase::ReadingBody, now());
        let mut body = Limited::new(body, max_body_bytes);
        let mut chunks = SmallVec::<[Bytes; 1]>::new();
        loop {
            let frame = std::future::poll_fn(|cx| {
                // `expire_idle` sets the flag, then wakes this task.
                if self.expired.load(Ordering::SeqCst) {
                    return Poll::Ready(None);
                }
                Pin::new(&mut body).poll_frame(cx).map(Some)
            })
            .await;
            match frame {
                None => {
                    tracing::debug!(peer = self.peer.as_str(), "body timeout; 408");
                    self.serving.counters.count_timeout(Timeout::Body);
                    let mut refusal = plain(StatusCode::REQUEST_TIMEOUT, "request body too slow\n");
                    refusal
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                    return Err(refusal);
                }
                Some(None) => break,
                Some(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        chunks.push(data);
                    }
                    self.since.store(now(), Ordering::Relaxed);
                }
                Some(Some(Err(e))) if e.downcast_ref::<LengthLimitError>().is_some() => {
                    return Err(plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body too large\n",
                    ));
                }
                Some(Some(Err(_))) => {
                    return Err(plain(StatusCode::BAD_REQUEST, "cannot read request body\n"))
                }
            }
        }
        self.enter(Phase::Handling, now());
        Ok(match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.swap_remove(0),
            _ => chunks.concat().into(),
        })
    }
}
