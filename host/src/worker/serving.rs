//! What every request of a worker reads: the handler and where its calls
//! run, the body limit, the counters shared with the master, the access
//! log, the coarse clock, and whether the worker is draining. The server (`server.rs`)
//! advances the clock and sets the flag; each connection (`connection.rs`)
//! holds this rather than the whole server, so a connection knows nothing
//! of accepting, draining or the other connections.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use handler_api::HandlerModuleRef;

use super::access_log::AccessLog;
use crate::config::Dispatch;
use crate::counters::SharedCounters;

/// See the module docs.
pub(super) struct Serving {
    /// The loaded handler module.
    pub(super) handler: HandlerModuleRef,
    /// Where handler calls run.
    pub(super) dispatch: Dispatch,
    /// Request body limit.
    pub(super) max_body_bytes: usize,
    /// How long a call on the pool may run before its request is answered
    /// `503` (inline calls are watched by the master).
    pub(super) request_timeout: Option<Duration>,
    /// This worker's counters, shared with the master.
    pub(super) counters: SharedCounters,
    /// Where answered requests are logged, if anywhere.
    pub(super) access_log: Option<AccessLog>,
    /// Seconds since the server started, advanced by `Server::expire_idle`.
    clock: AtomicU64,
    /// Set when the drain (or stop) begins: the accept loop stops and every
    /// response carries `Connection: close`.
    pub(super) draining: AtomicBool,
}

impl Serving {
    /// The state of a server for a started handler, its clock at zero.
    pub(super) fn new(
        handler: HandlerModuleRef,
        dispatch: Dispatch,
        max_body_bytes: usize,
        request_timeout: Option<Duration>,
        counters: SharedCounters,
        access_log: Option<AccessLog>,
    ) -> Serving {
        Serving {
            handler,
            dispatch,
            max_body_bytes,
            request_timeout,
            counters,
            access_log,
            clock: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// `clock`, for progress stamps.
    pub(super) fn now(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Advances `clock` by a second; returns the new time.
    pub(super) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }
}
