//! The idle mode of the echo client ([`Pace::Idle`]) against a real server
//! on 127.0.0.1 that pings every WebSocket client often and counts what it
//! sees: every client connects once, sends nothing but pongs, answers every
//! ping while held, and closes with 1000 at the end; nothing is counted as a
//! failure.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use loadgen::echo::{EchoConfig, EchoRun, Pace, Protocol};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use support::TestServer;

/// How often the server pings each WebSocket client.
const PING_EVERY: Duration = Duration::from_millis(100);

/// What the server saw, all connections together.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    pings: AtomicU64,
    pongs: AtomicU64,
    /// Anything else a client sent (text, binary, an unmatched pong).
    other: AtomicU64,
    /// Connections the client ended with close 1000 (WebSocket) or end of
    /// stream (text).
    closed_cleanly: AtomicU64,
}

struct PingServer {
    server: TestServer,
    seen: Arc<Seen>,
}

impl PingServer {
    fn start(protocol: Protocol) -> PingServer {
        let seen = Arc::new(Seen::default());
        let served = seen.clone();
        let server = TestServer::start(move |stream| {
            let seen = served.clone();
            async move {
                match protocol {
                    Protocol::WebSocket => websocket(stream, seen).await,
                    Protocol::Text => text(stream, seen).await,
                }
            }
        });
        PingServer { server, seen }
    }
}

/// Pings every [`PING_EVERY`] with a numbered payload; counts the pongs
/// that carry the payload of a ping sent.
async fn websocket(stream: TcpStream, seen: Arc<Seen>) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    seen.connections.fetch_add(1, Ordering::Relaxed);
    let mut ticker = tokio::time::interval(PING_EVERY);
    let mut pinged = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                pinged += 1;
                let payload = pinged.to_be_bytes().to_vec();
                if ws.send(Message::Ping(payload.into())).await.is_err() {
                    return;
                }
                seen.pings.fetch_add(1, Ordering::Relaxed);
            }
            message = ws.next() => match message {
                Some(Ok(Message::Pong(data)))
                    if data.len() == 8 && (1..=pinged).contains(&u64::from_be_bytes(data[..].try_into().unwrap())) =>
                {
                    seen.pongs.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(Message::Close(frame))) => {
                    if frame.is_some_and(|f| u16::from(f.code) == 1000) {
                        seen.closed_cleanly.fetch_add(1, Ordering::Relaxed);
                    }
                    // tungstenite queued the reply; send it.
                    while let Some(Ok(_)) = ws.next().await {}
                    return;
                }
                Some(Ok(_)) => {
                    seen.other.fetch_add(1, Ordering::Relaxed);
                }
                Some(Err(_)) | None => return,
            }
        }
    }
}

/// Holds the connection; counts any byte the client sends.
async fn text(mut stream: TcpStream, seen: Arc<Seen>) {
    seen.connections.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                seen.closed_cleanly.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(n) => {
                seen.other.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => return,
        }
    }
}

#[test]
fn idle_clients_connect_once_answer_every_ping_and_close_cleanly() {
    const CLIENTS: usize = 200;
    for protocol in [Protocol::WebSocket, Protocol::Text] {
        let server = PingServer::start(protocol);
        let mut config = EchoConfig::new(server.server.addr, protocol);
        config.clients = CLIENTS;
        config.pace = Pace::Idle;
        // Long enough for a few pings to each client.
        config.duration = Duration::from_millis(1500);
        config.drain_timeout = Duration::from_secs(30);
        // Two source addresses, as a run of tens of thousands would use.
        config.sources = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        let report = EchoRun::start(config).wait();

        assert_eq!(report.connections_opened, CLIENTS as u64, "{report:#?}");
        assert_eq!(report.connect_failures, 0, "{report:#?}");
        assert!(report.disconnects.is_empty(), "{report:#?}");
        assert_eq!(report.sent, 0, "{report:#?}");
        assert_eq!(report.received, 0, "{report:#?}");
        assert_eq!(report.unexpected, 0, "{report:#?}");
        assert!(report.all_connected_secs.is_some(), "{report:#?}");

        // A client's close returns once the server replied, or after its
        // bound: wait for the server's count.
        let seen = &server.seen;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.closed_cleanly.load(Ordering::Relaxed) < CLIENTS as u64
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(load(&seen.connections), CLIENTS as u64, "{protocol:?}");
        assert_eq!(load(&seen.closed_cleanly), CLIENTS as u64, "{protocol:?}");
        assert_eq!(load(&seen.other), 0, "{protocol:?}: the clients sent data");
        if protocol == Protocol::WebSocket {
            let (pings, pongs) = (load(&seen.pings), load(&seen.pongs));
            // Every ping is answered but the last one or two of a
            // connection, sent as it closed.
            assert!(pings >= CLIENTS as u64, "{pings} pings");
            assert!(
                pongs + 2 * CLIENTS as u64 >= pings,
                "{pongs} pongs to {pings} pings"
            );
            assert!(pongs >= CLIENTS as u64, "{pongs} pongs to {pings} pings");
        }
    }
}
