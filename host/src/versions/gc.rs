//! Which builds the store can drop: everything nothing needs.
//!
//! Needed, and so never collected: a pinned version; one in use (a worker
//! runs it, a group or one of its slots wants it — a slot starting or in
//! crash backoff has no worker to show it); each group's current version
//! and its rollback target from the history; a labelled one (unless the
//! caller asks for labelled ones too); and the `keep` most recently added.
//! `host gc` runs this on demand; the master runs it after every successful
//! reload with the config's `keep_versions`, so a watch loop's rebuilds do
//! not fill the disk.

use std::collections::BTreeSet;

use anyhow::Result;

use super::pins;
use super::store::{HandlerStore, VersionInfo};
use crate::config::RunDir;

/// Removes from `store` every version nothing needs; `in_use` holds hashes
/// or hash prefixes of versions a running master needs. Returns what was
/// removed and how many versions are left.
pub fn collect(
    store: &HandlerStore,
    run_dir: &RunDir,
    in_use: &[String],
    keep: usize,
    labelled: bool,
) -> Result<(Vec<VersionInfo>, usize)> {
    let _lock = store.lock()?;
    let versions = store.list()?;
    let mut wanted: Vec<String> = pins::load_pins(run_dir)?.into_values().collect();
    wanted.extend(in_use.iter().cloned());
    let history = pins::load_history(run_dir)?;
    for (group, runs) in &history {
        if let Some(current) = runs.last() {
            wanted.push(current.clone());
            wanted.extend(pins::previous(&history, group, current));
        }
    }
    let kept: BTreeSet<&str> = versions
        .iter()
        .filter(|v| {
            wanted.iter().any(|w| v.hash.starts_with(w.as_str()))
                || (v.label.is_some() && !labelled)
        })
        .chain(versions.iter().rev().take(keep))
        .map(|v| v.hash.as_str())
        .collect();
    let mut removed = Vec::new();
    for version in versions.iter().filter(|v| !kept.contains(v.hash.as_str())) {
        store.remove(&version.hash)?;
        removed.push(version.clone());
    }
    Ok((removed, kept.len()))
}
