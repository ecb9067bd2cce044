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
    let long_path = format!("/{}", "a".repeat(20_000));
    let reply = request(host.addr, "GET", &long_path, b"");
    // hyper answers 431 or closes; either way no 2xx and the worker lives.
    if let Ok(reply) = reply {
        assert!(reply.status >= 400, "{reply:?}");
    }
    assert_eq!(get(host.addr, "/").status, 200);
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
fn pool_dispatch_keeps_serving_while_a_call_sleeps() {
    let host = start_sample("pool", 1, "dispatch = \"pool\"\npool_threads = 4");
    let addr = host.addr;
    let slow = std::thread::spawn(move || get(addr, "/sleep?ms=3000"));
    wait_until("the slow request is in flight", || {
        host.status()["workers"][0]["in_flight"].as_u64().unwrap() >= 1
    });
    // With one worker and inline dispatch this would wait for the sleep.
    assert_eq!(get(host.addr, "/version").body, "v1");
    assert!(host.status()["workers"][0]["in_flight"].as_u64().unwrap() >= 1);
    assert_eq!(slow.join().unwrap().status, 200);
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

#[test]
fn sigterm_stops_gracefully_and_sigint_stops_fast() {
    for (name, signal) in [("sigterm", Signal::SIGTERM), ("sigint", Signal::SIGINT)] {
        let mut host = start_sample(name, 2, "");
        let workers = host.worker_pids();
        host.signal(signal);
        assert!(host.wait_exit().success(), "{name}: {}", host.log());
        wait_until("every worker is gone", || {
            workers.iter().all(|pid| !alive(*pid))
        });
    }
}

#[test]
fn status_reports_workers_in_text_and_json() {
    let host = start_sample("status", 2, "");
    let output = host.cli(&["status"]);
    assert!(output.status.success());
    let shown = text(&output);
    for pid in host.worker_pids() {
        assert!(shown.contains(&pid.to_string()), "{shown}");
    }
    assert!(shown.contains("ready"), "{shown}");
    let status = host.status();
    assert_eq!(status["pid"].as_u64().unwrap() as u32, host.pid());
    let worker = &status["workers"][0];
    for key in [
        "group",
        "slot",
        "pid",
        "state",
        "version",
        "uptime_secs",
        "requests",
        "in_flight",
        "rss_bytes",
    ] {
        assert!(!worker[key].is_null(), "status JSON lacks {key}: {worker}");
    }
    assert!(worker["rss_bytes"].as_u64().unwrap() > 0);
}
