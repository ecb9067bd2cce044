//! The root module a handler library exports, checked by abi_stable at load.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RString},
    StableAbi,
};

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
/// It is a prefix type: fields are appended after `stop` (the last field a
/// library must have) without breaking libraries built against an older
/// version of this crate. Libraries built against handler-api 0.2.0 end at
/// `stop`; the connection entry points read as `None` for them.
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
    /// A client connected to the gateway group (since 0.2.1).
    #[sabi(missing_field(option))]
    pub on_connect: extern "C" fn(gateway: GatewayCallsRef, event: &ClientEvent<'_>),
    /// A client sent a message (since 0.2.1).
    #[sabi(missing_field(option))]
    pub on_message: extern "C" fn(gateway: GatewayCallsRef, event: &ClientEvent<'_>),
    /// A client's connection closed (since 0.2.1).
    #[sabi(missing_field(option))]
    pub on_close: extern "C" fn(gateway: GatewayCallsRef, event: &ClientEvent<'_>),
}

impl RootModule for HandlerModuleRef {
    declare_root_module_statics! {HandlerModuleRef}
    const BASE_NAME: &'static str = "handler";
    const NAME: &'static str = "handler";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
