//! Messages between processes, framed as one JSON object per line (but
//! the gateway link's binary frames).
//!
//! `control`: the CLI and the master, over the control socket.
//! `worker`: the master and one worker, over the worker's channel.
//! `link`: a gateway and a business worker (binary frames, not JSON).

pub mod control;
pub mod link;
pub mod worker;

use anyhow::{Context as _, Result};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Writes one message as a JSON line.
pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> Result<()> {
    let mut line = serde_json::to_vec(message).context("cannot encode message")?;
    line.push(b'\n');
    writer
        .write_all(&line)
        .await
        .context("cannot send message")?;
    writer.flush().await.context("cannot send message")
}

/// Reads one JSON-line message; `None` at end of stream.
pub async fn read_line<R, T>(reader: &mut BufReader<R>) -> Result<Option<T>>
where
    R: tokio::io::AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut line = String::new();
    if reader
        .read_line(&mut line)
        .await
        .context("cannot read message")?
        == 0
    {
        return Ok(None);
    }
    let message =
        serde_json::from_str(&line).with_context(|| format!("malformed message {line:?}"))?;
    Ok(Some(message))
}
