//! The worker table and its transitions.
//!
//! A group has a fixed number of slots; each slot has at most one serving
//! worker (`current`) and the version it should run. Workers move through
//! `Starting → Ready → Draining → gone`. A worker that dies unexpectedly is
//! replaced with its slot's version, after a backoff that grows while
//! workers keep dying right after start (a crash loop never spins).
//! Reloads live in `reload.rs`; this file calls into them when an event
//! concerns a reload's replacement or retiring worker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::BufReader;
use tokio::sync::mpsc;

use super::admin::{AdminAnswer, AdminQuery};
use super::metrics::{ExitReason, Metrics};
use crate::versions::pins;
use super::reload::{QueuedReload, ReloadRun};
use super::spawn::spawn_worker;
use crate::versions::store::{HandlerStore, Version};
use super::systemd::{self, ActivatedListener};
use super::{report_ready, Event, SignalAction};
use crate::config::{Config, GroupConfig, RunDir};
use crate::counters::{SharedCounters, WorkerCounters};
use crate::protocol::control::{
    ControlReply, ControlRequest, GroupStatus, StatusReport, WorkerState, WorkerStatus,
};
use crate::protocol::worker::{FromWorker, ToWorker, WorkerSpec};
use crate::protocol::{read_line, write_line};

/// Identifies a worker for the master's whole life (pids get reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

/// A group of identical workers on one listener.
pub struct Group {
    pub config: GroupConfig,
    pub listener: std::net::TcpListener,
    pub addr: SocketAddr,
    /// The version new workers of this group run.
    pub version: Arc<Version>,
    pub slots: Vec<Slot>,
}

/// One position in a group.
pub struct Slot {
    /// The worker serving this slot.
    pub current: Option<WorkerId>,
    /// The version this slot runs (differs from the group's mid-reload).
    pub version: Arc<Version>,
    /// Consecutive quick deaths, for the restart backoff.
    failures: u32,
}

/// Why a worker was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// To fill its slot (at start, or after a death).
    Fill,
    /// To replace the slot's worker in a reload.
    Replacement,
}

/// One worker process.
pub struct Worker {
    pub group: usize,
    pub slot: usize,
    pub pid: u32,
    pub version: Arc<Version>,
    pub state: WorkerState,
    pub role: Role,
    pub spawned_at: Instant,
    pub ready_at: Option<Instant>,
    handler_version: Option<String>,
    /// Set once a start failure has been dealt with, so the exit that
    /// follows is not dealt with again.
    failed: bool,
    /// Set when the master killed it at its stop timeout.
    killed: bool,
    to_worker: mpsc::UnboundedSender<ToWorker>,
    pub counters: SharedCounters,
}

/// Where the master is in its life.
enum Phase {
    /// Waiting for the first workers; the sender reports the outcome.
    Starting(Option<OwnedFd>),
    Running,
    Stopping,
}

/// The supervisor state; see the module docs.
pub struct Master {
    pub groups: Vec<Group>,
    pub workers: BTreeMap<WorkerId, Worker>,
    pub store: HandlerStore,
    pub run_dir: RunDir,
    pub events: mpsc::UnboundedSender<Event>,
    pub reload: Option<ReloadRun>,
    pub queued_reload: Option<QueuedReload>,
    /// Keeps the handler-file watch alive (watch mode only).
    _watch: Option<super::watch::HandlerWatch>,
    /// Versions whose self-description is already in the store.
    described: std::collections::HashSet<String>,
    /// `host stop` callers; their connections close when the master exits.
    stop_waiters: Vec<mpsc::UnboundedSender<ControlReply>>,
    next_id: u64,
    phase: Phase,
    started: Instant,
    restarts: u64,
    /// `host connections` requests waiting for workers.
    pub connection_queries: Vec<super::connections::ConnectionsQuery>,
    pub next_query: u64,
    /// Request, worker and reload metrics.
    pub metrics: Metrics,
    /// Where the admin listener listens.
    pub admin_addr: Option<SocketAddr>,
    /// Finished reloads, by result.
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

impl Master {
    /// Binds every listener and snapshots every handler; starts nothing yet.
    pub fn new(
        config: Config,
        store: HandlerStore,
        run_dir: RunDir,
        mut activated: Vec<ActivatedListener>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<Master> {
        let pins = pins::load_pins(&run_dir)?;
        let mut groups = Vec::new();
        for group in config.groups {
            let adopted = activated
                .iter()
                .position(|a| a.name == group.name)
                .or_else(|| {
                    activated
                        .iter()
                        .position(|a| a.listener.local_addr().ok() == Some(group.listen))
                });
            let listener = match adopted {
                Some(index) => {
                    let adopted = activated.swap_remove(index);
                    tracing::info!(group = %group.name, fd_name = %adopted.name, "using the socket-activated listener");
                    adopted.listener
                }
                None => bind(group.listen).with_context(|| {
                    format!("group {}: cannot listen on {}", group.name, group.listen)
                })?,
            };
            let addr = listener.local_addr()?;
            let version = pins::chosen_version(&store, &pins, &group, None)?;
            let slots = (0..group.count)
                .map(|_| Slot {
                    current: None,
                    version: version.clone(),
                    failures: 0,
                })
                .collect();
            groups.push(Group {
                config: group,
                listener,
                addr,
                version,
                slots,
            });
        }
        let watch = if config.watch {
            let files = groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.config.reloadable)
                .map(|(i, g)| (i, g.config.handler.clone()))
                .collect();
            Some(super::watch::HandlerWatch::start(files, events.clone())?)
        } else {
            None
        };
        for unused in activated {
            tracing::warn!(fd_name = %unused.name, "socket-activated listener matches no group; closing it");
        }
        Ok(Master {
            metrics: Metrics::default(),
            connection_queries: Vec::new(),
            next_query: 0,
            admin_addr: None,
            groups,
            workers: BTreeMap::new(),
            store,
            run_dir,
            _watch: watch,
            described: Default::default(),
            events,
            reload: None,
            queued_reload: None,
            stop_waiters: Vec::new(),
            next_id: 0,
            phase: Phase::Running,
            started: Instant::now(),
            restarts: 0,
            reloads_ok: 0,
            reloads_failed: 0,
        })
    }

    /// Starts every worker, then handles events until stopped.
    pub async fn run(
        &mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        ready: Option<OwnedFd>,
    ) -> Result<()> {
        self.phase = Phase::Starting(ready);
        for g in 0..self.groups.len() {
            for s in 0..self.groups[g].slots.len() {
                let version = self.groups[g].version.clone();
                if let Err(e) = self.spawn(g, s, version, Role::Fill) {
                    self.start_failed(format!("{e:#}"));
                }
            }
        }
        let mut start_error = None;
        while let Some(event) = events.recv().await {
            if let Some(error) = self.handle(event) {
                start_error.get_or_insert(error);
            }
            if matches!(self.phase, Phase::Stopping) && self.workers.is_empty() {
                break;
            }
        }
        match start_error {
            Some(error) => Err(anyhow::anyhow!(error)),
            None => {
                tracing::info!("stopped");
                Ok(())
            }
        }
    }

    /// Applies one event. Returns the error that ended a failed start.
    fn handle(&mut self, event: Event) -> Option<String> {
        match event {
            Event::Worker(
                id,
                FromWorker::Ready {
                    handler_name,
                    handler_version,
                },
            ) => self.on_ready(id, handler_name, handler_version),
            Event::Worker(id, FromWorker::Failed { error }) => {
                return self.on_start_failure(id, error)
            }
            Event::Worker(id, FromWorker::Connections { connections }) => {
                self.worker_connections(id, connections)
            }
            Event::ConnectionsTimeout(query) => self.connections_timeout(query),
            Event::StartTimeout(id) => {
                if let Some(worker) = self.workers.get(&id) {
                    if worker.state == WorkerState::Starting && !worker.failed {
                        let timeout = self.groups[worker.group].config.start_timeout;
                        return self.on_start_failure(
                            id,
                            format!(
                                "did not report ready within its start_timeout ({})",
                                humantime_secs(timeout)
                            ),
                        );
                    }
                }
            }
            Event::Exited(id, status) => return self.on_exit(id, status),
            Event::StopTimeout(id) => self.on_stop_timeout(id),
            Event::RestartDue { group, slot } => self.on_restart_due(group, slot),
            Event::Control(request, reply) => self.on_control(request, reply),
            Event::Signal(action) => self.on_signal(action),
            Event::HandlerChanged(group) => self.on_handler_changed(group),
            Event::Admin(query, reply) => {
                let _ = reply.send(self.on_admin(query));
            }
        }
        None
    }

    /// Starts a worker process for a slot.
    pub fn spawn(
        &mut self,
        group: usize,
        slot: usize,
        version: Arc<Version>,
        role: Role,
    ) -> Result<WorkerId> {
        let config = &self.groups[group].config;
        let label = format!("{}/{}", config.name, slot);
        let spawned = spawn_worker(&self.groups[group].listener, &label, config.pool_threads)?;
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        let spec = WorkerSpec {
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
        };
        let (to_worker, outbox) = mpsc::unbounded_channel();
        let _ = to_worker.send(ToWorker::Start(Box::new(spec)));
        self.watch_worker(id, spawned.child, spawned.channel, outbox);
        let start_timeout = config.start_timeout;
        self.after(start_timeout, Event::StartTimeout(id));
        tracing::debug!(worker = %label, pid = spawned.pid, version = version.short(), "worker spawned");
        self.metrics.worker_started(&self.groups[group].config.name);
        self.workers.insert(
            id,
            Worker {
                group,
                slot,
                pid: spawned.pid,
                version,
                state: WorkerState::Starting,
                role,
                spawned_at: Instant::now(),
                ready_at: None,
                handler_version: None,
                failed: false,
                killed: false,
                to_worker,
                counters: spawned.counters,
            },
        );
        Ok(id)
    }

    /// Tasks that turn a worker's exit and messages into events.
    fn watch_worker(
        &self,
        id: WorkerId,
        mut child: tokio::process::Child,
        channel: tokio::net::UnixStream,
        mut outbox: mpsc::UnboundedReceiver<ToWorker>,
    ) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            if let Ok(status) = status {
                let _ = events.send(Event::Exited(id, status));
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
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            while let Ok(Some(message)) = read_line::<_, FromWorker>(&mut reader).await {
                if events.send(Event::Worker(id, message)).is_err() {
                    break;
                }
            }
        });
    }

    /// Sends `event` to the master after `delay`.
    pub fn after(&self, delay: Duration, event: Event) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event);
        });
    }

    /// The `group/slot` label of a worker, for logs and messages.
    pub fn label(&self, group: usize, slot: usize) -> String {
        format!("{}/{}", self.groups[group].config.name, slot)
    }

    fn on_ready(&mut self, id: WorkerId, handler_name: String, handler_version: String) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.state != WorkerState::Starting || worker.failed {
            return;
        }
        worker.state = WorkerState::Ready;
        worker.ready_at = Some(Instant::now());
        worker.handler_version = Some(handler_version.clone());
        let (group, slot, role, pid) = (worker.group, worker.slot, worker.role, worker.pid);
        let version = worker.version.clone();
        if self.described.insert(version.hash.clone()) {
            let _ = self
                .store
                .record_handler(&version.hash, &format!("{handler_name} {handler_version}"));
        }
        tracing::info!(
            worker = %self.label(group, slot),
            pid,
            version = version.short(),
            handler = %format!("{handler_name} {handler_version}"),
            "worker ready"
        );
        match role {
            Role::Fill => {
                let slot_state = &mut self.groups[group].slots[slot];
                slot_state.current = Some(id);
                slot_state.version = version;
                self.check_started();
            }
            Role::Replacement => self.reload_replacement_ready(id),
        }
    }

    /// Deals with a worker that could not start.
    fn on_start_failure(&mut self, id: WorkerId, error: String) -> Option<String> {
        let worker = self.workers.get_mut(&id)?;
        if worker.failed {
            return None;
        }
        worker.failed = true;
        let (group, slot, role, pid) = (worker.group, worker.slot, worker.role, worker.pid);
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let label = self.label(group, slot);
        tracing::error!(worker = %label, pid, "worker failed to start: {error}");
        match role {
            Role::Replacement => {
                self.reload_replacement_failed(
                    id,
                    format!("worker {label} failed to start: {error}"),
                );
                None
            }
            Role::Fill if matches!(self.phase, Phase::Starting(_)) => {
                let error = format!("worker {label} failed to start: {error}");
                self.start_failed(error.clone());
                Some(error)
            }
            Role::Fill => {
                self.schedule_restart(group, slot, true);
                None
            }
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: ExitStatus) -> Option<String> {
        let worker = self.workers.get(&id)?;
        let (group, slot, state, failed) = (worker.group, worker.slot, worker.state, worker.failed);
        let label = self.label(group, slot);
        let how = describe_exit(status);
        let mut start_error = None;
        match state {
            WorkerState::Starting if !failed => {
                let what = if status.code().is_some() {
                    "exited"
                } else {
                    "crashed"
                };
                start_error = self.on_start_failure(id, format!("{what} during start ({how})"));
            }
            WorkerState::Starting => {}
            WorkerState::Draining => {
                tracing::info!(worker = %label, pid = worker.pid, "worker retired ({how})")
            }
            WorkerState::Ready => {
                let lived = worker.ready_at.map_or(Duration::ZERO, |t| t.elapsed());
                tracing::warn!(worker = %label, pid = worker.pid, "worker exited unexpectedly ({how})");
                if self.groups[group].slots[slot].current == Some(id) {
                    self.groups[group].slots[slot].current = None;
                    self.restarts += 1;
                    self.schedule_restart(group, slot, lived < Duration::from_secs(5));
                }
            }
        }
        if let Some(worker) = self.workers.remove(&id) {
            let reason = match worker.state {
                WorkerState::Starting => ExitReason::StartFailed,
                WorkerState::Draining if worker.killed => ExitReason::Killed,
                WorkerState::Draining => ExitReason::Retired,
                WorkerState::Ready => ExitReason::Crashed,
            };
            let group = &self.groups[worker.group].config.name;
            self.metrics
                .worker_ended(id, group, worker.version.short(), &worker.counters, reason);
        }
        self.reload_worker_gone(id);
        self.connections_worker_gone(id);
        start_error
    }

    fn on_stop_timeout(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        if worker.state != WorkerState::Draining {
            return;
        }
        // As the worker last published them: a frozen worker cannot say more.
        let in_flight = WorkerCounters::get(&worker.counters.in_flight);
        let connections = WorkerCounters::get(&worker.counters.connections);
        let group = self.groups[worker.group].config.name.clone();
        tracing::warn!(
            worker = %self.label(worker.group, worker.slot),
            pid = worker.pid,
            connections,
            in_flight,
            "worker did not finish within its stop timeout; killed with {connections} connection(s) open and {in_flight} request(s) in flight"
        );
        let _ = kill(Pid::from_raw(worker.pid as i32), Signal::SIGKILL);
        if let Some(worker) = self.workers.get_mut(&id) {
            worker.killed = true;
        }
        self.metrics.worker_killed(&group, connections, in_flight);
        self.reload_worker_killed(id, in_flight, connections);
    }

    fn schedule_restart(&mut self, group: usize, slot: usize, quick_death: bool) {
        if matches!(self.phase, Phase::Stopping) {
            return;
        }
        let state = &mut self.groups[group].slots[slot];
        state.failures = if quick_death { state.failures + 1 } else { 0 };
        let delay = match state.failures {
            0 => Duration::ZERO,
            n => Duration::from_millis(100u64 << n.min(7)).min(Duration::from_secs(10)),
        };
        if !delay.is_zero() {
            tracing::info!(worker = %self.label(group, slot), "restarting in {} ms", delay.as_millis());
        }
        self.after(delay, Event::RestartDue { group, slot });
    }

    fn on_restart_due(&mut self, group: usize, slot: usize) {
        if matches!(self.phase, Phase::Stopping) || self.groups[group].slots[slot].current.is_some()
        {
            return;
        }
        // A reload replacement already on its way will fill the slot.
        let pending = self.workers.values().any(|w| {
            w.group == group && w.slot == slot && w.state == WorkerState::Starting && !w.failed
        });
        if pending {
            return;
        }
        let version = self.groups[group].slots[slot].version.clone();
        if let Err(e) = self.spawn(group, slot, version, Role::Fill) {
            tracing::error!(worker = %self.label(group, slot), "cannot restart worker: {e:#}");
            self.schedule_restart(group, slot, true);
        }
    }

    /// Whether the master is on its way out.
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping)
    }

    /// Tells a worker to drain, and bounds how long it may take.
    pub fn retire(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.state == WorkerState::Draining {
            return;
        }
        worker.state = WorkerState::Draining;
        let _ = worker.to_worker.send(ToWorker::Drain);
        let stop_timeout = self.groups[worker.group].config.stop_timeout;
        self.after(stop_timeout, Event::StopTimeout(id));
    }

    /// Sends a message to a worker.
    pub fn tell(&self, id: WorkerId, message: ToWorker) {
        if let Some(worker) = self.workers.get(&id) {
            let _ = worker.to_worker.send(message);
        }
    }

    fn check_started(&mut self) {
        if !matches!(self.phase, Phase::Starting(_)) {
            return;
        }
        let all_ready = self
            .groups
            .iter()
            .all(|g| g.slots.iter().all(|s| s.current.is_some()));
        if !all_ready {
            return;
        }
        let summary = self
            .groups
            .iter()
            .map(|g| {
                format!(
                    "{} on {} ({} workers, version {})",
                    g.config.name,
                    g.addr,
                    g.slots.len(),
                    g.version.short()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!("serving {summary}");
        systemd::ready(&format!("serving {summary}"));
        for group in &self.groups {
            if let Err(e) = pins::record(&self.run_dir, &group.config.name, &group.version.hash) {
                tracing::warn!("cannot record version history: {e:#}");
            }
        }
        if let Phase::Starting(ready) = std::mem::replace(&mut self.phase, Phase::Running) {
            report_ready(ready, &Ok(summary));
        }
    }

    fn start_failed(&mut self, error: String) {
        if let Phase::Starting(ready) = std::mem::replace(&mut self.phase, Phase::Running) {
            report_ready(ready, &Err(error));
        }
        self.stop(true);
    }

    /// Stops every worker; the master exits once they are gone.
    fn stop(&mut self, now: bool) {
        if matches!(self.phase, Phase::Stopping) && !now {
            return;
        }
        tracing::info!(graceful = !now, "stopping");
        systemd::stopping();
        self.phase = Phase::Stopping;
        self.reload_abandon("host is stopping");
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let Some(worker) = self.workers.get(&id) else {
                continue;
            };
            match (worker.state, now) {
                (WorkerState::Starting, _) => {
                    let _ = kill(Pid::from_raw(worker.pid as i32), Signal::SIGKILL);
                    // Its exit is the stop, not a start failure to report.
                    if let Some(worker) = self.workers.get_mut(&id) {
                        worker.failed = true;
                    }
                }
                (_, true) => {
                    self.tell(id, ToWorker::Stop);
                    // A fast stop still bounds a stuck worker.
                    self.after(Duration::from_secs(2), Event::StopTimeout(id));
                    if let Some(worker) = self.workers.get_mut(&id) {
                        worker.state = WorkerState::Draining;
                    }
                }
                (WorkerState::Ready, false) => self.retire(id),
                (WorkerState::Draining, false) => {}
            }
        }
    }

    fn on_signal(&mut self, action: SignalAction) {
        match action {
            SignalAction::GracefulStop => self.stop(false),
            SignalAction::FastStop => self.stop(true),
            SignalAction::Reload => self.reload_in_background(None, None),
            SignalAction::ReopenLog => self.reopen_log(),
        }
    }

    /// Reopens the daemon's log file, in the master and every worker.
    fn reopen_log(&mut self) {
        let Some(path) = std::env::var_os(crate::logfile::LOG_FILE_ENV) else {
            tracing::info!("SIGUSR2: not daemonized, no log file to reopen");
            return;
        };
        let path = std::path::PathBuf::from(path);
        if let Err(e) = crate::logfile::reopen(&path) {
            tracing::error!("{e:#}");
            return;
        }
        for worker in self.workers.values() {
            let _ = worker
                .to_worker
                .send(ToWorker::ReopenLog { path: path.clone() });
        }
        tracing::info!(file = %path.display(), "log file reopened");
    }

    /// Starts a reload nobody waits on; its outcome is only logged.
    fn reload_in_background(&mut self, group: Option<String>, snapshot: Option<Arc<Version>>) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let (reply, mut replies) = mpsc::unbounded_channel();
        self.request_reload(group, reply, snapshot);
        tokio::spawn(async move {
            while let Some(reply) = replies.recv().await {
                if let ControlReply::Error { message } = reply {
                    tracing::warn!("reload refused: {message}");
                }
            }
        });
    }

    fn on_handler_changed(&mut self, group: usize) {
        let name = self.groups[group].config.name.clone();
        if pins::load_pins(&self.run_dir).is_ok_and(|pins| pins.contains_key(&name)) {
            tracing::info!(group = %name, "handler file changed, but the group is pinned; not reloading");
            return;
        }
        // The snapshot the reload will use: the file is read and hashed once.
        let config = &self.groups[group].config;
        let snapshot = match self
            .store
            .import(&config.handler, None, config.allow_writable_handler)
        {
            Ok(snapshot) => snapshot,
            // Missing for a moment while it is replaced; the event of its
            // creation follows.
            Err(e) if is_not_found(&e) => return,
            Err(e) => {
                tracing::warn!(group = %name, "handler file changed but cannot be used: {e:#}");
                return;
            }
        };
        if snapshot.hash == self.groups[group].version.hash && self.reload.is_none() {
            tracing::debug!(group = %name, "handler file touched but unchanged");
            return;
        }
        tracing::info!(group = %name, version = snapshot.short(), "handler file changed; reloading");
        self.reload_in_background(Some(name), Some(snapshot));
    }

    fn on_control(&mut self, request: ControlRequest, reply: mpsc::UnboundedSender<ControlReply>) {
        match request {
            ControlRequest::Status => {
                let _ = reply.send(ControlReply::Status(self.status()));
            }
            ControlRequest::Connections => self.query_connections(reply),
            ControlRequest::Stop { now } => {
                let _ = reply.send(ControlReply::Accepted {
                    message: if now {
                        "stopping now".into()
                    } else {
                        "stopping gracefully".into()
                    },
                });
                self.stop_waiters.push(reply);
                self.stop(now);
            }
            ControlRequest::Reload { group } => {
                if matches!(self.phase, Phase::Running) {
                    self.request_reload(group, reply, None);
                } else {
                    let _ = reply.send(ControlReply::Error {
                        message: "host is starting or stopping".into(),
                    });
                }
            }
        }
    }

    fn on_admin(&mut self, query: AdminQuery) -> AdminAnswer {
        match query {
            AdminQuery::Metrics => {
                let groups = self.groups.iter().map(|g| g.config.name.as_str());
                let workers = self.workers.iter().map(|(id, w)| {
                    (
                        *id,
                        self.groups[w.group].config.name.as_str(),
                        w.version.short(),
                        &*w.counters,
                    )
                });
                let text = self.metrics.render(groups, workers);
                (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            }
            AdminQuery::Health => {
                let mut healthy = !matches!(self.phase, Phase::Stopping);
                let mut text = String::new();
                for group in &self.groups {
                    let ready = self.ready_workers(group);
                    healthy &= ready > 0;
                    text.push_str(&format!(
                        "{} {}/{} ready\n",
                        group.config.name,
                        ready,
                        group.slots.len()
                    ));
                }
                let status = if healthy { 200 } else { 503 };
                (
                    status,
                    "text/plain; charset=utf-8",
                    format!("{}\n{text}", if healthy { "ok" } else { "not ready" }),
                )
            }
        }
    }

    /// Slots of `group` whose worker is ready.
    fn ready_workers(&self, group: &Group) -> usize {
        group
            .slots
            .iter()
            .filter_map(|s| s.current)
            .filter(|id| {
                self.workers
                    .get(id)
                    .is_some_and(|w| w.state == WorkerState::Ready)
            })
            .count()
    }

    /// What `host status` shows.
    pub fn status(&self) -> StatusReport {
        let groups = self
            .groups
            .iter()
            .map(|g| GroupStatus {
                name: g.config.name.clone(),
                listen: g.addr.to_string(),
                count: g.slots.len(),
                reloadable: g.config.reloadable,
                version: g.version.short().to_owned(),
                slot_versions: g.slots.iter().map(|s| s.version.hash.clone()).collect(),
                handler: g.config.handler.display().to_string(),
                ready: self.ready_workers(g),
            })
            .collect();
        let workers = self
            .workers
            .values()
            .map(|w| WorkerStatus {
                group: self.groups[w.group].config.name.clone(),
                slot: w.slot,
                pid: w.pid,
                state: w.state,
                version: w.version.short().to_owned(),
                handler_version: w.handler_version.clone(),
                uptime_secs: w.spawned_at.elapsed().as_secs_f64(),
                requests: WorkerCounters::get(&w.counters.requests),
                in_flight: WorkerCounters::get(&w.counters.in_flight),
                connections: WorkerCounters::get(&w.counters.connections),
                rss_bytes: rss_bytes(w.pid),
            })
            .collect();
        StatusReport {
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            restarts: self.restarts,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            admin: self.admin_addr.map(|a| a.to_string()),
            reloading: self.reload.is_some(),
            rss_bytes: rss_bytes(std::process::id()),
            groups,
            workers,
        }
    }
}

/// Whether an error comes from a file that does not exist.
fn is_not_found(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    })
}

/// Binds a listener with a deep accept queue, for all workers to share.
fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "; another program (or another host) listens there: `ss -ltnp 'sport = :{}'` shows which, or change listen",
                addr.port()
            ),
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need root (then `user = ...`) or CAP_NET_BIND_SERVICE".to_owned()
            }
            _ => String::new(),
        };
        anyhow::anyhow!("{e}{hint}")
    })?;
    let listener = socket.listen(1024)?.into_std()?;
    Ok(listener)
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

fn humantime_secs(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages
        * nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64
}
