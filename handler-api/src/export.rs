//! The glue behind [`crate::export_handler!`]: safe trait calls wrapped in
//! `extern "C"` entry points that never let a panic cross the boundary.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use abi_stable::std_types::{RErr, ROk, RResult, RString};

use crate::{
    Client, ClientEvent, Context, Gateway, GatewayCallsRef, Handler, Logger, Request, Response,
    StartContext,
};

/// Where the exported library keeps its one handler value and logger.
pub struct Slot<H> {
    handler: OnceLock<H>,
    logger: OnceLock<Logger>,
}

impl<H> Slot<H> {
    /// An empty slot, for a `static`.
    pub const fn new() -> Self {
        Slot {
            handler: OnceLock::new(),
            logger: OnceLock::new(),
        }
    }
}

impl<H> Default for Slot<H> {
    fn default() -> Self {
        Self::new()
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Runs `H::start` and stores the handler; panics become errors.
pub fn start<H: Handler>(slot: &'static Slot<H>, raw: &StartContext<'_>) -> RResult<(), RString> {
    let ctx = Context::new(raw);
    let logger = ctx.logger();
    let _ = slot.logger.set(logger);
    // This library has its own panic hook: route its panics into the host's
    // log instead of the worker's stderr.
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        logger.error(&format!(
            "handler panicked{location}: {}",
            panic_message(info.payload())
        ));
    }));
    match catch_unwind(AssertUnwindSafe(|| H::start(&ctx))) {
        Ok(Ok(handler)) => match slot.handler.set(handler) {
            Ok(()) => ROk(()),
            Err(_) => RErr("handler started twice in one process".into()),
        },
        Ok(Err(message)) => RErr(message.into()),
        Err(payload) => RErr(format!("start panicked: {}", panic_message(&*payload)).into()),
    }
}

/// Runs `H::handle`; a panic or a call before start becomes a `500`.
pub fn handle<H: Handler>(slot: &'static Slot<H>, req: &Request<'_>) -> Response {
    let Some(handler) = slot.handler.get() else {
        return Response::text(500, "handler not started");
    };
    match catch_unwind(AssertUnwindSafe(|| handler.handle(req))) {
        Ok(response) => response,
        Err(_) => Response::text(500, "internal error: the handler panicked"),
    }
}

/// Runs `H::on_reload`, logging a panic instead of unwinding.
pub fn reload<H: Handler>(slot: &'static Slot<H>) {
    if let Some(handler) = slot.handler.get() {
        let _ = catch_unwind(AssertUnwindSafe(|| handler.on_reload()));
    }
}

/// Runs `H::stop`, logging a panic instead of unwinding.
pub fn stop<H: Handler>(slot: &'static Slot<H>) {
    if let Some(handler) = slot.handler.get() {
        let _ = catch_unwind(AssertUnwindSafe(|| handler.stop()));
    }
}

/// Which connection callback an event is for.
#[derive(Debug, Clone, Copy)]
pub enum ClientCallback {
    /// `on_connect`.
    Connect,
    /// `on_message`.
    Message,
    /// `on_close`.
    Close,
}

/// Runs one connection callback; a panic is logged by the hook and the
/// event counts as handled.
pub fn client_event<H: Handler>(
    slot: &'static Slot<H>,
    callback: ClientCallback,
    calls: GatewayCallsRef,
    event: &ClientEvent<'_>,
) {
    let Some(handler) = slot.handler.get() else {
        return;
    };
    let gateway = Gateway::new(calls);
    let client = Client::new(event);
    let _ = catch_unwind(AssertUnwindSafe(|| match callback {
        ClientCallback::Connect => handler.on_connect(&gateway, &client),
        ClientCallback::Message => handler.on_message(&gateway, &client),
        ClientCallback::Close => handler.on_close(&gateway, &client),
    }));
}

/// Exports a [`Handler`] type as this library's handler.
///
/// `export_handler!(MyHandler);` reports the crate's name and version;
/// `export_handler!(MyHandler, version = "v2");` overrides the version
/// string shown by `host status`.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        $crate::export_handler!($handler, version = env!("CARGO_PKG_VERSION"));
    };
    ($handler:ty, version = $version:expr) => {
        const _: () = {
            use $crate::abi_stable::prefix_type::PrefixTypeTrait as _;

            static SLOT: $crate::__private::Slot<$handler> = $crate::__private::Slot::new();

            extern "C" fn info() -> $crate::HandlerInfo {
                $crate::HandlerInfo {
                    name: $crate::abi_stable::std_types::RStr::from_str(env!("CARGO_PKG_NAME")),
                    version: $crate::abi_stable::std_types::RStr::from_str($version),
                }
            }
            extern "C" fn start(
                ctx: &$crate::StartContext<'_>,
            ) -> $crate::abi_stable::std_types::RResult<(), $crate::abi_stable::std_types::RString> {
                $crate::__private::start(&SLOT, ctx)
            }
            extern "C" fn handle(req: &$crate::Request<'_>) -> $crate::Response {
                $crate::__private::handle(&SLOT, req)
            }
            extern "C" fn reload() {
                $crate::__private::reload(&SLOT)
            }
            extern "C" fn stop() {
                $crate::__private::stop(&SLOT)
            }

            extern "C" fn on_connect(gateway: $crate::GatewayCallsRef, event: &$crate::ClientEvent<'_>) {
                $crate::__private::client_event(&SLOT, $crate::__private::ClientCallback::Connect, gateway, event)
            }
            extern "C" fn on_message(gateway: $crate::GatewayCallsRef, event: &$crate::ClientEvent<'_>) {
                $crate::__private::client_event(&SLOT, $crate::__private::ClientCallback::Message, gateway, event)
            }
            extern "C" fn attach_gateway(gateway: $crate::GatewayCallsRef) {
                $crate::__private::attach_gateway(gateway)
            }
            extern "C" fn on_close(gateway: $crate::GatewayCallsRef, event: &$crate::ClientEvent<'_>) {
                $crate::__private::client_event(&SLOT, $crate::__private::ClientCallback::Close, gateway, event)
            }

            fn root_module() -> $crate::HandlerModuleRef {
                $crate::HandlerModule {
                    info,
                    start,
                    handle,
                    reload,
                    stop,
                }
                .leak_into_prefix()
            }

            // Its name is `CONNECTION_EXPORT_SYMBOL`, checked by a unit test.
            #[export_name = "host_handler_connection_export"]
            extern "C" fn connection_export() -> $crate::ConnectionExport {
                static MODULE: ::std::sync::OnceLock<$crate::ConnectionModuleRef> =
                    ::std::sync::OnceLock::new();
                $crate::ConnectionExport {
                    layout: <$crate::ConnectionModuleRef as $crate::abi_stable::StableAbi>::LAYOUT,
                    module: *MODULE.get_or_init(|| {
                        $crate::ConnectionModule {
                            on_connect,
                            on_message,
                            on_close,
                            attach_gateway,
                        }
                        .leak_into_prefix()
                    }),
                }
            }

            extern "C" fn erased_root_module() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(root_module)
            }

            // What `#[abi_stable::export_root_module]` expands to, spelled out
            // so handler crates need no direct `abi_stable` dependency; the
            // symbol name is checked against abi_stable by a unit test.
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            static ROOT_MODULE_HEADER: $crate::abi_stable::library::LibHeader = unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::HandlerModuleRef>(
                    erased_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            };
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_connection_export_symbol_is_the_one_the_macro_exports() {
        assert_eq!(
            crate::CONNECTION_EXPORT_SYMBOL,
            b"host_handler_connection_export\0"
        );
    }

    #[test]
    fn exported_symbol_is_the_one_abi_stable_looks_up() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}
