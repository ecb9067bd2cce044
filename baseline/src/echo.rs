//! The long-lived-connection yardstick: a WebSocket echo and a
//! newline-delimited text echo, served straight from the worker process with
//! no gateway hop. This is what `sample-echo` behind the gateway will be
//! measured against (issue #14): each message goes back to its sender, and a
//! message that starts with `b` goes to every client of the same protocol
//! connected to **this worker process** (there is no hop between workers, so
//! a broadcast reaches only the sender's process; run one worker to reach
//! every client).
//!
//! Writes are batched: after a message, whatever input is already readable
//! is handled before one flush, so a client with many messages in flight gets
//! its echoes in few syscalls — the same batching the gateway link will do.
//!
//! WebSocket: tokio-tungstenite over the raw TCP stream (its own handshake,
//! any path); it answers pings and the close handshake itself and refuses
//! invalid UTF-8 in text messages. Text: one message per line (`\n`), at most
//! [`MAX_LINE`] bytes.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Largest WebSocket message accepted, as host's largest request body.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Longest text line accepted, newline included.
pub const MAX_LINE: usize = 64 << 10;
/// tungstenite's read buffer per connection. Its default (128 KiB) costs
/// ~80 KiB of memory per idle connection once touched; 4 KiB is what a
/// gateway holding 50,000 connections can afford, and a flood of small
/// messages runs no slower with it (BENCHMARKS.md).
const READ_BUFFER: usize = 4 << 10;
/// Broadcasts a slow client may fall behind before it misses some.
const BROADCAST_BACKLOG: usize = 1024;

/// Which echo a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// RFC 6455 WebSocket, text and binary messages.
    WebSocket,
    /// Newline-delimited messages over plain TCP.
    Text,
}

/// Accepts connections on `listener` and echoes on each until it closes.
/// Never returns; accept errors (EMFILE and friends) back off briefly.
pub async fn serve(listener: TcpListener, protocol: Protocol) {
    let (everyone, _) = broadcast::channel::<Bytes>(BROADCAST_BACKLOG);
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let everyone = everyone.clone();
                match protocol {
                    Protocol::WebSocket => tokio::spawn(websocket(stream, everyone)),
                    Protocol::Text => tokio::spawn(text(stream, everyone)),
                };
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn is_broadcast(payload: &[u8]) -> bool {
    payload.first() == Some(&b'b')
}

/// One WebSocket client: echo, or broadcast what starts with `b`. Broadcasts
/// go out as text frames. Any protocol or I/O error ends the connection.
async fn websocket(stream: TcpStream, everyone: broadcast::Sender<Bytes>) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .read_buffer_size(READ_BUFFER);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let mut broadcasts = everyone.subscribe();
    loop {
        // `select!` drops the other branch's future before a handler runs,
        // so both may use `ws`; `next()` and `recv()` are cancel-safe.
        tokio::select! {
            message = ws.next() => {
                let Some(Ok(mut message)) = message else { return };
                loop {
                    let fed = match message {
                        Message::Text(_) | Message::Binary(_) if is_broadcast(message_bytes(&message)) => {
                            let _ = everyone.send(Bytes::copy_from_slice(message_bytes(&message)));
                            Ok(())
                        }
                        Message::Text(_) | Message::Binary(_) => ws.feed(message).await,
                        Message::Close(_) => {
                            // tungstenite queued the close reply; send it.
                            let _ = ws.close(None).await;
                            return;
                        }
                        // Pongs are queued by tungstenite and go out with the flush.
                        _ => Ok(()),
                    };
                    if fed.is_err() {
                        return;
                    }
                    match ws.next().now_or_never() {
                        Some(Some(Ok(next))) => message = next,
                        Some(_) => return,
                        None => break,
                    }
                }
                if ws.flush().await.is_err() {
                    return;
                }
            }
            broadcast = broadcasts.recv() => match broadcast {
                Ok(payload) => {
                    let Ok(text) = std::str::from_utf8(&payload) else { continue };
                    if ws.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

fn message_bytes(message: &Message) -> &[u8] {
    match message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        _ => &[],
    }
}

/// One text client: each line back to its sender, or to everyone if it
/// starts with `b`. A line longer than [`MAX_LINE`] ends the connection.
async fn text(stream: TcpStream, everyone: broadcast::Sender<Bytes>) {
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut writer = BufWriter::new(writer);
    let mut broadcasts = everyone.subscribe();
    // Kept across iterations: `read_until` appends what a cancelled call
    // had read, so no byte is lost when the broadcast branch wins.
    let mut line = Vec::new();
    loop {
        tokio::select! {
            read = reader.read_until(b'\n', &mut line) => {
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.len() > MAX_LINE => return,
                    Ok(_) if !line.ends_with(b"\n") => continue,
                    Ok(_) => {}
                }
                if is_broadcast(&line) {
                    let _ = everyone.send(Bytes::copy_from_slice(&line));
                } else if writer.write_all(&line).await.is_err() {
                    return;
                }
                line.clear();
                // Flush only once the input already read is handled.
                if reader.buffer().is_empty() && writer.flush().await.is_err() {
                    return;
                }
            }
            broadcast = broadcasts.recv() => match broadcast {
                Ok(payload) => {
                    if writer.write_all(&payload).await.is_err() || writer.flush().await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
