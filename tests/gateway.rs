//! Gateway groups against the real binary: WebSocket and text clients on
//! 127.0.0.1, business workers reloaded, killed and missing under them.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use support::ws::{Ended, TextClient, Ws};
use support::*;

/// A gateway group `echo` (or with `protocol`) running `handler`.
fn gateway_config(handler: &std::path::Path, protocol: &str, count: usize, extra: &str) -> String {
    format!(
        "run_dir = \"run\"\n\n[[group]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\ncount = {count}\nhandler = {:?}\n{extra}\n",
        handler.display().to_string()
    )
}

/// A host whose gateway group `echo` (see [`gateway_config`]) runs the v1
/// echo handler.
fn start_echo(name: &str, protocol: &str, count: usize, extra: &str) -> Host {
    start_echo_config(name, "", protocol, count, extra)
}

/// [`start_echo`] with an admin address, for the metrics.
fn start_echo_with_admin(name: &str, protocol: &str, count: usize, extra: &str) -> Host {
    start_echo_config(name, "admin = \"127.0.0.1:0\"\n", protocol, count, extra)
}

fn start_echo_config(name: &str, top: &str, protocol: &str, count: usize, extra: &str) -> Host {
    let dir = TestDir::new(name);
    let handler = dir.install(Variant::Echo("v1"), "echo.so");
    let config = gateway_config(&handler, protocol, count, extra);
    Host::start(dir, &format!("{top}{config}"))
}

/// The gateway processes' group in status and metrics.
const GATEWAYS: &str = "echo-gateways";

/// The workers of `group` in a `host status`.
fn workers_of<'a>(
    status: &'a serde_json::Value,
    group: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(move |w| w["group"] == group)
}

fn pid_of(worker: &serde_json::Value) -> u32 {
    worker["pid"].as_u64().unwrap() as u32
}

/// Pids of the business workers (not the gateways) that are ready.
fn business_pids(host: &Host) -> Vec<u32> {
    workers_of(&host.status(), "echo")
        .filter(|w| w["state"] == "ready")
        .map(pid_of)
        .collect()
}

/// The pid of a ready gateway process, if there is one.
fn ready_gateway_pid(host: &Host) -> Option<u32> {
    workers_of(&host.status(), GATEWAYS)
        .find(|w| w["state"] == "ready")
        .map(pid_of)
}

/// Clients the gateway processes hold, from `host status`.
fn gateway_connections(host: &Host) -> u64 {
    workers_of(&host.status(), GATEWAYS)
        .map(|w| w["connections"].as_u64().unwrap_or(0))
        .sum()
}

/// Waits until `count` business workers are ready, none of them one of `old`.
fn wait_business_replaced(host: &Host, old: &[u32], count: usize) {
    wait_until("the business workers are replaced", || {
        let now = business_pids(host);
        now.len() == count && now.iter().all(|pid| !old.contains(pid))
    });
}

/// The gateway group's sample of metric `name`; `more_labels` (each
/// starting with a comma) follow its group label.
fn gateway_metric(host: &Host, name: &str, more_labels: &str) -> u64 {
    metric(
        &metrics(&host.admin()),
        &format!("{name}{{group=\"{GATEWAYS}\"{more_labels}}}"),
    )
}

/// What `ws` gets next after sending `message`.
fn answer(ws: &mut Ws, message: &str) -> String {
    ws.send(message);
    ws.recv()
}

/// `ws` sends `message` and gets it back.
#[track_caller]
fn assert_echoed(ws: &mut Ws, message: &str) {
    ws.send(message);
    assert_eq!(ws.recv(), message);
}

/// A new client asking for the handler's version gets `version`.
#[track_caller]
fn assert_serves_version(host: &Host, version: &str) {
    let mut probe = Ws::connect(host.addr);
    assert_eq!(answer(&mut probe, "version"), version);
}

/// Installs echo v2, v3, then v2 again, reloading after each and calling
/// `settle` after each reload.
fn reload_v2_v3_v2(host: &Host, mut settle: impl FnMut()) {
    for version in ["v2", "v3", "v2"] {
        host.dir.install(Variant::Echo(version), "echo.so");
        reload(host);
        settle();
    }
}

fn reload(host: &Host) {
    let output = host.cli(&["reload"]);
    assert!(output.status.success(), "reload failed: {}", text(&output));
}

#[test]
fn websocket_messages_are_echoed_and_broadcast() {
    let host = start_echo("gw-echo", "websocket", 2, "");
    let mut a = Ws::connect(host.addr);
    let mut b = Ws::connect(host.addr);
    assert_echoed(&mut a, "hello");
    assert_eq!(answer(&mut a, "version"), "v1");
    b.send("b to all");
    assert_eq!(a.recv(), "b to all");
    assert_eq!(b.recv(), "b to all");
    let status = host.status();
    let gateway = workers_of(&status, GATEWAYS)
        .next()
        .expect("a gateway process in status");
    assert_eq!(gateway["connections"], 2, "{status}");
    assert_eq!(gateway["in_flight"], 0, "{status}");

    // Stop: the business workers drain, then the clients get 1001.
    a.send("last words");
    let stopped = host.cli(&["stop"]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    assert_eq!(a.recv(), "last words");
    assert_eq!(a.closed(), Ended::Closed(1001));
    assert_eq!(b.closed(), Ended::Closed(1001));
}

#[test]
fn text_clients_get_lines_back_and_long_lines_close_them() {
    let host = start_echo("gw-text", "text", 1, "max_line = 16");
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
    // Many lines in one write come back each, in order; a line cut across
    // writes comes back whole.
    let burst: String = (0..300).map(|n| format!("n{n}\n")).collect();
    b.send_raw(burst.as_bytes());
    for n in 0..300 {
        assert_eq!(b.recv(), Some(format!("n{n}")));
    }
    b.send_raw(b"spl");
    b.send_raw(b"it\r");
    b.send_raw(b"\n");
    assert_eq!(b.recv().as_deref(), Some("split"));
    // A line over the limit is refused before its newline comes.
    b.send_raw(&[b'y'; 10]);
    b.send_raw(&[b'y'; 10]);
    assert_eq!(b.recv().as_deref(), Some("error: line too long"));
    assert_eq!(b.recv(), None);
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
    let host = start_echo("gw-reload", "websocket", count, "");
    let flow = Flow::start(host.addr, 24, Duration::from_secs(10));
    flow.wait_for(500);
    reload_v2_v3_v2(&host, || flow.wait_for(300));
    let report = flow.stop();
    assert_serves_version(&host, "v2");
    eprintln!("reload of {count} business workers x3 under flow: {report:?}");
    report
}

#[test]
fn reloads_of_one_business_worker_lose_nothing_and_disconnect_nobody() {
    assert_nothing_lost(&reload_under_flow(1));
}

#[test]
fn reloads_of_two_business_workers_lose_nothing_and_disconnect_nobody() {
    assert_nothing_lost(&reload_under_flow(2));
}

/// Every message sent came back once, in order, and nobody was cut.
fn assert_nothing_lost(report: &FlowReport) {
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

/// The id a sample-chat client is welcomed with.
fn welcomed(ws: &mut Ws) -> String {
    let welcome = ws.recv();
    welcome
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no id in {welcome:?}"))
        .to_owned()
}

#[test]
fn every_gateway_call_works_from_the_chat_handler_and_from_its_http_group() {
    let dir = TestDir::new("gw-chat");
    let handler = dir.install(Variant::Chat, "chat.so");
    let config = format!(
        "{}\n[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\ncount = 1\npush = \"echo\"\nhandler = {:?}\n",
        gateway_config(&handler, "websocket", 1, "gateways = 2"),
        handler.display().to_string()
    );
    let host = Host::start(dir, &config);
    let web: SocketAddr = host.status()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "web")
        .unwrap()["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let page = get(web, "/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("new WebSocket"), "{}", page.body);

    let mut a = Ws::connect(host.addr);
    let mut b = Ws::connect(host.addr);
    let (id_a, id_b) = (welcomed(&mut a), welcomed(&mut b));
    assert_eq!(answer(&mut a, "nick ann"), "you are ann");
    assert_eq!(answer(&mut b, "nick bob"), "you are bob");
    assert_eq!(answer(&mut a, "join lobby"), "* ann joined lobby (1 here)");
    b.send("join lobby");
    assert_eq!(a.recv(), "* bob joined lobby (2 here)");
    assert_eq!(b.recv(), "* bob joined lobby (2 here)");
    assert_eq!(answer(&mut a, "say hi"), "ann: hi");
    assert_eq!(b.recv(), "ann: hi");
    let listed = host.cli(&["connections", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let ann = format!("client {id_a} uid ann groups lobby");
    assert!(
        listed.as_array().unwrap().iter().any(|w| w["connections"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["state"] == ann.as_str()))),
        "{ann} not in {listed}"
    );
    assert_eq!(answer(&mut a, "online"), "online: 2");
    // The HTTP group pushes to the chat (GatewayWorker's GatewayClient).
    let pushed = request(web, "POST", "/notify?uid=ann", b"from the web").unwrap();
    assert_eq!(pushed.status, 200, "{}", pushed.body);
    assert_eq!(a.recv(), "from the web");
    assert_eq!(get(web, "/online").body, "online: 2\n");
    a.send("to bob psst");
    assert_eq!(b.recv(), "ann (private): psst");
    a.send("shout hey");
    assert_eq!(b.recv(), "ann shouts: hey");
    b.send(&format!("tell {id_a} yo"));
    assert_eq!(
        a.recv(),
        "bob (to you): yo",
        "the shout is not for its sender"
    );
    assert_eq!(
        answer(&mut a, &format!("whois {id_b}")),
        format!("{id_b} is online as bob")
    );
    assert_eq!(answer(&mut b, "leave"), "you left lobby");
    assert_eq!(answer(&mut a, "count lobby"), "lobby: 1");
    assert_eq!(answer(&mut b, "forget"), "you are nobody");
    assert_eq!(answer(&mut a, "to bob hello?"), "nobody by that name");
    assert_eq!(answer(&mut b, "nick bob"), "you are bob");
    a.send("kick bob");
    assert_eq!(b.closed(), Ended::Closed(4000));
    assert_eq!(
        answer(&mut a, &format!("whois {id_b}")),
        format!("{id_b} is not online")
    );

    // The session travels with the close event.
    let mut c = Ws::connect(host.addr);
    welcomed(&mut c);
    assert_eq!(answer(&mut c, "nick carl"), "you are carl");
    assert_eq!(answer(&mut c, "join lobby"), "* carl joined lobby (2 here)");
    assert_eq!(a.recv(), "* carl joined lobby (2 here)");
    c.socket.close(None).unwrap();
    c.closed();
    assert_eq!(a.recv(), "* carl left");
}

#[test]
fn a_killed_business_worker_loses_only_what_it_had_and_disconnects_nobody() {
    let host = start_echo_with_admin("gw-kill", "websocket", 2, "");
    let clients = 16;
    let flow = Flow::start(host.addr, clients, Duration::from_secs(3));
    flow.wait_for(500);
    let victim = business_pids(&host)[0];
    // Frozen first, while the other worker keeps echoing: each of the
    // victim's clients then has its next message sent and never acked, so
    // the kill has something to lose (and the count is checked, not 0 >= 0).
    kill(victim, Signal::SIGSTOP);
    flow.wait_for(500);
    kill(victim, Signal::SIGKILL);
    wait_business_replaced(&host, &[victim], 2);
    flow.wait_for(500);
    let report = flow.stop();
    eprintln!("business worker killed under flow: {report:?}");
    assert_eq!(
        (report.disconnects, report.reordered, report.duplicated),
        (0, 0, 0),
        "{report:?}"
    );
    // One message in flight per client at most; a lost one is counted.
    assert!((1..=clients as u64).contains(&report.lost), "{report:?}");
    let lost = gateway_metric(&host, "host_gateway_events_lost_total", "");
    assert!(
        lost >= report.lost,
        "gateway counted {lost}, clients saw {report:?}"
    );
}

#[test]
fn without_a_business_worker_events_wait_and_a_full_queue_closes_with_1013() {
    let host = start_echo(
        "gw-queue",
        "websocket",
        1,
        "max_queued_events = 20\n[group.settings]\nstart_delay_ms = 1500",
    );
    let mut a = Ws::connect(host.addr);
    assert_echoed(&mut a, "first");
    let victim = business_pids(&host)[0];
    kill(victim, Signal::SIGKILL);
    wait_until("the master sees the worker gone", || {
        business_pids(&host).is_empty()
    });
    for n in 0..5 {
        a.send(&format!("queued {n}"));
    }
    // Its connect and 19 messages fill the queue to 20 with a's 5; then 1013.
    let mut b = Ws::connect(host.addr);
    for n in 0..30 {
        b.send(&format!("flood {n}"));
    }
    assert_eq!(b.closed(), Ended::Closed(1013));
    for n in 0..5 {
        assert_eq!(a.recv(), format!("queued {n}"));
    }
    let mut c = Ws::connect(host.addr);
    assert_echoed(&mut c, "later");
}

/// Sends a raw HTTP request to the gateway and returns what it answers.
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// A raw, valid handshake; returns the stream after the 101 answer.
fn raw_websocket(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// The close code of the close frame the server sends next.
fn close_code(stream: &mut TcpStream) -> u16 {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x88, "a close frame");
    u16::from_be_bytes([head[2], head[3]])
}

#[test]
fn bad_websocket_input_gets_a_protocol_answer_and_harms_no_other_client() {
    let host = start_echo_with_admin(
        "gw-bad",
        "websocket",
        1,
        "max_message_size = 1024\nmax_outbound_bytes = 65536\norigins = [\"http://good.example\"]",
    );
    let mut bystander = Ws::connect(host.addr);

    let plain = raw_exchange(host.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    let version = raw_exchange(host.addr, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n");
    assert!(version.starts_with("HTTP/1.1 426"), "{version}");
    assert!(version.contains("Sec-WebSocket-Version: 13"), "{version}");
    let no_key = raw_exchange(host.addr, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert!(no_key.starts_with("HTTP/1.1 400"), "{no_key}");
    let origin = Ws::connect_to(host.addr, "/", &[("origin", "http://evil.example")]);
    assert!(origin.is_err());
    Ws::connect_to(host.addr, "/", &[("origin", "http://good.example")]).expect("allowed origin");

    let mut unmasked = raw_websocket(host.addr);
    unmasked.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(close_code(&mut unmasked), 1002);

    let mut invalid_utf8 = raw_websocket(host.addr);
    invalid_utf8
        .write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xc3, 0x28])
        .unwrap();
    assert_eq!(close_code(&mut invalid_utf8), 1007);

    let mut oversized = Ws::connect(host.addr);
    oversized.send(&"x".repeat(2048));
    assert_eq!(oversized.closed(), Ended::Closed(1009));

    for code in [1002, 1007, 1009] {
        let code = format!(",code=\"{code}\"");
        wait_until("the close is counted", || {
            gateway_metric(&host, "host_gateway_closes_total", &code) == 1
        });
    }

    assert_echoed(&mut bystander, "still fine");
}

#[test]
fn a_client_that_never_reads_is_cut_and_the_others_keep_going() {
    let host = start_echo_with_admin("gw-slow", "websocket", 1, "max_outbound_bytes = 65536");
    let never_reads = raw_websocket(host.addr);
    let mut reader = Ws::connect(host.addr);
    // Broadcasts pile up for the client that never reads, past what the
    // kernel buffers hold, until its outbound limit; the reader reads each.
    let broadcast = format!("b{}", "y".repeat(32 << 10));
    let slow_closes = || gateway_metric(&host, "host_gateway_slow_closes_total", "");
    let mut rounds = 0;
    while slow_closes() == 0 {
        for _ in 0..50 {
            reader.send(&broadcast);
            assert_eq!(reader.recv().len(), broadcast.len());
        }
        rounds += 50;
        assert!(rounds < 5000, "the client that never reads was never cut");
    }
    drop(never_reads);
    assert_echoed(&mut reader, "still fine");
}

#[test]
fn a_bad_build_is_refused_with_no_event_lost() {
    let host = start_echo("gw-bad-build", "websocket", 2, "");
    let flow = Flow::start(host.addr, 8, Duration::from_secs(10));
    flow.wait_for(300);
    host.dir.install(Variant::Faulty("error"), "echo.so");
    let output = host.cli(&["reload"]);
    assert!(!output.status.success(), "the faulty build was accepted");
    flow.wait_for(300);
    assert_nothing_lost(&flow.stop());
    assert_serves_version(&host, "v1");
}

#[test]
fn a_handler_built_against_handler_api_0_2_0_still_serves_http_but_not_a_gateway() {
    let dir = TestDir::new("gw-old-api");
    let old = dir.install(Variant::OldApi, "old.so");
    let host = Host::start(dir, &one_group_config(&old, 1, ""));
    assert_eq!(get(host.addr, "/").status, 200);
    drop(host);

    let dir = TestDir::new("gw-old-api-gateway");
    let old = dir.install(Variant::OldApi, "old.so");
    dir.write("host.toml", gateway_config(&old, "websocket", 1, ""));
    let output = host_command(&dir, &["start"]);
    assert!(!output.status.success());
    assert_says(&output, "no connection entry points");
}

#[test]
fn a_gateway_that_dies_is_restarted_and_the_business_workers_link_to_it_again() {
    let host = start_echo("gw-gateway-crash", "websocket", 2, "");
    let mut before = Ws::connect(host.addr);
    assert_echoed(&mut before, "one");
    let victim = ready_gateway_pid(&host).expect("a ready gateway");
    kill(victim, Signal::SIGKILL);
    // Its clients die with it; that is what keeping gateways free of
    // handler code is for.
    assert_eq!(before.closed(), Ended::Abrupt);
    wait_until("the gateway is restarted", || {
        ready_gateway_pid(&host).is_some_and(|pid| pid != victim)
    });
    let mut after = Ws::connect(host.addr);
    assert_echoed(&mut after, "two");
    assert_echoed(&mut after, "b everyone");
}

/// A masked client text frame (mask of zeros) of `payload`, under 64 KiB.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// The payload of the next (unfragmented, under 64 KiB) server frame.
fn server_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).unwrap();
    let length = match head[1] {
        126 => {
            let mut length = [0u8; 2];
            stream.read_exact(&mut length).unwrap();
            usize::from(u16::from_be_bytes(length))
        }
        n => usize::from(n),
    };
    let mut payload = vec![0; length];
    stream.read_exact(&mut payload).unwrap();
    payload
}

#[test]
fn a_client_faster_than_its_handler_waits_in_its_own_buffers() {
    let host = start_echo("gw-credit", "websocket", 1, "");
    let messages_in = || {
        workers_of(&host.status(), GATEWAYS)
            .next()
            .map_or(0, |w| w["requests"].as_u64().unwrap())
    };
    let worker = business_pids(&host)[0];
    kill(worker, Signal::SIGSTOP);
    // Far more than the socket buffers hold: the writer blocks once the
    // gateway stops reading, then finishes when the worker runs again.
    let count = 10_000;
    let mut stream = raw_websocket(host.addr);
    let mut writer = stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        for n in 0..count {
            let payload = format!("{n:06} {}", "z".repeat(2000));
            writer.write_all(&client_frame(payload.as_bytes())).unwrap();
        }
    });
    wait_until("the gateway takes its credit of messages", || {
        messages_in() >= 256
    });
    assert!(!flood.is_finished(), "the gateway kept reading");
    assert!(messages_in() <= 257, "{} messages taken", messages_in());
    kill(worker, Signal::SIGCONT);
    for n in 0..count {
        let echo = server_frame(&mut stream);
        assert_eq!(&echo[..6], format!("{n:06}").as_bytes());
    }
    flood.join().unwrap();
}

#[test]
fn clients_that_answer_no_ping_or_say_nothing_are_closed() {
    let host = start_echo(
        "gw-heartbeat",
        "websocket",
        1,
        "ping_interval = \"200ms\"\nmissed_pongs = 2",
    );
    // Reads frames but never answers: pings, then a close for no pong.
    let mut deaf = raw_websocket(host.addr);
    let mut pings = 0;
    loop {
        let mut head = [0u8; 2];
        deaf.read_exact(&mut head).unwrap();
        let mut payload = vec![0; usize::from(head[1] & 0x7f)];
        deaf.read_exact(&mut payload).unwrap();
        match head[0] {
            0x89 => pings += 1,
            0x88 => {
                assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
                break;
            }
            other => panic!("unexpected frame {other:#x}"),
        }
    }
    assert_eq!(pings, 2);
    // tungstenite answers pings while it reads: such a client stays.
    let mut alive = Ws::connect(host.addr);
    assert_eq!(alive.next(Duration::from_millis(1500)), Err(Ended::Silent));
    assert_echoed(&mut alive, "still here");
    drop(host);

    let host = start_echo("gw-idle", "text", 1, "idle_timeout = \"1s\"");
    let mut talking = TextClient::connect(host.addr);
    let mut silent = TextClient::connect(host.addr);
    // One that talks more often than idle_timeout stays past it.
    for n in 0..6 {
        talking.send(&format!("t{n}"));
        assert_eq!(talking.recv(), Some(format!("t{n}")));
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(silent.recv(), None, "a silent text client is closed");
}

/// Reloads the business workers three times under loadgen's echo load and
/// returns what loadgen saw.
fn loadgen_across_reloads(
    protocol: loadgen::echo::Protocol,
    name: &str,
) -> loadgen::echo::EchoReport {
    let wire = match protocol {
        loadgen::echo::Protocol::WebSocket => "websocket",
        loadgen::echo::Protocol::Text => "text",
    };
    let host = start_echo(name, wire, 2, "");
    let run = echo_load(&host, protocol, 50, loadgen::echo::Pace::Window(4));
    let wait_for = |more: u64| {
        let target = run.progress().received + more;
        wait_until("echoes arrive", || run.progress().received >= target);
    };
    wait_for(2000);
    reload_v2_v3_v2(&host, || wait_for(2000));
    let report = run.stop();
    eprintln!(
        "{wire}: {} clients, 3 reloads of 2 business workers: sent {}, received {}, lost {}, reordered {}, duplicated {}, disconnects {}, longest echo gap {} us",
        report.clients,
        report.sent,
        report.received,
        report.lost,
        report.reordered,
        report.duplicated,
        report.disconnected(),
        report.longest_gap_us
    );
    report
}

#[test]
fn loadgen_sees_nothing_lost_across_reloads_on_websocket_and_text() {
    for (protocol, name) in [
        (loadgen::echo::Protocol::WebSocket, "gw-loadgen-ws"),
        (loadgen::echo::Protocol::Text, "gw-loadgen-text"),
    ] {
        let report = loadgen_across_reloads(protocol, name);
        assert_eq!(
            (
                report.lost,
                report.reordered,
                report.duplicated,
                report.disconnected(),
                report.connect_failures
            ),
            (0, 0, 0, 0, 0),
            "{report:?}"
        );
        assert!(
            report.received > 0 && report.sent == report.received,
            "{report:?}"
        );
    }
}

/// loadgen's echo load of `clients` clients at `pace` on the gateway,
/// for at most [`DEADLINE`].
fn echo_load(
    host: &Host,
    protocol: loadgen::echo::Protocol,
    clients: usize,
    pace: loadgen::echo::Pace,
) -> loadgen::echo::EchoRun {
    let mut config = loadgen::echo::EchoConfig::new(host.addr, protocol);
    config.clients = clients;
    config.pace = pace;
    config.duration = DEADLINE;
    loadgen::echo::EchoRun::start(config)
}

#[test]
fn idle_clients_answering_pings_are_all_held_across_a_reload() {
    const CLIENTS: usize = 2000;
    // A short heartbeat, so that every client is pinged while it is held
    // and one that does not answer is dropped within about 10 s (not less:
    // a loaded 2-core machine running other tests can hold up a debug
    // build's pongs for seconds).
    let host = start_echo(
        "gw-idle-held",
        "websocket",
        2,
        "ping_interval = \"2s\"\nmissed_pongs = 5",
    );
    let run = echo_load(
        &host,
        loadgen::echo::Protocol::WebSocket,
        CLIENTS,
        loadgen::echo::Pace::Idle,
    );
    wait_until("every client connects", || {
        run.progress().connected == CLIENTS
    });
    wait_until("the gateway counts every client", || {
        gateway_connections(&host) == CLIENTS as u64
    });
    let before = business_pids(&host);
    host.dir.install(Variant::Echo("v2"), "echo.so");
    reload(&host);
    wait_business_replaced(&host, &before, before.len());
    // Six heartbeats after the reload, longer than five missed pongs
    // take: every client is still there, so each answered its pings.
    let held_since = Instant::now();
    wait_until("six ping intervals pass with every client held", || {
        assert_eq!(gateway_connections(&host), CLIENTS as u64);
        assert_eq!(run.progress().connected, CLIENTS);
        held_since.elapsed() >= Duration::from_secs(12)
    });
    let report = run.stop();
    assert_eq!(report.connections_opened, CLIENTS as u64, "{report:?}");
    assert_eq!(
        (
            report.connect_failures,
            report.disconnected(),
            report.unexpected
        ),
        (0, 0, 0),
        "{report:?}"
    );
}
