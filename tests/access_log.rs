//! The access log: off by default, common and JSON lines with every field,
//! a rotation followed on SIGUSR2, whole lines from several workers under
//! load.

mod support;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

fn config(dir: &TestDir, count: usize, extra: &str) -> String {
    let handler = dir.install(Variant::SampleV1, "handler.so");
    one_group_config(&handler, count, extra)
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The fields of a common line.
struct Common {
    peer: String,
    time: String,
    request: String,
    status: u16,
    bytes: String,
    group: String,
    pid: u32,
}

/// A common line's fields; `None` if the line is not one (the duration
/// must be a number too).
fn common_fields(line: &str) -> Option<Common> {
    let (peer, rest) = line.split_once(" - - [")?;
    let (time, rest) = rest.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let [status, bytes, duration, group, pid] = fields[..] else {
        return None;
    };
    duration.parse::<u64>().ok()?;
    Some(Common {
        peer: peer.to_owned(),
        time: time.to_owned(),
        request: request.to_owned(),
        status: status.parse().ok()?,
        bytes: bytes.to_owned(),
        group: group.to_owned(),
        pid: pid.parse().ok()?,
    })
}

#[test]
fn common_lines_carry_method_path_status_bytes_duration_peer_group_and_pid() {
    let dir = TestDir::new("access-common");
    let config = config(&dir, 1, "access_log = \"access.log\"");
    let host = Host::start(dir, &config);
    let pid = host.worker_pids()[0];
    assert_eq!(get(host.addr, "/version?x=1").body, "v1");
    assert_eq!(get(host.addr, "/no-such-page").status, 404);
    let log = host.dir.path.join("access.log");
    wait_until("both requests are in the access log", || {
        read(&log).lines().count() >= 2
    });
    let text = read(&log);
    let lines: Vec<_> = text.lines().collect();
    let first =
        common_fields(lines[0]).unwrap_or_else(|| panic!("not a common line: {}", lines[0]));
    assert_eq!(first.peer, "127.0.0.1");
    assert!(first.time.ends_with(" +0000"), "{}", first.time);
    assert_eq!(first.request, "GET /version?x=1 HTTP/1.1");
    assert_eq!(first.status, 200);
    assert_eq!(first.bytes, "2");
    assert_eq!(first.group, "web");
    assert_eq!(first.pid, pid);
    let second = common_fields(lines[1]).unwrap();
    assert_eq!(second.request, "GET /no-such-page HTTP/1.1");
    assert_eq!(second.status, 404);
}

#[test]
fn json_lines_go_to_stderr_with_every_field() {
    let dir = TestDir::new("access-json");
    let config = config(
        &dir,
        1,
        "access_log = \"stderr\"\naccess_log_format = \"json\"",
    );
    let host = Host::start(dir, &config);
    let pid = host.worker_pids()[0];
    assert_eq!(get(host.addr, "/version").body, "v1");
    let line = || {
        host.log()
            .lines()
            .find(|l| l.starts_with("{\"time\"") && l.contains("/version"))
            .map(str::to_owned)
    };
    wait_until("the request is logged", || line().is_some());
    let value: Value = serde_json::from_str(&line().unwrap()).unwrap();
    assert_eq!(value["method"], "GET");
    assert_eq!(value["path"], "/version");
    assert_eq!(value["status"], 200);
    assert_eq!(value["bytes"], 2);
    assert!(value["duration_us"].is_u64(), "{value}");
    assert!(
        value["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{value}"
    );
    assert_eq!(value["group"], "web");
    assert_eq!(value["pid"], pid);
}

#[test]
fn sigusr2_moves_the_access_log_to_a_new_file_after_a_rotation() {
    let dir = TestDir::new("access-rotate");
    let config = config(&dir, 1, "access_log = \"access.log\"");
    let host = Host::start(dir, &config);
    let log = host.dir.path.join("access.log");
    let rotated = host.dir.path.join("access.log.1");
    get(host.addr, "/version?before");
    wait_until("the first request is logged", || {
        read(&log).contains("/version?before")
    });
    std::fs::rename(&log, &rotated).unwrap();
    host.signal(Signal::SIGUSR2);
    wait_until("new lines go to a new file", || {
        get(host.addr, "/version?after");
        read(&log).contains("/version?after")
    });
    assert!(!read(&log).contains("/version?before"));
    assert!(read(&rotated).contains("/version?before"));
}

#[test]
fn lines_of_several_workers_under_load_never_interleave() {
    let dir = TestDir::new("access-load");
    let config = config(&dir, 2, "access_log = \"access.log\"");
    let mut host = Host::start(dir, &config);
    let pids = host.worker_pids();
    // A new connection per request, so both workers accept some.
    let mut load = loadgen::LoadConfig::new(host.addr);
    load.connections = 16;
    load.path = "/version".into();
    load.keep_alive = false;
    load.max_requests = Some(6000);
    load.duration = std::time::Duration::from_secs(300);
    let report = loadgen::LoadRun::start(load).wait();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(host.cli(&["stop"]).status.success());
    host.wait_exit();
    // Workers flush what they buffered as they leave.
    let text = read(&host.dir.path.join("access.log"));
    let mut lines = 0u64;
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        let fields = common_fields(line).unwrap_or_else(|| panic!("a broken line: {line:?}"));
        assert_eq!(fields.request, "GET /version HTTP/1.1", "{line}");
        seen.insert(fields.pid);
        lines += 1;
    }
    assert!(
        lines >= report.ok,
        "{lines} lines for {} answers",
        report.ok
    );
    // One line per request: none lost, none written twice (every request
    // of the run was answered, and only the run asked for /version).
    assert_eq!(lines, report.ok, "{lines} lines for {} answers", report.ok);
    assert_eq!(seen, pids.into_iter().collect(), "lines from both workers");
}

#[test]
fn without_an_access_log_nothing_is_logged() {
    let dir = TestDir::new("access-off");
    let config = config(&dir, 1, "");
    let mut host = Host::start(dir, &config);
    for _ in 0..20 {
        assert_eq!(get(host.addr, "/version?unlogged").body, "v1");
    }
    assert!(host.cli(&["stop"]).status.success());
    host.wait_exit();
    assert!(!host.log().contains("/version?unlogged"), "{}", host.log());
    // No file anywhere under the test directory (run directory included)
    // holds a line for those requests.
    fn files_under(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files_under(&path, found);
            } else {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    files_under(&host.dir.path, &mut files);
    let logged: Vec<_> = files
        .iter()
        .filter(|f| std::fs::read(f).is_ok_and(|b| b.windows(8).any(|w| w == b"unlogged")))
        .collect();
    assert!(logged.is_empty(), "{logged:?}");
}
