//! `host connections`: every worker lists its open connections.
//!
//! The master asks each live worker over its channel and answers the CLI
//! once all have replied, or after [`WAIT`] with what it has (a worker busy
//! in a blocking handler call may not answer in time; it is shown as such).
//! [`ConnectionQueries`] keeps the questions waiting for answers; the
//! master asks the workers and sets the timer.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;

use super::lifecycle::WorkerId;
use crate::protocol::control::{ControlReply, WorkerConnections};
use crate::protocol::worker::ConnectionInfo;

/// How long a query waits for slow workers.
pub const WAIT: Duration = Duration::from_secs(2);

/// The `host connections` requests waiting for worker answers.
#[derive(Default)]
pub struct ConnectionQueries {
    waiting: Vec<ConnectionsQuery>,
    next_id: u64,
}

/// A `host connections` request waiting for worker answers.
struct ConnectionsQuery {
    id: u64,
    reply: mpsc::UnboundedSender<ControlReply>,
    answers: BTreeMap<WorkerId, WorkerConnections>,
}

impl ConnectionQueries {
    /// A query to `workers` (their connections not yet known); returns its
    /// id, for [`ConnectionQueries::timed_out`].
    pub fn start(
        &mut self,
        reply: mpsc::UnboundedSender<ControlReply>,
        workers: impl IntoIterator<Item = (WorkerId, WorkerConnections)>,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push(ConnectionsQuery {
            id,
            reply,
            answers: workers.into_iter().collect(),
        });
        self.answer_complete();
        id
    }

    /// A worker listed its connections.
    pub fn answered(&mut self, worker: WorkerId, connections: Vec<ConnectionInfo>) {
        for query in &mut self.waiting {
            if let Some(answer) = query.answers.get_mut(&worker) {
                answer
                    .connections
                    .get_or_insert_with(|| connections.clone());
            }
        }
        self.answer_complete();
    }

    /// A worker exited: queries stop waiting for it.
    pub fn worker_gone(&mut self, worker: WorkerId) {
        for query in &mut self.waiting {
            query.answers.remove(&worker);
        }
        self.answer_complete();
    }

    /// A query's wait is over: answer with what came in.
    pub fn timed_out(&mut self, id: u64) {
        if let Some(at) = self.waiting.iter().position(|q| q.id == id) {
            let query = self.waiting.remove(at);
            let _ = query.reply.send(ControlReply::Connections {
                workers: query.answers.into_values().collect(),
            });
        }
    }

    fn answer_complete(&mut self) {
        let (complete, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|q| q.answers.values().all(|a| a.connections.is_some()));
        self.waiting = waiting;
        for query in complete {
            let _ = query.reply.send(ControlReply::Connections {
                workers: query.answers.into_values().collect(),
            });
        }
    }
}
