//! The server: a parent that binds and supervises, worker processes that
//! serve. Mirrors host's process model and limits
//! (`host/src/master/spawn.rs`, `host/src/worker/server.rs`) minus
//! everything host does beyond serving: no handler ABI, no counters, no
//! drain. It is plain hyper as one would write it: the 30 s header timeout
//! is hyper's own per-request timer, where host sweeps its connections once
//! a second (the timer is ~12 % of a keep-alive request's user-space
//! instructions; see BENCHMARKS.md).
//!
//! The parent re-executes itself (`/proc/self/exe worker`) with
//! - fd 3: the shared listening socket (set non-blocking in the worker);
//! - fd 4: the write end of a pipe on which the worker reports ready (one
//!   byte), so the parent prints its address only once every worker serves;
//! - fds 5 and 6, when asked for: the WebSocket and text echo listeners
//!   ([`crate::echo`]), served by the same workers.

use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use command_fds::{CommandFdExt, FdMapping};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, SignalKind};

/// An HTTP response as the workers send it.
pub type HttpResponse = hyper::Response<Full<Bytes>>;

/// host's defaults (`host/src/config.rs`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HEADER_BYTES: usize = 16 << 10;
const MAX_BODY_BYTES: usize = 1 << 20;

const LISTENER_FD: i32 = 3;
const READY_FD: i32 = 4;
const WEBSOCKET_FD: i32 = 5;
const TEXT_FD: i32 = 6;
/// Set to `1` when the worker inherits [`WEBSOCKET_FD`] / [`TEXT_FD`].
const WEBSOCKET_ENV: &str = "BASELINE_WEBSOCKET";
const TEXT_ENV: &str = "BASELINE_TEXT";
/// Set for the worker processes only; `worker` refuses to run without it.
const WORKER_ENV: &str = "BASELINE_WORKER";
/// As host's `HOST_WORKER_WRAPPER`: a command that runs each worker (for
/// `scripts/profile`).
const WORKER_WRAPPER_ENV: &str = "BASELINE_WORKER_WRAPPER";

/// Turns a [`crate::route`] answer into the response hyper sends.
pub fn http_response((status, content_type, body): (u16, &'static str, Vec<u8>)) -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn plain(status: StatusCode, body: &'static str) -> HttpResponse {
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(crate::TEXT));
    response
}

// ---------------------------------------------------------------- parent

/// What the parent binds: the HTTP listener and, optionally, the echo
/// listeners of [`crate::echo`].
#[derive(Debug, Clone, Copy)]
pub struct Listen {
    /// HTTP routes of [`crate::route`].
    pub http: SocketAddr,
    /// WebSocket echo.
    pub websocket: Option<SocketAddr>,
    /// Newline-delimited text echo.
    pub text: Option<SocketAddr>,
}

/// The listeners once bound, in the order of their fds.
struct Listeners {
    http: std::net::TcpListener,
    websocket: Option<std::net::TcpListener>,
    text: Option<std::net::TcpListener>,
}

/// Runs the parent: binds the listeners, starts `workers` worker processes,
/// prints `listening on ADDR` (then `websocket on ADDR` and `text on ADDR`
/// for the echo listeners asked for) once they all serve, and returns after
/// SIGTERM or SIGINT (or a worker's death) once every worker is gone.
pub fn run_parent(listen: Listen, workers: usize) -> Result<()> {
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(parent(listen, workers))
}

async fn parent(listen: Listen, workers: usize) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let bind_echo = |addr: Option<SocketAddr>| {
        addr.map(|addr| bind(addr).with_context(|| format!("cannot listen on {addr}")))
            .transpose()
    };
    let listener = Listeners {
        http: bind(listen.http).with_context(|| format!("cannot listen on {}", listen.http))?,
        websocket: bind_echo(listen.websocket)?,
        text: bind_echo(listen.text)?,
    };
    let mut banner = format!("listening on {}\n", listener.http.local_addr()?);
    if let Some(websocket) = &listener.websocket {
        banner += &format!("websocket on {}\n", websocket.local_addr()?);
    }
    if let Some(text) = &listener.text {
        banner += &format!("text on {}\n", text.local_addr()?);
    }

    let (mut ready_reader, ready_writer) = std::io::pipe().context("cannot create a pipe")?;
    let ready_writer = OwnedFd::from(ready_writer);
    let mut children = Vec::with_capacity(workers);
    for slot in 0..workers {
        match spawn_worker(&listener, &ready_writer, slot) {
            Ok(child) => children.push(child),
            Err(e) => {
                stop_workers(&mut children).await;
                return Err(e);
            }
        }
    }
    drop(ready_writer);
    // One byte per worker; EOF early means a worker died before serving.
    let mut ready = vec![0u8; workers];
    // A short blocking read: this single-threaded runtime has nothing else
    // to do meanwhile.
    if let Err(e) = ready_reader.read_exact(&mut ready) {
        stop_workers(&mut children).await;
        bail!("a worker failed to start: {e}");
    }
    drop(ready_reader);
    {
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(banner.as_bytes())?;
        stdout.flush()?;
    }

    let mut exits = tokio::task::JoinSet::new();
    let mut pids = Vec::with_capacity(workers);
    for mut child in children {
        let pid = child.id();
        pids.push(pid);
        exits.spawn(async move { (pid, child.wait().await) });
    }
    let outcome = tokio::select! {
        _ = sigterm.recv() => Ok(()),
        _ = sigint.recv() => Ok(()),
        Some(exit) = exits.join_next() => {
            let (pid, status) = exit.context("worker wait task")?;
            Err(anyhow::anyhow!("worker pid {pid:?} exited unexpectedly: {status:?}"))
        }
    };
    for pid in pids.into_iter().flatten() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    // Workers die on SIGTERM at once; reap them, bounded.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while exits.join_next().await.is_some() {}
    })
    .await;
    exits.abort_all();
    outcome
}

/// Binds a listener with host's settings: SO_REUSEADDR, backlog 1024.
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(1024)?.into_std()?)
}

fn spawn_worker(
    listeners: &Listeners,
    ready: &OwnedFd,
    slot: usize,
) -> Result<tokio::process::Child> {
    let dup = |listener: &std::net::TcpListener| {
        listener
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate a listener")
    };
    let mut fds = vec![FdMapping {
        parent_fd: dup(&listeners.http)?,
        child_fd: LISTENER_FD,
    }];
    let ready = ready
        .try_clone()
        .context("cannot duplicate the ready pipe")?;
    let parent_pid = nix::unistd::getpid();
    let mut command = match std::env::var(WORKER_WRAPPER_ENV) {
        Ok(wrapper) if !wrapper.trim().is_empty() => {
            let mut words = wrapper.split_whitespace();
            let mut command = tokio::process::Command::new(words.next().unwrap_or_default());
            // The wrapper's own /proc/self/exe would be the wrapper.
            command.args(words).arg(format!("/proc/{parent_pid}/exe"));
            command
        }
        _ => {
            let mut command = tokio::process::Command::new("/proc/self/exe");
            command.arg0(format!("baseline-server: worker {slot}"));
            command
        }
    };
    command
        .arg("worker")
        .env(WORKER_ENV, "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    fds.push(FdMapping {
        parent_fd: ready,
        child_fd: READY_FD,
    });
    for (listener, fd, env) in [
        (&listeners.websocket, WEBSOCKET_FD, WEBSOCKET_ENV),
        (&listeners.text, TEXT_FD, TEXT_ENV),
    ] {
        if let Some(listener) = listener {
            fds.push(FdMapping {
                parent_fd: dup(listener)?,
                child_fd: fd,
            });
            command.env(env, "1");
        }
    }
    command.fd_mappings(fds).context("worker fd mapping")?;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            // The parent may have died between fork and prctl.
            if nix::unistd::getppid() != parent_pid {
                return Err(std::io::Error::other("parent gone"));
            }
            Ok(())
        });
    }
    command.spawn().context("cannot start a worker process")
}

async fn stop_workers(children: &mut Vec<tokio::process::Child>) {
    for child in children.iter_mut() {
        let _ = child.start_kill();
    }
    for child in children.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    children.clear();
}

// ---------------------------------------------------------------- worker

/// Runs a worker process: serves the inherited listeners until killed.
pub fn run_worker() -> Result<()> {
    if std::env::var_os(WORKER_ENV).is_none() {
        bail!("`baseline-server worker` is started by baseline-server itself, not by hand");
    }
    // SAFETY: the parent mapped these descriptors for this process only.
    let (listener, ready) = unsafe {
        (
            std::net::TcpListener::from_raw_fd(LISTENER_FD),
            std::fs::File::from_raw_fd(READY_FD),
        )
    };
    listener
        .set_nonblocking(true)
        .context("cannot set the listener non-blocking")?;
    let echo = [
        (
            WEBSOCKET_ENV,
            WEBSOCKET_FD,
            crate::echo::Protocol::WebSocket,
        ),
        (TEXT_ENV, TEXT_FD, crate::echo::Protocol::Text),
    ]
    .into_iter()
    .filter(|(env, _, _)| std::env::var_os(env).is_some())
    .map(|(_, fd, protocol)| {
        // SAFETY: the parent mapped this descriptor when it set `env`.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        listener
            .set_nonblocking(true)
            .context("cannot set an echo listener non-blocking")?;
        Ok((listener, protocol))
    })
    .collect::<Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .context("cannot use the inherited listener")?;
        for (listener, protocol) in echo {
            let listener = tokio::net::TcpListener::from_std(listener)
                .context("cannot use an inherited echo listener")?;
            tokio::spawn(crate::echo::serve(listener, protocol));
        }
        let mut ready = ready;
        ready.write_all(b"r").context("cannot report ready")?;
        drop(ready);
        accept_loop(listener, std::process::id()).await;
        Ok(())
    })
}

async fn accept_loop(listener: tokio::net::TcpListener, pid: u32) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, pid));
            }
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, pid: u32) {
    let service =
        service_fn(move |req| async move { Ok::<_, Infallible>(respond(req, pid).await) });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    // Errors (resets, timeouts) end the connection; nothing to report.
    let _ = conn.await;
}

async fn respond(req: hyper::Request<Incoming>, pid: u32) -> HttpResponse {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
        }
        Err(_) => return plain(StatusCode::BAD_REQUEST, "cannot read request body\n"),
    };
    http_response(crate::route(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        &body,
        pid,
    ))
}
