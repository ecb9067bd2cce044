//! One WebSocket client of a gateway (RFC 6455, by tokio-tungstenite):
//! handshake, messages to the hub, the hub's messages out, heartbeat.
//!
//! tungstenite validates the frames (masking, fragmentation, UTF-8 of text,
//! sizes) and answers pings and the close handshake; this task turns its
//! errors into the close code the RFC names (1002 protocol, 1007 invalid
//! UTF-8, 1009 too big) and a refused handshake into an HTTP answer (400,
//! 426 with the version we speak, 403 for an origin not allowed), which
//! tungstenite leaves to its caller.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use handler_api::MessageKind;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{error::ProtocolError, Error, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::hub::{
    take_credit, Burst, ClientHandle, ClientShared, Input, Outbound, CLOSE_SLOW, MAX_BURST,
};
use super::lazy_read::LazyRead;
use super::Limits;
use crate::protocol::link::Handshake;

/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// tungstenite's read buffer per connection, allocated up front and kept
/// (its default, 128 KiB, is far too much for a gateway holding many idle
/// clients). Small: the socket is read through a [`LazyRead`], whose
/// buffer exists only while it holds data, so one syscall still takes a
/// whole burst and tungstenite copies it out in pieces of this size.
const READ_BUFFER: usize = 256;

/// The client's socket as tungstenite sees it.
type Socket<'a> = LazyRead<&'a mut TcpStream>;

/// Serves one client until it or the hub closes it.
// The handshake callback's error type is tungstenite's.
#[allow(clippy::result_large_err)]
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    key: u64,
    limits: Arc<Limits>,
    hub: mpsc::UnboundedSender<Input>,
) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(limits.max_message_size))
        .max_frame_size(Some(limits.max_message_size))
        .read_buffer_size(READ_BUFFER);
    let mut handshake = Handshake::default();
    let callback = |request: &Request, response: Response| {
        check_handshake(request, response, &limits, &mut handshake)
    };
    // Boxed: the handshake's state is large and only lives until it is
    // done, while this task's own state lives as long as the connection.
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        Box::pin(tokio_tungstenite::accept_hdr_async_with_config(
            LazyRead::new(&mut stream),
            callback,
            Some(config),
        )),
    )
    .await;
    let ws = match accepted {
        Ok(Ok(ws)) => ws,
        Ok(Err(Error::Protocol(error))) => {
            refuse(&mut stream, &error).await;
            return;
        }
        _ => return,
    };
    let (handle, shared) = ClientHandle::new();
    if hub
        .send(Input::Connected {
            key,
            peer: peer.to_string(),
            handshake,
            handle,
        })
        .is_err()
    {
        return;
    }
    let code = tokio::select! {
        code = converse(ws, key, &limits, &hub, &shared) => code,
        () = shared.killed() => Some(CLOSE_SLOW),
    };
    let _ = hub.send(Input::Gone(key, code));
}

/// Checks the origin, keeps what `on_connect` needs, and accepts the
/// first subprotocol offered.
#[allow(clippy::result_large_err)]
fn check_handshake(
    request: &Request,
    mut response: Response,
    limits: &Limits,
    handshake: &mut Handshake,
) -> Result<Response, ErrorResponse> {
    let origin = request
        .headers()
        .get("origin")
        .and_then(|o| o.to_str().ok());
    if let (Some(allowed), Some(origin)) = (&limits.origins, origin) {
        if !allowed.iter().any(|a| a == origin) {
            let mut refusal = ErrorResponse::new(Some("origin not allowed\n".to_owned()));
            *refusal.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::FORBIDDEN;
            return Err(refusal);
        }
    }
    let subprotocol = request
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|p| p.to_str().ok())
        .and_then(|p| p.split(',').next())
        .map(str::trim)
        .unwrap_or("");
    if !subprotocol.is_empty() {
        if let Ok(value) = subprotocol.parse() {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", value);
        }
    }
    *handshake = Handshake {
        path: request.uri().to_string(),
        subprotocol: subprotocol.to_owned(),
        headers: request
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect(),
    };
    Ok(response)
}

/// Answers a request that is not a WebSocket handshake we accept.
async fn refuse(stream: &mut TcpStream, error: &ProtocolError) {
    let answer: &[u8] = match error {
        ProtocolError::MissingUpgradeWebSocketHeader
        | ProtocolError::MissingConnectionUpgradeHeader => {
            b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n"
        }
        ProtocolError::MissingSecWebSocketVersionHeader => {
            b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
        _ => b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    };
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
}

/// The connection's life after the handshake; returns the close code
/// sent or received (`None` when it just ended).
async fn converse(
    mut ws: WebSocketStream<Socket<'_>>,
    key: u64,
    limits: &Limits,
    hub: &mpsc::UnboundedSender<Input>,
    shared: &ClientShared,
) -> Option<u16> {
    let mut heartbeat = tokio::time::interval(limits.ping_interval);
    heartbeat.reset();
    let mut missed = 0u32;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            incoming = ws.next() => {
                last_heard = Instant::now();
                missed = 0;
                // Everything this read brought goes to the hub as one input
                // (read by a plain function: nothing of it is kept across
                // an await, so the task stays as small as before).
                let (waiting, end) = read_burst(&mut ws, incoming, key, hub, shared);
                if let Some((kind, data)) = waiting {
                    take_credit(&shared.credit).await;
                    let _ = hub.send(Input::Message(key, kind, data));
                }
                match end {
                    None => {}
                    Some(End::Closed(code)) => {
                        // tungstenite queued the reply; send it.
                        let _ = ws.close(None).await;
                        return Some(code);
                    }
                    Some(End::Failed(error)) => return fail(&mut ws, &error).await,
                    Some(End::Gone) => return None,
                }
            }
            outgoing = shared.recv() => {
                let mut next = outgoing?;
                loop {
                    match next {
                        Outbound::Message(kind, data) => {
                            shared.pending.fetch_sub(data.len(), Ordering::Relaxed);
                            if ws.feed(frame(kind, data)).await.is_err() {
                                return None;
                            }
                        }
                        Outbound::Close(code, reason) => {
                            return close(&mut ws, code, &reason).await;
                        }
                    }
                    match shared.try_recv() {
                        Some(more) => next = more,
                        None => break,
                    }
                }
                if ws.flush().await.is_err() {
                    return None;
                }
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() >= limits.idle_timeout {
                    return close(&mut ws, 1000, "idle").await;
                }
                if missed >= limits.missed_pongs {
                    return close(&mut ws, 1001, "no pong").await;
                }
                missed += 1;
                if ws.send(Message::Ping(Bytes::new())).await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// How a client's connection ended while reading.
enum End {
    /// It sent a close frame with this code.
    Closed(u16),
    /// It broke the protocol.
    Failed(Error),
    /// It just went away.
    Gone,
}

/// Passes on `incoming` and whatever else was already read, up to
/// [`MAX_BURST`] messages, as one input. Returns a message that waits for
/// credit (every earlier one was passed on), and how the connection ended
/// if it did.
fn read_burst(
    ws: &mut WebSocketStream<Socket<'_>>,
    incoming: Option<Result<Message, Error>>,
    key: u64,
    hub: &mpsc::UnboundedSender<Input>,
    shared: &ClientShared,
) -> (Option<(MessageKind, Bytes)>, Option<End>) {
    let mut burst = Burst::default();
    let mut next = Some(incoming);
    let mut waiting = None;
    let mut end = None;
    while let Some(incoming) = next.take() {
        let (kind, data) = match incoming {
            Some(Ok(Message::Text(text))) => (MessageKind::Text, Bytes::from(text)),
            Some(Ok(Message::Binary(data))) => (MessageKind::Binary, data),
            Some(Ok(Message::Close(frame))) => {
                end = Some(End::Closed(frame.map_or(1005, |f| u16::from(f.code))));
                break;
            }
            Some(Err(error)) => {
                end = Some(End::Failed(error));
                break;
            }
            None => {
                end = Some(End::Gone);
                break;
            }
            // Pings and pongs: tungstenite answered.
            Some(Ok(_)) => {
                next = ws.next().now_or_never();
                continue;
            }
        };
        match shared.credit.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                // Out of credit: what is taken goes first.
                waiting = Some((kind, data));
                break;
            }
        }
        burst.push(kind, data);
        if burst.len() < MAX_BURST {
            next = ws.next().now_or_never();
        }
    }
    burst.pass_on(key, hub);
    (waiting, end)
}

fn frame(kind: MessageKind, data: Bytes) -> Message {
    match kind {
        MessageKind::Text => match Utf8Bytes::try_from(data.clone()) {
            Ok(text) => Message::Text(text),
            Err(_) => Message::Binary(data),
        },
        MessageKind::Binary => Message::Binary(data),
    }
}

/// Sends a close frame and waits briefly for the client's.
async fn close(ws: &mut WebSocketStream<Socket<'_>>, code: u16, reason: &str) -> Option<u16> {
    // A close frame's reason is at most 123 bytes.
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason[..end].into(),
    };
    if ws.close(Some(frame)).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
    Some(code)
}

/// Closes with the code that names what the client did wrong.
async fn fail(ws: &mut WebSocketStream<Socket<'_>>, error: &Error) -> Option<u16> {
    let code = match error {
        Error::Capacity(_) => 1009,
        Error::Utf8(_) => 1007,
        // The client just went away.
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => return None,
        Error::Protocol(_) => 1002,
        _ => return None,
    };
    tracing::debug!(%error, code, "closing a client for bad input");
    close(ws, code, &error.to_string()).await
}
