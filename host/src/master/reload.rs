//! What happens on `host reload`.
//!
//! 1. Each targeted group's handler file is snapshotted into the store once;
//!    every replacement in this reload loads exactly those bytes.
//! 2. Slot by slot: spawn the replacement, wait for its ready report (bounded
//!    by the start timeout), make it the slot's worker, and tell the old one
//!    to drain. The next slot starts right away: draining workers retire in
//!    parallel, so the reload costs the workers' start time, not a lame-duck
//!    period per worker. A slot always has a serving worker.
//! 3. If a replacement fails (load error, ABI mismatch, start error, crash,
//!    timeout), it is killed, the remaining old workers stay, and the slots
//!    already replaced get the previous version back the same way. The
//!    worker's own error is the reload's error.
//! 4. The reload ends when every replacement is ready and every retired
//!    worker is gone (killed, and reported, after its stop timeout).
//!
//! Groups with `reloadable = false` keep their workers and get a reload
//! notification. A reload asked while one runs is queued; further requests
//! merge into the queued one, and every caller gets that reload's outcome.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::versions::pins;
use crate::versions::store::Version;
use super::supervisor::{Master, Role, WorkerId};
use crate::protocol::control::{
    ControlReply, GroupChange, KilledWorker, ReloadOutcome, ReloadStep,
};
use crate::protocol::worker::ToWorker;

type Reply = mpsc::UnboundedSender<ControlReply>;

/// A reload in progress.
pub struct ReloadRun {
    started: Instant,
    targets: Vec<Target>,
    notified: Vec<String>,
    /// Slots still to replace, in order.
    todo: VecDeque<(usize, usize)>,
    /// Slots replaced so far, to put back if the reload fails.
    replaced: Vec<(usize, usize)>,
    /// The replacement being started now.
    step: Option<Step>,
    /// Why the reload is being rolled back.
    failure: Option<String>,
    /// Workers the reload waits to see gone: old ones told to drain, and
    /// refused replacements (sent SIGKILL).
    retiring: BTreeSet<WorkerId>,
    ready_at: Option<Instant>,
    killed: Vec<KilledWorker>,
    waiters: Vec<Reply>,
}

struct Target {
    group: usize,
    from: Arc<Version>,
    to: Arc<Version>,
}

struct Step {
    worker: WorkerId,
    group: usize,
    slot: usize,
    old: Option<WorkerId>,
    spawned: Instant,
}

/// A reload asked for while another runs.
pub struct QueuedReload {
    group: Option<String>,
    waiters: Vec<Reply>,
}

impl Master {
    /// Starts a reload, or queues it behind the running one. `snapshot`: a
    /// handler file just snapshotted by the caller (watch mode), used for
    /// the groups that load that file if the reload starts now.
    pub fn request_reload(
        &mut self,
        group: Option<String>,
        reply: Reply,
        snapshot: Option<Arc<Version>>,
    ) {
        if let Some(name) = &group {
            if !self.groups.iter().any(|g| &g.config.name == name) {
                let _ = reply.send(ControlReply::Error {
                    message: format!("no group named {name:?}"),
                });
                return;
            }
        }
        if self.reload.is_some() {
            let queued = self.queued_reload.get_or_insert(QueuedReload {
                group: group.clone(),
                waiters: Vec::new(),
            });
            if queued.group != group {
                queued.group = None;
            }
            let _ = reply.send(ControlReply::Accepted {
                message: "a reload is running; this one is queued and starts when it ends".into(),
            });
            queued.waiters.push(reply);
            return;
        }
        self.start_reload(group, vec![reply], snapshot);
    }

    fn start_reload(
        &mut self,
        group: Option<String>,
        waiters: Vec<Reply>,
        snapshot: Option<Arc<Version>>,
    ) {
        let started = Instant::now();
        let pins = match pins::load_pins(&self.run_dir) {
            Ok(pins) => pins,
            Err(e) => {
                self.refuse_reload(started, format!("{e:#}"), waiters);
                return;
            }
        };
        let mut targets = Vec::new();
        let mut notified = Vec::new();
        for (index, g) in self.groups.iter().enumerate() {
            if group.as_ref().is_some_and(|name| name != &g.config.name) {
                continue;
            }
            if !g.config.reloadable {
                notified.push(g.config.name.clone());
                continue;
            }
            // A snapshot is of one file: it stands for the groups loading it.
            let fresh = snapshot.clone().filter(|s| s.source == g.config.handler);
            match pins::chosen_version(&self.store, &pins, &g.config, fresh) {
                Ok(to) => targets.push(Target {
                    group: index,
                    from: g.version.clone(),
                    to,
                }),
                Err(e) => {
                    self.refuse_reload(started, format!("{e:#}"), waiters);
                    return;
                }
            }
        }
        for name in &notified {
            let ids: Vec<WorkerId> = self
                .workers
                .iter()
                .filter(|(_, w)| &self.groups[w.group].config.name == name)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.tell(id, ToWorker::ReloadNotify);
            }
        }
        let todo = targets
            .iter()
            .flat_map(|t| (0..self.groups[t.group].slots.len()).map(move |s| (t.group, s)))
            .collect();
        for target in &targets {
            tracing::info!(
                group = %self.groups[target.group].config.name,
                from = target.from.short(),
                to = target.to.short(),
                "reload started"
            );
        }
        super::systemd::reloading();
        self.reload = Some(ReloadRun {
            started,
            targets,
            notified,
            todo,
            replaced: Vec::new(),
            step: None,
            failure: None,
            retiring: BTreeSet::new(),
            ready_at: None,
            killed: Vec::new(),
            waiters,
        });
        self.reload_advance();
    }

    /// Answers a reload that cannot even start (no usable handler build).
    fn refuse_reload(&mut self, started: Instant, error: String, waiters: Vec<Reply>) {
        tracing::error!("reload refused: {error}");
        self.reloads_failed += 1;
        self.metrics
            .reload_done(false, started.elapsed().as_secs_f64());
        let outcome = ReloadOutcome {
            ok: false,
            error: Some(error),
            groups: Vec::new(),
            notified: Vec::new(),
            ready_ms: 0,
            done_ms: started.elapsed().as_millis() as u64,
            killed: Vec::new(),
        };
        for waiter in waiters {
            let _ = waiter.send(ControlReply::Reloaded(outcome.clone()));
        }
        self.start_queued_reload();
    }

    /// Starts the next replacement, or finishes when nothing is left.
    fn reload_advance(&mut self) {
        loop {
            let Some(run) = self.reload.as_mut() else {
                return;
            };
            if run.step.is_some() {
                return;
            }
            let Some((group, slot)) = run.todo.pop_front() else {
                run.ready_at.get_or_insert_with(Instant::now);
                if run.retiring.is_empty() {
                    self.reload_finish();
                }
                return;
            };
            let target = run
                .targets
                .iter()
                .find(|t| t.group == group)
                .expect("slot of a target group");
            let version = if run.failure.is_some() {
                target.from.clone()
            } else {
                target.to.clone()
            };
            let old = self.groups[group].slots[slot].current;
            match self.spawn(group, slot, version, Role::Replacement) {
                Ok(worker) => {
                    let run = self.reload.as_mut().expect("reload in progress");
                    run.step = Some(Step {
                        worker,
                        group,
                        slot,
                        old,
                        spawned: Instant::now(),
                    });
                    return;
                }
                Err(e) => {
                    let error = format!(
                        "cannot start a worker for {}: {e:#}",
                        self.label(group, slot)
                    );
                    self.reload_step_failed(group, slot, error);
                }
            }
        }
    }

    /// The replacement of the current step reported ready.
    pub fn reload_replacement_ready(&mut self, id: WorkerId) {
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        let Some(step) = run.step.take_if(|s| s.worker == id) else {
            return;
        };
        let rollback = run.failure.is_some();
        if !rollback {
            run.replaced.push((step.group, step.slot));
        }
        let new = &self.workers[&id];
        let (new_pid, new_version) = (new.pid, new.version.clone());
        let slot = &mut self.groups[step.group].slots[step.slot];
        // The old worker may have died meanwhile; the slot then has none.
        let old = slot.current.filter(|old| Some(*old) == step.old);
        slot.current = Some(id);
        slot.version = new_version.clone();
        let old_info = old
            .and_then(|o| self.workers.get(&o))
            .map(|w| (w.pid, w.version.short().to_owned()));
        let progress = ReloadStep {
            group: self.groups[step.group].config.name.clone(),
            slot: step.slot,
            old_pid: old_info.as_ref().map(|(pid, _)| *pid),
            old_version: old_info.map(|(_, v)| v),
            new_pid,
            new_version: new_version.short().to_owned(),
            start_ms: step.spawned.elapsed().as_millis() as u64,
            rollback,
        };
        if let Some(old) = old {
            self.retire(old);
            if let Some(run) = self.reload.as_mut() {
                run.retiring.insert(old);
            }
        }
        if let Some(run) = self.reload.as_ref() {
            for waiter in &run.waiters {
                let _ = waiter.send(ControlReply::Progress(progress.clone()));
            }
        }
        self.reload_advance();
    }

    /// The replacement of the current step failed to start.
    pub fn reload_replacement_failed(&mut self, id: WorkerId, error: String) {
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        let Some(step) = run.step.take_if(|s| s.worker == id) else {
            return;
        };
        // It was sent SIGKILL; the reload ends once it is gone, so nobody
        // sees it in `host status` after `host reload` returned.
        run.retiring.insert(id);
        self.reload_step_failed(step.group, step.slot, error);
        self.reload_advance();
    }

    fn reload_step_failed(&mut self, group: usize, slot: usize, error: String) {
        let label = self.label(group, slot);
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        match &mut run.failure {
            None => {
                tracing::warn!("reload aborted: {error}; putting back the previous version");
                run.failure = Some(error);
                run.todo = run.replaced.drain(..).rev().collect();
            }
            Some(failure) => {
                failure.push_str(&format!(
                    "; putting back the previous version on {label} failed too: {error}"
                ));
            }
        }
        // The slot may have lost its old worker meanwhile.
        if self.groups[group].slots[slot].current.is_none() {
            self.after(
                std::time::Duration::ZERO,
                super::Event::RestartDue { group, slot },
            );
        }
    }

    /// A worker process is gone.
    pub fn reload_worker_gone(&mut self, id: WorkerId) {
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        if run.retiring.remove(&id)
            && run.retiring.is_empty()
            && run.step.is_none()
            && run.todo.is_empty()
        {
            self.reload_advance();
        }
    }

    /// A retiring worker was killed at its stop timeout.
    pub fn reload_worker_killed(&mut self, id: WorkerId, in_flight: u64, connections: u64) {
        let Some(run) = self.reload.as_mut() else {
            return;
        };
        if !run.retiring.contains(&id) {
            return;
        }
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        run.killed.push(KilledWorker {
            group: self.groups[worker.group].config.name.clone(),
            slot: worker.slot,
            pid: worker.pid,
            in_flight,
            connections,
        });
    }

    /// Ends a reload early (the host is stopping).
    pub fn reload_abandon(&mut self, why: &str) {
        if let Some(run) = self.reload.as_mut() {
            run.failure.get_or_insert_with(|| why.to_owned());
            run.todo.clear();
            run.retiring.clear();
            run.step = None;
            self.reload_finish();
        }
        if let Some(queued) = self.queued_reload.take() {
            for waiter in queued.waiters {
                let _ = waiter.send(ControlReply::Error {
                    message: why.to_owned(),
                });
            }
        }
    }

    fn reload_finish(&mut self) {
        let Some(run) = self.reload.take() else {
            return;
        };
        let ok = run.failure.is_none();
        self.metrics
            .reload_done(ok, run.started.elapsed().as_secs_f64());
        if !self.is_stopping() {
            super::systemd::ready("serving");
        }
        if ok {
            self.reloads_ok += 1;
        } else {
            self.reloads_failed += 1;
        }
        let mut groups = Vec::new();
        for target in &run.targets {
            let group = &mut self.groups[target.group];
            if ok {
                group.version = target.to.clone();
                if let Err(e) = pins::record(&self.run_dir, &group.config.name, &target.to.hash) {
                    tracing::warn!("cannot record version history: {e:#}");
                }
            }
            groups.push(GroupChange {
                group: group.config.name.clone(),
                from: target.from.short().to_owned(),
                to: group.version.short().to_owned(),
            });
        }
        let outcome = ReloadOutcome {
            ok,
            error: run.failure,
            groups,
            notified: run.notified,
            ready_ms: run
                .ready_at
                .map_or(0, |t| t.duration_since(run.started).as_millis() as u64),
            done_ms: run.started.elapsed().as_millis() as u64,
            killed: run.killed,
        };
        match &outcome.error {
            None => tracing::info!(
                ready_ms = outcome.ready_ms,
                done_ms = outcome.done_ms,
                "reload done"
            ),
            Some(error) => tracing::warn!(done_ms = outcome.done_ms, "reload failed: {error}"),
        }
        for waiter in run.waiters {
            let _ = waiter.send(ControlReply::Reloaded(outcome.clone()));
        }
        self.start_queued_reload();
    }

    fn start_queued_reload(&mut self) {
        if let Some(queued) = self.queued_reload.take() {
            self.start_reload(queued.group, queued.waiters, None);
        }
    }
}
