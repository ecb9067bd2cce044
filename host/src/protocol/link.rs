//! The link between a gateway process and a business worker: one stream
//! per pair, carrying length-prefixed binary frames.
//!
//! A frame is `u32` length (big-endian, of what follows), a tag byte, then
//! the fields in order; bytes and strings are `u32`-length-prefixed. Nothing
//! here knows the transport: today a Unix socket in the run directory, and
//! the same frames could cross TCP between machines.
//!
//! Gateway → worker: client [`Event`]s, each with the client's sequence
//! number and session, and [`Answer`]s to queries. Worker → gateway:
//! `Ready`, `Retiring`, one `Ack` per event after the handler returned, and
//! the gateway calls the handler made ([`FromBusiness`]). Sends made while
//! handling an event are written before its `Ack`, on the same stream, so
//! they reach the client before the gateway can move it to another worker.

use anyhow::{bail, Context as _, Result};
use bytes::{Buf as _, Bytes, BytesMut};
use handler_api::{ClientId, MessageKind};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Largest frame accepted from the other side.
pub const MAX_FRAME: usize = 64 << 20;

/// What a client event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The client connected.
    Connect,
    /// The client sent a message.
    Message,
    /// The client's connection closed.
    Close,
}

/// How the client connected (sent with `Connect` events only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Handshake {
    /// The request path (with its query).
    pub path: String,
    /// The first subprotocol the client offered, or empty.
    pub subprotocol: String,
    /// The request headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// One client event for a business worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Connect, message or close.
    pub kind: EventKind,
    /// The client.
    pub client: ClientId,
    /// The client's event number, from 0, for checking order.
    pub seq: u64,
    /// The client's session when the event left the gateway.
    pub session: Bytes,
    /// The client's address (UTF-8, checked when decoded).
    pub peer: Bytes,
    /// The message's kind (messages only).
    pub message_kind: MessageKind,
    /// The message (messages only).
    pub data: Bytes,
    /// The handshake (connects only).
    pub handshake: Option<Box<Handshake>>,
}

/// Whom a send is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One client.
    Client(ClientId),
    /// Every client (of `include` when given) except those of `exclude`.
    All {
        /// The only clients to send to, if given.
        include: Option<Vec<ClientId>>,
        /// Clients left out.
        exclude: Vec<ClientId>,
    },
    /// The clients bound to a uid.
    Uid(String),
    /// The clients of a group, except those of `exclude`.
    Group {
        /// The group.
        group: String,
        /// Clients left out.
        exclude: Vec<ClientId>,
    },
}

/// A question a handler asks the gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Whether a client is connected.
    IsOnline(ClientId),
    /// How many clients the gateway holds.
    ClientCount,
    /// The clients in a group.
    GroupClientIds(String),
    /// The clients bound to a uid.
    UidClientIds(String),
    /// A client's session.
    Session(ClientId),
}

/// A gateway's answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Yes or no.
    Bool(bool),
    /// A count.
    Count(u64),
    /// Client ids.
    Ids(Vec<ClientId>),
    /// A session, if the client is connected.
    Session(Option<Bytes>),
}

/// Gateway → business worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToBusiness {
    /// A client event to hand to the handler, then ack.
    Event(Box<Event>),
    /// After `Retiring`: no more events will come on this link.
    Retired,
    /// The answer to the worker's query `request`.
    Answer {
        /// The query's number.
        request: u64,
        /// The answer.
        answer: Answer,
    },
}

/// Business worker → gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromBusiness {
    /// The worker takes events.
    Ready,
    /// The worker is draining: no new clients' events; it acks what it has.
    Retiring,
    /// The link is an HTTP worker's that pushes to the group: it takes no
    /// events.
    Pusher,
    /// The oldest unacknowledged event on this link was handled.
    Ack,
    /// Send a message.
    Send {
        /// To whom.
        target: Target,
        /// Text or binary.
        kind: MessageKind,
        /// The message.
        data: Bytes,
    },
    /// Close a client.
    Close {
        /// The client.
        client: ClientId,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// Bind a client to a uid.
    BindUid(ClientId, String),
    /// Unbind a client from a uid.
    UnbindUid(ClientId, String),
    /// Add a client to a group.
    JoinGroup(ClientId, String),
    /// Remove a client from a group.
    LeaveGroup(ClientId, String),
    /// Replace a client's session.
    SetSession(ClientId, Bytes),
    /// Ask something; answered with the same `request`.
    Query {
        /// Chosen by the worker.
        request: u64,
        /// The question.
        query: Query,
    },
}

/// Appends fields to a frame.
struct Encoder<'a>(&'a mut Vec<u8>);

impl Encoder<'_> {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    fn id(&mut self, id: ClientId) -> &mut Self {
        self.u32(id.gateway).u32(id.nonce).u64(id.counter)
    }
    fn ids(&mut self, ids: &[ClientId]) -> &mut Self {
        self.u32(ids.len() as u32);
        for id in ids {
            self.id(*id);
        }
        self
    }
    fn kind(&mut self, kind: MessageKind) -> &mut Self {
        self.u8(match kind {
            MessageKind::Text => 0,
            MessageKind::Binary => 1,
        })
    }
}

/// Reads fields of a frame, failing on truncation. Bytes fields share the
/// frame's buffer when it is given as [`Bytes`] (`shared`), and are copied
/// otherwise.
struct Decoder<'a> {
    rest: &'a [u8],
    shared: Option<&'a Bytes>,
}

impl<'a> Decoder<'a> {
    fn new(body: &'a [u8]) -> Self {
        Decoder {
            rest: body,
            shared: None,
        }
    }
    fn sharing(body: &'a Bytes) -> Self {
        Decoder {
            rest: body,
            shared: Some(body),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            bail!("truncated link frame");
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into()?))
    }
    fn bytes(&mut self) -> Result<Bytes> {
        let n = self.u32()? as usize;
        let field = self.take(n)?;
        Ok(match self.shared {
            Some(whole) => whole.slice_ref(field),
            None => Bytes::copy_from_slice(field),
        })
    }
    fn utf8(&mut self) -> Result<Bytes> {
        let field = self.bytes()?;
        std::str::from_utf8(&field).context("a link string is not UTF-8")?;
        Ok(field)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).context("a link string is not UTF-8")
    }
    fn id(&mut self) -> Result<ClientId> {
        Ok(ClientId {
            gateway: self.u32()?,
            nonce: self.u32()?,
            counter: self.u64()?,
        })
    }
    fn ids(&mut self) -> Result<Vec<ClientId>> {
        let n = self.u32()? as usize;
        if n > self.rest.len() / 16 {
            bail!("truncated link frame");
        }
        (0..n).map(|_| self.id()).collect()
    }
    fn kind(&mut self) -> Result<MessageKind> {
        match self.u8()? {
            0 => Ok(MessageKind::Text),
            1 => Ok(MessageKind::Binary),
            other => bail!("unknown message kind {other} on the link"),
        }
    }
}

/// Appends one frame to `out`: its length, then what `body` writes.
fn frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Encoder<'_>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(&mut Encoder(out));
    let length = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&length.to_be_bytes());
}

/// Writes what `outgoing` carries to one end of a link, everything already
/// waiting in one write (batched under load), until the channel or the
/// stream closes; then shuts the stream down.
pub async fn write_frames(
    mut writer: impl tokio::io::AsyncWrite + Unpin,
    mut outgoing: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    use tokio::io::AsyncWriteExt as _;
    while let Some(mut buffer) = outgoing.recv().await {
        while let Ok(more) = outgoing.try_recv() {
            buffer.extend_from_slice(&more);
        }
        if writer.write_all(&buffer).await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// Frames on their way to one end of a link: the task that encodes them
/// and the task that writes them trade two buffers instead of sending a
/// fresh one per batch (nothing is allocated once both have grown to the
/// load's batch size).
pub struct Outbox {
    buffer: std::sync::Mutex<Vec<u8>>,
    wake: tokio::sync::Notify,
    closed: std::sync::atomic::AtomicBool,
}

/// The encoding side of an [`Outbox`]; dropping it ends the writer once
/// everything handed over is written.
pub struct OutboxSender(std::sync::Arc<Outbox>);

/// Most capacity a writer keeps between writes.
const OUTBOX_KEEP: usize = 1 << 20;

impl Outbox {
    /// A new outbox: the sender, and what [`write_outbox`] takes.
    pub fn new() -> (OutboxSender, std::sync::Arc<Outbox>) {
        let outbox = std::sync::Arc::new(Outbox {
            buffer: std::sync::Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        (OutboxSender(outbox.clone()), outbox)
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl OutboxSender {
    /// Hands `frames` over to the writer; `frames` comes back empty (with
    /// the capacity of a buffer the writer is done with, when it can).
    pub fn send(&self, frames: &mut Vec<u8>) {
        if frames.is_empty() {
            return;
        }
        {
            let mut buffer = self.0.buffer();
            if buffer.is_empty() {
                std::mem::swap(&mut *buffer, frames);
            } else {
                buffer.extend_from_slice(frames);
                frames.clear();
            }
        }
        self.0.wake.notify_one();
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.wake.notify_one();
    }
}

/// Writes what `outbox` is handed to one end of a link, everything waiting
/// in one write, until its sender is dropped (then shuts the stream down)
/// or the stream fails.
pub async fn write_outbox(
    mut writer: impl tokio::io::AsyncWrite + Unpin,
    outbox: std::sync::Arc<Outbox>,
) {
    use tokio::io::AsyncWriteExt as _;
    let mut own = Vec::new();
    loop {
        let closed = {
            let mut buffer = outbox.buffer();
            std::mem::swap(&mut *buffer, &mut own);
            own.is_empty() && outbox.closed.load(std::sync::atomic::Ordering::Acquire)
        };
        if closed {
            break;
        }
        if own.is_empty() {
            outbox.wake.notified().await;
            continue;
        }
        if writer.write_all(&own).await.is_err() {
            return;
        }
        own.clear();
        if own.capacity() > OUTBOX_KEEP {
            own.shrink_to(OUTBOX_KEEP);
        }
    }
    let _ = writer.shutdown().await;
}

/// Reads frames from one end of a link into one buffer, handing out each
/// frame's body without copying it (a frame is a slice of the buffer; the
/// buffer's space is reused once the frames read from it are dropped).
pub struct FrameReader<R> {
    reader: R,
    buffer: BytesMut,
}

/// How much a link reader asks the socket for at a time.
const READ_CHUNK: usize = 64 << 10;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames from `reader`.
    pub fn new(reader: R) -> Self {
        FrameReader {
            reader,
            buffer: BytesMut::new(),
        }
    }

    /// The next frame's body if it was already read whole, without
    /// reading; `Err` with how many bytes it takes otherwise.
    fn buffered(&mut self) -> Result<std::result::Result<Bytes, usize>> {
        let Some(head) = self.buffer.get(..4) else {
            return Ok(Err(4));
        };
        let length = u32::from_be_bytes(head.try_into().expect("4 bytes")) as usize;
        if length > MAX_FRAME {
            bail!("a link frame of {length} bytes is over the limit");
        }
        if self.buffer.len() < 4 + length {
            return Ok(Err(4 + length));
        }
        self.buffer.advance(4);
        Ok(Ok(self.buffer.split_to(length).freeze()))
    }

    /// The next frame's body if the last read brought it whole (no read).
    pub fn try_next(&mut self) -> Result<Option<Bytes>> {
        Ok(self.buffered()?.ok())
    }

    /// The next frame's body; `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            let wanted = match self.buffered()? {
                Ok(frame) => return Ok(Some(frame)),
                Err(wanted) => wanted,
            };
            self.buffer
                .reserve((wanted - self.buffer.len()).max(READ_CHUNK));
            match self.reader.read_buf(&mut self.buffer).await {
                Ok(0) if self.buffer.is_empty() => return Ok(None),
                Ok(0) => bail!("the link closed inside a frame"),
                Ok(_) => {}
                Err(e) => return Err(e).context("cannot read from the link"),
            }
        }
    }
}

impl Event {
    /// Appends this event as a [`ToBusiness::Event`] frame (without
    /// boxing it first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        frame(out, |e| event_body(e, self));
    }
}

/// Writes an event's frame body.
fn event_body(e: &mut Encoder<'_>, event: &Event) {
    let kind = match event.kind {
        EventKind::Connect => 0,
        EventKind::Message => 1,
        EventKind::Close => 2,
    };
    e.u8(kind)
        .id(event.client)
        .u64(event.seq)
        .bytes(&event.session)
        .bytes(&event.peer)
        .kind(event.message_kind)
        .bytes(&event.data);
    if let Some(handshake) = &event.handshake {
        e.bytes(handshake.path.as_bytes())
            .bytes(handshake.subprotocol.as_bytes())
            .u32(handshake.headers.len() as u32);
        for (name, value) in &handshake.headers {
            e.bytes(name.as_bytes()).bytes(value);
        }
    }
}

impl ToBusiness {
    /// Appends this message as a frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        frame(out, |e| match self {
            ToBusiness::Event(event) => event_body(e, event),
            ToBusiness::Retired => {
                e.u8(4);
            }
            ToBusiness::Answer { request, answer } => {
                e.u8(3).u64(*request);
                match answer {
                    Answer::Bool(b) => e.u8(0).u8(u8::from(*b)),
                    Answer::Count(n) => e.u8(1).u64(*n),
                    Answer::Ids(ids) => e.u8(2).ids(ids),
                    Answer::Session(None) => e.u8(3),
                    Answer::Session(Some(s)) => e.u8(4).bytes(s),
                };
            }
        })
    }

    /// Reads a frame body written by [`ToBusiness::encode`]; an event's
    /// bytes share `body`'s buffer.
    pub fn decode(body: &Bytes) -> Result<ToBusiness> {
        let mut d = Decoder::sharing(body);
        let tag = d.u8()?;
        let kind = match tag {
            0 => EventKind::Connect,
            1 => EventKind::Message,
            2 => EventKind::Close,
            3 => {
                let request = d.u64()?;
                let answer = match d.u8()? {
                    0 => Answer::Bool(d.u8()? != 0),
                    1 => Answer::Count(d.u64()?),
                    2 => Answer::Ids(d.ids()?),
                    3 => Answer::Session(None),
                    4 => Answer::Session(Some(d.bytes()?)),
                    other => bail!("unknown answer {other} on the link"),
                };
                return Ok(ToBusiness::Answer { request, answer });
            }
            4 => return Ok(ToBusiness::Retired),
            other => bail!("unknown gateway message {other} on the link"),
        };
        let client = d.id()?;
        let seq = d.u64()?;
        let session = d.bytes()?;
        let peer = d.utf8()?;
        let message_kind = d.kind()?;
        let data = d.bytes()?;
        let handshake = if kind == EventKind::Connect {
            let path = d.string()?;
            let subprotocol = d.string()?;
            let count = d.u32()? as usize;
            let mut headers = Vec::with_capacity(count.min(256));
            for _ in 0..count {
                headers.push((d.string()?, d.bytes()?.to_vec()));
            }
            Some(Box::new(Handshake {
                path,
                subprotocol,
                headers,
            }))
        } else {
            None
        };
        Ok(ToBusiness::Event(Box::new(Event {
            kind,
            client,
            seq,
            session,
            peer,
            message_kind,
            data,
            handshake,
        })))
    }
}

/// Appends a [`FromBusiness::Send`] frame for `data` without making the
/// message first (the handler's bytes are copied once, into `out`).
pub fn encode_send(out: &mut Vec<u8>, target: &Target, kind: MessageKind, data: &[u8]) {
    frame(out, |e| send_body(e, target, kind, data));
}

fn send_body(e: &mut Encoder<'_>, target: &Target, kind: MessageKind, data: &[u8]) {
    e.u8(3);
    match target {
        Target::Client(id) => e.u8(0).id(*id),
        Target::All { include, exclude } => {
            e.u8(1).u8(u8::from(include.is_some()));
            e.ids(include.as_deref().unwrap_or_default()).ids(exclude)
        }
        Target::Uid(uid) => e.u8(2).bytes(uid.as_bytes()),
        Target::Group { group, exclude } => e.u8(3).bytes(group.as_bytes()).ids(exclude),
    };
    e.kind(kind).bytes(data);
}

impl FromBusiness {
    /// Appends this message as a frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        frame(out, |e| match self {
            FromBusiness::Ready => {
                e.u8(0);
            }
            FromBusiness::Retiring => {
                e.u8(1);
            }
            FromBusiness::Ack => {
                e.u8(2);
            }
            FromBusiness::Send { target, kind, data } => send_body(e, target, *kind, data),
            FromBusiness::Close {
                client,
                code,
                reason,
            } => {
                e.u8(4).id(*client).u16(*code).bytes(reason.as_bytes());
            }
            FromBusiness::BindUid(id, s) => {
                e.u8(5).id(*id).bytes(s.as_bytes());
            }
            FromBusiness::UnbindUid(id, s) => {
                e.u8(6).id(*id).bytes(s.as_bytes());
            }
            FromBusiness::JoinGroup(id, s) => {
                e.u8(7).id(*id).bytes(s.as_bytes());
            }
            FromBusiness::LeaveGroup(id, s) => {
                e.u8(8).id(*id).bytes(s.as_bytes());
            }
            FromBusiness::SetSession(id, s) => {
                e.u8(9).id(*id).bytes(s);
            }
            FromBusiness::Pusher => {
                e.u8(11);
            }
            FromBusiness::Query { request, query } => {
                e.u8(10).u64(*request);
                match query {
                    Query::IsOnline(id) => e.u8(0).id(*id),
                    Query::ClientCount => e.u8(1),
                    Query::GroupClientIds(g) => e.u8(2).bytes(g.as_bytes()),
                    Query::UidClientIds(u) => e.u8(3).bytes(u.as_bytes()),
                    Query::Session(id) => e.u8(4).id(*id),
                };
            }
        })
    }

    /// Reads a frame body written by [`FromBusiness::encode`].
    pub fn decode(body: &[u8]) -> Result<FromBusiness> {
        let mut d = Decoder::new(body);
        Ok(match d.u8()? {
            0 => FromBusiness::Ready,
            1 => FromBusiness::Retiring,
            2 => FromBusiness::Ack,
            3 => {
                let target = match d.u8()? {
                    0 => Target::Client(d.id()?),
                    1 => {
                        let given = d.u8()? != 0;
                        let include = d.ids()?;
                        Target::All {
                            include: given.then_some(include),
                            exclude: d.ids()?,
                        }
                    }
                    2 => Target::Uid(d.string()?),
                    3 => Target::Group {
                        group: d.string()?,
                        exclude: d.ids()?,
                    },
                    other => bail!("unknown send target {other} on the link"),
                };
                FromBusiness::Send {
                    target,
                    kind: d.kind()?,
                    data: d.bytes()?,
                }
            }
            4 => FromBusiness::Close {
                client: d.id()?,
                code: d.u16()?,
                reason: d.string()?,
            },
            5 => FromBusiness::BindUid(d.id()?, d.string()?),
            6 => FromBusiness::UnbindUid(d.id()?, d.string()?),
            7 => FromBusiness::JoinGroup(d.id()?, d.string()?),
            8 => FromBusiness::LeaveGroup(d.id()?, d.string()?),
            9 => FromBusiness::SetSession(d.id()?, d.bytes()?),
            10 => {
                let request = d.u64()?;
                let query = match d.u8()? {
                    0 => Query::IsOnline(d.id()?),
                    1 => Query::ClientCount,
                    2 => Query::GroupClientIds(d.string()?),
                    3 => Query::UidClientIds(d.string()?),
                    4 => Query::Session(d.id()?),
                    other => bail!("unknown query {other} on the link"),
                };
                FromBusiness::Query { request, query }
            }
            11 => FromBusiness::Pusher,
            other => bail!("unknown worker message {other} on the link"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(counter: u64) -> ClientId {
        ClientId {
            gateway: 1,
            nonce: 7,
            counter,
        }
    }

    async fn read_all(bytes: &[u8]) -> Vec<Bytes> {
        let mut reader = FrameReader::new(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = reader.next().await.unwrap() {
            frames.push(frame);
        }
        frames
    }

    #[tokio::test]
    async fn every_message_reads_back_as_written() {
        let to_business = vec![
            ToBusiness::Event(Box::new(Event {
                kind: EventKind::Connect,
                client: id(1),
                seq: 0,
                session: Bytes::new(),
                peer: Bytes::from_static(b"127.0.0.1:5000"),
                message_kind: MessageKind::Binary,
                data: Bytes::new(),
                handshake: Some(Box::new(Handshake {
                    path: "/chat?x=1".into(),
                    subprotocol: "v1".into(),
                    headers: vec![("origin".into(), b"http://a".to_vec())],
                })),
            })),
            ToBusiness::Event(Box::new(Event {
                kind: EventKind::Message,
                client: id(1),
                seq: 1,
                session: Bytes::from_static(b"s"),
                peer: Bytes::from_static(b"p"),
                message_kind: MessageKind::Text,
                data: Bytes::from_static(b"hello"),
                handshake: None,
            })),
            ToBusiness::Answer {
                request: 9,
                answer: Answer::Ids(vec![id(1), id(2)]),
            },
            ToBusiness::Retired,
            ToBusiness::Answer {
                request: 10,
                answer: Answer::Session(Some(Bytes::from_static(b"x"))),
            },
        ];
        let mut out = Vec::new();
        for m in &to_business {
            m.encode(&mut out);
        }
        let back: Vec<ToBusiness> = read_all(&out)
            .await
            .iter()
            .map(|f| ToBusiness::decode(f).unwrap())
            .collect();
        assert_eq!(back, to_business);

        let from_business = vec![
            FromBusiness::Ready,
            FromBusiness::Pusher,
            FromBusiness::Ack,
            FromBusiness::Send {
                target: Target::All {
                    include: Some(vec![]),
                    exclude: vec![id(3)],
                },
                kind: MessageKind::Text,
                data: Bytes::from_static(b"hi"),
            },
            FromBusiness::Send {
                target: Target::Group {
                    group: "room".into(),
                    exclude: vec![],
                },
                kind: MessageKind::Binary,
                data: Bytes::from_static(b"\0"),
            },
            FromBusiness::Close {
                client: id(4),
                code: 1000,
                reason: "bye".into(),
            },
            FromBusiness::SetSession(id(5), Bytes::from_static(b"name")),
            FromBusiness::Query {
                request: 1,
                query: Query::UidClientIds("ann".into()),
            },
        ];
        let mut out = Vec::new();
        for m in &from_business {
            m.encode(&mut out);
        }
        let back: Vec<FromBusiness> = read_all(&out)
            .await
            .iter()
            .map(|f| FromBusiness::decode(f).unwrap())
            .collect();
        assert_eq!(back, from_business);
    }

    #[tokio::test]
    async fn frames_split_across_reads_come_out_whole_and_a_cut_frame_is_an_error() {
        let mut out = Vec::new();
        for n in 0..50u64 {
            FromBusiness::SetSession(id(n), Bytes::from(vec![n as u8; n as usize * 37]))
                .encode(&mut out);
        }
        // A pipe that holds 7 bytes: every read gets a piece of a frame.
        let (mut tx, rx) = tokio::io::duplex(7);
        let written = out.clone();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            tx.write_all(&written[..written.len() - 3]).await.unwrap();
        });
        let mut reader = FrameReader::new(rx);
        for n in 0..49u64 {
            let frame = reader.next().await.unwrap().expect("a frame");
            assert_eq!(
                FromBusiness::decode(&frame).unwrap(),
                FromBusiness::SetSession(id(n), Bytes::from(vec![n as u8; n as usize * 37]))
            );
        }
        assert!(reader.next().await.is_err(), "the last frame was cut");
        writer.await.unwrap();

        let mut over = FrameReader::new(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(over.next().await.is_err(), "a frame over the limit");
        let mut empty = FrameReader::new(&[][..]);
        assert!(empty.next().await.unwrap().is_none(), "a clean end");
    }

    #[test]
    fn truncated_frames_are_errors() {
        let mut out = Vec::new();
        FromBusiness::BindUid(id(1), "ann".into()).encode(&mut out);
        assert!(FromBusiness::decode(&out[4..out.len() - 1]).is_err());
        assert!(ToBusiness::decode(&Bytes::from_static(&[3, 0])).is_err());
    }
}
