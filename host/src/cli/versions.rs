//! Version commands for operators: deploy a build into the store, list the
//! versions, pin one per group, roll back, collect garbage.
//!
//! These work on the run directory's files (store, pins, history) so they
//! work whether or not a master runs; when one does, `versions` and `gc` ask
//! it which versions its workers run.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use super::try_status;
use crate::config::{Config, GroupConfig, RunDir};
use crate::trust::Owners;
use crate::versions::pins;
use crate::versions::store::{short, HandlerStore, VersionInfo};

/// The store, unless the run directory does not exist yet: commands that
/// only read or remove do not create one as a side effect.
fn existing_store(config: &Config) -> Result<Option<HandlerStore>> {
    if RunDir::of(config).store().exists() {
        store(config).map(Some)
    } else {
        Ok(None)
    }
}

fn store(config: &Config) -> Result<HandlerStore> {
    let run_dir = RunDir::of(config);
    let owners = Owners::for_user(config.user.as_deref());
    run_dir.prepare(owners)?;
    HandlerStore::open(&run_dir.store(), owners)
}

/// The group a version command is about: the named one, or the only one.
pub fn group<'a>(config: &'a Config, name: Option<&str>) -> Result<&'a GroupConfig> {
    match name {
        Some(name) => config
            .groups
            .iter()
            .find(|g| g.name == name)
            .with_context(|| {
                format!(
                    "no group named {name:?} in the config; its groups are: {}",
                    config
                        .groups
                        .iter()
                        .map(|g| g.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        None => match config.groups.as_slice() {
            [only] => Ok(only),
            groups => bail!(
                "the config has {} groups ({}): say which with --group",
                groups.len(),
                groups
                    .iter()
                    .map(|g| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// `host deploy`: store a build after checking, in a separate process,
/// that it loads as a handler of this host.
pub fn deploy(
    config: &Config,
    file: &Path,
    label: Option<&str>,
    allow_writable: bool,
) -> Result<ExitCode> {
    let store = store(config)?;
    let known: BTreeSet<String> = store.list()?.into_iter().map(|v| v.hash).collect();
    let version = store.import(file, label, allow_writable)?;
    let output = std::process::Command::new("/proc/self/exe")
        .arg("inspect")
        .arg(&version.path)
        .arg(file)
        .env("LD_BIND_NOW", "1")
        .output()
        .context("cannot check the handler")?;
    if !output.status.success() {
        if !known.contains(&version.hash) {
            let _lock = store.lock()?;
            store.remove(&version.hash)?;
        }
        let reason = String::from_utf8_lossy(&output.stderr);
        let reason = reason.trim();
        bail!(
            "not deployed: {}",
            if reason.is_empty() {
                "the handler crashed while loading"
            } else {
                reason
            }
        );
    }
    let handler = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    store.record_handler(&version.hash, &handler)?;
    println!(
        "deployed {} ({handler}{})",
        version.short(),
        label.map(|l| format!(", label {l}")).unwrap_or_default()
    );
    println!("sha256 {}", version.hash);
    Ok(ExitCode::SUCCESS)
}

/// One row of `host versions`.
#[derive(Debug, Serialize)]
struct VersionRow {
    #[serde(flatten)]
    info: VersionInfo,
    /// Workers running it now, as `group/slot`.
    running: Vec<String>,
    /// Groups pinned to it.
    pinned: Vec<String>,
}

/// `host versions`.
pub fn list(config: &Config, json: bool) -> Result<ExitCode> {
    let run_dir = RunDir::of(config);
    let pins = pins::load_pins(&run_dir)?;
    let status = try_status(config)?;
    let stored = match existing_store(config)? {
        Some(store) => store.list()?,
        None => Vec::new(),
    };
    let rows: Vec<VersionRow> = stored
        .into_iter()
        .map(|info| {
            let running = status
                .iter()
                .flat_map(|s| &s.workers)
                .filter(|w| info.hash.starts_with(&w.version))
                .map(|w| format!("{}/{}", w.group, w.slot))
                .collect();
            let pinned = pins
                .iter()
                .filter(|(_, hash)| **hash == info.hash)
                .map(|(group, _)| group.clone())
                .collect();
            VersionRow {
                info,
                running,
                pinned,
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12} {:<14} {:<20} {:>8} {:<24} {:<16} PINNED",
        "VERSION", "LABEL", "ADDED", "SIZE", "HANDLER", "RUNNING"
    );
    for row in &rows {
        println!(
            "{:<12} {:<14} {:<20} {:>8} {:<24} {:<16} {}",
            short(&row.info.hash),
            row.info.label.as_deref().unwrap_or("-"),
            added(row.info.added),
            super::render::mib(row.info.size),
            row.info.handler.as_deref().unwrap_or("-"),
            if row.running.is_empty() {
                "-".to_owned()
            } else {
                row.running.join(",")
            },
            if row.pinned.is_empty() {
                "-".to_owned()
            } else {
                row.pinned.join(",")
            },
        );
    }
    if status.is_none() {
        println!("(host is not running)");
    }
    Ok(ExitCode::SUCCESS)
}

fn added(secs: u64) -> String {
    let ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(secs);
    format!("{} ago", super::render::duration(ago as f64))
}

/// `host pin`: returns the group and the full hash pinned.
pub fn pin(config: &Config, version: &str, group_name: Option<&str>) -> Result<(String, String)> {
    let group = group(config, group_name)?;
    let hash = store(config)?.resolve(version)?;
    if let Some(allowed) = &group.sha256 {
        if *allowed != hash {
            bail!(
                "group {} may only run sha256 {allowed} (config), not {hash}",
                group.name
            );
        }
    }
    pins::set_pin(&RunDir::of(config), &group.name, Some(&hash))?;
    Ok((group.name.clone(), hash))
}

/// `host unpin`.
pub fn unpin(config: &Config, group_name: Option<&str>) -> Result<ExitCode> {
    let group = group(config, group_name)?;
    pins::set_pin(&RunDir::of(config), &group.name, None)?;
    println!(
        "group {} follows {} again from its next reload",
        group.name,
        group.handler.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `host rollback`: pins the version the group ran before its current one;
/// returns the group name for the reload that follows.
pub fn rollback(config: &Config, group_name: Option<&str>) -> Result<String> {
    let group = group(config, group_name)?;
    let run_dir = RunDir::of(config);
    let history = pins::load_history(&run_dir)?;
    let current = history
        .get(&group.name)
        .and_then(|runs| runs.last())
        .with_context(|| format!("group {} has no version history yet", group.name))?;
    let previous = pins::previous(&history, &group.name, current).with_context(|| {
        format!(
            "group {} has run no other version than {}",
            group.name,
            short(current)
        )
    })?;
    store(config)?
        .get(&previous)
        .context("the previous version was removed from the store")?;
    pins::set_pin(&run_dir, &group.name, Some(&previous))?;
    println!(
        "group {}: rolling back from {} to {} (pinned; `host unpin` to follow the file again)",
        group.name,
        short(current),
        short(&previous)
    );
    Ok(group.name.clone())
}

/// `host gc`: removes versions nothing needs. Kept: pinned ones; those a
/// running master's workers run or its groups want (a slot starting or in
/// crash backoff has no worker to show); each group's current version and
/// its rollback target from the history; labelled ones unless `labelled`;
/// and the `keep` most recently added.
pub fn gc(config: &Config, keep: usize, labelled: bool) -> Result<ExitCode> {
    let run_dir = RunDir::of(config);
    let Some(store) = existing_store(config)? else {
        println!(
            "0 version(s) removed, 0 kept (no store in {})",
            run_dir.root.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let mut in_use = Vec::new();
    if let Some(status) = try_status(config)? {
        in_use.extend(status.workers.iter().map(|w| w.version.clone()));
        for group in &status.groups {
            in_use.push(group.version.clone());
            in_use.extend(group.slot_versions.iter().cloned());
        }
    }
    let (removed, kept) = crate::versions::gc::collect(&store, &run_dir, &in_use, keep, labelled)?;
    for version in &removed {
        println!(
            "removed {}{}",
            short(&version.hash),
            version
                .label
                .as_ref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default()
        );
    }
    println!("{} version(s) removed, {kept} kept", removed.len());
    Ok(ExitCode::SUCCESS)
}
