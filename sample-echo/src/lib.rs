//! The echo behind the gateway, used by the gateway's tests and benchmarks:
//! each message goes back to its sender; a message that starts with `b`
//! goes to every client of the group instead.
//!
//! Its version string comes from `ECHO_VERSION` at build time (default: the
//! crate version); a message `version` is answered with it, so a test sees
//! which build answers after a reload. The setting `start_delay_ms` makes
//! its start that slow (tests use it for "no business worker ready yet").

use handler_api::{export_handler, Client, Context, Gateway, Handler, Request, Response};

const VERSION: &str = match option_env!("ECHO_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

struct Echo;

impl Handler for Echo {
    fn start(ctx: &Context<'_>) -> Result<Self, String> {
        let delay = ctx.setting("start_delay_ms").unwrap_or("0");
        let delay: u64 = delay
            .parse()
            .map_err(|_| format!("start_delay_ms {delay:?} is not a number"))?;
        std::thread::sleep(std::time::Duration::from_millis(delay));
        Ok(Echo)
    }

    fn handle(&self, _: &Request<'_>) -> Response {
        Response::text(404, "sample-echo serves WebSocket and text clients only\n")
    }

    fn on_message(&self, gateway: &Gateway, client: &Client<'_>) {
        let message = client.message();
        match message.as_bytes() {
            [b'b', ..] => gateway.send_to_all(message),
            b"version" => gateway.send_to_client(client.id(), VERSION),
            _ => gateway.send_to_client(client.id(), message),
        }
    }
}

export_handler!(Echo, version = VERSION);
