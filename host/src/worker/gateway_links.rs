//! The links of one worker process to the gateways of a gateway group:
//! connecting (and again when a gateway restarts), writing frames in
//! batches, and reading what the gateways send. Business workers hand the
//! events they read to their handler thread; HTTP workers that push to a
//! gateway group only send and ask.

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::gateway_calls::{self, Links};
use crate::protocol::link::{Event, FrameReader, ToBusiness};

/// How often a link to a gateway that is not there (yet) is retried.
const RETRY: Duration = Duration::from_millis(50);

/// What the handler thread is given.
pub enum Work {
    /// An event from gateway `gateway`'s link generation `generation`.
    Event {
        /// The gateway's index.
        gateway: usize,
        /// The link's connection the event came on.
        generation: u64,
        /// The event.
        event: Box<Event>,
    },
    /// Every gateway said `Retired`: finish and end.
    Finish,
}

/// What link tasks tell the worker's main loop.
pub enum LinkNews {
    /// Gateway `usize` will send no more events.
    Retired(usize),
    /// Gateway `usize`'s link ended.
    Down(usize),
}

/// Connects to a gateway socket, waiting while it is not there yet.
pub async fn connect(socket: &Path) -> Result<UnixStream> {
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                tokio::time::sleep(RETRY).await
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot link to gateway {}", socket.display()))
            }
        }
    }
}

/// Runs gateway `index`'s link: a writer task and a reader task; when the
/// link ends (the gateway died), reconnects unless retiring.
pub fn start_link(
    index: usize,
    socket: PathBuf,
    stream: UnixStream,
    links: &'static Links,
    work: Option<std_mpsc::Sender<Work>>,
    news: mpsc::UnboundedSender<LinkNews>,
) {
    tokio::spawn(async move {
        let mut stream = stream;
        loop {
            let (reader, writer) = stream.into_split();
            let (frames, outgoing) = mpsc::unbounded_channel();
            let generation = links.attach(index, frames);
            let written = tokio::spawn(crate::protocol::link::write_frames(writer, outgoing));
            links.note_writer(written);
            read_link(index, generation, reader, work.as_ref(), &news).await;
            links.detach(index, generation);
            let _ = news.send(LinkNews::Down(index));
            if links.retiring() {
                return;
            }
            tracing::warn!(
                gateway = index,
                "the link to a gateway ended; linking again"
            );
            stream = match connect(&socket).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::error!("{e:#}");
                    return;
                }
            };
        }
    });
}

async fn read_link(
    index: usize,
    generation: u64,
    reader: OwnedReadHalf,
    work: Option<&std_mpsc::Sender<Work>>,
    news: &mpsc::UnboundedSender<LinkNews>,
) {
    let mut reader = FrameReader::new(reader);
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(gateway = index, "{e:#}");
                return;
            }
        };
        match ToBusiness::decode(&frame) {
            Ok(ToBusiness::Event(event)) => match work {
                Some(work) => {
                    let _ = work.send(Work::Event {
                        gateway: index,
                        generation,
                        event,
                    });
                }
                None => tracing::warn!(gateway = index, "a client event on a push-only link"),
            },
            Ok(ToBusiness::Answer { request, answer }) => gateway_calls::answered(request, answer),
            Ok(ToBusiness::Retired) => {
                let _ = news.send(LinkNews::Retired(index));
            }
            Err(e) => {
                tracing::warn!(gateway = index, "bad frame from a gateway: {e:#}");
                return;
            }
        }
    }
}
