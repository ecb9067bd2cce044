//! The metrics of gateway processes: messages in and out, closes by code,
//! slow clients, full queues and events lost with a killed business
//! worker. A gateway group's clients are its `host_connections` and its
//! waiting events its `host_in_flight`, like any group's.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::metrics::increase;
use crate::counters::{GatewayCounters, CLOSE_CODES};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    group: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    group: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

/// What was already added, per live gateway process.
#[derive(Default)]
pub struct GatewaySeen {
    messages: [u64; 2],
    lost: u64,
    queue_full: u64,
    slow: u64,
    closes: [u64; CLOSE_CODES.len() + 1],
}

/// The gateway metric families.
pub struct GatewayMetrics {
    messages: Family<DirectionLabels, Counter>,
    lost: Family<GroupLabels, Counter>,
    queue_full: Family<GroupLabels, Counter>,
    slow: Family<GroupLabels, Counter>,
    closes: Family<CodeLabels, Counter>,
}

impl GatewayMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> GatewayMetrics {
        let metrics = GatewayMetrics {
            messages: Family::default(),
            lost: Family::default(),
            queue_full: Family::default(),
            slow: Family::default(),
            closes: Family::default(),
        };
        registry.register(
            "gateway_messages",
            "Messages from (in) and to (out) gateway clients",
            metrics.messages.clone(),
        );
        registry.register(
            "gateway_events_lost",
            "Client events lost because their business worker ended (killed) before handling them",
            metrics.lost.clone(),
        );
        registry.register(
            "gateway_queue_full_closes",
            "Clients closed with 1013 because no business worker could take their events and the queue was full",
            metrics.queue_full.clone(),
        );
        registry.register(
            "gateway_slow_closes",
            "Clients closed because they did not read what they were sent (max_outbound_bytes)",
            metrics.slow.clone(),
        );
        registry.register(
            "gateway_closes",
            "Client connections closed, by close code (none: ended without one)",
            metrics.closes.clone(),
        );
        metrics
    }

    /// Adds what a gateway process counted since the last look.
    pub fn take(&self, group: &str, counters: &GatewayCounters, seen: &mut GatewaySeen) {
        let labels = GroupLabels {
            group: group.to_owned(),
        };
        for (i, (direction, counter)) in [
            ("in", &counters.messages_in),
            ("out", &counters.messages_out),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(delta) = increase(counter, &mut seen.messages[i]) {
                self.messages
                    .get_or_create(&DirectionLabels {
                        group: group.to_owned(),
                        direction,
                    })
                    .inc_by(delta);
            }
        }
        for (family, counter, seen) in [
            (&self.lost, &counters.events_lost, &mut seen.lost),
            (&self.queue_full, &counters.queue_full, &mut seen.queue_full),
            (&self.slow, &counters.slow_closes, &mut seen.slow),
        ] {
            if let Some(delta) = increase(counter, seen) {
                family.get_or_create(&labels).inc_by(delta);
            }
        }
        for (i, counter) in counters.closes.iter().enumerate() {
            if let Some(delta) = increase(counter, &mut seen.closes[i]) {
                let code = CLOSE_CODES
                    .get(i)
                    .map_or_else(|| "other".to_owned(), |c| c.to_string());
                self.closes
                    .get_or_create(&CodeLabels {
                        group: group.to_owned(),
                        code,
                    })
                    .inc_by(delta);
            }
        }
    }
}
