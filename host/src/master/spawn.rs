//! Starting a worker process: fork + exec of our own executable.
//!
//! `/proc/self/exe` keeps the running host build even if the binary on disk
//! is rebuilt. Fds are mapped with `command-fds`, which handles the
//! `dup2(fd, fd)` trap (a no-op that keeps `FD_CLOEXEC`). In the child,
//! before exec, we reset the signal mask (it survives exec), leave the
//! terminal's process group (a Ctrl-C is for the master, which then stops
//! its workers in order), and ask for SIGTERM when the master dies.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use anyhow::{Context as _, Result};
use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use crate::counters::SharedCounters;
use crate::protocol::worker::POOL_THREADS_ENV;

/// For profilers: a command, split on whitespace, that runs each worker
/// (`HOST_WORKER_WRAPPER="valgrind --tool=callgrind"`, see
/// `scripts/profile`). Read from the master's environment at each spawn.
pub const WORKER_WRAPPER_ENV: &str = "HOST_WORKER_WRAPPER";

/// A freshly spawned worker, before it reports anything.
pub struct Spawned {
    /// The process.
    pub child: tokio::process::Child,
    /// Its pid.
    pub pid: u32,
    /// The master's end of its channel.
    pub channel: tokio::net::UnixStream,
    /// Its counters.
    pub counters: SharedCounters,
}

/// Starts `host worker` for one slot, handing it the group's listener.
/// `pool_threads` sizes the worker's handler-call pool; it is passed in the
/// environment because the worker builds its runtime before it reads its spec.
pub fn spawn_worker(
    listener: &std::net::TcpListener,
    label: &str,
    pool_threads: usize,
) -> Result<Spawned> {
    let listener: OwnedFd = listener
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate the listener")?;
    let (ours, theirs) = UnixStream::pair().context("cannot create the worker channel")?;
    let (counters, counters_fd) = SharedCounters::create()?;
    let master_pid = nix::unistd::getpid();

    let mut command = match std::env::var(WORKER_WRAPPER_ENV) {
        Ok(wrapper) if !wrapper.trim().is_empty() => {
            let mut words = wrapper.split_whitespace();
            let mut command = tokio::process::Command::new(words.next().unwrap_or_default());
            // The wrapper's own /proc/self/exe would be the wrapper.
            command.args(words).arg(format!("/proc/{master_pid}/exe"));
            command
        }
        _ => {
            let mut command = tokio::process::Command::new("/proc/self/exe");
            command.arg0(format!("host: worker {label}"));
            command
        }
    };
    command
        .arg("worker")
        .env("LISTEN_FDS", "1")
        .env("LD_BIND_NOW", "1")
        .env(POOL_THREADS_ENV, pool_threads.to_string())
        // systemd talks to the master only.
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    command
        .fd_mappings(vec![
            FdMapping {
                parent_fd: listener,
                child_fd: 3,
            },
            FdMapping {
                parent_fd: theirs.into(),
                child_fd: 4,
            },
            FdMapping {
                parent_fd: counters_fd,
                child_fd: 5,
            },
        ])
        .context("worker fd mapping")?;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            // The master may have died between fork and prctl.
            if nix::unistd::getppid() != master_pid {
                nix::unistd::write(std::io::stderr(), b"host worker: master gone\n").ok();
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = command.spawn().context("cannot start a worker process")?;
    let pid = child.id().context("worker exited at once")?;
    ours.set_nonblocking(true)?;
    let channel = tokio::net::UnixStream::from_std(ours)?;
    Ok(Spawned {
        child,
        pid,
        channel,
        counters,
    })
}
