//! A worker process: load the handler, start it, serve, drain, exit.
//!
//! The master starts workers as `/proc/self/exe worker` with three inherited
//! descriptors (the systemd convention puts the listener first):
//! - fd 3: the group's listening socket, shared by every worker of the group;
//! - fd 4: the channel to the master (JSON lines, see `protocol::worker`);
//! - fd 5: the shared-memory counters;
//! - fd 6: the group's spread table (`crate::spread`).
//!
//! Start order: load handler → handler start callback → accept → report
//! `ready`. Any failure before `ready` is reported to the master as text and
//! the worker exits non-zero. The worker leaves when the master says so,
//! when its channel closes (the master is gone) or on SIGTERM.
//!
//! The master's death is also watched from a thread of its own: a handler
//! call running inline blocks the event loop, which would otherwise keep the
//! listening socket (and so the port) until the call returns. That thread
//! closes the listener at once and bounds the rest by `stop_timeout`.

pub mod abi;
mod access_log;
mod business;
mod connection;
mod gateway_calls;
mod gateway_links;
mod loader;
mod peer;
mod push;
mod server;
mod serving;

use std::os::fd::{AsRawFd as _, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use abi_stable::std_types::{RResult, RStr};
use anyhow::{bail, Context as _, Result};
use handler_api::{HandlerModuleRef, Level, Setting, StartContext};
use tokio::io::BufReader;
use tokio::signal::unix::{signal, SignalKind};

use crate::counters::SharedCounters;
use crate::protocol::worker::{FromWorker, ToWorker, WorkerRole, WorkerSpec};
use crate::protocol::{read_line, write_line};
use crate::spread::SpreadTable;
use server::{Server, ServerOptions};

const LISTENER_FD: i32 = 3;
const CHANNEL_FD: i32 = 4;
const COUNTERS_FD: i32 = 5;
const SPREAD_FD: i32 = 6;

/// Who this worker is, for lines the handler logs through the host.
static IDENTITY: OnceLock<(String, usize, String)> = OnceLock::new();

/// Whether fd [`LISTENER_FD`] is still the listener; taken by whoever closes
/// it (the accept loop, or the master-death watch), so the other never
/// touches a descriptor number that may have been reused.
static LISTENER_OPEN: Mutex<bool> = Mutex::new(false);

/// Runs the hidden `worker` subcommand.
pub fn run() -> ExitCode {
    if std::env::var_os("LISTEN_FDS").is_none() {
        eprintln!("host: `host worker` is started by the host master, not by hand");
        return ExitCode::from(2);
    }
    // SAFETY: the master mapped these descriptors for this process only.
    let fds = unsafe {
        Fds {
            listener: OwnedFd::from_raw_fd(LISTENER_FD),
            channel: OwnedFd::from_raw_fd(CHANNEL_FD),
            counters: OwnedFd::from_raw_fd(COUNTERS_FD),
            spread: OwnedFd::from_raw_fd(SPREAD_FD),
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(pool_threads())
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("host worker: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(fds)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the hidden `inspect` subcommand: loads a library the way a worker
/// does, in a process of its own, and prints `name version` or the error.
pub fn inspect(path: &std::path::Path, source: &std::path::Path) -> ExitCode {
    match loader::load(path, &source.display().to_string()) {
        Ok(handler) => {
            let info = (handler.module.info())();
            println!("{} {}", info.name, info.version);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// The group's `pool_threads`, set by the master for `dispatch = "pool"`.
fn pool_threads() -> usize {
    std::env::var(crate::protocol::worker::POOL_THREADS_ENV)
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(4)
}

/// The descriptors the master hands a worker.
struct Fds {
    listener: OwnedFd,
    channel: OwnedFd,
    counters: OwnedFd,
    spread: OwnedFd,
}

/// Serves until told to stop; a failed start, already reported to the
/// master (which logs it), is only a failure exit code here.
async fn serve(fds: Fds) -> Result<ExitCode> {
    let Fds {
        listener,
        channel,
        counters,
        spread,
    } = fds;
    let master_watch = channel
        .try_clone()
        .context("cannot duplicate the master channel")?;
    let channel = std::os::unix::net::UnixStream::from(channel);
    channel.set_nonblocking(true)?;
    let (reader, mut writer) = tokio::net::UnixStream::from_std(channel)?.into_split();
    let mut reader = BufReader::new(reader);
    let spec = match read_line(&mut reader).await? {
        Some(ToWorker::Start(spec)) => *spec,
        Some(other) => bail!("expected a start message from the master, got {other:?}"),
        None => bail!("the master closed the channel before starting this worker"),
    };
    let _span = tracing::info_span!(
        "worker",
        group = %spec.group,
        slot = spec.slot,
        pid = std::process::id(),
        version = %spec.version
    )
    .entered();
    let _ = IDENTITY.set((spec.group.clone(), spec.slot, spec.version.clone()));

    match &spec.role {
        WorkerRole::Http { .. } => {}
        WorkerRole::Gateway(gateway) => {
            drop(spread);
            return crate::gateway::run(&spec, gateway, listener, counters, reader, writer).await;
        }
        WorkerRole::Business { gateways } => {
            // Only the gateways accept on the group's listener.
            drop((listener, spread));
            let loaded = load_and_start(&spec);
            let handler = match loaded {
                Ok(handler) => handler,
                Err(error) => return report_failure(&mut writer, error).await,
            };
            let gateways = gateways.clone();
            let connections = business::entry_points(&handler)?;
            let module = handler.module;
            business::run(
                &spec,
                module,
                connections,
                gateways,
                &mut reader,
                &mut writer,
            )
            .await?;
            return Ok(ExitCode::SUCCESS);
        }
    }

    let started = start(&spec, listener, counters, spread);
    let (server, listener, info) = match started {
        Ok(started) => started,
        Err(error) => return report_failure(&mut writer, error).await,
    };
    *LISTENER_OPEN.lock().unwrap_or_else(|e| e.into_inner()) = true;
    tokio::spawn({
        let server = server.clone();
        async move {
            let listener = server.accept_loop(listener).await;
            let mut open = LISTENER_OPEN.lock().unwrap_or_else(|e| e.into_inner());
            drop(listener);
            *open = false;
        }
    });
    tokio::spawn(server.clone().expire_idle());
    watch_master(
        master_watch,
        server.clone(),
        Duration::from_millis(spec.stop_timeout_ms),
    )?;
    write_line(
        &mut writer,
        &FromWorker::Ready {
            handler_name: info.name.to_string(),
            handler_version: info.version.to_string(),
        },
    )
    .await?;
    tracing::debug!("ready");
    let result = run_until_told(&spec, &server, &mut reader, &mut writer).await;
    server.leave_spread();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Tells the master why this worker cannot start (the master logs it),
/// then fails.
pub(crate) async fn report_failure(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    error: anyhow::Error,
) -> Result<ExitCode> {
    let error = format!("{error:#}");
    write_line(
        writer,
        &FromWorker::Failed {
            error: error.clone(),
        },
    )
    .await?;
    tracing::debug!("start failed (reported to the master): {error}");
    Ok(ExitCode::FAILURE)
}

/// Loads the handler, links it to the gateway group it pushes to (if
/// any), and calls its start callback.
fn load_and_start(spec: &WorkerSpec) -> Result<loader::Loaded> {
    let shown = format!("{} (version {})", spec.source.display(), spec.version);
    let handler = loader::load(&spec.handler, &shown).map_err(anyhow::Error::msg)?;
    match &spec.role {
        WorkerRole::Http { push } if !push.is_empty() => push::link(push, &handler)?,
        WorkerRole::Business { .. } => {
            business::entry_points(&handler)?;
        }
        _ => {}
    }
    call_start(handler.module, spec)?;
    Ok(handler)
}

/// Loads and starts the handler, and readies the listener.
fn start(
    spec: &WorkerSpec,
    listener: OwnedFd,
    counters: OwnedFd,
    spread: OwnedFd,
) -> Result<(
    std::sync::Arc<Server>,
    tokio::net::TcpListener,
    handler_api::HandlerInfo,
)> {
    let counters = SharedCounters::open(counters)?;
    let spread = SpreadTable::open(spread)?;
    let access_log = spec
        .access_log
        .as_ref()
        .map(|target| access_log::AccessLog::open(target, spec.access_log_format, &spec.group))
        .transpose()?;
    let handler = load_and_start(spec)?.module;
    let info = (handler.info())();
    let listener = std::net::TcpListener::from(listener);
    // O_NONBLOCK is shared by every process holding the socket; all of them
    // want it set.
    listener
        .set_nonblocking(true)
        .context("cannot set the listener non-blocking")?;
    let listener =
        tokio::net::TcpListener::from_std(listener).context("cannot use the inherited listener")?;
    let server = Server::new(
        handler,
        counters,
        spread,
        ServerOptions {
            dispatch: spec.dispatch,
            max_body_bytes: spec.max_body_bytes,
            max_header_bytes: spec.max_header_bytes,
            header_timeout: Duration::from_millis(spec.header_timeout_ms),
            body_timeout: Duration::from_millis(spec.body_timeout_ms),
            request_timeout: spec.request_timeout_ms.map(Duration::from_millis),
            access_log,
        },
    );
    Ok((server, listener, info))
}

fn call_start(handler: HandlerModuleRef, spec: &WorkerSpec) -> Result<()> {
    let settings: Vec<Setting<'_>> = spec
        .settings
        .iter()
        .map(|(key, value)| Setting {
            key: key.as_str().into(),
            value: value.as_str().into(),
        })
        .collect();
    let ctx = StartContext {
        group: spec.group.as_str().into(),
        slot: spec.slot as u32,
        pid: std::process::id(),
        settings: settings.as_slice().into(),
        log: handler_log,
    };
    match (handler.start())(&ctx) {
        RResult::ROk(()) => Ok(()),
        RResult::RErr(message) => bail!("the handler's start failed: {message}"),
    }
}

/// The logging callback handed to the handler.
extern "C" fn handler_log(level: Level, message: RStr<'_>) {
    let (group, slot, version) = IDENTITY
        .get()
        .map_or(("?", 0, "?"), |(g, s, v)| (g.as_str(), *s, v.as_str()));
    let message = message.as_str();
    let pid = std::process::id();
    match level {
        Level::Error => tracing::error!(target: "handler", group, slot, pid, version, "{message}"),
        Level::Warn => tracing::warn!(target: "handler", group, slot, pid, version, "{message}"),
        Level::Info => tracing::info!(target: "handler", group, slot, pid, version, "{message}"),
        Level::Debug => tracing::debug!(target: "handler", group, slot, pid, version, "{message}"),
    }
}

/// Starts the thread that acts on the master's death even while a handler
/// call blocks the event loop: it stops accepting, closes the listener (so
/// a new host can bind the port), and ends the process if what is in flight
/// has not finished within `stop_timeout`.
fn watch_master(channel: OwnedFd, server: Arc<Server>, stop_timeout: Duration) -> Result<()> {
    std::thread::Builder::new()
        .name("master-watch".into())
        .spawn(move || {
            // The master end closes only when the master is gone. Only
            // POLLRDHUP is asked for: unread commands do not wake us.
            let mut watched = libc::pollfd {
                fd: channel.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for a descriptor this thread owns.
            while unsafe { libc::poll(&mut watched, 1, -1) } < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {}
            tracing::warn!("the master is gone; closing the listener and finishing in-flight requests");
            server.start_draining();
            close_listener();
            std::thread::sleep(stop_timeout + Duration::from_secs(1));
            tracing::error!("the master is gone and in-flight requests did not finish within stop_timeout; exiting");
            server.flush_access_log();
            // SAFETY: ends the process without unwinding other threads.
            unsafe { libc::_exit(1) }
        })
        .context("cannot start the master watch thread")?;
    Ok(())
}

/// Closes this process's handle on the listening socket from any thread,
/// without freeing the descriptor number under the event loop: it is
/// replaced by `/dev/null`, which the accept loop closes when it ends.
fn close_listener() {
    let mut open = LISTENER_OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if !*open {
        return;
    }
    match std::fs::File::open("/dev/null") {
        // SAFETY: dup3 atomically replaces fd LISTENER_FD, which the lock
        // proves is still the listener, with a duplicate of /dev/null.
        Ok(null) => unsafe {
            libc::dup3(null.as_raw_fd(), LISTENER_FD, libc::O_CLOEXEC);
        },
        Err(e) => tracing::warn!("cannot close the listener: {e}"),
    }
    *open = false;
}

/// Serves until the master asks for a drain or a stop, or goes away.
async fn run_until_told(
    spec: &WorkerSpec,
    server: &Server,
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let lame_duck = Duration::from_millis(spec.lame_duck_ms);
    let stop_timeout = Duration::from_millis(spec.stop_timeout_ms);
    loop {
        let message = tokio::select! {
            message = read_line::<_, ToWorker>(reader) => message,
            _ = sigterm.recv() => Ok(Some(ToWorker::Drain)),
        };
        match message {
            Ok(Some(ToWorker::Connections)) => {
                let connections = server.connections();
                write_line(writer, &FromWorker::Connections { connections }).await?;
            }
            Ok(Some(ToWorker::ReopenLog { path })) => {
                server.flush_access_log();
                if let Some(path) = path {
                    if let Err(e) = crate::logfile::reopen(&path) {
                        tracing::warn!("{e:#}");
                    }
                }
                server.reopen_access_log();
            }
            Ok(Some(ToWorker::ReloadNotify)) => {
                (server.handler().reload())();
            }
            Ok(Some(ToWorker::Drain)) | Ok(None) => {
                if !server.drain(lame_duck, stop_timeout).await {
                    tracing::warn!("stop timeout reached with connections still open");
                }
                break;
            }
            Ok(Some(ToWorker::Stop)) => {
                server.stop_now();
                break;
            }
            Ok(Some(ToWorker::Start(_))) => tracing::warn!("ignoring a second start message"),
            Err(e) => {
                tracing::warn!(error = %e, "bad message from the master; draining");
                server.drain(lame_duck, stop_timeout).await;
                break;
            }
        }
    }
    server.flush_access_log();
    (server.handler().stop())();
    Ok(())
}
