//! The gateway's one task that owns every client's state (uids, groups,
//! session, outbound queue) and the links to business workers.
//!
//! Client connections and links are small tasks that only turn what they
//! read into [`Input`]s; the hub applies them in order, with no locks. Each
//! round it takes every input already waiting, then writes each link's
//! frames in one buffer (one syscall carries many events under load).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Poll;
use std::time::Instant;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use handler_api::{ClientId, MessageKind};
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::router::{ClientKey, LinkId, Router};
use crate::counters::SharedCounters;
use crate::protocol::link::{
    Answer, Event, EventKind, FromBusiness, Handshake, OutboxSender, Query, Target, ToBusiness,
};
use crate::protocol::worker::ConnectionInfo;

/// WebSocket "try again later": no business worker could take the event.
pub const CLOSE_TRY_AGAIN: u16 = 1013;
/// WebSocket "policy violation": the client does not read what it is sent.
pub const CLOSE_SLOW: u16 = 1008;
/// WebSocket "going away": the host is stopping.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Messages of one client the gateway takes before their events were
/// handled (or dropped, or lost): then it stops reading from that client,
/// so a client sending faster than the handler keeps up with waits in its
/// own socket buffers instead of the gateway's memory.
pub const MESSAGE_CREDIT: usize = 256;

/// What the hub sends a client's connection task.
#[derive(Debug)]
pub enum Outbound {
    /// A message to write.
    Message(MessageKind, Bytes),
    /// Close with this code and reason, then end.
    Close(u16, String),
}

/// Waits for the hub to take one more message of this client (see
/// [`MESSAGE_CREDIT`]).
pub async fn take_credit(credit: &Semaphore) {
    if let Ok(permit) = credit.acquire().await {
        permit.forget();
    }
}

/// What the hub and one client's connection task share: one allocation
/// (about 200 bytes) per client, and nothing more while it is idle. (A
/// tokio channel would allocate a block of 32 slots up front, 1.3 KiB.)
pub struct ClientShared {
    /// Messages and closes for the connection task, oldest first.
    outbound: Mutex<VecDeque<Outbound>>,
    /// Wakes the connection task: something was queued, the hub let go,
    /// or the connection is to end. (Cheaper to wait on than a `Notify`,
    /// whose waiter list takes a lock on each poll: the task waits here
    /// again after every message it reads.)
    waker: AtomicWaker,
    /// The hub dropped its [`ClientHandle`]: nothing more will be queued.
    hub_gone: AtomicBool,
    /// End the connection at once (a client that does not read).
    killed: AtomicBool,
    /// Bytes queued in `outbound` and not yet written.
    pub pending: AtomicUsize,
    /// Taken by the connection task for each message it passes on, given
    /// back when an event of the client is done with ([`MESSAGE_CREDIT`]).
    pub credit: Semaphore,
}

/// Most queue slots an emptied outbound queue keeps.
const KEEP_SLOTS: usize = 16;

impl ClientShared {
    /// The next message or close for the connection, waiting for one;
    /// `None` once the hub let go and nothing is left. Cancel-safe.
    pub fn recv(&self) -> impl Future<Output = Option<Outbound>> + '_ {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if let Some(next) = self.try_recv() {
                return Poll::Ready(Some(next));
            }
            if self.hub_gone.load(Ordering::Acquire) {
                // Queued before the hub let go?
                return Poll::Ready(self.try_recv());
            }
            Poll::Pending
        })
    }

    /// Waits until the hub ends the connection (see [`ClientShared::kill`]).
    pub fn killed(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.killed.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Ends the connection at once, whatever its task is waiting for.
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// The next message or close already queued.
    pub fn try_recv(&self) -> Option<Outbound> {
        let mut queue = lock(&self.outbound);
        let next = queue.pop_front();
        if queue.is_empty() && queue.capacity() > KEEP_SLOTS {
            // A burst is over: an idle client keeps no big queue.
            queue.shrink_to(KEEP_SLOTS);
        }
        next
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The hub's handle on one client connection; dropping it tells the
/// connection task that nothing more will come.
pub struct ClientHandle {
    shared: Arc<ClientShared>,
}

impl ClientHandle {
    /// A handle and the connection task's share of it.
    pub fn new() -> (ClientHandle, Arc<ClientShared>) {
        let shared = Arc::new(ClientShared {
            outbound: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            hub_gone: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            credit: Semaphore::new(MESSAGE_CREDIT),
        });
        (
            ClientHandle {
                shared: shared.clone(),
            },
            shared,
        )
    }

    /// Queues a message or close for the connection task.
    fn send(&self, outbound: Outbound) {
        lock(&self.shared.outbound).push_back(outbound);
        self.shared.waker.wake();
    }
}

impl std::ops::Deref for ClientHandle {
    type Target = ClientShared;

    fn deref(&self) -> &ClientShared {
        &self.shared
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.shared.hub_gone.store(true, Ordering::Release);
        self.shared.waker.wake();
    }
}

/// Most messages of one client passed on to the hub as one input.
pub const MAX_BURST: usize = 64;

/// Messages of one client read in one go, for the hub: one input (and no
/// list allocated) for a single message.
#[derive(Default)]
pub struct Burst {
    first: Option<(MessageKind, Bytes)>,
    more: Vec<(MessageKind, Bytes)>,
}

impl Burst {
    pub fn push(&mut self, kind: MessageKind, data: Bytes) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some((kind, data));
            return;
        }
        if let Some(first) = self.first.take() {
            self.more.reserve(8);
            self.more.push(first);
        }
        self.more.push((kind, data));
    }

    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    /// Sends what was read to the hub, oldest first, and empties this.
    pub fn pass_on(&mut self, key: u64, hub: &mpsc::UnboundedSender<Input>) {
        if let Some((kind, data)) = self.first.take() {
            let _ = hub.send(Input::Message(key, kind, data));
        } else if !self.more.is_empty() {
            let _ = hub.send(Input::Messages(key, std::mem::take(&mut self.more)));
        }
    }
}

/// What the hub reacts to.
pub enum Input {
    /// A client completed its handshake.
    Connected {
        /// Its key.
        key: ClientKey,
        /// Its address.
        peer: String,
        /// Its handshake (empty for `text`).
        handshake: Handshake,
        /// How to reach its task.
        handle: ClientHandle,
    },
    /// A client sent a message.
    Message(ClientKey, MessageKind, Bytes),
    /// A client sent these messages (in this order) in one burst.
    Messages(ClientKey, Vec<(MessageKind, Bytes)>),
    /// A client's connection ended, with the close code it got or gave.
    Gone(ClientKey, Option<u16>),
    /// A business worker connected; frames for it go to `writer`.
    LinkUp(LinkId, OutboxSender),
    /// A business worker sent a frame.
    Link(LinkId, FromBusiness),
    /// A business worker sent these frames (in this order), read in one go.
    Links(LinkId, Vec<FromBusiness>),
    /// A business worker's link ended.
    LinkDown(LinkId),
    /// The master asks for the client list.
    Connections(oneshot::Sender<Vec<ConnectionInfo>>),
    /// Close every client with 1001 (the host is stopping).
    CloseAll,
}

struct Client {
    handle: ClientHandle,
    /// Its address, as events carry it (UTF-8).
    peer: Bytes,
    session: Bytes,
    /// Sets that allocate nothing while empty, half a `HashSet`'s size:
    /// most clients have none or a few.
    uids: BTreeSet<String>,
    groups: BTreeSet<String>,
    next_seq: u64,
    connected: Instant,
    messages_in: u64,
    closing: bool,
}

/// The state of one gateway process.
pub struct Hub {
    gateway: u32,
    nonce: u32,
    max_outbound: usize,
    // Maps keyed by numbers the gateway picks itself (client keys, link
    // ids) hash with FxHash: SipHash resists keys an attacker chooses,
    // which these are not, and costs several times more per lookup.
    clients: FxHashMap<ClientKey, Client>,
    uids: HashMap<String, FxHashSet<ClientKey>>,
    groups: HashMap<String, FxHashSet<ClientKey>>,
    router: Router<Event>,
    links: FxHashMap<LinkId, OutboxSender>,
    /// Frames to write per link this round (each buffer is kept and reused).
    frames: FxHashMap<LinkId, Vec<u8>>,
    routed: Vec<(LinkId, Event)>,
    counters: Arc<SharedCounters>,
}

impl Hub {
    /// The hub of gateway `gateway` (boot `nonce`).
    pub fn new(
        gateway: u32,
        nonce: u32,
        max_outbound: usize,
        max_queued: usize,
        counters: Arc<SharedCounters>,
    ) -> Hub {
        Hub {
            gateway,
            nonce,
            max_outbound,
            clients: FxHashMap::default(),
            uids: HashMap::new(),
            groups: HashMap::new(),
            router: Router::new(max_queued),
            links: FxHashMap::default(),
            frames: FxHashMap::default(),
            routed: Vec::new(),
            counters,
        }
    }

    /// Applies inputs until every sender is gone.
    pub async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<Input>) {
        let mut batch = Vec::with_capacity(256);
        while inputs.recv_many(&mut batch, 256).await > 0 {
            for input in batch.drain(..) {
                self.apply(input);
            }
            self.write_frames();
        }
    }

    fn id(&self, key: ClientKey) -> ClientId {
        ClientId {
            gateway: self.gateway,
            nonce: self.nonce,
            counter: key,
        }
    }

    /// The key of a client id of this gateway process.
    fn key(&self, id: ClientId) -> Option<ClientKey> {
        (id.gateway == self.gateway && id.nonce == self.nonce).then_some(id.counter)
    }

    fn apply(&mut self, input: Input) {
        match input {
            Input::Connected {
                key,
                peer,
                handshake,
                handle,
            } => {
                self.clients.insert(
                    key,
                    Client {
                        handle,
                        peer: Bytes::from(peer),
                        session: Bytes::new(),
                        uids: BTreeSet::new(),
                        groups: BTreeSet::new(),
                        next_seq: 0,
                        connected: Instant::now(),
                        messages_in: 0,
                        closing: false,
                    },
                );
                self.counters.connections.fetch_add(1, Ordering::Relaxed);
                self.route(
                    key,
                    EventKind::Connect,
                    MessageKind::Binary,
                    Bytes::new(),
                    Some(handshake),
                );
            }
            Input::Message(key, kind, data) => self.message(key, kind, data),
            Input::Messages(key, messages) => {
                for (kind, data) in messages {
                    self.message(key, kind, data);
                }
            }
            Input::Gone(key, code) => self.gone(key, code),
            Input::LinkUp(link, writer) => {
                self.links.insert(link, writer);
                self.router.link_up(link);
            }
            Input::Link(link, message) => self.on_link_message(link, message),
            Input::Links(link, messages) => {
                for message in messages {
                    self.on_link_message(link, message);
                }
            }
            Input::LinkDown(link) => {
                self.links.remove(&link);
                self.frames.remove(&link);
                let before = self.router.lost();
                for client in self.router.link_gone(link, &mut self.routed) {
                    self.give_credit(client, 1);
                }
                let lost = self.router.lost() - before;
                if lost > 0 {
                    tracing::warn!(
                        lost,
                        "a business worker ended with events it had not finished; they are lost"
                    );
                }
                self.counters
                    .gateway
                    .events_lost
                    .store(self.router.lost(), Ordering::Relaxed);
                self.deliver_routed();
            }
            Input::Connections(reply) => {
                let list = self
                    .clients
                    .iter()
                    .map(|(key, c)| ConnectionInfo {
                        peer: String::from_utf8_lossy(&c.peer).into_owned(),
                        state: describe(self.id(*key), c),
                        requests: c.messages_in,
                        age_secs: c.connected.elapsed().as_secs_f64(),
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Input::CloseAll => {
                let keys: Vec<ClientKey> = self.clients.keys().copied().collect();
                for key in keys {
                    self.close(key, CLOSE_GOING_AWAY, "server stopping");
                }
            }
        }
        self.counters
            .in_flight
            .store(self.router.queued() as u64, Ordering::Relaxed);
    }

    fn message(&mut self, key: ClientKey, kind: MessageKind, data: Bytes) {
        if let Some(client) = self.clients.get_mut(&key) {
            client.messages_in += 1;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters
                .gateway
                .messages_in
                .fetch_add(1, Ordering::Relaxed);
            self.route(key, EventKind::Message, kind, data, None);
        }
    }

    fn route(
        &mut self,
        key: ClientKey,
        kind: EventKind,
        message_kind: MessageKind,
        data: Bytes,
        handshake: Option<Handshake>,
    ) {
        let id = self.id(key);
        let Some(client) = self.clients.get_mut(&key) else {
            return;
        };
        let event = Event {
            kind,
            client: id,
            seq: client.next_seq,
            session: client.session.clone(),
            peer: client.peer.clone(),
            message_kind,
            data,
            handshake: handshake.map(Box::new),
        };
        client.next_seq += 1;
        let close = kind == EventKind::Close;
        if self
            .router
            .event(key, event, close, &mut self.routed)
            .is_err()
        {
            self.counters
                .gateway
                .queue_full
                .fetch_add(1, Ordering::Relaxed);
            self.router.drop_queued(key);
            self.close(key, CLOSE_TRY_AGAIN, "no worker available, try again later");
        }
        self.deliver_routed();
    }

    fn deliver_routed(&mut self) {
        for (link, event) in self.routed.drain(..) {
            let frames = self.frames.entry(link).or_default();
            event.encode(frames);
        }
    }

    fn answer(&mut self, link: LinkId, request: u64, answer: Answer) {
        let frames = self.frames.entry(link).or_default();
        ToBusiness::Answer { request, answer }.encode(frames);
    }

    /// Hands this round's frames to the link writers.
    fn write_frames(&mut self) {
        let links = &self.links;
        self.frames.retain(|link, frames| match links.get(link) {
            Some(writer) => {
                writer.send(frames);
                true
            }
            None => false,
        });
    }

    fn gone(&mut self, key: ClientKey, code: Option<u16>) {
        let Some(client) = self.clients.get(&key) else {
            return;
        };
        let (uids, groups) = (client.uids.clone(), client.groups.clone());
        if let Some(code) = code {
            self.counters.gateway.count_close(code);
        }
        self.counters.connections.fetch_sub(1, Ordering::Relaxed);
        // The close event carries the session; the client is gone after it.
        self.route(
            key,
            EventKind::Close,
            MessageKind::Binary,
            Bytes::new(),
            None,
        );
        for uid in uids {
            remove_member(&mut self.uids, &uid, key);
        }
        for group in groups {
            remove_member(&mut self.groups, &group, key);
        }
        self.clients.remove(&key);
    }

    /// Events of `key` are done with: it may pass on as many more messages.
    /// (Its connect event gives one more than it took: the credit stays
    /// within one of [`MESSAGE_CREDIT`].)
    fn give_credit(&self, key: ClientKey, events: usize) {
        if let Some(client) = self.clients.get(&key) {
            let room = MESSAGE_CREDIT + 1 - client.handle.credit.available_permits();
            client.handle.credit.add_permits(events.min(room));
        }
    }

    fn close(&mut self, key: ClientKey, code: u16, reason: &str) {
        if let Some(client) = self.clients.get_mut(&key) {
            if !client.closing {
                client.closing = true;
                client.handle.send(Outbound::Close(code, reason.to_owned()));
            }
        }
    }

    fn on_link_message(&mut self, link: LinkId, message: FromBusiness) {
        match message {
            FromBusiness::Ready => {
                self.router.ready(link, &mut self.routed);
                self.deliver_routed();
            }
            FromBusiness::Pusher => tracing::debug!(link, "an HTTP worker links to push"),
            FromBusiness::Retiring => {
                self.router.retiring(link);
                let frames = self.frames.entry(link).or_default();
                ToBusiness::Retired.encode(frames);
            }
            FromBusiness::Ack => {
                if let Some(client) = self.router.ack(link, &mut self.routed) {
                    self.give_credit(client, 1);
                }
                self.deliver_routed();
            }
            FromBusiness::Send { target, kind, data } => self.send(target, kind, data),
            FromBusiness::Close {
                client,
                code,
                reason,
            } => {
                if let Some(key) = self.key(client) {
                    self.close(key, code, &reason);
                }
            }
            FromBusiness::BindUid(id, uid) => self.membership(id, uid, Membership::Uid, true),
            FromBusiness::UnbindUid(id, uid) => self.membership(id, uid, Membership::Uid, false),
            FromBusiness::JoinGroup(id, g) => self.membership(id, g, Membership::Group, true),
            FromBusiness::LeaveGroup(id, g) => self.membership(id, g, Membership::Group, false),
            FromBusiness::SetSession(id, session) => {
                if let Some(client) = self.key(id).and_then(|k| self.clients.get_mut(&k)) {
                    client.session = session;
                }
            }
            FromBusiness::Query { request, query } => {
                let answer = self.query(query);
                self.answer(link, request, answer);
            }
        }
    }

    fn membership(&mut self, id: ClientId, name: String, kind: Membership, join: bool) {
        let Some(key) = self.key(id) else { return };
        let Some(client) = self.clients.get_mut(&key) else {
            return;
        };
        let (own, index) = match kind {
            Membership::Uid => (&mut client.uids, &mut self.uids),
            Membership::Group => (&mut client.groups, &mut self.groups),
        };
        if join {
            own.insert(name.clone());
            index.entry(name).or_default().insert(key);
        } else {
            own.remove(&name);
            remove_member(index, &name, key);
        }
    }

    fn query(&self, query: Query) -> Answer {
        let sorted = |keys: Option<&FxHashSet<ClientKey>>| {
            let mut ids: Vec<ClientId> = keys
                .into_iter()
                .flatten()
                .map(|key| self.id(*key))
                .collect();
            ids.sort();
            Answer::Ids(ids)
        };
        match query {
            // A client being closed can no longer be sent to.
            Query::IsOnline(id) => Answer::Bool(
                self.key(id)
                    .and_then(|k| self.clients.get(&k))
                    .is_some_and(|c| !c.closing),
            ),
            Query::ClientCount => Answer::Count(self.clients.len() as u64),
            Query::GroupClientIds(group) => sorted(self.groups.get(&group)),
            Query::UidClientIds(uid) => sorted(self.uids.get(&uid)),
            Query::Session(id) => Answer::Session(
                self.key(id)
                    .and_then(|k| self.clients.get(&k))
                    .map(|c| c.session.clone()),
            ),
        }
    }

    fn send(&mut self, target: Target, kind: MessageKind, data: Bytes) {
        let keys: Vec<ClientKey> = match target {
            // The common case, without a list.
            Target::Client(id) => {
                if let Some(key) = self.key(id) {
                    self.send_one(key, kind, data);
                }
                return;
            }
            Target::All { include, exclude } => {
                let exclude: HashSet<ClientKey> =
                    exclude.into_iter().filter_map(|id| self.key(id)).collect();
                match include {
                    Some(ids) => ids
                        .into_iter()
                        .filter_map(|id| self.key(id))
                        .collect::<Vec<_>>(),
                    None => self.clients.keys().copied().collect(),
                }
                .into_iter()
                .filter(|k| !exclude.contains(k))
                .collect()
            }
            Target::Uid(uid) => self.uids.get(&uid).into_iter().flatten().copied().collect(),
            Target::Group { group, exclude } => {
                let exclude: HashSet<ClientKey> =
                    exclude.into_iter().filter_map(|id| self.key(id)).collect();
                self.groups
                    .get(&group)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|k| !exclude.contains(k))
                    .collect()
            }
        };
        for key in keys {
            self.send_one(key, kind, data.clone());
        }
    }

    fn send_one(&mut self, key: ClientKey, kind: MessageKind, data: Bytes) {
        let Some(client) = self.clients.get(&key) else {
            return;
        };
        if client.closing {
            return;
        }
        let queued = client
            .handle
            .pending
            .fetch_add(data.len(), Ordering::Relaxed)
            + data.len();
        if queued > self.max_outbound {
            // It does not read: a close frame would not get through either.
            tracing::debug!(client = %self.id(key), queued, "closing a client that does not read");
            self.counters
                .gateway
                .slow_closes
                .fetch_add(1, Ordering::Relaxed);
            client.handle.kill();
            if let Some(client) = self.clients.get_mut(&key) {
                client.closing = true;
            }
            return;
        }
        self.counters
            .gateway
            .messages_out
            .fetch_add(1, Ordering::Relaxed);
        client.handle.send(Outbound::Message(kind, data));
    }
}

/// A client as `host connections` shows it: id, uids, groups.
fn describe(id: ClientId, client: &Client) -> String {
    let mut text = format!("client {id}");
    for (label, names) in [("uid", &client.uids), ("groups", &client.groups)] {
        if !names.is_empty() {
            // In order: the sets are sorted.
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            text.push_str(&format!(" {label} {}", names.join(",")));
        }
    }
    text
}

#[derive(Clone, Copy)]
enum Membership {
    Uid,
    Group,
}

fn remove_member(index: &mut HashMap<String, FxHashSet<ClientKey>>, name: &str, key: ClientKey) {
    if let Some(members) = index.get_mut(name) {
        members.remove(&key);
        if members.is_empty() {
            index.remove(name);
        }
    }
}
