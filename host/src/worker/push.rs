//! An HTTP worker whose group pushes to a gateway group (`push = "chat"`):
//! its handler gets the gateway calls through `handler_api::gateway()`, as
//! GatewayWorker's `GatewayClient` does, so "POST /notify" in a web app
//! reaches browsers.
//!
//! The links to the gateways run on a thread of their own with its own
//! event loop: a handler call blocks the worker's event loop (inline
//! dispatch) while it waits for a query's answer, which that loop could
//! then never read. The links say `Pusher`, so gateways never give them
//! client events.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;

use anyhow::{bail, Context as _, Result};
use tokio::sync::mpsc;

use super::gateway_calls::{self, LinkRole};
use super::gateway_links::{connect, start_link};
use super::loader::Loaded;

/// Links to every gateway of `sockets` and hands the handler its calls.
pub fn link(sockets: &[PathBuf], handler: &Loaded) -> Result<()> {
    let Some(connections) = handler.connections else {
        bail!(
            "this handler cannot push to a gateway group: it was built against handler-api 0.2.0; \
             rebuild it against a newer handler-api"
        );
    };
    let links = gateway_calls::install(sockets.len(), LinkRole::Pusher);
    let (linked, all_linked) = std_mpsc::channel::<Result<()>>();
    let sockets = sockets.to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the gateway links' runtime")?;
    std::thread::Builder::new()
        .name("gateway-links".into())
        .spawn(move || {
            runtime.block_on(async move {
                let (news, mut link_news) = mpsc::unbounded_channel();
                for (index, socket) in sockets.iter().enumerate() {
                    match connect(socket).await {
                        Ok(stream) => {
                            start_link(index, socket.clone(), stream, links, None, news.clone())
                        }
                        Err(e) => {
                            let _ = linked.send(Err(e));
                            return;
                        }
                    }
                }
                let _ = linked.send(Ok(()));
                // The link tasks live as long as this loop runs: the process.
                while link_news.recv().await.is_some() {}
            })
        })
        .context("cannot start the gateway links' thread")?;
    all_linked
        .recv()
        .context("the gateway links' thread ended")??;
    (connections.attach_gateway())(gateway_calls::table());
    Ok(())
}
