//! CLI ⇄ master messages on the control socket.
//!
//! The CLI sends one request; the master answers with one or more replies
//! and closes the connection. A reload streams `Progress` lines, then one
//! `Reloaded`.

use serde::{Deserialize, Serialize};

/// CLI → master.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Report workers and versions.
    Status,
    /// Stop the master and its workers.
    Stop {
        /// Skip the graceful drain.
        now: bool,
    },
    /// List every worker's open connections.
    Connections,
    /// Replace the workers of reloadable groups with fresh ones.
    Reload {
        /// Only this group; all groups when `None`.
        group: Option<String>,
    },
}

/// Master → CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlReply {
    /// Answer to `Status`.
    Status(StatusReport),
    /// Answer to `Connections`.
    Connections {
        /// One entry per worker.
        workers: Vec<WorkerConnections>,
    },
    /// A line of reload progress.
    Progress(ReloadStep),
    /// A reload still waits on a replacement's ready report (sent about
    /// once a second while it does).
    Waiting(WaitingWorker),
    /// The outcome of a reload.
    Reloaded(ReloadOutcome),
    /// A request was taken; more may follow.
    Accepted {
        /// What the master is doing.
        message: String,
    },
    /// A request was refused.
    Error {
        /// Why.
        message: String,
    },
}

/// The open connections of one worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConnections {
    /// Group name.
    pub group: String,
    /// Slot within the group.
    pub slot: usize,
    /// Process id.
    pub pid: u32,
    /// Lifecycle state.
    pub state: WorkerState,
    /// Its connections; `None` if it did not answer in time.
    pub connections: Option<Vec<crate::protocol::worker::ConnectionInfo>>,
}

/// What `host status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Master pid.
    pub pid: u32,
    /// Seconds since the master started.
    pub uptime_secs: f64,
    /// Workers restarted after an unexpected exit.
    pub restarts: u64,
    /// Reloads that ended with every targeted worker on the new version.
    pub reloads_ok: u64,
    /// Reloads that were refused or rolled back.
    pub reloads_failed: u64,
    /// Whether a reload is running.
    pub reloading: bool,
    /// Master resident memory.
    pub rss_bytes: u64,
    /// The admin listener's address, when there is one.
    pub admin: Option<String>,
    /// Groups.
    pub groups: Vec<GroupStatus>,
    /// Workers, starting and draining ones included.
    pub workers: Vec<WorkerStatus>,
}

/// One group in `StatusReport`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Group name.
    pub name: String,
    /// The bound address (the real port when the config says 0).
    pub listen: String,
    /// Configured worker count.
    pub count: usize,
    /// Whether reload replaces its workers.
    pub reloadable: bool,
    /// Short hash of the version its workers should run.
    pub version: String,
    /// Full hashes of every version its slots run or are about to run
    /// (a slot starting or in crash backoff has no worker to show it).
    #[serde(default)]
    pub slot_versions: Vec<String>,
    /// The handler file the group loads from.
    pub handler: String,
    /// Workers of this group that are ready.
    pub ready: usize,
    /// Short hash of the version the group is pinned to, if it is.
    #[serde(default)]
    pub pinned: Option<String>,
    /// Short hash of the handler file on disk now (`None` when it cannot
    /// be read); differs from `version` when a build is not reloaded yet.
    #[serde(default)]
    pub on_disk: Option<String>,
    /// The last reload of this group that failed or was refused.
    #[serde(default)]
    pub last_failed_reload: Option<FailedReload>,
    /// Handler calls that ran past `request_timeout` (each one's worker
    /// was replaced).
    #[serde(default)]
    pub request_timeouts: u64,
}

/// A reload that failed, as `host status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedReload {
    /// When it ended, in seconds since the Unix epoch.
    pub at_unix_secs: u64,
    /// Why.
    pub error: String,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Loading its handler.
    Starting,
    /// Accepting and serving.
    Ready,
    /// Not accepting; finishing its connections.
    Draining,
}

/// One worker in `StatusReport`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Group name.
    pub group: String,
    /// Slot within the group.
    pub slot: usize,
    /// Process id.
    pub pid: u32,
    /// Lifecycle state.
    pub state: WorkerState,
    /// Short hash of the loaded handler.
    pub version: String,
    /// Version string the handler reports, once ready.
    pub handler_version: Option<String>,
    /// Seconds since the worker was started.
    pub uptime_secs: f64,
    /// Requests answered.
    pub requests: u64,
    /// Requests being answered now.
    pub in_flight: u64,
    /// Open connections.
    pub connections: u64,
    /// Resident memory.
    pub rss_bytes: u64,
}

/// One replaced worker during a reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadStep {
    /// Group name.
    pub group: String,
    /// Slot within the group.
    pub slot: usize,
    /// The retired worker, if the slot had one.
    pub old_pid: Option<u32>,
    /// Its version.
    pub old_version: Option<String>,
    /// The replacement.
    pub new_pid: u32,
    /// Its version.
    pub new_version: String,
    /// From the replacement's spawn to its ready report.
    pub start_ms: u64,
    /// Whether this step puts back the previous version after a failure.
    pub rollback: bool,
}

/// A replacement a reload waits on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WaitingWorker {
    /// Group name.
    pub group: String,
    /// Slot within the group.
    pub slot: usize,
    /// Process id.
    pub pid: u32,
    /// Short hash of the version it loads.
    pub version: String,
    /// Since it was spawned.
    pub waited_ms: u64,
    /// How long it may take before it is refused.
    pub start_timeout_ms: u64,
}

/// A worker killed because it did not finish within its stop timeout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KilledWorker {
    /// Group name.
    pub group: String,
    /// Slot within the group.
    pub slot: usize,
    /// Process id.
    pub pid: u32,
    /// Requests it was still answering (from its shared counters).
    pub in_flight: u64,
    /// Client connections it still held, cut by the kill.
    pub connections: u64,
}

/// The version change of one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupChange {
    /// Group name.
    pub group: String,
    /// Short hash before.
    pub from: String,
    /// Short hash after (the same as `from` when the reload failed).
    pub to: String,
    /// Short hash the reload was to put in place (refused when the reload
    /// failed).
    #[serde(default)]
    pub wanted: String,
}

/// The result of a reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// Whether every targeted worker now runs the new version.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// Version per reloaded group.
    pub groups: Vec<GroupChange>,
    /// What the reload changed of the config, one line per group
    /// (`web: count 2 -> 3`, `new group ws on 127.0.0.1:9000`); empty
    /// when the file was as the host ran it.
    #[serde(default)]
    pub config_changes: Vec<String>,
    /// Groups that are not reloadable and were only notified.
    pub notified: Vec<String>,
    /// From the request to every replacement ready.
    pub ready_ms: u64,
    /// From the request to every retired worker gone.
    pub done_ms: u64,
    /// Retired workers that had to be killed.
    pub killed: Vec<KilledWorker>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reply must survive the JSON-line framing (an internally tagged
    /// enum cannot carry a bare sequence, and would fail only at run time).
    #[test]
    fn every_reply_round_trips_through_json() {
        let status = StatusReport {
            pid: 1,
            uptime_secs: 0.0,
            restarts: 0,
            reloads_ok: 0,
            reloads_failed: 0,
            reloading: false,
            rss_bytes: 0,
            admin: None,
            groups: Vec::new(),
            workers: Vec::new(),
        };
        let replies = vec![
            ControlReply::Status(status),
            ControlReply::Connections {
                workers: Vec::new(),
            },
            ControlReply::Progress(ReloadStep {
                group: "web".into(),
                slot: 0,
                old_pid: None,
                old_version: None,
                new_pid: 2,
                new_version: "abc".into(),
                start_ms: 1,
                rollback: false,
            }),
            ControlReply::Reloaded(ReloadOutcome {
                ok: true,
                error: None,
                groups: Vec::new(),
                config_changes: Vec::new(),
                notified: Vec::new(),
                ready_ms: 0,
                done_ms: 0,
                killed: Vec::new(),
            }),
            ControlReply::Waiting(WaitingWorker {
                group: "web".into(),
                slot: 0,
                pid: 2,
                version: "abc".into(),
                waited_ms: 1000,
                start_timeout_ms: 10000,
            }),
            ControlReply::Accepted {
                message: "m".into(),
            },
            ControlReply::Error {
                message: "m".into(),
            },
        ];
        for reply in replies {
            let line = serde_json::to_string(&reply).expect("serializes");
            let _: ControlReply = serde_json::from_str(&line).expect("deserializes");
        }
        for request in [
            ControlRequest::Status,
            ControlRequest::Connections,
            ControlRequest::Stop { now: true },
            ControlRequest::Reload { group: None },
        ] {
            let line = serde_json::to_string(&request).expect("serializes");
            let _: ControlRequest = serde_json::from_str(&line).expect("deserializes");
        }
    }
}
