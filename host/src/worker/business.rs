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
use anyhow::{Context as _, Result};
use handler_api::{ClientEvent, ConnectionModuleRef, HandlerModuleRef, Header};
use tokio::io::BufReader;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::gateway_calls::{self, LinkRole};
use super::gateway_links::{connect, start_link, LinkNews, Work};
use super::loader::Loaded;
use crate::protocol::link::{Event, EventKind};
use crate::protocol::worker::{FromWorker, ToWorker, WorkerSpec};
use crate::protocol::{read_line, write_line};

/// Most events handled in one run before what they made is handed to the
/// link writers (a bound on how long an ack waits behind later events).
const RUN: usize = 64;

/// The connection entry points of a handler loaded for a gateway group.
pub fn entry_points(handler: &Loaded) -> Result<ConnectionModuleRef> {
    handler.connections.with_context(|| {
        format!(
            "this handler has no connection entry points (it was built against handler-api 0.2.0): \
             rebuild it against handler-api {} to serve a websocket or text group",
            HandlerModuleRef::VERSION_STRINGS.version
        )
    })
}

/// Serves client events with `handler` until the master says stop.
pub async fn run(
    spec: &WorkerSpec,
    handler: HandlerModuleRef,
    connections: ConnectionModuleRef,
    sockets: Vec<PathBuf>,
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> Result<()> {
    let (on_connect, on_message, on_close) = (
        connections.on_connect(),
        connections.on_message(),
        connections.on_close(),
    );
    let links = gateway_calls::install(sockets.len(), LinkRole::Business);
    let (work, thread_work) = std_mpsc::channel::<Work>();
    let (news, mut link_news) = mpsc::unbounded_channel();
    for (index, socket) in sockets.iter().enumerate() {
        let stream = connect(socket).await?;
        start_link(
            index,
            socket.clone(),
            stream,
            links,
            Some(work.clone()),
            news.clone(),
        );
    }
    let handler_thread = std::thread::Builder::new()
        .name("handler".into())
        .spawn(move || {
            let calls = gateway_calls::table();
            let mut next = thread_work.recv().ok();
            while let Some(mut work) = next.take() {
                // The events waiting now, up to RUN, are one run: their
                // sends and acks go to the link writers together.
                let Some(mut run) = gateway_calls::Run::begin() else {
                    return;
                };
                for handled in 1.. {
                    let Work::Event {
                        gateway,
                        generation,
                        event,
                    } = work
                    else {
                        return;
                    };
                    let entry = match event.kind {
                        EventKind::Connect => on_connect,
                        EventKind::Message => on_message,
                        EventKind::Close => on_close,
                    };
                    run.event(gateway, generation, || {
                        with_raw(&event, |raw| entry(calls, raw))
                    });
                    match thread_work.try_recv() {
                        Ok(more) if handled < RUN => work = more,
                        Ok(more) => {
                            next = Some(more);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                drop(run);
                if next.is_none() {
                    next = thread_work.recv().ok();
                }
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
        peer: std::str::from_utf8(&event.peer).unwrap_or_default().into(),
        path: handshake.map_or("", |h| h.path.as_str()).into(),
        subprotocol: handshake.map_or("", |h| h.subprotocol.as_str()).into(),
        headers: headers.as_slice().into(),
    };
    f(&raw)
}
