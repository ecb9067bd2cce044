//! How the CLI shows the master's answers to people: status tables,
//! connection lists, reload progress and outcomes. `--json` prints the
//! same data as JSON instead, for scripts and tests.

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::protocol::control::{
    GroupChange, GroupStatus, ReloadOutcome, ReloadStep, StatusReport, WaitingWorker,
    WorkerConnections,
};

/// `host status`.
pub fn print_status(report: &StatusReport) {
    println!(
        "master pid {}  up {}  worker restarts {}  rss {}{}",
        report.pid,
        duration(report.uptime_secs),
        report.restarts,
        mib(report.rss_bytes),
        if report.reloading {
            "  (reload running)"
        } else {
            ""
        }
    );
    for group in &report.groups {
        println!(
            "group {}  {}  {}/{} ready  version {}  {}{}",
            group.name,
            group.listen,
            group.ready,
            group.count,
            group.version,
            group.handler,
            if group.reloadable {
                ""
            } else {
                "  (not reloadable)"
            }
        );
        for line in group_notes(group) {
            println!("  {line}");
        }
    }
    println!(
        "{:<12} {:>4} {:>8} {:<9} {:<12} {:<10} {:>8} {:>10} {:>8} {:>6} {:>9}",
        "GROUP",
        "SLOT",
        "PID",
        "STATE",
        "VERSION",
        "HANDLER",
        "UPTIME",
        "REQUESTS",
        "INFLIGHT",
        "CONNS",
        "RSS"
    );
    for w in &report.workers {
        println!(
            "{:<12} {:>4} {:>8} {:<9} {:<12} {:<10} {:>8} {:>10} {:>8} {:>6} {:>9}",
            w.group,
            w.slot,
            w.pid,
            format!("{:?}", w.state).to_lowercase(),
            w.version,
            w.handler_version.as_deref().unwrap_or("-"),
            duration(w.uptime_secs),
            w.requests,
            w.in_flight,
            w.connections,
            mib(w.rss_bytes)
        );
    }
}

/// What `host status` says under a group line: its pin, a handler file
/// that differs from what runs, its last failed reload.
fn group_notes(group: &GroupStatus) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(pinned) = &group.pinned {
        notes.push(format!(
            "pinned to {pinned} (`host unpin` follows the handler file again)"
        ));
    }
    match &group.on_disk {
        Some(on_disk) if *on_disk != group.version => notes.push(format!(
            "handler file on disk is {on_disk}, not the {} running{}",
            group.version,
            if group.pinned.is_some() {
                ""
            } else {
                " (`host reload` loads it)"
            }
        )),
        Some(_) => {}
        None => notes.push(format!("handler file {} cannot be read", group.handler)),
    }
    if group.request_timeouts > 0 {
        notes.push(format!(
            "{} request(s) ran past request_timeout (their workers were replaced)",
            group.request_timeouts
        ));
    }
    if let Some(failed) = &group.last_failed_reload {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        notes.push(format!(
            "last failed reload {} ago: {}",
            duration(now.saturating_sub(failed.at_unix_secs) as f64),
            failed.error
        ));
    }
    notes
}

/// `host connections`.
pub fn print_connections(workers: &[WorkerConnections]) {
    println!(
        "{:<12} {:>4} {:>8} {:<22} {:<8} {:>9} {:>8}",
        "GROUP", "SLOT", "PID", "PEER", "STATE", "REQUESTS", "AGE"
    );
    for worker in workers {
        let Some(list) = &worker.connections else {
            println!(
                "{:<12} {:>4} {:>8} (busy: did not answer in time)",
                worker.group, worker.slot, worker.pid
            );
            continue;
        };
        for c in list {
            println!(
                "{:<12} {:>4} {:>8} {:<22} {:<8} {:>9} {:>8}",
                worker.group,
                worker.slot,
                worker.pid,
                c.peer,
                c.state,
                c.requests,
                duration(c.age_secs)
            );
        }
    }
    let total: usize = workers
        .iter()
        .filter_map(|w| w.connections.as_ref())
        .map(Vec::len)
        .sum();
    println!("{total} connection(s) on {} worker(s)", workers.len());
}

/// One line of reload progress.
pub fn describe_step(step: &ReloadStep) -> String {
    let old = match (step.old_pid, &step.old_version) {
        (Some(pid), Some(version)) => format!("pid {pid} ({version})"),
        _ => "(empty slot)".to_owned(),
    };
    format!(
        "{}{}/{}: {old} -> pid {} ({}) ready in {} ms",
        if step.rollback { "rollback " } else { "" },
        step.group,
        step.slot,
        step.new_pid,
        step.new_version,
        step.start_ms
    )
}

/// One line about a replacement a reload still waits on:
/// `web/0: pid 4188 loading 7c55a1e2, 3 s of start_timeout 10s`.
pub fn describe_wait(waiting: &WaitingWorker) -> String {
    format!(
        "{}/{}: pid {} loading {}, {} s of start_timeout {}",
        waiting.group,
        waiting.slot,
        waiting.pid,
        waiting.version,
        waiting.waited_ms / 1000,
        humantime_serde::re::humantime::format_duration(Duration::from_millis(
            waiting.start_timeout_ms
        ))
    )
}

/// How a reload ended; the exit code says whether it worked.
pub fn print_outcome(outcome: &ReloadOutcome) -> ExitCode {
    for killed in &outcome.killed {
        println!(
            "killed {}/{} pid {} at its stop timeout with {} connection(s) open and {} request(s) in flight",
            killed.group, killed.slot, killed.pid, killed.connections, killed.in_flight
        );
    }
    for name in &outcome.notified {
        println!("group {name} is not reloadable: its workers were notified");
    }
    let joined = |line: &dyn Fn(&GroupChange) -> String| {
        outcome
            .groups
            .iter()
            .map(line)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &outcome.error {
        None => {
            for change in &outcome.config_changes {
                println!("config: {change}");
            }
            if outcome.config_changes.is_empty() {
                println!("config: nothing changed");
            }
            println!(
                "reload ok: {}; new workers ready in {} ms, old workers gone in {} ms",
                joined(&|g| format!("{} {} -> {}", g.group, g.from, g.to)),
                outcome.ready_ms,
                outcome.done_ms
            );
            ExitCode::SUCCESS
        }
        Some(error) => {
            eprintln!("host: reload failed: {error}");
            let refused: Vec<String> = outcome
                .groups
                .iter()
                .filter(|g| g.wanted != g.to && !g.wanted.is_empty())
                .map(|g| format!("{} {}", g.group, g.wanted))
                .collect();
            if !refused.is_empty() {
                eprintln!("host: refused {}", refused.join(", "));
            }
            if !outcome.groups.is_empty() {
                eprintln!(
                    "host: still serving {}",
                    joined(&|g| format!("{} {}", g.group, g.to))
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// A duration in the largest unit that keeps it short.
pub fn duration(secs: f64) -> String {
    let secs = secs as u64;
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

/// What `host reload --json` prints: the progress, then the outcome.
#[derive(Serialize)]
pub struct ReloadReport {
    /// Each slot replaced (or put back), in order.
    pub steps: Vec<ReloadStep>,
    /// Each report of a replacement still starting, in order.
    pub waits: Vec<WaitingWorker>,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: ReloadOutcome,
}
