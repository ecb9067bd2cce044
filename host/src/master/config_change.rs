//! What a reload changes of the config: the file as it is now against the
//! config the master runs.
//!
//! Groups are matched by name: a name only in the new file is a group to
//! add, a name only in the running config a group to remove (so a renamed
//! group is both). A kept group is compared as a whole, key by key of its
//! serialized form, so a field added to `GroupConfig` later is compared
//! (and reported) without being listed here. What only a restart applies
//! (`run_dir`, `user`, `admin`, turning `watch` on, edits to a group that
//! is not reloadable) is collected apart: a reload refuses it.

use toml::Value;

use crate::config::{Config, GroupConfig};

/// The difference between two configs; see the module docs.
#[derive(Debug)]
pub struct ConfigChange {
    /// Edits that need a restart, as sentences.
    pub needs_restart: Vec<String>,
    /// Each group of the new file, in its order, then each removed group.
    pub groups: Vec<GroupEdit>,
}

/// What happens to one group.
#[derive(Debug)]
pub enum GroupEdit {
    /// A group only in the new file.
    Added(GroupConfig),
    /// A group in both; `changed` lists its edits (empty when none).
    Kept {
        /// Its config in the new file.
        config: GroupConfig,
        /// One phrase per edited key: `count 2 -> 3`, `settings changed`.
        changed: Vec<String>,
    },
    /// A group only in the running config: its name.
    Removed(String),
}

impl GroupEdit {
    /// The group's name.
    pub fn name(&self) -> &str {
        match self {
            GroupEdit::Added(config) | GroupEdit::Kept { config, .. } => &config.name,
            GroupEdit::Removed(name) => name,
        }
    }

    /// What it says in a reload's report, or `None` for a group without
    /// edits.
    pub fn describe(&self) -> Option<String> {
        match self {
            GroupEdit::Added(config) => {
                Some(format!("new group {} on {}", config.name, config.listen))
            }
            GroupEdit::Kept { changed, .. } if changed.is_empty() => None,
            GroupEdit::Kept { config, changed } => {
                Some(format!("{}: {}", config.name, changed.join(", ")))
            }
            GroupEdit::Removed(name) => Some(format!("group {name} removed")),
        }
    }
}

/// Compares the running config with the new one.
pub fn compare(running: &Config, new: &Config) -> ConfigChange {
    let mut needs_restart = Vec::new();
    if running.run_dir != new.run_dir {
        needs_restart.push(format!(
            "run_dir {} -> {}",
            running.run_dir.display(),
            new.run_dir.display()
        ));
    }
    if running.user != new.user {
        needs_restart.push(format!(
            "user {} -> {}",
            running.user.as_deref().unwrap_or("(none)"),
            new.user.as_deref().unwrap_or("(none)")
        ));
    }
    if running.admin != new.admin {
        let show =
            |a: Option<std::net::SocketAddr>| a.map_or("(none)".to_owned(), |a| a.to_string());
        needs_restart.push(format!(
            "admin {} -> {}",
            show(running.admin),
            show(new.admin)
        ));
    }
    if new.watch && !running.watch {
        needs_restart.push("watch turned on".to_owned());
    }
    let mut groups = Vec::new();
    for config in &new.groups {
        let Some(old) = running.groups.iter().find(|g| g.name == config.name) else {
            groups.push(GroupEdit::Added(config.clone()));
            continue;
        };
        let changed = changed_keys(old, config);
        let reloadable = old.reloadable && config.reloadable;
        if !reloadable && !changed.is_empty() {
            needs_restart.push(format!(
                "group {} is not reloadable: {}",
                config.name,
                changed.join(", ")
            ));
        }
        groups.push(GroupEdit::Kept {
            config: config.clone(),
            changed,
        });
    }
    for old in &running.groups {
        if !new.groups.iter().any(|g| g.name == old.name) {
            groups.push(GroupEdit::Removed(old.name.clone()));
        }
    }
    ConfigChange {
        needs_restart,
        groups,
    }
}

/// One phrase per key whose value differs: `key old -> new` for a plain
/// value, `key changed` for a table or a list.
fn changed_keys(old: &GroupConfig, new: &GroupConfig) -> Vec<String> {
    if old == new {
        return Vec::new();
    }
    let (old, new) = (as_table(old), as_table(new));
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut changed = Vec::new();
    for key in keys {
        let (before, after) = (old.get(key), new.get(key));
        if before == after {
            continue;
        }
        changed.push(match (before.and_then(plain), after.and_then(plain)) {
            (Some(before), Some(after)) => format!("{key} {before} -> {after}"),
            _ => format!("{key} changed"),
        });
    }
    changed
}

fn as_table(config: &GroupConfig) -> toml::Table {
    match Value::try_from(config) {
        Ok(Value::Table(table)) => table,
        // A struct of plain fields always serializes to a table.
        _ => toml::Table::new(),
    }
}

/// A value short enough to show inline.
fn plain(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Table(_) | Value::Array(_) => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn config(text: &str) -> Config {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let file = std::env::temp_dir().join(format!(
            "host-config-change-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, text).unwrap();
        let config = Config::load(Some(Path::new(&file))).unwrap();
        std::fs::remove_file(&file).unwrap();
        config
    }

    const WEB: &str =
        "[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\ncount = 2\nhandler = \"h.so\"\n";

    fn lines(change: &ConfigChange) -> Vec<String> {
        change
            .groups
            .iter()
            .filter_map(GroupEdit::describe)
            .collect()
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let change = compare(&config(WEB), &config(WEB));
        assert!(change.needs_restart.is_empty());
        assert!(lines(&change).is_empty());
        assert!(
            matches!(&change.groups[..], [GroupEdit::Kept { changed, .. }] if changed.is_empty())
        );
    }

    #[test]
    fn count_listen_and_durations_show_both_values_settings_only_that_they_changed() {
        let new = config(
            "[[group]]\nname = \"web\"\nlisten = \"127.0.0.1:9000\"\ncount = 3\nhandler = \"h.so\"\nstart_timeout = \"2s\"\n[group.settings]\ngreeting = \"hi\"\n",
        );
        let change = compare(&config(WEB), &new);
        assert_eq!(
            lines(&change),
            ["web: count 2 -> 3, listen 127.0.0.1:0 -> 127.0.0.1:9000, settings changed, start_timeout 10s -> 2s"]
        );
    }

    #[test]
    fn groups_are_matched_by_name() {
        let new =
            config("[[group]]\nname = \"ws\"\nlisten = \"127.0.0.1:9000\"\nhandler = \"h.so\"\n");
        let change = compare(&config(WEB), &new);
        assert_eq!(
            lines(&change),
            ["new group ws on 127.0.0.1:9000", "group web removed"]
        );
        assert!(change.needs_restart.is_empty());
    }

    #[test]
    fn run_dir_user_admin_and_a_group_that_is_not_reloadable_need_a_restart() {
        let edited = WEB.replace("count = 2\n", "count = 3\nreloadable = false\n");
        let new = config(&format!(
            "run_dir = \"elsewhere\"\nuser = \"nobody\"\nadmin = \"127.0.0.1:9100\"\n{edited}"
        ));
        let change = compare(&config(WEB), &new);
        assert_eq!(change.needs_restart.len(), 4, "{:?}", change.needs_restart);
        assert!(change.needs_restart[0].starts_with("run_dir "));
        assert_eq!(change.needs_restart[1], "user (none) -> nobody");
        assert_eq!(change.needs_restart[2], "admin (none) -> 127.0.0.1:9100");
        assert_eq!(
            change.needs_restart[3],
            "group web is not reloadable: count 2 -> 3, reloadable true -> false"
        );
    }
}
