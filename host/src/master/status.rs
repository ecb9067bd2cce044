//! What the master shows of itself: `host status`, `/metrics` and
//! `/healthz`, read from the worker table. Nothing here changes it.

use super::admin::{AdminAnswer, AdminQuery};
use super::group::Group;
use super::supervisor::Master;
use crate::counters::WorkerCounters;
use crate::protocol::control::{GroupStatus, StatusReport, WorkerStatus};
use crate::versions::pins;
use crate::versions::store::short;

impl Master {
    /// What `host status` shows.
    pub(super) fn status(&self) -> StatusReport {
        let pins = pins::load_pins(&self.run_dir).unwrap_or_default();
        let groups = self
            .groups
            .iter()
            .filter(|g| !g.is_removed())
            .map(|g| GroupStatus {
                name: g.config.name.clone(),
                listen: g.addr.to_string(),
                count: g.slots.len(),
                reloadable: g.config.reloadable,
                version: g.version.short().to_owned(),
                slot_versions: g.slots.iter().map(|s| s.version().hash.clone()).collect(),
                handler: g.config.handler.display().to_string(),
                ready: self.ready_workers(g),
                pinned: pins.get(&g.config.name).map(|hash| short(hash).to_owned()),
                on_disk: self
                    .handler_files
                    .hash(&g.config.handler)
                    .map(|hash| short(&hash).to_owned()),
                last_failed_reload: g.last_failed_reload.clone(),
                request_timeouts: g.request_timeouts,
            })
            .collect();
        let workers = self
            .workers
            .values()
            .map(|w| WorkerStatus {
                group: self.groups[w.group].config.name.clone(),
                slot: w.slot,
                pid: w.pid,
                state: w.lifecycle.wire(),
                version: w.version.short().to_owned(),
                handler_version: w.handler_version.clone(),
                uptime_secs: w.spawned_at.elapsed().as_secs_f64(),
                requests: WorkerCounters::get(&w.counters.requests),
                in_flight: WorkerCounters::get(&w.counters.in_flight),
                connections: WorkerCounters::get(&w.counters.connections),
                rss_bytes: rss_bytes(w.pid),
            })
            .collect();
        StatusReport {
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            restarts: self.restarts,
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            admin: self.admin_addr.map(|a| a.to_string()),
            reloading: self.reloads.is_running(),
            rss_bytes: rss_bytes(std::process::id()),
            groups,
            workers,
        }
    }

    /// Answers the admin listener.
    pub(super) fn on_admin(&mut self, query: AdminQuery) -> AdminAnswer {
        match query {
            AdminQuery::Metrics => {
                let groups = self.groups.iter().map(|g| g.config.name.as_str());
                let workers = self.workers.iter().map(|(id, w)| {
                    (
                        *id,
                        self.groups[w.group].config.name.as_str(),
                        w.version.short(),
                        &*w.counters,
                    )
                });
                let text = self.metrics.render(groups, workers);
                (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            }
            AdminQuery::Health => {
                let mut healthy = !self.is_stopping();
                let mut text = String::new();
                for group in self.groups.iter().filter(|g| !g.is_removed()) {
                    let ready = self.ready_workers(group);
                    healthy &= ready > 0;
                    text.push_str(&format!(
                        "{} {}/{} ready\n",
                        group.config.name,
                        ready,
                        group.slots.len()
                    ));
                }
                let status = if healthy { 200 } else { 503 };
                (
                    status,
                    "text/plain; charset=utf-8",
                    format!("{}\n{text}", if healthy { "ok" } else { "not ready" }),
                )
            }
        }
    }

    /// Slots of `group` whose worker is ready.
    fn ready_workers(&self, group: &Group) -> usize {
        group
            .slots
            .iter()
            .filter_map(|s| s.serving())
            .filter(|id| self.workers.get(id).is_some_and(|w| w.lifecycle.is_ready()))
            .count()
    }
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages
        * nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64
}
