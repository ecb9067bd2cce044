//! Log output: human-readable or JSON lines, and reopening the log file of a
//! daemonized host for rotation (SIGUSR2, like `logrotate`'s postrotate).

use std::path::Path;

use anyhow::{Context as _, Result};
use tracing_subscriber::EnvFilter;

/// Set by `host start -d` for the master it starts: the log file to reopen.
pub const LOG_FILE_ENV: &str = "HOST_LOG_FILE";

/// Set for every process: `text` or `json`.
pub const LOG_FORMAT_ENV: &str = "HOST_LOG_FORMAT";

/// Installs the process's logger. `HOST_LOG` filters (`debug`,
/// `host=info,handler=debug`); `json` writes one JSON object per line.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_env("HOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// Points stdout and stderr at a freshly opened `path` (the old file may
/// have been renamed by a log rotation).
pub fn reopen(path: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot reopen log file {}", path.display()))?;
    nix::unistd::dup2_stdout(&file).context("dup2 stdout")?;
    nix::unistd::dup2_stderr(&file).context("dup2 stderr")?;
    Ok(())
}
