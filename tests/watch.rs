//! Watch mode: a rebuild of the handler file reloads by itself; a burst of
//! rebuilds is one reload; a broken build keeps the current version.

mod support;

use support::*;

fn start_watching(name: &str) -> Host {
    let dir = TestDir::new(name);
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let config = format!("watch = true\n{}", one_group_config(&handler, 2, ""));
    Host::start(dir, &config)
}

#[test]
fn a_rebuild_is_picked_up_without_a_failed_request() {
    let host = start_watching("rebuild");
    let run = steady_load(host.addr, 16);
    host.dir.install(Variant::SampleV2, "handler.so");
    wait_serving(&host, "v2");
    assert_eq!(get(host.addr, "/version").body, "v2");
    let report = run.stop();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(host.status()["reloads_ok"], 1);
}

#[test]
fn a_burst_of_rebuilds_is_one_reload_of_the_last() {
    let host = start_watching("burst");
    // Copied first, then renamed in one quick burst (as cargo does): the
    // copies themselves can take longer than the debounce on a busy machine.
    let staged: Vec<_> = [
        Variant::SampleV2,
        Variant::SampleV1,
        Variant::SampleV2,
        Variant::SampleV1,
        Variant::SampleV2,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, variant)| host.dir.install(variant, &format!("staged-{i}.so")))
    .collect();
    for file in staged {
        std::fs::rename(file, host.dir.path.join("handler.so")).unwrap();
    }
    wait_serving(&host, "v2");
    let status = host.status();
    assert_eq!(status["reloads_ok"], 1, "{status}");
    assert_eq!(status["reloads_failed"], 0, "{status}");
}

#[test]
fn a_broken_build_keeps_the_current_version_and_the_next_good_one_reloads() {
    let host = start_watching("broken");
    let run = steady_load(host.addr, 16);
    let pids = host.worker_pids();
    let before = host.log().lines().count();
    host.dir.install(Variant::Faulty("panic"), "handler.so");
    wait_until("the broken build is refused", || {
        host.status()["reloads_failed"] == 1
    });
    assert_eq!(host.worker_pids(), pids);
    assert_eq!(get(host.addr, "/version").body, "v1");
    // One line from host itself (the handler's own panic hook may log too).
    let log = host.log();
    let lines: Vec<&str> = log
        .lines()
        .skip(before)
        .filter(|l| l.contains(" host::"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("reload failed") && lines[0].contains("on purpose"),
        "the loader's error is in the line: {}",
        lines[0]
    );
    let current = group_version(&host);
    assert!(
        lines[0].contains(&format!("web still serves {current} (refused ")),
        "{}",
        lines[0]
    );

    host.dir.install(Variant::SampleV2, "handler.so");
    wait_serving(&host, "v2");
    let report = run.stop();
    assert_eq!(report.failed(), 0, "{report:?}");
}

/// The short version the group's workers run.
fn group_version(host: &Host) -> String {
    host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_pinned_group_ignores_rebuilds() {
    let host = start_watching("pinned");
    let current = host.status()["groups"][0]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let output = host.cli(&["pin", &current]);
    assert!(output.status.success(), "{}", text(&output));
    let pids = host.worker_pids();
    host.dir.install(Variant::SampleV2, "handler.so");
    wait_until("the change is seen and ignored", || {
        host.log().contains("the group is pinned")
    });
    let status = host.status();
    assert_eq!(status["reloading"], false, "{status}");
    assert_eq!(status["reloads_ok"], 0, "{status}");
    assert_eq!(host.worker_pids(), pids);
    assert_eq!(get(host.addr, "/version").body, "v1");
}

#[test]
fn a_rebuild_others_could_write_is_refused_and_the_next_good_one_reloads() {
    use std::os::unix::fs::PermissionsExt as _;
    let host = start_watching("writable");
    // Made writable by everyone before it lands, as a careless build might.
    let temp = host.dir.path.join(".writable.tmp");
    std::fs::copy(handler(Variant::SampleV2), &temp).unwrap();
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::rename(&temp, host.dir.path.join("handler.so")).unwrap();
    wait_until("the writable build is refused in the log", || {
        host.log().contains("cannot be used")
    });
    assert!(host.log().contains("writable"), "{}", host.log());
    assert_eq!(get(host.addr, "/version").body, "v1");
    assert_eq!(host.status()["reloads_ok"], 0);

    host.dir.install(Variant::SampleV2, "handler.so");
    wait_serving(&host, "v2");
}

#[test]
fn a_touch_or_a_rewrite_of_the_same_bytes_does_not_reload() {
    let dir = TestDir::new("unchanged");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let config = format!("watch = true\n{}", one_group_config(&handler, 2, ""));
    let host = Host::start_with(dir, &config, |command| {
        command.env("HOST_LOG", "info,host::master=debug");
    });
    let pids = host.worker_pids();
    let skipped = || {
        host.log()
            .matches("handler file touched but unchanged")
            .count()
    };
    let bytes = std::fs::read(&handler).unwrap();
    let change = |what: &str| match what {
        "a touch" => {
            let file = std::fs::File::options().write(true).open(&handler).unwrap();
            file.set_modified(std::time::SystemTime::now()).unwrap();
        }
        "the same bytes written in place" => std::fs::write(&handler, &bytes).unwrap(),
        _ => {
            host.dir.install(Variant::SampleV1, "handler.so");
        }
    };
    for what in [
        "a touch",
        "the same bytes written in place",
        "the same build installed again",
    ] {
        let before = skipped();
        change(what);
        // Wait for the master's verdict on this change, whichever it is.
        wait_until(&format!("{what} is looked at"), || {
            skipped() > before || host.try_status()["reloads_ok"] != 0
        });
        let status = host.status();
        assert_eq!(status["reloads_ok"], 0, "{what} reloaded: {status}");
        assert_eq!(host.worker_pids(), pids, "{what} replaced workers");
    }
    // The watch is still live: a real change reloads.
    host.dir.install(Variant::SampleV2, "handler.so");
    wait_serving(&host, "v2");
    assert_eq!(host.status()["reloads_ok"], 1);
}
