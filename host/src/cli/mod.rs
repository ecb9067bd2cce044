//! The commands people type: `host start`, `stop`, `restart`, `status`,
//! `reload` here, and the version commands (`deploy`, `versions`, `pin`,
//! `unpin`, `rollback`, `gc`) in `versions.rs`. Commands that need the
//! running master talk to it over its control socket and print what it
//! answers.

mod versions;

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, RunDir};
use crate::protocol::control::{
    ControlReply, ControlRequest, ReloadOutcome, ReloadStep, StatusReport,
};

/// Serves HTTP from a pool of worker processes running a handler library,
/// and replaces the library under them without dropping a request.
#[derive(Debug, Parser)]
#[command(name = "host", version, propagate_version = true)]
pub struct Cli {
    /// Log lines as text or as JSON objects
    #[arg(
        long,
        global = true,
        value_enum,
        env = "HOST_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Which config to use; shared by every command.
#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// Config file [default: ./host.toml if present, else the built-in
    /// config: the workspace's sample handler on 127.0.0.1:8080]
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the master and its workers (in the foreground unless -d)
    Start {
        #[command(flatten)]
        config: ConfigArg,
        /// Run in the background: returns once every worker is ready (exit
        /// 0) or the start failed (exit 1, with the reason); logs go to
        /// <run_dir>/host.log (reopened on SIGUSR2, for log rotation)
        #[arg(short, long)]
        daemon: bool,
        /// Reload a group whenever its handler file is rebuilt (same as
        /// `watch = true` in the config)
        #[arg(short, long)]
        watch: bool,
    },
    /// Stop the master and its workers, draining them gracefully
    Stop {
        #[command(flatten)]
        config: ConfigArg,
        /// Do not drain: close every connection at once
        #[arg(long)]
        now: bool,
    },
    /// Stop the running master (if any), then start in the background
    /// (the config is checked first: a broken one leaves the host running)
    Restart {
        #[command(flatten)]
        config: ConfigArg,
        /// Reload a group whenever its handler file is rebuilt (same as
        /// `watch = true` in the config)
        #[arg(short, long)]
        watch: bool,
    },
    /// Show groups and workers: pid, state, version, requests, memory
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON for scripts
        #[arg(long)]
        json: bool,
    },
    /// List every worker's open connections: peer, state, requests, age
    Connections {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON for scripts
        #[arg(long)]
        json: bool,
    },
    /// Replace workers one at a time with ones running the handler file as
    /// it is now; waits for the outcome (exit 0 only if it worked)
    Reload {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this group
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// Pin this version (label or hash prefix) first, then reload to it
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
    },
    /// Add a handler build to the store (checking that it loads) and print
    /// its version; works with or without a running master
    Deploy {
        #[command(flatten)]
        config: ConfigArg,
        /// The handler library (.so)
        file: PathBuf,
        /// A name to refer to this version by (pin, reload --to)
        #[arg(long)]
        label: Option<String>,
        /// Accept a file that other users can write to
        #[arg(long)]
        allow_writable: bool,
    },
    /// List the versions in the store: which run now, which is pinned
    Versions {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON for scripts
        #[arg(long)]
        json: bool,
    },
    /// Make a group run this version (label or hash prefix) from its next
    /// reload or start on, whatever its handler file holds
    Pin {
        #[command(flatten)]
        config: ConfigArg,
        /// Label or unique hash prefix (see `host versions`)
        #[arg(value_name = "VERSION")]
        spec: String,
        /// The group [default: the only group]
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
    },
    /// Let a group follow its handler file again
    Unpin {
        #[command(flatten)]
        config: ConfigArg,
        /// The group [default: the only group]
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
    },
    /// Pin the version that ran before the current one, and reload to it
    Rollback {
        #[command(flatten)]
        config: ConfigArg,
        /// The group [default: the only group]
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
    },
    /// Remove versions that are neither pinned, running, wanted by a group
    /// (starting or in crash backoff), a rollback target, labelled, nor recent
    Gc {
        #[command(flatten)]
        config: ConfigArg,
        /// How many of the most recently added versions to keep
        #[arg(long, default_value_t = 5)]
        keep: usize,
        /// Remove labelled versions too (never pinned, running or rollback targets)
        #[arg(long)]
        labelled: bool,
    },
    /// Internal: a worker process, started by the master
    #[command(hide = true)]
    Worker,
    /// Internal: load a handler library and print how it describes itself
    #[command(hide = true)]
    Inspect {
        /// The handler library (a store copy)
        file: PathBuf,
        /// The file it was copied from, for messages
        source: PathBuf,
    },
}

/// Runs a parsed command (all but `worker`).
pub fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Start {
            config,
            daemon,
            watch,
        } => start(&config, daemon, watch),
        Command::Stop { config, now } => stop(&load_to_reach(&config)?, now),
        Command::Restart { config, watch } => {
            let loaded = load(&config).context("restart refused; the running host is untouched")?;
            match stop(&loaded, false) {
                Ok(_) => {}
                Err(e) if e.downcast_ref::<NotRunning>().is_some() => {}
                Err(e) => return Err(e),
            }
            start(&config, true, watch)
        }
        Command::Status { config, json } => status(&load_to_reach(&config)?, json),
        Command::Connections { config, json } => connections(&load_to_reach(&config)?, json),
        Command::Reload { config, group, to } => {
            let config = load(&config).context("reload refused; the running host is untouched")?;
            if let Some(name) = &group {
                versions::group(&config, Some(name)).context("reload refused")?;
            }
            if let Some(to) = to {
                versions::pin(&config, &to, group.as_deref())?;
            }
            reload(&config, group)
        }
        Command::Deploy {
            config,
            file,
            label,
            allow_writable,
        } => versions::deploy(&load(&config)?, &file, label.as_deref(), allow_writable),
        Command::Versions { config, json } => versions::list(&load(&config)?, json),
        Command::Pin {
            config,
            spec,
            group,
        } => {
            let config = load(&config)?;
            let (group, hash) = versions::pin(&config, &spec, group.as_deref())?;
            println!(
                "pinned group {group} to {}; `host reload` switches to it (a stopped host starts with it)",
                crate::versions::store::short(&hash)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Unpin { config, group } => versions::unpin(&load(&config)?, group.as_deref()),
        Command::Rollback { config, group } => {
            let config = load(&config)?;
            let group = versions::rollback(&config, group.as_deref())?;
            match reload(&config, Some(group)) {
                Err(e) if e.downcast_ref::<NotRunning>().is_some() => {
                    println!("host is not running: it will start with the rolled-back version");
                    Ok(ExitCode::SUCCESS)
                }
                other => other,
            }
        }
        Command::Gc {
            config,
            keep,
            labelled,
        } => versions::gc(&load(&config)?, keep, labelled),
        Command::Worker | Command::Inspect { .. } => unreachable!("handled in main"),
    }
}

fn load(arg: &ConfigArg) -> Result<Config> {
    Config::load(arg.config.as_deref())
}

/// The config, or, when it no longer parses, just enough of it to reach the
/// running master (`stop`, `status` and `connections` must never be locked
/// out by a broken edit).
fn load_to_reach(arg: &ConfigArg) -> Result<Config> {
    match Config::load(arg.config.as_deref()) {
        Ok(config) => Ok(config),
        Err(error) => {
            let run_dir =
                Config::locate_run_dir(arg.config.as_deref()).context(format!("{error:#}"))?;
            eprintln!(
                "host: {error:#}\nhost: reaching the host through its run directory {} anyway",
                run_dir.display()
            );
            Ok(Config::reach_only(run_dir))
        }
    }
}

fn start(arg: &ConfigArg, daemon: bool, watch: bool) -> Result<ExitCode> {
    let mut config = load(arg)?;
    config.watch |= watch;
    if config.builtin {
        let handler = &config.groups[0].handler;
        if !handler.exists() {
            bail!(
                "no handler at {}: with no host.toml, host serves the sample handler built next to it; build it with `cargo build --release` (or pass -c FILE)",
                handler.display()
            );
        }
    }
    if daemon {
        return start_daemon(arg, &config);
    }
    let ready = std::env::var("HOST_READY_FD")
        .ok()
        .and_then(|fd| fd.parse::<i32>().ok())
        // SAFETY: set by `start_daemon` for the fd it mapped into this process.
        .map(|fd| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    crate::master::run(config, ready)?;
    Ok(ExitCode::SUCCESS)
}

/// Starts a master in its own session and waits for its start outcome.
fn start_daemon(arg: &ConfigArg, config: &Config) -> Result<ExitCode> {
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

/// The master is not running.
#[derive(Debug)]
pub struct NotRunning(PathBuf);

impl std::fmt::Display for NotRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host is not running (no master answers on {})",
            self.0.display()
        )
    }
}

impl std::error::Error for NotRunning {}

/// One request to the master; replies come from the returned iterator.
fn ask(
    config: &Config,
    request: &ControlRequest,
) -> Result<impl Iterator<Item = Result<ControlReply>>> {
    let path = RunDir::of(config).control_socket();
    let mut stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let owner = std::fs::metadata(&path).map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.uid()
            });
            bail!(
                "permission denied on the control socket {}: host runs as uid {}; run this command as that user or as root",
                path.display(),
                owner.map_or_else(|_| "?".to_owned(), |uid| uid.to_string())
            )
        }
        Err(_) => return Err(NotRunning(path.clone()).into()),
    };
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .context("cannot send to the master")?;
    Ok(BufReader::new(stream).lines().map(|line| {
        let line = line.context("lost the connection to the master")?;
        serde_json::from_str(&line).with_context(|| format!("bad reply from the master: {line}"))
    }))
}

/// A reply, or the master's refusal as an error.
fn unless_error(reply: ControlReply) -> Result<ControlReply> {
    match reply {
        ControlReply::Error { message } => bail!("{message}"),
        reply => Ok(reply),
    }
}

fn stop(config: &Config, now: bool) -> Result<ExitCode> {
    for reply in ask(config, &ControlRequest::Stop { now })? {
        match reply? {
            ControlReply::Accepted { message } => eprintln!("host: {message}"),
            ControlReply::Error { message } => bail!("{message}"),
            _ => {}
        }
    }
    wait_master_gone(&RunDir::of(config))?;
    println!("host stopped");
    Ok(ExitCode::SUCCESS)
}

/// Waits until the master has exited, not just closed its control socket:
/// it holds the run directory's lock until its very end, so a `start`
/// right after (as in `restart`) finds the directory free.
fn wait_master_gone(run_dir: &RunDir) -> Result<()> {
    let path = run_dir.lock_file();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let Ok(file) = std::fs::File::open(&path) else {
            return Ok(());
        };
        if nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the master closed its control socket but still holds {} after 30 s",
                path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The running master's status, or `None` when no master runs.
pub fn try_status(config: &Config) -> Result<Option<StatusReport>> {
    let replies = match ask(config, &ControlRequest::Status) {
        Ok(replies) => replies,
        Err(e) if e.downcast_ref::<NotRunning>().is_some() => return Ok(None),
        Err(e) => return Err(e),
    };
    for reply in replies {
        if let ControlReply::Status(report) = unless_error(reply?)? {
            return Ok(Some(report));
        }
    }
    bail!("the master sent no status")
}

fn status(config: &Config, json: bool) -> Result<ExitCode> {
    for reply in ask(config, &ControlRequest::Status)? {
        if let ControlReply::Status(report) = unless_error(reply?)? {
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_status(&report);
            }
            return Ok(ExitCode::SUCCESS);
        }
    }
    bail!("the master sent no status")
}

fn connections(config: &Config, json: bool) -> Result<ExitCode> {
    for reply in ask(config, &ControlRequest::Connections)? {
        if let ControlReply::Connections { workers } = unless_error(reply?)? {
            if json {
                println!("{}", serde_json::to_string_pretty(&workers)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<12} {:>4} {:>8} {:<22} {:<8} {:>9} {:>8}",
                "GROUP", "SLOT", "PID", "PEER", "STATE", "REQUESTS", "AGE"
            );
            for worker in &workers {
                let Some(list) = &worker.connections else {
                    println!(
                        "{:<12} {:>4} {:>8} (busy: did not answer in time)",
                        worker.group, worker.slot, worker.pid
                    );
                    continue;
                };
                for c in list {
                    println!(
                        "{:<12} {:>4} {:>8} {:<22} {:<8} {:>9} {:>8}",
                        worker.group,
                        worker.slot,
                        worker.pid,
                        c.peer,
                        c.state,
                        c.requests,
                        duration(c.age_secs)
                    );
                }
            }
            let total: usize = workers
                .iter()
                .filter_map(|w| w.connections.as_ref())
                .map(Vec::len)
                .sum();
            println!("{total} connection(s) on {} worker(s)", workers.len());
            return Ok(ExitCode::SUCCESS);
        }
    }
    bail!("the master sent no connection list")
}

fn print_status(report: &StatusReport) {
    println!(
        "master pid {}  up {}  worker restarts {}  rss {}{}",
        report.pid,
        duration(report.uptime_secs),
        report.restarts,
        mib(report.rss_bytes),
        if report.reloading {
            "  (reload running)"
        } else {
            ""
        }
    );
    for group in &report.groups {
        println!(
            "group {}  {}  {}/{} ready  version {}  {}{}",
            group.name,
            group.listen,
            group.ready,
            group.count,
            group.version,
            group.handler,
            if group.reloadable {
                ""
            } else {
                "  (not reloadable)"
            }
        );
    }
    println!(
        "{:<12} {:>4} {:>8} {:<9} {:<12} {:<10} {:>8} {:>10} {:>8} {:>6} {:>9}",
        "GROUP",
        "SLOT",
        "PID",
        "STATE",
        "VERSION",
        "HANDLER",
        "UPTIME",
        "REQUESTS",
        "INFLIGHT",
        "CONNS",
        "RSS"
    );
    for w in &report.workers {
        println!(
            "{:<12} {:>4} {:>8} {:<9} {:<12} {:<10} {:>8} {:>10} {:>8} {:>6} {:>9}",
            w.group,
            w.slot,
            w.pid,
            format!("{:?}", w.state).to_lowercase(),
            w.version,
            w.handler_version.as_deref().unwrap_or("-"),
            duration(w.uptime_secs),
            w.requests,
            w.in_flight,
            w.connections,
            mib(w.rss_bytes)
        );
    }
}

fn reload(config: &Config, group: Option<String>) -> Result<ExitCode> {
    for reply in ask(config, &ControlRequest::Reload { group })? {
        match reply? {
            ControlReply::Accepted { message } => eprintln!("host: {message}"),
            ControlReply::Progress(step) => println!("{}", describe_step(&step)),
            ControlReply::Reloaded(outcome) => return Ok(print_outcome(&outcome)),
            ControlReply::Error { message } => bail!("reload refused: {message}"),
            ControlReply::Status(_) | ControlReply::Connections { .. } => {}
        }
    }
    bail!("the master closed the connection before the reload ended")
}

fn describe_step(step: &ReloadStep) -> String {
    let old = match (step.old_pid, &step.old_version) {
        (Some(pid), Some(version)) => format!("pid {pid} ({version})"),
        _ => "(empty slot)".to_owned(),
    };
    format!(
        "{}{}/{}: {old} -> pid {} ({}) ready in {} ms",
        if step.rollback { "rollback " } else { "" },
        step.group,
        step.slot,
        step.new_pid,
        step.new_version,
        step.start_ms
    )
}

fn print_outcome(outcome: &ReloadOutcome) -> ExitCode {
    for killed in &outcome.killed {
        println!(
            "killed {}/{} pid {} at its stop timeout with {} connection(s) open and {} request(s) in flight",
            killed.group, killed.slot, killed.pid, killed.connections, killed.in_flight
        );
    }
    for name in &outcome.notified {
        println!("group {name} is not reloadable: its workers were notified");
    }
    let changes = outcome
        .groups
        .iter()
        .map(|g| format!("{} {} -> {}", g.group, g.from, g.to))
        .collect::<Vec<_>>()
        .join(", ");
    match &outcome.error {
        None => {
            println!(
                "reload ok: {changes}; new workers ready in {} ms, old workers gone in {} ms",
                outcome.ready_ms, outcome.done_ms
            );
            ExitCode::SUCCESS
        }
        Some(error) => {
            eprintln!("host: reload failed: {error}");
            if !changes.is_empty() {
                eprintln!("host: still serving {changes}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A duration in the largest unit that keeps it short.
pub fn duration(secs: f64) -> String {
    let secs = secs as u64;
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
