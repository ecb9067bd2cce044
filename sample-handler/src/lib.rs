//! The sample handler: the routes the README, the tests and the benchmarks use.
//!
//! Its version string comes from `SAMPLE_VERSION` at build time (default: the
//! crate version), so `SAMPLE_VERSION=v2 cargo build -p sample-handler`
//! builds a distinguishable version for reload tests. `GET /greeting`
//! answers the group's `greeting` setting, so a test can see which config
//! a worker was started with.

use std::time::Duration;

use handler_api::{export_handler, Context, Handler, Logger, Request, Response};

const VERSION: &str = match option_env!("SAMPLE_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Longest `/sleep` accepted, so a typo cannot park a worker for hours.
const MAX_SLEEP_MS: u64 = 60_000;

struct Sample {
    hello: String,
    greeting: String,
    pid: String,
    logger: Logger,
}

impl Handler for Sample {
    fn start(ctx: &Context<'_>) -> Result<Self, String> {
        ctx.logger().debug(&format!(
            "sample-handler {VERSION} starting in {}/{}",
            ctx.group(),
            ctx.slot()
        ));
        Ok(Sample {
            hello: format!("hello from sample-handler {VERSION}"),
            greeting: ctx.setting("greeting").unwrap_or("hello").to_owned(),
            pid: ctx.pid().to_string(),
            logger: ctx.logger(),
        })
    }

    fn handle(&self, req: &Request<'_>) -> Response {
        match (req.method(), req.path()) {
            ("GET", "/") => Response::text(200, &self.hello),
            ("GET", "/version") => Response::text(200, VERSION),
            ("GET", "/greeting") => Response::text(200, &self.greeting),
            ("GET", "/pid") => Response::text(200, &self.pid),
            ("GET", "/sleep") => sleep(req),
            ("GET", "/panic") => panic!("/panic was requested"),
            ("POST", "/echo") => Response::new(200, req.body())
                .with_header("content-type", "application/octet-stream"),
            _ => Response::text(404, "not found"),
        }
    }

    fn on_reload(&self) {
        self.logger.info(&format!(
            "sample-handler {VERSION}: reload notification received"
        ));
    }
}

fn sleep(req: &Request<'_>) -> Response {
    match req.query_param("ms").map(str::parse::<u64>) {
        Some(Ok(ms)) if ms <= MAX_SLEEP_MS => {
            std::thread::sleep(Duration::from_millis(ms));
            Response::text(200, &format!("slept {ms} ms"))
        }
        _ => Response::text(400, &format!("expected ?ms=0..={MAX_SLEEP_MS}")),
    }
}

export_handler!(Sample, version = VERSION);
