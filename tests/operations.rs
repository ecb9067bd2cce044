//! Operations: systemd notify and socket activation, metrics and health,
//! JSON logs and log reopening, `host connections`, dropping root, the
//! worker wrapper for profilers.

mod support;

use std::os::unix::net::UnixDatagram;

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

fn sample_config(dir: &TestDir, count: usize, extra_top: &str) -> String {
    let handler = dir.install(Variant::SampleV1, "handler.so");
    format!("{extra_top}\n{}", one_group_config(&handler, count, ""))
}

fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification before the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn systemd_notify_messages_come_in_order() {
    let dir = TestDir::new("notify");
    let socket_path = dir.path.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let config = sample_config(&dir, 2, "");
    let mut host = Host::start_with(dir, &config, |command| {
        command.env("NOTIFY_SOCKET", &socket_path);
    });
    let ready = next_notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");

    let output = host.cli(&["reload"]);
    assert!(output.status.success(), "{}", text(&output));
    let reloading = next_notification(&socket);
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    let ready_again = next_notification(&socket);
    assert!(
        ready_again.lines().any(|l| l == "READY=1"),
        "{ready_again:?}"
    );

    assert!(host.cli(&["stop"]).status.success());
    let stopping = next_notification(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    host.wait_exit();
}

#[test]
fn a_socket_activated_listener_is_adopted() {
    use command_fds::{CommandFdExt, FdMapping};
    let dir = TestDir::new("activation");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let activated = listener.local_addr().unwrap();
    // The config names another port: the group takes the passed socket by
    // its FileDescriptorName.
    let config = sample_config(&dir, 2, "");
    let host = Host::start_with(dir, &config, move |command| {
        let program = command.get_program().to_owned();
        let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
        let mut wrapped = std::process::Command::new("/bin/sh");
        wrapped
            .arg("-c")
            // systemd sets LISTEN_PID to the service's pid; exec keeps it.
            .arg("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web exec \"$0\" \"$@\"")
            .arg(program)
            .args(args);
        for (key, value) in command.get_envs() {
            if let Some(value) = value {
                wrapped.env(key, value);
            }
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(command.get_current_dir().unwrap().join("master.log"))
            .unwrap();
        wrapped.stdout(log.try_clone().unwrap()).stderr(log);
        wrapped
            .fd_mappings(vec![FdMapping {
                parent_fd: listener.into(),
                child_fd: 3,
            }])
            .unwrap();
        *command = wrapped;
    });
    assert_eq!(host.addr, activated);
    assert_eq!(get(activated, "/version").body, "v1");
    assert!(host.log().contains("socket-activated"), "{}", host.log());
}

#[test]
fn metrics_count_requests_and_never_go_backwards_across_a_reload() {
    let dir = TestDir::new("metrics");
    let config = sample_config(&dir, 2, "admin = \"127.0.0.1:0\"");
    let host = Host::start(dir, &config);
    let admin = host.admin();
    let v1 = host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..20 {
        assert_eq!(get(host.addr, "/").status, 200);
    }
    assert_eq!(get(host.addr, "/nowhere").status, 404);
    let v1_ok = format!("host_requests_total{{group=\"web\",class=\"2xx\",version=\"{v1}\"}}");
    let before = metrics(&admin);
    assert_eq!(metric(&before, &v1_ok), 20, "{before}");
    assert_eq!(
        metric(
            &before,
            &format!("host_requests_total{{group=\"web\",class=\"4xx\",version=\"{v1}\"}}")
        ),
        1
    );

    host.dir.install(Variant::SampleV2, "handler.so");
    assert!(host.cli(&["reload"]).status.success());
    let v2 = host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..5 {
        assert_eq!(get(host.addr, "/").status, 200);
    }
    let after = metrics(&admin);
    assert_eq!(
        metric(&after, &v1_ok),
        20,
        "retired workers' counts are kept: {after}"
    );
    assert_eq!(
        metric(
            &after,
            &format!("host_requests_total{{group=\"web\",class=\"2xx\",version=\"{v2}\"}}")
        ),
        5,
        "{after}"
    );
    assert_eq!(
        metric(&after, "host_reloads_total{result=\"ok\"}"),
        1,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "host_worker_exits_total{group=\"web\",reason=\"retired\"}"
        ),
        2,
        "{after}"
    );
    assert_eq!(
        metric(&after, "host_worker_starts_total{group=\"web\"}"),
        4,
        "{after}"
    );
    assert_eq!(
        metric(&after, "host_reload_duration_seconds_count"),
        1,
        "{after}"
    );
}

#[test]
fn healthz_flips_while_a_group_has_no_ready_worker() {
    let dir = TestDir::new("healthz");
    let config = sample_config(&dir, 1, "admin = \"127.0.0.1:0\"");
    let host = Host::start(dir, &config);
    let admin: std::net::SocketAddr = host.status()["admin"].as_str().unwrap().parse().unwrap();
    assert_eq!(get(admin, "/healthz").status, 200);

    // Take the stored build away: the replacement of a killed worker
    // cannot load until it is back.
    let version = host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = host.dir.path.join("run/store");
    let stored = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "so") && p.to_string_lossy().contains(&version)
        })
        .unwrap();
    let aside = host.dir.path.join("aside.so");
    std::fs::rename(&stored, &aside).unwrap();
    kill(host.worker_pids()[0], Signal::SIGKILL);
    wait_until("healthz reports not ready", || {
        request(admin, "GET", "/healthz", b"")
            .is_ok_and(|r| r.status == 503 && r.body.contains("web 0/1"))
    });
    std::fs::rename(&aside, &stored).unwrap();
    wait_until("healthz is ready again", || {
        request(admin, "GET", "/healthz", b"").is_ok_and(|r| r.status == 200)
    });
    assert_eq!(get(host.addr, "/version").body, "v1");
}

#[test]
fn json_logs_carry_group_slot_pid_and_version() {
    let dir = TestDir::new("json-logs");
    let config = sample_config(&dir, 1, "");
    let host = Host::start_with(dir, &config, |command| {
        command.env("HOST_LOG_FORMAT", "json");
    });
    assert_eq!(get(host.addr, "/panic").status, 500);
    let worker_pid = host.worker_pids()[0];
    wait_until("the handler's panic is logged", || {
        host.log().contains("/panic was requested")
    });
    let lines: Vec<Value> = host
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let panic_line = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("/panic was requested"))
        })
        .unwrap();
    assert_eq!(panic_line["group"], "web");
    assert_eq!(panic_line["slot"], 0);
    assert_eq!(panic_line["pid"], worker_pid);
    assert_eq!(panic_line["version"], host.status()["groups"][0]["version"]);
    assert!(
        lines.iter().any(|l| l["message"] == "worker ready"),
        "master lines are JSON too"
    );
}

#[test]
fn connections_lists_each_open_connection() {
    let dir = TestDir::new("connections");
    let config = sample_config(&dir, 1, "");
    let host = Host::start(dir, &config);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(idle_connection(host.addr, "/version", "v1"));
    }
    let output = host.cli(&["connections", "--json"]);
    assert!(output.status.success(), "{}", text(&output));
    let workers: Value = serde_json::from_slice(&output.stdout).unwrap();
    let listed = workers[0]["connections"].as_array().unwrap();
    for client in &clients {
        let peer = client.local_addr().unwrap().to_string();
        let entry = listed
            .iter()
            .find(|c| c["peer"] == peer.as_str())
            .unwrap_or_else(|| panic!("{peer} not in {listed:?}"));
        assert_eq!(entry["requests"], 1);
        assert_eq!(entry["state"], "idle");
    }
    let table = text(&host.cli(&["connections"]));
    assert!(table.contains("3 connection(s) on 1 worker(s)"), "{table}");
}

/// Stops a daemonized master (not a child of the test) even if the test fails.
struct DaemonGuard<'a>(&'a TestDir);

impl Drop for DaemonGuard<'_> {
    fn drop(&mut self) {
        for pid in processes_of(self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

#[test]
fn the_daemon_log_file_is_reopened_on_sigusr2() {
    let dir = TestDir::new("reopen");
    let config = sample_config(&dir, 1, "");
    dir.write("host.toml", &config);
    let _guard = DaemonGuard(&dir);
    let output = host_command(&dir, &["start", "-d"]);
    assert!(output.status.success(), "{}", text(&output));
    let log = dir.path.join("run/host.log");
    let rotated = dir.path.join("run/host.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let pid: i32 = std::fs::read_to_string(dir.path.join("run/host.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGUSR2).unwrap();
    wait_until("the master writes to a new log file", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("log file reopened"))
    });
    let status: Value =
        serde_json::from_slice(&host_command(&dir, &["status", "--json"]).stdout).unwrap();
    let addr = status["groups"][0]["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // The worker's lines follow: it reopens when the master tells it to.
    wait_until("a worker line lands in the new file", || {
        let _ = request(addr, "GET", "/panic", b"");
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/panic was requested"))
    });
    assert!(std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("worker ready"));
    assert!(host_command(&dir, &["stop"]).status.success());
    wait_until("the daemon is gone", || processes_of(&dir).is_empty());
}

#[test]
fn as_root_the_master_and_workers_run_as_the_configured_user() {
    if !root_or_skip(
        "as_root_the_master_and_workers_run_as_the_configured_user",
        "to drop privileges",
    ) {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a nobody user");
    let dir = TestDir::new("user");
    let config = sample_config(&dir, 2, "user = \"nobody\"");
    let host = Host::start(dir, &config);
    let uid_of = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("Uid:").map(|v| {
                    v.split_whitespace()
                        .map(|u| u.parse::<u32>().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .unwrap()
    };
    for pid in std::iter::once(host.pid()).chain(host.worker_pids()) {
        assert!(
            uid_of(pid).iter().all(|uid| *uid == nobody.uid.as_raw()),
            "pid {pid} still has root ids"
        );
    }
    assert_eq!(get(host.addr, "/version").body, "v1");
    host.dir.install(Variant::SampleV2, "handler.so");
    let output = host.cli(&["reload"]);
    assert!(
        output.status.success(),
        "reload as nobody: {}",
        text(&output)
    );
    assert_eq!(get(host.addr, "/version").body, "v2");
}

#[test]
fn a_worker_wrapper_runs_each_worker() {
    use std::os::unix::fs::PermissionsExt as _;
    // What scripts/profile does with valgrind, with a wrapper that leaves a
    // trace of its arguments.
    let dir = TestDir::new("wrapper");
    let trace = dir.path.join("wrapped.txt");
    let script = dir.write(
        "wrap.sh",
        format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\nexec \"$@\"\n",
            trace.display()
        ),
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = sample_config(&dir, 2, "");
    let host = Host::start_with(dir, &config, |command| {
        command.env("HOST_WORKER_WRAPPER", &script);
    });
    assert_eq!(get(host.addr, "/version").body, "v1");
    let lines: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let expected = format!("/proc/{}/exe worker", host.pid());
    assert_eq!(
        lines,
        [expected.clone(), expected],
        "one wrapped start per worker"
    );
}
