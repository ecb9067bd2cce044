//! The CLI never locks anyone out of a running host, and config mistakes
//! are explained in the user's terms.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::*;

fn status_json(output: &Output) -> Value {
    assert!(output.status.success(), "{}", text(output));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn a_config_that_no_longer_parses_never_locks_out_stop_and_status() {
    let dir = TestDir::new("lockout");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let mut host = Host::start(dir, &one_group_config(&handler, 1, ""));
    let good = std::fs::read_to_string(host.dir.path.join("host.toml")).unwrap();
    host.dir
        .write("host.toml", format!("{good}\n[group]\nname = \"broken\"\n"));

    let status = status_json(&host.cli(&["status", "--json"]));
    assert_eq!(status["workers"].as_array().unwrap().len(), 1, "{status}");
    let output = host.cli(&["reload"]);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(
        shown.contains("reload refused; the running host is untouched")
            && shown.contains("use [[group]] (an array of tables)"),
        "{shown}"
    );
    assert_all_serve(&host, "v1");

    // From another directory, with the config's absolute path.
    let mut command = Command::new(host_bin());
    command
        .current_dir("/")
        .args(["status", "--json", "-c"])
        .arg(host.dir.path.join("host.toml"));
    let output = run_bounded(command);
    assert_eq!(status_json(&output)["pid"], host.pid());

    let output = host.cli(&["stop"]);
    assert!(output.status.success(), "{}", text(&output));
    host.wait_exit();
}

#[test]
fn versions_and_gc_with_nothing_running_create_no_run_directory() {
    let dir = TestDir::new("no-side-effects");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    dir.write("host.toml", one_group_config(&handler, 1, ""));
    for args in [&["versions"][..], &["gc"][..], &["status"][..]] {
        let output = host_command(&dir, args);
        assert!(
            !dir.path.join("run").exists(),
            "host {args:?} created the run directory: {}",
            text(&output)
        );
    }
}

fn config_error(name: &str, config: &str) -> String {
    let dir = TestDir::new(name);
    dir.write("host.toml", config);
    let output = host_command(&dir, &["status"]);
    assert!(!output.status.success(), "{}", text(&output));
    text(&output)
}

const HEAD: &str = "run_dir = \"run\"\n[[group]]\nname = \"web\"\nhandler = \"h.so\"\n";

#[test]
fn config_mistakes_are_explained_with_an_example() {
    let shown = config_error(
        "duration",
        &format!("{HEAD}listen = \"127.0.0.1:0\"\nstart_timeout = \"10\"\n"),
    );
    assert!(
        shown.contains("expected a duration such as \"10s\" or \"500ms\""),
        "{shown}"
    );
    let shown = config_error(
        "table",
        "run_dir = \"run\"\n[group]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nhandler = \"h.so\"\n",
    );
    assert!(
        shown.contains("use [[group]] (an array of tables)"),
        "{shown}"
    );
    let shown = config_error("listen", &format!("{HEAD}listen = \"localhost:80\"\n"));
    assert!(
        shown.contains("an address is IP:PORT, e.g. 127.0.0.1:80"),
        "{shown}"
    );
}

#[test]
fn a_port_in_use_says_what_to_check() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = TestDir::new("port-in-use");
    let _cleanup = KillOnDrop(&dir);
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let config = one_group_config(&handler, 1, "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    dir.write("host.toml", config);
    let output = host_command(&dir, &["start", "-d"]);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("ss -ltnp 'sport = :{port}'")),
        "{shown}"
    );
}

#[test]
fn a_missing_handler_is_named_once_and_a_mistyped_group_lists_the_groups() {
    let dir = TestDir::new("missing-handler");
    let _cleanup = KillOnDrop(&dir);
    let missing = dir.path.join("nope.so");
    dir.write("host.toml", one_group_config(&missing, 1, ""));
    let output = host_command(&dir, &["start", "-d"]);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert_eq!(
        shown.matches(&missing.display().to_string()).count(),
        1,
        "{shown}"
    );
    assert!(shown.contains("No such file"), "{shown}");

    let handler = dir.install(Variant::SampleV1, "handler.so");
    let host = Host::start(
        TestDir::new("mistyped-group"),
        &one_group_config(&handler, 1, ""),
    );
    let output = host.cli(&["reload", "--group", "wbe"]);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(
        shown.contains("no group named \"wbe\" in the config; its groups are: web"),
        "{shown}"
    );
}

#[test]
fn restart_takes_watch() {
    let dir = TestDir::new("restart-watch");
    let _cleanup = KillOnDrop(&dir);
    let handler = dir.install(Variant::SampleV1, "handler.so");
    dir.write("host.toml", one_group_config(&handler, 1, ""));
    let output = host_command(&dir, &["start", "-d"]);
    assert!(output.status.success(), "{}", text(&output));
    let output = host_command(&dir, &["restart", "--watch"]);
    assert!(output.status.success(), "{}", text(&output));
    dir.install(Variant::SampleV2, "handler.so");
    wait_until("the rebuild is served", || {
        let output = host_command(&dir, &["status", "--json"]);
        output.status.success()
            && serde_json::from_slice::<Value>(&output.stdout).is_ok_and(|s| {
                s["workers"]
                    .as_array()
                    .is_some_and(|w| w.len() == 1 && w[0]["handler_version"] == "v2")
            })
    });
    let output = host_command(&dir, &["stop"]);
    assert!(output.status.success(), "{}", text(&output));
}
