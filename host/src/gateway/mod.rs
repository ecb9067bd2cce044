//! A gateway process: holds the clients of a gateway group (WebSocket or
//! newline-delimited text) and passes their events to business workers.
//!
//! It is host code and loads no handler, so `host reload` never replaces
//! it (its group is not reloadable; it is only notified) and its clients
//! stay connected while the handler changes under them. The master starts
//! it like a worker (`host worker`, role `gateway`, the group's listener on
//! fd 3) and restarts it if it dies; its clients die with it.
//!
//! Business workers connect to its Unix socket in the run directory (the
//! directory is owner-only). One [`hub::Hub`] task owns all state; client
//! connections ([`websocket`], [`text`]) and links are tasks that feed it.
//!
//! Stop: on the master's drain the gateway stops accepting, waits until the
//! business workers have drained (their links closed, every event handled
//! and its sends delivered) or `stop_timeout`, then closes every client
//! with 1001 "going away".

mod hub;
mod lazy_read;
mod router;
mod text;
mod websocket;

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::io::BufReader;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Protocol;
use crate::counters::{AcceptFailures, SharedCounters, ACCEPT_RETRY};
use crate::protocol::link::{FrameReader, FromBusiness};
use crate::protocol::worker::{FromWorker, GatewaySpec, ToWorker, WorkerSpec};
use crate::protocol::{read_line, write_line};
use hub::{Hub, Input};

/// Limits every client connection task needs.
#[derive(Debug, Clone)]
pub struct Limits {
    max_message_size: usize,
    max_line: usize,
    ping_interval: Duration,
    missed_pongs: u32,
    idle_timeout: Duration,
    origins: Option<Vec<String>>,
}

/// Serves as gateway `gateway.index` until the master says stop; a start
/// that fails is reported to the master, like any worker's.
pub async fn run(
    spec: &WorkerSpec,
    gateway: &GatewaySpec,
    listener: OwnedFd,
    counters: OwnedFd,
    mut reader: BufReader<OwnedReadHalf>,
    mut writer: OwnedWriteHalf,
) -> Result<ExitCode> {
    let started = SharedCounters::open(counters).and_then(|c| Ok((c, listen(gateway, listener)?)));
    let (counters, (clients, links)) = match started {
        Ok(sockets) => sockets,
        Err(error) => return crate::worker::report_failure(&mut writer, error).await,
    };
    let counters = Arc::new(counters);
    let fd_limit = fd_limit();
    let linked = Arc::new(AtomicUsize::new(0));
    let (inputs, hub_inputs) = mpsc::unbounded_channel();
    let hub = Hub::new(
        gateway.index,
        boot_nonce(),
        gateway.max_outbound_bytes,
        gateway.max_queued_events,
        counters.clone(),
    );
    let hub_task = tokio::spawn(hub.run(hub_inputs));
    let limits = Arc::new(Limits {
        max_message_size: gateway.max_message_size,
        max_line: gateway.max_line,
        ping_interval: Duration::from_millis(gateway.ping_interval_ms.max(1)),
        missed_pongs: gateway.missed_pongs,
        idle_timeout: Duration::from_millis(gateway.idle_timeout_ms.max(1)),
        origins: gateway.origins.clone(),
    });
    let (stop_accepting, accepting) = watch::channel(false);
    tokio::spawn(accept_clients(
        clients,
        counters.clone(),
        gateway.protocol,
        limits,
        inputs.clone(),
        accepting,
    ));
    tokio::spawn(accept_links(links, inputs.clone(), linked.clone()));
    write_line(
        &mut writer,
        &FromWorker::Ready {
            handler_name: "gateway".to_owned(),
            handler_version: env!("CARGO_PKG_VERSION").to_owned(),
        },
    )
    .await?;
    tracing::info!(gateway = gateway.index, socket = %gateway.socket.display(), fd_limit, "gateway ready");

    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    loop {
        let message = tokio::select! {
            message = read_line::<_, ToWorker>(&mut reader) => message,
            _ = sigterm.recv() => Ok(Some(ToWorker::Drain)),
        };
        match message {
            Ok(Some(ToWorker::Connections)) => {
                let (reply, answer) = oneshot::channel();
                let _ = inputs.send(Input::Connections(reply));
                let connections = answer.await.unwrap_or_default();
                write_line(&mut writer, &FromWorker::Connections { connections }).await?;
            }
            Ok(Some(ToWorker::ReopenLog { path })) => {
                if let Some(path) = path {
                    if let Err(e) = crate::logfile::reopen(&path) {
                        tracing::warn!("{e:#}");
                    }
                }
            }
            Ok(Some(ToWorker::ReloadNotify)) => {
                tracing::debug!("reload: gateways keep their clients");
            }
            Ok(Some(ToWorker::Start(_))) => tracing::warn!("ignoring a second start message"),
            Ok(Some(ToWorker::Stop)) => break,
            Ok(Some(ToWorker::Drain)) | Ok(None) | Err(_) => {
                let _ = stop_accepting.send(true);
                let stop_timeout = Duration::from_millis(spec.stop_timeout_ms);
                drain(&inputs, &linked, &counters, stop_timeout).await;
                break;
            }
        }
    }
    drop(inputs);
    hub_task.abort();
    let _ = std::fs::remove_file(&gateway.socket);
    Ok(ExitCode::SUCCESS)
}

/// Waits for the business workers to drain, then closes every client with
/// 1001 and waits (briefly) for the closes to go out.
async fn drain(
    inputs: &mpsc::UnboundedSender<Input>,
    linked: &AtomicUsize,
    counters: &SharedCounters,
    stop_timeout: Duration,
) {
    let deadline = Instant::now() + stop_timeout;
    while linked.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = inputs.send(Input::CloseAll);
    let closing = Instant::now() + Duration::from_secs(2);
    while counters.connections.load(Ordering::Relaxed) > 0 && Instant::now() < closing {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The inherited client listener and this gateway's link socket.
fn listen(gateway: &GatewaySpec, listener: OwnedFd) -> Result<(TcpListener, UnixListener)> {
    let listener = std::net::TcpListener::from(listener);
    listener
        .set_nonblocking(true)
        .context("cannot set the listener non-blocking")?;
    let clients = TcpListener::from_std(listener).context("cannot use the inherited listener")?;
    // A socket left by a gateway that died is in the way.
    let _ = std::fs::remove_file(&gateway.socket);
    let links = UnixListener::bind(&gateway.socket)
        .with_context(|| format!("cannot listen on {}", gateway.socket.display()))?;
    std::fs::set_permissions(&gateway.socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", gateway.socket.display()))?;
    Ok((clients, links))
}

/// The open-files limit in force (the master raised it to the hard limit
/// for every worker): each client holds a descriptor.
fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| soft)
}

/// A number that differs between two starts of a gateway, so client ids of
/// a dead gateway process never name a client of its successor.
fn boot_nonce() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64 of time and pid.
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

async fn accept_clients(
    listener: TcpListener,
    counters: Arc<SharedCounters>,
    protocol: Protocol,
    limits: Arc<Limits>,
    inputs: mpsc::UnboundedSender<Input>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_key = 0u64;
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let key = next_key;
                next_key += 1;
                let (limits, inputs) = (limits.clone(), inputs.clone());
                match protocol {
                    Protocol::Text => tokio::spawn(text::serve(stream, peer, key, limits, inputs)),
                    _ => tokio::spawn(websocket::serve(stream, peer, key, limits, inputs)),
                };
            }
            Err(e) => {
                failures.record(&counters, &e);
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// Most frames of one link passed on to the hub as one input.
const MAX_LINK_BURST: usize = 256;

/// Accepts business workers; `linked` counts their links.
async fn accept_links(
    listener: UnixListener,
    inputs: mpsc::UnboundedSender<Input>,
    linked: Arc<AtomicUsize>,
) {
    let mut next_link = 0u64;
    while let Ok((stream, _)) = listener.accept().await {
        let link = next_link;
        next_link += 1;
        let (mut reader, writer) = stream.into_split();
        let (frames, outgoing) = crate::protocol::link::Outbox::new();
        if inputs.send(Input::LinkUp(link, frames)).is_err() {
            return;
        }
        linked.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(crate::protocol::link::write_outbox(writer, outgoing));
        let (inputs, linked) = (inputs.clone(), linked.clone());
        tokio::spawn(async move {
            let mut reader = FrameReader::new(&mut reader);
            loop {
                let frame = match reader.next().await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("business link ended: {e:#}");
                        break;
                    }
                };
                // The frames this read brought whole go to the hub as one
                // input (a single one without a list).
                let first = match FromBusiness::decode(&frame) {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::warn!("bad frame from a business worker: {e:#}");
                        break;
                    }
                };
                drop(frame);
                let mut more = Vec::new();
                let mut failed = false;
                while more.len() < MAX_LINK_BURST {
                    match reader.try_next() {
                        Ok(Some(frame)) => match FromBusiness::decode(&frame) {
                            Ok(message) => more.push(message),
                            Err(e) => {
                                tracing::warn!("bad frame from a business worker: {e:#}");
                                failed = true;
                                break;
                            }
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!("business link ended: {e:#}");
                            failed = true;
                            break;
                        }
                    }
                }
                let input = if more.is_empty() {
                    Input::Link(link, first)
                } else {
                    more.insert(0, first);
                    Input::Links(link, more)
                };
                if inputs.send(input).is_err() || failed {
                    break;
                }
            }
            let _ = inputs.send(Input::LinkDown(link));
            linked.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
