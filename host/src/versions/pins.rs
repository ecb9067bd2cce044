//! Which version each group must run (pins) and which ones it ran (history).
//!
//! Both are small JSON files in the run directory, written atomically, so the
//! CLI can pin a version with or without a running master and a pin survives
//! a restart. A group with a pin runs the pinned bytes, whatever its handler
//! file holds; without one, it follows the file. History records every
//! version a group started or reloaded to, so `rollback` knows the previous.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{de::DeserializeOwned, Serialize};

use crate::config::{GroupConfig, RunDir};

use super::store::{short, HandlerStore, Version};

/// How many versions of history are kept per group.
const HISTORY_LEN: usize = 50;

/// Group name → pinned hash.
pub type Pins = BTreeMap<String, String>;

/// Group name → hashes it ran, oldest first.
pub type History = BTreeMap<String, Vec<String>>;

/// The pins in force.
pub fn load_pins(run_dir: &RunDir) -> Result<Pins> {
    load(&run_dir.pins())
}

/// Pins `group` to `hash`, or unpins it with `None`.
pub fn set_pin(run_dir: &RunDir, group: &str, hash: Option<&str>) -> Result<()> {
    let mut pins = load_pins(run_dir)?;
    match hash {
        Some(hash) => pins.insert(group.to_owned(), hash.to_owned()),
        None => pins.remove(group),
    };
    save(&run_dir.pins(), &pins)
}

/// The versions each group ran.
pub fn load_history(run_dir: &RunDir) -> Result<History> {
    load(&run_dir.history())
}

/// Records that `group` now runs `hash`.
pub fn record(run_dir: &RunDir, group: &str, hash: &str) -> Result<()> {
    let mut history = load_history(run_dir)?;
    let runs = history.entry(group.to_owned()).or_default();
    if runs.last().map(String::as_str) != Some(hash) {
        runs.push(hash.to_owned());
        let excess = runs.len().saturating_sub(HISTORY_LEN);
        runs.drain(..excess);
    }
    save(&run_dir.history(), &history)
}

/// The version `group` ran before `current`.
pub fn previous(history: &History, group: &str, current: &str) -> Option<String> {
    let runs = history.get(group)?;
    let at = runs.iter().rposition(|h| h == current)?;
    runs[..at].iter().rev().find(|h| *h != current).cloned()
}

/// The version a group must run now: its pin if it has one, else a
/// snapshot of its handler file (`snapshot` if the caller just took one,
/// else a fresh one); either way within the config's `sha256`.
pub fn chosen_version(
    store: &HandlerStore,
    pins: &Pins,
    group: &GroupConfig,
    snapshot: Option<std::sync::Arc<Version>>,
) -> Result<std::sync::Arc<Version>> {
    let version = match (pins.get(&group.name), snapshot) {
        (Some(hash), _) => store
            .get(hash)
            .with_context(|| format!("group {} is pinned to {}", group.name, short(hash)))?,
        (None, Some(snapshot)) => snapshot,
        (None, None) => store
            .import(&group.handler, None, group.allow_writable_handler)
            .with_context(|| format!("group {}", group.name))?,
    };
    if let Some(allowed) = &group.sha256 {
        if &version.hash != allowed {
            anyhow::bail!(
                "group {}: handler {} has sha256 {}, but the config allows only {}; refusing to load it",
                group.name,
                version.source.display(),
                version.hash,
                allowed
            );
        }
    }
    Ok(version)
}

fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T> {
    match fs::read_to_string(path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&temp, serde_json::to_vec_pretty(value)?)
        .and_then(|()| fs::rename(&temp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(name: &str) -> RunDir {
        let root = std::env::temp_dir().join(format!("host-pins-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        RunDir { root }
    }

    #[test]
    fn pins_round_trip_and_unpin() {
        let dir = run_dir("pins");
        assert!(load_pins(&dir).unwrap().is_empty());
        set_pin(&dir, "web", Some("abc")).unwrap();
        assert_eq!(load_pins(&dir).unwrap()["web"], "abc");
        set_pin(&dir, "web", None).unwrap();
        assert!(load_pins(&dir).unwrap().is_empty());
        fs::remove_dir_all(&dir.root).unwrap();
    }

    #[test]
    fn previous_skips_repeats_and_follows_the_current_position() {
        let dir = run_dir("history");
        for hash in ["a", "b", "b", "c"] {
            record(&dir, "web", hash).unwrap();
        }
        let history = load_history(&dir).unwrap();
        assert_eq!(history["web"], ["a", "b", "c"]);
        assert_eq!(previous(&history, "web", "c").as_deref(), Some("b"));
        assert_eq!(previous(&history, "web", "b").as_deref(), Some("a"));
        assert_eq!(previous(&history, "web", "a"), None);
        assert_eq!(previous(&history, "other", "a"), None);
        fs::remove_dir_all(&dir.root).unwrap();
    }
}
