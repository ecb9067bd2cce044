//! The commands people type: `host start`, `stop`, `restart`, `status`,
//! `connections`, `reload` here, and the version commands (`deploy`,
//! `versions`, `pin`, `unpin`, `rollback`, `gc`) in `versions.rs`.
//! Commands that need the running master ask it through `client.rs` and
//! show its answers through `render.rs` (or as JSON); `daemon.rs` starts
//! a master in the background.

mod client;
mod daemon;
mod render;
mod versions;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, RunDir};
use crate::protocol::control::StatusReport;
use client::{ConnectError, ControlClient, ReloadNews};

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
        /// Print the progress and outcome as JSON for scripts
        #[arg(long)]
        json: bool,
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
            match client::connect(&loaded) {
                Ok(master) => stop_master(&loaded, master, false)?,
                Err(ConnectError::NotRunning(_)) => {}
                Err(e) => return Err(e.into()),
            }
            start(&config, true, watch)
        }
        Command::Status { config, json } => status(&load_to_reach(&config)?, json),
        Command::Connections { config, json } => connections(&load_to_reach(&config)?, json),
        Command::Reload {
            config,
            group,
            to,
            json,
        } => {
            let config = load(&config).context("reload refused; the running host is untouched")?;
            if let Some(name) = &group {
                versions::group(&config, Some(name)).context("reload refused")?;
            }
            if let Some(to) = to {
                versions::pin(&config, &to, group.as_deref())?;
            }
            reload(client::connect(&config)?, group, json)
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
            match client::connect(&config) {
                Ok(master) => reload(master, Some(group), false),
                Err(ConnectError::NotRunning(_)) => {
                    println!("host is not running: it will start with the rolled-back version");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
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
        return daemon::start_daemon(arg, &config);
    }
    let ready = std::env::var("HOST_READY_FD")
        .ok()
        .and_then(|fd| fd.parse::<i32>().ok())
        // SAFETY: set by `start_daemon` for the fd it mapped into this process.
        .map(|fd| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    crate::master::run(config, ready)?;
    Ok(ExitCode::SUCCESS)
}

fn stop(config: &Config, now: bool) -> Result<ExitCode> {
    stop_master(config, client::connect(config)?, now)?;
    Ok(ExitCode::SUCCESS)
}

/// Stops the running master of `config` and waits until it has exited.
fn stop_master(config: &Config, master: ControlClient, now: bool) -> Result<()> {
    master.stop(now, |message| eprintln!("host: {message}"))?;
    wait_master_gone(&RunDir::of(config))?;
    println!("host stopped");
    Ok(())
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
    match client::connect(config) {
        Ok(master) => Ok(Some(master.status()?)),
        Err(ConnectError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn status(config: &Config, json: bool) -> Result<ExitCode> {
    let report = client::connect(config)?.status()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        render::print_status(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn connections(config: &Config, json: bool) -> Result<ExitCode> {
    let workers = client::connect(config)?.connections()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&workers)?);
    } else {
        render::print_connections(&workers);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reloads and shows it; exits 0 only if the reload worked.
fn reload(master: ControlClient, group: Option<String>, json: bool) -> Result<ExitCode> {
    let mut steps = Vec::new();
    let mut waits = Vec::new();
    let outcome = master.reload(group, |news| match news {
        ReloadNews::Queued(message) => eprintln!("host: {message}"),
        ReloadNews::Step(step) if json => steps.push(step),
        ReloadNews::Step(step) => println!("{}", render::describe_step(&step)),
        ReloadNews::Waiting(waiting) if json => waits.push(waiting),
        ReloadNews::Waiting(waiting) => println!("{}", render::describe_wait(&waiting)),
    })?;
    if !json {
        return Ok(render::print_outcome(&outcome));
    }
    let code = if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    let report = render::ReloadReport {
        steps,
        waits,
        outcome,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(code)
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
