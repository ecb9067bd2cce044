//! One position in a group: the worker serving it, the version it runs, and
//! the restart backoff after its workers die.
//!
//! A worker that dies within [`QUICK_DEATH`] of becoming ready (or before)
//! counts as a quick death; each one doubles the wait before the next
//! restart, from 200 ms up to 10 s, so a crash loop never spins. A worker
//! that served longer resets the count and is restarted at once.

use std::sync::Arc;
use std::time::Duration;

use super::lifecycle::WorkerId;
use crate::versions::store::Version;

/// A worker that dies sooner than this after ready counts toward the backoff.
pub const QUICK_DEATH: Duration = Duration::from_secs(5);

/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One position in a group; see the module docs.
pub struct WorkerSlot {
    serving: Option<WorkerId>,
    version: Arc<Version>,
    quick_deaths: u32,
}

impl WorkerSlot {
    /// An empty slot that will run `version`.
    pub fn new(version: Arc<Version>) -> WorkerSlot {
        WorkerSlot {
            serving: None,
            version,
            quick_deaths: 0,
        }
    }

    /// The worker serving this slot.
    pub fn serving(&self) -> Option<WorkerId> {
        self.serving
    }

    /// The version this slot runs (differs from its group's mid-reload).
    pub fn version(&self) -> &Arc<Version> {
        &self.version
    }

    /// A worker became ready for this slot: it serves it from now on.
    /// Returns the worker it takes over from.
    pub fn install(&mut self, worker: WorkerId, version: Arc<Version>) -> Option<WorkerId> {
        self.version = version;
        self.serving.replace(worker)
    }

    /// A worker died: returns whether it was this slot's, which is then
    /// empty until a restart fills it.
    pub fn vacate(&mut self, worker: WorkerId) -> bool {
        if self.serving != Some(worker) {
            return false;
        }
        self.serving = None;
        true
    }

    /// How long to wait before the next restart, after a death that was
    /// quick (`true`) or not.
    pub fn restart_delay(&mut self, quick_death: bool) -> Duration {
        self.quick_deaths = if quick_death {
            self.quick_deaths + 1
        } else {
            0
        };
        match self.quick_deaths {
            0 => Duration::ZERO,
            n => Duration::from_millis(100u64 << n.min(7)).min(MAX_BACKOFF),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A version for tests that never touch the store.
    pub(crate) fn version(name: &str) -> Arc<Version> {
        Arc::new(Version {
            hash: name.to_owned(),
            path: format!("/store/{name}.so").into(),
            source: "/src/handler.so".into(),
        })
    }

    #[test]
    fn crash_restarts_back_off_while_workers_die_quickly() {
        let mut slot = WorkerSlot::new(version("v1"));
        let delays: Vec<u128> = (0..9)
            .map(|_| slot.restart_delay(true).as_millis())
            .collect();
        assert_eq!(
            delays,
            [200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]
        );
    }

    #[test]
    fn a_worker_that_served_a_while_resets_the_backoff() {
        let mut slot = WorkerSlot::new(version("v1"));
        slot.restart_delay(true);
        slot.restart_delay(true);
        assert_eq!(slot.restart_delay(false), Duration::ZERO);
        assert_eq!(slot.restart_delay(true), Duration::from_millis(200));
    }

    #[test]
    fn only_the_serving_worker_vacates_its_slot() {
        let mut slot = WorkerSlot::new(version("v1"));
        assert_eq!(slot.install(WorkerId(1), version("v2")), None);
        assert_eq!(slot.install(WorkerId(2), version("v2")), Some(WorkerId(1)));
        assert!(
            !slot.vacate(WorkerId(1)),
            "a retired worker is no longer the slot's"
        );
        assert!(slot.vacate(WorkerId(2)));
        assert_eq!(slot.serving(), None);
        assert_eq!(slot.version().hash, "v2");
    }
}
