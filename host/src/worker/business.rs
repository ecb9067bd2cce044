//! A business worker: the handler of a gateway group, fed client events by
//! every gateway process of the group.
//!
//! It links to each gateway's socket (retrying while a gateway starts or
//! restarts) before it reports ready. Events from all links go, in arrival
//! order, to one handler thread, so the event loop keeps reading links and
//! answering queries while a handler call runs; the thread calls the
//! handler, then sends the event's `Ack` after the sends the handler made
//! (see [`super::gateway_calls`]).
//!
//! Drain: tell every gateway `Retiring`; each answers `Retired` once it
//! sends no more events; handle everything received up to then, ack it,
//! and exit. The gateways hold the retiring worker's clients' new events
//! until those acks arrive, then move the clients to another worker.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use abi_stable::library::RootModule as _;
use anyhow::{bail, Context as _, Result};
use handler_api::{ClientEvent, HandlerModuleRef, Header};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::gateway_calls::{self, Links};
use super::loader::Loaded;
use crate::protocol::link::{read_frame, Event, EventKind, ToBusiness};
use crate::protocol::worker::{FromWorker, ToWorker, WorkerSpec};
use crate::protocol::{read_line, write_line};

/// How often a link to a gateway that is not there (yet) is retried.
const RETRY: Duration = Duration::from_millis(50);

/// What the handler thread is given.
enum Work {
    /// An event from gateway `gateway`'s link generation `generation`.
    Event {
        gateway: usize,
        generation: u64,
        event: Box<Event>,
    },
    /// Every gateway said `Retired`: finish and end.
    Finish,
}

/// What link tasks tell the worker's main loop.
enum LinkNews {
    /// Gateway `usize` will send no more events.
    Retired(usize),
    /// Gateway `usize`'s link ended.
    Down(usize),
}

/// Serves client events with `handler` until the master says stop.
pub async fn run(
    spec: &WorkerSpec,
    handler: Loaded,
    sockets: Vec<PathBuf>,
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> Result<()> {
    let Some(connections) = handler.connections else {
        bail!(
            "this handler has no connection entry points (it was built against handler-api 0.2.0): \
             rebuild it against handler-api {} to serve a websocket or text group",
            HandlerModuleRef::VERSION_STRINGS.version
        );
    };
    let (on_connect, on_message, on_close) = (
        connections.on_connect(),
        connections.on_message(),
        connections.on_close(),
    );
    let handler = handler.module;
    let links = gateway_calls::install(sockets.len());
    let (work, thread_work) = std_mpsc::channel::<Work>();
    let (news, mut link_news) = mpsc::unbounded_channel();
    for (index, socket) in sockets.iter().enumerate() {
        let stream = connect(socket).await?;
        start_link(
            index,
            socket.clone(),
            stream,
            links,
            work.clone(),
            news.clone(),
        );
    }
    let handler_thread = std::thread::Builder::new()
        .name("handler".into())
        .spawn(move || {
            let calls = gateway_calls::table();
            while let Ok(Work::Event {
                gateway,
                generation,
                event,
            }) = thread_work.recv()
            {
                let entry = match event.kind {
                    EventKind::Connect => on_connect,
                    EventKind::Message => on_message,
                    EventKind::Close => on_close,
                };
                gateway_calls::handle(gateway, generation, || {
                    with_raw(&event, |raw| entry(calls, raw))
                });
            }
        })
        .context("cannot start the handler thread")?;
    write_line(
        writer,
        &FromWorker::Ready {
            handler_name: (handler.info())().name.to_string(),
            handler_version: (handler.info())().version.to_string(),
        },
    )
    .await?;
    tracing::debug!(gateways = sockets.len(), "ready for client events");

    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let now = loop {
        let message = tokio::select! {
            message = read_line::<_, ToWorker>(reader) => message,
            _ = sigterm.recv() => Ok(Some(ToWorker::Drain)),
        };
        match message {
            Ok(Some(ToWorker::Connections)) => {
                write_line(
                    writer,
                    &FromWorker::Connections {
                        connections: Vec::new(),
                    },
                )
                .await?;
            }
            Ok(Some(ToWorker::ReopenLog { path })) => {
                if let Some(path) = path {
                    if let Err(e) = crate::logfile::reopen(&path) {
                        tracing::warn!("{e:#}");
                    }
                }
            }
            Ok(Some(ToWorker::ReloadNotify)) => (handler.reload())(),
            Ok(Some(ToWorker::Start(_))) => tracing::warn!("ignoring a second start message"),
            Ok(Some(ToWorker::Stop)) => break true,
            Ok(Some(ToWorker::Drain)) | Ok(None) | Err(_) => break false,
        }
    };
    if !now {
        tracing::debug!("retiring from the gateways");
        // News from before the drain (a gateway that restarted) is stale.
        while link_news.try_recv().is_ok() {}
        links.retire();
        let mut waiting: Vec<bool> = vec![true; sockets.len()];
        let stop_timeout = Duration::from_millis(spec.stop_timeout_ms);
        let _ = tokio::time::timeout(stop_timeout, async {
            while waiting.iter().any(|w| *w) {
                match link_news.recv().await {
                    Some(LinkNews::Retired(i) | LinkNews::Down(i)) => waiting[i] = false,
                    None => break,
                }
            }
        })
        .await;
        let _ = work.send(Work::Finish);
        let joined = tokio::task::spawn_blocking(move || handler_thread.join());
        if tokio::time::timeout(stop_timeout, joined).await.is_err() {
            tracing::warn!("the handler did not finish its events within stop_timeout");
        }
        // Every ack and send is queued; let the link writers put them out.
        links.close();
        let _ = tokio::time::timeout(stop_timeout, links.flushed()).await;
    }
    (handler.stop())();
    Ok(())
}

/// Connects to a gateway socket, waiting while it is not there yet.
async fn connect(socket: &PathBuf) -> Result<UnixStream> {
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
fn start_link(
    index: usize,
    socket: PathBuf,
    stream: UnixStream,
    links: &'static Links,
    work: std_mpsc::Sender<Work>,
    news: mpsc::UnboundedSender<LinkNews>,
) {
    tokio::spawn(async move {
        let mut stream = stream;
        loop {
            let (reader, writer) = stream.into_split();
            let (frames, outgoing) = mpsc::unbounded_channel();
            let generation = links.attach(index, frames);
            let written = tokio::spawn(write_link(writer, outgoing));
            links.note_writer(index, written);
            read_link(index, generation, reader, &work, &news).await;
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

async fn write_link(mut writer: OwnedWriteHalf, mut outgoing: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(mut buffer) = outgoing.recv().await {
        while let Ok(more) = outgoing.try_recv() {
            buffer.extend_from_slice(&more);
        }
        if writer.write_all(&buffer).await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

async fn read_link(
    index: usize,
    generation: u64,
    reader: OwnedReadHalf,
    work: &std_mpsc::Sender<Work>,
    news: &mpsc::UnboundedSender<LinkNews>,
) {
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    loop {
        let frame = match read_frame(&mut reader).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(gateway = index, "{e:#}");
                return;
            }
        };
        match ToBusiness::decode(&frame) {
            Ok(ToBusiness::Event(event)) => {
                let _ = work.send(Work::Event {
                    gateway: index,
                    generation,
                    event,
                });
            }
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

/// Lends `event` to `f` in its ABI form.
fn with_raw<R>(event: &Event, f: impl FnOnce(&ClientEvent<'_>) -> R) -> R {
    let handshake = event.handshake.as_deref();
    let headers: Vec<Header<'_>> = handshake
        .map(|h| {
            h.headers
                .iter()
                .map(|(name, value)| Header {
                    name: name.as_str().into(),
                    value: value.as_slice().into(),
                })
                .collect()
        })
        .unwrap_or_default();
    let raw = ClientEvent {
        client: event.client,
        session: event.session.as_ref().into(),
        kind: event.message_kind,
        data: event.data.as_ref().into(),
        peer: event.peer.as_str().into(),
        path: handshake.map_or("", |h| h.path.as_str()).into(),
        subprotocol: handshake.map_or("", |h| h.subprotocol.as_str()).into(),
        headers: headers.as_slice().into(),
    };
    f(&raw)
}
