//! The contract between `host` and a handler.
//!
//! A handler is a `cdylib` that each worker process loads once, in its start
//! callback. Everything that crosses the library boundary is defined here with
//! `#[repr(C)]` and [`abi_stable::StableAbi`], so `host` can check at load time
//! that the library was built against a compatible version of this crate: a
//! mismatch is a load error, never undefined behaviour.
//!
//! Handler authors never touch the raw ABI. They implement the safe
//! [`Handler`] trait and call [`export_handler!`]:
//!
//! ```
//! use handler_api::{export_handler, Context, Handler, Request, Response};
//!
//! struct Hello {
//!     greeting: String,
//! }
//!
//! impl Handler for Hello {
//!     fn start(ctx: &Context<'_>) -> Result<Self, String> {
//!         let greeting = ctx.setting("greeting").unwrap_or("hello").to_owned();
//!         ctx.logger().info(&format!("worker {} starting", ctx.slot()));
//!         Ok(Hello { greeting })
//!     }
//!
//!     fn handle(&self, req: &Request<'_>) -> Response {
//!         match (req.method(), req.path()) {
//!             ("GET", "/") => Response::text(200, &self.greeting),
//!             _ => Response::text(404, "not found"),
//!         }
//!     }
//! }
//!
//! export_handler!(Hello);
//! # fn main() {}
//! ```
//!
//! with, in the handler's `Cargo.toml`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//! ```
//!
//! Long-lived connections: a group with `protocol = "websocket"` (or
//! `"text"`) calls [`Handler::on_connect`], [`Handler::on_message`] and
//! [`Handler::on_close`] with a [`Gateway`] that reaches every client of
//! the group:
//!
//! ```
//! use handler_api::{export_handler, Client, Context, Gateway, Handler, Request, Response};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     fn start(_: &Context<'_>) -> Result<Self, String> {
//!         Ok(Echo)
//!     }
//!     fn handle(&self, _: &Request<'_>) -> Response {
//!         Response::text(404, "not found")
//!     }
//!     fn on_message(&self, gateway: &Gateway, client: &Client<'_>) {
//!         gateway.send_to_client(client.id(), client.message());
//!     }
//! }
//!
//! export_handler!(Echo);
//! # fn main() {}
//! ```
//!
//! Every entry point catches panics: a panicking request becomes a `500`
//! and the worker keeps serving; a panicking `start` becomes a start error
//! carrying the panic message.
//!
//! The state built by [`Handler::start`] lives in a global of the library.
//! That is sound because a worker loads its handler exactly once and a
//! library is never unloaded while the worker runs.

mod connection;
mod context;
mod export;
mod module;
mod request;
mod response;

pub use abi_stable;
pub use connection::{
    gateway, Client, ClientEvent, ClientId, ClientIdError, Gateway, GatewayCalls, GatewayCallsRef,
    Message, MessageKind,
};
pub use context::{Context, Level, LogFn, Logger, Setting, StartContext};
pub use module::{
    ConnectionExport, ConnectionModule, ConnectionModuleRef, HandlerInfo, HandlerModule,
    HandlerModuleRef, CONNECTION_EXPORT_SYMBOL,
};
pub use request::{Header, Request};
pub use response::{Response, ResponseHeader, TEXT_PLAIN};

/// What a handler author implements.
///
/// One value is built per worker process by [`Handler::start`] and shared by
/// every request that worker serves (possibly from several threads, when the
/// group runs handler calls on a thread pool), hence `Send + Sync`.
pub trait Handler: Sized + Send + Sync + 'static {
    /// Called once when the worker starts, before it accepts connections.
    /// An `Err` (or a panic) stops the worker before it serves anything, and
    /// the message reaches whoever started or reloaded it.
    fn start(ctx: &Context<'_>) -> Result<Self, String>;

    /// Answers one request. A panic becomes a `500` response.
    fn handle(&self, req: &Request<'_>) -> Response;

    /// Called on workers of groups that are not reloadable when a reload
    /// happens (their code stays; they may refresh caches or settings).
    fn on_reload(&self) {}

    /// Called once when the worker stops, after its last request.
    fn stop(&self) {}

    /// A client connected to a gateway group (`protocol = "websocket"` or
    /// `"text"`) this handler serves. Events of one client arrive in order,
    /// one at a time; a panic is logged and the event counts as handled.
    fn on_connect(&self, gateway: &Gateway, client: &Client<'_>) {
        let _ = (gateway, client);
    }

    /// A client sent a message ([`Client::message`]).
    fn on_message(&self, gateway: &Gateway, client: &Client<'_>) {
        let _ = (gateway, client);
    }

    /// A client's connection closed; it can no longer be sent to.
    fn on_close(&self, gateway: &Gateway, client: &Client<'_>) {
        let _ = (gateway, client);
    }
}

#[doc(hidden)]
pub mod __private {
    pub use crate::connection::attach_gateway;
    pub use crate::export::*;
}
