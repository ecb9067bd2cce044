//! End-to-end tests of `loadgen` against small real servers on 127.0.0.1.
//!
//! Each server runs on its own thread and runtime, like the load itself, so
//! the tests are plain `#[test]` functions. Runs end on conditions (request
//! caps or `stop()` after progress), not on sleeps; durations are only upper
//! bounds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONNECTION;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use loadgen::{FailureKind, LoadConfig, LoadRun, OTHER_BODY_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// How the test server treats each connection.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// 200 with this body, keep-alive.
    Ok(&'static str),
    /// 200 with this body and `Connection: close`.
    OkThenClose(&'static str),
    /// 200 whose body is the server-wide request number.
    Counter,
    /// 500 with a body.
    Status500,
    /// Accept, then drop the connection without reading or answering.
    Drop,
    /// Accept and never answer.
    Hang,
    /// 200 announcing 100 body bytes, sending 5, then closing.
    TruncatedBody,
}

struct TestServer {
    addr: SocketAddr,
    accepts: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// Served connections that have ended (keep-alive modes).
    closed: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(mode: Mode) -> TestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let (a, r, c) = (
            Arc::clone(&accepts),
            Arc::clone(&requests),
            Arc::clone(&closed),
        );
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(serve(listener, mode, a, r, c, shutdown_rx));
        });
        TestServer {
            addr,
            accepts,
            requests,
            closed,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    fn accepts(&self) -> u64 {
        self.accepts.load(Ordering::SeqCst)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn closed(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    mode: Mode,
    accepts: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = TcpListener::from_std(listener).unwrap();
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        accepts.fetch_add(1, Ordering::SeqCst);
        let requests = Arc::clone(&requests);
        match mode {
            Mode::Drop => drop(stream),
            Mode::Hang => {
                tokio::spawn(async move {
                    let _held = stream;
                    std::future::pending::<()>().await;
                });
            }
            Mode::TruncatedBody => {
                tokio::spawn(truncated_body(stream, requests));
            }
            _ => {
                let closed = Arc::clone(&closed);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let n = requests.fetch_add(1, Ordering::SeqCst);
                        async move { Ok::<_, Infallible>(respond(mode, n, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        }
    }
}

fn respond(mode: Mode, n: u64, _req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body, close) = match mode {
        Mode::Ok(body) => (StatusCode::OK, body.to_owned(), false),
        Mode::OkThenClose(body) => (StatusCode::OK, body.to_owned(), true),
        Mode::Counter => (StatusCode::OK, n.to_string(), false),
        Mode::Status500 => (StatusCode::INTERNAL_SERVER_ERROR, "boom".to_owned(), false),
        Mode::Drop | Mode::Hang | Mode::TruncatedBody => unreachable!(),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if close {
        response
            .headers_mut()
            .insert(CONNECTION, "close".parse().unwrap());
    }
    response
}

/// Reads one request head, answers with a body shorter than announced and
/// closes.
async fn truncated_body(mut stream: TcpStream, requests: Arc<AtomicU64>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        .await;
    let _ = stream.shutdown().await;
}

fn config(addr: SocketAddr, connections: usize) -> LoadConfig {
    let mut c = LoadConfig::new(addr);
    c.connections = connections;
    c
}

/// Polls `cond` every 5 ms for at most 30 s.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let limit = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn keep_alive_run_is_all_ok_and_stop_counts_everything() {
    let server = TestServer::start(Mode::Ok("hello"));
    let mut c = config(server.addr, 4);
    c.duration = Duration::from_secs(60); // upper bound only; stopped below
    let run = LoadRun::start(c);
    wait_until("200 requests succeeded", || run.progress().0 >= 200);
    let report = run.stop();

    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(report.ok >= 200);
    assert_eq!(report.bodies.len(), 1);
    assert_eq!(report.bodies["hello"], report.ok);
    // Keep-alive: one connection per task, reused for every request.
    assert!(report.connections_opened <= 4, "{report:?}");
    assert_eq!(server.accepts(), report.connections_opened);
    // Every request the server answered was counted: stop() let in-flight
    // requests finish.
    assert_eq!(server.requests(), report.ok);
    assert!(report.latency_p99_us >= report.latency_p50_us);
    assert!(report.requests_per_sec > 0.0);
    assert!(report.first_errors.is_empty());
}

#[test]
fn max_requests_caps_the_total() {
    let server = TestServer::start(Mode::Ok("capped"));
    let mut c = config(server.addr, 8);
    c.max_requests = Some(100);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.ok, 100, "{report:?}");
    assert_eq!(report.failed(), 0);
    assert_eq!(server.requests(), 100);
}

#[test]
fn status_500_is_a_status_failure() {
    let server = TestServer::start(Mode::Status500);
    let mut c = config(server.addr, 2);
    c.max_requests = Some(50);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.ok, 0, "{report:?}");
    assert_eq!(report.failed(), 50);
    assert_eq!(report.failures.get(&FailureKind::Status), Some(&50));
    assert!(report.bodies.is_empty(), "bodies are only for 2xx");
    assert_eq!(server.requests(), 50);
    // A 500 does not close the connection: it is reused.
    assert!(report.connections_opened <= 2);
    assert!(report.first_errors[0].starts_with("Status: status 500"));
}

#[test]
fn dropped_connections_are_send_failures_without_retries() {
    let server = TestServer::start(Mode::Drop);
    let mut c = config(server.addr, 3);
    c.max_requests = Some(30);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.ok, 0, "{report:?}");
    assert_eq!(report.failures.get(&FailureKind::Send), Some(&30));
    assert_eq!(report.failed(), 30);
    // One connection per attempt, and each attempt failed exactly once: the
    // server saw exactly as many connections as failures.
    assert_eq!(report.connections_opened, 30);
    assert_eq!(server.accepts(), 30);
    assert!(report.first_errors[0].starts_with("Send: "));
}

#[test]
fn connection_close_false_uses_a_connection_per_request() {
    let server = TestServer::start(Mode::Ok("bye"));
    let mut c = config(server.addr, 3);
    c.keep_alive = false;
    c.max_requests = Some(60);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.ok, 60);
    assert_eq!(report.bodies["bye"], 60);
    assert_eq!(report.connections_opened, 60);
    assert_eq!(server.accepts(), 60);
}

#[test]
fn server_connection_close_is_not_a_failure() {
    let server = TestServer::start(Mode::OkThenClose("once"));
    let mut c = config(server.addr, 3);
    c.max_requests = Some(60);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.ok, 60);
    assert_eq!(report.connections_opened, 60);
    assert_eq!(server.accepts(), 60);
}

#[test]
fn nothing_listening_gives_connect_failures_and_ends_by_duration() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let mut c = config(addr, 2);
    c.duration = Duration::from_millis(300);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.ok, 0, "{report:?}");
    assert!(report.failures[&FailureKind::Connect] > 0);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(report.connections_opened, 0);
    assert!(report.first_errors[0].starts_with("Connect: "));
    // Ended by its duration (generous bound, not a timing assertion).
    assert!(report.elapsed_secs < 10.0, "{report:?}");
}

#[test]
fn unanswered_requests_time_out() {
    let server = TestServer::start(Mode::Hang);
    let mut c = config(server.addr, 2);
    c.max_requests = Some(4);
    c.request_timeout = Duration::from_millis(200);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.ok, 0, "{report:?}");
    assert_eq!(report.failures.get(&FailureKind::Timeout), Some(&4));
    assert_eq!(report.failed(), 4);
    // A timed-out connection is never reused.
    assert_eq!(server.accepts(), 4);
}

#[test]
fn truncated_body_is_a_body_failure() {
    let server = TestServer::start(Mode::TruncatedBody);
    let mut c = config(server.addr, 2);
    c.max_requests = Some(10);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.ok, 0, "{report:?}");
    assert_eq!(report.failures.get(&FailureKind::Body), Some(&10));
    assert_eq!(server.requests(), 10);
}

#[test]
fn distinct_bodies_are_capped() {
    let server = TestServer::start(Mode::Counter);
    let mut c = config(server.addr, 4);
    c.max_requests = Some(100);
    let report = LoadRun::start(c).wait();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.ok, 100);
    assert_eq!(report.bodies.len(), loadgen::MAX_BODY_KEYS + 1);
    assert_eq!(
        report.bodies[OTHER_BODY_KEY],
        100 - loadgen::MAX_BODY_KEYS as u64
    );
    assert_eq!(report.bodies.values().sum::<u64>(), 100);
}

#[test]
fn dropping_a_run_stops_it() {
    let server = TestServer::start(Mode::Ok("x"));
    let mut c = config(server.addr, 2);
    c.duration = Duration::from_secs(60);
    let run = LoadRun::start(c);
    wait_until("load flows", || run.progress().0 > 0);
    // Dropped on another thread: a drop that waited out the 60 s duration
    // fails the wait below instead of holding the test.
    let dropping = std::thread::spawn(move || drop(run));
    wait_until("the drop returns", || dropping.is_finished());
    // The run's connections are all closed, and none was opened again.
    wait_until("the server saw every connection close", || {
        server.closed() == server.accepts()
    });
    assert_eq!(server.accepts(), 2, "the run reconnected after its drop");
    assert!(server.requests() > 0);
}
