//! Starting a worker process: fork + exec of our own executable.
//!
//! `/proc/self/exe` keeps the running host build even if the binary on disk
//! is rebuilt. Fds are mapped with `command-fds`, which handles the
//! `dup2(fd, fd)` trap (a no-op that keeps `FD_CLOEXEC`). In the child,
//! before exec, we reset the signal mask (it survives exec), leave the
//! terminal's process group (a Ctrl-C is for the master, which then stops
//! its workers in order), and ask for SIGTERM when the master dies.
//!
//! Once started, a worker is watched by small tasks that only turn its
//! exit and its messages into [`Event`]s for the master's loop.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context as _, Result};
use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::io::BufReader;
use tokio::sync::mpsc;

use super::lifecycle::WorkerId;
use super::Event;
use crate::config::{GroupConfig, GroupPart, RunDir};
use crate::counters::SharedCounters;
use crate::protocol::worker::{
    FromWorker, GatewaySpec, ToWorker, WorkerRole, WorkerSpec, POOL_THREADS_ENV,
};
use crate::protocol::{read_line, write_line};
use crate::spread::SpreadTable;
use crate::versions::store::Version;

/// For profilers: a command, split on whitespace, that runs each worker
/// (`HOST_WORKER_WRAPPER="valgrind --tool=callgrind"`, see
/// `scripts/profile`). Read from the master's environment at each spawn.
pub const WORKER_WRAPPER_ENV: &str = "HOST_WORKER_WRAPPER";

/// A freshly spawned worker, before it reports anything.
pub struct Spawned {
    /// The process.
    pub child: tokio::process::Child,
    /// Its pid.
    pub pid: u32,
    /// The master's end of its channel.
    pub channel: tokio::net::UnixStream,
    /// Its counters.
    pub counters: SharedCounters,
}

/// Starts `host worker` for one slot, handing it the group's listener.
/// `pool_threads` sizes the worker's handler-call pool; it is passed in the
/// environment because the worker builds its runtime before it reads its spec.
pub fn spawn_worker(
    listener: &std::net::TcpListener,
    label: &str,
    pool_threads: usize,
) -> Result<Spawned> {
    let listener: OwnedFd = listener
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate the listener")?;
    let (ours, theirs) = UnixStream::pair().context("cannot create the worker channel")?;
    let (counters, counters_fd) = SharedCounters::create()?;
    let spread_fd = spread_table_of(&listener)?;
    let master_pid = nix::unistd::getpid();

    let mut command = match std::env::var(WORKER_WRAPPER_ENV) {
        Ok(wrapper) if !wrapper.trim().is_empty() => {
            let mut words = wrapper.split_whitespace();
            let mut command = tokio::process::Command::new(words.next().unwrap_or_default());
            // The wrapper's own /proc/self/exe would be the wrapper.
            command.args(words).arg(format!("/proc/{master_pid}/exe"));
            command
        }
        _ => {
            let mut command = tokio::process::Command::new("/proc/self/exe");
            command.arg0(format!("host: worker {label}"));
            command
        }
    };
    command
        .arg("worker")
        .env("LISTEN_FDS", "1")
        .env("LD_BIND_NOW", "1")
        .env(POOL_THREADS_ENV, pool_threads.to_string())
        // systemd talks to the master only.
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    command
        .fd_mappings(vec![
            FdMapping {
                parent_fd: listener,
                child_fd: 3,
            },
            FdMapping {
                parent_fd: theirs.into(),
                child_fd: 4,
            },
            FdMapping {
                parent_fd: counters_fd,
                child_fd: 5,
            },
            FdMapping {
                parent_fd: spread_fd,
                child_fd: 6,
            },
        ])
        .context("worker fd mapping")?;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            // The master may have died between fork and prctl.
            if nix::unistd::getppid() != master_pid {
                nix::unistd::write(std::io::stderr(), b"host worker: master gone\n").ok();
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = command.spawn().context("cannot start a worker process")?;
    let pid = child.id().context("worker exited at once")?;
    ours.set_nonblocking(true)?;
    let channel = tokio::net::UnixStream::from_std(ours)?;
    Ok(Spawned {
        child,
        pid,
        channel,
        counters,
    })
}

/// The spread table of a listening socket (keyed by its inode: every
/// worker of a group shares the socket, so they share the table), created
/// at its first worker and kept for the master's life, like the socket.
fn spread_table_of(listener: &OwnedFd) -> Result<OwnedFd> {
    static TABLES: std::sync::Mutex<Vec<(u64, OwnedFd)>> = std::sync::Mutex::new(Vec::new());
    let inode = nix::sys::stat::fstat(listener)
        .context("cannot stat the listener")?
        .st_ino;
    let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let fd = match tables.iter().find(|(i, _)| *i == inode) {
        Some((_, fd)) => fd,
        None => {
            tables.push((inode, SpreadTable::create()?));
            &tables[tables.len() - 1].1
        }
    };
    fd.try_clone().context("cannot duplicate the spread table")
}

/// What a worker of `config` in `slot` is told to load and how to serve.
pub fn worker_spec(
    config: &GroupConfig,
    slot: usize,
    version: &Version,
    run_dir: &RunDir,
) -> WorkerSpec {
    let role = match &config.part {
        GroupPart::Http => WorkerRole::Http {
            push: config
                .push
                .iter()
                .flat_map(|target| {
                    (0..config.push_gateways).map(|index| run_dir.gateway_socket(target, index))
                })
                .collect(),
        },
        GroupPart::Gateways { of } => WorkerRole::Gateway(GatewaySpec {
            index: slot as u32,
            socket: run_dir.gateway_socket(of, slot),
            protocol: config.protocol,
            max_message_size: config.max_message_size,
            max_line: config.max_line,
            max_outbound_bytes: config.max_outbound_bytes,
            ping_interval_ms: config.ping_interval.as_millis() as u64,
            missed_pongs: config.missed_pongs,
            idle_timeout_ms: config.idle_timeout.as_millis() as u64,
            max_queued_events: config.max_queued_events,
            origins: config.origins.clone(),
        }),
        GroupPart::Business { gateways } => WorkerRole::Business {
            gateways: (0..*gateways)
                .map(|index| run_dir.gateway_socket(&config.name, index))
                .collect(),
        },
    };
    WorkerSpec {
        group: config.name.clone(),
        slot,
        handler: version.path.clone(),
        source: version.source.clone(),
        version: version.short().to_owned(),
        settings: config.settings_as_text(),
        dispatch: config.dispatch,
        pool_threads: config.pool_threads,
        lame_duck_ms: config.lame_duck.as_millis() as u64,
        // The worker gives up a little after the master would kill it,
        // so a stuck drain is reported by the master, with its counts.
        stop_timeout_ms: (config.stop_timeout + Duration::from_millis(500)).as_millis() as u64,
        max_body_bytes: config.max_body_bytes,
        max_header_bytes: config.max_header_bytes,
        header_timeout_ms: config.header_timeout.as_millis() as u64,
        body_timeout_ms: config.body_timeout.as_millis() as u64,
        request_timeout_ms: config.request_timeout.map(|t| t.as_millis() as u64),
        access_log: config.access_log.clone(),
        access_log_format: config.access_log_format,
        role,
    }
}

/// Tasks that turn a worker's exit and messages into events.
pub fn watch_worker(
    id: WorkerId,
    mut child: tokio::process::Child,
    channel: tokio::net::UnixStream,
    mut outbox: mpsc::UnboundedReceiver<ToWorker>,
    events: &mpsc::UnboundedSender<Event>,
) {
    let exits = events.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        if let Ok(status) = status {
            let _ = exits.send(Event::Exited(id, status));
        }
    });
    let (reader, mut writer) = channel.into_split();
    tokio::spawn(async move {
        while let Some(message) = outbox.recv().await {
            if write_line(&mut writer, &message).await.is_err() {
                break;
            }
        }
    });
    let events = events.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader);
        while let Ok(Some(message)) = read_line::<_, FromWorker>(&mut reader).await {
            if events.send(Event::Worker(id, message)).is_err() {
                break;
            }
        }
    });
}

/// How a process ended, in words.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal)
                .map_or_else(|_| signal.to_string(), |s| s.as_str().to_owned());
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("killed by {name}{core}")
        }
        _ => "unknown status".to_owned(),
    }
}
