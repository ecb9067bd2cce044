//! Bad input: every way `host start` (and the commands that need a running
//! master) can be given something wrong ends with a non-zero exit, one
//! short `host: ` message naming the cause, and no process left behind.

mod support;

use std::path::PathBuf;
use std::process::Output;

use nix::sys::signal::Signal;
use support::*;

/// Kills every process started for a test dir when dropped, so a failed
/// assertion never leaves a master (say, a daemonized one) running.
struct KillOnDrop<'a>(&'a TestDir);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        for pid in processes_of(self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// The CLI's own message: from the only stderr line that starts with
/// `host: ` to the end (logs come before it).
fn message(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let starts: Vec<usize> = stderr
        .match_indices("host: ")
        .map(|(at, _)| at)
        .filter(|at| *at == 0 || stderr.as_bytes()[at - 1] == b'\n')
        .collect();
    assert_eq!(
        starts.len(),
        1,
        "expected one `host: ` message in stderr:\n{stderr}"
    );
    stderr[starts[0]..].trim_end().to_owned()
}

/// Asserts that `output` failed with one message containing every one of
/// `expected`, and returns that message.
fn assert_fails_with(output: &Output, expected: &[&str]) -> String {
    assert!(
        !output.status.success(),
        "expected a failure, got success:\n{}",
        text(output)
    );
    let message = message(output);
    for words in expected {
        assert!(
            message.contains(words),
            "expected {words:?} in the message: {message}\nfull output:\n{}",
            text(output)
        );
    }
    message
}

/// Waits until no process started for `dir` is left.
fn assert_nothing_left(dir: &TestDir) {
    wait_until("no host process is left", || processes_of(dir).is_empty());
}

/// `host start -c host.toml` in the foreground with `config` fails with a
/// message containing `expected`, and leaves nothing running.
fn assert_start_fails(config: &str, dir: TestDir, expected: &[&str]) -> String {
    let _cleanup = KillOnDrop(&dir);
    dir.write("host.toml", config);
    let output = host_start_must_fail(&dir);
    let message = assert_fails_with(&output, expected);
    assert_nothing_left(&dir);
    message
}

/// A test dir with `variant` installed as handler.so, and its config.
fn dir_with(name: &str, variant: Variant, extra: &str) -> (TestDir, String) {
    let dir = TestDir::new(name);
    let handler = dir.install(variant, "handler.so");
    let config = one_group_config(&handler, 2, extra);
    (dir, config)
}

/// The C library this test process has loaded: a shared library that is
/// not a handler.
fn loaded_libc() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(PathBuf::from)
        .find(|path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"))
        })
        .expect("libc in /proc/self/maps")
}

#[test]
fn start_with_missing_handler_fails_cleanly() {
    let dir = TestDir::new("missing-handler");
    let missing = dir.path.join("no-such-handler.so");
    let config = one_group_config(&missing, 2, "");
    let shown = missing.display().to_string();
    assert_start_fails(&config, dir, &[&shown, "No such file"]);
}

#[test]
fn start_with_a_file_that_is_not_a_library_fails_cleanly() {
    let dir = TestDir::new("junk-handler");
    let junk = dir.write("junk.so", "this is not a shared library\n");
    let config = one_group_config(&junk, 2, "");
    assert_start_fails(&config, dir, &["junk.so", "not a shared library"]);
}

#[test]
fn start_with_a_truncated_library_fails_cleanly() {
    let dir = TestDir::new("truncated-handler");
    let bytes = std::fs::read(handler(Variant::SampleV1)).unwrap();
    let truncated = dir.write("truncated.so", &bytes[..100_000]);
    let config = one_group_config(&truncated, 2, "");
    assert_start_fails(&config, dir, &["truncated.so", "truncated"]);
}

#[test]
fn start_with_a_library_that_is_not_a_handler_fails_cleanly() {
    let dir = TestDir::new("libc-handler");
    let libc = dir.write("libc.so", std::fs::read(loaded_libc()).unwrap());
    let config = one_group_config(&libc, 2, "");
    assert_start_fails(&config, dir, &["libc.so", "not a handler"]);
}

#[test]
fn start_with_a_handler_built_against_another_api_version_fails_cleanly() {
    let (dir, config) = dir_with("other-api", Variant::OtherApiVersion, "");
    let versions = format!(
        "expected {}, found {OTHER_API_VERSION}",
        handler_api_version()
    );
    assert_start_fails(
        &config,
        dir,
        &[
            "handler.so",
            "incompatible handler-api",
            &versions,
            &format!("rebuild it against handler-api {}", handler_api_version()),
        ],
    );
}

#[test]
fn start_with_an_incompatible_handler_api_fails_cleanly() {
    let (dir, config) = dir_with("abi-mismatch", Variant::AbiMismatch, "");
    assert_start_fails(
        &config,
        dir,
        &[
            "handler.so",
            "incompatible handler-api",
            "expected handler-api",
        ],
    );
}

#[test]
fn start_callback_error_fails_with_the_handlers_text() {
    let (dir, config) = dir_with("start-error", Variant::Faulty("error"), "");
    assert_start_fails(&config, dir, &["failed to start", "database unreachable"]);
}

#[test]
fn start_callback_panic_fails_with_the_panic_text() {
    let (dir, config) = dir_with("start-panic", Variant::Faulty("panic"), "");
    assert_start_fails(
        &config,
        dir,
        &["panicked", "faulty-handler start panicked on purpose"],
    );
}

#[test]
fn config_with_an_unknown_key_is_refused() {
    let (dir, config) = dir_with("unknown-key", Variant::SampleV1, "cont = 2");
    assert_start_fails(&config, dir, &["host.toml", "unknown field `cont`"]);
}

#[test]
fn config_with_a_bad_address_is_refused() {
    let (dir, config) = dir_with("bad-address", Variant::SampleV1, "");
    let config = config.replace("\"127.0.0.1:0\"", "\"localhost\"");
    assert!(config.contains("listen = \"localhost\""), "{config}");
    assert_start_fails(&config, dir, &["host.toml", "invalid socket address"]);
}

#[test]
fn config_with_a_syntax_error_is_refused() {
    let bad = "name = \"unterminated";
    let (dir, config) = dir_with("syntax-error", Variant::SampleV1, bad);
    let file = dir.path.join("host.toml").display().to_string();
    let line = config.lines().position(|l| l == bad).unwrap() + 1;
    assert_start_fails(
        &config,
        dir,
        &[
            &file,
            &format!("line {line} ({bad})"),
            "invalid basic string",
        ],
    );
}

#[test]
fn start_on_a_port_in_use_fails_cleanly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (dir, config) = dir_with("port-in-use", Variant::SampleV1, "");
    let config = config.replace("127.0.0.1:0", &addr);
    assert_start_fails(&config, dir, &["cannot listen", &addr, "in use"]);
    drop(taken);
}

#[test]
fn second_start_on_the_same_run_dir_is_refused() {
    let (dir, config) = dir_with("second-start", Variant::SampleV1, "");
    let host = Host::start(dir, &config);
    let pids = host.worker_pids();

    let output = host.cli(&["start"]);
    assert_fails_with(&output, &["already running", &host.pid().to_string()]);

    assert_eq!(get(host.addr, "/").status, 200);
    assert_eq!(
        host.worker_pids(),
        pids,
        "the first master's workers changed"
    );
    let mut expected: Vec<u32> = pids.iter().copied().chain([host.pid()]).collect();
    expected.sort_unstable();
    wait_until("only the first master and its workers run", || {
        let mut running = processes_of(&host.dir);
        running.sort_unstable();
        running == expected
    });
}

#[test]
fn stop_and_status_without_a_master_say_it_is_not_running() {
    let (dir, config) = dir_with("not-running", Variant::SampleV1, "");
    dir.write("host.toml", config);
    for command in ["stop", "status"] {
        let output = host_command(&dir, &[command]);
        assert_fails_with(&output, &["not running"]);
    }
    assert_nothing_left(&dir);
}

/// `host start -d` fails with the master's own reason and leaves nothing.
fn assert_daemon_start_fails(dir: TestDir, config: &str, expected: &[&str]) {
    let _cleanup = KillOnDrop(&dir);
    dir.write("host.toml", config);
    let output = host_command(&dir, &["start", "-d"]);
    assert_fails_with(&output, expected);
    assert_nothing_left(&dir);
}

#[test]
fn daemon_start_with_a_failing_handler_reports_the_workers_error() {
    let (dir, config) = dir_with("daemon-start-error", Variant::Faulty("error"), "");
    assert_daemon_start_fails(dir, &config, &["failed to start", "database unreachable"]);
}

#[test]
fn daemon_start_with_a_missing_handler_reports_the_reason() {
    let dir = TestDir::new("daemon-missing-handler");
    let missing = dir.path.join("no-such-handler.so");
    let config = one_group_config(&missing, 2, "");
    let shown = missing.display().to_string();
    assert_daemon_start_fails(dir, &config, &[&shown, "No such file"]);
}

#[test]
fn daemon_start_serves_until_stopped() {
    let (dir, config) = dir_with("daemon-ok", Variant::SampleV1, "");
    let _cleanup = KillOnDrop(&dir);
    dir.write("host.toml", config);

    let output = host_command(&dir, &["start", "-d"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_says(&output, "host started");

    let output = host_command(&dir, &["status", "--json"]);
    assert!(output.status.success(), "{}", text(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["groups"][0]["ready"], 2, "{status}");
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{status}");
    assert!(workers.iter().all(|w| w["state"] == "ready"), "{status}");
    let addr = status["groups"][0]["listen"].as_str().unwrap();
    assert_eq!(get(addr.parse().unwrap(), "/").status, 200);

    let output = host_command(&dir, &["stop"]);
    assert!(output.status.success(), "{}", text(&output));
    assert_nothing_left(&dir);
}
