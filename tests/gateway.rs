//! Gateway groups against the real binary: WebSocket and text clients on
//! 127.0.0.1, business workers reloaded, killed and missing under them.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::ws::{Ended, TextClient, Ws};
use support::*;

/// A gateway group `echo` (or with `protocol`) running `handler`.
fn gateway_config(handler: &std::path::Path, protocol: &str, count: usize, extra: &str) -> String {
    format!(
        "run_dir = \"run\"\n\n[[group]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\ncount = {count}\nhandler = {:?}\n{extra}\n",
        handler.display().to_string()
    )
}

/// Pids of the business workers (not the gateways) that are ready.
fn business_pids(host: &Host) -> Vec<u32> {
    host.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == "echo" && w["state"] == "ready")
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect()
}

fn reload(host: &Host) {
    let output = host.cli(&["reload"]);
    assert!(output.status.success(), "reload failed: {}", text(&output));
}

#[test]
fn websocket_messages_are_echoed_and_broadcast() {
    let dir = TestDir::new("gw-echo");
    let handler = dir.install(Variant::Echo("v1"), "echo.so");
    let host = Host::start(dir, &gateway_config(&handler, "websocket", 2, ""));
    let mut a = Ws::connect(host.addr);
    let mut b = Ws::connect(host.addr);
    a.send("hello");
    assert_eq!(a.recv(), "hello");
    a.send("version");
    assert_eq!(a.recv(), "v1");
    b.send("b to all");
    assert_eq!(a.recv(), "b to all");
    assert_eq!(b.recv(), "b to all");
}

#[test]
fn text_clients_get_lines_back_and_long_lines_close_them() {
    let dir = TestDir::new("gw-text");
    let handler = dir.install(Variant::Echo("v1"), "echo.so");
    let host = Host::start(dir, &gateway_config(&handler, "text", 1, "max_line = 16"));
    let mut a = TextClient::connect(host.addr);
    let mut b = TextClient::connect(host.addr);
    a.send("hello");
    assert_eq!(a.recv().as_deref(), Some("hello"));
    a.send_raw(b"crlf\r\n");
    assert_eq!(a.recv().as_deref(), Some("crlf"));
    b.send("broadcast");
    assert_eq!(a.recv().as_deref(), Some("broadcast"));
    assert_eq!(b.recv().as_deref(), Some("broadcast"));
    a.send(&"x".repeat(40));
    assert_eq!(a.recv().as_deref(), Some("error: line too long"));
    assert_eq!(a.recv(), None);
    b.send("still here");
    assert_eq!(b.recv().as_deref(), Some("still here"));
}

/// What a client of [`Flow`] saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct FlowReport {
    sent: u64,
    received: u64,
    lost: u64,
    reordered: u64,
    duplicated: u64,
    disconnects: u64,
    longest_gap: Duration,
}

impl FlowReport {
    fn add(&mut self, other: FlowReport) {
        self.sent += other.sent;
        self.received += other.received;
        self.lost += other.lost;
        self.reordered += other.reordered;
        self.duplicated += other.duplicated;
        self.disconnects += other.disconnects;
        self.longest_gap = self.longest_gap.max(other.longest_gap);
    }
}

/// Clients that each send numbered messages, one at a time, and check
/// every echo: an echo that does not come within `patience` is lost, one
/// of an earlier message duplicated, one of a later message reordered.
struct Flow {
    stop: Arc<AtomicBool>,
    received: Arc<std::sync::atomic::AtomicU64>,
    clients: Vec<std::thread::JoinHandle<FlowReport>>,
}

impl Flow {
    fn start(addr: SocketAddr, clients: usize, patience: Duration) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let clients = (0..clients)
            .map(|n| {
                let (stop, received) = (stop.clone(), received.clone());
                std::thread::spawn(move || flow_client(addr, n, patience, &stop, &received))
            })
            .collect();
        Flow {
            stop,
            received,
            clients,
        }
    }

    /// Waits until `more` more echoes arrived.
    fn wait_for(&self, more: u64) {
        let target = self.received.load(Ordering::Relaxed) + more;
        wait_until("echoes arrive", || {
            self.received.load(Ordering::Relaxed) >= target
        });
    }

    fn stop(self) -> FlowReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = FlowReport::default();
        for client in self.clients {
            total.add(client.join().unwrap());
        }
        total
    }
}

fn flow_client(
    addr: SocketAddr,
    n: usize,
    patience: Duration,
    stop: &AtomicBool,
    received: &std::sync::atomic::AtomicU64,
) -> FlowReport {
    let mut report = FlowReport::default();
    let mut ws = Ws::connect(addr);
    let mut seq = 0u64;
    let mut last_echo = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        ws.send(&format!("{n} {seq}"));
        report.sent += 1;
        loop {
            match ws.next(patience) {
                Ok(echo) => {
                    let got: u64 = echo
                        .split_once(' ')
                        .and_then(|(_, s)| s.parse().ok())
                        .unwrap_or(u64::MAX);
                    report.longest_gap = report.longest_gap.max(last_echo.elapsed());
                    last_echo = Instant::now();
                    if got == seq {
                        report.received += 1;
                        received.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    if got < seq {
                        report.duplicated += 1;
                    } else {
                        report.reordered += 1;
                        break;
                    }
                }
                Err(Ended::Silent) => {
                    report.lost += 1;
                    break;
                }
                Err(_) => {
                    report.disconnects += 1;
                    return report;
                }
            }
        }
        seq += 1;
    }
    report
}

fn reload_under_flow(count: usize) -> FlowReport {
    let dir = TestDir::new("gw-reload");
    let handler = dir.install(Variant::Echo("v1"), "echo.so");
    let host = Host::start(dir, &gateway_config(&handler, "websocket", count, ""));
    let flow = Flow::start(host.addr, 24, Duration::from_secs(10));
    flow.wait_for(500);
    for version in ["v2", "v3", "v2"] {
        host.dir.install(Variant::Echo(version), "echo.so");
        reload(&host);
        flow.wait_for(300);
    }
    let report = flow.stop();
    let mut probe = Ws::connect(host.addr);
    probe.send("version");
    assert_eq!(probe.recv(), "v2");
    eprintln!("reload of {count} business workers x3 under flow: {report:?}");
    report
}

#[test]
fn reloads_of_one_business_worker_lose_nothing_and_disconnect_nobody() {
    let report = reload_under_flow(1);
    assert_eq!(
        (
            report.lost,
            report.reordered,
            report.duplicated,
            report.disconnects
        ),
        (0, 0, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.sent, report.received);
}

#[test]
fn reloads_of_two_business_workers_lose_nothing_and_disconnect_nobody() {
    let report = reload_under_flow(2);
    assert_eq!(
        (
            report.lost,
            report.reordered,
            report.duplicated,
            report.disconnects
        ),
        (0, 0, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.sent, report.received);
}
