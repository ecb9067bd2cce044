//! Per-worker counters in shared memory.
//!
//! The master creates a small memfd for each worker and passes it at spawn;
//! the worker bumps atomics in it on the request path and the master reads
//! them whenever it wants (status, metrics) without a round trip. The master
//! keeps the mapping after the worker exits, so final counts are never lost.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result};
use memmap2::{MmapMut, MmapOptions};

/// The counters one worker publishes.
#[repr(C)]
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Responses sent.
    pub requests: AtomicU64,
    /// Requests being answered.
    pub in_flight: AtomicU64,
    /// Open connections.
    pub connections: AtomicU64,
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub by_class: [AtomicU64; 5],
    /// Connections closed at `header_timeout`, requests answered 408 at
    /// `body_timeout`.
    pub timeouts: [AtomicU64; 2],
    /// Failed `accept` calls (out of file descriptors, mostly).
    pub accept_errors: AtomicU64,
    /// A gateway's own counts (zero for other workers). A gateway also
    /// keeps `connections` (its clients), `in_flight` (events waiting for a
    /// business worker) and `requests` (messages from clients).
    pub gateway: GatewayCounters,
    /// Bumped once a second by the worker's event loop: the master sees a
    /// loop blocked by a handler call (`request_timeout`) when it stops.
    pub heartbeat: AtomicU64,
    /// Pool calls still running at `request_timeout` (their requests were
    /// answered `503`; the threads cannot be reclaimed).
    pub stuck_calls: AtomicU64,
}

/// The close codes counted one by one; others count as `other`.
pub const CLOSE_CODES: [u16; 9] = [1000, 1001, 1002, 1005, 1007, 1008, 1009, 1011, 1013];

/// What a gateway process counts beyond [`WorkerCounters`]' common fields.
#[repr(C)]
#[derive(Debug, Default)]
pub struct GatewayCounters {
    /// Messages received from clients.
    pub messages_in: AtomicU64,
    /// Messages queued for clients.
    pub messages_out: AtomicU64,
    /// Events lost with a business worker that ended before handling them.
    pub events_lost: AtomicU64,
    /// Clients closed because no business worker could take their events
    /// and the queue was full (1013).
    pub queue_full: AtomicU64,
    /// Clients closed because they did not read what they were sent.
    pub slow_closes: AtomicU64,
    /// Closed connections by close code ([`CLOSE_CODES`], then other ones).
    pub closes: [AtomicU64; CLOSE_CODES.len() + 1],
}

impl GatewayCounters {
    /// Counts a closed connection.
    pub fn count_close(&self, code: u16) {
        let index = CLOSE_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(CLOSE_CODES.len());
        self.closes[index].fetch_add(1, Ordering::Relaxed);
    }
}

/// Which timeout, as an index of [`WorkerCounters::timeouts`].
#[derive(Debug, Clone, Copy)]
pub enum Timeout {
    /// No (complete) request head in time.
    Header = 0,
    /// A request body paused too long.
    Body = 1,
}

impl WorkerCounters {
    /// Counts one response with this status code.
    pub fn count_response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one timeout.
    pub fn count_timeout(&self, which: Timeout) {
        self.timeouts[which as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// How long a worker waits after a failed accept before trying again.
pub const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Failed accepts (EMFILE and friends): each one counted, logged at most
/// once every ten seconds with how many there were since the last line.
#[derive(Default)]
pub struct AcceptFailures {
    last_logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    /// Counts one failed accept in `counters` and logs it if a line is due.
    pub fn record(&mut self, counters: &WorkerCounters, error: &std::io::Error) {
        counters.accept_errors.fetch_add(1, Ordering::Relaxed);
        self.unlogged += 1;
        let due = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(10));
        if due {
            tracing::warn!(error = %error, failures = self.unlogged, "accept failed; retrying every 50 ms");
            self.last_logged = Some(std::time::Instant::now());
            self.unlogged = 0;
        }
    }
}

/// A mapping of one worker's counters.
pub struct SharedCounters {
    map: MmapMut,
}

impl SharedCounters {
    /// Creates zeroed counters; the fd is for the worker.
    pub fn create() -> Result<(SharedCounters, OwnedFd)> {
        let fd =
            nix::sys::memfd::memfd_create(c"host-counters", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .context("memfd_create")?;
        let file = std::fs::File::from(fd);
        file.set_len(std::mem::size_of::<WorkerCounters>() as u64)
            .context("cannot size the counters memfd")?;
        let counters = Self::map(&file)?;
        Ok((counters, file.into()))
    }

    /// Maps counters created by the master.
    pub fn open(fd: OwnedFd) -> Result<SharedCounters> {
        Self::map(&std::fs::File::from(fd))
    }

    fn map(file: &std::fs::File) -> Result<SharedCounters> {
        // SAFETY: the memfd is only ever accessed through atomics.
        let map = unsafe {
            MmapOptions::new()
                .len(std::mem::size_of::<WorkerCounters>())
                .map_mut(file)
        }
        .context("cannot map the counters memfd")?;
        Ok(SharedCounters { map })
    }
}

impl std::ops::Deref for SharedCounters {
    type Target = WorkerCounters;

    fn deref(&self) -> &WorkerCounters {
        // SAFETY: the mapping is page-aligned, at least as large as
        // `WorkerCounters`, zero-initialised (a valid value of atomics), and
        // lives as long as `self`.
        unsafe { &*(self.map.as_ptr() as *const WorkerCounters) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_mappings_see_the_same_counters() {
        let (master, fd) = SharedCounters::create().unwrap();
        let worker = SharedCounters::open(fd).unwrap();
        worker.count_response(200);
        worker.count_response(204);
        worker.count_response(503);
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        assert_eq!(WorkerCounters::get(&master.requests), 3);
        assert_eq!(WorkerCounters::get(&master.by_class[1]), 2);
        assert_eq!(WorkerCounters::get(&master.by_class[4]), 1);
        assert_eq!(WorkerCounters::get(&master.in_flight), 1);
    }
}
