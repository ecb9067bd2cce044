//! systemd integration: `Type=notify` messages and socket activation.
//!
//! With `NOTIFY_SOCKET` set, the master sends `READY=1` once every group has
//! its workers ready, `RELOADING=1` (with `MONOTONIC_USEC`) when a reload
//! begins and `READY=1` when it ends, and `STOPPING=1` on stop. With
//! `LISTEN_FDS` set (socket activation), the master adopts the listeners it
//! is given instead of binding: each is matched to a group by its
//! `FileDescriptorName` or, failing that, by its address.

use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context as _, Result};
use sd_notify::NotifyState;

/// A listener handed over by systemd.
pub struct ActivatedListener {
    /// Its `FileDescriptorName` (`unknown` when systemd gave none).
    pub name: String,
    /// The socket.
    pub listener: std::net::TcpListener,
}

/// Takes the listeners systemd passed, and clears the variables so that
/// workers do not mistake them for their own.
///
/// Must run before any other thread exists (it edits the environment).
pub fn take_listeners() -> Result<Vec<ActivatedListener>> {
    // SAFETY: called from the main thread before the runtime starts.
    let fds =
        unsafe { sd_notify::listen_fds_with_names_and_unset_env() }.context("bad LISTEN_FDS")?;
    let mut listeners = Vec::new();
    for (fd, name) in fds {
        // SAFETY: systemd passed this descriptor to this process.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let listener = std::net::TcpListener::from(fd);
        listener
            .local_addr()
            .with_context(|| format!("socket-activated fd named {name:?} is not a TCP listener"))?;
        listeners.push(ActivatedListener { name, listener });
    }
    Ok(listeners)
}

/// Tells systemd (if it is listening) about a state change.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Every group has its workers ready.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The master is stopping.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}
