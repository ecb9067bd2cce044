//! `host reload` (and SIGHUP) re-reads host.toml and applies the edits with
//! the same rolling replacement as a handler reload: worker counts, group
//! settings, groups added and removed, a moved listener; a config that does
//! not parse, or an edit only a restart applies, changes nothing.

mod support;

use std::net::{SocketAddr, TcpStream};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;

fn start(name: &str, count: usize, extra: &str) -> (Host, std::path::PathBuf) {
    let dir = TestDir::new(name);
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let host = Host::start(dir, &one_group_config(&handler, count, extra));
    (host, handler)
}

/// Writes a new host.toml.
fn edit(host: &Host, config: &str) {
    host.dir.write("host.toml", config);
}

/// `host reload --json`: whether it exited 0, and what it printed.
fn reload_json(host: &Host) -> (bool, Value) {
    let output = host.cli(&["reload", "--json"]);
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("reload --json printed no JSON ({e}): {}", text(&output)));
    (output.status.success(), report)
}

fn config_changes(report: &Value) -> Vec<String> {
    report["config_changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no config_changes: {report:#}"))
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

/// The status entry of group `name`.
fn group(host: &Host, name: &str) -> Value {
    host.status()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_err()
}

#[test]
fn count_up_and_down_apply_under_load_with_no_failed_request() {
    let (host, handler) = start("count", 2, "");
    let load = steady_load(host.addr, 32);

    edit(&host, &one_group_config(&handler, 3, ""));
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert_eq!(config_changes(&report), ["web: count 2 -> 3"]);
    wait_serving(&host, "v1");
    assert_eq!(host.worker_pids().len(), 3);

    edit(&host, &one_group_config(&handler, 1, ""));
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert_eq!(config_changes(&report), ["web: count 3 -> 1"]);
    // The reload ends once the dropped workers are gone, not when told to go.
    assert_eq!(host.worker_pids().len(), 1, "{}", host.status());
    assert_eq!(group(&host, "web")["count"], 1);

    let report = load.stop();
    assert!(report.ok > 0, "{report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
}

#[test]
fn a_settings_change_replaces_every_worker_under_load() {
    let (host, handler) = start("settings", 2, "");
    assert_eq!(get(host.addr, "/greeting").body, "hello");
    let pids = host.worker_pids();
    let load = steady_load(host.addr, 32);

    edit(
        &host,
        &one_group_config(&handler, 2, "[group.settings]\ngreeting = \"hi\""),
    );
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert_eq!(config_changes(&report), ["web: settings changed"]);
    wait_serving(&host, "v1");
    for pid in host.worker_pids() {
        assert!(!pids.contains(&pid), "worker {pid} kept its old settings");
    }
    for _ in 0..10 {
        assert_eq!(get(host.addr, "/greeting").body, "hi");
    }
    let report = load.stop();
    assert_eq!(report.failed(), 0, "{report:?}");
}

#[test]
fn an_unchanged_config_says_so_and_still_replaces_the_workers() {
    let (host, _) = start("unchanged", 1, "");
    let pids = host.worker_pids();
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert!(config_changes(&report).is_empty(), "{report:#}");
    assert_ne!(host.worker_pids(), pids);
    let output = host.cli(&["reload"]);
    assert_says(&output, "config: nothing changed");
}

#[test]
fn a_new_group_is_served_and_a_removed_groups_port_closes() {
    let (host, handler) = start("groups", 1, "");
    let web = one_group_config(&handler, 1, "");
    let api = format!(
        "[[group]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\ncount = 2\nhandler = {:?}\n",
        handler.display().to_string()
    );
    edit(&host, &format!("{web}\n{api}"));
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert_eq!(config_changes(&report), ["new group api on 127.0.0.1:0"]);
    let api_addr: SocketAddr = group(&host, "api")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(group(&host, "api")["ready"], 2);
    assert_eq!(get(api_addr, "/version").body, "v1");

    let load = steady_load(host.addr, 16);
    edit(&host, &web);
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert_eq!(config_changes(&report), ["group api removed"]);
    assert!(group(&host, "api").is_null(), "{}", host.status());
    assert!(refuses_connections(api_addr), "api's port is still open");
    wait_serving(&host, "v1");
    let report = load.stop();
    assert_eq!(
        report.failed(),
        0,
        "web failed during api's removal: {report:?}"
    );
}

#[test]
fn a_new_group_that_cannot_bind_refuses_the_whole_reload() {
    let (host, handler) = start("bind-fails", 1, "");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let pids = host.worker_pids();
    let config = one_group_config(&handler, 2, "");
    edit(
        &host,
        &format!(
            "{config}\n[[group]]\nname = \"api\"\nlisten = \"{}\"\nhandler = {:?}\n",
            taken.local_addr().unwrap(),
            handler.display().to_string()
        ),
    );
    let (ok, report) = reload_json(&host);
    assert!(!ok, "{report:#}");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("cannot listen on"),
        "{report:#}"
    );
    assert_eq!(host.worker_pids(), pids, "web's count went up");
    assert_eq!(host.status()["groups"].as_array().unwrap().len(), 1);
}

#[test]
fn a_listen_change_moves_the_group_and_closes_the_old_port() {
    let (host, handler) = start("listen", 2, "");
    let old = host.addr;
    let new: SocketAddr = {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap()
    };
    let moved = one_group_config(&handler, 2, "").replace("127.0.0.1:0", &new.to_string());
    edit(&host, &moved);
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert_eq!(
        config_changes(&report),
        [format!("web: listen 127.0.0.1:0 -> {new}")]
    );
    assert_eq!(group(&host, "web")["listen"], new.to_string());
    assert_eq!(get(new, "/version").body, "v1");
    wait_until("the old port is closed", || refuses_connections(old));
}

#[test]
fn a_config_that_does_not_parse_is_refused_by_sighup_and_nothing_changes() {
    let (host, handler) = start("broken", 1, "");
    let pids = host.worker_pids();
    edit(&host, &one_group_config(&handler, 2, "count = \"many\""));
    host.signal(Signal::SIGHUP);
    wait_until("the reload is refused", || {
        host.status()["reloads_failed"] == 1
    });
    assert!(host.log().contains("invalid config"), "{}", host.log());
    assert_eq!(host.worker_pids(), pids);
    let failed = &host.status()["groups"][0]["last_failed_reload"];
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("invalid config")),
        "{failed:#}"
    );
}

#[test]
fn an_edit_that_needs_a_restart_is_refused_and_nothing_changes() {
    let (host, handler) = start("restart-only", 1, "");
    let pids = host.worker_pids();
    let config = one_group_config(&handler, 2, "");
    edit(&host, &format!("admin = \"127.0.0.1:0\"\n{config}"));
    let (ok, report) = reload_json(&host);
    assert!(!ok, "{report:#}");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("admin (none) -> 127.0.0.1:0"), "{error}");
    assert!(error.contains("restart"), "{error}");
    assert_eq!(host.worker_pids(), pids, "the count edit was applied");
}

#[test]
fn sighup_applies_the_config() {
    let (host, handler) = start("sighup", 1, "");
    edit(&host, &one_group_config(&handler, 2, ""));
    host.signal(Signal::SIGHUP);
    wait_until("the second worker serves", || {
        let status = host.try_status();
        status["groups"][0]["ready"] == 2 && status["reloading"] == false
    });
}

#[test]
fn a_refused_reload_names_the_refused_version_and_the_one_still_serving() {
    let (host, _) = start("refused-version", 1, "start_timeout = \"3s\"");
    let serving = host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    host.dir.install(Variant::Faulty("error"), "handler.so");
    let output = host.cli(&["reload"]);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("still serving web {serving}\n")),
        "{shown}"
    );
    let refused = shown
        .lines()
        .find_map(|l| l.strip_prefix("host: refused web "))
        .unwrap_or_else(|| panic!("no refused version in: {shown}"));
    assert_ne!(refused, serving, "{shown}");
}

#[test]
fn a_handler_path_change_replaces_the_workers_under_load() {
    let (host, handler) = start("handler-path", 2, "");
    let next = host.dir.install(Variant::SampleV2, "next.so");
    let load = steady_load(host.addr, 32);
    edit(&host, &one_group_config(&next, 2, ""));
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert_eq!(
        config_changes(&report),
        [format!(
            "web: handler {} -> {}",
            handler.display(),
            next.display()
        )]
    );
    assert_all_serve(&host, "v2");
    let report = load.stop();
    assert_eq!(report.failed(), 0, "{report:?}");
}

#[test]
fn reload_of_one_group_applies_only_that_groups_edits() {
    let dir = TestDir::new("one-group");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let two = |web: usize, api: usize| {
        format!(
            "{}\n[[group]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\ncount = {api}\nhandler = {:?}\n",
            one_group_config(&handler, web, ""),
            handler.display().to_string()
        )
    };
    let host = Host::start(dir, &two(1, 1));
    let api_pids = pids_of(&host, "api");
    edit(&host, &two(2, 2));
    let output = host.cli(&["reload", "--group", "web", "--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(output.status.success(), "{report:#}");
    assert_eq!(config_changes(&report), ["web: count 1 -> 2"]);
    assert_eq!(group(&host, "web")["count"], 2);
    assert_eq!(
        group(&host, "api")["count"],
        1,
        "api's edit waits for its own reload"
    );
    // Running workers, not only slots: web has two ready, and api's one
    // worker was left alone by web's reload.
    assert_eq!(group(&host, "web")["ready"], 2, "{}", host.status());
    assert_eq!(pids_of(&host, "web").len(), 2, "{}", host.status());
    assert_eq!(pids_of(&host, "api"), api_pids, "api's worker was replaced");
    let (ok, report) = reload_json(&host);
    assert!(ok, "{report:#}");
    assert_eq!(config_changes(&report), ["api: count 1 -> 2"]);
    assert_eq!(group(&host, "api")["count"], 2);
    assert_eq!(group(&host, "api")["ready"], 2, "{}", host.status());
    assert_eq!(pids_of(&host, "api").len(), 2, "{}", host.status());
}

/// The pids of group `name`'s workers, in status order.
fn pids_of(host: &Host, name: &str) -> Vec<u64> {
    host.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == name)
        .map(|w| w["pid"].as_u64().unwrap())
        .collect()
}
