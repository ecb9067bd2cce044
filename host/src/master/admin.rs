//! The optional admin listener: `/metrics` (Prometheus) and `/healthz`.
//!
//! Requests are answered by the master's event loop (like control
//! commands), so they read the worker table without locks.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::Event;

/// What the admin listener asks the master.
#[derive(Debug, Clone, Copy)]
pub enum AdminQuery {
    /// Prometheus text.
    Metrics,
    /// Whether every group has a ready worker.
    Health,
}

/// The master's answer: status code, content type, body.
pub type AdminAnswer = (u16, &'static str, String);

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for admin requests on {addr}"))
}

/// Serves admin requests until the master exits.
pub async fn serve(listener: TcpListener, events: mpsc::UnboundedSender<Event>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let events = events.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let events = events.clone();
                async move { Ok::<_, Infallible>(answer(req.uri().path(), &events).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(path: &str, events: &mpsc::UnboundedSender<Event>) -> hyper::Response<Full<Bytes>> {
    let query = match path {
        "/metrics" => Some(AdminQuery::Metrics),
        "/healthz" => Some(AdminQuery::Health),
        _ => None,
    };
    let (status, content_type, body) = match query {
        Some(query) => {
            let (tx, rx) = oneshot::channel();
            let _ = events.send(Event::Admin(query, tx));
            rx.await.unwrap_or((
                503,
                "text/plain; charset=utf-8",
                "host is stopping\n".to_owned(),
            ))
        }
        None => (
            404,
            "text/plain; charset=utf-8",
            "try /metrics or /healthz\n".to_owned(),
        ),
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
