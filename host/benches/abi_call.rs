//! ABI microbenchmark: what one `GET /` costs through the handler ABI, as a
//! host worker makes the call, against the same routes compiled in.
//!
//! ```sh
//! cargo build --release -p sample-handler
//! cargo bench -p host --bench abi_call
//! ```
//!
//! - **abi**: `libsample_handler.so` loaded with abi_stable and started like
//!   a worker starts it; per call: `host::abi::call_handler`, the very
//!   function a worker runs per request (build the borrowed
//!   `handler_api::Request` from hyper's request parts, call `handle`,
//!   check the answer and turn it into a `hyper::Response`), then drop it.
//! - **route**: `baseline::route` + `baseline::server::http_response`, what
//!   `baseline-server` does per request.
//!
//! Also the bare calls (`handle` on a prebuilt request, `route` alone).
//! Prints the median ns/call of SAMPLES samples of ITERS calls each (env
//! `ABI_BENCH_SAMPLES`, default 15; `ABI_BENCH_ITERS`, default 200000),
//! contenders interleaved sample by sample. The library path is
//! `SAMPLE_HANDLER_SO`, default `<workspace>/target/release/libsample_handler.so`;
//! if it is missing the benchmark says so and exits 0.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use abi_stable::library::RootModule;
use abi_stable::std_types::{RResult, RStr};
use bytes::Bytes;
use handler_api::{HandlerModuleRef, Header, Level, Request, StartContext};

extern "C" fn discard_log(_level: Level, _message: RStr<'_>) {}

fn library_path() -> PathBuf {
    if let Some(path) = std::env::var_os("SAMPLE_HANDLER_SO") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release/libsample_handler.so")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// What `baseline-server` does per request once the body is collected.
fn via_route(
    parts: &hyper::http::request::Parts,
    body: &Bytes,
    pid: u32,
) -> baseline::server::HttpResponse {
    baseline::server::http_response(baseline::route(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        body,
        pid,
    ))
}

/// ns per call of `f` over `iters` calls.
fn sample(iters: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_nanos() as f64 / iters as f64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn main() {
    let path = library_path();
    if !path.exists() {
        println!(
            "abi_call: skipped: {} does not exist; build it with `cargo build --release -p sample-handler` or point SAMPLE_HANDLER_SO at a build",
            path.display()
        );
        return;
    }
    let path = path.canonicalize().unwrap_or(path);
    let handler = match HandlerModuleRef::load_from_file(&path) {
        Ok(handler) => handler,
        Err(e) => {
            eprintln!("abi_call: cannot load {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    let pid = std::process::id();
    let ctx = StartContext {
        group: "web".into(),
        slot: 0,
        pid,
        settings: (&[][..]).into(),
        log: discard_log,
    };
    if let RResult::RErr(e) = (handler.start())(&ctx) {
        eprintln!("abi_call: the handler's start failed: {e}");
        std::process::exit(1);
    }
    let info = (handler.info())();

    // GET / as wrk and loadgen send it: one Host header, no body.
    let (parts, ()) = hyper::Request::get("/")
        .header("host", "127.0.0.1:8080")
        .body(())
        .expect("a valid request")
        .into_parts();
    let body = Bytes::new();
    let peer: Arc<str> = "127.0.0.1:54321".into();

    // Both paths must answer the same thing, or the comparison is moot.
    let abi = host::abi::call_handler(handler, &parts, &body, &peer);
    let direct = via_route(&parts, &body, pid);
    assert_eq!(abi.status(), direct.status());
    assert_eq!(abi.headers(), direct.headers());
    let (abi_body, direct_body) = (abi.into_body(), direct.into_body());
    let same = format!("{abi_body:?}") == format!("{direct_body:?}");
    if !same {
        println!(
            "abi_call: note: bodies differ ({abi_body:?} vs {direct_body:?}); the library was built with another SAMPLE_VERSION"
        );
    }

    let headers = [Header {
        name: "host".into(),
        value: b"127.0.0.1:8080"[..].into(),
    }];
    let prebuilt = Request {
        method: "GET".into(),
        path: "/".into(),
        query: "".into(),
        headers: headers[..].into(),
        body: b""[..].into(),
        peer: "127.0.0.1:54321".into(),
    };

    let samples = env_usize("ABI_BENCH_SAMPLES", 15);
    let iters = env_usize("ABI_BENCH_ITERS", 200_000);
    let mut results: [Vec<f64>; 4] = Default::default();
    for round in 0..samples {
        let mut contenders: [(usize, Box<dyn FnMut()>); 4] = [
            (
                0,
                Box::new(|| {
                    black_box(host::abi::call_handler(
                        black_box(handler),
                        black_box(&parts),
                        black_box(&body),
                        black_box(&peer),
                    ));
                }),
            ),
            (
                1,
                Box::new(|| {
                    black_box(via_route(
                        black_box(&parts),
                        black_box(&body),
                        black_box(pid),
                    ));
                }),
            ),
            (
                2,
                Box::new(|| {
                    black_box((handler.handle())(black_box(&prebuilt)));
                }),
            ),
            (
                3,
                Box::new(|| {
                    black_box(baseline::route(
                        black_box("GET"),
                        black_box("/"),
                        black_box(""),
                        black_box(b""),
                        black_box(pid),
                    ));
                }),
            ),
        ];
        // Alternate the order so neither side always runs first.
        if round % 2 == 1 {
            contenders.reverse();
        }
        for (which, f) in contenders.iter_mut() {
            results[*which].push(sample(iters, f));
        }
    }
    let [mut abi, mut route, mut handle_only, mut route_only] = results;
    let (abi, route) = (median(&mut abi), median(&mut route));
    let (handle_only, route_only) = (median(&mut handle_only), median(&mut route_only));

    println!(
        "abi_call: {} {} from {}; {samples} samples x {iters} calls, medians",
        info.name,
        info.version,
        path.display()
    );
    println!("abi_call: GET / via handler ABI (request in, hyper response out): {abi:8.1} ns/call");
    println!("abi_call: GET / via baseline::route + http_response:          {route:8.1} ns/call");
    println!(
        "abi_call: difference: {:+.1} ns/call ({:.2}x)",
        abi - route,
        abi / route
    );
    println!(
        "abi_call: bare handle() on a prebuilt request:               {handle_only:8.1} ns/call"
    );
    println!(
        "abi_call: bare baseline::route():                            {route_only:8.1} ns/call"
    );
}
