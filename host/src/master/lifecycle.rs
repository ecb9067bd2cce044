//! Where one worker is in its life, and the moves between its states.
//!
//! ```text
//! Starting ──ready──> Ready ──drain──> Draining ──(exit)──> gone
//!    │                  └──(exit)──> gone: a crash, refilled by its slot
//!    └──start_failed──> Failed ──(exit)──> gone
//! ```
//!
//! `Failed` is a start that went wrong (an error report, a start timeout, an
//! exit before ready, or a stop cutting the start short): the process was
//! sent SIGKILL and only its exit is awaited, so that exit is not dealt with
//! a second time and a late ready report is ignored. Each transition is a
//! method that refuses moves that make no sense and returns what the caller
//! needs to act on. The wire [`WorkerState`] is derived only where status is
//! rendered.

use std::time::Instant;

use super::metrics::ExitReason;
use crate::protocol::control::WorkerState;

/// Identifies a worker for the master's whole life (pids get reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

/// Why a worker was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// To fill its slot (at start, or after a death).
    Fill,
    /// To replace the slot's worker in a reload.
    Replacement,
}

/// Where a worker is in its life; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Loading its handler; not serving yet.
    Starting {
        /// Why it was started.
        role: Role,
    },
    /// Accepting and serving.
    Ready {
        /// When it reported ready.
        since: Instant,
    },
    /// Told to finish its connections and exit.
    Draining {
        /// Whether the master killed it at its stop timeout.
        killed: bool,
    },
    /// Its start failed and it was sent SIGKILL; its exit is awaited.
    Failed,
}

impl Lifecycle {
    /// A worker just spawned for `role`.
    pub fn starting(role: Role) -> Lifecycle {
        Lifecycle::Starting { role }
    }

    /// It reported ready: returns its role, or `None` when the report comes
    /// too late to count (the start already failed, or it is stopping).
    pub fn ready(&mut self, now: Instant) -> Option<Role> {
        let Lifecycle::Starting { role } = *self else {
            return None;
        };
        *self = Lifecycle::Ready { since: now };
        Some(role)
    }

    /// Its start failed: returns its role, or `None` when that was already
    /// dealt with (or it is past starting).
    pub fn start_failed(&mut self) -> Option<Role> {
        let Lifecycle::Starting { role } = *self else {
            return None;
        };
        *self = Lifecycle::Failed;
        Some(role)
    }

    /// Whether it is on its way to ready (not failed).
    pub fn is_starting(&self) -> bool {
        matches!(self, Lifecycle::Starting { .. })
    }

    /// Whether it is serving.
    pub fn is_ready(&self) -> bool {
        matches!(self, Lifecycle::Ready { .. })
    }

    /// Told to finish: returns whether that is news (it was serving).
    pub fn drain(&mut self) -> bool {
        if !self.is_ready() {
            return false;
        }
        *self = Lifecycle::Draining { killed: false };
        true
    }

    /// Told to stop now (a fast stop): a serving or draining worker drains,
    /// whatever it was doing.
    pub fn stop_now(&mut self) {
        if self.is_ready() {
            *self = Lifecycle::Draining { killed: false };
        }
    }

    /// Its stop timeout elapsed: returns whether it is still draining, and
    /// so is to be killed.
    pub fn stop_timed_out(&mut self) -> bool {
        let Lifecycle::Draining { killed } = self else {
            return false;
        };
        *killed = true;
        true
    }

    /// Why it ended, if its process exits now.
    pub fn exit_reason(&self) -> ExitReason {
        match self {
            Lifecycle::Starting { .. } | Lifecycle::Failed => ExitReason::StartFailed,
            Lifecycle::Ready { .. } => ExitReason::Crashed,
            Lifecycle::Draining { killed: true } => ExitReason::Killed,
            Lifecycle::Draining { killed: false } => ExitReason::Retired,
        }
    }

    /// What `host status` shows: a failed start shows as starting until its
    /// process is gone.
    pub fn wire(&self) -> WorkerState {
        match self {
            Lifecycle::Starting { .. } | Lifecycle::Failed => WorkerState::Starting,
            Lifecycle::Ready { .. } => WorkerState::Ready,
            Lifecycle::Draining { .. } => WorkerState::Draining,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_starts_serves_drains_and_retires() {
        let now = Instant::now();
        let mut worker = Lifecycle::starting(Role::Replacement);
        assert_eq!(worker.wire(), WorkerState::Starting);
        assert_eq!(worker.ready(now), Some(Role::Replacement));
        assert_eq!(worker.wire(), WorkerState::Ready);
        assert_eq!(worker.exit_reason(), ExitReason::Crashed);
        assert!(worker.drain());
        assert!(!worker.drain(), "a second drain is no news");
        assert_eq!(worker.wire(), WorkerState::Draining);
        assert_eq!(worker.exit_reason(), ExitReason::Retired);
    }

    #[test]
    fn a_failed_start_is_dealt_with_once_and_a_late_ready_is_ignored() {
        let mut worker = Lifecycle::starting(Role::Fill);
        assert_eq!(worker.start_failed(), Some(Role::Fill));
        assert_eq!(worker.start_failed(), None, "the exit that follows");
        assert_eq!(worker.ready(Instant::now()), None);
        assert!(!worker.is_starting());
        assert_eq!(worker.wire(), WorkerState::Starting);
        assert_eq!(worker.exit_reason(), ExitReason::StartFailed);
    }

    #[test]
    fn a_ready_worker_cannot_fail_its_start() {
        let mut worker = Lifecycle::starting(Role::Fill);
        worker.ready(Instant::now());
        assert_eq!(worker.start_failed(), None);
        assert!(worker.is_ready());
    }

    #[test]
    fn a_stop_timeout_kills_only_a_draining_worker() {
        let mut worker = Lifecycle::starting(Role::Fill);
        worker.ready(Instant::now());
        assert!(!worker.stop_timed_out(), "a serving worker is not killed");
        assert!(worker.drain());
        assert!(worker.stop_timed_out());
        assert_eq!(worker.exit_reason(), ExitReason::Killed);
        assert_eq!(worker.wire(), WorkerState::Draining);
    }

    #[test]
    fn a_fast_stop_keeps_a_kill_already_made() {
        let mut worker = Lifecycle::starting(Role::Fill);
        worker.ready(Instant::now());
        worker.stop_now();
        assert_eq!(worker.wire(), WorkerState::Draining);
        worker.stop_timed_out();
        worker.stop_now();
        assert_eq!(worker.exit_reason(), ExitReason::Killed);
    }
}
