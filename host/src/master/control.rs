//! The control socket: `host status`, `host reload`, `host stop` talk to the
//! master here. Owner-only permissions, and the peer's uid is checked too
//! (a socket's mode is not honoured everywhere).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::Event;
use crate::protocol::control::{ControlReply, ControlRequest};
use crate::protocol::{read_line, write_line};

/// Binds the control socket, replacing a stale one (the run directory lock
/// proves no other master uses it).
pub fn bind(path: &Path) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts control connections for the master's life.
pub async fn serve(listener: UnixListener, events: mpsc::UnboundedSender<Event>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, events.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, events: mpsc::UnboundedSender<Event>) {
    let own_uid = nix::unistd::geteuid().as_raw();
    let peer_uid = stream.peer_cred().map(|cred| cred.uid());
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    if !matches!(peer_uid, Ok(uid) if uid == own_uid || uid == 0) {
        tracing::warn!(uid = ?peer_uid.ok(), "control connection from another user refused");
        // Take (a bounded part of) the request first: a client whose
        // request was never read sees a broken pipe instead of the reason.
        let mut discard = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            (&mut reader)
                .take(64 * 1024)
                .read_until(b'\n', &mut discard),
        )
        .await;
        let message = format!(
            "permission denied: host runs as uid {own_uid}; run this command as that user or as root"
        );
        let _ = write_line(&mut writer, &ControlReply::Error { message }).await;
        return;
    }
    let request = match read_line::<_, ControlRequest>(&mut reader).await {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err(e) => {
            let message = format!("bad control request: {e:#}");
            let _ = write_line(&mut writer, &ControlReply::Error { message }).await;
            return;
        }
    };
    let (reply_tx, mut replies) = mpsc::unbounded_channel();
    if events.send(Event::Control(request, reply_tx)).is_err() {
        return;
    }
    while let Some(reply) = replies.recv().await {
        if let Err(e) = write_line(&mut writer, &reply).await {
            tracing::debug!("control reply not delivered: {e:#}");
            break;
        }
    }
}
