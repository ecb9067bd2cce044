//! The WebSocket and text echo of `baseline-server` (the gateway's
//! yardstick) under the workspace's echo client: run as a real process with
//! its worker processes, on 127.0.0.1, it loses, reorders and duplicates
//! nothing, and a broadcast reaches every client of its worker. This is also
//! the echo client's test against a correct server.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loadgen::echo::{EchoConfig, EchoReport, EchoRun, Pace, Protocol};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A running `baseline-server` with its echo listeners, stopped on drop.
struct Server {
    child: Child,
    websocket: SocketAddr,
    text: SocketAddr,
}

impl Server {
    fn start(workers: usize) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_baseline-server"))
            .args(["--listen", "127.0.0.1:0", "--websocket", "127.0.0.1:0"])
            .args(["--text", "127.0.0.1:0", "--workers", &workers.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start baseline-server");
        // The banner comes once every worker serves; a dead server ends it.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr_of = |prefix: &str| -> SocketAddr {
            let line = lines.next().expect("banner line").expect("read banner");
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
                .parse()
                .unwrap()
        };
        addr_of("listening on ");
        let websocket = addr_of("websocket on ");
        let text = addr_of("text on ");
        Server {
            child,
            websocket,
            text,
        }
    }

    fn addr(&self, protocol: Protocol) -> SocketAddr {
        match protocol {
            Protocol::WebSocket => self.websocket,
            Protocol::Text => self.text,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the parent stops its workers and exits.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn assert_clean(report: &EchoReport) {
    assert_eq!(report.received, report.sent, "{report:#?}");
    assert_eq!(report.lost, 0, "{report:#?}");
    assert_eq!(report.reordered, 0, "{report:#?}");
    assert_eq!(report.duplicated, 0, "{report:#?}");
    assert_eq!(report.unexpected, 0, "{report:#?}");
    assert_eq!(report.disconnected(), 0, "{report:#?}");
    assert_eq!(report.connect_failures, 0, "{report:#?}");
}

#[test]
fn echo_loses_reorders_and_duplicates_nothing_across_two_workers() {
    let server = Server::start(2);
    for protocol in [Protocol::WebSocket, Protocol::Text] {
        // Flood: a window of 16 per client.
        let mut config = EchoConfig::new(server.addr(protocol), protocol);
        config.clients = 16;
        config.pace = Pace::Window(16);
        config.messages_per_client = Some(500);
        config.duration = Duration::from_secs(60);
        let report = EchoRun::start(config).wait();
        assert_eq!(report.sent, 16 * 500, "{protocol:?}: {report:#?}");
        assert_clean(&report);
        assert!(report.latency_p99_us >= report.latency_p50_us);
        // Every echo was timed: a round trip through the server takes some
        // microseconds, so an empty histogram (p50 of 0) means none was.
        assert!(report.latency_p50_us > 0, "{report:#?}");
        assert!(
            report.latency_max_us >= report.latency_p99_us,
            "{report:#?}"
        );
        assert!(report.cpu_secs > 0.0, "{report:#?}");

        // Paced, from two other loopback source addresses.
        let mut config = EchoConfig::new(server.addr(protocol), protocol);
        config.clients = 20;
        config.pace = Pace::Rate(200.0);
        config.messages_per_client = Some(20);
        config.duration = Duration::from_secs(60);
        config.sources = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
        let report = EchoRun::start(config).wait();
        assert_eq!(report.sent, 20 * 20, "{protocol:?}: {report:#?}");
        assert_clean(&report);
        assert!(report.longest_gap_us > 0, "{report:#?}");
        assert_eq!(
            report.gaps_by_second_us.iter().max(),
            Some(&report.longest_gap_us),
            "{report:#?}"
        );
    }
}

#[test]
fn a_broadcast_reaches_every_client_of_the_worker() {
    let server = Server::start(1);
    for protocol in [Protocol::WebSocket, Protocol::Text] {
        let mut config = EchoConfig::new(server.addr(protocol), protocol);
        config.clients = 20;
        config.pace = Pace::Rate(20.0);
        config.broadcast_every = Some(Duration::from_millis(10));
        config.duration = Duration::from_secs(60);
        let run = EchoRun::start(config);
        let limit = Instant::now() + Duration::from_secs(30);
        while run.progress().broadcasts_sent < 5 {
            assert!(
                Instant::now() < limit,
                "no broadcasts: {:?}",
                run.progress()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let report = run.stop();
        assert_clean(&report);
        assert!(report.broadcasts_sent >= 5, "{report:#?}");
        assert_eq!(
            report.broadcasts_received,
            report.broadcasts_sent * 20,
            "{protocol:?}: {report:#?}"
        );
        assert!(report.fanout_p99_us >= report.fanout_p50_us);
        // Every broadcast received was timed (an empty histogram reads 0).
        assert!(report.fanout_p50_us > 0, "{protocol:?}: {report:#?}");
        assert!(report.fanout_max_us >= report.fanout_p99_us, "{report:#?}");
    }
}
