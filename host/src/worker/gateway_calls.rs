//! The gateway calls a handler makes ([`handler_api::GatewayCalls`]),
//! carried out by a business worker over its links to the gateways.
//!
//! While the handler thread handles an event, its calls are batched per
//! gateway and written, with the event's `Ack` last, in one piece when the
//! handler returns: what a handler sent while handling an event reaches the
//! gateway before the gateway learns the event is done (and may move the
//! client to another worker). A query first writes what is batched, so it
//! sees the calls made before it, then waits for the gateways' answers.
//!
//! A client id names its gateway: calls about one client go to that
//! gateway's link; sends to all, a uid or a group go to every gateway, and
//! queries about them add up every gateway's answer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use abi_stable::prefix_type::PrefixTypeTrait as _;
use abi_stable::std_types::{ROption, RSlice, RStr, RVec};
use bytes::Bytes;
use handler_api::{ClientId, GatewayCalls, GatewayCallsRef, MessageKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::protocol::link::{encode_send, Answer, FromBusiness, Query, Target};

/// How long a query waits for the gateways' answers.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What this process is to the gateways it links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRole {
    /// A business worker: it takes events.
    Business,
    /// An HTTP worker of a group that pushes to the gateway group: it only
    /// sends and asks.
    Pusher,
}

/// The worker's links to its gateways, by gateway index.
pub struct Links {
    role: LinkRole,
    slots: Vec<Mutex<Slot>>,
    retiring: AtomicBool,
    writers: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Default)]
struct Slot {
    /// Counts the link's connections, so an ack for an event of a previous
    /// connection (a gateway that restarted since) is never sent.
    generation: u64,
    frames: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

static LINKS: OnceLock<Links> = OnceLock::new();

/// Sets up the link table for `gateways` gateways (once per process).
pub fn install(gateways: usize, role: LinkRole) -> &'static Links {
    LINKS.get_or_init(|| Links {
        role,
        slots: (0..gateways).map(|_| Mutex::default()).collect(),
        retiring: AtomicBool::new(false),
        writers: Mutex::default(),
    })
}

fn links() -> Option<&'static Links> {
    LINKS.get()
}

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

fn encoded(message: &FromBusiness) -> Vec<u8> {
    let mut frame = Vec::new();
    message.encode(&mut frame);
    frame
}

impl Links {
    /// A new connection to gateway `index`: it is told what this worker is
    /// (ready, retiring, or a pusher); returns its generation.
    pub fn attach(&self, index: usize, frames: mpsc::UnboundedSender<Vec<u8>>) -> u64 {
        let mut slot = lock(&self.slots[index]);
        slot.generation += 1;
        let state = match (self.role, self.retiring()) {
            (LinkRole::Pusher, _) => FromBusiness::Pusher,
            (LinkRole::Business, true) => FromBusiness::Retiring,
            (LinkRole::Business, false) => FromBusiness::Ready,
        };
        let _ = frames.send(encoded(&state));
        slot.frames = Some(frames);
        slot.generation
    }

    /// Keeps a link writer's task, to wait for it at exit.
    pub fn note_writer(&self, writer: JoinHandle<()>) {
        self.writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(writer);
    }

    /// Connection `generation` of gateway `index` ended.
    pub fn detach(&self, index: usize, generation: u64) {
        let mut slot = lock(&self.slots[index]);
        if slot.generation == generation {
            slot.frames = None;
        }
    }

    /// Tells every gateway this worker is retiring.
    pub fn retire(&self) {
        self.retiring.store(true, Ordering::SeqCst);
        for slot in &self.slots {
            if let Some(frames) = &lock(slot).frames {
                let _ = frames.send(encoded(&FromBusiness::Retiring));
            }
        }
    }

    /// Whether [`Links::retire`] was called.
    pub fn retiring(&self) -> bool {
        self.retiring.load(Ordering::SeqCst)
    }

    /// Ends every link once what is queued is written.
    pub fn close(&self) {
        for slot in &self.slots {
            lock(slot).frames = None;
        }
    }

    /// Waits until every link writer has written what it had.
    pub async fn flushed(&self) {
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|e| e.into_inner()));
        for writer in writers {
            let _ = writer.await;
        }
    }

    fn send(&self, index: usize, frames: Vec<u8>) -> bool {
        match self.slots.get(index).map(lock) {
            Some(slot) => slot.frames.as_ref().is_some_and(|f| f.send(frames).is_ok()),
            None => false,
        }
    }
}

thread_local! {
    /// What the current run of events made for each gateway (kept between
    /// runs for its buffers; `None`: this thread never ran events).
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// The frames a run of events made, per gateway, not yet sent.
struct Batch {
    /// A run is going on: calls are batched.
    active: bool,
    frames: Vec<Vec<u8>>,
    /// Per gateway: the link generation of the acks in `frames`, and where
    /// each ack frame starts.
    acks: Vec<(u64, Vec<usize>)>,
}

/// An `Ack` frame: length 1, tag 2 (see [`FromBusiness::encode`]).
const ACK_FRAME: [u8; 5] = [0, 0, 0, 1, 2];

impl Batch {
    /// Sends what was made for gateway `index`: on the link connection its
    /// acks are for, or, when that connection is gone (the gateway
    /// restarted), on the new one without those acks.
    fn send(&mut self, links: &Links, index: usize) {
        let frames = &mut self.frames[index];
        let (generation, acks) = &mut self.acks[index];
        if frames.is_empty() {
            return;
        }
        let capacity = frames.capacity();
        let mut frames = std::mem::replace(frames, Vec::with_capacity(capacity));
        let slot = lock(&links.slots[index]);
        if !acks.is_empty() && *generation != slot.generation {
            for &at in acks.iter().rev() {
                frames.drain(at..at + ACK_FRAME.len());
            }
        }
        acks.clear();
        if let Some(link) = &slot.frames {
            if !frames.is_empty() {
                let _ = link.send(frames);
            }
        }
    }

    fn send_all(&mut self, links: &Links) {
        for index in 0..self.frames.len() {
            self.send(links, index);
        }
    }
}

/// A run of events handled one after another on the handler thread: each
/// event's calls, then its ack, are queued for the gateways in order, and
/// what the run made goes to each link in one piece when the run ends
/// (one hand-off to the link writer per run rather than per event).
pub struct Run {
    links: &'static Links,
}

impl Run {
    /// Starts a run (none without links).
    pub fn begin() -> Option<Run> {
        let links = links()?;
        BATCH.with(|b| {
            b.borrow_mut()
                .get_or_insert_with(|| Batch {
                    active: false,
                    frames: vec![Vec::new(); links.slots.len()],
                    acks: vec![(0, Vec::new()); links.slots.len()],
                })
                .active = true;
        });
        Some(Run { links })
    }

    /// Runs `handle` for an event of gateway `gateway` (link `generation`),
    /// then queues the event's ack after its calls.
    pub fn event(&mut self, gateway: usize, generation: u64, handle: impl FnOnce()) {
        BATCH.with(|b| {
            let mut batch = b.borrow_mut();
            let batch = batch.as_mut().expect("a run has a batch");
            if batch.acks[gateway].0 != generation && !batch.acks[gateway].1.is_empty() {
                batch.send(self.links, gateway);
            }
        });
        handle();
        BATCH.with(|b| {
            let mut batch = b.borrow_mut();
            let batch = batch.as_mut().expect("a run has a batch");
            let at = batch.frames[gateway].len();
            batch.frames[gateway].extend_from_slice(&ACK_FRAME);
            batch.acks[gateway].0 = generation;
            batch.acks[gateway].1.push(at);
        });
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        BATCH.with(|b| {
            if let Some(batch) = b.borrow_mut().as_mut() {
                batch.send_all(self.links);
                batch.active = false;
            }
        });
    }
}

/// Queues one call for gateway `index` (or every gateway), written by
/// `encode`: into the current run's batch, or sent at once outside a run
/// (an HTTP worker pushing).
fn call(index: Option<usize>, encode: impl Fn(&mut Vec<u8>)) {
    let Some(links) = links() else { return };
    let targets = match index {
        Some(i) if i < links.slots.len() => i..i + 1,
        Some(_) => return,
        None => 0..links.slots.len(),
    };
    let batched = BATCH.with(|b| {
        let mut batch = b.borrow_mut();
        let Some(batch) = batch.as_mut().filter(|b| b.active) else {
            return false;
        };
        for i in targets.clone() {
            encode(&mut batch.frames[i]);
        }
        true
    });
    if !batched {
        for i in targets {
            let mut frame = Vec::new();
            encode(&mut frame);
            links.send(i, frame);
        }
    }
}

/// Queues `message` for gateway `index` (or every gateway).
fn call_with(index: Option<usize>, message: FromBusiness) {
    call(index, |out| message.encode(out));
}

/// Writes what the current run batched so far.
fn flush_batch() {
    let Some(links) = links() else { return };
    BATCH.with(|b| {
        if let Some(batch) = b.borrow_mut().as_mut() {
            batch.send_all(links);
        }
    });
}

static NEXT_QUERY: AtomicU64 = AtomicU64::new(0);
static WAITING: Mutex<Option<HashMap<u64, std_mpsc::Sender<Answer>>>> = Mutex::new(None);

/// A gateway answered query `request`.
pub fn answered(request: u64, answer: Answer) {
    let waiting = WAITING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(waiter) = waiting.as_ref().and_then(|w| w.get(&request)) {
        let _ = waiter.send(answer);
    }
}

/// Asks gateway `index` (or every gateway) and collects the answers of
/// those that answer in time.
fn ask(index: Option<usize>, query: Query) -> Vec<Answer> {
    let Some(links) = links() else {
        return Vec::new();
    };
    flush_batch();
    let request = NEXT_QUERY.fetch_add(1, Ordering::Relaxed);
    let (answers, inbox) = std_mpsc::channel();
    WAITING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(request, answers);
    let frame = encoded(&FromBusiness::Query { request, query });
    let targets: Vec<usize> = match index {
        Some(i) => vec![i],
        None => (0..links.slots.len()).collect(),
    };
    let asked = targets
        .into_iter()
        .filter(|&i| links.send(i, frame.clone()))
        .count();
    let deadline = Instant::now() + QUERY_TIMEOUT;
    let mut got = Vec::with_capacity(asked);
    while got.len() < asked {
        match inbox.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(answer) => got.push(answer),
            Err(_) => break,
        }
    }
    if let Some(waiting) = WAITING.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        waiting.remove(&request);
    }
    got
}

fn gateway_of(client: ClientId) -> Option<usize> {
    Some(client.gateway as usize)
}

fn ids(list: RSlice<'_, ClientId>) -> Vec<ClientId> {
    list.as_slice().to_vec()
}

extern "C" fn send_to_client(client: ClientId, kind: MessageKind, data: RSlice<'_, u8>) {
    send(gateway_of(client), Target::Client(client), kind, data);
}

fn send(index: Option<usize>, target: Target, kind: MessageKind, data: RSlice<'_, u8>) {
    call(index, |out| {
        encode_send(out, &target, kind, data.as_slice())
    });
}

extern "C" fn send_to_all(
    kind: MessageKind,
    data: RSlice<'_, u8>,
    include: ROption<RSlice<'_, ClientId>>,
    exclude: RSlice<'_, ClientId>,
) {
    let target = Target::All {
        include: include.into_option().map(ids),
        exclude: ids(exclude),
    };
    send(None, target, kind, data);
}

extern "C" fn close_client(client: ClientId, code: u16, reason: RStr<'_>) {
    let message = FromBusiness::Close {
        client,
        code,
        reason: reason.as_str().to_owned(),
    };
    call_with(gateway_of(client), message);
}

extern "C" fn bind_uid(client: ClientId, uid: RStr<'_>) {
    call_with(
        gateway_of(client),
        FromBusiness::BindUid(client, uid.as_str().to_owned()),
    );
}

extern "C" fn unbind_uid(client: ClientId, uid: RStr<'_>) {
    call_with(
        gateway_of(client),
        FromBusiness::UnbindUid(client, uid.as_str().to_owned()),
    );
}

extern "C" fn send_to_uid(uid: RStr<'_>, kind: MessageKind, data: RSlice<'_, u8>) {
    send(None, Target::Uid(uid.as_str().to_owned()), kind, data);
}

extern "C" fn join_group(client: ClientId, group: RStr<'_>) {
    call_with(
        gateway_of(client),
        FromBusiness::JoinGroup(client, group.as_str().to_owned()),
    );
}

extern "C" fn leave_group(client: ClientId, group: RStr<'_>) {
    call_with(
        gateway_of(client),
        FromBusiness::LeaveGroup(client, group.as_str().to_owned()),
    );
}

extern "C" fn send_to_group(
    group: RStr<'_>,
    kind: MessageKind,
    data: RSlice<'_, u8>,
    exclude: RSlice<'_, ClientId>,
) {
    let target = Target::Group {
        group: group.as_str().to_owned(),
        exclude: ids(exclude),
    };
    send(None, target, kind, data);
}

extern "C" fn set_session(client: ClientId, session: RSlice<'_, u8>) {
    call_with(
        gateway_of(client),
        FromBusiness::SetSession(client, Bytes::copy_from_slice(session.as_slice())),
    );
}

extern "C" fn is_online(client: ClientId) -> bool {
    ask(gateway_of(client), Query::IsOnline(client))
        .into_iter()
        .any(|a| a == Answer::Bool(true))
}

extern "C" fn client_count() -> u64 {
    ask(None, Query::ClientCount)
        .into_iter()
        .map(|a| match a {
            Answer::Count(n) => n,
            _ => 0,
        })
        .sum()
}

fn all_ids(query: Query) -> RVec<ClientId> {
    let mut all: Vec<ClientId> = ask(None, query)
        .into_iter()
        .flat_map(|a| match a {
            Answer::Ids(ids) => ids,
            _ => Vec::new(),
        })
        .collect();
    all.sort();
    all.into()
}

extern "C" fn group_client_ids(group: RStr<'_>) -> RVec<ClientId> {
    all_ids(Query::GroupClientIds(group.as_str().to_owned()))
}

extern "C" fn uid_client_ids(uid: RStr<'_>) -> RVec<ClientId> {
    all_ids(Query::UidClientIds(uid.as_str().to_owned()))
}

extern "C" fn session(client: ClientId) -> ROption<RVec<u8>> {
    ask(gateway_of(client), Query::Session(client))
        .into_iter()
        .find_map(|a| match a {
            Answer::Session(Some(s)) => Some(RVec::from(s.to_vec())),
            _ => None,
        })
        .into()
}

/// The table handed to the handler with every event.
pub fn table() -> GatewayCallsRef {
    static TABLE: OnceLock<GatewayCallsRef> = OnceLock::new();
    *TABLE.get_or_init(|| {
        GatewayCalls {
            send_to_client,
            send_to_all,
            close_client,
            bind_uid,
            unbind_uid,
            send_to_uid,
            join_group,
            leave_group,
            send_to_group,
            set_session,
            is_online,
            client_count,
            group_client_ids,
            uid_client_ids,
            session,
        }
        .leak_into_prefix()
    })
}
