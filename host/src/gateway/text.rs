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
use std::time::Instant;

use bytes::Bytes;
use handler_api::MessageKind;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::hub::{
    take_credit, Burst, ClientHandle, ClientShared, Input, Outbound, CLOSE_SLOW, MAX_BURST,
};
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
/// buffer that lives until it is written. Every line one read brought goes
/// to the hub as one input.
async fn converse(
    stream: TcpStream,
    key: u64,
    limits: &Limits,
    hub: &mpsc::UnboundedSender<Input>,
    shared: &ClientShared,
) -> Option<u16> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = LazyRead::new(reader);
    // A line not complete yet (its bytes came in earlier reads).
    let mut line = Vec::new();
    let mut last_heard = Instant::now();
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            read = reader.fill_buf() => {
                let (consumed, split) = match read {
                    Ok([]) | Err(_) => return None,
                    Ok(bytes) => {
                        let mut burst = Burst::default();
                        let done = split_lines(bytes, &mut line, limits.max_line, &mut burst, shared);
                        burst.pass_on(key, hub);
                        done
                    }
                };
                reader.consume(consumed);
                last_heard = Instant::now();
                match split {
                    Split::More => {}
                    Split::TooLong => {
                        let _ = writer.write_all(b"error: line too long\n").await;
                        return Some(1009);
                    }
                    Split::Waiting(kind, data) => {
                        // Out of credit: stop reading until the hub takes it.
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
            () = &mut idle => {
                let deadline = last_heard + limits.idle_timeout;
                if Instant::now() >= deadline {
                    return Some(1000);
                }
                idle.as_mut().reset(deadline.into());
            }
        }
    }
}

/// How the lines of one read ended.
enum Split {
    /// Every complete line was taken (or the burst is full); read on.
    More,
    /// A line is longer than `max_line`.
    TooLong,
    /// This line waits for credit; nothing after it was taken.
    Waiting(MessageKind, Bytes),
}

/// Takes the complete lines of `bytes` (the first one continuing `line`)
/// into `burst`, each with a credit, up to [`MAX_BURST`]; keeps an
/// incomplete last line in `line`. Returns how many bytes were taken.
fn split_lines(
    bytes: &[u8],
    line: &mut Vec<u8>,
    max_line: usize,
    burst: &mut Burst,
    shared: &ClientShared,
) -> (usize, Split) {
    let mut at = 0;
    while burst.len() < MAX_BURST {
        let Some(newline) = bytes[at..].iter().position(|b| *b == b'\n') else {
            line.extend_from_slice(&bytes[at..]);
            // One more byte than the limit may be the `\r` of a `\r\n`.
            let split = if line.len() > max_line + 1 {
                Split::TooLong
            } else {
                Split::More
            };
            return (bytes.len(), split);
        };
        let end = at + newline;
        let mut data = if line.is_empty() {
            Bytes::copy_from_slice(&bytes[at..end])
        } else {
            line.extend_from_slice(&bytes[at..end]);
            Bytes::from(std::mem::take(line))
        };
        at = end + 1;
        if data.last() == Some(&b'\r') {
            data.truncate(data.len() - 1);
        }
        if data.len() > max_line {
            return (at, Split::TooLong);
        }
        let kind = if std::str::from_utf8(&data).is_ok() {
            MessageKind::Text
        } else {
            MessageKind::Binary
        };
        match shared.credit.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => return (at, Split::Waiting(kind, data)),
        }
        burst.push(kind, data);
    }
    (at, Split::More)
}
