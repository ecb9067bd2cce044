//! `host start -d`: the master in its own session, its output in the log
//! file, and the start outcome read back through a pipe so the command
//! exits 0 only once every worker is ready.

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};

use super::ConfigArg;
use crate::config::{Config, RunDir};

/// Starts a master in its own session and waits for its start outcome.
pub fn start_daemon(arg: &ConfigArg, config: &Config) -> Result<ExitCode> {
    use command_fds::{CommandFdExt, FdMapping};
    use std::os::unix::process::CommandExt;

    let run_dir = RunDir::of(config);
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&run_dir.root)
        .with_context(|| format!("cannot create run directory {}", run_dir.root.display()))?;
    let log_path = run_dir.log_file();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open log file {}", log_path.display()))?;
    let (mut ready_reader, ready_writer) = std::io::pipe().context("cannot create a pipe")?;
    let mut command = std::process::Command::new("/proc/self/exe");
    command.arg0("host: master").arg("start");
    if let Some(path) = &arg.config {
        command.arg("--config").arg(std::path::absolute(path)?);
    }
    if config.watch {
        command.arg("--watch");
    }
    command
        .env("HOST_READY_FD", "3")
        .env(crate::logfile::LOG_FILE_ENV, &log_path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .fd_mappings(vec![FdMapping {
            parent_fd: ready_writer.into(),
            child_fd: 3,
        }])
        .context("fd mapping")?;
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into));
    }
    let child = command.spawn().context("cannot start the master")?;
    drop(command);
    let mut outcome = String::new();
    ready_reader
        .read_to_string(&mut outcome)
        .context("cannot read the master's start outcome")?;
    match outcome.trim_end().split_once(' ') {
        Some(("ok", summary)) => {
            println!("host started (pid {}): {summary}", child.id());
            Ok(ExitCode::SUCCESS)
        }
        Some(("error", error)) => bail!("{error}"),
        _ => bail!("the master exited during start; see {}", log_path.display()),
    }
}
