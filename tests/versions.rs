//! Versions for operators: deploy, pin, reload --to, rollback, gc, the
//! config's sha256, and refusing handlers other users could have written.

mod support;

use std::os::unix::fs::PermissionsExt;

use serde_json::Value;
use support::*;

fn cli_ok(host_or_dir: &TestDir, args: &[&str]) -> String {
    let output = host_command(host_or_dir, args);
    assert!(output.status.success(), "host {args:?}: {}", text(&output));
    text(&output)
}

fn versions(dir: &TestDir) -> Vec<Value> {
    let output = host_command(dir, &["versions", "--json"]);
    assert!(output.status.success(), "{}", text(&output));
    serde_json::from_slice::<Value>(&output.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn version_with_label<'a>(versions: &'a [Value], label: &str) -> &'a Value {
    versions
        .iter()
        .find(|v| v["label"] == label)
        .unwrap_or_else(|| panic!("no version labelled {label}: {versions:?}"))
}

#[test]
fn deploy_lists_labels_and_what_the_handler_says_it_is() {
    let dir = TestDir::new("deploy");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    dir.write("host.toml", one_group_config(&handler, 1, ""));
    let v1 = handler.clone();
    let v2 = dir.install(Variant::SampleV2, "v2.so");
    let shown = cli_ok(&dir, &["deploy", v1.to_str().unwrap(), "--label", "first"]);
    assert!(
        shown.contains("deployed") && shown.contains("sample-handler v1"),
        "{shown}"
    );
    cli_ok(&dir, &["deploy", v2.to_str().unwrap(), "--label", "second"]);
    let listed = versions(&dir);
    assert_eq!(listed.len(), 2);
    assert_eq!(
        version_with_label(&listed, "first")["handler"],
        "sample-handler v1"
    );
    assert_eq!(
        version_with_label(&listed, "second")["handler"],
        "sample-handler v2"
    );
    let store_file = dir.path.join(format!(
        "run/store/{}.so",
        listed[0]["hash"].as_str().unwrap()
    ));
    assert_eq!(
        std::fs::metadata(store_file).unwrap().permissions().mode() & 0o777,
        0o444
    );
}

#[test]
fn deploy_refuses_a_build_that_would_not_load() {
    let dir = TestDir::new("deploy-bad");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    dir.write("host.toml", one_group_config(&handler, 1, ""));
    let bad = dir.install(Variant::AbiMismatch, "bad.so");
    let output = host_command(&dir, &["deploy", bad.to_str().unwrap()]);
    assert!(!output.status.success());
    assert_says(&output, "incompatible handler-api");
    assert!(
        versions(&dir).is_empty(),
        "a refused build stays out of the store"
    );
}

#[test]
fn pin_reload_to_and_rollback_switch_versions_without_failed_requests() {
    let dir = TestDir::new("pin");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let v2 = dir.install(Variant::SampleV2, "v2.so");
    let host = Host::start(dir, &one_group_config(&handler, 2, ""));
    let load = steady_load(host.addr, 16);

    cli_ok(
        &host.dir,
        &["deploy", v2.to_str().unwrap(), "--label", "two"],
    );
    let shown = cli_ok(&host.dir, &["reload", "--to", "two"]);
    assert!(shown.contains("reload ok"), "{shown}");
    assert_all_serve(&host, "v2");
    let listed = versions(&host.dir);
    let two = version_with_label(&listed, "two");
    assert_eq!(two["pinned"], serde_json::json!(["web"]));
    assert_eq!(two["running"].as_array().unwrap().len(), 2);
    assert!(two["hash"]
        .as_str()
        .unwrap()
        .starts_with(host.status()["groups"][0]["version"].as_str().unwrap()));

    let shown = cli_ok(&host.dir, &["rollback"]);
    assert!(shown.contains("rolling back"), "{shown}");
    assert_all_serve(&host, "v1");

    // Pin by hash prefix, then a plain reload runs the pinned build even
    // though the file holds v1.
    let prefix = &two["hash"].as_str().unwrap()[..8];
    cli_ok(&host.dir, &["pin", prefix]);
    cli_ok(&host.dir, &["reload"]);
    assert_all_serve(&host, "v2");
    let report = load.stop();
    assert_eq!(report.failed(), 0, "{report:?}");

    // The pin survives a restart.
    cli_ok(&host.dir, &["stop"]);
    let config = std::fs::read_to_string(host.dir.path.join("host.toml")).unwrap();
    let host = Host::start(host.into_dir(), &config);
    assert_all_serve(&host, "v2");

    // Unpinned, the group follows its file again.
    cli_ok(&host.dir, &["unpin"]);
    cli_ok(&host.dir, &["reload"]);
    assert_all_serve(&host, "v1");
}

#[test]
fn a_config_sha256_refuses_other_bytes_at_start_and_at_reload() {
    let dir = TestDir::new("sha256");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let hash = sha256_of(&handler);
    let host = Host::start(
        dir,
        &one_group_config(&handler, 2, &format!("sha256 = \"{hash}\"")),
    );
    let pids = host.worker_pids();
    host.dir.install(Variant::SampleV2, "handler.so");
    let output = host.cli(&["reload"]);
    assert!(!output.status.success());
    assert_says(&output, "config allows only");
    assert_eq!(host.worker_pids(), pids);
    assert_all_serve(&host, "v1");

    let dir = TestDir::new("sha256-start");
    let handler = dir.install(Variant::SampleV2, "handler.so");
    dir.write(
        "host.toml",
        one_group_config(&handler, 1, &format!("sha256 = \"{hash}\"")),
    );
    let output = host_start_must_fail(&dir);
    assert!(!output.status.success());
    assert_says(&output, "config allows only");
    wait_until("nothing is left running", || processes_of(&dir).is_empty());
}

fn sha256_of(path: &std::path::Path) -> String {
    let output = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(output.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn a_handler_writable_by_others_is_refused_unless_allowed() {
    let dir = TestDir::new("writable");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o666)).unwrap();
    dir.write("host.toml", one_group_config(&handler, 1, ""));
    let output = host_start_must_fail(&dir);
    assert!(!output.status.success());
    assert_says(&output, "writable by other users");
    wait_until("nothing is left running", || processes_of(&dir).is_empty());

    let host = Host::start(
        dir,
        &one_group_config(&handler, 1, "allow_writable_handler = true"),
    );
    assert_eq!(get(host.addr, "/version").body, "v1");
}

#[test]
fn gc_keeps_pinned_running_and_recent_versions() {
    let dir = TestDir::new("gc");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    dir.write("host.toml", one_group_config(&handler, 1, ""));
    let v2 = dir.install(Variant::SampleV2, "v2.so");
    let faulty = dir.install(Variant::Faulty("none"), "faulty.so");
    cli_ok(
        &dir,
        &["deploy", handler.to_str().unwrap(), "--label", "one"],
    );
    cli_ok(&dir, &["deploy", v2.to_str().unwrap(), "--label", "two"]);
    cli_ok(
        &dir,
        &["deploy", faulty.to_str().unwrap(), "--label", "three"],
    );
    cli_ok(&dir, &["pin", "one"]);
    // Labelled versions go only when asked for explicitly.
    let shown = cli_ok(&dir, &["gc", "--keep", "0"]);
    assert!(shown.contains("0 version(s) removed"), "{shown}");
    assert_eq!(versions(&dir).len(), 3);
    let shown = cli_ok(&dir, &["gc", "--keep", "0", "--labelled"]);
    assert!(shown.contains("2 version(s) removed"), "{shown}");
    let left = versions(&dir);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["label"], "one");
}

#[test]
fn a_handler_in_a_directory_others_can_write_is_refused_unless_it_is_sticky() {
    let dir = TestDir::new("writable-dir");
    let shared = dir.path.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let build = dir.install(Variant::SampleV1, "handler.so");
    let handler = shared.join("handler.so");
    std::fs::rename(&build, &handler).unwrap();
    assert_eq!(
        std::fs::metadata(&handler).unwrap().permissions().mode() & 0o022,
        0,
        "the file itself is not writable by others"
    );
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    dir.write("host.toml", one_group_config(&handler, 1, ""));
    let output = host_start_must_fail(&dir);
    assert!(!output.status.success(), "{}", text(&output));
    let expected = format!("{} is writable by other users", shared.display());
    assert_says(&output, &expected);
    wait_until("nothing is left running", || processes_of(&dir).is_empty());

    // Sticky, like /tmp: others cannot replace the file.
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let config = one_group_config(&handler, 1, "");
    let host = Host::start(dir, &config);
    assert_eq!(get(host.addr, "/version").body, "v1");
}

#[test]
fn gc_with_a_running_master_keeps_running_pinned_and_recent_versions() {
    let dir = TestDir::new("gc-running");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let v2 = dir.install(Variant::SampleV2, "v2.so");
    let three = dir.install(Variant::Faulty("none"), "three.so");
    let four = dir.install(Variant::Faulty("cued"), "four.so");
    let host = Host::start(dir, &one_group_config(&handler, 2, ""));
    let running = host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    cli_ok(
        &host.dir,
        &["deploy", v2.to_str().unwrap(), "--label", "two"],
    );
    cli_ok(
        &host.dir,
        &["deploy", three.to_str().unwrap(), "--label", "three"],
    );
    // The store orders versions by the second they were added: "four"
    // lands in a later second than the others, so it is the most recent.
    let three_added = version_with_label(&versions(&host.dir), "three")["added"]
        .as_u64()
        .unwrap();
    wait_until("a new second", || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        now.as_secs() > three_added
    });
    cli_ok(
        &host.dir,
        &["deploy", four.to_str().unwrap(), "--label", "four"],
    );
    cli_ok(&host.dir, &["pin", "two"]);
    // --labelled: labels alone keep nothing here.
    let shown = cli_ok(&host.dir, &["gc", "--keep", "1", "--labelled"]);
    assert!(shown.contains("1 version(s) removed, 3 kept"), "{shown}");
    assert!(shown.contains("(three)"), "{shown}");
    let left = versions(&host.dir);
    assert_eq!(left.len(), 3, "{left:?}");
    let by_hash = |prefix: &str| {
        left.iter()
            .any(|v| v["hash"].as_str().unwrap().starts_with(prefix))
    };
    assert!(
        by_hash(&running),
        "the running version was removed: {left:?}"
    );
    version_with_label(&left, "two");
    version_with_label(&left, "four");

    // The running workers keep serving, and the pinned build still reloads.
    assert_all_serve(&host, "v1");
    cli_ok(&host.dir, &["reload"]);
    assert_all_serve(&host, "v2");
}

#[test]
fn a_reload_collects_builds_nothing_needs_beyond_keep_versions() {
    let dir = TestDir::new("auto-gc");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let spare = dir.install(Variant::Faulty("none"), "spare.so");
    let kept = dir.install(Variant::Faulty("error"), "kept.so");
    let config = format!("keep_versions = 0\n{}", one_group_config(&handler, 1, ""));
    let host = Host::start(dir, &config);
    cli_ok(&host.dir, &["deploy", spare.to_str().unwrap()]);
    cli_ok(
        &host.dir,
        &["deploy", kept.to_str().unwrap(), "--label", "keepme"],
    );
    let v1 = host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(versions(&host.dir).len(), 3);

    host.dir.install(Variant::SampleV2, "handler.so");
    cli_ok(&host.dir, &["reload"]);
    wait_serving(&host, "v2");
    let v2 = host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    // Left: what runs, the rollback target, the labelled build; the
    // unlabelled spare goes.
    wait_until("the spare build is collected", || {
        versions(&host.dir).len() == 3
    });
    let left = versions(&host.dir);
    for wanted in [&v1, &v2] {
        assert!(
            left.iter()
                .any(|v| v["hash"].as_str().unwrap().starts_with(wanted.as_str())),
            "{wanted} was collected: {left:?}"
        );
    }
    version_with_label(&left, "keepme");
    cli_ok(&host.dir, &["rollback"]);
    wait_serving(&host, "v1");
}
