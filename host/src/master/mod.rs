//! The master process: owns the listeners, supervises the workers, runs
//! reloads, and answers the control socket. It never loads a handler.
//!
//! Everything that changes the worker table happens on one task, in
//! [`supervisor::Master::handle`], driven by [`Event`]s. Process waits,
//! worker channels, timers, signals and control connections are small tasks
//! that only turn what they see into events, so every transition can be read
//! (and reasoned about) in one place, with no locks.

mod admin;
mod config_change;
mod connections;
mod control;
mod gateway_metrics;
mod group;
mod handler_files;
mod lifecycle;
mod metrics;
mod privileges;
mod reload;
mod slot;
mod spawn;
mod status;
mod stuck;
mod supervisor;
mod systemd;
mod watch;

use std::fs;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::process::ExitStatus;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::{Config, RunDir};
use crate::protocol::control::{ControlReply, ControlRequest};
use crate::protocol::worker::FromWorker;
use crate::trust::Owners;
use crate::versions::store::HandlerStore;
use lifecycle::WorkerId;
use supervisor::Master;

/// What the master reacts to.
#[derive(Debug)]
pub enum Event {
    /// A worker said something.
    Worker(WorkerId, FromWorker),
    /// A worker process ended.
    Exited(WorkerId, ExitStatus),
    /// A worker's start timeout elapsed.
    StartTimeout(WorkerId),
    /// A retiring worker's stop timeout elapsed.
    StopTimeout(WorkerId),
    /// A reload replacement was spawned a while ago: if the reload still
    /// waits on it, its callers hear how long.
    StillStarting(WorkerId),
    /// A slot's restart backoff elapsed.
    RestartDue {
        /// Group index.
        group: usize,
        /// Slot index.
        slot: usize,
    },
    /// A command from the control socket; replies go to the sender.
    Control(ControlRequest, mpsc::UnboundedSender<ControlReply>),
    /// A signal, in Workerman's and systemd's meanings.
    Signal(SignalAction),
    /// A watched handler file changed (after debouncing).
    HandlerChanged(usize),
    /// Time to look for workers stuck in a handler call (once a second).
    CheckStuck,
    /// A `host connections` query has waited long enough.
    ConnectionsTimeout(u64),
    /// A request on the admin listener.
    Admin(
        admin::AdminQuery,
        tokio::sync::oneshot::Sender<admin::AdminAnswer>,
    ),
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// SIGTERM, SIGQUIT: drain every worker, then exit.
    GracefulStop,
    /// SIGINT: stop every worker now, then exit.
    FastStop,
    /// SIGUSR1, SIGHUP: reload every reloadable group.
    Reload,
    /// SIGUSR2: reopen the log file (after a rotation).
    ReopenLog,
}

/// Runs a master until it is stopped. `ready` receives one line once the
/// workers are ready (`ok`) or the start failed (the error).
pub fn run(config: Config, mut ready: Option<OwnedFd>) -> Result<()> {
    let result = run_master(config, &mut ready);
    if let Err(e) = &result {
        // Failed before the workers started (lock, listener, handler file):
        // a waiting `host start -d` still gets the reason.
        report_ready(ready.take(), &Err(format!("{e:#}")));
    }
    result
}

/// Raises the open-files soft limit to the hard limit, for the master and
/// every worker it starts (they inherit it): each connection is a
/// descriptor. Past the limit, accepts fail ("Too many open files",
/// counted in `accept_errors`) until connections close: raise the hard
/// limit (`ulimit -Hn`, systemd's `LimitNOFILE`) or run more processes.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
            }
        }
    }
}

fn run_master(config: Config, ready: &mut Option<OwnedFd>) -> Result<()> {
    let run_dir = RunDir::of(&config);
    // Before anything in it is used (or handed to `user`).
    let owners = Owners::for_user(config.user.as_deref());
    run_dir.prepare(owners)?;
    let _lock = lock_run_dir(&run_dir)?;
    raise_fd_limit();
    let activated = systemd::take_listeners()?;
    let run_as = privileges::RunAs::resolve(config.user.as_deref())?;
    let store = HandlerStore::open(&run_dir.store(), owners)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the master's runtime")?;
    let result = runtime.block_on(async {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let admin = match config.admin {
            Some(addr) => Some(admin::bind(addr).await?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
        let mut master = Master::new(
            config,
            store,
            run_dir.clone(),
            activated,
            events_tx.clone(),
            admin_addr,
        )?;
        if let Some(admin) = admin {
            tokio::spawn(admin::serve(admin, events_tx.clone()));
        }
        let control = control::bind(&run_dir.control_socket())?;
        tokio::spawn(control::serve(control, events_tx.clone()));
        spawn_signal_listeners(&events_tx)?;
        fs::write(run_dir.pid_file(), format!("{}\n", std::process::id()))
            .context("cannot write the pid file")?;
        if let Some(run_as) = &run_as {
            run_as.drop_privileges(&run_dir.root)?;
        }
        master.run(events_rx, ready.take()).await
    });
    let _ = fs::remove_file(run_dir.control_socket());
    let _ = fs::remove_file(run_dir.pid_file());
    result
}

/// Holds an exclusive lock on the run directory for the master's life.
fn lock_run_dir(run_dir: &RunDir) -> Result<nix::fcntl::Flock<fs::File>> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(run_dir.lock_file())
        .with_context(|| format!("cannot open {}", run_dir.lock_file().display()))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        let pid = fs::read_to_string(run_dir.pid_file()).unwrap_or_default();
        anyhow::anyhow!(
            "host is already running for run directory {} (pid {}); use `host stop` or `host reload`",
            run_dir.root.display(),
            pid.trim()
        )
    })
}

fn spawn_signal_listeners(events: &mpsc::UnboundedSender<Event>) -> Result<()> {
    let table = [
        (SignalKind::terminate(), SignalAction::GracefulStop),
        (SignalKind::quit(), SignalAction::GracefulStop),
        (SignalKind::interrupt(), SignalAction::FastStop),
        (SignalKind::user_defined1(), SignalAction::Reload),
        (SignalKind::hangup(), SignalAction::Reload),
        (SignalKind::user_defined2(), SignalAction::ReopenLog),
    ];
    for (kind, action) in table {
        let mut stream = signal(kind).context("cannot install a signal handler")?;
        let events = events.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if events.send(Event::Signal(action)).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Writes the start outcome for a waiting `host start -d`.
fn report_ready(ready: Option<OwnedFd>, outcome: &Result<String, String>) {
    if let Some(fd) = ready {
        let mut pipe = fs::File::from(fd);
        let line = match outcome {
            Ok(summary) => format!("ok {summary}\n"),
            Err(error) => format!("error {error}\n"),
        };
        let _ = pipe.write_all(line.as_bytes());
    }
}
