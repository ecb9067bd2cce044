//! Gateway groups against the real binary: WebSocket and text clients on
//! 127.0.0.1, business workers reloaded, killed and missing under them.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::ws::{Ended, TextClient, Ws};
use support::*;

/// A gateway group `echo` (or with `protocol`) running `handler`.
fn gateway_config(handler: &std::path::Path, protocol: &str, count: usize, extra: &str) -> String {
    format!(
        "run_dir = \"run\"\n\n[[group]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\ncount = {count}\nhandler = {:?}\n{extra}\n",
        handler.display().to_string()
    )
}

/// Pids of the business workers (not the gateways) that are ready.
fn business_pids(host: &Host) -> Vec<u32> {
    host.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == "echo" && w["state"] == "ready")
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect()
}

fn reload(host: &Host) {
    let output = host.cli(&["reload"]);
    assert!(output.status.success(), "reload failed: {}", text(&output));
}

#[test]
fn websocket_messages_are_echoed_and_broadcast() {
    let dir = TestDir::new("gw-echo");
    let handler = dir.install(Variant::Echo("v1"), "echo.so");
    let host = Host::start(dir, &gateway_config(&handler, "websocket", 2, ""));
    let mut a = Ws::connect(host.addr);
    let mut b = Ws::connect(host.addr);
    a.send("hello");
    assert_eq!(a.recv(), "hello");
    a.send("version");
    assert_eq!(a.recv(), "v1");
    b.send("b to all");
    assert_eq!(a.recv(), "b to all");
    assert_eq!(b.recv(), "b to all");
}

#[test]
fn text_clients_get_lines_back_and_long_lines_close_them() {
    let dir = TestDir::new("gw-text");
    let handler = dir.install(Variant::Echo("v1"), "echo.so");
    let host = Host::start(dir, &gateway_config(&handler, "text", 1, "max_line = 16"));
    let mut a = TextClient::connect(host.addr);
    let mut b = TextClient::connect(host.addr);
    a.send("hello");
    assert_eq!(a.recv().as_deref(), Some("hello"));
    a.send_raw(b"crlf\r\n");
    assert_eq!(a.recv().as_deref(), Some("crlf"));
    b.send("broadcast");
    assert_eq!(a.recv().as_deref(), Some("broadcast"));
    assert_eq!(b.recv().as_deref(), Some("broadcast"));
    a.send(&"x".repeat(40));
    assert_eq!(a.recv().as_deref(), Some("error: line too long"));
    assert_eq!(a.recv(), None);
    b.send("still here");
    assert_eq!(b.recv().as_deref(), Some("still here"));
}
