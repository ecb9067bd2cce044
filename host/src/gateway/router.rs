//! Which business worker gets each client event: the gateway's routing as
//! a state machine, without sockets, so every rule is unit-tested here.
//!
//! - A client is bound to one ready link (sticky), so one worker sees its
//!   events, in order: the one with the fewest clients, the newest of
//!   equals (on a reload, the replacement).
//! - A link that is retiring (or gone) gets no new events. A client bound
//!   to it keeps its new events here until the link acknowledged every
//!   earlier one; then it moves to a ready link and its queue goes out in
//!   order. Never two workers on one client's events at once.
//! - No ready link: events wait, up to `max_queued` in all; an event that
//!   does not fit is refused ([`Full`]) and the caller closes the client
//!   (1013). A client's close event always fits, so `on_close` is never
//!   skipped for a client whose connect was handled.
//! - A link that ends with events unacknowledged (its worker was killed)
//!   loses them: counted, and its clients are rebound, not disconnected.

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;

/// A link to a business worker, numbered by the gateway.
pub type LinkId = u64;

/// A client, by its gateway-local counter.
pub type ClientKey = u64;

/// An event was refused: the queue for clients without a worker is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

struct Link {
    ready: bool,
    /// The clients of the events sent and not yet acknowledged, in order.
    unacked: VecDeque<ClientKey>,
    /// Clients bound to this link.
    clients: usize,
}

struct Route<E> {
    bound: Option<LinkId>,
    unacked: usize,
    queue: VecDeque<E>,
    closed: bool,
}

impl<E> Default for Route<E> {
    fn default() -> Self {
        Route {
            bound: None,
            unacked: 0,
            queue: VecDeque::new(),
            closed: false,
        }
    }
}

/// The routing of one gateway's client events to its business links.
pub struct Router<E> {
    links: BTreeMap<LinkId, Link>,
    routes: FxHashMap<ClientKey, Route<E>>,
    /// Clients whose queue waits for any ready link.
    waiting: VecDeque<ClientKey>,
    queued: usize,
    max_queued: usize,
    lost: u64,
}

impl<E> Router<E> {
    /// A router that keeps at most `max_queued` events without a worker.
    pub fn new(max_queued: usize) -> Self {
        Router {
            links: BTreeMap::new(),
            routes: FxHashMap::default(),
            waiting: VecDeque::new(),
            queued: 0,
            max_queued,
            lost: 0,
        }
    }

    /// Events waiting in this gateway.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Events lost because their worker ended before acknowledging them.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// A link connected; it takes nothing until [`Router::ready`].
    pub fn link_up(&mut self, link: LinkId) {
        self.links.insert(
            link,
            Link {
                ready: false,
                unacked: VecDeque::new(),
                clients: 0,
            },
        );
    }

    /// A link's worker is ready: clients waiting for one go to it (and
    /// any other ready link).
    pub fn ready(&mut self, link: LinkId, out: &mut Vec<(LinkId, E)>) {
        if let Some(l) = self.links.get_mut(&link) {
            l.ready = true;
        }
        for client in std::mem::take(&mut self.waiting) {
            self.flush(client, out);
        }
    }

    /// A link's worker is retiring: no new events for it.
    pub fn retiring(&mut self, link: LinkId) {
        if let Some(l) = self.links.get_mut(&link) {
            l.ready = false;
        }
    }

    /// Routes one event of `client`; `close` marks its last event, which
    /// is never refused.
    pub fn event(
        &mut self,
        client: ClientKey,
        event: E,
        close: bool,
        out: &mut Vec<(LinkId, E)>,
    ) -> Result<(), Full> {
        let route = self.routes.entry(client).or_default();
        route.closed |= close;
        let bound_ready = route
            .bound
            .is_some_and(|l| self.links.get(&l).is_some_and(|l| l.ready));
        if route.queue.is_empty() && bound_ready {
            let link = route.bound.unwrap_or_default();
            self.send(link, client, event, out);
            return Ok(());
        }
        if !close && self.queued >= self.max_queued {
            return Err(Full);
        }
        let must_wait = !route.queue.is_empty() || route.unacked > 0;
        route.queue.push_back(event);
        self.queued += 1;
        if !must_wait {
            self.unbind(client);
            self.flush(client, out);
        }
        Ok(())
    }

    /// Drops the events a client has waiting (it is being closed); they are
    /// not delivered. Returns how many.
    pub fn drop_queued(&mut self, client: ClientKey) -> usize {
        let Some(route) = self.routes.get_mut(&client) else {
            return 0;
        };
        let dropped = route.queue.len();
        route.queue.clear();
        self.queued -= dropped;
        dropped
    }

    /// The oldest unacknowledged event on `link` was handled; returns its
    /// client.
    pub fn ack(&mut self, link: LinkId, out: &mut Vec<(LinkId, E)>) -> Option<ClientKey> {
        let l = self.links.get_mut(&link)?;
        let ready = l.ready;
        let client = l.unacked.pop_front()?;
        self.acked(client, ready, out);
        Some(client)
    }

    /// A link ended: what it had not acknowledged is lost, its clients are
    /// free to move. Returns the client of each lost event.
    pub fn link_gone(&mut self, link: LinkId, out: &mut Vec<(LinkId, E)>) -> Vec<ClientKey> {
        let Some(l) = self.links.remove(&link) else {
            return Vec::new();
        };
        self.lost += l.unacked.len() as u64;
        for &client in &l.unacked {
            self.acked(client, false, out);
        }
        l.unacked.into()
    }

    fn acked(&mut self, client: ClientKey, link_ready: bool, out: &mut Vec<(LinkId, E)>) {
        let Some(route) = self.routes.get_mut(&client) else {
            return;
        };
        route.unacked -= 1;
        if route.unacked > 0 {
            return;
        }
        if !route.queue.is_empty() && !link_ready {
            self.unbind(client);
            self.flush(client, out);
        } else if route.closed && route.queue.is_empty() {
            self.unbind(client);
            self.routes.remove(&client);
        }
    }

    /// Takes `client` off the link it was bound to.
    fn unbind(&mut self, client: ClientKey) {
        let Some(link) = self.routes.get_mut(&client).and_then(|r| r.bound.take()) else {
            return;
        };
        if let Some(l) = self.links.get_mut(&link) {
            l.clients -= 1;
        }
    }

    /// Sends a client's whole queue to a ready link, or makes it wait.
    fn flush(&mut self, client: ClientKey, out: &mut Vec<(LinkId, E)>) {
        let Some(link) = self.pick() else {
            if self.routes.contains_key(&client) {
                self.waiting.push_back(client);
            }
            return;
        };
        let Some(route) = self.routes.get_mut(&client) else {
            return;
        };
        if route.unacked > 0 {
            return;
        }
        route.bound = Some(link);
        if let Some(l) = self.links.get_mut(&link) {
            l.clients += 1;
        }
        let queue = std::mem::take(&mut route.queue);
        self.queued -= queue.len();
        for event in queue {
            self.send(link, client, event, out);
        }
    }

    fn send(&mut self, link: LinkId, client: ClientKey, event: E, out: &mut Vec<(LinkId, E)>) {
        if let Some(route) = self.routes.get_mut(&client) {
            route.unacked += 1;
        }
        if let Some(l) = self.links.get_mut(&link) {
            l.unacked.push_back(client);
        }
        out.push((link, event));
    }

    /// The ready link with the fewest clients; of those, the newest.
    ///
    /// On a reload the replacement links (the newest) before its old
    /// worker retires, with no clients: the retiring worker's clients go
    /// to it rather than to another old worker about to retire too, which
    /// would move them a second time (each move holds a client's events
    /// until its old worker acknowledged the earlier ones).
    fn pick(&self) -> Option<LinkId> {
        self.links
            .iter()
            .filter(|(_, l)| l.ready)
            .min_by_key(|(id, l)| (l.clients, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    type Out = Vec<(LinkId, &'static str)>;

    fn routed(router: &mut Router<&'static str>, client: ClientKey, event: &'static str) -> Out {
        let mut out = Vec::new();
        router
            .event(client, event, event == "close", &mut out)
            .unwrap();
        out
    }

    fn ready_router(links: &[LinkId]) -> Router<&'static str> {
        let mut router = Router::new(4);
        for &link in links {
            router.link_up(link);
            router.ready(link, &mut Vec::new());
        }
        router
    }

    #[test]
    fn a_client_sticks_to_one_link() {
        let mut router = ready_router(&[1, 2]);
        let first = routed(&mut router, 7, "a");
        let link = first[0].0;
        assert_eq!(routed(&mut router, 7, "b"), vec![(link, "b")]);
        let mut out = Vec::new();
        assert_eq!(router.ack(link, &mut out), Some(7));
        assert_eq!(routed(&mut router, 7, "c"), vec![(link, "c")]);
    }

    #[test]
    fn a_retiring_link_keeps_a_clients_new_events_until_it_acked_the_old_ones() {
        let mut router = ready_router(&[1]);
        assert_eq!(routed(&mut router, 7, "a"), vec![(1, "a")]);
        router.link_up(2);
        router.ready(2, &mut Vec::new());
        router.retiring(1);
        assert_eq!(routed(&mut router, 7, "b"), vec![]);
        assert_eq!(routed(&mut router, 7, "c"), vec![]);
        assert_eq!(router.queued(), 2);
        let mut out = Vec::new();
        router.ack(1, &mut out);
        assert_eq!(out, vec![(2, "b"), (2, "c")]);
        assert_eq!(router.queued(), 0);
        assert_eq!(routed(&mut router, 7, "d"), vec![(2, "d")]);
    }

    #[test]
    fn an_idle_client_of_a_retiring_link_moves_at_its_next_event() {
        let mut router = ready_router(&[1]);
        routed(&mut router, 7, "a");
        router.ack(1, &mut Vec::new());
        router.link_up(2);
        router.ready(2, &mut Vec::new());
        router.retiring(1);
        assert_eq!(routed(&mut router, 7, "b"), vec![(2, "b")]);
    }

    #[test]
    fn without_a_ready_link_events_wait_up_to_the_bound_and_close_always_fits() {
        let mut router = Router::new(2);
        router.link_up(1);
        assert_eq!(routed(&mut router, 7, "a"), vec![]);
        assert_eq!(routed(&mut router, 8, "b"), vec![]);
        let mut out = Vec::new();
        assert_eq!(router.event(7, "c", false, &mut out), Err(Full));
        assert_eq!(router.drop_queued(7), 1);
        assert_eq!(routed(&mut router, 7, "close"), vec![]);
        router.ready(1, &mut out);
        out.sort();
        assert_eq!(out, vec![(1, "b"), (1, "close")]);
        assert_eq!(router.queued(), 0);
    }

    #[test]
    fn a_link_that_dies_loses_its_unacked_events_and_its_clients_move() {
        let mut router = ready_router(&[1, 2]);
        let link = routed(&mut router, 7, "a")[0].0;
        routed(&mut router, 7, "b");
        router.retiring(link);
        routed(&mut router, 7, "c");
        let mut out = Vec::new();
        assert_eq!(router.link_gone(link, &mut out), vec![7, 7]);
        assert_eq!(router.lost(), 2);
        let other = if link == 1 { 2 } else { 1 };
        assert_eq!(out, vec![(other, "c")]);
        assert_eq!(routed(&mut router, 7, "d"), vec![(other, "d")]);
    }

    #[test]
    fn a_closed_client_is_forgotten_once_its_close_is_acked() {
        let mut router = ready_router(&[1]);
        routed(&mut router, 7, "a");
        routed(&mut router, 7, "close");
        router.ack(1, &mut Vec::new());
        router.ack(1, &mut Vec::new());
        assert!(router.routes.is_empty());
    }

    #[test]
    fn a_new_client_goes_to_the_link_with_fewest_clients_the_newest_of_equals() {
        let mut router = ready_router(&[1, 2]);
        assert_eq!(routed(&mut router, 7, "a"), vec![(2, "a")]);
        assert_eq!(routed(&mut router, 8, "a"), vec![(1, "a")]);
        assert_eq!(routed(&mut router, 9, "a"), vec![(2, "a")]);
        // 8 leaves: link 1 has the fewest again once its close is handled.
        assert_eq!(routed(&mut router, 8, "close"), vec![(1, "close")]);
        router.ack(1, &mut Vec::new());
        router.ack(1, &mut Vec::new());
        assert_eq!(routed(&mut router, 10, "a"), vec![(1, "a")]);
    }

    #[test]
    fn a_rolling_reload_moves_each_client_once_to_a_replacement() {
        let mut router = ready_router(&[1, 2]);
        let clients = [7, 8, 9, 10];
        let mut on = HashMap::new();
        for client in clients {
            let out = routed(&mut router, client, "a");
            on.insert(client, out[0].0);
            router.ack(out[0].0, &mut Vec::new());
        }
        // Slot by slot: the replacement links, then the old worker retires
        // (the other old worker is still ready).
        for (old, new) in [(1, 3), (2, 4)] {
            router.link_up(new);
            router.ready(new, &mut Vec::new());
            router.retiring(old);
            for client in clients {
                let out = routed(&mut router, client, "b");
                let link = out[0].0;
                if on[&client] == old {
                    assert_eq!(link, new, "client {client} of link {old}");
                } else {
                    assert_eq!(link, on[&client], "client {client} moved twice");
                }
                on.insert(client, link);
                router.ack(link, &mut Vec::new());
            }
        }
        let mut spread: Vec<LinkId> = on.values().copied().collect();
        spread.sort();
        assert_eq!(spread, vec![3, 3, 4, 4]);
    }
}
