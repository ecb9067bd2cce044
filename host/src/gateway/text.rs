//! One client of the `text` protocol: newline-delimited messages over TCP,
//! for devices. A line (without its `\n`, and a `\r` before it) is one
//! message, text when it is UTF-8, else binary; each message sent to the
//! client is written with a `\n` after it. A line longer than `max_line`
//! closes the connection; so does silence longer than `idle_timeout`.
//! Close codes are WebSocket's, for the metrics only: the text protocol
//! has no close frame.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use handler_api::MessageKind;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::hub::{take_credit, ClientHandle, ClientShared, Input, Outbound, CLOSE_SLOW};
use super::lazy_read::LazyRead;
use super::Limits;
use crate::protocol::link::Handshake;

/// Serves one client until it or the hub closes it.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    key: u64,
    limits: Arc<Limits>,
    hub: mpsc::UnboundedSender<Input>,
) {
    let (handle, shared) = ClientHandle::new();
    let connected = Input::Connected {
        key,
        peer: peer.to_string(),
        handshake: Handshake::default(),
        handle,
    };
    if hub.send(connected).is_err() {
        return;
    }
    let code = tokio::select! {
        code = converse(stream, key, &limits, &hub, &shared) => code,
        () = shared.killed() => Some(CLOSE_SLOW),
    };
    let _ = hub.send(Input::Gone(key, code));
}

/// Most bytes gathered before a write while passing a burst on.
const WRITE_CHUNK: usize = 64 << 10;

/// No buffer is kept while the client is idle: reads go through a
/// [`LazyRead`], and each burst of outgoing messages is gathered in a
/// buffer that lives until it is written.
async fn converse(
    stream: TcpStream,
    key: u64,
    limits: &Limits,
    hub: &mpsc::UnboundedSender<Input>,
    shared: &ClientShared,
) -> Option<u16> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = LazyRead::new(reader);
    let mut line = Vec::new();
    loop {
        tokio::select! {
            read = async {
                let room = (limits.max_line + 2).saturating_sub(line.len()) as u64;
                (&mut reader).take(room).read_until(b'\n', &mut line).await
            } => {
                match read {
                    Ok(0) | Err(_) => return None,
                    Ok(_) if line.last() != Some(&b'\n') => {
                        if line.len() > limits.max_line + 1 {
                            let _ = writer.write_all(b"error: line too long\n").await;
                            return Some(1009);
                        }
                    }
                    Ok(_) => {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                        if line.len() > limits.max_line {
                            let _ = writer.write_all(b"error: line too long\n").await;
                            return Some(1009);
                        }
                        let data = Bytes::from(std::mem::take(&mut line));
                        let kind = if std::str::from_utf8(&data).is_ok() {
                            MessageKind::Text
                        } else {
                            MessageKind::Binary
                        };
                        take_credit(&shared.credit).await;
                        let _ = hub.send(Input::Message(key, kind, data));
                    }
                }
            }
            outgoing = shared.recv() => {
                let mut next = outgoing?;
                let mut out = Vec::new();
                loop {
                    match next {
                        Outbound::Message(_, data) => {
                            shared.pending.fetch_sub(data.len(), Ordering::Relaxed);
                            out.extend_from_slice(&data);
                            out.push(b'\n');
                            if out.len() >= WRITE_CHUNK {
                                if writer.write_all(&out).await.is_err() {
                                    return None;
                                }
                                out.clear();
                            }
                        }
                        Outbound::Close(code, _) => {
                            let _ = writer.write_all(&out).await;
                            let _ = writer.shutdown().await;
                            return Some(code);
                        }
                    }
                    match shared.try_recv() {
                        Some(more) => next = more,
                        None => break,
                    }
                }
                if writer.write_all(&out).await.is_err() {
                    return None;
                }
            }
            _ = tokio::time::sleep(limits.idle_timeout) => return Some(1000),
        }
    }
}
