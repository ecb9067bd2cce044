//! Long-lived connections (WebSocket, newline-delimited text): what crosses
//! the boundary for each client event, and the gateway calls a handler makes.
//!
//! A gateway process of the host holds the client connections; a business
//! worker gets each client's events in order and calls the handler's
//! `on_connect`, `on_message` and `on_close` with a [`Gateway`] to act on
//! any client: send, close, bind a uid, join a group, keep a session. The
//! calls are a table of host functions ([`GatewayCalls`]), checked by
//! abi_stable like the rest of the handler's interface.

use std::fmt;
use std::sync::OnceLock;

use abi_stable::{
    std_types::{ROption, RSlice, RStr, RVec},
    StableAbi,
};

use crate::Header;

/// A client of a gateway group, unique across its gateway processes and
/// their restarts: the gateway's index, that gateway process's boot nonce,
/// and a counter.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId {
    /// Which gateway process of the group holds the client.
    pub gateway: u32,
    /// Random per gateway process start.
    pub nonce: u32,
    /// Counts the gateway process's clients.
    pub counter: u64,
}

impl fmt::Display for ClientId {
    /// 28 hex digits: gateway, nonce, counter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}{:08x}{:016x}",
            self.gateway, self.nonce, self.counter
        )
    }
}

/// Why a text is not a [`ClientId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdError(String);

impl fmt::Display for ClientIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not a client id (28 hex digits)", self.0)
    }
}

impl std::error::Error for ClientIdError {}

impl std::str::FromStr for ClientId {
    type Err = ClientIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ClientIdError(text.to_owned());
        if text.len() != 28 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(error());
        }
        let parse = |range: std::ops::Range<usize>| u64::from_str_radix(&text[range], 16);
        Ok(ClientId {
            gateway: parse(0..4).map_err(|_| error())? as u32,
            nonce: parse(4..12).map_err(|_| error())? as u32,
            counter: parse(12..28).map_err(|_| error())?,
        })
    }
}

/// Whether a message is text (valid UTF-8) or binary.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A text message.
    Text,
    /// A binary message (text lines on the `text` protocol are text).
    Binary,
}

/// One client event as it crosses the boundary.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct ClientEvent<'a> {
    /// The client.
    pub client: ClientId,
    /// The client's session as the gateway holds it (empty when unset).
    pub session: RSlice<'a, u8>,
    /// The message's kind (`on_message` only).
    pub kind: MessageKind,
    /// The message (`on_message` only).
    pub data: RSlice<'a, u8>,
    /// The client's address.
    pub peer: RStr<'a>,
    /// The request path of the WebSocket handshake (`on_connect` only).
    pub path: RStr<'a>,
    /// The subprotocol the client asked for first, or empty.
    pub subprotocol: RStr<'a>,
    /// The handshake's request headers (`on_connect` only).
    pub headers: RSlice<'a, Header<'a>>,
}

/// The host's gateway functions, given to every connection event.
///
/// abi_stable compares every field of the host's layout with the
/// library's, and refuses a library with fewer: a call appended here would
/// turn away handlers built before it. Calls added later go in a table of
/// their own, as the connection entry points did ([`crate::ConnectionExport`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = GatewayCallsRef)))]
#[sabi(missing_field(panic))]
pub struct GatewayCalls {
    /// Sends a message to one client.
    pub send_to_client: extern "C" fn(client: ClientId, kind: MessageKind, data: RSlice<'_, u8>),
    /// Sends to every client (of `include` only, when it is given), but
    /// not to those in `exclude`.
    pub send_to_all: extern "C" fn(
        kind: MessageKind,
        data: RSlice<'_, u8>,
        include: ROption<RSlice<'_, ClientId>>,
        exclude: RSlice<'_, ClientId>,
    ),
    /// Closes a client's connection with a close code and reason.
    pub close_client: extern "C" fn(client: ClientId, code: u16, reason: RStr<'_>),
    /// Binds a client to a user id (a uid may have several clients).
    pub bind_uid: extern "C" fn(client: ClientId, uid: RStr<'_>),
    /// Unbinds a client from a user id.
    pub unbind_uid: extern "C" fn(client: ClientId, uid: RStr<'_>),
    /// Sends to every client bound to `uid`.
    pub send_to_uid: extern "C" fn(uid: RStr<'_>, kind: MessageKind, data: RSlice<'_, u8>),
    /// Adds a client to a group.
    pub join_group: extern "C" fn(client: ClientId, group: RStr<'_>),
    /// Removes a client from a group.
    pub leave_group: extern "C" fn(client: ClientId, group: RStr<'_>),
    /// Sends to every client in `group` but those in `exclude`.
    pub send_to_group: extern "C" fn(
        group: RStr<'_>,
        kind: MessageKind,
        data: RSlice<'_, u8>,
        exclude: RSlice<'_, ClientId>,
    ),
    /// Replaces a client's session.
    pub set_session: extern "C" fn(client: ClientId, session: RSlice<'_, u8>),
    /// Whether a client is connected.
    pub is_online: extern "C" fn(client: ClientId) -> bool,
    /// How many clients are connected, on every gateway of the group.
    pub client_count: extern "C" fn() -> u64,
    /// The clients in a group.
    pub group_client_ids: extern "C" fn(group: RStr<'_>) -> RVec<ClientId>,
    /// The clients bound to a uid.
    pub uid_client_ids: extern "C" fn(uid: RStr<'_>) -> RVec<ClientId>,
    /// A client's session; `None` if the client is not connected.
    #[sabi(last_prefix_field)]
    pub session: extern "C" fn(client: ClientId) -> ROption<RVec<u8>>,
}

/// A message to or from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The message's bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
        }
    }

    /// The message as text, if it is text.
    pub fn as_text(&self) -> Option<&'a str> {
        match self {
            Message::Text(text) => Some(text),
            Message::Binary(_) => None,
        }
    }

    fn raw(&self) -> (MessageKind, RSlice<'a, u8>) {
        match self {
            Message::Text(text) => (MessageKind::Text, text.as_bytes().into()),
            Message::Binary(bytes) => (MessageKind::Binary, (*bytes).into()),
        }
    }
}

impl<'a> From<&'a str> for Message<'a> {
    fn from(text: &'a str) -> Self {
        Message::Text(text)
    }
}

impl<'a> From<&'a String> for Message<'a> {
    fn from(text: &'a String) -> Self {
        Message::Text(text)
    }
}

impl<'a> From<&'a [u8]> for Message<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Message::Binary(bytes)
    }
}

/// The client an event is about, as the handler sees it.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    raw: &'a ClientEvent<'a>,
}

impl<'a> Client<'a> {
    /// Wraps the raw event.
    pub fn new(raw: &'a ClientEvent<'a>) -> Self {
        Client { raw }
    }

    /// The client's id.
    pub fn id(&self) -> ClientId {
        self.raw.client
    }

    /// The client's session as it was when the event left the gateway.
    pub fn session(&self) -> &'a [u8] {
        self.raw.session.as_slice()
    }

    /// The client's address.
    pub fn peer(&self) -> &'a str {
        self.raw.peer.as_str()
    }

    /// The handshake's request path (`on_connect` only; else empty).
    pub fn path(&self) -> &'a str {
        self.raw.path.as_str()
    }

    /// The subprotocol the client asked for first (`on_connect` only).
    pub fn subprotocol(&self) -> Option<&'a str> {
        Some(self.raw.subprotocol.as_str()).filter(|s| !s.is_empty())
    }

    /// A handshake request header, by case-insensitive name (`on_connect`
    /// only), if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.raw
            .headers
            .as_slice()
            .iter()
            .find(|h| h.name.as_str().eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value.as_slice()).ok())
    }

    /// The message of an `on_message` event.
    pub fn message(&self) -> Message<'a> {
        let data = self.raw.data.as_slice();
        match self.raw.kind {
            MessageKind::Text => match std::str::from_utf8(data) {
                Ok(text) => Message::Text(text),
                Err(_) => Message::Binary(data),
            },
            MessageKind::Binary => Message::Binary(data),
        }
    }
}

/// What a handler can do to the clients of its gateway group.
#[derive(Clone, Copy)]
pub struct Gateway {
    calls: GatewayCallsRef,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Gateway")
    }
}

impl Gateway {
    /// Wraps the host's call table.
    pub fn new(calls: GatewayCallsRef) -> Self {
        Gateway { calls }
    }

    /// Sends a message to one client (dropped if it is gone).
    pub fn send_to_client<'m>(&self, client: ClientId, message: impl Into<Message<'m>>) {
        let (kind, data) = message.into().raw();
        (self.calls.send_to_client())(client, kind, data)
    }

    /// Sends a message to every client of the group.
    pub fn send_to_all<'m>(&self, message: impl Into<Message<'m>>) {
        let (kind, data) = message.into().raw();
        (self.calls.send_to_all())(kind, data, ROption::RNone, RSlice::EMPTY)
    }

    /// Sends to the clients of `include` (all when `None`) except those
    /// of `exclude`.
    pub fn send_to_all_but<'m>(
        &self,
        message: impl Into<Message<'m>>,
        include: Option<&[ClientId]>,
        exclude: &[ClientId],
    ) {
        let (kind, data) = message.into().raw();
        let include = match include {
            Some(ids) => ROption::RSome(ids.into()),
            None => ROption::RNone,
        };
        (self.calls.send_to_all())(kind, data, include, exclude.into())
    }

    /// Closes a client with a close code (WebSocket; e.g. 1000) and reason.
    pub fn close_client(&self, client: ClientId, code: u16, reason: &str) {
        (self.calls.close_client())(client, code, reason.into())
    }

    /// Binds a client to a user id.
    pub fn bind_uid(&self, client: ClientId, uid: &str) {
        (self.calls.bind_uid())(client, uid.into())
    }

    /// Unbinds a client from a user id.
    pub fn unbind_uid(&self, client: ClientId, uid: &str) {
        (self.calls.unbind_uid())(client, uid.into())
    }

    /// Sends to every client bound to `uid`.
    pub fn send_to_uid<'m>(&self, uid: &str, message: impl Into<Message<'m>>) {
        let (kind, data) = message.into().raw();
        (self.calls.send_to_uid())(uid.into(), kind, data)
    }

    /// Adds a client to a group.
    pub fn join_group(&self, client: ClientId, group: &str) {
        (self.calls.join_group())(client, group.into())
    }

    /// Removes a client from a group.
    pub fn leave_group(&self, client: ClientId, group: &str) {
        (self.calls.leave_group())(client, group.into())
    }

    /// Sends to every client in `group` except those of `exclude`.
    pub fn send_to_group<'m>(
        &self,
        group: &str,
        message: impl Into<Message<'m>>,
        exclude: &[ClientId],
    ) {
        let (kind, data) = message.into().raw();
        (self.calls.send_to_group())(group.into(), kind, data, exclude.into())
    }

    /// Replaces a client's session (kept by the gateway across reloads).
    pub fn set_session(&self, client: ClientId, session: &[u8]) {
        (self.calls.set_session())(client, session.into())
    }

    /// A client's session, `None` if the client is not connected.
    pub fn session(&self, client: ClientId) -> Option<Vec<u8>> {
        (self.calls.session())(client)
            .into_option()
            .map(RVec::into_vec)
    }

    /// Whether a client is connected.
    pub fn is_online(&self, client: ClientId) -> bool {
        (self.calls.is_online())(client)
    }

    /// How many clients the group's gateways hold.
    pub fn client_count(&self) -> u64 {
        (self.calls.client_count())()
    }

    /// The clients in a group.
    pub fn group_client_ids(&self, group: &str) -> Vec<ClientId> {
        (self.calls.group_client_ids())(group.into()).into_vec()
    }

    /// How many clients are in a group.
    pub fn group_client_count(&self, group: &str) -> usize {
        self.group_client_ids(group).len()
    }

    /// The clients bound to a uid.
    pub fn client_ids_of_uid(&self, uid: &str) -> Vec<ClientId> {
        (self.calls.uid_client_ids())(uid.into()).into_vec()
    }

    /// Whether any client is bound to a uid.
    pub fn is_uid_online(&self, uid: &str) -> bool {
        !self.client_ids_of_uid(uid).is_empty()
    }
}

/// The gateway group this library's HTTP handler pushes to (each library
/// has its own copy of this static).
static PUSH: OnceLock<GatewayCallsRef> = OnceLock::new();

/// Called by the host through the connection module.
#[doc(hidden)]
pub fn attach_gateway(calls: GatewayCallsRef) {
    let _ = PUSH.set(calls);
}

/// The gateway group an HTTP group pushes to (`push = "chat"` in its
/// config), for GatewayWorker's `GatewayClient` uses: "POST /notify" in a
/// web app reaching browsers. `None` in groups without `push`. Available
/// from `start` on.
pub fn gateway() -> Option<Gateway> {
    PUSH.get().copied().map(Gateway::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_print_and_parse_back() {
        let id = ClientId {
            gateway: 2,
            nonce: 0xdead_beef,
            counter: 42,
        };
        let text = id.to_string();
        assert_eq!(text, "0002deadbeef000000000000002a");
        assert_eq!(text.parse::<ClientId>(), Ok(id));
        assert!("xyz".parse::<ClientId>().is_err());
    }
}
