//! `host connections`: every worker lists its open connections.
//!
//! The master asks each live worker over its channel and answers the CLI
//! once all have replied, or after `WAIT` with what it has (a worker busy
//! in a blocking handler call may not answer in time; it is shown as such).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;

use super::lifecycle::WorkerId;
use super::supervisor::Master;
use super::Event;
use crate::protocol::control::{ControlReply, WorkerConnections};
use crate::protocol::worker::{ConnectionInfo, ToWorker};

/// How long a query waits for slow workers.
const WAIT: Duration = Duration::from_secs(2);

/// A `host connections` request waiting for worker answers.
pub struct ConnectionsQuery {
    id: u64,
    reply: mpsc::UnboundedSender<ControlReply>,
    answers: BTreeMap<WorkerId, WorkerConnections>,
}

impl Master {
    /// Asks every worker for its connections.
    pub(super) fn query_connections(&mut self, reply: mpsc::UnboundedSender<ControlReply>) {
        let id = self.next_query;
        self.next_query += 1;
        let mut answers = BTreeMap::new();
        for (worker_id, worker) in &self.workers {
            answers.insert(
                *worker_id,
                WorkerConnections {
                    group: self.groups[worker.group].config.name.clone(),
                    slot: worker.slot,
                    pid: worker.pid,
                    state: worker.lifecycle.wire(),
                    connections: None,
                },
            );
            self.tell(*worker_id, ToWorker::Connections);
        }
        self.connection_queries
            .push(ConnectionsQuery { id, reply, answers });
        self.after(WAIT, Event::ConnectionsTimeout(id));
        self.answer_complete_queries();
    }

    /// A worker listed its connections.
    pub(super) fn worker_connections(
        &mut self,
        worker: WorkerId,
        connections: Vec<ConnectionInfo>,
    ) {
        for query in &mut self.connection_queries {
            if let Some(answer) = query.answers.get_mut(&worker) {
                answer
                    .connections
                    .get_or_insert_with(|| connections.clone());
            }
        }
        self.answer_complete_queries();
    }

    /// A worker exited: queries stop waiting for it.
    pub(super) fn connections_worker_gone(&mut self, worker: WorkerId) {
        for query in &mut self.connection_queries {
            query.answers.remove(&worker);
        }
        self.answer_complete_queries();
    }

    /// A query's wait is over: answer with what came in.
    pub(super) fn connections_timeout(&mut self, id: u64) {
        if let Some(at) = self.connection_queries.iter().position(|q| q.id == id) {
            let query = self.connection_queries.remove(at);
            let _ = query.reply.send(ControlReply::Connections {
                workers: query.answers.into_values().collect(),
            });
        }
    }

    fn answer_complete_queries(&mut self) {
        let (complete, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.connection_queries)
            .into_iter()
            .partition(|q| q.answers.values().all(|a| a.connections.is_some()));
        self.connection_queries = waiting;
        for query in complete {
            let _ = query.reply.send(ControlReply::Connections {
                workers: query.answers.into_values().collect(),
            });
        }
    }
}
