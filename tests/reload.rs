//! Rolling reload: zero failed requests under keep-alive load, bounded
//! time, bad builds refused with the worker's own error, and `host reload`
//! reporting what happened.

mod support;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
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

/// `host reload --json`: whether it exited 0, and what it printed.
fn reload_json(host: &Host) -> (bool, serde_json::Value) {
    let output = host.cli(&["reload", "--json"]);
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("reload --json printed no JSON ({e}): {}", text(&output)));
    (output.status.success(), report)
}

fn group_version(host: &Host) -> String {
    host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `host reload`, running in the background.
fn reload_in_background(host: &Host) -> BoundedRun {
    let mut command = std::process::Command::new(host_bin());
    command
        .args(["reload", "-c"])
        .arg(host.dir.path.join("host.toml"))
        .env("HOST_TEST_TAG", host.dir.path.display().to_string());
    BoundedRun::start(command)
}

/// The cue handler (faulty-handler in a mode that starts), and a second
/// build of it that says another version.
const CUED: Variant = Variant::Faulty("cued");
const CUED_NEXT: Variant = Variant::Faulty("cued-next");

/// Files that hold the cue handler's workers while they exist: `start`
/// keeps a starting worker starting, `requests` keeps `GET /hold` in
/// flight (see tests/fixtures/faulty-handler).
struct Cues {
    start: PathBuf,
    requests: PathBuf,
}

impl Cues {
    fn hold(path: &Path) {
        std::fs::write(path, "").unwrap();
    }

    fn release(path: &Path) {
        std::fs::remove_file(path).unwrap();
    }
}

/// `count` workers of the cue handler with pool dispatch (a held request
/// never keeps a worker from reading the master's messages), generous
/// timeouts, and `extra` group settings.
fn start_cued(name: &str, count: usize, extra: &str) -> (Host, Cues) {
    start_cued_with(name, count, extra, |_| {})
}

fn start_cued_with(
    name: &str,
    count: usize,
    extra: &str,
    adjust: impl FnOnce(&mut std::process::Command),
) -> (Host, Cues) {
    let dir = TestDir::new(name);
    let handler = dir.install(CUED, "handler.so");
    let cues = Cues {
        start: dir.path.join("hold-start"),
        requests: dir.path.join("hold-requests"),
    };
    let group = format!(
        "dispatch = \"pool\"\nstart_timeout = \"60s\"\nstop_timeout = \"60s\"\n{extra}\n[group.settings]\nhold_start_while = {:?}\nhold_requests_while = {:?}\n",
        cues.start.display().to_string(),
        cues.requests.display().to_string()
    );
    let host = Host::start_with(dir, &one_group_config(&handler, count, &group), adjust);
    (host, cues)
}

/// `GET /hold` on another thread, once it is in flight (on the worker
/// whose pid is returned).
fn held_request(host: &Host) -> (std::thread::JoinHandle<std::io::Result<Reply>>, u32) {
    let addr = host.addr;
    let held = std::thread::spawn(move || request(addr, "GET", "/hold", b""));
    let mut pid = None;
    wait_until("the held request is in flight", || {
        pid = host.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["in_flight"].as_u64().unwrap() > 0)
            .map(|w| w["pid"].as_u64().unwrap() as u32);
        pid.is_some() || held.is_finished()
    });
    assert!(!held.is_finished(), "the held request was answered at once");
    (held, pid.unwrap())
}

/// The status entry of the worker with `pid`, or Null when it is gone.
fn worker_with_pid(status: &serde_json::Value, pid: u32) -> serde_json::Value {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"] == pid)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn reloads_under_keepalive_load_fail_no_request() {
    let host = start_with("rolling", Variant::SampleV1, 4, "");
    let load = steady_load(host.addr, 32);
    let rounds = [
        (Variant::SampleV2, "v2"),
        (Variant::SampleV1, "v1"),
        (Variant::SampleV2, "v2"),
        (Variant::SampleV1, "v1"),
    ];
    for (round, (variant, version)) in rounds.into_iter().enumerate() {
        let pids = host.worker_pids();
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
        let now = host.worker_pids();
        assert!(
            now.iter().all(|pid| !pids.contains(pid)),
            "round {round}: every worker replaced: {pids:?} -> {now:?}"
        );
    }
    let report = finish(load);
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(
        report.bodies.contains_key("v1") && report.bodies.contains_key("v2"),
        "{report:?}"
    );
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
    let (ok, report) = reload_json(&host);
    assert!(!ok && report["ok"] == false, "{report:#}");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("worker web/1 failed to start"), "{report:#}");
    let steps: Vec<(u64, bool)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["slot"].as_u64().unwrap(),
                s["rollback"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps, [(0, false), (0, true)], "{report:#}");
    let change = &report["groups"][0];
    assert_eq!(change["to"], change["from"], "{report:#}");
    assert_ne!(
        change["wanted"], change["from"],
        "the refused version: {report:#}"
    );
    assert_all_serve(&host, "v1");
    let report = finish(load);
    assert_eq!(report.failed(), 0, "{report:?}");
}

#[test]
fn a_slow_request_in_flight_completes_across_a_reload() {
    // Pool dispatch: the worker reads the drain message while the request
    // is still being handled, and must finish it before exiting.
    let (host, cues) = start_cued_with("slow", 2, "", |command| {
        command.env("HOST_LOG", "info,host::worker=debug");
    });
    Cues::hold(&cues.requests);
    let (held, old) = held_request(&host);
    host.dir.install(CUED_NEXT, "handler.so");
    let reload = reload_in_background(&host);
    let drain_read = format!("pid={old}");
    wait_until("the old worker has read the drain message", || {
        host.log()
            .lines()
            .any(|l| l.contains(&drain_read) && l.ends_with("draining"))
            || !alive(old)
    });
    assert!(
        alive(old),
        "the old worker exited with a request in flight; log:\n{}",
        host.log()
    );
    let status = host.status();
    let draining = worker_with_pid(&status, old);
    assert_eq!(draining["state"], "draining", "{status}");
    assert_eq!(draining["in_flight"], 1, "{status}");
    assert_eq!(status["reloading"], true, "{status}");
    assert!(!held.is_finished(), "answered before it was released");

    Cues::release(&cues.requests);
    let reply = held.join().unwrap().expect("the held request is answered");
    assert_eq!((reply.status, reply.body.as_str()), (200, "released"));
    let output = reload.wait();
    assert!(output.status.success(), "{}", text(&output));
    assert!(!text(&output).contains("killed"), "{}", text(&output));
    assert!(!alive(old));
    wait_serving(&host, "cued-next");
}

#[test]
fn status_shows_a_draining_worker_with_its_request_in_flight() {
    let (host, cues) = start_cued("status-draining", 1, "");
    Cues::hold(&cues.requests);
    let (held, old) = held_request(&host);
    let reload = reload_in_background(&host);
    // The progress line comes once the replacement is ready and the old
    // worker has been told to drain.
    wait_until("the old worker is told to drain", || {
        reload.output_so_far().contains(" -> pid ")
    });
    let status = host.status();
    let draining = worker_with_pid(&status, old);
    assert_eq!(draining["state"], "draining", "{status}");
    assert_eq!(draining["in_flight"], 1, "{status}");
    let shown = text(&host.cli(&["status"]));
    let line = shown
        .lines()
        .find(|l| l.contains(&old.to_string()))
        .unwrap_or_else(|| panic!("no line for pid {old}: {shown}"));
    assert!(line.contains("draining"), "{shown}");
    Cues::release(&cues.requests);
    assert_eq!(held.join().unwrap().unwrap().status, 200);
    let output = reload.wait();
    assert!(output.status.success(), "{}", text(&output));
}

#[test]
fn a_good_reload_retires_no_worker_before_its_replacement_is_ready() {
    let (host, cues) = start_cued("order", 2, "");
    let old = host.worker_pids();
    Cues::hold(&cues.start);
    host.dir.install(CUED_NEXT, "handler.so");
    let mut reload = reload_in_background(&host);
    // The first replacement cannot get past its start while the cue is
    // there: through any number of looks, both old workers serve.
    let mut starting = None;
    wait_until("a replacement is spawned", || {
        let status = host.try_status();
        starting = status["workers"].as_array().and_then(|workers| {
            workers
                .iter()
                .map(|w| w["pid"].as_u64().unwrap() as u32)
                .find(|pid| !old.contains(pid))
        });
        // A reload that ended without a replacement fails at once.
        starting.is_some() || reload.exited()
    });
    let starting = starting.expect("a replacement");
    for _ in 0..10 {
        let status = host.status();
        assert_eq!(worker_with_pid(&status, starting)["state"], "starting");
        for pid in &old {
            assert_eq!(
                worker_with_pid(&status, *pid)["state"],
                "ready",
                "an old worker left before its replacement was ready: {status}"
            );
        }
        assert_eq!(status["groups"][0]["ready"], 2, "{status}");
        assert_eq!(get(host.addr, "/").body, "faulty-handler ok");
    }
    let shown = text(&host.cli(&["status"]));
    let line = shown
        .lines()
        .find(|l| l.contains(&starting.to_string()))
        .unwrap_or_else(|| panic!("no line for pid {starting}: {shown}"));
    assert!(line.contains("starting"), "{shown}");

    Cues::release(&cues.start);
    let output = reload.wait();
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    // Each progress line names the replacement that was ready, and the old
    // worker retired after it.
    for pid in &old {
        assert!(shown.contains(&format!("pid {pid} ")), "{shown}");
    }
    wait_serving(&host, "cued-next");
    assert!(old.iter().all(|pid| !alive(*pid)));
}

#[test]
fn a_response_during_the_lame_duck_carries_connection_close() {
    let (host, _cues) = start_cued_with("lame-duck", 1, "lame_duck = \"60s\"", |command| {
        command.env("HOST_LOG", "info,host::worker=debug");
    });
    let old = host.worker_pids()[0];
    let mut kept = idle_connection(host.addr, "/", "faulty-handler ok");
    let reload = reload_in_background(&host);
    let drain_read = format!("pid={old}");
    wait_until("the old worker has read the drain message", || {
        host.log()
            .lines()
            .any(|l| l.contains(&drain_read) && l.ends_with("draining"))
            || !alive(old)
    });
    // The lame duck lasts 60 s, and the connection is still open: the
    // answer must tell the client not to reuse it.
    kept.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host.addr).as_bytes())
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.ends_with(b"faulty-handler ok") {
        let n = kept.read(&mut chunk).expect("an answer");
        assert!(n > 0, "closed without an answer: {answer:?}");
        answer.extend_from_slice(&chunk[..n]);
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let head = answer.split_once("\r\n\r\n").unwrap().0;
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close")),
        "no `Connection: close` in the lame duck's answer:\n{head}"
    );
    let mut rest = Vec::new();
    kept.read_to_end(&mut rest)
        .expect("the server closes the connection after that answer");
    assert!(rest.is_empty(), "{rest:?}");
    // Its last connection closed, the old worker need not sit out the lame duck.
    let output = reload.wait();
    assert!(output.status.success(), "{}", text(&output));
    assert!(!alive(old));
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
    let (ok, report) = reload_json(&host);
    assert!(ok && report["ok"] == true, "{report:#}");
    let killed = report["killed"].as_array().unwrap();
    assert_eq!(killed.len(), 1, "{report:#}");
    assert_eq!(
        (&killed[0]["group"], &killed[0]["slot"], &killed[0]["pid"]),
        (&"web".into(), &0.into(), &old.into()),
        "{report:#}"
    );
    assert_eq!(
        (&killed[0]["in_flight"], &killed[0]["connections"]),
        (&1.into(), &1.into()),
        "{report:#}"
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
    let (host, cues) = start_cued("queued", 2, "");
    // A request in flight keeps the first reload waiting for its old worker.
    Cues::hold(&cues.requests);
    let (held, _) = held_request(&host);
    host.dir.install(CUED_NEXT, "handler.so");
    let first = reload_in_background(&host);
    wait_until("the first reload is running", || {
        host.status()["reloading"] == true
    });
    let second = reload_in_background(&host);
    wait_until("the second reload is queued", || {
        second.output_so_far().contains("queued") || first.output_so_far().contains("reload ")
    });
    assert_eq!(
        host.status()["reloading"],
        true,
        "the first reload ended early"
    );
    Cues::release(&cues.requests);
    let first = first.wait();
    let second = second.wait();
    assert!(first.status.success(), "{}", text(&first));
    assert!(second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("queued"), "{}", text(&second));
    assert_eq!(held.join().unwrap().unwrap().status, 200);
    wait_serving(&host, "cued-next");
    assert_eq!(host.status()["reloads_ok"], 2);
}

#[test]
fn reloads_asked_during_another_merge_into_one_queued_reload() {
    let (host, cues) = start_cued("merged", 1, "");
    Cues::hold(&cues.requests);
    let (held, _) = held_request(&host);
    let first = reload_in_background(&host);
    wait_until("the first reload is running", || {
        host.status()["reloading"] == true
    });
    let queued: Vec<BoundedRun> = (0..3).map(|_| reload_in_background(&host)).collect();
    wait_until("every later reload is queued", || {
        queued.iter().all(|r| r.output_so_far().contains("queued"))
            || first.output_so_far().contains("reload ")
    });
    assert_eq!(
        host.status()["reloading"],
        true,
        "the first reload ended early"
    );
    Cues::release(&cues.requests);
    assert_eq!(held.join().unwrap().unwrap().status, 200);
    let first = first.wait();
    assert!(first.status.success(), "{}", text(&first));
    let outcomes: Vec<Output> = queued.into_iter().map(BoundedRun::wait).collect();
    for output in &outcomes {
        assert!(output.status.success(), "{}", text(output));
        assert!(text(output).contains("reload ok"), "{}", text(output));
    }
    // All three callers got the outcome of one reload: the same new pid.
    let replaced_by = |output: &Output| {
        text(output)
            .lines()
            .find_map(|l| l.split_once(" -> pid ").map(|(_, pid)| pid.to_owned()))
            .unwrap_or_else(|| panic!("no progress line: {}", text(output)))
    };
    let first_pid = replaced_by(&outcomes[0]);
    assert!(outcomes.iter().all(|o| replaced_by(o) == first_pid));
    wait_serving(&host, "cued");
    let status = host.status();
    assert_eq!(status["reloads_ok"], 2, "{status}");
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
    let (host, cues) = start_cued("crash-mid-reload", 2, "");
    let old = host.worker_pids();
    // The held request holds the reload open after both replacements are up.
    Cues::hold(&cues.requests);
    let (held, _) = held_request(&host);
    host.dir.install(CUED_NEXT, "handler.so");
    let reload = reload_in_background(&host);
    let mut victim = None;
    wait_until("a replacement is ready", || {
        let status = host.status();
        victim = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["handler_version"] == "cued-next" && w["state"] == "ready")
            .map(|w| w["pid"].as_u64().unwrap() as u32);
        victim.is_some()
    });
    let victim = victim.unwrap();
    assert!(!old.contains(&victim));
    kill(victim, Signal::SIGKILL);
    wait_until("the master saw the crash", || {
        worker_with_pid(&host.status(), victim).is_null()
    });
    let status = host.status();
    assert_eq!(
        status["reloading"], true,
        "the crash came after the reload: {status}"
    );
    Cues::release(&cues.requests);
    let output = reload.wait();
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(held.join().unwrap().unwrap().status, 200);
    wait_serving(&host, "cued-next");
    let pids = host.worker_pids();
    assert!(!pids.contains(&victim));
    assert!(pids.iter().all(|pid| !old.contains(pid)));
}

#[test]
fn reload_says_which_replacement_it_waits_on_while_it_starts() {
    let (host, cues) = start_cued("waiting", 1, "");
    Cues::hold(&cues.start);
    host.dir.install(CUED_NEXT, "handler.so");
    let mut reload = reload_in_background(&host);
    let mut line = None;
    wait_until("reload says what it waits on", || {
        line = reload
            .output_so_far()
            .lines()
            .find(|l| l.starts_with("web/0: pid ") && l.contains(" loading "))
            .map(str::to_owned);
        line.is_some() || reload.exited()
    });
    let line = line.expect("a progress line while the replacement starts");
    assert!(line.ends_with("s of start_timeout 1m"), "{line}");
    let starting = host.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["state"] == "starting")
        .map(|w| w["pid"].to_string())
        .expect("the replacement is starting");
    assert!(line.contains(&format!("pid {starting} ")), "{line}");
    Cues::release(&cues.start);
    let output = reload.wait();
    assert!(output.status.success(), "{}", text(&output));
}

#[test]
fn status_shows_a_pin_a_handler_file_not_loaded_yet_and_the_last_failed_reload() {
    let host = start_with("visible", Variant::SampleV1, 1, "start_timeout = \"3s\"");
    let running = group_version(&host);
    let group = host.status()["groups"][0].clone();
    assert_eq!(group["on_disk"], running, "{group:#}");
    assert!(group["pinned"].is_null() && group["last_failed_reload"].is_null());

    host.dir.install(Variant::SampleV2, "handler.so");
    let group = host.status()["groups"][0].clone();
    assert!(
        group["on_disk"].is_string() && group["on_disk"] != running,
        "{group:#}"
    );
    let shown = text(&host.cli(&["status"]));
    assert!(shown.contains("handler file on disk is "), "{shown}");

    host.dir.install(Variant::Faulty("error"), "handler.so");
    assert!(!reload(&host).status.success());
    let failed = host.status()["groups"][0]["last_failed_reload"].clone();
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("failed to start")),
        "{failed:#}"
    );
    assert!(failed["at_unix_secs"].as_u64().is_some_and(|t| t > 0));
    let shown = text(&host.cli(&["status"]));
    assert!(shown.contains("last failed reload "), "{shown}");

    let output = host.cli(&["pin", &running]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(host.status()["groups"][0]["pinned"], running);
    assert!(text(&host.cli(&["status"])).contains(&format!("pinned to {running}")));
}
