//! A group: identical workers sharing one listening socket, bound once by
//! the master before any worker exists and kept for its whole life, so a
//! worker's exit never drops a queued connection.
//!
//! The socket is adopted from systemd socket activation when one matches
//! the group (by name, else by address); otherwise the master binds it.
//!
//! A reload that changes `listen` binds the new address first
//! ([`MovedListener`]); replacements accept from it, and once the reload ended
//! the group [`settle`](Group::settle)s on one of the two. A removed group
//! stays in the master's table, without listener or slots, so the indexes
//! of the other groups never change.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::{Context as _, Result};

use super::reload::Generation;
use super::slot::WorkerSlot;
use super::systemd::ActivatedListener;
use crate::config::GroupConfig;
use crate::protocol::control::FailedReload;
use crate::versions::store::Version;

/// A group of identical workers on one listener.
pub struct Group {
    /// Its settings.
    pub config: Arc<GroupConfig>,
    /// `None` once the group is removed.
    listener: Option<TcpListener>,
    /// The new address's listener while a reload moves the group.
    moving_to: Option<MovedListener>,
    /// The bound address (the real port when the config says 0).
    pub addr: SocketAddr,
    /// The version new workers of this group run.
    pub version: Arc<Version>,
    /// Its positions, each with at most one serving worker.
    pub slots: Vec<WorkerSlot>,
    /// The last reload of this group that failed or was refused.
    pub last_failed_reload: Option<FailedReload>,
    /// Handler calls that ran past `request_timeout`.
    pub request_timeouts: u64,
}

impl Group {
    /// The group of `config`, listening (on an adopted socket if one of
    /// `activated` matches, which is then taken out), its slots empty.
    pub fn listen(
        config: Arc<GroupConfig>,
        activated: &mut Vec<ActivatedListener>,
        version: Arc<Version>,
    ) -> Result<Group> {
        let adopted = activated
            .iter()
            .position(|a| a.name == config.name)
            .or_else(|| {
                activated
                    .iter()
                    .position(|a| a.listener.local_addr().ok() == Some(config.listen))
            });
        let listener = match adopted {
            Some(index) => {
                let adopted = activated.swap_remove(index);
                tracing::info!(group = %config.name, fd_name = %adopted.name, "using the socket-activated listener");
                adopted.listener
            }
            None => bind_group(&config)?,
        };
        let addr = listener.local_addr()?;
        Ok(Group::on(config, listener, addr, version))
    }

    /// The group of `config` on `listener` (bound to `addr`), its slots empty.
    fn on(
        config: Arc<GroupConfig>,
        listener: TcpListener,
        addr: SocketAddr,
        version: Arc<Version>,
    ) -> Group {
        let slots = (0..config.count)
            .map(|_| WorkerSlot::new(version.clone()))
            .collect();
        Group {
            config,
            listener: Some(listener),
            moving_to: None,
            addr,
            version,
            slots,
            last_failed_reload: None,
            request_timeouts: 0,
        }
    }

    /// The business workers of a gateway group, on a handle of the
    /// listener of its `gateways` group (which alone accepts on it).
    pub fn sharing(
        config: Arc<GroupConfig>,
        gateways: &Group,
        version: Arc<Version>,
    ) -> Result<Group> {
        let listener = gateways
            .listener
            .as_ref()
            .context("the gateway group has no listener")?
            .try_clone()
            .context("cannot duplicate the gateway listener")?;
        Ok(Group::on(config, listener, gateways.addr, version))
    }

    /// A group a reload adds: listening, with no slot yet.
    pub fn added(config: Arc<GroupConfig>, version: Arc<Version>) -> Result<Group> {
        let mut group = Group::listen(config, &mut Vec::new(), version)?;
        group.slots.clear();
        Ok(group)
    }

    /// Takes the listener a reload moves the group to.
    pub fn move_to(&mut self, listener: MovedListener) {
        self.moving_to = Some(listener);
    }

    /// The socket workers on `config` accept from: the one a reload moves
    /// the group to, if `config` is the moved one. `None` once removed.
    pub fn listener_for(&self, config: &GroupConfig) -> Option<&TcpListener> {
        match &self.moving_to {
            Some(moved) if moved.configured == config.listen => Some(&moved.listener),
            _ => self.listener.as_ref(),
        }
    }

    /// Whether a reload removed the group.
    pub fn is_removed(&self) -> bool {
        self.listener.is_none()
    }

    /// After a reload: runs `generation` on `count` slots. Keeps the
    /// listener `generation` listens on and closes the other one; with no
    /// slot left, the group is removed and its listener closed.
    pub fn settle(&mut self, generation: Generation, count: usize) {
        if let Some(moved) = self.moving_to.take() {
            if moved.configured == generation.config.listen {
                self.listener = Some(moved.listener);
                self.addr = moved.addr;
            }
        }
        if count == 0 {
            self.listener = None;
        }
        self.config = generation.config;
        self.version = generation.version;
        self.slots.truncate(count);
    }
}

/// A listener bound for a group's new address, before the reload that
/// moves the group there starts.
pub struct MovedListener {
    listener: TcpListener,
    /// The address as configured (port 0 stays 0).
    configured: SocketAddr,
    /// The address as bound.
    addr: SocketAddr,
}

impl MovedListener {
    /// Binds the address of `to`.
    pub fn bind(to: &GroupConfig) -> Result<MovedListener> {
        let listener = bind_group(to)?;
        Ok(MovedListener {
            addr: listener.local_addr()?,
            configured: to.listen,
            listener,
        })
    }
}

fn bind_group(config: &GroupConfig) -> Result<TcpListener> {
    bind(config.listen)
        .with_context(|| format!("group {}: cannot listen on {}", config.name, config.listen))
}

/// Binds a listener with a deep accept queue, for all workers to share.
fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "; another program (or another host) listens there: `ss -ltnp 'sport = :{}'` shows which, or change listen",
                addr.port()
            ),
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need root (then `user = ...`) or CAP_NET_BIND_SERVICE".to_owned()
            }
            _ => String::new(),
        };
        anyhow::anyhow!("{e}{hint}")
    })?;
    let listener = socket.listen(1024)?.into_std()?;
    Ok(listener)
}
