//! Master ⇄ worker messages.
//!
//! The master sends `Start` first, then commands; the worker answers `Ready`
//! or `Failed` once, after trying to load and start its handler. End of
//! stream on either side means the other process is gone.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{AccessLogFormat, AccessLogTarget, Dispatch, Protocol};

/// The environment variable carrying a worker's pool size: read before
/// the worker's runtime is built, so it cannot wait for `Start`.
pub const POOL_THREADS_ENV: &str = "HOST_POOL_THREADS";

/// Everything a worker needs to know to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Group name.
    pub group: String,
    /// Slot within the group.
    pub slot: usize,
    /// Store path of the handler to load.
    pub handler: PathBuf,
    /// The file the handler was snapshotted from, for messages.
    pub source: PathBuf,
    /// Short version hash, for logs.
    pub version: String,
    /// Handler settings from the config.
    pub settings: Vec<(String, String)>,
    /// Where handler calls run.
    pub dispatch: Dispatch,
    /// Pool size for `Dispatch::Pool`.
    pub pool_threads: usize,
    /// Idle keep-alive connections stay open this long after drain begins.
    pub lame_duck_ms: u64,
    /// Drain gives up on remaining connections after this long.
    pub stop_timeout_ms: u64,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Request head limit.
    pub max_header_bytes: usize,
    /// Connections waiting this long for a request head are closed.
    pub header_timeout_ms: u64,
    /// Longest pause while receiving a request body.
    pub body_timeout_ms: u64,
    /// How long a handler call on the pool may run before its request is
    /// answered `503`; off when `None`.
    pub request_timeout_ms: Option<u64>,
    /// Where answered requests are logged, if anywhere.
    pub access_log: Option<AccessLogTarget>,
    /// The access log's line format.
    pub access_log_format: AccessLogFormat,
    /// What this worker runs.
    pub role: WorkerRole,
}

/// What a worker process runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerRole {
    /// Serves HTTP with the handler.
    Http {
        /// The sockets of the gateways its handler pushes to, if any.
        push: Vec<PathBuf>,
    },
    /// Holds the clients of a gateway group (loads no handler).
    Gateway(GatewaySpec),
    /// Handles a gateway group's client events with the handler.
    Business {
        /// The sockets of the group's gateways, by gateway index.
        gateways: Vec<PathBuf>,
    },
}

/// A gateway process's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewaySpec {
    /// This gateway's index in its group (part of every client id).
    pub index: u32,
    /// Where business workers connect.
    pub socket: PathBuf,
    /// What clients speak.
    pub protocol: Protocol,
    /// Largest client message.
    pub max_message_size: usize,
    /// Longest text line.
    pub max_line: usize,
    /// Outbound bytes held for one client before it is closed.
    pub max_outbound_bytes: usize,
    /// Ping period for WebSocket clients.
    pub ping_interval_ms: u64,
    /// Unanswered pings before a client is closed.
    pub missed_pongs: u32,
    /// Silence after which a client is closed.
    pub idle_timeout_ms: u64,
    /// Events kept while no business worker is ready.
    pub max_queued_events: usize,
    /// Allowed `Origin` headers, if restricted.
    pub origins: Option<Vec<String>>,
}

/// Master → worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Load the handler and start serving.
    Start(Box<WorkerSpec>),
    /// Stop accepting, finish what is in flight, exit.
    Drain,
    /// Exit now.
    Stop,
    /// A reload happened; this worker is not reloadable.
    ReloadNotify,
    /// List the open connections.
    Connections,
    /// Reopen the log files after a rotation: the access log, and stderr
    /// when the host is daemonized.
    ReopenLog {
        /// The daemon's log file, for stderr.
        path: Option<PathBuf>,
    },
}

/// Worker → master.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// The handler is started and the worker accepts connections.
    Ready {
        /// The name the handler reports.
        handler_name: String,
        /// The version the handler reports.
        handler_version: String,
    },
    /// The answer to `Connections`.
    Connections {
        /// One entry per open connection.
        connections: Vec<ConnectionInfo>,
    },
    /// The worker could not start; it exits right after.
    Failed {
        /// What went wrong, for the person who asked for the start.
        error: String,
    },
}

/// One open client connection of a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// The client's address.
    pub peer: String,
    /// `active` (answering a request), `idle` (keep-alive) or `closing`.
    pub state: String,
    /// Requests answered on it.
    pub requests: u64,
    /// Seconds since it was accepted.
    pub age_secs: f64,
}
