//! `request_timeout`: a worker stuck in a handler call is replaced (its
//! replacement ready first), logged and counted; with pool dispatch the
//! stuck request is answered 503; unset, a long request is left alone.

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;

use support::*;

/// The log line of the master about `pid` reporting ready, by position.
fn ready_line(log: &str, pid: u32) -> Option<usize> {
    log.lines()
        .position(|l| l.contains("worker ready") && l.contains(&format!("pid={pid}")))
}

/// The stuck worker's pid: the one with a request in flight.
fn busy_worker(host: &Host) -> Option<u32> {
    host.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["in_flight"] == 1)
        .map(|w| w["pid"].as_u64().unwrap() as u32)
}

/// Waits until `stuck` is gone and the group has all its workers ready
/// again; returns the pids started meanwhile.
fn replaced(host: &mut Host, stuck: u32, before: &[u32]) -> Vec<u32> {
    wait_until("the stuck worker is gone", || !alive(stuck));
    host.wait_all_ready();
    let now = host.worker_pids();
    assert!(!now.contains(&stuck));
    now.into_iter().filter(|p| !before.contains(p)).collect()
}

fn assert_counted(host: &Host, count: u64) {
    let status = host.status();
    assert_eq!(status["groups"][0]["request_timeouts"], count, "{status}");
    let text = metrics(&host.admin());
    assert_eq!(
        metric(&text, "host_request_timeouts_total{group=\"web\"}"),
        count,
        "{text}"
    );
    let shown = text_of(&host.cli(&["status"]));
    assert!(
        shown.contains(&format!("{count} request(s) ran past request_timeout")),
        "{shown}"
    );
}

fn text_of(output: &std::process::Output) -> String {
    assert!(output.status.success(), "{}", text(output));
    text(output)
}

#[test]
fn an_inline_call_stuck_past_request_timeout_gets_its_worker_replaced() {
    let dir = TestDir::new("rt-inline");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let extra = "request_timeout = \"2s\"\nstop_timeout = \"60s\"";
    let config = one_group_config(&handler, 2, extra).replace(
        "run_dir = \"run\"\n",
        "run_dir = \"run\"\nadmin = \"127.0.0.1:0\"\n",
    );
    let mut host = Host::start(dir, &config);
    let before = host.worker_pids();
    let addr = host.addr;
    let slow = std::thread::spawn(move || request(addr, "GET", "/sleep?ms=60000", b""));
    let mut stuck = None;
    wait_until("the slow request is in flight", || {
        stuck = busy_worker(&host);
        stuck.is_some()
    });
    let stuck = stuck.unwrap();
    // The other worker serves meanwhile.
    assert_eq!(get(host.addr, "/").status, 200);

    let started = replaced(&mut host, stuck, &before);
    assert_eq!(started.len(), 1, "one replacement: {started:?}");
    let log = host.log();
    let ready = ready_line(&log, started[0]).expect("the replacement's ready line");
    let killed = log
        .lines()
        .position(|l| l.contains("stuck worker killed") && l.contains(&format!("pid={stuck}")))
        .unwrap_or_else(|| panic!("no kill line for {stuck}; log:\n{log}"));
    assert!(
        ready < killed,
        "killed before its replacement was ready:\n{log}"
    );
    assert!(
        log.contains("worker stuck in a handler call for"),
        "no warning; log:\n{log}"
    );
    // Its connection is reset: inline dispatch cannot answer it.
    assert!(slow.join().unwrap().is_err());
    assert_counted(&host, 1);
    assert_eq!(get(host.addr, "/").status, 200);
}

#[test]
fn a_pool_call_stuck_past_request_timeout_is_answered_503_and_its_worker_replaced() {
    let dir = TestDir::new("rt-pool");
    let handler = dir.install(Variant::Faulty("cued"), "handler.so");
    let hold = dir.path.join("hold-requests");
    let extra = format!(
        "dispatch = \"pool\"\nrequest_timeout = \"1s\"\nstop_timeout = \"60s\"\n[group.settings]\nhold_requests_while = {:?}\n",
        hold.display().to_string()
    );
    let config = one_group_config(&handler, 1, &extra).replace(
        "run_dir = \"run\"\n",
        "run_dir = \"run\"\nadmin = \"127.0.0.1:0\"\n",
    );
    let mut host = Host::start(dir, &config);
    std::fs::write(&hold, "").unwrap();
    let before = host.worker_pids();
    let reply = request(host.addr, "GET", "/hold", b"")
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", host.log()));
    assert_eq!(reply.status, 503, "{reply:?}");

    let started = replaced(&mut host, before[0], &before);
    assert_eq!(started.len(), 1, "one replacement: {started:?}");
    let log = host.log();
    assert!(
        log.contains("handler call(s) ran past request_timeout"),
        "no warning; log:\n{log}"
    );
    assert_counted(&host, 1);
    std::fs::remove_file(&hold).unwrap();
    assert_eq!(get(host.addr, "/").status, 200);
}

#[test]
fn a_slow_request_body_on_a_live_event_loop_is_not_a_stuck_call() {
    // In flight for longer than request_timeout plus the heartbeat's
    // slack, but the handler is not called until the body is in.
    let dir = TestDir::new("rt-slow-body");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let host = Host::start(
        dir,
        &one_group_config(&handler, 1, "request_timeout = \"1s\""),
    );
    let before = host.worker_pids();
    let mut slow = TcpStream::connect(host.addr).unwrap();
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = "POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 20\r\n\r\n";
    slow.write_all(head.as_bytes()).unwrap();
    for byte in b"slow-body-still-here" {
        std::thread::sleep(std::time::Duration::from_millis(250));
        slow.write_all(&[*byte]).unwrap();
    }
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("slow-body-still-here"), "{answer}");
    assert_eq!(host.worker_pids(), before);
    assert_eq!(host.status()["groups"][0]["request_timeouts"], 0);
}

#[test]
fn without_request_timeout_a_long_request_is_left_alone() {
    let dir = TestDir::new("rt-unset");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let host = Host::start(dir, &one_group_config(&handler, 1, ""));
    let before = host.worker_pids();
    // Longer than a 1 s timeout plus the heartbeat's slack: a default that
    // is not off would replace the worker and reset this request.
    assert_eq!(get(host.addr, "/sleep?ms=5000").body, "slept 5000 ms");
    assert_eq!(host.worker_pids(), before);
    assert_eq!(host.status()["groups"][0]["request_timeouts"], 0);
    assert!(!host.log().contains("request_timeout"));
}
