//! The benchmark baseline for `host`: the sample handler's routes compiled
//! straight into a plain hyper server, with host's process model (one parent
//! binds, N re-executed worker processes share the listener, each a tokio
//! `current_thread` runtime) and host's hyper settings.
//!
//! What `host` adds on top of this — the handler ABI call, request/response
//! translation, counters, drain bookkeeping — is exactly what the
//! benchmarks compare. [`route`] is shared by the server and by the
//! `abi_call` microbenchmark. [`echo`] is the same yardstick for long-lived
//! connections: WebSocket and text echo without a gateway hop.

pub mod echo;
pub mod server;

use std::sync::LazyLock;
use std::time::Duration;

/// The version the routes report: `SAMPLE_VERSION` at build time, else the
/// crate version — the same rule as sample-handler, so bodies match byte for
/// byte (both crates are 0.1.0).
pub const VERSION: &str = match option_env!("SAMPLE_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Content type of text answers, as sample-handler's `Response::text`.
pub const TEXT: &str = "text/plain; charset=utf-8";
/// Content type of `POST /echo`.
pub const OCTETS: &str = "application/octet-stream";

/// Longest `/sleep` accepted, as in sample-handler.
const MAX_SLEEP_MS: u64 = 60_000;

/// Built once, like sample-handler builds it in its start callback.
static HELLO: LazyLock<String> = LazyLock::new(|| format!("hello from sample-handler {VERSION}"));

/// Answers one request with sample-handler's routes:
/// `(status, content-type, body)`.
///
/// `GET /`, `/version`, `/pid`, `/sleep?ms=N` (blocks the calling thread, as
/// the sample handler does), `/panic` (the 500 host answers for a panicking
/// handler, without panicking), `POST /echo`, and 404 for anything else.
pub fn route(
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    pid: u32,
) -> (u16, &'static str, Vec<u8>) {
    match (method, path) {
        ("GET", "/") => (200, TEXT, HELLO.as_bytes().to_vec()),
        ("GET", "/version") => (200, TEXT, VERSION.as_bytes().to_vec()),
        ("GET", "/pid") => (200, TEXT, pid.to_string().into_bytes()),
        ("GET", "/sleep") => sleep(query),
        ("GET", "/panic") => (500, TEXT, b"internal error: the handler panicked".to_vec()),
        ("POST", "/echo") => (200, OCTETS, body.to_vec()),
        _ => (404, TEXT, b"not found".to_vec()),
    }
}

fn sleep(query: &str) -> (u16, &'static str, Vec<u8>) {
    match query_param(query, "ms").map(str::parse::<u64>) {
        Some(Ok(ms)) if ms <= MAX_SLEEP_MS => {
            std::thread::sleep(Duration::from_millis(ms));
            (200, TEXT, format!("slept {ms} ms").into_bytes())
        }
        _ => (
            400,
            TEXT,
            format!("expected ?ms=0..={MAX_SLEEP_MS}").into_bytes(),
        ),
    }
}

/// The raw value of the first query parameter called `name`, as
/// `handler_api::Request::query_param`.
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(answer: (u16, &'static str, Vec<u8>)) -> (u16, &'static str, String) {
        (answer.0, answer.1, String::from_utf8(answer.2).unwrap())
    }

    #[test]
    fn routes_answer_like_the_sample_handler() {
        assert_eq!(
            text(route("GET", "/", "", b"", 1)),
            (200, TEXT, format!("hello from sample-handler {VERSION}"))
        );
        assert_eq!(
            text(route("GET", "/version", "", b"", 1)),
            (200, TEXT, VERSION.to_owned())
        );
        assert_eq!(
            text(route("GET", "/pid", "", b"", 42)),
            (200, TEXT, "42".to_owned())
        );
        assert_eq!(
            text(route("GET", "/sleep", "a=1&ms=0", b"", 1)),
            (200, TEXT, "slept 0 ms".to_owned())
        );
        assert_eq!(
            text(route("GET", "/sleep", "ms=x", b"", 1)),
            (400, TEXT, "expected ?ms=0..=60000".to_owned())
        );
        assert_eq!(
            route("POST", "/echo", "", b"\x00abc", 1),
            (200, OCTETS, b"\x00abc".to_vec())
        );
        assert_eq!(
            text(route("POST", "/", "", b"", 1)),
            (404, TEXT, "not found".to_owned())
        );
        assert_eq!(route("GET", "/panic", "", b"", 1).0, 500);
    }

    #[test]
    fn query_params_parse_like_handler_api() {
        assert_eq!(query_param("a=1&ms=250&ms=3&flag", "ms"), Some("250"));
        assert_eq!(query_param("a=1&flag", "flag"), Some(""));
        assert_eq!(query_param("", "ms"), None);
    }
}
