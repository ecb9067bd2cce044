//! Watch mode: reload a group when its handler file is rebuilt.
//!
//! The directory is watched, not the file: cargo replaces the file (a new
//! inode, seen as Remove + Create), which would end a watch on the file
//! itself. Access events are ignored (hashing the file makes them, which
//! would loop). Events are debounced per group: a burst of rebuilds becomes
//! one change, reported once the file has been quiet for `QUIET`. The master
//! then skips the change if the bytes are those it already runs, and the
//! store refuses a file that is not a complete library yet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Event;

/// How long a handler file must stay unchanged before it is reloaded.
const QUIET: Duration = Duration::from_millis(100);

/// A running watch; dropping it stops watching.
pub struct HandlerWatch {
    _watcher: notify::RecommendedWatcher,
}

impl HandlerWatch {
    /// Watches each `(group, handler file)` and sends `HandlerChanged`.
    pub fn start(
        files: Vec<(usize, PathBuf)>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<HandlerWatch> {
        let mut targets = Vec::new();
        for (group, file) in files {
            let dir = file.parent().context("handler path has no directory")?;
            let dir = std::fs::canonicalize(dir)
                .with_context(|| format!("cannot watch {}", dir.display()))?;
            let name = file
                .file_name()
                .context("handler path has no file name")?
                .to_owned();
            targets.push((group, dir.join(name), dir));
        }
        let (changed_tx, changed_rx) = mpsc::unbounded_channel();
        let watched = targets.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if matches!(event.kind, EventKind::Access(_)) {
                    return;
                }
                for (group, file, _) in &watched {
                    if event.paths.iter().any(|p| p == file) {
                        let _ = changed_tx.send(*group);
                    }
                }
            })
            .context("cannot start watching handler files")?;
        for (_, _, dir) in &targets {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", dir.display()))?;
        }
        for (group, file, _) in &targets {
            tracing::info!(group, file = %file.display(), "watching handler file");
        }
        tokio::spawn(debounce(changed_rx, events));
        Ok(HandlerWatch { _watcher: watcher })
    }
}

/// Forwards a group once its file has been quiet for `QUIET`.
async fn debounce(
    mut changed: mpsc::UnboundedReceiver<usize>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut due: BTreeMap<usize, Instant> = BTreeMap::new();
    loop {
        let next = due.values().min().copied();
        tokio::select! {
            // Events already waiting count before a timer that is due: a
            // busy master must not end a burst's quiet period early.
            biased;
            group = changed.recv() => match group {
                Some(group) => {
                    due.insert(group, Instant::now() + QUIET);
                }
                None => break,
            },
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = Instant::now();
                let quiet: Vec<usize> = due.iter().filter(|(_, at)| **at <= now).map(|(g, _)| *g).collect();
                for group in quiet {
                    due.remove(&group);
                    if events.send(Event::HandlerChanged(group)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}
