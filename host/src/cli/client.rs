//! The CLI's end of the control socket: one connection per request, one
//! typed answer per request.
//!
//! [`connect`] fails with a [`ConnectError`] the commands branch on (a
//! master that is not running is news for `restart` and `rollback`, an
//! error for the rest); everything after the connection is `anyhow`.

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::config::{Config, RunDir};
use crate::protocol::control::{
    ControlReply, ControlRequest, ReloadOutcome, ReloadStep, StatusReport, WaitingWorker,
    WorkerConnections,
};

/// Why the CLI could not reach the master.
#[derive(Debug)]
pub enum ConnectError {
    /// No master answers on the control socket.
    NotRunning(PathBuf),
    /// The socket belongs to another user.
    PermissionDenied {
        /// The control socket.
        socket: PathBuf,
        /// Its owner's uid, if it can be read.
        owner: Option<u32>,
    },
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::NotRunning(socket) => write!(
                f,
                "host is not running (no master answers on {})",
                socket.display()
            ),
            ConnectError::PermissionDenied { socket, owner } => write!(
                f,
                "permission denied on the control socket {}: host runs as uid {}; run this command as that user or as root",
                socket.display(),
                owner.map_or_else(|| "?".to_owned(), |uid| uid.to_string())
            ),
        }
    }
}

impl std::error::Error for ConnectError {}

/// A connection to the running master, good for one request.
pub struct ControlClient {
    stream: UnixStream,
}

/// What a reload says before its outcome.
pub enum ReloadNews {
    /// Another reload runs; this one is queued behind it.
    Queued(String),
    /// A slot got its replacement.
    Step(ReloadStep),
    /// A replacement is still starting.
    Waiting(WaitingWorker),
}

/// Connects to the master of `config`.
pub fn connect(config: &Config) -> Result<ControlClient, ConnectError> {
    let socket = RunDir::of(config).control_socket();
    match UnixStream::connect(&socket) {
        Ok(stream) => Ok(ControlClient { stream }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let owner = std::fs::metadata(&socket).ok().map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.uid()
            });
            Err(ConnectError::PermissionDenied { socket, owner })
        }
        Err(_) => Err(ConnectError::NotRunning(socket)),
    }
}

impl ControlClient {
    /// Workers and versions.
    pub fn status(self) -> Result<StatusReport> {
        for reply in self.ask(&ControlRequest::Status)? {
            if let ControlReply::Status(report) = unless_error(reply?)? {
                return Ok(report);
            }
        }
        bail!("the master sent no status")
    }

    /// Every worker's open connections.
    pub fn connections(self) -> Result<Vec<WorkerConnections>> {
        for reply in self.ask(&ControlRequest::Connections)? {
            if let ControlReply::Connections { workers } = unless_error(reply?)? {
                return Ok(workers);
            }
        }
        bail!("the master sent no connection list")
    }

    /// Stops the master; returns once it is gone. `accepted` hears what it
    /// is doing meanwhile.
    pub fn stop(self, now: bool, mut accepted: impl FnMut(&str)) -> Result<()> {
        for reply in self.ask(&ControlRequest::Stop { now })? {
            if let ControlReply::Accepted { message } = unless_error(reply?)? {
                accepted(&message);
            }
        }
        Ok(())
    }

    /// Reloads `group` (all when `None`) and returns its outcome; `news`
    /// hears about it on the way. A refusal is an error.
    pub fn reload(
        self,
        group: Option<String>,
        mut news: impl FnMut(ReloadNews),
    ) -> Result<ReloadOutcome> {
        for reply in self.ask(&ControlRequest::Reload { group })? {
            match reply? {
                ControlReply::Accepted { message } => news(ReloadNews::Queued(message)),
                ControlReply::Progress(step) => news(ReloadNews::Step(step)),
                ControlReply::Waiting(waiting) => news(ReloadNews::Waiting(waiting)),
                ControlReply::Reloaded(outcome) => return Ok(outcome),
                ControlReply::Error { message } => bail!("reload refused: {message}"),
                ControlReply::Status(_) | ControlReply::Connections { .. } => {}
            }
        }
        bail!("the master closed the connection before the reload ended")
    }

    /// Sends one request; replies come from the returned iterator.
    fn ask(
        mut self,
        request: &ControlRequest,
    ) -> Result<impl Iterator<Item = Result<ControlReply>>> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .context("cannot send to the master")?;
        Ok(BufReader::new(self.stream).lines().map(|line| {
            let line = line.context("lost the connection to the master")?;
            serde_json::from_str(&line)
                .with_context(|| format!("bad reply from the master: {line}"))
        }))
    }
}

/// A reply, or the master's refusal as an error.
fn unless_error(reply: ControlReply) -> Result<ControlReply> {
    match reply {
        ControlReply::Error { message } => bail!("{message}"),
        reply => Ok(reply),
    }
}
