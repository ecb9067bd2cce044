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

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use handler_api::{HandlerModuleRef, Header, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Dispatch;
use crate::counters::SharedCounters;
use crate::protocol::worker::ConnectionInfo;

type HttpResponse = hyper::Response<Full<Bytes>>;

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What every connection of a worker shares.
pub struct Server {
    handler: HandlerModuleRef,
    counters: SharedCounters,
    dispatch: Dispatch,
    max_body_bytes: usize,
    max_header_bytes: usize,
    draining: AtomicBool,
    close_idle: watch::Sender<bool>,
    stop_accepting: watch::Sender<bool>,
    open_connections: watch::Sender<usize>,
    /// Every open connection, for `host connections`.
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    next_connection: AtomicU64,
}

/// What `host connections` shows of one connection; updated with atomics
/// on the request path, read rarely.
struct Connection {
    peer: Arc<str>,
    opened: Instant,
    requests: AtomicU64,
    in_flight: AtomicU64,
}

/// Server limits and dispatch mode.
pub struct ServerOptions {
    /// Where handler calls run.
    pub dispatch: Dispatch,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Request head limit.
    pub max_header_bytes: usize,
}

impl Server {
    /// A server for a started handler.
    pub fn new(
        handler: HandlerModuleRef,
        counters: SharedCounters,
        options: ServerOptions,
    ) -> Arc<Server> {
        Arc::new(Server {
            handler,
            counters,
            dispatch: options.dispatch,
            max_body_bytes: options.max_body_bytes,
            max_header_bytes: options.max_header_bytes.max(8192),
            draining: AtomicBool::new(false),
            close_idle: watch::channel(false).0,
            stop_accepting: watch::channel(false).0,
            open_connections: watch::channel(0).0,
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
        })
    }

    /// The loaded handler module.
    pub fn handler(&self) -> HandlerModuleRef {
        self.handler
    }

    /// Accepts connections until the drain begins.
    pub async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.stop_accepting.subscribe();
        loop {
            tokio::select! {
                biased;
                _ = async { stop.wait_for(|s| *s).await.map(drop) } => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(self.clone().serve_connection(stream, peer));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        tracing::debug!("stopped accepting");
    }

    async fn serve_connection(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        self.open_connections.send_modify(|n| *n += 1);
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            peer: peer.to_string().into(),
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        });
        let key = self.next_connection.fetch_add(1, Ordering::Relaxed);
        self.registry().insert(key, connection.clone());
        let server = self.clone();
        let service = service_fn(move |req| {
            let server = server.clone();
            let connection = connection.clone();
            async move { Ok::<_, Infallible>(server.respond(req, &connection).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(self.max_header_bytes)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let mut close_idle = self.close_idle.subscribe();
        tokio::select! {
            result = conn.as_mut() => log_connection_end(result),
            _ = async { close_idle.wait_for(|c| *c).await.map(drop) } => {
                conn.as_mut().graceful_shutdown();
                log_connection_end(conn.await);
            }
        }
        self.registry().remove(&key);
        self.counters.connections.fetch_sub(1, Ordering::Relaxed);
        self.open_connections.send_modify(|n| *n -= 1);
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open connections, for `host connections`.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let closing = self.draining.load(Ordering::Relaxed);
        let mut list: Vec<ConnectionInfo> = self
            .registry()
            .values()
            .map(|c| ConnectionInfo {
                peer: c.peer.to_string(),
                state: match (c.in_flight.load(Ordering::Relaxed) > 0, closing) {
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

    async fn respond(
        self: Arc<Self>,
        req: hyper::Request<Incoming>,
        connection: &Connection,
    ) -> HttpResponse {
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        connection.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut response = self.answer(req, connection.peer.clone()).await;
        connection.in_flight.fetch_sub(1, Ordering::Relaxed);
        connection.requests.fetch_add(1, Ordering::Relaxed);
        if self.draining.load(Ordering::Relaxed) {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.counters.count_response(response.status().as_u16());
        response
    }

    async fn answer(&self, req: hyper::Request<Incoming>, peer: Arc<str>) -> HttpResponse {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, self.max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            }
            Err(_) => return plain(StatusCode::BAD_REQUEST, "cannot read request body\n"),
        };
        match self.dispatch {
            Dispatch::Inline => call_handler(self.handler, &parts, &body, &peer),
            Dispatch::Pool => {
                let handler = self.handler;
                tokio::task::spawn_blocking(move || call_handler(handler, &parts, &body, &peer))
                    .await
                    .unwrap_or_else(|_| {
                        plain(StatusCode::INTERNAL_SERVER_ERROR, "handler call failed\n")
                    })
            }
        }
    }

    /// Retires this worker: stop accepting, lame duck, close the rest.
    /// Returns whether every connection closed before `stop_timeout`.
    pub async fn drain(&self, lame_duck: Duration, stop_timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + stop_timeout;
        self.draining.store(true, Ordering::Relaxed);
        self.stop_accepting.send_replace(true);
        let mut open = self.open_connections.subscribe();
        let lame_duck_end = tokio::time::Instant::now() + lame_duck;
        let all_closed = |open: &mut watch::Receiver<usize>| {
            let mut open = open.clone();
            async move { open.wait_for(|n| *n == 0).await.map(drop) }
        };
        let _ = tokio::time::timeout_at(lame_duck_end.min(deadline), all_closed(&mut open)).await;
        self.close_idle.send_replace(true);
        tokio::time::timeout_at(deadline, all_closed(&mut open))
            .await
            .is_ok()
    }

    /// Stops at once: no more accepting, every connection closed.
    pub fn stop_now(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.stop_accepting.send_replace(true);
        self.close_idle.send_replace(true);
    }
}

fn log_connection_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

fn plain(status: StatusCode, body: &'static str) -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// One call across the ABI: borrow the request, take ownership of the answer.
fn call_handler(
    handler: HandlerModuleRef,
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    peer: &str,
) -> HttpResponse {
    let headers: Vec<Header<'_>> = parts
        .headers
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().into(),
            value: value.as_bytes().into(),
        })
        .collect();
    let request = Request {
        method: parts.method.as_str().into(),
        path: parts.uri.path().into(),
        query: parts.uri.query().unwrap_or("").into(),
        headers: headers.as_slice().into(),
        body: body.as_ref().into(),
        peer: peer.into(),
    };
    let answer = (handler.handle())(&request);
    into_http(answer)
}

fn into_http(answer: handler_api::Response) -> HttpResponse {
    let Ok(status) = StatusCode::from_u16(answer.status) else {
        tracing::warn!(status = answer.status, "handler returned an invalid status");
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "handler returned an invalid status\n",
        );
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from_owner(answer.body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for header in answer.headers.iter() {
        match (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_str(header.value.as_str()),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => {
                tracing::warn!(header = %header.name, "handler returned an invalid header; dropped")
            }
        }
    }
    response
}
