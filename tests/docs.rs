//! What the README tells a newcomer to run stays true to how versions work.

use std::path::Path;

fn readme() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::read_to_string(root.join("README.md")).unwrap()
}

/// The cargo invocation that starts a shell line (up to `&&`).
fn cargo_part(line: &str) -> &str {
    line.split("&&").next().unwrap().trim()
}

#[test]
fn the_developer_loop_builds_the_handler_with_the_set_up_command() {
    // Same source, same version: a build that selects other packages
    // unifies other dependency features and gives other bytes.
    let readme = readme();
    let lines: Vec<&str> = readme.lines().collect();
    let set_up = lines
        .iter()
        .find(|l| l.contains("target/release/host start"))
        .expect("a set-up line that starts host");
    let reload = lines
        .iter()
        .find(|l| l.starts_with("cargo build") && l.contains("host reload"))
        .expect("a developer loop that reloads");
    assert_eq!(cargo_part(set_up), cargo_part(reload));
}
