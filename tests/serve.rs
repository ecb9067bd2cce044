//! Serving: the real `host` binary, real handler builds, real sockets.

mod support;

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;

use nix::sys::signal::Signal;
use support::*;

fn start_sample(name: &str, count: usize, extra: &str) -> Host {
    let dir = TestDir::new(name);
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let config = one_group_config(&handler, count, extra);
    Host::start(dir, &config)
}

/// One worker with `extra` group settings and an admin address.
fn start_with_admin(name: &str, extra: &str) -> Host {
    let dir = TestDir::new(name);
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let config = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        one_group_config(&handler, 1, extra)
    );
    Host::start(dir, &config)
}

#[test]
fn serves_the_sample_routes() {
    let host = start_sample("routes", 2, "");
    let hello = get(host.addr, "/");
    assert_eq!(hello.status, 200);
    assert_eq!(hello.body, "hello from sample-handler v1");
    assert_eq!(get(host.addr, "/version").body, "v1");
    let echo = request(host.addr, "POST", "/echo", b"some bytes").unwrap();
    assert_eq!((echo.status, echo.body.as_str()), (200, "some bytes"));
    // A body many times the worker's write buffer (sent in pieces) comes
    // back whole, with its length.
    let large: Vec<u8> = (0..200_001u32)
        .map(|i| b"0123456789abcdefghijklmnopqrstuvwxyz"[i as usize % 36])
        .collect();
    let echo = request(host.addr, "POST", "/echo", &large).unwrap();
    assert_eq!(echo.status, 200);
    assert!(
        echo.headers.contains("content-length: 200001"),
        "{}",
        echo.headers
    );
    assert!(
        echo.body.as_bytes() == large.as_slice(),
        "the large echo differs"
    );
    assert_eq!(get(host.addr, "/sleep?ms=5").body, "slept 5 ms");
    assert_eq!(get(host.addr, "/sleep?ms=oops").status, 400);
    assert_eq!(get(host.addr, "/nowhere").status, 404);
    let status = host.status();
    assert_eq!(status["groups"][0]["version"].as_str().unwrap().len(), 12);
    assert_eq!(status["workers"][0]["handler_version"], "v1");
}

#[test]
fn several_workers_share_the_load() {
    let host = start_sample("share", 2, "");
    let workers: HashSet<u32> = host.worker_pids().into_iter().collect();
    let mut seen = HashSet::new();
    let mut served_ok = 0;
    // Which worker accepts a connection is the kernel's choice: keep sending
    // batches on fresh connections until every worker has answered.
    wait_until("every worker answered some requests", || {
        let mut config = loadgen::LoadConfig::new(host.addr);
        config.connections = 8;
        config.keep_alive = false;
        config.path = "/pid".into();
        config.max_requests = Some(200);
        let report = loadgen::LoadRun::start(config).wait();
        assert_eq!(report.failed(), 0, "{report:?}");
        served_ok += report.ok;
        seen.extend(
            report
                .bodies
                .keys()
                .map(|body| body.parse::<u32>().unwrap()),
        );
        seen == workers
    });
    // The counters in status add up to what was served.
    let served: u64 = host.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum();
    assert!(
        served >= served_ok,
        "status counts {served} < {served_ok} served"
    );
}

/// Open connections per worker, in status order.
fn connections_per_worker(host: &Host) -> Vec<u64> {
    host.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["connections"].as_u64().unwrap())
        .collect()
}

/// The pid of the worker serving a keep-alive connection (`GET /pid` on it).
fn pid_behind(stream: &mut TcpStream) -> u32 {
    stream
        .write_all(b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap();
            if body.len() == length {
                return body.parse().unwrap();
            }
        }
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the answer: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn keep_alive_connections_spread_evenly_over_the_workers() {
    let host = start_sample("spread", 4, "");
    // One at a time, each answered before the next opens: every worker is
    // idle, so without the spread rule the first worker waiting on the
    // listener would take them all.
    let mut open: Vec<TcpStream> = (0..20)
        .map(|_| idle_connection(host.addr, "/", "v1"))
        .collect();
    let mut counts = Vec::new();
    wait_until("the 20 connections are counted", || {
        counts = connections_per_worker(&host);
        counts.iter().sum::<u64>() == 20
    });
    assert!(counts.iter().all(|n| (4..=6).contains(n)), "{counts:?}");

    // Close every connection of the first worker: the next ones go mostly
    // to it, until it has caught up with the others.
    let first = host.worker_pids()[0];
    open.retain_mut(|stream| pid_behind(stream) != first);
    wait_until("the first worker's connections are closed", || {
        connections_per_worker(&host)[0] == 0
    });
    let left = open.len() as u64;
    for _ in 0..20 {
        open.push(idle_connection(host.addr, "/", "v1"));
    }
    wait_until("the new connections are counted", || {
        counts = connections_per_worker(&host);
        counts.iter().sum::<u64>() == left + 20
    });
    // 35 over 4: 8 or 9 each, one more or less for a worker that was
    // already waiting on the listener when the first one's connections
    // closed.
    assert!(counts.iter().all(|n| (7..=10).contains(n)), "{counts:?}");
}

#[test]
fn a_worker_stuck_in_a_long_call_does_not_hold_up_new_connections() {
    // Idle connections stay open for the whole test.
    let host = start_sample("spread-stuck", 2, "header_timeout = \"600s\"");
    let mut open: Vec<TcpStream> = (0..4)
        .map(|_| idle_connection(host.addr, "/", "v1"))
        .collect();
    wait_until("the 4 connections are counted", || {
        connections_per_worker(&host) == [2, 2]
    });
    // The first worker's go: it is then the only one at or below the
    // average, and the slow request below goes to it.
    let pids = host.worker_pids();
    open.retain_mut(|stream| pid_behind(stream) != pids[0]);
    wait_until("the first worker's connections are closed", || {
        connections_per_worker(&host) == [0, 2]
    });
    let addr = host.addr;
    let slow = std::thread::spawn(move || get(addr, "/sleep?ms=60000"));
    wait_until("the slow request is in flight", || {
        host.status()["workers"][0]["in_flight"].as_u64().unwrap() > 0
    });
    // The first worker (1 connection, stuck) is still the one below the
    // average of 1.5; the second must take new connections regardless.
    let quick = get(addr, "/pid");
    assert_eq!(quick.body, pids[1].to_string());
    assert!(!slow.is_finished(), "answered only after the slow request");
    drop(open);
}

#[test]
fn a_panicking_request_gets_500_and_the_worker_keeps_serving() {
    let host = start_sample("panic", 1, "");
    let pid = host.worker_pids()[0];
    let reply = get(host.addr, "/panic");
    assert_eq!(reply.status, 500);
    assert_eq!(get(host.addr, "/pid").body, pid.to_string());
    assert_eq!(host.worker_pids(), vec![pid]);
    wait_until("the panic is logged through the host", || {
        host.log().contains("/panic was requested")
    });
}

#[test]
fn oversized_bodies_and_heads_are_refused_with_4xx() {
    let host = start_sample(
        "limits",
        1,
        "max_body_bytes = 1024\nmax_header_bytes = 8192",
    );
    let big = vec![b'x'; 4096];
    assert_eq!(
        request(host.addr, "POST", "/echo", &big).unwrap().status,
        413
    );
    // A real route, with a head four times the limit.
    let mut stream = TcpStream::connect(host.addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nX-Padding: {}\r\n\r\n",
        host.addr,
        "a".repeat(32 * 1024)
    );
    // The server may answer and close before it has read the whole head.
    let _ = stream.write_all(head.as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 431 "),
        "an oversized head gets 431: {answer:?}"
    );
    // The same head within the limit is served.
    let small = request(host.addr, "GET", "/", b"").unwrap();
    assert_eq!(small.status, 200);
    let pid = host.worker_pids()[0];
    assert_eq!(get(host.addr, "/pid").body, pid.to_string());
}

/// Reads until the server closes the connection; a read timeout (the
/// server never closed it) fails the test.
fn assert_closed_by_server(stream: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: the server never closed the connection: {e}"),
    }
}

#[test]
fn connections_that_wait_past_the_header_timeout_are_closed() {
    let host = start_with_admin("header-timeout", "header_timeout = \"1s\"");
    // A head that never ends (slowloris) and an idle keep-alive client.
    let mut partial = TcpStream::connect(host.addr).unwrap();
    partial.set_read_timeout(Some(DEADLINE)).unwrap();
    partial
        .write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\nX-Slow: ", host.addr).as_bytes())
        .unwrap();
    let mut idle = idle_connection(host.addr, "/version", "v1");
    assert_closed_by_server(&mut partial, "an unfinished head");
    assert_closed_by_server(&mut idle, "an idle keep-alive connection");
    let text = metrics(&host.admin());
    let counted = "host_timeouts_total{group=\"web\",kind=\"header\"}";
    assert_eq!(metric(&text, counted), 2, "{text}");
    // A request busy longer than the timeout is not a waiting connection.
    assert_eq!(get(host.addr, "/sleep?ms=2500").status, 200);
    assert_eq!(get(host.addr, "/").status, 200);
}

#[test]
fn a_stalled_request_body_gets_408_and_a_slow_one_completes() {
    let host = start_with_admin("body-timeout", "body_timeout = \"2s\"");
    let head = |length: usize| {
        format!(
            "POST /echo HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n",
            host.addr
        )
    };
    // 5 of 100 bytes, then nothing.
    let mut stalled = TcpStream::connect(host.addr).unwrap();
    stalled.set_read_timeout(Some(DEADLINE)).unwrap();
    stalled.write_all(head(100).as_bytes()).unwrap();
    stalled.write_all(b"hello").unwrap();
    let mut answer = String::new();
    stalled
        .read_to_string(&mut answer)
        .expect("an answer, then the server closes");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let text = metrics(&host.admin());
    let counted = "host_timeouts_total{group=\"web\",kind=\"body\"}";
    assert_eq!(metric(&text, counted), 1, "{text}");
    // A byte every 250 ms: 3 s in all, longer than the timeout, but never
    // a pause anywhere near it.
    let mut slow = TcpStream::connect(host.addr).unwrap();
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    slow.write_all(head(12).as_bytes()).unwrap();
    for byte in b"slow-but-on!" {
        std::thread::sleep(std::time::Duration::from_millis(250));
        slow.write_all(&[*byte]).unwrap();
    }
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("slow-but-on!"), "{answer}");
    assert_eq!(get(host.addr, "/").status, 200);
}

#[test]
fn pool_dispatch_keeps_serving_while_a_call_is_held() {
    let (host, hold) = start_holding("pool");
    let held = hold_request(&host);
    // With one worker and inline dispatch this would wait for the release.
    let reply = get(host.addr, "/");
    assert_eq!(reply.body, "faulty-handler ok");
    assert!(!held.is_finished(), "answered before it was released");
    assert_eq!(host.status()["workers"][0]["in_flight"], 1);
    std::fs::remove_file(&hold).unwrap();
    assert_eq!(held.join().unwrap().unwrap().body, "released");
}

#[test]
fn a_killed_worker_is_replaced() {
    let mut host = start_sample("kill9", 2, "");
    let before = host.worker_pids();
    kill(before[0], Signal::SIGKILL);
    wait_until("the killed worker is replaced", || {
        let pids = host.worker_pids();
        pids.len() == 2 && !pids.contains(&before[0])
    });
    host.wait_all_ready();
    assert_eq!(host.status()["restarts"], 1);
    assert_eq!(get(host.addr, "/").status, 200);
    wait_until("the exit is logged with its signal", || {
        host.log().contains("killed by SIGKILL")
    });
}

#[test]
fn workers_exit_when_the_master_dies() {
    let mut host = start_sample("orphans", 2, "");
    let workers = host.worker_pids();
    host.signal(Signal::SIGKILL);
    host.wait_exit();
    wait_until("every worker is gone", || {
        workers.iter().all(|pid| !alive(*pid))
    });
    assert!(processes_of(&host.dir).is_empty());
}

#[test]
fn stop_ends_every_process() {
    let mut host = start_sample("stop", 2, "");
    let workers = host.worker_pids();
    let output = host.cli(&["stop"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(host.wait_exit().success());
    assert!(workers.iter().all(|pid| !alive(*pid)));
    assert!(processes_of(&host.dir).is_empty());
    assert!(!host.dir.path.join("run/control.sock").exists());
}

/// One worker of the cue handler (pool dispatch) whose `GET /hold` stays
/// in flight while the returned file exists.
fn start_holding(name: &str) -> (Host, std::path::PathBuf) {
    let dir = TestDir::new(name);
    let handler = dir.install(Variant::Faulty("cued"), "handler.so");
    let hold = dir.path.join("hold-requests");
    let extra = format!(
        "dispatch = \"pool\"\nstop_timeout = \"60s\"\n[group.settings]\nhold_requests_while = {:?}\n",
        hold.display().to_string()
    );
    let host = Host::start(dir, &one_group_config(&handler, 1, &extra));
    std::fs::write(&hold, "").unwrap();
    (host, hold)
}

/// `GET /hold` on another thread, once the worker counts it in flight.
fn hold_request(host: &Host) -> std::thread::JoinHandle<std::io::Result<Reply>> {
    let addr = host.addr;
    let held = std::thread::spawn(move || request(addr, "GET", "/hold", b""));
    wait_until("the held request is in flight", || {
        held.is_finished() || host.status()["workers"][0]["in_flight"] == 1
    });
    assert!(!held.is_finished(), "the held request was answered at once");
    held
}

#[test]
fn sigterm_stops_gracefully_and_sigint_stops_fast() {
    // SIGTERM: the request in flight is answered before the master exits.
    let (mut host, hold) = start_holding("sigterm");
    let workers = host.worker_pids();
    let held = hold_request(&host);
    host.signal(Signal::SIGTERM);
    wait_until("the master is stopping", || {
        host.log().contains("stopping graceful=true")
    });
    assert!(
        alive(host.pid()) && alive(workers[0]),
        "a graceful stop left before its request was answered; log:\n{}",
        host.log()
    );
    assert!(!held.is_finished(), "answered before it was released");
    std::fs::remove_file(&hold).unwrap();
    let reply = held
        .join()
        .unwrap()
        .expect("answered across a graceful stop");
    assert_eq!((reply.status, reply.body.as_str()), (200, "released"));
    assert!(host.wait_exit().success(), "sigterm: {}", host.log());
    wait_until("every worker is gone", || {
        workers.iter().all(|pid| !alive(*pid))
    });

    // SIGINT: the master and its worker go with the request still held.
    let (mut host, hold) = start_holding("sigint");
    let workers = host.worker_pids();
    let held = hold_request(&host);
    host.signal(Signal::SIGINT);
    assert!(host.wait_exit().success(), "sigint: {}", host.log());
    wait_until("every worker is gone", || {
        workers.iter().all(|pid| !alive(*pid))
    });
    assert!(hold.exists(), "the request was never released");
    let reply = held.join().unwrap();
    assert!(
        reply.is_err(),
        "a fast stop does not wait for a request in flight: {reply:?}"
    );
}

#[test]
fn status_reports_workers_in_text_and_json() {
    let host = start_sample("status", 2, "");
    for _ in 0..5 {
        assert_eq!(get(host.addr, "/").status, 200);
    }
    let status = host.status();
    assert_eq!(status["pid"].as_u64().unwrap() as u32, host.pid());
    assert_eq!(status["reloading"], false, "{status}");
    assert_eq!(status["restarts"], 0, "{status}");
    let group = &status["groups"][0];
    assert_eq!(group["name"], "web", "{status}");
    assert_eq!(group["count"], 2, "{status}");
    assert_eq!(group["ready"], 2, "{status}");
    assert_eq!(group["listen"], host.addr.to_string(), "{status}");
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{status}");
    let mut slots: Vec<u64> = workers
        .iter()
        .map(|w| w["slot"].as_u64().unwrap())
        .collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1], "{status}");
    let mut requests = 0;
    for worker in workers {
        assert_eq!(worker["group"], "web", "{worker}");
        assert_eq!(worker["state"], "ready", "{worker}");
        assert_eq!(worker["version"], group["version"], "{worker}");
        assert_eq!(worker["handler_version"], "v1", "{worker}");
        assert_eq!(worker["in_flight"], 0, "{worker}");
        assert!(worker["uptime_secs"].as_f64().unwrap() > 0.0, "{worker}");
        assert!(worker["rss_bytes"].as_u64().unwrap() > 0, "{worker}");
        assert!(alive(worker["pid"].as_u64().unwrap() as u32), "{worker}");
        requests += worker["requests"].as_u64().unwrap();
    }
    assert_eq!(requests, 5, "{status}");

    let output = host.cli(&["status"]);
    assert!(output.status.success(), "{}", text(&output));
    let shown = text(&output);
    for worker in workers {
        let pid = worker["pid"].to_string();
        let line = shown
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(pid.as_str()))
            .unwrap_or_else(|| panic!("no line for pid {pid}: {shown}"));
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(columns[0], "web", "{line}");
        assert_eq!(columns[1], worker["slot"].to_string(), "{line}");
        assert_eq!(columns[3], "ready", "{line}");
        assert_eq!(Some(columns[4]), worker["version"].as_str(), "{line}");
        assert_eq!(columns[5], "v1", "{line}");
    }
    assert!(shown.contains("2/2 ready"), "{shown}");
}

#[test]
fn crash_restarts_back_off_on_a_crash_loop_and_reset_after_a_healthy_run() {
    let dir = TestDir::new("backoff");
    let handler = dir.install(Variant::Faulty("cued"), "handler.so");
    let crash = dir.path.join("crash");
    let extra = format!(
        "[group.settings]\nexit_while = {:?}\n",
        crash.display().to_string()
    );
    let config = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        one_group_config(&handler, 1, &extra)
    );
    let host = Host::start(dir, &config);
    let admin = host.admin();
    let starts = || metric(&metrics(&admin), "host_worker_starts_total{group=\"web\"}");
    // The delays the master chose, in order, from its log.
    let delays = || -> Vec<u64> {
        host.log()
            .lines()
            .filter_map(|l| l.split_once("restarting in ").map(|(_, rest)| rest))
            .map(|rest| rest.split_once(" ms").unwrap().0.parse().unwrap())
            .collect()
    };

    // A crash loop: every worker exits right after its start.
    std::fs::write(&crash, "").unwrap();
    wait_until("five workers have been started", || starts() >= 5);
    let loop_delays = delays();
    assert!(
        loop_delays.len() >= 4 && loop_delays[..4] == [200, 400, 800, 1600],
        "the restart delay doubles while workers keep dying: {loop_delays:?}; log:\n{}",
        host.log()
    );

    // A healthy run: a worker that stays up longer than the 5 s the master
    // calls a quick death (counted from when this test first saw it ready,
    // which is no earlier than when it was).
    std::fs::remove_file(&crash).unwrap();
    // (A worker that saw the file just before it went still exits: the
    // watch starts over with whichever worker is ready next.)
    let mut healthy: Option<(u32, std::time::Instant)> = None;
    wait_until("a worker has lived past a quick death", || {
        let status = host.status();
        let ready = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["state"] == "ready")
            .map(|w| w["pid"].as_u64().unwrap() as u32);
        healthy = match (ready, healthy) {
            (Some(pid), Some((seen, since))) if pid == seen => Some((seen, since)),
            (Some(pid), _) => Some((pid, std::time::Instant::now())),
            (None, _) => None,
        };
        healthy.is_some_and(|(_, since)| since.elapsed() > std::time::Duration::from_secs(6))
    });
    let healthy = healthy.unwrap().0;
    assert_eq!(host.worker_pids(), [healthy]);
    let before = delays().len();

    // Its death is not part of the loop: the next quick death starts over.
    std::fs::write(&crash, "").unwrap();
    wait_until("a crash after the healthy run is given a delay", || {
        delays().len() > before
    });
    let after = delays();
    assert_eq!(
        after[before],
        200,
        "the delay starts over after a healthy run: {after:?}; log:\n{}",
        host.log()
    );
    std::fs::remove_file(&crash).unwrap();
    let mut host = host;
    host.wait_all_ready();
    assert_eq!(get(host.addr, "/").body, "faulty-handler ok");
}
