//! Rolling reload: zero failed requests under keep-alive load, bounded
//! time, bad builds refused with the worker's own error, and `host reload`
//! reporting what happened.

mod support;

use std::io::Read as _;
use std::process::Output;

use loadgen::{LoadReport, LoadRun};
use nix::sys::signal::Signal;
use support::*;

fn finish(run: LoadRun) -> LoadReport {
    let report = run.stop();
    assert!(report.ok > 0, "{report:?}");
    report
}

fn start_with(name: &str, variant: Variant, count: usize, extra: &str) -> Host {
    let dir = TestDir::new(name);
    let handler = dir.install(variant, "handler.so");
    Host::start(dir, &one_group_config(&handler, count, extra))
}

fn reload(host: &Host) -> Output {
    host.cli(&["reload"])
}

fn group_version(host: &Host) -> String {
    host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A request that stays in flight `ms` (the worker's in-flight count shows it).
fn slow_request_in_flight(host: &Host, path: &'static str) -> std::thread::JoinHandle<Reply> {
    let addr = host.addr;
    let slow = std::thread::spawn(move || get(addr, path));
    wait_until("the slow request is in flight", || {
        host.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["in_flight"].as_u64().unwrap() > 0)
    });
    slow
}

/// `host reload` on another thread.
fn reload_in_background(host: &Host) -> std::thread::JoinHandle<Output> {
    let config = host.dir.path.join("host.toml");
    std::thread::spawn(move || {
        std::process::Command::new(host_bin())
            .args(["reload", "-c"])
            .arg(config)
            .output()
            .unwrap()
    })
}

#[test]
fn reloads_under_keepalive_load_fail_no_request() {
    let host = start_with("rolling", Variant::SampleV1, 4, "");
    let load = steady_load(host.addr, 32);
    let mut expected = "v1";
    for round in 0..4 {
        let (variant, version) = if round % 2 == 0 {
            (Variant::SampleV2, "v2")
        } else {
            (Variant::SampleV1, "v1")
        };
        let before = group_version(&host);
        host.dir.install(variant, "handler.so");
        let output = reload(&host);
        assert!(output.status.success(), "reload {round}: {}", text(&output));
        let shown = text(&output);
        assert!(shown.contains("reload ok"), "{shown}");
        assert_eq!(
            shown.matches(" -> pid ").count(),
            4,
            "one line per replaced worker: {shown}"
        );
        assert_ne!(group_version(&host), before);
        assert_all_serve(&host, version);
        expected = version;
    }
    let report = finish(load);
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(
        report.bodies.contains_key("v1") && report.bodies.contains_key("v2"),
        "{report:?}"
    );
    assert_eq!(expected, "v1");
}

/// A bad build is refused: `host reload` fails naming the cause, the old
/// workers keep serving without a failed request, and the next good build
/// reloads.
fn assert_bad_build_refused(name: &str, install_bad: impl FnOnce(&TestDir), expected: &[&str]) {
    let host = start_with(name, Variant::SampleV1, 2, "start_timeout = \"3s\"");
    let pids = host.worker_pids();
    let version = group_version(&host);
    let load = steady_load(host.addr, 32);

    install_bad(&host.dir);
    let output = reload(&host);
    let shown = text(&output);
    assert!(!output.status.success(), "a bad build reloaded: {shown}");
    for words in expected {
        assert!(shown.contains(words), "expected {words:?} in: {shown}");
    }
    assert!(shown.contains("reload failed"), "{shown}");
    assert_eq!(
        host.worker_pids(),
        pids,
        "old workers replaced by a bad build"
    );
    assert_eq!(group_version(&host), version);
    assert_all_serve(&host, "v1");
    let report = finish(load);
    assert_eq!(report.failed(), 0, "{report:?}");

    host.dir.install(Variant::SampleV2, "handler.so");
    let output = reload(&host);
    assert!(
        output.status.success(),
        "good build after a bad one: {}",
        text(&output)
    );
    assert_all_serve(&host, "v2");
}

#[test]
fn reload_refuses_a_file_that_is_not_a_library() {
    assert_bad_build_refused(
        "not-library",
        |dir| {
            dir.write("handler.so", "#!/bin/sh\necho not a library\n");
        },
        &["not a shared library"],
    );
}

#[test]
fn reload_refuses_a_truncated_library() {
    assert_bad_build_refused(
        "truncated",
        |dir| {
            let bytes = std::fs::read(handler(Variant::SampleV2)).unwrap();
            dir.write("handler.so", &bytes[..bytes.len() / 3]);
        },
        &["truncated"],
    );
}

#[test]
fn reload_refuses_an_incompatible_abi() {
    assert_bad_build_refused(
        "abi",
        |dir| {
            dir.install(Variant::AbiMismatch, "handler.so");
        },
        &["incompatible handler-api", "expected handler-api"],
    );
}

#[test]
fn reload_refuses_a_handler_built_against_another_api_version() {
    assert_bad_build_refused(
        "other-api",
        |dir| {
            dir.install(Variant::OtherApiVersion, "handler.so");
        },
        &["incompatible package versions", OTHER_API_VERSION],
    );
}

#[test]
fn reload_refuses_a_start_error() {
    assert_bad_build_refused(
        "start-error",
        |dir| {
            dir.install(Variant::Faulty("error"), "handler.so");
        },
        &["database unreachable"],
    );
}

#[test]
fn reload_refuses_a_start_panic() {
    assert_bad_build_refused(
        "start-panic",
        |dir| {
            dir.install(Variant::Faulty("panic"), "handler.so");
        },
        &["panicked", "on purpose"],
    );
}

#[test]
fn reload_refuses_a_start_that_hangs() {
    assert_bad_build_refused(
        "start-hang",
        |dir| {
            dir.install(Variant::Faulty("hang"), "handler.so");
        },
        &["did not report ready within its start_timeout (3.0 s)"],
    );
}

#[test]
fn reload_refuses_a_start_that_aborts() {
    assert_bad_build_refused(
        "start-abort",
        |dir| {
            dir.install(Variant::Faulty("abort"), "handler.so");
        },
        &["crashed during start", "SIGABRT"],
    );
}

#[test]
fn reload_refuses_a_start_that_segfaults() {
    assert_bad_build_refused(
        "start-segv",
        |dir| {
            dir.install(Variant::Faulty("segfault"), "handler.so");
        },
        &["crashed during start", "SIGSEGV"],
    );
}

#[test]
fn a_failed_reload_puts_back_workers_already_replaced() {
    // The faulty build starts on slot 0 and fails on slot 1: slot 0 is
    // replaced first, then has to get v1 back.
    let host = start_with("rollback", Variant::SampleV1, 2, "");
    let load = steady_load(host.addr, 32);
    host.dir
        .install(Variant::Faulty("error-on-slot-1"), "handler.so");
    let output = reload(&host);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(shown.contains("web/1 failed to start"), "{shown}");
    assert!(shown.contains("rollback web/0"), "{shown}");
    assert_all_serve(&host, "v1");
    let report = finish(load);
    assert_eq!(report.failed(), 0, "{report:?}");
}

#[test]
fn a_slow_request_in_flight_completes_across_a_reload() {
    let host = start_with("slow", Variant::SampleV1, 2, "stop_timeout = \"30s\"");
    let slow = slow_request_in_flight(&host, "/sleep?ms=2000");
    host.dir.install(Variant::SampleV2, "handler.so");
    let output = reload(&host);
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains("killed"), "{}", text(&output));
    let reply = slow.join().unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "slept 2000 ms"));
    assert_all_serve(&host, "v2");
}

#[test]
fn idle_keepalive_clients_do_not_hold_a_reload_back() {
    // A worker that kept waiting for its idle clients would sit out the
    // 20 s stop timeout (shorter than hyper's 30 s wait for a next request
    // head) and be reported killed.
    let host = start_with(
        "idle",
        Variant::SampleV1,
        1,
        "stop_timeout = \"20s\"\nlame_duck = \"200ms\"",
    );
    let old = host.worker_pids();
    let mut idle: Vec<_> = (0..3)
        .map(|_| idle_connection(host.addr, "/version", "v1"))
        .collect();
    let output = reload(&host);
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains("killed"), "{}", text(&output));
    for stream in &mut idle {
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .expect("the old worker closes an idle connection, not resets it");
        assert!(rest.is_empty(), "unexpected bytes: {rest:?}");
    }
    wait_until("the old worker is gone", || {
        old.iter().all(|&pid| !alive(pid))
    });
    assert_all_serve(&host, "v1");
}

#[test]
fn a_request_longer_than_the_stop_timeout_is_reported_killed() {
    let host = start_with(
        "killed",
        Variant::SampleV1,
        1,
        "stop_timeout = \"1s\"\nlame_duck = \"100ms\"",
    );
    let addr = host.addr;
    let slow = std::thread::spawn(move || request(addr, "GET", "/sleep?ms=30000", b""));
    wait_until("the slow request is in flight", || {
        host.status()["workers"][0]["in_flight"].as_u64().unwrap() > 0
    });
    let old = host.worker_pids()[0];
    host.dir.install(Variant::SampleV2, "handler.so");
    let output = reload(&host);
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    assert!(
        shown.contains(&format!(
            "killed web/0 pid {old} at its stop timeout with 1 connection(s) open and 1 request(s) in flight"
        )),
        "{shown}"
    );
    assert!(
        slow.join().unwrap().is_err(),
        "the killed request cannot have been answered"
    );
    assert!(!alive(old));
    assert_all_serve(&host, "v2");
}

#[test]
fn a_reload_asked_during_another_is_queued_and_both_report() {
    let host = start_with("queued", Variant::SampleV1, 2, "");
    // A request in flight keeps the first reload waiting for its old worker.
    let slow = slow_request_in_flight(&host, "/sleep?ms=3000");
    host.dir.install(Variant::SampleV2, "handler.so");
    let first = reload_in_background(&host);
    wait_until("the first reload is running", || {
        host.status()["reloading"] == true
    });
    let second = reload(&host);
    let first = first.join().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    assert!(second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("queued"), "{}", text(&second));
    assert_eq!(slow.join().unwrap().status, 200);
    assert_all_serve(&host, "v2");
}

#[test]
fn sighup_and_sigusr1_reload_too() {
    let host = start_with("signals", Variant::SampleV1, 2, "");
    for (signal, variant, version) in [
        (Signal::SIGHUP, Variant::SampleV2, "v2"),
        (Signal::SIGUSR1, Variant::SampleV1, "v1"),
    ] {
        host.dir.install(variant, "handler.so");
        host.signal(signal);
        wait_serving(&host, version);
        assert_all_serve(&host, version);
    }
}

#[test]
fn groups_that_are_not_reloadable_keep_their_workers_and_are_notified() {
    let dir = TestDir::new("not-reloadable");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let config = format!(
        "{}\n[[group]]\nname = \"gate\"\nlisten = \"127.0.0.1:0\"\ncount = 1\nhandler = {:?}\nreloadable = false\n",
        one_group_config(&handler, 1, ""),
        handler.display().to_string()
    );
    let host = Host::start(dir, &config);
    let gate_pid = |host: &Host| {
        host.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["group"] == "gate")
            .map(|w| w["pid"].as_u64().unwrap())
            .unwrap()
    };
    let before = gate_pid(&host);
    host.dir.install(Variant::SampleV2, "handler.so");
    let output = reload(&host);
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    assert!(shown.contains("group gate is not reloadable"), "{shown}");
    assert_eq!(gate_pid(&host), before);
    assert_eq!(get(host.addr, "/version").body, "v2");
    wait_until("the gate worker got the notification", || {
        host.log()
            .contains("sample-handler v1: reload notification received")
    });
}

#[test]
fn a_worker_crash_during_a_reload_is_refilled_with_the_right_version() {
    let host = start_with(
        "crash-mid-reload",
        Variant::SampleV1,
        2,
        "stop_timeout = \"30s\"",
    );
    // The slow request holds the reload open after both replacements are up.
    let slow = slow_request_in_flight(&host, "/sleep?ms=3000");
    host.dir.install(Variant::SampleV2, "handler.so");
    let reload = reload_in_background(&host);
    let mut victim = None;
    wait_until("a replacement is ready", || {
        let status = host.status();
        victim = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["handler_version"] == "v2" && w["state"] == "ready")
            .map(|w| w["pid"].as_u64().unwrap() as u32);
        victim.is_some()
    });
    kill(victim.unwrap(), Signal::SIGKILL);
    let output = reload.join().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(slow.join().unwrap().status, 200);
    wait_until("the crashed slot is refilled", || {
        let status = host.status();
        let workers = status["workers"].as_array().unwrap();
        workers.len() == 2
            && workers
                .iter()
                .all(|w| w["state"] == "ready" && w["handler_version"] == "v2")
    });
    assert!(!host.worker_pids().contains(&victim.unwrap()));
}
