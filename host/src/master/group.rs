//! A group: identical workers sharing one listening socket, bound once by
//! the master before any worker exists and kept for its whole life, so a
//! worker's exit never drops a queued connection.
//!
//! The socket is adopted from systemd socket activation when one matches
//! the group (by name, else by address); otherwise the master binds it.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::{Context as _, Result};

use super::slot::WorkerSlot;
use super::systemd::ActivatedListener;
use crate::config::GroupConfig;
use crate::versions::store::Version;

/// A group of identical workers on one listener.
pub struct Group {
    /// Its settings.
    pub config: GroupConfig,
    listener: TcpListener,
    /// The bound address (the real port when the config says 0).
    pub addr: SocketAddr,
    /// The version new workers of this group run.
    pub version: Arc<Version>,
    /// Its positions, each with at most one serving worker.
    pub slots: Vec<WorkerSlot>,
}

impl Group {
    /// The group of `config`, listening (on an adopted socket if one of
    /// `activated` matches, which is then taken out), its slots empty.
    pub fn listen(
        config: GroupConfig,
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
            None => bind(config.listen).with_context(|| {
                format!("group {}: cannot listen on {}", config.name, config.listen)
            })?,
        };
        let addr = listener.local_addr()?;
        let slots = (0..config.count)
            .map(|_| WorkerSlot::new(version.clone()))
            .collect();
        Ok(Group {
            config,
            listener,
            addr,
            version,
            slots,
        })
    }

    /// The socket its workers accept from.
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }
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
