//! Faults an operator meets: an orphaned worker, a frozen one killed at its
//! stop timeout, `gc` next to a crash loop or a rollback, labels deployed
//! twice or at once, a user the control socket refuses, running out of file
//! descriptors, and a reload asked while the host stops.

mod support;

use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use nix::sys::signal::Signal;
use support::*;

fn cli_ok(dir: &TestDir, args: &[&str]) -> String {
    let output = host_command(dir, args);
    assert!(output.status.success(), "host {args:?}: {}", text(&output));
    text(&output)
}

/// The full hash `host deploy` printed.
fn deployed_hash(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("sha256 "))
        .unwrap_or_else(|| panic!("no sha256 line in {output}"))
        .trim()
        .to_owned()
}

fn config_on_port(handler: &std::path::Path, port: u16, extra: &str) -> String {
    format!(
        "run_dir = \"run\"\n\n[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:{port}\"\ncount = 1\nhandler = {:?}\n{extra}\n",
        handler.display().to_string()
    )
}

#[test]
fn an_orphaned_worker_frees_the_port_at_once_and_finishes_its_request() {
    let port = free_port();
    let dir = TestDir::new("orphan");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let mut host = Host::start(
        dir,
        &config_on_port(&handler, port, "stop_timeout = \"30s\""),
    );
    let worker = host.worker_pids()[0];
    let addr = host.addr;
    // Inline dispatch: the request blocks the worker's event loop.
    let slow = std::thread::spawn(move || request(addr, "GET", "/sleep?ms=8000", b""));
    wait_until("the slow request is in flight", || {
        host.status()["workers"][0]["in_flight"].as_u64() == Some(1)
    });
    host.signal(Signal::SIGKILL);
    host.wait_exit();

    wait_until("the port is free again", || {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    });
    assert!(
        !slow.is_finished(),
        "the port was only freed once the request ended"
    );
    let dir = TestDir::new("orphan-successor");
    let handler = dir.install(Variant::SampleV2, "handler.so");
    let successor = Host::start(dir, &config_on_port(&handler, port, ""));
    assert_all_serve(&successor, "v2");

    let reply = slow
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!((reply.status, reply.body.as_str()), (200, "slept 8000 ms"));
    wait_until("the orphaned worker exits", || !alive(worker));
}

#[test]
fn a_frozen_worker_killed_at_its_stop_timeout_reports_its_connections() {
    let dir = TestDir::new("frozen");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let host = Host::start(
        dir,
        &format!(
            "admin = \"127.0.0.1:0\"\n{}",
            one_group_config(&handler, 1, "stop_timeout = \"1s\"\nlame_duck = \"100ms\"")
        ),
    );
    let idle: Vec<TcpStream> = (0..5)
        .map(|_| idle_connection(host.addr, "/version", "v1"))
        .collect();
    wait_until("the worker counts 5 connections", || {
        host.status()["workers"][0]["connections"].as_u64() == Some(5)
    });
    let old = host.worker_pids()[0];
    kill(old, Signal::SIGSTOP);
    host.dir.install(Variant::SampleV2, "handler.so");
    let output = host.cli(&["reload"]);
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains(&format!(
            "killed web/0 pid {old} at its stop timeout with 5 connection(s) open and 0 request(s) in flight"
        )),
        "{shown}"
    );
    let metrics = metrics(&host.admin());
    assert_eq!(
        metric(&metrics, "host_killed_connections_total{group=\"web\"}"),
        5,
        "{metrics}"
    );
    drop(idle);
}

#[test]
fn gc_keeps_the_version_of_a_slot_in_crash_backoff() {
    let dir = TestDir::new("gc-backoff");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let host = Host::start(dir, &one_group_config(&handler, 1, ""));
    let v2 = host.dir.install(Variant::SampleV2, "v2.so");
    cli_ok(&host.dir, &["deploy", v2.to_str().unwrap()]);
    // Quick deaths push the slot's restart further out each time, until a
    // status shows no worker at all.
    let mut empty = false;
    for _ in 0..10 {
        let pid = {
            let mut pid = None;
            wait_until("a worker is ready", || {
                pid = host.status()["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|w| w["state"] == "ready")
                    .and_then(|w| w["pid"].as_u64());
                pid.is_some()
            });
            pid.unwrap() as u32
        };
        kill(pid, Signal::SIGKILL);
        wait_until("the worker is gone", || !alive(pid));
        if host.status()["workers"].as_array().unwrap().is_empty() {
            empty = true;
            break;
        }
    }
    assert!(empty, "the slot never waited in backoff");
    let shown = cli_ok(&host.dir, &["gc", "--keep", "0"]);
    assert!(shown.contains("1 version(s) removed, 1 kept"), "{shown}");
    wait_serving(&host, "v1");
}

#[test]
fn gc_keeps_the_rollback_target() {
    let dir = TestDir::new("gc-rollback");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let host = Host::start(dir, &one_group_config(&handler, 1, ""));
    let v2 = host.dir.install(Variant::SampleV2, "v2.so");
    let a = deployed_hash(&cli_ok(&host.dir, &["deploy", handler.to_str().unwrap()]));
    let b = deployed_hash(&cli_ok(&host.dir, &["deploy", v2.to_str().unwrap()]));
    cli_ok(&host.dir, &["reload", "--to", &a[..16]]);
    cli_ok(&host.dir, &["reload", "--to", &b[..16]]);
    wait_serving(&host, "v2");
    let shown = cli_ok(&host.dir, &["gc", "--keep", "0"]);
    assert!(shown.contains("0 version(s) removed"), "{shown}");
    cli_ok(&host.dir, &["rollback"]);
    wait_serving(&host, "v1");
    assert_all_serve(&host, "v1");
}

#[test]
fn labels_are_valid_unique_and_never_silently_replaced() {
    let dir = TestDir::new("labels");
    let v1 = dir.install(Variant::SampleV1, "v1.so");
    let v2 = dir.install(Variant::SampleV2, "v2.so");
    dir.write("host.toml", one_group_config(&v1, 1, ""));
    let deploy = |file: &std::path::Path, label: &str| {
        host_command(&dir, &["deploy", file.to_str().unwrap(), "--label", label])
    };
    let refused = |output: std::process::Output, expected: &str| {
        let shown = text(&output);
        assert!(!output.status.success(), "accepted: {shown}");
        assert!(shown.contains(expected), "expected {expected:?} in {shown}");
    };
    assert!(deploy(&v1, "x").status.success());
    refused(deploy(&v2, "x"), "label \"x\" already names version");
    refused(deploy(&v2, ""), "is not valid");
    refused(deploy(&v2, "2709"), "only hex digits");
    refused(deploy(&v1, "y"), "is already labelled \"x\"");
    assert!(
        deploy(&v1, "x").status.success(),
        "the same label again is fine"
    );

    // Two deploys of one build with two labels at once: one wins, the
    // other says why; neither is lost silently.
    let spawn = |label: &str| {
        let mut command = Command::new(host_bin());
        command
            .current_dir(&dir.path)
            .args(["deploy", v2.to_str().unwrap(), "--label", label, "-c"])
            .arg(dir.path.join("host.toml"));
        run_bounded(command)
    };
    let (p, q) = std::thread::scope(|s| {
        let p = s.spawn(|| spawn("p"));
        let q = s.spawn(|| spawn("q"));
        (p.join().unwrap(), q.join().unwrap())
    });
    assert!(
        p.status.success() != q.status.success(),
        "p: {}\nq: {}",
        text(&p),
        text(&q)
    );
    let winner = if p.status.success() { "p" } else { "q" };
    let output = host_command(&dir, &["versions", "--json"]);
    let versions: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let labels: Vec<&str> = versions
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["label"].as_str())
        .collect();
    assert_eq!(labels.len(), 2, "{versions}");
    assert!(
        labels.contains(&"x") && labels.contains(&winner),
        "{versions}"
    );
}

#[test]
fn a_user_the_control_socket_refuses_is_told_why() {
    if !root_or_skip(
        "a_user_the_control_socket_refuses_is_told_why",
        "to run the CLI as another uid",
    ) {
        return;
    }
    let dir = TestDir::new("peer-cred");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let host = Host::start(dir, &one_group_config(&handler, 1, ""));
    let run = host.dir.path.join("run");
    let as_other_user = || {
        let mut command = Command::new(host_bin());
        command
            .current_dir(&host.dir.path)
            .args(["status", "-c"])
            .arg(host.dir.path.join("host.toml"))
            .uid(54321)
            .gid(54321);
        run_bounded(command)
    };
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    // The socket's mode stops them first...
    let output = as_other_user();
    assert!(!output.status.success());
    assert_says(&output, "permission denied on the control socket");
    assert_says(&output, "host runs as uid 0");
    // ...and where a socket's mode is not honoured, the peer check does.
    std::fs::set_permissions(
        run.join("control.sock"),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let output = as_other_user();
    assert!(!output.status.success());
    assert_says(&output, "permission denied: host runs as uid 0");
}

#[test]
fn running_out_of_file_descriptors_is_logged_once_counted_and_survived() {
    let dir = TestDir::new("emfile");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let config = format!(
        "admin = \"127.0.0.1:0\"\n{}",
        one_group_config(&handler, 1, "")
    );
    let host = Host::start_with(dir, &config, |command| {
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 64,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let admin = host.admin();
    let clients: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(host.addr).unwrap())
        .collect();
    wait_until("accept failures are counted", || {
        metric(&metrics(&admin), "host_accept_errors_total{group=\"web\"}") >= 20
    });
    let logged = host.log().matches("accept failed").count();
    assert!(
        (1..=2).contains(&logged),
        "{logged} lines for 20+ failures:\n{}",
        host.log()
    );
    drop(clients);
    wait_until("the worker accepts again", || {
        request(host.addr, "GET", "/version", b"").is_ok_and(|r| r.body == "v1")
    });
}

#[test]
fn a_reload_while_the_host_stops_is_refused_once_and_clearly() {
    let dir = TestDir::new("reload-while-stopping");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let mut host = Host::start(
        dir,
        &one_group_config(&handler, 1, "stop_timeout = \"30s\""),
    );
    let addr = host.addr;
    let slow = std::thread::spawn(move || request(addr, "GET", "/sleep?ms=4000", b""));
    wait_until("the slow request is in flight", || {
        host.status()["workers"][0]["in_flight"].as_u64() == Some(1)
    });
    host.signal(Signal::SIGTERM);
    wait_until("the worker drains", || {
        host.try_status()["workers"][0]["state"] == "draining"
    });
    let output = host.cli(&["reload"]);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(
        shown.contains("reload refused: host is starting or stopping"),
        "{shown}"
    );
    assert_eq!(shown.matches("refused").count(), 1, "{shown}");
    assert_eq!(slow.join().unwrap().unwrap().status, 200);
    host.wait_exit();
}
