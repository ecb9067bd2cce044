//! End-to-end tests of the echo client ([`loadgen::echo`]) against a small
//! misbehaving echo server on 127.0.0.1: every fault it injects (a dropped,
//! swapped or doubled echo, a close frame with a code, a connection cut
//! without one) must show up in the report under its own name, and nothing
//! else may. The server is the thing the client must catch, not a stand-in
//! for it; the client against a correct server is tested in `baseline`.
//!
//! Runs end on per-client message caps; durations and drain timeouts are
//! upper bounds only.

mod support;

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use loadgen::echo::{EchoConfig, EchoReport, EchoRun, Pace, Protocol};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use support::TestServer;

/// What the server does wrong, counted per connection over the messages it
/// received (the first is number 1).
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Never echoes every `n`th message.
    DropEvery(u64),
    /// Echoes every `n`th message twice.
    DoubleEvery(u64),
    /// Echoes each pair of messages in reverse order.
    SwapPairs,
    /// After echoing `n` messages, closes: WebSocket with a close frame of
    /// this code, text by ending its stream.
    CloseAfter(u64, u16),
    /// After echoing `n` messages, drops the connection without a close
    /// frame.
    CutAfter(u64),
}

/// What one received message turns into.
enum Step {
    Send(Vec<String>),
    Close(u16),
    Cut,
}

impl Fault {
    /// The server's answer to message number `n` (`held` keeps the first of
    /// a pair for [`Fault::SwapPairs`]).
    fn step(self, n: u64, message: String, held: &mut Option<String>) -> Step {
        match self {
            Fault::DropEvery(every) if n.is_multiple_of(every) => Step::Send(vec![]),
            Fault::DoubleEvery(every) if n.is_multiple_of(every) => {
                Step::Send(vec![message.clone(), message])
            }
            Fault::SwapPairs => match held.take() {
                None => {
                    *held = Some(message);
                    Step::Send(vec![])
                }
                Some(first) => Step::Send(vec![message, first]),
            },
            Fault::CloseAfter(after, code) if n > after => Step::Close(code),
            Fault::CutAfter(after) if n > after => Step::Cut,
            _ => Step::Send(vec![message]),
        }
    }
}

/// A server that echoes with `fault`.
fn faulty_server(protocol: Protocol, fault: Fault) -> TestServer {
    TestServer::start(move |stream| async move {
        match protocol {
            Protocol::WebSocket => websocket(stream, fault).await,
            Protocol::Text => text(stream, fault).await,
        }
    })
}

async fn websocket(stream: TcpStream, fault: Fault) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut n, mut held) = (0, None);
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        n += 1;
        match fault.step(n, text.to_string(), &mut held) {
            Step::Send(out) => {
                for message in out {
                    if ws.send(Message::text(message)).await.is_err() {
                        return;
                    }
                }
            }
            Step::Close(code) => {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: "fault".into(),
                };
                // The close handshake: read on until the client's reply,
                // as closing with unread input would send a reset.
                let _ = ws.close(Some(frame)).await;
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            Step::Cut => return,
        }
    }
}

async fn text(stream: TcpStream, fault: Fault) {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    let (mut n, mut held) = (0, None);
    while let Ok(Some(line)) = lines.next_line().await {
        n += 1;
        match fault.step(n, line, &mut held) {
            Step::Send(out) => {
                for line in out {
                    if writer
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Step::Close(_) | Step::Cut => {
                // End of stream, then read to the client's end: closing with
                // unread input would send a reset instead.
                let _ = writer.shutdown().await;
                while let Ok(Some(_)) = lines.next_line().await {}
                return;
            }
        }
    }
}

/// `clients` clients sending `messages` each against `server`.
fn run(
    server: &TestServer,
    protocol: Protocol,
    clients: usize,
    messages: u64,
    pace: Pace,
) -> EchoReport {
    let mut config = EchoConfig::new(server.addr, protocol);
    config.clients = clients;
    config.messages_per_client = Some(messages);
    config.pace = pace;
    config.duration = Duration::from_secs(60);
    // Only a bound: how long a client waits for echoes a fault swallowed,
    // long enough that an echo merely slowed by a busy machine still
    // arrives (only the swallowing test waits it out).
    config.drain_timeout = Duration::from_secs(2);
    EchoRun::start(config).wait()
}

/// Asserts the counters a fault must not touch are zero.
fn assert_only(report: &EchoReport, allowed: &[&str]) {
    let counters = [
        ("lost", report.lost),
        ("reordered", report.reordered),
        ("duplicated", report.duplicated),
        ("unexpected", report.unexpected),
        ("disconnects", report.disconnected()),
        ("connect_failures", report.connect_failures),
    ];
    for (name, value) in counters {
        if !allowed.contains(&name) {
            assert_eq!(value, 0, "{name} in {report:#?}");
        }
    }
}

const BOTH: [Protocol; 2] = [Protocol::WebSocket, Protocol::Text];

#[test]
fn swallowed_echoes_are_counted_lost() {
    // Both protocols at once: each run waits out its drain bound.
    let runs = BOTH.map(|protocol| {
        std::thread::spawn(move || {
            let server = faulty_server(protocol, Fault::DropEvery(10));
            // A rate, not a window: a window would fill with the lost messages.
            (protocol, run(&server, protocol, 4, 100, Pace::Rate(2000.0)))
        })
    });
    for run in runs {
        let (protocol, report) = run.join().unwrap();
        assert_eq!(report.sent, 400, "{protocol:?}: {report:#?}");
        assert_eq!(report.lost, 40, "{protocol:?}: {report:#?}");
        assert_eq!(report.received, 360);
        assert_only(&report, &["lost"]);
    }
}

#[test]
fn doubled_echoes_are_counted_duplicated() {
    for protocol in BOTH {
        let server = faulty_server(protocol, Fault::DoubleEvery(10));
        // Not a multiple of 10: a doubled last echo could come after the
        // client, with all its echoes in, has closed.
        let report = run(&server, protocol, 4, 105, Pace::Window(8));
        assert_eq!(report.received, 420, "{protocol:?}: {report:#?}");
        assert_eq!(report.duplicated, 40, "{protocol:?}: {report:#?}");
        assert_only(&report, &["duplicated"]);
    }
}

#[test]
fn swapped_echoes_are_counted_reordered() {
    for protocol in BOTH {
        let server = faulty_server(protocol, Fault::SwapPairs);
        let report = run(&server, protocol, 4, 100, Pace::Window(8));
        assert_eq!(report.received, 400, "{protocol:?}: {report:#?}");
        assert_eq!(report.reordered, 200, "{protocol:?}: {report:#?}");
        assert_only(&report, &["reordered"]);
    }
}

#[test]
fn a_close_frame_is_a_disconnect_by_code_and_its_outstanding_messages_are_lost() {
    let server = faulty_server(Protocol::WebSocket, Fault::CloseAfter(50, 1013));
    let report = run(&server, Protocol::WebSocket, 3, 100, Pace::Window(8));
    // Each client's first connection closes after 50 echoes; it reconnects
    // and its other 50 (minus those lost) go through a second connection.
    assert_eq!(
        report.disconnects.get("close 1013"),
        Some(&3),
        "{report:#?}"
    );
    assert_eq!(report.disconnects.len(), 1, "{report:#?}");
    assert_eq!(report.connections_opened, 6);
    assert!(report.lost > 0, "{report:#?}");
    assert_eq!(report.sent, 300);
    assert_eq!(report.received + report.lost, report.sent, "{report:#?}");
    assert_only(&report, &["lost", "disconnects"]);
}

#[test]
fn a_cut_without_close_frame_is_an_abrupt_disconnect() {
    let server = faulty_server(Protocol::WebSocket, Fault::CutAfter(50));
    let report = run(&server, Protocol::WebSocket, 3, 100, Pace::Window(8));
    assert_eq!(report.disconnects.get("abrupt"), Some(&3), "{report:#?}");
    assert_eq!(report.disconnects.len(), 1, "{report:#?}");
    assert_eq!(report.received + report.lost, report.sent, "{report:#?}");
    assert_only(&report, &["lost", "disconnects"]);

    let server = faulty_server(Protocol::Text, Fault::CutAfter(50));
    let report = run(&server, Protocol::Text, 3, 100, Pace::Window(8));
    assert_eq!(report.disconnects.get("eof"), Some(&3), "{report:#?}");
    assert_eq!(report.received + report.lost, report.sent, "{report:#?}");
    assert_only(&report, &["lost", "disconnects"]);
}
