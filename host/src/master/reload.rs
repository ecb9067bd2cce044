//! What happens on `host reload`.
//!
//! 1. The master reads the config file again and compares it with the one
//!    it runs (`config_change.rs`): a file that does not parse, or an edit
//!    only a restart applies, refuses the reload before anything changes.
//!    Each targeted group's handler file is snapshotted into the store
//!    once; listeners of new groups and moved groups are bound (a bind
//!    failure refuses the reload too). That is the [`ReloadPlan`]: per
//!    group, a [`Target`] going from one [`Generation`] (handler bytes and
//!    group config) and slot count to another. Every replacement in this
//!    reload loads exactly those bytes with exactly that config.
//! 2. [`Phase::Forward`], slot by slot: spawn the replacement, wait for its
//!    ready report (bounded by the start timeout), make it the slot's worker,
//!    and retire the old one. The next slot starts right away: retired
//!    workers drain in parallel, so the reload costs the workers' start
//!    time, not a lame-duck period per worker. A slot always has a serving
//!    worker. Slots a larger `count` adds (or a new group's) are started
//!    the same way, after the existing ones, with nobody to retire.
//! 3. [`Phase::RollingBack`]: if a replacement fails (load error, ABI
//!    mismatch, start error, crash, timeout), it is killed, the remaining
//!    old workers stay, and the slots already replaced get the previous
//!    generation back the same way, last first; slots the reload added are
//!    retired. The worker's own error is the reload's error.
//! 4. [`Phase::Retiring`]: every slot has its worker. After a forward run
//!    the slots a smaller `count` drops (all of a removed group's) are
//!    retired now, when nothing can fail any more. The reload ends when
//!    every retired worker (and refused replacement) is gone, those still
//!    draining at their stop timeout being killed and reported; then each
//!    group settles on its new generation and slot count (listeners of
//!    moved or removed groups are closed), or keeps its old ones.
//!
//! A worker found stuck (`request_timeout`) gets the same treatment for its
//! slot alone, with the generation it runs: its replacement is started and
//! becomes ready, then the stuck worker is killed (its event loop or pool
//! is blocked: it cannot drain). That run is no reload (nobody waits on it,
//! nothing is counted or settled); one asked for while a run is going is
//! queued, ahead of a queued reload, and dropped if by then its worker no
//! longer serves the slot.
//!
//! Groups with `reloadable = false` keep their workers and get a reload
//! notification. A reload asked while one runs is queued; further requests
//! merge into the queued one, and every caller gets that reload's outcome.
//! A stop ends the running reload as failed and refuses the queued one.
//!
//! This file is only the machine: [`Reloads`] takes inputs (a reload
//! requested, a stuck worker, a replacement ready or failed, a worker gone, a stop timeout,
//! a stop requested), reads the worker table through [`WorkerTable`], and
//! returns the [`Action`]s the master carries out, in order. It spawns,
//! sends and kills nothing, so the tests below run it without processes.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::lifecycle::WorkerId;
use crate::config::GroupConfig;
use crate::protocol::control::{
    ControlReply, GroupChange, KilledWorker, ReloadOutcome, ReloadStep, WaitingWorker,
};
use crate::versions::store::Version;

/// Where a caller waiting on a reload gets its replies.
pub type Reply = mpsc::UnboundedSender<ControlReply>;

/// A slot, as (group index, slot index).
type SlotRef = (usize, usize);

/// What a reload reads of the master's worker table.
pub trait WorkerTable {
    /// The worker serving a slot.
    fn serving(&self, group: usize, slot: usize) -> Option<WorkerId>;
    /// A live worker's pid and short version.
    fn describe(&self, worker: WorkerId) -> Option<(u32, String)>;
    /// An id for a worker about to be spawned.
    fn new_worker_id(&mut self) -> WorkerId;
}

/// What a reload asks the master to do.
#[derive(Debug)]
pub enum Action {
    /// Plan a reload (snapshot or look up each group's version) and pass
    /// the plan to [`Reloads::start`], or the reason it cannot to
    /// [`Reloads::refused`].
    Start {
        /// Only this group; all groups when `None`.
        group: Option<String>,
        /// Who waits on it.
        waiters: Vec<Reply>,
        /// A handler file just snapshotted by the requester (watch mode).
        snapshot: Option<Arc<Version>>,
    },
    /// Tell the workers of a group that is not reloadable about the reload.
    Notify {
        /// Group index.
        group: usize,
    },
    /// Start worker `worker` for a slot (adding the slot if the group has
    /// none at that index) on `generation`, as a replacement. Its ready
    /// report goes to [`Reloads::replacement_ready`]; its failure to start,
    /// or to spawn, to [`Reloads::replacement_failed`].
    Spawn {
        /// The id it gets.
        worker: WorkerId,
        /// Group index.
        group: usize,
        /// Slot index.
        slot: usize,
        /// What it loads, with which config.
        generation: Generation,
    },
    /// Tell a worker to drain; its exit goes to [`Reloads::worker_gone`].
    Retire(WorkerId),
    /// Kill a stuck worker now; its exit goes to [`Reloads::worker_gone`].
    Kill(WorkerId),
    /// Restart a slot left without a worker (its old one died meanwhile and
    /// its replacement failed).
    Refill {
        /// Group index.
        group: usize,
        /// Slot index.
        slot: usize,
    },
    /// Send `reply` to every caller in `to`.
    Reply {
        /// The callers.
        to: Vec<Reply>,
        /// What they get.
        reply: ControlReply,
    },
    /// The reload ended: count it, and settle each targeted group on the
    /// generation and slot count it keeps (the new ones when it worked,
    /// else the old ones): slots past the count are dropped, a group left
    /// with none is removed, and its listener, or the one it moved from,
    /// closed.
    Finish {
        /// Why it failed; `None` when every targeted slot runs the new
        /// generation.
        error: Option<String>,
        /// From the request to the end.
        elapsed: Duration,
        /// What each targeted group keeps.
        groups: Vec<Settled>,
    },
    /// A reload could not start: count it as failed.
    Refused {
        /// From the request to the refusal.
        elapsed: Duration,
    },
}

/// What a group's workers run: the handler bytes, and the group's config
/// (settings, timeouts, dispatch, listen address...).
#[derive(Debug, Clone)]
pub struct Generation {
    /// The handler bytes.
    pub version: Arc<Version>,
    /// The group's config.
    pub config: Arc<GroupConfig>,
}

/// One group a reload replaces, adds, or removes the workers of.
#[derive(Debug, Clone)]
pub struct Target {
    /// Group index.
    pub group: usize,
    /// Group name.
    pub name: String,
    /// How many slots it has now (0 for a group the reload adds).
    pub slots: usize,
    /// How many it is to have (0 for a group the reload removes).
    pub count: usize,
    /// What its workers run now.
    pub from: Generation,
    /// What they are to run.
    pub to: Generation,
}

/// What a group keeps once a reload ended.
#[derive(Debug, Clone)]
pub struct Settled {
    /// Group index.
    pub group: usize,
    /// What its workers run.
    pub generation: Generation,
    /// How many slots it keeps (0: the group is gone).
    pub count: usize,
}

/// What a reload is to do, decided before it starts.
#[derive(Debug, Clone, Default)]
pub struct ReloadPlan {
    /// Reloadable groups, in the order their slots are replaced.
    pub targets: Vec<Target>,
    /// Groups that are not reloadable: (index, name), only notified.
    pub notified: Vec<(usize, String)>,
    /// What the reload changes of the config, one line per group
    /// (`web: count 2 -> 3`); empty when the file is as it runs.
    pub config_changes: Vec<String>,
}

/// The reload running, if any, and the one queued behind it.
#[derive(Default)]
pub struct Reloads {
    running: Option<ReloadRun>,
    queued: Option<QueuedReload>,
    /// Stuck workers to replace when the running run ends.
    stuck: VecDeque<Stuck>,
}

/// A worker found stuck, to replace with the generation its slot runs.
#[derive(Debug, Clone)]
pub struct Stuck {
    /// The stuck worker.
    pub worker: WorkerId,
    /// Its slot index.
    pub slot: usize,
    /// Its group, as it runs now (`from` and `to` the same generation,
    /// `slots` and `count` its slot count).
    pub group: Target,
}

/// A reload asked for while another runs.
struct QueuedReload {
    group: Option<String>,
    waiters: Vec<Reply>,
}

/// A reload in progress.
struct ReloadRun {
    started: Instant,
    targets: Vec<Target>,
    notified: Vec<String>,
    config_changes: Vec<String>,
    phase: Phase,
    /// The replacement being started now (never while retiring).
    step: Option<Step>,
    /// Workers the reload waits to see gone: old ones told to drain, and
    /// refused replacements (sent SIGKILL), so nobody sees them in `host
    /// status` after `host reload` returned.
    retiring: BTreeSet<WorkerId>,
    killed: Vec<KilledWorker>,
    waiters: Vec<Reply>,
    /// The stuck worker this run replaces, when it is no reload.
    stuck: Option<WorkerId>,
}

/// Where a reload is; see the module docs.
enum Phase {
    /// Replacing slots with the new version.
    Forward {
        /// Slots still to replace, in order.
        todo: VecDeque<SlotRef>,
        /// Slots replaced so far, to put back if the reload fails.
        replaced: Vec<SlotRef>,
    },
    /// A replacement failed; the slots already replaced get the previous
    /// version back.
    RollingBack {
        /// Why (the first failure, then any failure while putting back).
        error: String,
        /// Slots still to put back, last replaced first.
        todo: VecDeque<SlotRef>,
    },
    /// Every slot has its worker; waiting for the retired ones to be gone.
    Retiring {
        /// Why the reload failed, if it did.
        error: Option<String>,
        /// When the last replacement became ready.
        ready_at: Instant,
    },
}

/// A replacement being started.
struct Step {
    worker: WorkerId,
    group: usize,
    slot: usize,
    generation: Generation,
    /// The slot's worker when the replacement was spawned.
    old: Option<WorkerId>,
    spawned: Instant,
}

impl Reloads {
    /// Whether a reload is running.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether the running reload drops a slot (a smaller `count`, a
    /// removed group): it is not to get a new worker.
    pub fn drops(&self, group: usize, slot: usize) -> bool {
        self.running.as_ref().is_some_and(|run| {
            run.targets
                .iter()
                .any(|t| t.group == group && slot >= t.count && slot < t.slots)
        })
    }

    /// Whether `worker` is being, or is to be, replaced as stuck.
    pub fn replaces(&self, worker: WorkerId) -> bool {
        self.running
            .as_ref()
            .is_some_and(|run| run.stuck == Some(worker))
            || self.stuck.iter().any(|s| s.worker == worker)
    }

    /// A worker is stuck: its replacement starts now, or when the running
    /// run ends.
    pub fn replace_stuck(&mut self, stuck: Stuck, table: &mut impl WorkerTable) -> Vec<Action> {
        if self.replaces(stuck.worker) {
            return Vec::new();
        }
        self.stuck.push_back(stuck);
        if self.running.is_some() {
            return Vec::new();
        }
        self.start_queued(table)
    }

    /// Someone asked for a reload: it starts now, or is queued behind the
    /// running one (merging with a reload already queued).
    pub fn reload_requested(
        &mut self,
        group: Option<String>,
        reply: Reply,
        snapshot: Option<Arc<Version>>,
    ) -> Vec<Action> {
        if self.running.is_none() {
            return vec![Action::Start {
                group,
                waiters: vec![reply],
                snapshot,
            }];
        }
        let queued = self.queued.get_or_insert(QueuedReload {
            group: group.clone(),
            waiters: Vec::new(),
        });
        if queued.group != group {
            queued.group = None;
        }
        queued.waiters.push(reply.clone());
        vec![Action::Reply {
            to: vec![reply],
            reply: ControlReply::Accepted {
                message: "a reload is running; this one is queued and starts when it ends".into(),
            },
        }]
    }

    /// Starts a planned reload (after [`Action::Start`]).
    pub fn start(
        &mut self,
        plan: ReloadPlan,
        waiters: Vec<Reply>,
        started: Instant,
        table: &mut impl WorkerTable,
    ) -> Vec<Action> {
        let mut actions: Vec<Action> = plan
            .notified
            .iter()
            .map(|(group, _)| Action::Notify { group: *group })
            .collect();
        for target in &plan.targets {
            tracing::debug!(
                group = %target.name,
                from = target.from.version.short(),
                to = target.to.version.short(),
                slots = target.slots,
                count = target.count,
                "reload started"
            );
        }
        for change in &plan.config_changes {
            tracing::info!("config: {change}");
        }
        // Existing slots first, then the added ones; dropped slots are
        // retired once every new worker is ready.
        let todo = plan
            .targets
            .iter()
            .flat_map(|t| (0..t.count).map(move |slot| (t.group, slot)))
            .collect();
        let mut run = ReloadRun {
            started,
            targets: plan.targets,
            notified: plan.notified.into_iter().map(|(_, name)| name).collect(),
            config_changes: plan.config_changes,
            phase: Phase::Forward {
                todo,
                replaced: Vec::new(),
            },
            step: None,
            retiring: BTreeSet::new(),
            killed: Vec::new(),
            waiters,
            stuck: None,
        };
        actions.extend(run.advance(table));
        self.running = Some(run);
        self.settle(actions, table)
    }

    /// A reload could not be planned (after [`Action::Start`]).
    pub fn refused(
        &mut self,
        error: String,
        waiters: Vec<Reply>,
        started: Instant,
        table: &mut impl WorkerTable,
    ) -> Vec<Action> {
        tracing::error!("reload refused: {error}");
        let elapsed = started.elapsed();
        let outcome = ReloadOutcome {
            ok: false,
            error: Some(error),
            groups: Vec::new(),
            config_changes: Vec::new(),
            notified: Vec::new(),
            ready_ms: 0,
            done_ms: elapsed.as_millis() as u64,
            killed: Vec::new(),
        };
        let mut actions = vec![
            Action::Refused { elapsed },
            Action::Reply {
                to: waiters,
                reply: ControlReply::Reloaded(outcome),
            },
        ];
        actions.extend(self.start_queued(table));
        actions
    }

    /// A replacement reported ready and now serves its slot, taking over
    /// from `previous`.
    pub fn replacement_ready(
        &mut self,
        worker: WorkerId,
        previous: Option<WorkerId>,
        table: &mut impl WorkerTable,
    ) -> Vec<Action> {
        let Some(run) = self.running.as_mut() else {
            return Vec::new();
        };
        let mut actions = run.replacement_ready(worker, previous, table);
        actions.extend(run.advance(table));
        self.settle(actions, table)
    }

    /// A replacement spawned a while ago may still be starting: if the
    /// reload still waits on it, tell the callers how long it has waited.
    /// Nothing when it does not.
    pub fn still_starting(&self, worker: WorkerId, table: &impl WorkerTable) -> Vec<Action> {
        let Some(run) = &self.running else {
            return Vec::new();
        };
        let Some(step) = run.step.as_ref().filter(|s| s.worker == worker) else {
            return Vec::new();
        };
        let waiting = WaitingWorker {
            group: run.target(step.group).name.clone(),
            slot: step.slot,
            pid: table.describe(worker).map_or(0, |(pid, _)| pid),
            version: step.generation.version.short().to_owned(),
            waited_ms: step.spawned.elapsed().as_millis() as u64,
            start_timeout_ms: step.generation.config.start_timeout.as_millis() as u64,
        };
        vec![Action::Reply {
            to: run.waiters.clone(),
            reply: ControlReply::Waiting(waiting),
        }]
    }

    /// A replacement failed to spawn or to start (it was sent SIGKILL);
    /// `error` says why, naming the slot.
    pub fn replacement_failed(
        &mut self,
        worker: WorkerId,
        error: String,
        table: &mut impl WorkerTable,
    ) -> Vec<Action> {
        let Some(run) = self.running.as_mut() else {
            return Vec::new();
        };
        let Some(step) = run.step.take_if(|s| s.worker == worker) else {
            return Vec::new();
        };
        run.retiring.insert(worker);
        let mut actions = run.step_failed(step.group, step.slot, error, table);
        actions.extend(run.advance(table));
        self.settle(actions, table)
    }

    /// A worker process is gone.
    pub fn worker_gone(&mut self, worker: WorkerId, table: &mut impl WorkerTable) -> Vec<Action> {
        let Some(run) = self.running.as_mut() else {
            return Vec::new();
        };
        if !run.retiring.remove(&worker) {
            return Vec::new();
        }
        self.settle(Vec::new(), table)
    }

    /// A draining worker was killed at its stop timeout; the reload that
    /// retired it reports it.
    pub fn stop_timeout(&mut self, worker: WorkerId, killed: KilledWorker) {
        if let Some(run) = self.running.as_mut() {
            if run.retiring.contains(&worker) {
                run.killed.push(killed);
            }
        }
    }

    /// The host is stopping: the running reload ends as failed (its
    /// workers are being stopped anyway) and the queued one is refused.
    pub fn stop_requested(&mut self, why: &str) -> Vec<Action> {
        let mut actions = Vec::new();
        self.stuck.clear();
        if let Some(run) = self.running.take().filter(|run| run.stuck.is_none()) {
            let (error, ready_at) = match &run.phase {
                Phase::Forward { .. } => (why.to_owned(), None),
                Phase::RollingBack { error, .. } => (error.clone(), None),
                Phase::Retiring { error, ready_at } => (
                    error.clone().unwrap_or_else(|| why.to_owned()),
                    Some(*ready_at),
                ),
            };
            actions.extend(run.finish(Some(error), ready_at));
        }
        if let Some(queued) = self.queued.take() {
            actions.push(Action::Reply {
                to: queued.waiters,
                reply: ControlReply::Error {
                    message: why.to_owned(),
                },
            });
        }
        actions
    }

    /// Ends the running run once it is done, then starts the queued one.
    fn settle(&mut self, mut actions: Vec<Action>, table: &mut impl WorkerTable) -> Vec<Action> {
        let Some(run) = self.running.take_if(|run| run.is_done()) else {
            return actions;
        };
        let (error, ready_at) = match run.phase {
            Phase::Retiring {
                ref error,
                ready_at,
            } => (error.clone(), Some(ready_at)),
            _ => (None, None),
        };
        match run.stuck {
            // Still stuck after a failed replacement: found again later.
            Some(_) => {
                if let Some(error) = error {
                    tracing::error!("cannot replace a stuck worker: {error}");
                }
            }
            None => actions.extend(run.finish(error, ready_at)),
        }
        actions.extend(self.start_queued(table));
        actions
    }

    /// Starts what waits: a stuck worker's replacement (if it still serves
    /// its slot), else the queued reload.
    fn start_queued(&mut self, table: &mut impl WorkerTable) -> Vec<Action> {
        while let Some(stuck) = self.stuck.pop_front() {
            if table.serving(stuck.group.group, stuck.slot) != Some(stuck.worker) {
                continue;
            }
            let slot = (stuck.group.group, stuck.slot);
            let mut run = ReloadRun {
                started: Instant::now(),
                targets: vec![stuck.group],
                notified: Vec::new(),
                config_changes: Vec::new(),
                phase: Phase::Forward {
                    todo: VecDeque::from([slot]),
                    replaced: Vec::new(),
                },
                step: None,
                retiring: BTreeSet::new(),
                killed: Vec::new(),
                waiters: Vec::new(),
                stuck: Some(stuck.worker),
            };
            let actions = run.advance(table);
            self.running = Some(run);
            return actions;
        }
        let Some(queued) = self.queued.take() else {
            return Vec::new();
        };
        vec![Action::Start {
            group: queued.group,
            waiters: queued.waiters,
            snapshot: None,
        }]
    }
}

impl ReloadRun {
    /// Spawns the next replacement, or moves to retiring when none is left.
    fn advance(&mut self, table: &mut impl WorkerTable) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.step.is_some() {
            return actions;
        }
        loop {
            let (next, rollback) = match &mut self.phase {
                Phase::Forward { todo, .. } => (todo.pop_front(), false),
                Phase::RollingBack { todo, .. } => (todo.pop_front(), true),
                Phase::Retiring { .. } => return actions,
            };
            let Some((group, slot)) = next else {
                let error = match &mut self.phase {
                    Phase::RollingBack { error, .. } => Some(std::mem::take(error)),
                    _ => {
                        actions.extend(self.retire_dropped_slots(table));
                        None
                    }
                };
                self.phase = Phase::Retiring {
                    error,
                    ready_at: Instant::now(),
                };
                return actions;
            };
            let target = self.target(group);
            if rollback && slot >= target.slots {
                // A slot this reload added: there is nothing to put back.
                actions.extend(self.retire_slot(group, slot, table));
                continue;
            }
            let generation = if rollback {
                target.from.clone()
            } else {
                target.to.clone()
            };
            let worker = table.new_worker_id();
            self.step = Some(Step {
                worker,
                group,
                slot,
                generation: generation.clone(),
                old: table.serving(group, slot),
                spawned: Instant::now(),
            });
            actions.push(Action::Spawn {
                worker,
                group,
                slot,
                generation,
            });
            return actions;
        }
    }

    /// Retires the slots past each target's new count (all of a removed
    /// group's), once every new worker is ready.
    fn retire_dropped_slots(&mut self, table: &impl WorkerTable) -> Vec<Action> {
        let dropped: Vec<SlotRef> = self
            .targets
            .iter()
            .flat_map(|t| (t.count..t.slots).map(move |slot| (t.group, slot)))
            .collect();
        dropped
            .into_iter()
            .flat_map(|(group, slot)| self.retire_slot(group, slot, table))
            .collect()
    }

    /// Retires a slot's serving worker, if it has one.
    fn retire_slot(
        &mut self,
        group: usize,
        slot: usize,
        table: &impl WorkerTable,
    ) -> Option<Action> {
        let worker = table.serving(group, slot)?;
        self.retiring.insert(worker);
        Some(Action::Retire(worker))
    }

    /// The replacement of the current step serves its slot: retire the old
    /// worker, if it still served it, and tell the callers.
    fn replacement_ready(
        &mut self,
        worker: WorkerId,
        previous: Option<WorkerId>,
        table: &impl WorkerTable,
    ) -> Vec<Action> {
        let Some(step) = self.step.take_if(|s| s.worker == worker) else {
            return Vec::new();
        };
        let rollback = match &mut self.phase {
            Phase::Forward { replaced, .. } => {
                replaced.push((step.group, step.slot));
                false
            }
            _ => true,
        };
        // The old worker may have died meanwhile; the slot then had none.
        let old = previous.filter(|p| Some(*p) == step.old);
        let old_info = old.and_then(|o| table.describe(o));
        let progress = ReloadStep {
            group: self.target(step.group).name.clone(),
            slot: step.slot,
            old_pid: old_info.as_ref().map(|(pid, _)| *pid),
            old_version: old_info.map(|(_, version)| version),
            new_pid: table.describe(worker).map_or(0, |(pid, _)| pid),
            new_version: step.generation.version.short().to_owned(),
            start_ms: step.spawned.elapsed().as_millis() as u64,
            rollback,
        };
        let mut actions = Vec::new();
        if let Some(old) = old {
            self.retiring.insert(old);
            actions.push(if self.stuck == Some(old) {
                Action::Kill(old)
            } else {
                Action::Retire(old)
            });
        }
        if !self.waiters.is_empty() {
            actions.push(Action::Reply {
                to: self.waiters.clone(),
                reply: ControlReply::Progress(progress),
            });
        }
        actions
    }

    /// The current step's replacement failed: roll back, or, when already
    /// rolling back, add this failure to the error.
    fn step_failed(
        &mut self,
        group: usize,
        slot: usize,
        error: String,
        table: &impl WorkerTable,
    ) -> Vec<Action> {
        let label = format!("{}/{}", self.target(group).name, slot);
        match &mut self.phase {
            Phase::Forward { replaced, .. } => {
                tracing::debug!("reload aborted: {error}; putting back the previous version");
                let todo = replaced.drain(..).rev().collect();
                self.phase = Phase::RollingBack { error, todo };
            }
            Phase::RollingBack { error: first, .. } => {
                first.push_str(&format!(
                    "; putting back the previous version on {label} failed too: {error}"
                ));
            }
            Phase::Retiring { .. } => {}
        }
        // A slot this reload added goes away with it; one serving still
        // has its worker.
        if slot >= self.target(group).slots || table.serving(group, slot).is_some() {
            return Vec::new();
        }
        vec![Action::Refill { group, slot }]
    }

    fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Retiring { .. }) && self.retiring.is_empty()
    }

    fn target(&self, group: usize) -> &Target {
        self.targets
            .iter()
            .find(|t| t.group == group)
            .expect("a reload only touches the slots of its targets")
    }

    /// The outcome, for the master and for every caller.
    fn finish(self, error: Option<String>, ready_at: Option<Instant>) -> Vec<Action> {
        let ok = error.is_none();
        let elapsed = self.started.elapsed();
        let groups = self
            .targets
            .iter()
            .map(|t| GroupChange {
                group: t.name.clone(),
                from: t.from.version.short().to_owned(),
                to: if ok { &t.to } else { &t.from }.version.short().to_owned(),
                wanted: t.to.version.short().to_owned(),
            })
            .collect();
        let settled = self
            .targets
            .iter()
            .map(|t| Settled {
                group: t.group,
                generation: if ok { &t.to } else { &t.from }.clone(),
                count: if ok { t.count } else { t.slots },
            })
            .collect();
        let outcome = ReloadOutcome {
            ok,
            error,
            groups,
            config_changes: self.config_changes,
            notified: self.notified,
            ready_ms: ready_at.map_or(0, |t| t.duration_since(self.started).as_millis() as u64),
            done_ms: elapsed.as_millis() as u64,
            killed: self.killed,
        };
        // One line per reload, whatever happened in between: a broken build
        // in watch mode is this line alone.
        let changes = |what: fn(&Target) -> String| {
            self.targets.iter().map(what).collect::<Vec<_>>().join(", ")
        };
        match &outcome.error {
            None => tracing::info!(
                ready_ms = outcome.ready_ms,
                done_ms = outcome.done_ms,
                "reload done: {}",
                changes(|t| format!(
                    "{} {} -> {}",
                    t.name,
                    t.from.version.short(),
                    t.to.version.short()
                ))
            ),
            Some(error) => tracing::warn!(
                done_ms = outcome.done_ms,
                "reload failed: {error}; {}",
                changes(|t| format!(
                    "{} still serves {} (refused {})",
                    t.name,
                    t.from.version.short(),
                    t.to.version.short()
                ))
            ),
        }
        vec![
            Action::Finish {
                error: outcome.error.clone(),
                elapsed,
                groups: settled,
            },
            Action::Reply {
                to: self.waiters,
                reply: ControlReply::Reloaded(outcome),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::master::slot::tests::version;

    /// The worker table as a reload sees it. The test plays the master:
    /// a ready worker takes its slot, a dead one leaves it.
    #[derive(Default)]
    struct FakeTable {
        serving: HashMap<SlotRef, WorkerId>,
        slot_of: HashMap<WorkerId, SlotRef>,
        next: u64,
    }

    impl WorkerTable for FakeTable {
        fn serving(&self, group: usize, slot: usize) -> Option<WorkerId> {
            self.serving.get(&(group, slot)).copied()
        }

        fn describe(&self, worker: WorkerId) -> Option<(u32, String)> {
            let (group, _) = self.slot_of.get(&worker)?;
            let version = if *group == 0 { "v?" } else { "other" };
            Some((1000 + worker.0 as u32, version.to_owned()))
        }

        fn new_worker_id(&mut self) -> WorkerId {
            self.next += 1;
            WorkerId(self.next)
        }
    }

    /// One master's reloads, driven by events; each event returns the
    /// actions it asked for, as short lines.
    struct Bench {
        reloads: Reloads,
        table: FakeTable,
        plan: ReloadPlan,
        /// An `Action::Start` not yet acted on.
        start: Option<Vec<Reply>>,
        outcome: Option<ReloadOutcome>,
        progress: Vec<ReloadStep>,
        /// What each spawned replacement was to run.
        spawned: Vec<Generation>,
        /// What the groups kept when the last reload ended.
        settled: Vec<Settled>,
    }

    /// `web`'s config with `count` workers.
    fn web(count: usize) -> Arc<GroupConfig> {
        let text = format!(
            "name = \"web\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h.so\"\ncount = {count}\n"
        );
        Arc::new(toml::from_str(&text).expect("a group config"))
    }

    fn generation(name: &str, count: usize) -> Generation {
        Generation {
            version: version(name),
            config: web(count),
        }
    }

    /// Group 0, `web`, with `slots` workers w1.. serving v1, reloaded to v2.
    fn bench(slots: usize) -> Bench {
        let mut table = FakeTable::default();
        for slot in 0..slots {
            let worker = table.new_worker_id();
            table.serving.insert((0, slot), worker);
            table.slot_of.insert(worker, (0, slot));
        }
        let plan = ReloadPlan {
            targets: vec![Target {
                group: 0,
                name: "web".into(),
                slots,
                count: slots,
                from: generation("v1", slots),
                to: generation("v2", slots),
            }],
            notified: Vec::new(),
            config_changes: Vec::new(),
        };
        Bench {
            reloads: Reloads::default(),
            table,
            plan,
            start: None,
            outcome: None,
            progress: Vec::new(),
            spawned: Vec::new(),
            settled: Vec::new(),
        }
    }

    /// `bench(slots)` whose reload is to leave `count` slots on v2.
    fn bench_to_count(slots: usize, count: usize) -> Bench {
        let mut b = bench(slots);
        b.plan.targets[0].count = count;
        b.plan.targets[0].to = generation("v2", count);
        b
    }

    fn w(n: u64) -> WorkerId {
        WorkerId(n)
    }

    impl Bench {
        /// `host reload` for `group`, started at once if nothing runs.
        fn request(&mut self, group: Option<&str>) -> Vec<String> {
            let (reply, _) = mpsc::unbounded_channel();
            let actions = self
                .reloads
                .reload_requested(group.map(str::to_owned), reply, None);
            let mut lines = self.render(actions);
            if let Some(waiters) = self.start.take() {
                lines.extend(self.begin(waiters));
            }
            lines
        }

        fn reload(&mut self) -> Vec<String> {
            self.request(None)
        }

        /// The master planned the reload asked by `Action::Start`.
        fn begin(&mut self, waiters: Vec<Reply>) -> Vec<String> {
            let actions =
                self.reloads
                    .start(self.plan.clone(), waiters, Instant::now(), &mut self.table);
            self.render(actions)
        }

        fn ready(&mut self, worker: WorkerId) -> Vec<String> {
            let slot = self.table.slot_of[&worker];
            let previous = self.table.serving.insert(slot, worker);
            let actions = self
                .reloads
                .replacement_ready(worker, previous, &mut self.table);
            self.render(actions)
        }

        fn fail(&mut self, worker: WorkerId) -> Vec<String> {
            let (_, slot) = self.table.slot_of[&worker];
            let error = format!("worker web/{slot} failed to start: boom {}", worker.0);
            let actions = self
                .reloads
                .replacement_failed(worker, error, &mut self.table);
            self.render(actions)
        }

        /// A worker's process ended (retired, refused, or crashed).
        fn gone(&mut self, worker: WorkerId) -> Vec<String> {
            if let Some(slot) = self.table.slot_of.remove(&worker) {
                self.table
                    .serving
                    .retain(|s, w| !(*s == slot && *w == worker));
            }
            let actions = self.reloads.worker_gone(worker, &mut self.table);
            self.render(actions)
        }

        fn stop_timeout(&mut self, worker: WorkerId) {
            let killed = KilledWorker {
                group: "web".into(),
                slot: self.table.slot_of[&worker].1,
                pid: 1000 + worker.0 as u32,
                in_flight: 1,
                connections: 1,
            };
            self.reloads.stop_timeout(worker, killed);
        }

        /// `worker`, serving its slot of `web` on v1, is found stuck.
        fn stuck(&mut self, worker: WorkerId) -> Vec<String> {
            let (_, slot) = self.table.slot_of[&worker];
            let slots = self.plan.targets[0].slots;
            let stuck = Stuck {
                worker,
                slot,
                group: Target {
                    group: 0,
                    name: "web".into(),
                    slots,
                    count: slots,
                    from: generation("v1", slots),
                    to: generation("v1", slots),
                },
            };
            let actions = self.reloads.replace_stuck(stuck, &mut self.table);
            self.render(actions)
        }

        fn stop(&mut self) -> Vec<String> {
            let actions = self.reloads.stop_requested("host is stopping");
            self.render(actions)
        }

        fn render(&mut self, actions: Vec<Action>) -> Vec<String> {
            actions
                .into_iter()
                .map(|action| match action {
                    Action::Start { group, waiters, .. } => {
                        let line = format!(
                            "start {} for {}",
                            group.as_deref().unwrap_or("all"),
                            waiters.len()
                        );
                        self.start = Some(waiters);
                        line
                    }
                    Action::Notify { group } => format!("notify {group}"),
                    Action::Spawn {
                        worker,
                        group,
                        slot,
                        generation,
                    } => {
                        self.table.slot_of.insert(worker, (group, slot));
                        self.spawned.push(generation.clone());
                        format!(
                            "spawn w{} {group}/{slot} {}",
                            worker.0, generation.version.hash
                        )
                    }
                    Action::Retire(worker) => format!("retire w{}", worker.0),
                    Action::Kill(worker) => format!("kill w{}", worker.0),
                    Action::Refill { group, slot } => format!("refill {group}/{slot}"),
                    Action::Reply { to, reply } => match reply {
                        ControlReply::Progress(step) => {
                            let line = format!(
                                "progress {}/{} {}{}",
                                step.group,
                                step.slot,
                                step.new_version,
                                if step.rollback { " rollback" } else { "" }
                            );
                            self.progress.push(step);
                            line
                        }
                        ControlReply::Reloaded(outcome) => {
                            let ok = if outcome.ok { "ok" } else { "failed" };
                            self.outcome = Some(outcome);
                            format!("reloaded {ok} to {}", to.len())
                        }
                        ControlReply::Accepted { .. } => format!("queued to {}", to.len()),
                        ControlReply::Waiting(waiting) => format!(
                            "waiting {}/{} pid {} {} of {} ms",
                            waiting.group,
                            waiting.slot,
                            waiting.pid,
                            waiting.version,
                            waiting.start_timeout_ms
                        ),
                        ControlReply::Error { message } => {
                            format!("error to {}: {message}", to.len())
                        }
                        other => panic!("a reload does not send {other:?}"),
                    },
                    Action::Finish { error, groups, .. } => {
                        let ok = error.is_none();
                        self.settled = groups.clone();
                        let groups: Vec<String> = groups
                            .iter()
                            .map(|g| {
                                format!("{}={}x{}", g.group, g.generation.version.hash, g.count)
                            })
                            .collect();
                        format!("finish ok={ok} {}", groups.join(","))
                    }
                    Action::Refused { .. } => "refused".to_owned(),
                })
                .collect()
        }

        fn outcome(&self) -> &ReloadOutcome {
            self.outcome.as_ref().expect("the reload ended")
        }
    }

    #[test]
    fn a_clean_reload_replaces_one_slot_at_a_time_and_ends_when_old_workers_are_gone() {
        let mut b = bench(2);
        assert_eq!(b.reload(), ["start all for 1", "spawn w3 0/0 v2"]);
        assert!(b.reloads.is_running());
        assert_eq!(
            b.ready(w(3)),
            ["retire w1", "progress web/0 v2", "spawn w4 0/1 v2"]
        );
        assert_eq!(b.ready(w(4)), ["retire w2", "progress web/1 v2"]);
        assert_eq!(b.gone(w(1)), Vec::<String>::new());
        assert_eq!(b.gone(w(2)), ["finish ok=true 0=v2x2", "reloaded ok to 1"]);
        assert!(!b.reloads.is_running());
        let outcome = b.outcome();
        assert!(outcome.ok && outcome.error.is_none());
        assert_eq!(
            (
                outcome.groups[0].from.as_str(),
                outcome.groups[0].to.as_str()
            ),
            ("v1", "v2")
        );
        assert_eq!(b.progress[0].old_pid, Some(1001));
        assert_eq!(b.progress[0].new_pid, 1003);
    }

    #[test]
    fn a_failed_replacement_puts_back_the_slots_already_replaced_last_first() {
        let mut b = bench(3);
        b.reload();
        b.ready(w(4));
        assert_eq!(
            b.ready(w(5)),
            ["retire w2", "progress web/1 v2", "spawn w6 0/2 v2"]
        );
        assert_eq!(b.fail(w(6)), ["spawn w7 0/1 v1"]);
        assert_eq!(
            b.ready(w(7)),
            ["retire w5", "progress web/1 v1 rollback", "spawn w8 0/0 v1"]
        );
        assert_eq!(b.ready(w(8)), ["retire w4", "progress web/0 v1 rollback"]);
        for worker in [1, 2, 6, 5] {
            assert_eq!(b.gone(w(worker)), Vec::<String>::new(), "w{worker}");
        }
        assert_eq!(
            b.gone(w(4)),
            ["finish ok=false 0=v1x3", "reloaded failed to 1"]
        );
        let outcome = b.outcome();
        assert_eq!(
            outcome.error.as_deref(),
            Some("worker web/2 failed to start: boom 6")
        );
        assert_eq!(outcome.groups[0].to, "v1", "the group keeps its version");
    }

    #[test]
    fn a_failure_while_putting_back_is_added_to_the_error_and_the_rollback_goes_on() {
        let mut b = bench(3);
        b.reload();
        b.ready(w(4));
        b.ready(w(5));
        b.fail(w(6));
        assert_eq!(b.fail(w(7)), ["spawn w8 0/0 v1"]);
        b.ready(w(8));
        for worker in [1, 2, 6, 7, 4] {
            b.gone(w(worker));
        }
        assert_eq!(
            b.outcome().error.as_deref(),
            Some(
                "worker web/2 failed to start: boom 6; putting back the previous version \
                 on web/1 failed too: worker web/1 failed to start: boom 7"
            )
        );
    }

    #[test]
    fn a_failed_first_replacement_ends_the_reload_once_it_is_gone() {
        let mut b = bench(2);
        b.reload();
        assert_eq!(b.fail(w(3)), Vec::<String>::new());
        assert!(b.reloads.is_running(), "the refused worker is still there");
        assert_eq!(
            b.gone(w(3)),
            ["finish ok=false 0=v1x2", "reloaded failed to 1"]
        );
    }

    #[test]
    fn a_ready_worker_crashing_mid_reload_is_not_retired_and_the_reload_goes_on() {
        let mut b = bench(3);
        b.reload();
        // Slot 2's old worker dies before its turn; slot 1's dies while its
        // replacement starts. Neither is retired: they are gone.
        assert_eq!(b.gone(w(3)), Vec::<String>::new());
        assert_eq!(
            b.ready(w(4)),
            ["retire w1", "progress web/0 v2", "spawn w5 0/1 v2"]
        );
        assert_eq!(b.gone(w(2)), Vec::<String>::new());
        assert_eq!(
            b.ready(w(5)),
            ["progress web/1 v2", "spawn w6 0/2 v2"],
            "nothing to retire"
        );
        assert_eq!(b.ready(w(6)), ["progress web/2 v2"]);
        assert_eq!(b.progress[1].old_pid, None);
        assert_eq!(b.progress[2].old_pid, None);
        // A new worker crashes: not the reload's concern.
        assert_eq!(b.gone(w(4)), Vec::<String>::new());
        assert_eq!(b.gone(w(1)), ["finish ok=true 0=v2x3", "reloaded ok to 1"]);
    }

    #[test]
    fn a_slot_whose_worker_died_and_whose_replacement_failed_is_refilled() {
        let mut b = bench(1);
        b.reload();
        b.gone(w(1));
        assert_eq!(b.fail(w(2)), ["refill 0/0"]);
        assert_eq!(
            b.gone(w(2)),
            ["finish ok=false 0=v1x1", "reloaded failed to 1"]
        );
    }

    #[test]
    fn a_stuck_worker_is_killed_once_its_replacement_serves_and_no_reload_is_counted() {
        let mut b = bench(2);
        assert_eq!(b.stuck(w(2)), ["spawn w3 0/1 v1"]);
        assert!(b.reloads.replaces(w(2)));
        // Asked again while its replacement starts: nothing more.
        assert_eq!(b.stuck(w(2)), Vec::<String>::new());
        assert_eq!(b.ready(w(3)), ["kill w2"]);
        assert!(b.reloads.is_running());
        assert_eq!(b.gone(w(2)), Vec::<String>::new());
        assert!(!b.reloads.is_running());
        assert!(b.outcome.is_none() && b.settled.is_empty());
        assert_eq!(b.table.serving(0, 1), Some(w(3)));
        assert_eq!(b.table.serving(0, 0), Some(w(1)));
    }

    #[test]
    fn a_reload_asked_while_a_stuck_worker_is_replaced_waits_for_it() {
        let mut b = bench(2);
        b.stuck(w(1));
        assert_eq!(b.request(None), ["queued to 1"]);
        assert_eq!(b.ready(w(3)), ["kill w1"]);
        assert_eq!(b.gone(w(1)), ["start all for 1"]);
        let waiters = b.start.take().unwrap();
        assert_eq!(b.begin(waiters), ["spawn w4 0/0 v2"]);
    }

    #[test]
    fn a_stuck_worker_found_during_a_reload_is_replaced_after_it_unless_the_reload_did() {
        // The reload fails at slot 0: slot 1 still has its stuck worker,
        // which is replaced next, before the queued reload.
        let mut b = bench(2);
        b.reload();
        assert_eq!(b.stuck(w(2)), Vec::<String>::new());
        assert_eq!(b.request(None), ["queued to 1"]);
        b.fail(w(3));
        assert_eq!(
            b.gone(w(3)),
            [
                "finish ok=false 0=v1x2",
                "reloaded failed to 1",
                "spawn w4 0/1 v1"
            ]
        );
        assert_eq!(b.ready(w(4)), ["kill w2"]);
        assert_eq!(b.gone(w(2)), ["start all for 1"]);

        // The reload replaces the stuck worker itself: nothing after it.
        let mut b = bench(2);
        b.reload();
        b.stuck(w(2));
        b.ready(w(3));
        assert_eq!(b.ready(w(4)), ["retire w2", "progress web/1 v2"]);
        b.gone(w(1));
        assert_eq!(b.gone(w(2)), ["finish ok=true 0=v2x2", "reloaded ok to 1"]);
        assert!(!b.reloads.is_running() && !b.reloads.replaces(w(2)));
    }

    #[test]
    fn a_stuck_worker_whose_replacement_fails_keeps_its_slot_and_can_be_found_again() {
        let mut b = bench(1);
        b.stuck(w(1));
        assert_eq!(b.fail(w(2)), Vec::<String>::new());
        assert_eq!(b.gone(w(2)), Vec::<String>::new());
        assert!(!b.reloads.is_running() && !b.reloads.replaces(w(1)));
        assert!(b.outcome.is_none());
        assert_eq!(b.table.serving(0, 0), Some(w(1)));
        assert_eq!(b.stuck(w(1)), ["spawn w3 0/0 v1"]);
        // A stop ends it without a reload outcome.
        assert_eq!(b.stop(), Vec::<String>::new());
        assert!(!b.reloads.is_running());
    }

    #[test]
    fn a_stop_ends_the_running_reload_as_failed_and_refuses_the_queued_one() {
        let mut b = bench(2);
        b.reload();
        b.ready(w(3));
        assert_eq!(b.request(None), ["queued to 1"]);
        assert_eq!(
            b.stop(),
            [
                "finish ok=false 0=v1x2",
                "reloaded failed to 1",
                "error to 1: host is stopping"
            ]
        );
        assert_eq!(b.outcome().error.as_deref(), Some("host is stopping"));
        assert!(!b.reloads.is_running());
        // What the stop's own exits then say concerns no reload.
        assert_eq!(b.ready(w(4)), Vec::<String>::new());
        assert_eq!(b.gone(w(1)), Vec::<String>::new());
    }

    #[test]
    fn reloads_asked_during_a_reload_merge_into_one_queued_behind_it() {
        let mut b = bench(1);
        b.request(Some("web"));
        assert_eq!(b.request(Some("web")), ["queued to 1"]);
        assert_eq!(b.request(Some("api")), ["queued to 1"]);
        b.ready(w(2));
        assert_eq!(
            b.gone(w(1)),
            [
                "finish ok=true 0=v2x1",
                "reloaded ok to 1",
                "start all for 2"
            ],
            "two groups asked: the queued reload is of all groups, for both callers"
        );
        let waiters = b.start.take().expect("the queued reload starts");
        assert_eq!(b.begin(waiters), ["spawn w3 0/0 v2"]);
        b.ready(w(3));
        assert_eq!(b.gone(w(2)), ["finish ok=true 0=v2x1", "reloaded ok to 2"]);
    }

    #[test]
    fn a_worker_killed_at_its_stop_timeout_is_reported_by_the_reload_that_retired_it() {
        let mut b = bench(1);
        b.reload();
        b.ready(w(2));
        b.stop_timeout(w(2));
        b.stop_timeout(w(1));
        b.gone(w(1));
        let killed = &b.outcome().killed;
        assert_eq!(killed.len(), 1, "the serving replacement is not reported");
        assert_eq!((killed[0].pid, killed[0].slot), (1001, 0));
    }

    #[test]
    fn a_group_that_is_not_reloadable_is_only_notified() {
        let mut b = bench(1);
        b.plan.notified.push((1, "jobs".into()));
        assert_eq!(
            b.reload(),
            ["start all for 1", "notify 1", "spawn w2 0/0 v2"]
        );
        b.plan.targets.clear();
        let mut alone = bench(0);
        alone.plan = b.plan.clone();
        assert_eq!(
            alone.reload(),
            [
                "start all for 1",
                "notify 1",
                "finish ok=true ",
                "reloaded ok to 1"
            ]
        );
        assert_eq!(alone.outcome().notified, ["jobs"]);
        assert!(alone.outcome().groups.is_empty());
    }

    #[test]
    fn a_reload_that_cannot_be_planned_is_reported_as_failed() {
        let mut b = bench(1);
        let (reply, _) = mpsc::unbounded_channel();
        let actions = b.reloads.reload_requested(None, reply, None);
        let Some(Action::Start { waiters, .. }) = actions.into_iter().next() else {
            panic!("nothing runs: the reload starts");
        };
        let actions = b.reloads.refused(
            "no such version".into(),
            waiters,
            Instant::now(),
            &mut b.table,
        );
        assert_eq!(b.render(actions), ["refused", "reloaded failed to 1"]);
        assert_eq!(b.outcome().error.as_deref(), Some("no such version"));
        assert!(!b.reloads.is_running());
    }

    #[test]
    fn a_larger_count_starts_the_added_slots_after_replacing_the_others() {
        let mut b = bench_to_count(1, 2);
        assert_eq!(b.reload(), ["start all for 1", "spawn w2 0/0 v2"]);
        assert_eq!(
            b.ready(w(2)),
            ["retire w1", "progress web/0 v2", "spawn w3 0/1 v2"]
        );
        assert_eq!(b.ready(w(3)), ["progress web/1 v2"], "nobody to retire");
        assert_eq!(b.progress[1].old_pid, None);
        assert_eq!(b.gone(w(1)), ["finish ok=true 0=v2x2", "reloaded ok to 1"]);
        assert_eq!(b.settled[0].generation.config.count, 2);
    }

    #[test]
    fn a_smaller_count_retires_the_dropped_slots_once_the_others_are_replaced() {
        let mut b = bench_to_count(3, 1);
        assert_eq!(b.reload(), ["start all for 1", "spawn w4 0/0 v2"]);
        assert_eq!(
            b.ready(w(4)),
            ["retire w1", "progress web/0 v2", "retire w2", "retire w3"]
        );
        assert_eq!(b.gone(w(1)), Vec::<String>::new());
        assert_eq!(b.gone(w(2)), Vec::<String>::new());
        assert_eq!(b.gone(w(3)), ["finish ok=true 0=v2x1", "reloaded ok to 1"]);
    }

    #[test]
    fn callers_hear_of_the_replacement_the_reload_waits_on_and_of_no_other() {
        let mut b = bench(2);
        b.reload();
        let actions = b.reloads.still_starting(w(3), &b.table);
        assert_eq!(b.render(actions), ["waiting web/0 pid 1003 v2 of 10000 ms"]);
        b.ready(w(3));
        let actions = b.reloads.still_starting(w(3), &b.table);
        assert!(actions.is_empty(), "ready: nothing to wait on");
        let actions = b.reloads.still_starting(w(4), &b.table);
        assert_eq!(b.render(actions), ["waiting web/1 pid 1004 v2 of 10000 ms"]);
    }

    #[test]
    fn the_slots_a_reload_drops_are_known_while_it_runs() {
        let mut b = bench_to_count(3, 1);
        assert!(!b.reloads.drops(0, 2), "no reload runs");
        b.reload();
        assert_eq!(
            [0, 1, 2].map(|slot| b.reloads.drops(0, slot)),
            [false, true, true]
        );
        assert!(!b.reloads.drops(1, 2), "another group");
    }

    #[test]
    fn an_added_group_starts_its_workers_and_keeps_them() {
        let mut b = bench(1);
        let mut ws = generation("v2", 2);
        ws.config = Arc::new(GroupConfig {
            name: "ws".into(),
            ..(*ws.config).clone()
        });
        b.plan.targets = vec![Target {
            group: 1,
            name: "ws".into(),
            slots: 0,
            count: 2,
            from: ws.clone(),
            to: ws,
        }];
        assert_eq!(b.reload(), ["start all for 1", "spawn w2 1/0 v2"]);
        assert_eq!(b.ready(w(2)), ["progress ws/0 v2", "spawn w3 1/1 v2"]);
        assert_eq!(
            b.ready(w(3)),
            [
                "progress ws/1 v2",
                "finish ok=true 1=v2x2",
                "reloaded ok to 1"
            ]
        );
    }

    #[test]
    fn a_failed_reload_leaves_an_added_group_without_slots() {
        let mut b = bench(0);
        b.plan.targets[0].count = 1;
        b.plan.targets[0].to = b.plan.targets[0].from.clone();
        b.reload();
        assert_eq!(b.fail(w(1)), Vec::<String>::new());
        assert_eq!(
            b.gone(w(1)),
            ["finish ok=false 0=v1x0", "reloaded failed to 1"]
        );
    }

    #[test]
    fn a_removed_group_drains_all_its_workers_and_keeps_no_slot() {
        let mut b = bench_to_count(2, 0);
        b.plan.targets[0].to = b.plan.targets[0].from.clone();
        assert_eq!(b.reload(), ["start all for 1", "retire w1", "retire w2"]);
        assert!(b.reloads.is_running(), "until its workers are gone");
        assert_eq!(b.gone(w(1)), Vec::<String>::new());
        assert_eq!(b.gone(w(2)), ["finish ok=true 0=v1x0", "reloaded ok to 1"]);
    }

    #[test]
    fn a_moved_group_starts_its_replacements_on_the_new_address_and_settles_there() {
        let mut b = bench(2);
        let mut moved = (*b.plan.targets[0].to.config).clone();
        moved.listen = "127.0.0.1:9000".parse().unwrap();
        b.plan.targets[0].to.config = Arc::new(moved);
        b.reload();
        b.ready(w(3));
        b.ready(w(4));
        b.gone(w(1));
        b.gone(w(2));
        let listens: Vec<String> = b
            .spawned
            .iter()
            .map(|g| g.config.listen.to_string())
            .collect();
        assert_eq!(listens, ["127.0.0.1:9000", "127.0.0.1:9000"]);
        assert_eq!(
            b.settled[0].generation.config.listen.to_string(),
            "127.0.0.1:9000"
        );
    }

    #[test]
    fn a_failed_config_reload_retires_the_added_slots_and_puts_the_old_config_back() {
        let mut b = bench_to_count(1, 3);
        b.plan.targets[0].to.config = Arc::new(GroupConfig {
            settings: [("greeting".to_owned(), toml::Value::from("hi"))].into(),
            ..(*b.plan.targets[0].to.config).clone()
        });
        b.reload();
        b.ready(w(2));
        assert_eq!(b.ready(w(3)), ["progress web/1 v2", "spawn w4 0/2 v2"]);
        assert_eq!(b.fail(w(4)), ["retire w3", "spawn w5 0/0 v1"]);
        assert!(
            b.spawned[3].config.settings.is_empty(),
            "the slot put back runs the old config"
        );
        assert_eq!(b.ready(w(5)), ["retire w2", "progress web/0 v1 rollback"]);
        for worker in [1, 4, 3] {
            assert_eq!(b.gone(w(worker)), Vec::<String>::new(), "w{worker}");
        }
        assert_eq!(
            b.gone(w(2)),
            ["finish ok=false 0=v1x1", "reloaded failed to 1"]
        );
        assert!(b.settled[0].generation.config.settings.is_empty());
        let outcome = b.outcome();
        assert_eq!(
            (
                outcome.groups[0].to.as_str(),
                outcome.groups[0].wanted.as_str()
            ),
            ("v1", "v2")
        );
    }
}
