//! Prometheus metrics for the admin listener.
//!
//! Request counts live in each worker's shared-memory counters. At each
//! scrape (and when a worker exits) the master adds what a worker served
//! since it last looked to counters it owns, so totals never go backwards
//! when workers are replaced.

use std::collections::HashMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::gateway_metrics::{GatewayMetrics, GatewaySeen};
use super::lifecycle::WorkerId;
use crate::counters::WorkerCounters;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    group: String,
    class: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    group: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    group: String,
    kind: String,
}

/// `WorkerCounters::timeouts` names, by index.
const TIMEOUT_KINDS: [&str; 2] = ["header", "body"];

/// What was already added to the counters, per live worker.
#[derive(Default)]
struct Seen {
    classes: [u64; 5],
    timeouts: [u64; 2],
    accept_errors: u64,
    gateway: GatewaySeen,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// The master's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    in_flight: Family<GroupLabels, Gauge>,
    connections: Family<GroupLabels, Gauge>,
    timeouts: Family<TimeoutLabels, Counter>,
    accept_errors: Family<GroupLabels, Counter>,
    worker_starts: Family<GroupLabels, Counter>,
    worker_exits: Family<ExitLabels, Counter>,
    killed_connections: Family<GroupLabels, Counter>,
    killed_requests: Family<GroupLabels, Counter>,
    request_timeouts: Family<GroupLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    reload_seconds: Histogram,
    gateway: GatewayMetrics,
    /// Per live worker, the counts already added to `requests` and
    /// `timeouts`.
    seen: HashMap<WorkerId, Seen>,
}

/// Why a worker ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Retired by a reload or a stop.
    Retired,
    /// Died while serving.
    Crashed,
    /// Never became ready.
    StartFailed,
    /// Killed at its stop timeout.
    Killed,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("host");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Responses sent, by group, status class and handler version",
            requests.clone(),
        );
        let in_flight = Family::<GroupLabels, Gauge>::default();
        registry.register("in_flight", "Requests being answered", in_flight.clone());
        let connections = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        let timeouts = Family::<TimeoutLabels, Counter>::default();
        registry.register(
            "timeouts",
            "Connections closed at header_timeout and requests answered 408 at body_timeout, by kind",
            timeouts.clone(),
        );
        let accept_errors = Family::<GroupLabels, Counter>::default();
        registry.register(
            "accept_errors",
            "Failed accepts on a group's listener (e.g. out of file descriptors)",
            accept_errors.clone(),
        );
        let worker_starts = Family::<GroupLabels, Counter>::default();
        registry.register(
            "worker_starts",
            "Worker processes started",
            worker_starts.clone(),
        );
        let worker_exits = Family::<ExitLabels, Counter>::default();
        registry.register(
            "worker_exits",
            "Worker processes ended, by reason",
            worker_exits.clone(),
        );
        let killed_connections = Family::<GroupLabels, Counter>::default();
        registry.register(
            "killed_connections",
            "Client connections cut because their worker was killed at its stop timeout",
            killed_connections.clone(),
        );
        let killed_requests = Family::<GroupLabels, Counter>::default();
        registry.register(
            "killed_requests",
            "Requests in flight when their worker was killed at its stop timeout",
            killed_requests.clone(),
        );
        let request_timeouts = Family::<GroupLabels, Counter>::default();
        registry.register(
            "request_timeouts",
            "Handler calls that ran past request_timeout (their workers were replaced)",
            request_timeouts.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("reloads", "Reloads, by result", reloads.clone());
        let reload_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reload_duration_seconds",
            "From a reload's request to its last retired worker gone",
            reload_seconds.clone(),
        );
        let gateway = GatewayMetrics::register(&mut registry);
        Metrics {
            gateway,
            registry,
            requests,
            in_flight,
            connections,
            timeouts,
            accept_errors,
            worker_starts,
            worker_exits,
            killed_connections,
            killed_requests,
            request_timeouts,
            reloads,
            reload_seconds,
            seen: HashMap::new(),
        }
    }
}

impl Metrics {
    /// A worker process was started.
    pub fn worker_started(&mut self, group: &str) {
        self.worker_starts.get_or_create(&group_labels(group)).inc();
    }

    /// A worker process ended; its last counts are taken first.
    pub fn worker_ended(
        &mut self,
        id: WorkerId,
        group: &str,
        version: &str,
        counters: &WorkerCounters,
        reason: ExitReason,
    ) {
        self.take_counts(id, group, version, counters);
        self.seen.remove(&id);
        let reason = match reason {
            ExitReason::Retired => "retired",
            ExitReason::Crashed => "crashed",
            ExitReason::StartFailed => "start_failed",
            ExitReason::Killed => "killed",
        };
        self.worker_exits
            .get_or_create(&ExitLabels {
                group: group.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A worker was killed at its stop timeout with these still open.
    pub fn worker_killed(&mut self, group: &str, connections: u64, in_flight: u64) {
        let labels = group_labels(group);
        self.killed_connections
            .get_or_create(&labels)
            .inc_by(connections);
        self.killed_requests
            .get_or_create(&labels)
            .inc_by(in_flight);
    }

    /// Handler calls of a group ran past `request_timeout`.
    pub fn request_timeouts(&mut self, group: &str, calls: u64) {
        self.request_timeouts
            .get_or_create(&group_labels(group))
            .inc_by(calls);
    }

    /// A reload ended.
    pub fn reload_done(&mut self, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
        self.reload_seconds.observe(seconds);
    }

    /// Adds what a worker served since the last look.
    fn take_counts(&mut self, id: WorkerId, group: &str, version: &str, counters: &WorkerCounters) {
        let seen = self.seen.entry(id).or_default();
        self.gateway
            .take(group, &counters.gateway, &mut seen.gateway);
        if let Some(delta) = increase(&counters.accept_errors, &mut seen.accept_errors) {
            self.accept_errors
                .get_or_create(&group_labels(group))
                .inc_by(delta);
        }
        for (kind, counter) in counters.timeouts.iter().enumerate() {
            if let Some(delta) = increase(counter, &mut seen.timeouts[kind]) {
                self.timeouts
                    .get_or_create(&TimeoutLabels {
                        group: group.to_owned(),
                        kind: TIMEOUT_KINDS[kind].to_owned(),
                    })
                    .inc_by(delta);
            }
        }
        for (class, counter) in counters.by_class.iter().enumerate() {
            if let Some(delta) = increase(counter, &mut seen.classes[class]) {
                self.requests
                    .get_or_create(&RequestLabels {
                        group: group.to_owned(),
                        class: CLASSES[class].to_owned(),
                        version: version.to_owned(),
                    })
                    .inc_by(delta);
            }
        }
    }

    /// Renders every metric, given the live workers as
    /// `(id, group, version, counters)` and every group name.
    pub fn render<'a>(
        &mut self,
        groups: impl Iterator<Item = &'a str>,
        workers: impl Iterator<Item = (WorkerId, &'a str, &'a str, &'a WorkerCounters)>,
    ) -> String {
        let mut in_flight: HashMap<&str, i64> = groups.map(|g| (g, 0)).collect();
        let mut connections = in_flight.clone();
        for (id, group, version, counters) in workers {
            self.take_counts(id, group, version, counters);
            *in_flight.entry(group).or_default() += WorkerCounters::get(&counters.in_flight) as i64;
            *connections.entry(group).or_default() +=
                WorkerCounters::get(&counters.connections) as i64;
        }
        for (group, value) in in_flight {
            self.in_flight
                .get_or_create(&group_labels(group))
                .set(value);
        }
        for (group, value) in connections {
            self.connections
                .get_or_create(&group_labels(group))
                .set(value);
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        text
    }
}

/// How much a worker's counter grew since `seen`, which it then becomes.
pub(super) fn increase(counter: &std::sync::atomic::AtomicU64, seen: &mut u64) -> Option<u64> {
    let now = WorkerCounters::get(counter);
    let delta = now.saturating_sub(*seen);
    *seen = now.max(*seen);
    (delta > 0).then_some(delta)
}

fn group_labels(group: &str) -> GroupLabels {
    GroupLabels {
        group: group.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_the_worker_that_served_them() {
        let mut metrics = Metrics::default();
        let counters = WorkerCounters::default();
        for _ in 0..3 {
            counters.count_response(200);
        }
        counters.count_response(500);
        let id = WorkerId(7);
        let first = metrics.render(
            ["web"].into_iter(),
            [(id, "web", "abc", &counters)].into_iter(),
        );
        assert!(
            first.contains("host_requests_total{group=\"web\",class=\"2xx\",version=\"abc\"} 3"),
            "{first}"
        );
        counters.count_response(200);
        metrics.worker_ended(id, "web", "abc", &counters, ExitReason::Retired);
        let after = metrics.render(["web"].into_iter(), std::iter::empty());
        assert!(
            after.contains("host_requests_total{group=\"web\",class=\"2xx\",version=\"abc\"} 4"),
            "{after}"
        );
        assert!(
            after.contains("host_requests_total{group=\"web\",class=\"5xx\",version=\"abc\"} 1"),
            "{after}"
        );
        assert!(
            after.contains("host_worker_exits_total{group=\"web\",reason=\"retired\"} 1"),
            "{after}"
        );
    }
}
