//! `request_timeout`: workers whose handler calls do not return.
//!
//! Once a second the master reads each worker's shared counters. A worker
//! bumps `heartbeat` from its event loop once a second; with inline
//! dispatch a handler call runs on that loop, so a ready worker with
//! requests in flight whose heartbeat has not moved for `request_timeout`
//! is blocked by one. The heartbeat moves once a second and is looked at
//! once a second, so a live loop can look still for up to two seconds:
//! a loop still for `request_timeout` plus [`HEARTBEAT_SLACK`] is blocked
//! (a call is noticed two to three seconds after its timeout; one shorter
//! than its timeout never is). With pool dispatch the worker itself answers `503`
//! to a call that ran that long and counts it in `stuck_calls`: the thread
//! cannot be reclaimed. Either way the worker is replaced through the
//! reload machine ([`Reloads::replace_stuck`]): its replacement starts and
//! becomes ready, then it is killed; a replacement that cannot start is
//! asked for again after a wait that doubles from 1 s to 60 s. Nothing here
//! costs a request anything.
//! This file changes only what it watches and counts (each worker's
//! [`StuckWatch`], each group's `request_timeouts`); the replacement is the
//! reload machine's.
//!
//! [`Reloads::replace_stuck`]: super::reload::Reloads::replace_stuck

use std::time::{Duration, Instant};

use super::lifecycle::WorkerId;
use super::reload::{Generation, Stuck, Target};
use super::supervisor::Master;
use crate::config::GroupPart;
use crate::counters::WorkerCounters;

/// How long a live event loop's heartbeat can look still: its period plus
/// the period of the master's look.
const HEARTBEAT_SLACK: Duration = Duration::from_secs(2);

/// How long after a replacement of a stuck worker that did not happen (it
/// could not start) the next one is asked for; doubled each time, up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two replacements asked for one stuck worker.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What the master last saw of one worker's progress.
pub(super) struct StuckWatch {
    /// `heartbeat` as last seen.
    heartbeat: u64,
    /// Since when it has not moved with requests in flight.
    still_since: Instant,
    /// `stuck_calls` already counted.
    stuck_calls: u64,
    /// Whether its blocked event loop was already counted.
    blocked: bool,
    /// When a replacement may be asked for again, and the wait after that.
    retry: Option<(Instant, Duration)>,
}

impl StuckWatch {
    /// Nothing seen yet.
    pub(super) fn new() -> StuckWatch {
        StuckWatch {
            heartbeat: 0,
            still_since: Instant::now(),
            stuck_calls: 0,
            blocked: false,
            retry: None,
        }
    }

    /// Whether a replacement may be asked for `now`: the first time at
    /// once, then after 1, 2, 4 ... up to 60 s (a worker still here was
    /// not replaced: its replacement could not start). Notes the ask.
    fn may_ask(&mut self, now: Instant) -> bool {
        let wait = match self.retry {
            None => RETRY_FIRST,
            Some((at, _)) if now < at => return false,
            Some((_, wait)) => wait,
        };
        self.retry = Some((now + wait, (wait * 2).min(RETRY_MAX)));
        true
    }
}

/// What one look found wrong with a worker.
struct Finding {
    worker: WorkerId,
    /// How long its event loop has been blocked, if it is.
    blocked_for: Option<Duration>,
    /// Pool calls newly reported stuck.
    stuck_calls: u64,
    limit: Duration,
}

impl Master {
    /// Once a second: counts and replaces workers stuck in a handler call.
    pub(super) fn check_stuck(&mut self) {
        let now = Instant::now();
        let mut findings = Vec::new();
        for (id, worker) in &mut self.workers {
            // Gateways and business workers have no HTTP handler calls.
            let http = worker.config.part == GroupPart::Http;
            let Some(limit) = worker.config.request_timeout.filter(|_| http) else {
                continue;
            };
            let counters = &worker.counters;
            let watch = &mut worker.watch;
            let heartbeat = WorkerCounters::get(&counters.heartbeat);
            let busy = WorkerCounters::get(&counters.in_flight) > 0;
            if heartbeat != watch.heartbeat || !busy || !worker.lifecycle.is_ready() {
                watch.heartbeat = heartbeat;
                watch.still_since = now;
            }
            let still = now.duration_since(watch.still_since);
            let blocked_for = (still >= limit + HEARTBEAT_SLACK).then_some(still);
            let stuck_calls = WorkerCounters::get(&counters.stuck_calls) - watch.stuck_calls;
            watch.stuck_calls += stuck_calls;
            let newly_blocked = blocked_for.is_some() && !watch.blocked;
            watch.blocked |= newly_blocked;
            if blocked_for.is_some() || stuck_calls > 0 {
                let counted = stuck_calls + u64::from(newly_blocked);
                if counted > 0 {
                    let group = &mut self.groups[worker.group];
                    group.request_timeouts += counted;
                    self.metrics.request_timeouts(&group.config.name, counted);
                }
                findings.push(Finding {
                    worker: *id,
                    blocked_for,
                    stuck_calls,
                    limit,
                });
            }
        }
        for finding in findings {
            self.replace_stuck(finding, now);
        }
    }

    /// Asks the reload machine for a replacement of a stuck worker that
    /// still serves its slot, unless it has one coming or one was asked
    /// for too recently (see [`StuckWatch::may_ask`]).
    fn replace_stuck(&mut self, finding: Finding, now: Instant) {
        let id = finding.worker;
        if self.reloads.replaces(id) || self.is_stopping() {
            return;
        }
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let retry = worker.watch.retry.is_some();
        if !worker.watch.may_ask(now) {
            return;
        }
        let (group, slot, pid) = (worker.group, worker.slot, worker.pid);
        if self.groups[group].slots.get(slot).and_then(|s| s.serving()) != Some(id) {
            return;
        }
        let label = format!("{}/{}", self.groups[group].config.name, slot);
        let limit = finding.limit;
        if retry {
            tracing::warn!(worker = %label, pid, "the stuck worker's replacement did not start; asking again");
        }
        match finding.blocked_for {
            Some(stuck) => tracing::warn!(
                worker = %label,
                pid,
                "worker stuck in a handler call for {} s (request_timeout {limit:?}); replacing it",
                stuck.as_secs()
            ),
            None => tracing::warn!(
                worker = %label,
                pid,
                "{} handler call(s) ran past request_timeout ({limit:?}) and were answered 503; replacing the worker",
                finding.stuck_calls
            ),
        }
        let generation = Generation {
            version: worker.version.clone(),
            config: worker.config.clone(),
        };
        let g = &self.groups[group];
        let stuck = Stuck {
            worker: id,
            slot,
            group: Target {
                group,
                name: g.config.name.clone(),
                slots: g.slots.len(),
                count: g.slots.len(),
                from: generation.clone(),
                to: generation,
            },
        };
        self.ask_reloads(|reloads, table| reloads.replace_stuck(stuck, table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacements_of_one_stuck_worker_are_asked_for_with_a_growing_wait() {
        let mut watch = StuckWatch::new();
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert!(watch.may_ask(at(0)), "the first ask is at once");
        assert!(!watch.may_ask(at(0)));
        assert!(watch.may_ask(at(1)), "then after 1 s");
        assert!(!watch.may_ask(at(2)));
        assert!(watch.may_ask(at(3)), "then 2 s");
        assert!(!watch.may_ask(at(6)));
        assert!(watch.may_ask(at(7)), "then 4 s");
        let mut t = 7;
        for _ in 0..10 {
            while !watch.may_ask(at(t)) {
                t += 1;
            }
        }
        let before = t;
        t += 1;
        while !watch.may_ask(at(t)) {
            t += 1;
        }
        assert_eq!(t - before, 60, "the wait stops growing at 60 s");
    }
}
