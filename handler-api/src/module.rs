//! The root module a handler library exports, checked by abi_stable at load.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RString},
    StableAbi,
};

use abi_stable::type_layout::TypeLayout;

use crate::{ClientEvent, GatewayCallsRef, Request, Response, StartContext};

/// Who the handler says it is, for `host status` and logs.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct HandlerInfo {
    /// The handler crate's name.
    pub name: RStr<'static>,
    /// The handler's own version string.
    pub version: RStr<'static>,
}

/// The entry points of a handler library.
///
/// Its layout is frozen as of handler-api 0.2.0: abi_stable refuses a
/// library whose root module has fewer fields than the host's, so a field
/// appended here would turn away every handler built before it. Entry
/// points added later live in modules of their own, found by symbol
/// ([`ConnectionExport`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HandlerModuleRef)))]
#[sabi(missing_field(panic))]
pub struct HandlerModule {
    /// Name and version of the handler.
    pub info: extern "C" fn() -> HandlerInfo,
    /// Builds the handler state; an error message if the worker cannot start.
    pub start: extern "C" fn(ctx: &StartContext<'_>) -> RResult<(), RString>,
    /// Answers one request; only called after a successful `start`.
    pub handle: extern "C" fn(req: &Request<'_>) -> Response,
    /// Reload notification for workers that are not reloadable.
    pub reload: extern "C" fn(),
    /// Called once before the worker exits.
    #[sabi(last_prefix_field)]
    pub stop: extern "C" fn(),
}

impl RootModule for HandlerModuleRef {
    declare_root_module_statics! {HandlerModuleRef}
    const BASE_NAME: &'static str = "handler";
    const NAME: &'static str = "handler";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The connection entry points (since handler-api 0.2.1), exported under
/// [`CONNECTION_EXPORT_SYMBOL`] next to the root module. A handler built
/// against 0.2.0 has no such symbol and serves HTTP groups only.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = ConnectionModuleRef)))]
#[sabi(missing_field(panic))]
pub struct ConnectionModule {
    /// A client connected to the gateway group.
    pub on_connect: extern "C" fn(gateway: GatewayCallsRef, event: &ClientEvent<'_>),
    /// A client sent a message.
    pub on_message: extern "C" fn(gateway: GatewayCallsRef, event: &ClientEvent<'_>),
    /// A client's connection closed.
    pub on_close: extern "C" fn(gateway: GatewayCallsRef, event: &ClientEvent<'_>),
    /// Gives a handler serving an HTTP group with `push` the calls that
    /// reach that gateway group ([`crate::gateway`]); before `start`.
    #[sabi(last_prefix_field)]
    pub attach_gateway: extern "C" fn(gateway: GatewayCallsRef),
}

/// What the [`CONNECTION_EXPORT_SYMBOL`] function returns: the module, and
/// its layout as the library was built, which the host checks against its
/// own before it calls anything in the module.
#[repr(C)]
pub struct ConnectionExport {
    /// `<ConnectionModuleRef as StableAbi>::LAYOUT` in the library.
    pub layout: &'static TypeLayout,
    /// The entry points.
    pub module: ConnectionModuleRef,
}

/// The symbol of the `extern "C" fn() -> ConnectionExport` that
/// [`crate::export_handler!`] exports.
pub const CONNECTION_EXPORT_SYMBOL: &[u8] = b"host_handler_connection_export\0";
