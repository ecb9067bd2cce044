//! The worker table and the event loop that drives it.
//!
//! Each [`Group`] has a fixed number of slots (`slot.rs`); each slot has at
//! most one serving worker and the version it should run. Each worker moves
//! through its [`Lifecycle`]; a worker that dies unexpectedly is replaced
//! with its slot's version, after the slot's backoff. Reloads are the
//! [`Reloads`] machine in `reload.rs`.
//!
//! [`Master::handle`] takes one event, asks the machines (a worker's
//! lifecycle, its slot, the reloads) what it means, and carries out what
//! they answer: spawning, signalling and replying happen only here, and
//! only this file changes the table. `status.rs` renders it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use super::config_change::{self, GroupEdit};
use super::connections::{self, ConnectionQueries};
use super::group::{Group, MovedListener};
use super::handler_files::HandlerFiles;
use super::lifecycle::{Lifecycle, Role, WorkerId};
use super::metrics::Metrics;
use super::reload::{Action, Generation, ReloadPlan, Reloads, Reply, Target, WorkerTable};
use super::slot::{WorkerSlot, QUICK_DEATH};
use super::spawn::{describe_exit, spawn_worker, watch_worker, worker_spec};
use super::stuck::StuckWatch;
use super::systemd::{self, ActivatedListener};
use super::watch::HandlerWatch;
use super::{report_ready, Event, SignalAction};
use crate::config::{Config, GroupConfig, GroupPart, RunDir};
use crate::counters::{SharedCounters, WorkerCounters};
use crate::protocol::control::{
    ControlReply, ControlRequest, FailedReload, KilledWorker, WorkerConnections,
};
use crate::protocol::worker::{FromWorker, ToWorker};
use crate::versions::store::{HandlerStore, Version};
use crate::versions::{gc, pins};

/// How often `host reload` hears of a replacement that is still starting.
const WAITING_REPORT: Duration = Duration::from_secs(1);

/// How often workers are checked for `request_timeout`.
const STUCK_CHECK: Duration = Duration::from_secs(1);

/// One worker process.
pub(super) struct Worker {
    pub(super) group: usize,
    pub(super) slot: usize,
    pub(super) pid: u32,
    pub(super) version: Arc<Version>,
    /// The group config it was started with.
    pub(super) config: Arc<GroupConfig>,
    pub(super) lifecycle: Lifecycle,
    pub(super) spawned_at: Instant,
    /// The version string its handler reported when ready.
    pub(super) handler_version: Option<String>,
    to_worker: mpsc::UnboundedSender<ToWorker>,
    pub(super) counters: SharedCounters,
    /// Its progress as last seen, for `request_timeout`.
    pub(super) watch: StuckWatch,
}

/// Where the master is in its life.
enum Stage {
    /// Waiting for the first workers; the sender reports the outcome.
    Starting(Option<OwnedFd>),
    Running,
    Stopping,
}

/// The supervisor state; see the module docs.
pub struct Master {
    /// The config as last applied, without its groups (each [`Group`]
    /// holds its own); reloads read its file again and compare.
    config: Config,
    pub(super) groups: Vec<Group>,
    pub(super) workers: BTreeMap<WorkerId, Worker>,
    store: HandlerStore,
    pub(super) run_dir: RunDir,
    events: mpsc::UnboundedSender<Event>,
    pub(super) reloads: Reloads,
    /// Keeps the handler-file watch alive (watch mode only).
    _watch: Option<HandlerWatch>,
    /// Versions whose self-description is already in the store.
    described: std::collections::HashSet<String>,
    /// `host stop` callers; their connections close when the master exits.
    stop_waiters: Vec<Reply>,
    next_id: u64,
    stage: Stage,
    pub(super) started: Instant,
    pub(super) restarts: u64,
    /// `host connections` requests waiting for workers.
    connection_queries: ConnectionQueries,
    /// Request, worker and reload metrics.
    pub(super) metrics: Metrics,
    /// The hash of each handler file on disk, for status.
    pub(super) handler_files: HandlerFiles,
    /// Where the admin listener listens.
    pub(super) admin_addr: Option<SocketAddr>,
    /// Finished reloads, by result.
    pub(super) reloads_ok: u64,
    pub(super) reloads_failed: u64,
}

/// The reload machine reads the worker table through this.
impl WorkerTable for Master {
    fn serving(&self, group: usize, slot: usize) -> Option<WorkerId> {
        self.groups[group].slots.get(slot)?.serving()
    }

    fn describe(&self, worker: WorkerId) -> Option<(u32, String)> {
        let worker = self.workers.get(&worker)?;
        Some((worker.pid, worker.version.short().to_owned()))
    }

    fn new_worker_id(&mut self) -> WorkerId {
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        id
    }
}

impl Master {
    /// Binds every listener and snapshots every handler; starts nothing yet.
    pub fn new(
        mut config: Config,
        store: HandlerStore,
        run_dir: RunDir,
        mut activated: Vec<ActivatedListener>,
        events: mpsc::UnboundedSender<Event>,
        admin_addr: Option<SocketAddr>,
    ) -> Result<Master> {
        let pins = pins::load_pins(&run_dir)?;
        let mut groups = Vec::new();
        for group in std::mem::take(&mut config.groups) {
            let version = pins::chosen_version(&store, &pins, &group, None)?;
            let group = Arc::new(group);
            let group = match &group.part {
                // Its gateways come right before it and hold the listener;
                // business workers get a handle they never accept on.
                GroupPart::Business { .. } => {
                    let gateways: &Group =
                        groups.last().context("a gateway group without gateways")?;
                    Group::sharing(group, gateways, version)?
                }
                _ => Group::listen(group, &mut activated, version)?,
            };
            groups.push(group);
        }
        let watch = watch_handlers(config.watch, &groups, &events)?;
        for unused in activated {
            tracing::warn!(fd_name = %unused.name, "socket-activated listener matches no group; closing it");
        }
        Ok(Master {
            config,
            metrics: Metrics::default(),
            connection_queries: ConnectionQueries::default(),
            handler_files: HandlerFiles::default(),
            admin_addr,
            groups,
            workers: BTreeMap::new(),
            store,
            run_dir,
            _watch: watch,
            described: Default::default(),
            events,
            reloads: Reloads::default(),
            stop_waiters: Vec::new(),
            next_id: 0,
            stage: Stage::Running,
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
        self.stage = Stage::Starting(ready);
        for g in 0..self.groups.len() {
            for s in 0..self.groups[g].slots.len() {
                let version = self.groups[g].version.clone();
                if let Err(e) = self.fill(g, s, version) {
                    self.start_failed(format!("{e:#}"));
                }
            }
        }
        self.after(STUCK_CHECK, Event::CheckStuck);
        let mut start_error = None;
        while let Some(event) = events.recv().await {
            if let Some(error) = self.handle(event) {
                start_error.get_or_insert(error);
            }
            if self.is_stopping() && self.workers.is_empty() {
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
                self.connection_queries.answered(id, connections)
            }
            Event::ConnectionsTimeout(query) => self.connection_queries.timed_out(query),
            Event::StartTimeout(id) => return self.on_start_timeout(id),
            Event::Exited(id, status) => return self.on_exit(id, status),
            Event::StopTimeout(id) => self.on_stop_timeout(id),
            Event::StillStarting(id) => {
                let actions = self.reloads.still_starting(id, &*self);
                if !actions.is_empty() {
                    self.carry_out(actions);
                    self.after(WAITING_REPORT, Event::StillStarting(id));
                }
            }
            Event::RestartDue { group, slot } => self.on_restart_due(group, slot),
            Event::CheckStuck => {
                self.check_stuck();
                self.after(STUCK_CHECK, Event::CheckStuck);
            }
            Event::Control(request, reply) => self.on_control(request, reply),
            Event::Signal(action) => self.on_signal(action),
            Event::HandlerChanged(group) => self.on_handler_changed(group),
            Event::Admin(query, reply) => {
                let _ = reply.send(self.on_admin(query));
            }
        }
        None
    }

    /// Gives one input to the reload machine and carries out its answer.
    /// The machine reads the worker table (`self`) while it decides.
    pub(super) fn ask_reloads(
        &mut self,
        input: impl FnOnce(&mut Reloads, &mut Master) -> Vec<Action>,
    ) {
        let mut reloads = std::mem::take(&mut self.reloads);
        let actions = input(&mut reloads, self);
        self.reloads = reloads;
        self.carry_out(actions);
    }

    /// Does what the reload machine asked, in order.
    fn carry_out(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Start {
                    group,
                    waiters,
                    snapshot,
                } => self.start_reload(group, waiters, snapshot),
                Action::Notify { group } => {
                    for worker in self.workers.values().filter(|w| w.group == group) {
                        let _ = worker.to_worker.send(ToWorker::ReloadNotify);
                    }
                }
                Action::Spawn {
                    worker,
                    group,
                    slot,
                    generation,
                } => {
                    let slots = &mut self.groups[group].slots;
                    if slots.len() <= slot {
                        slots.resize_with(slot + 1, || WorkerSlot::new(generation.version.clone()));
                    }
                    self.after(WAITING_REPORT, Event::StillStarting(worker));
                    if let Err(e) = self.spawn(worker, group, slot, generation, Role::Replacement) {
                        let error = format!(
                            "cannot start a worker for {}: {e:#}",
                            self.label(group, slot)
                        );
                        self.ask_reloads(|reloads, table| {
                            let mut actions = reloads.replacement_failed(worker, error, table);
                            actions.extend(reloads.worker_gone(worker, table));
                            actions
                        });
                    }
                }
                Action::Retire(worker) => self.retire(worker),
                Action::Kill(worker) => self.kill_stuck(worker),
                Action::Refill { group, slot } => {
                    self.after(Duration::ZERO, Event::RestartDue { group, slot })
                }
                Action::Reply { to, reply } => {
                    for waiter in to {
                        let _ = waiter.send(reply.clone());
                    }
                }
                Action::Finish {
                    error,
                    elapsed,
                    groups,
                } => {
                    let ok = error.is_none();
                    self.count_reload(ok, elapsed);
                    if !self.is_stopping() {
                        systemd::ready("serving");
                    }
                    for settled in groups {
                        let (index, count) = (settled.group, settled.count);
                        let group = &mut self.groups[index];
                        if ok && count > 0 {
                            let hash = &settled.generation.version.hash;
                            if let Err(e) = pins::record(&self.run_dir, &group.config.name, hash) {
                                tracing::warn!("cannot record version history: {e:#}");
                            }
                        }
                        group.settle(settled.generation, count);
                        if let Some(error) = &error {
                            group.last_failed_reload = Some(failed_reload(error));
                        }
                        if group.is_removed() {
                            tracing::info!(group = %group.config.name, "group removed");
                        }
                    }
                    if ok {
                        self.rewatch();
                        self.collect_store_garbage();
                    }
                }
                Action::Refused { elapsed } => self.count_reload(false, elapsed),
            }
        }
    }

    /// Drops store builds nothing needs, so a watch loop's rebuilds do not
    /// fill the disk.
    fn collect_store_garbage(&self) {
        let in_use: Vec<String> = self
            .workers
            .values()
            .map(|w| w.version.hash.clone())
            .chain(self.groups.iter().flat_map(|g| {
                std::iter::once(g.version.hash.clone())
                    .chain(g.slots.iter().map(|s| s.version().hash.clone()))
            }))
            .collect();
        // A reload queued behind this one imports its handler when it starts,
        // so nothing queued needs a build kept here.
        let keep = self.config.keep_versions;
        match gc::collect(&self.store, &self.run_dir, &in_use, keep, false) {
            Ok((removed, _)) if !removed.is_empty() => tracing::info!(
                removed = removed.len(),
                "store: removed builds nothing needs (keep_versions = {})",
                self.config.keep_versions
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("store: cannot collect old builds: {e:#}"),
        }
    }

    fn count_reload(&mut self, ok: bool, elapsed: Duration) {
        self.metrics.reload_done(ok, elapsed.as_secs_f64());
        if ok {
            self.reloads_ok += 1;
        } else {
            self.reloads_failed += 1;
        }
    }

    /// Watches the handler files again after a reload changed the groups.
    fn rewatch(&mut self) {
        match watch_handlers(self.config.watch, &self.groups, &self.events) {
            Ok(watch) => self._watch = watch,
            Err(e) => tracing::warn!("cannot watch the handler files: {e:#}"),
        }
    }

    /// Starts a worker to fill a slot (at start, or after a death).
    fn fill(&mut self, group: usize, slot: usize, version: Arc<Version>) -> Result<()> {
        let id = self.new_worker_id();
        let config = self.groups[group].config.clone();
        self.spawn(id, group, slot, Generation { version, config }, Role::Fill)
    }

    /// Starts a worker process for a slot.
    fn spawn(
        &mut self,
        id: WorkerId,
        group: usize,
        slot: usize,
        generation: Generation,
        role: Role,
    ) -> Result<()> {
        let Generation { version, config } = generation;
        let label = format!("{}/{}", config.name, slot);
        let listener = self.groups[group]
            .listener_for(&config)
            .with_context(|| format!("group {} is removed", config.name))?;
        let spawned = spawn_worker(listener, &label, config.pool_threads)?;
        let spec = worker_spec(&config, slot, &version, &self.run_dir);
        let (to_worker, outbox) = mpsc::unbounded_channel();
        let _ = to_worker.send(ToWorker::Start(Box::new(spec)));
        watch_worker(id, spawned.child, spawned.channel, outbox, &self.events);
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
                config,
                lifecycle: Lifecycle::starting(role),
                spawned_at: Instant::now(),
                handler_version: None,
                to_worker,
                counters: spawned.counters,
                watch: StuckWatch::new(),
            },
        );
        Ok(())
    }

    /// Sends `event` to the master after `delay`.
    fn after(&self, delay: Duration, event: Event) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event);
        });
    }

    /// The `group/slot` label of a worker, for logs and messages.
    fn label(&self, group: usize, slot: usize) -> String {
        format!("{}/{}", self.groups[group].config.name, slot)
    }

    /// A worker reported ready: it takes its slot; a replacement's
    /// predecessor is the reload's to retire.
    fn on_ready(&mut self, id: WorkerId, handler_name: String, handler_version: String) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(role) = worker.lifecycle.ready(Instant::now()) else {
            return;
        };
        worker.handler_version = Some(handler_version.clone());
        let (group, slot, pid) = (worker.group, worker.slot, worker.pid);
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
        let dropped = self.reloads.drops(group, slot);
        let Some(slot_of) = self.groups[group].slots.get_mut(slot).filter(|_| !dropped) else {
            // Restarted after a crash while a reload drops its slot.
            self.retire(id);
            return;
        };
        let previous = slot_of.install(id, version);
        match role {
            Role::Fill => self.check_started(),
            Role::Replacement => {
                self.ask_reloads(|reloads, table| reloads.replacement_ready(id, previous, table))
            }
        }
    }

    /// Deals with a worker that could not start.
    fn on_start_failure(&mut self, id: WorkerId, error: String) -> Option<String> {
        let worker = self.workers.get_mut(&id)?;
        let role = worker.lifecycle.start_failed()?;
        let (group, slot, pid) = (worker.group, worker.slot, worker.pid);
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let label = self.label(group, slot);
        if role == Role::Replacement {
            // The reload's own outcome line carries the error.
            tracing::debug!(worker = %label, pid, "worker failed to start: {error}");
        } else {
            tracing::error!(worker = %label, pid, "worker failed to start: {error}");
        }
        let error = format!("worker {label} failed to start: {error}");
        match role {
            Role::Replacement => {
                self.ask_reloads(|reloads, table| reloads.replacement_failed(id, error, table));
                None
            }
            Role::Fill if matches!(self.stage, Stage::Starting(_)) => {
                self.start_failed(error.clone());
                Some(error)
            }
            Role::Fill => {
                self.schedule_restart(group, slot, true);
                None
            }
        }
    }

    fn on_start_timeout(&mut self, id: WorkerId) -> Option<String> {
        let worker = self.workers.get(&id)?;
        if !worker.lifecycle.is_starting() {
            return None;
        }
        let timeout = worker.config.start_timeout;
        self.on_start_failure(
            id,
            format!(
                "did not report ready within its start_timeout ({})",
                humantime_secs(timeout)
            ),
        )
    }

    fn on_exit(&mut self, id: WorkerId, status: ExitStatus) -> Option<String> {
        let worker = self.workers.get(&id)?;
        let (group, slot, pid) = (worker.group, worker.slot, worker.pid);
        let label = self.label(group, slot);
        let how = describe_exit(status);
        let mut start_error = None;
        match worker.lifecycle {
            Lifecycle::Starting { .. } => {
                let what = if status.code().is_some() {
                    "exited"
                } else {
                    "crashed"
                };
                start_error = self.on_start_failure(id, format!("{what} during start ({how})"));
            }
            Lifecycle::Failed => {}
            Lifecycle::Draining { .. } => {
                tracing::info!(worker = %label, pid, "worker retired ({how})")
            }
            Lifecycle::Ready { since } => {
                tracing::warn!(worker = %label, pid, "worker exited unexpectedly ({how})");
                if self.groups[group]
                    .slots
                    .get_mut(slot)
                    .is_some_and(|s| s.vacate(id))
                {
                    self.restarts += 1;
                    self.schedule_restart(group, slot, since.elapsed() < QUICK_DEATH);
                }
            }
        }
        if let Some(worker) = self.workers.remove(&id) {
            let group = &self.groups[worker.group].config.name;
            self.metrics.worker_ended(
                id,
                group,
                worker.version.short(),
                &worker.counters,
                worker.lifecycle.exit_reason(),
            );
        }
        self.ask_reloads(|reloads, table| reloads.worker_gone(id, table));
        self.connection_queries.worker_gone(id);
        start_error
    }

    fn on_stop_timeout(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if !worker.lifecycle.stop_timed_out() {
            return;
        }
        let (group, slot, pid) = (worker.group, worker.slot, worker.pid);
        // As the worker last published them: a frozen worker cannot say more.
        let in_flight = WorkerCounters::get(&worker.counters.in_flight);
        let connections = WorkerCounters::get(&worker.counters.connections);
        tracing::warn!(
            worker = %self.label(group, slot),
            pid,
            connections,
            in_flight,
            "worker did not finish within its stop timeout; killed with {connections} connection(s) open and {in_flight} request(s) in flight"
        );
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let group = self.groups[group].config.name.clone();
        self.metrics.worker_killed(&group, connections, in_flight);
        let killed = KilledWorker {
            group,
            slot,
            pid,
            in_flight,
            connections,
        };
        self.reloads.stop_timeout(id, killed);
    }

    fn schedule_restart(&mut self, group: usize, slot: usize, quick_death: bool) {
        if self.is_stopping() {
            return;
        }
        let delay = self.groups[group].slots[slot].restart_delay(quick_death);
        if !delay.is_zero() {
            tracing::info!(worker = %self.label(group, slot), "restarting in {} ms", delay.as_millis());
        }
        self.after(delay, Event::RestartDue { group, slot });
    }

    fn on_restart_due(&mut self, group: usize, slot: usize) {
        // A slot a reload drops, or dropped, is not restarted.
        let Some(slot_of) = self.groups[group].slots.get(slot) else {
            return;
        };
        if self.reloads.drops(group, slot) {
            return;
        }
        if self.is_stopping() || slot_of.serving().is_some() {
            return;
        }
        // A reload replacement already on its way will fill the slot.
        let pending = self
            .workers
            .values()
            .any(|w| w.group == group && w.slot == slot && w.lifecycle.is_starting());
        if pending {
            return;
        }
        let version = self.groups[group].slots[slot].version().clone();
        if let Err(e) = self.fill(group, slot, version) {
            tracing::error!(worker = %self.label(group, slot), "cannot restart worker: {e:#}");
            self.schedule_restart(group, slot, true);
        }
    }

    /// Whether the master is on its way out.
    pub(super) fn is_stopping(&self) -> bool {
        matches!(self.stage, Stage::Stopping)
    }

    /// Tells a serving worker to drain, and bounds how long it may take.
    fn retire(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if !worker.lifecycle.drain() {
            return;
        }
        let _ = worker.to_worker.send(ToWorker::Drain);
        let stop_timeout = worker.config.stop_timeout;
        self.after(stop_timeout, Event::StopTimeout(id));
    }

    /// Kills a stuck worker whose replacement serves its slot: it cannot
    /// drain, its event loop or pool being blocked.
    fn kill_stuck(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if !worker.lifecycle.drain() || !worker.lifecycle.stop_timed_out() {
            return;
        }
        let (group, slot, pid) = (worker.group, worker.slot, worker.pid);
        let label = self.label(group, slot);
        tracing::warn!(worker = %label, pid, "stuck worker killed; its replacement serves");
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }

    fn check_started(&mut self) {
        if !matches!(self.stage, Stage::Starting(_)) {
            return;
        }
        let all_ready = self
            .groups
            .iter()
            .all(|g| g.slots.iter().all(|s| s.serving().is_some()));
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
        if let Stage::Starting(ready) = std::mem::replace(&mut self.stage, Stage::Running) {
            report_ready(ready, &Ok(summary));
        }
    }

    fn start_failed(&mut self, error: String) {
        if let Stage::Starting(ready) = std::mem::replace(&mut self.stage, Stage::Running) {
            report_ready(ready, &Err(error));
        }
        self.stop(true);
    }

    /// Stops every worker; the master exits once they are gone.
    fn stop(&mut self, now: bool) {
        if self.is_stopping() && !now {
            return;
        }
        tracing::info!(graceful = !now, "stopping");
        systemd::stopping();
        self.stage = Stage::Stopping;
        self.ask_reloads(|reloads, _| reloads.stop_requested("host is stopping"));
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let Some(worker) = self.workers.get_mut(&id) else {
                continue;
            };
            match (&worker.lifecycle, now) {
                (Lifecycle::Starting { .. }, _) => {
                    let _ = kill(Pid::from_raw(worker.pid as i32), Signal::SIGKILL);
                    // Its exit is the stop, not a start failure to report.
                    worker.lifecycle.start_failed();
                }
                (Lifecycle::Failed, _) => {}
                (_, true) => {
                    worker.lifecycle.stop_now();
                    let _ = worker.to_worker.send(ToWorker::Stop);
                    // A fast stop still bounds a stuck worker.
                    self.after(Duration::from_secs(2), Event::StopTimeout(id));
                }
                (Lifecycle::Ready { .. }, false) => self.retire(id),
                (Lifecycle::Draining { .. }, false) => {}
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

    /// Reopens the daemon's log file, in the master and every worker, and
    /// every worker's access log.
    fn reopen_log(&mut self) {
        let path = std::env::var_os(crate::logfile::LOG_FILE_ENV).map(std::path::PathBuf::from);
        if let Some(path) = &path {
            if let Err(e) = crate::logfile::reopen(path) {
                tracing::error!("{e:#}");
            }
        }
        for worker in self.workers.values() {
            let _ = worker
                .to_worker
                .send(ToWorker::ReopenLog { path: path.clone() });
        }
        match &path {
            Some(path) => tracing::info!(file = %path.display(), "log file reopened"),
            None => tracing::info!("access logs reopened (not daemonized: no host log file)"),
        }
    }

    /// Starts a reload nobody waits on; its outcome is only logged.
    fn reload_in_background(&mut self, group: Option<String>, snapshot: Option<Arc<Version>>) {
        if !matches!(self.stage, Stage::Running) {
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

    /// Starts a reload, or queues it behind the running one. `snapshot`: a
    /// handler file just snapshotted by the caller (watch mode), used for
    /// the groups that load that file if the reload starts now.
    fn request_reload(
        &mut self,
        group: Option<String>,
        reply: Reply,
        snapshot: Option<Arc<Version>>,
    ) {
        if let Some(name) = &group {
            if !self
                .groups
                .iter()
                .any(|g| !g.is_removed() && &g.config.name == name)
            {
                let _ = reply.send(ControlReply::Error {
                    message: format!("no group named {name:?}"),
                });
                return;
            }
        }
        self.ask_reloads(|reloads, _| reloads.reload_requested(group, reply, snapshot));
    }

    /// Plans a reload and hands it to the machine (see [`Action::Start`]).
    fn start_reload(
        &mut self,
        group: Option<String>,
        waiters: Vec<Reply>,
        snapshot: Option<Arc<Version>>,
    ) {
        let started = Instant::now();
        match self.plan_reload(group.as_deref(), snapshot) {
            Ok(plan) => {
                systemd::reloading();
                self.ask_reloads(|reloads, table| reloads.start(plan, waiters, started, table));
            }
            Err(e) => {
                let error = format!("{e:#}");
                let targeted = self.groups.iter_mut().filter(|g| {
                    !g.is_removed() && group.as_ref().is_none_or(|name| *name == g.config.name)
                });
                for target in targeted {
                    target.last_failed_reload = Some(failed_reload(&error));
                }
                self.ask_reloads(|reloads, table| reloads.refused(error, waiters, started, table));
            }
        }
    }

    /// The config as it runs: the last one applied, with each group's own.
    fn running_config(&self) -> Config {
        Config {
            groups: self
                .groups
                .iter()
                .filter(|g| !g.is_removed())
                .map(|g| (*g.config).clone())
                .collect(),
            ..self.config.clone()
        }
    }

    /// Reads the config file again and plans what the reload does with
    /// each group (of `only`, or all): the generation it is to run (its
    /// new config, the pinned version or a fresh snapshot of its handler
    /// file) and its slot count; groups added are bound and take their
    /// index, moved groups bind their new address. Anything that fails
    /// refuses the reload with nothing changed.
    fn plan_reload(
        &mut self,
        only: Option<&str>,
        snapshot: Option<Arc<Version>>,
    ) -> Result<ReloadPlan> {
        let new = self
            .config
            .reread()
            .map_err(|e| anyhow::anyhow!("{e:#}; nothing changed"))?;
        let change = config_change::compare(&self.running_config(), &new);
        if !change.needs_restart.is_empty() {
            bail!(
                "{} only take effect with a restart (`host restart`); nothing changed",
                change.needs_restart.join("; ")
            );
        }
        let pins = pins::load_pins(&self.run_dir)?;
        let mut plan = ReloadPlan::default();
        let mut added = Vec::new();
        let mut moves = Vec::new();
        for edit in change.groups {
            if only.is_some_and(|name| name != edit.name()) {
                continue;
            }
            plan.config_changes.extend(edit.describe());
            let index = self
                .groups
                .iter()
                .position(|g| !g.is_removed() && g.config.name == edit.name());
            let target = match (edit, index) {
                (GroupEdit::Kept { config, .. }, Some(index)) => {
                    let group = &self.groups[index];
                    if !group.config.reloadable {
                        plan.notified.push((index, config.name));
                        continue;
                    }
                    // A snapshot is of one file: it stands for the groups loading it.
                    let fresh = snapshot.clone().filter(|s| s.source == config.handler);
                    let version = pins::chosen_version(&self.store, &pins, &config, fresh)?;
                    if config.listen != group.config.listen {
                        moves.push((index, MovedListener::bind(&config)?));
                    }
                    Target {
                        group: index,
                        name: config.name.clone(),
                        slots: group.slots.len(),
                        count: config.count,
                        from: Generation {
                            version: group.version.clone(),
                            config: group.config.clone(),
                        },
                        to: Generation {
                            version,
                            config: Arc::new(config),
                        },
                    }
                }
                (GroupEdit::Added(config), _) => {
                    let version = pins::chosen_version(&self.store, &pins, &config, None)?;
                    let config = Arc::new(config);
                    added.push(Group::added(config.clone(), version.clone())?);
                    let generation = Generation { version, config };
                    Target {
                        group: self.groups.len() + added.len() - 1,
                        name: generation.config.name.clone(),
                        slots: 0,
                        count: generation.config.count,
                        from: generation.clone(),
                        to: generation,
                    }
                }
                (GroupEdit::Removed(name), Some(index)) => {
                    let group = &self.groups[index];
                    let generation = Generation {
                        version: group.version.clone(),
                        config: group.config.clone(),
                    };
                    Target {
                        group: index,
                        name,
                        slots: group.slots.len(),
                        count: 0,
                        from: generation.clone(),
                        to: generation,
                    }
                }
                (edit, None) => bail!("group {} is not running", edit.name()),
            };
            plan.targets.push(target);
        }
        // Nothing failed: the plan can change the table now. The file's
        // other settings apply from now on (`watch` as the host started).
        self.config = Config {
            groups: Vec::new(),
            watch: self.config.watch,
            ..new
        };
        self.groups.extend(added);
        for (index, listener) in moves {
            self.groups[index].move_to(listener);
        }
        Ok(plan)
    }

    fn on_handler_changed(&mut self, group: usize) {
        if self.groups[group].is_removed() {
            return;
        }
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
        if snapshot.hash == self.groups[group].version.hash && !self.reloads.is_running() {
            tracing::debug!(group = %name, "handler file touched but unchanged");
            return;
        }
        tracing::debug!(group = %name, version = snapshot.short(), "handler file changed; reloading");
        self.reload_in_background(Some(name), Some(snapshot));
    }

    /// Asks every worker for its connections; the answer goes to `reply`.
    fn query_connections(&mut self, reply: Reply) {
        let workers = self.workers.iter().map(|(id, w)| {
            let answer = WorkerConnections {
                group: self.groups[w.group].config.name.clone(),
                slot: w.slot,
                pid: w.pid,
                state: w.lifecycle.wire(),
                connections: None,
            };
            (*id, answer)
        });
        let query = self.connection_queries.start(reply, workers);
        for worker in self.workers.values() {
            let _ = worker.to_worker.send(ToWorker::Connections);
        }
        self.after(connections::WAIT, Event::ConnectionsTimeout(query));
    }

    fn on_control(&mut self, request: ControlRequest, reply: Reply) {
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
                if matches!(self.stage, Stage::Running) {
                    self.request_reload(group, reply, None);
                } else {
                    let _ = reply.send(ControlReply::Error {
                        message: "host is starting or stopping".into(),
                    });
                }
            }
        }
    }
}

/// A reload that failed now with `error`.
fn failed_reload(error: &str) -> FailedReload {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    FailedReload {
        at_unix_secs: at.as_secs(),
        error: error.to_owned(),
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

fn humantime_secs(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// Watches the handler file of each reloadable group, in watch mode.
fn watch_handlers(
    watch: bool,
    groups: &[Group],
    events: &mpsc::UnboundedSender<Event>,
) -> Result<Option<HandlerWatch>> {
    if !watch {
        return Ok(None);
    }
    let files = groups
        .iter()
        .enumerate()
        .filter(|(_, g)| g.config.reloadable && !g.is_removed())
        .map(|(i, g)| (i, g.config.handler.clone()))
        .collect();
    Ok(Some(HandlerWatch::start(files, events.clone())?))
}
