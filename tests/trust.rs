//! A host run as root never loads code another user controls, and a store
//! entry is loaded only if its bytes are the version its name says.
//!
//! Each test plays an unprivileged local user: files and directories are
//! given to uid 54321 (no such account is needed), exactly the four ways
//! that once made a root-run host load that user's library. They need root
//! (CI runs as root); run as another user they say so and skip.

mod support;

use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};
use support::*;

/// A uid no account uses.
const OTHER_USER: u32 = 54321;

fn as_root(test: &str) -> bool {
    root_or_skip(test, "to give files to another uid")
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn give_away(path: &Path) {
    chown(path, Some(OTHER_USER), None).unwrap();
}

fn give_away_tree(path: &Path) {
    give_away(path);
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            give_away_tree(&entry.unwrap().path());
        }
    }
}

fn sha256(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `host start -d` with `config`, expected to fail with every one of
/// `expected` in its output and to leave nothing running.
fn refused_start(dir: &TestDir, config: &str, expected: &[&str]) {
    let _leftovers = KillOnDrop(dir);
    dir.write("host.toml", config);
    let output = host_command(dir, &["start", "-d"]);
    let shown = text(&output);
    assert!(!output.status.success(), "start was not refused:\n{shown}");
    for part in expected {
        assert!(shown.contains(part), "expected {part:?} in:\n{shown}");
    }
    wait_until("nothing is left running", || processes_of(dir).is_empty());
}

/// A directory for handler files inside the test directory: 0755, ours.
fn safe_dir(dir: &TestDir, name: &str) -> std::path::PathBuf {
    let path = dir.path.join(name);
    std::fs::create_dir_all(&path).unwrap();
    chmod(&path, 0o755);
    path
}

fn copy_handler(variant: Variant, to: &Path) {
    std::fs::copy(handler(variant), to).unwrap();
    chmod(to, 0o644);
}

#[test]
fn a_run_directory_prepared_by_another_user_is_refused_not_adopted() {
    if !as_root("a_run_directory_prepared_by_another_user_is_refused_not_adopted") {
        return;
    }
    let dir = TestDir::new("trust-run-dir");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    // The other user plants their build under the name of ours.
    let store = dir.path.join("run").join("store");
    std::fs::create_dir_all(&store).unwrap();
    copy_handler(
        Variant::SampleV2,
        &store.join(format!("{}.so", sha256(&handler))),
    );
    give_away_tree(&dir.path.join("run"));
    let config = one_group_config(&handler, 1, "");
    refused_start(
        &dir,
        &config,
        &[
            "refusing to use the run directory",
            &format!(
                "{} is owned by uid {OTHER_USER}",
                dir.path.join("run").display()
            ),
        ],
    );
    let meta = std::fs::metadata(dir.path.join("run")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        OTHER_USER,
        "the run directory was adopted"
    );

    // Only a file inside it belongs to the other user: still refused.
    chown(dir.path.join("run"), Some(0), None).unwrap();
    chown(&store, Some(0), None).unwrap();
    refused_start(&dir, &config, &["is owned by uid 54321", ".so"]);
}

#[test]
fn a_store_entry_whose_bytes_do_not_match_its_name_is_never_loaded() {
    let dir = TestDir::new("trust-store-entry");
    let handler = dir.install(Variant::SampleV1, "handler.so");
    let store = dir.path.join("run").join("store");
    std::fs::create_dir_all(&store).unwrap();
    chmod(&dir.path.join("run"), 0o700);
    let entry = store.join(format!("{}.so", sha256(&handler)));
    copy_handler(Variant::SampleV2, &entry);
    chmod(&entry, 0o444);

    // On import: the entry is rewritten with the bytes of its name.
    let host = Host::start(dir, &one_group_config(&handler, 1, ""));
    assert_all_serve(&host, "v1");
    assert!(
        host.log().contains("does not match its name"),
        "{}",
        host.log()
    );
    assert_eq!(sha256(&entry), sha256(&handler));

    // Before a worker loads it: a restart after tampering is refused, and
    // the error names the store copy it tried.
    chmod(&entry, 0o644);
    std::fs::copy(support::handler(Variant::SampleV2), &entry).unwrap();
    chmod(&entry, 0o444);
    let worker = host.worker_pids()[0];
    kill(worker, nix::sys::signal::Signal::SIGKILL);
    // Through at least two refused restarts, no worker of the slot ever
    // becomes ready: a loaded tampered build would serve.
    let refusal = format!(
        "cannot load {} (the store copy of {}",
        entry.display(),
        handler.display()
    );
    wait_until("two restarts refuse the tampered entry", || {
        let status = host.status();
        let ready: Vec<_> = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .collect();
        assert!(
            ready.is_empty(),
            "a worker serves the tampered entry: {status}"
        );
        let log = host.log();
        log.matches(&refusal).count() >= 2 && log.contains("its bytes do not match its name")
    });

    // A reload stores the handler again, and v1 serves.
    let output = host.cli(&["reload"]);
    assert!(output.status.success(), "{}", text(&output));
    wait_serving(&host, "v1");
    assert_all_serve(&host, "v1");
}

#[test]
fn a_symlink_cannot_lead_around_the_directory_check() {
    if !as_root("a_symlink_cannot_lead_around_the_directory_check") {
        return;
    }
    let dir = TestDir::new("trust-symlink");
    let open = safe_dir(&dir, "ww");
    chmod(&open, 0o777);
    copy_handler(Variant::SampleV1, &open.join("a.so"));
    symlink("ww/a.so", dir.path.join("cur.so")).unwrap();
    let config = one_group_config(&dir.path.join("cur.so"), 1, "");
    refused_start(
        &dir,
        &config,
        &[&format!("{} is writable by other users", open.display())],
    );

    // Running: the directory the link leads to becomes writable by others
    // and their build appears there; the reload is refused, v1 serves.
    chmod(&open, 0o755);
    let host = Host::start(dir, &config);
    assert_all_serve(&host, "v1");
    chmod(&open, 0o777);
    let planted = open.join(".planted");
    copy_handler(Variant::SampleV2, &planted);
    std::fs::rename(&planted, open.join("a.so")).unwrap();
    let output = host.cli(&["reload"]);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(shown.contains("is writable by other users"), "{shown}");
    assert_all_serve(&host, "v1");
}

#[test]
fn a_handler_owned_by_another_user_is_refused() {
    if !as_root("a_handler_owned_by_another_user_is_refused") {
        return;
    }
    let dir = TestDir::new("trust-owner");
    let lib = safe_dir(&dir, "lib");
    let file = lib.join("h.so");
    copy_handler(Variant::SampleV1, &file);
    give_away(&file);
    let config = one_group_config(&file, 1, "");
    refused_start(
        &dir,
        &config,
        &[&format!("{} is owned by uid {OTHER_USER}", file.display())],
    );

    // Running: the file is given away, its new owner rewrites it in place.
    chown(&file, Some(0), None).unwrap();
    let host = Host::start(dir, &config);
    assert_all_serve(&host, "v1");
    give_away(&file);
    std::fs::write(&file, std::fs::read(handler(Variant::SampleV2)).unwrap()).unwrap();
    let output = host.cli(&["reload"]);
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(shown.contains("is owned by uid 54321"), "{shown}");
    assert_all_serve(&host, "v1");
}

#[test]
fn a_directory_another_user_controls_is_refused_anywhere_above_the_handler() {
    if !as_root("a_directory_another_user_controls_is_refused_anywhere_above_the_handler") {
        return;
    }
    let dir = TestDir::new("trust-dirs");
    // A directory owned by the other user, holding a root-owned handler.
    let theirs = safe_dir(&dir, "theirs");
    copy_handler(Variant::SampleV1, &theirs.join("h.so"));
    give_away(&theirs);
    refused_start(
        &dir,
        &one_group_config(&theirs.join("h.so"), 1, ""),
        &[&format!(
            "{} is owned by uid {OTHER_USER}",
            theirs.display()
        )],
    );

    // A world-writable grandparent without the sticky bit.
    let open = safe_dir(&dir, "open");
    let inner = safe_dir(&dir, "open/inner");
    copy_handler(Variant::SampleV1, &inner.join("h.so"));
    chmod(&open, 0o777);
    let config = one_group_config(&inner.join("h.so"), 1, "");
    refused_start(
        &dir,
        &config,
        &[&format!("{} is writable by other users", open.display())],
    );

    // With the sticky bit (like /tmp), others cannot move our entries: fine.
    chmod(&open, 0o1777);
    let host = Host::start(dir, &config);
    assert_all_serve(&host, "v1");

    // And the explicit opt-out still loads what the checks refuse.
    let dir = TestDir::new("trust-dirs-opt-out");
    let theirs = safe_dir(&dir, "theirs");
    copy_handler(Variant::SampleV1, &theirs.join("h.so"));
    give_away(&theirs);
    let host = Host::start(
        dir,
        &one_group_config(&theirs.join("h.so"), 1, "allow_writable_handler = true"),
    );
    assert_all_serve(&host, "v1");
}
