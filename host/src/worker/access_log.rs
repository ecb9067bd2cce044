//! The access log: one line per answered request, per group, off unless the
//! config names a target (`access_log`).
//!
//! Lines are built in a buffer of the worker's and written with one
//! `write` per flush, not per request: when the buffer passes
//! [`FLUSH_AT`], once a second (`Server::expire_idle`), before a reopen,
//! and when the worker leaves. Every worker of a group opens the same file
//! with `O_APPEND` and writes only whole lines, in chunks the kernel does
//! not split (a regular file's `write` is one append; for stderr, which may
//! be a pipe, chunks stay within `PIPE_BUF`), so lines of several workers
//! never interleave. SIGUSR2 reaches every worker as a reopen (after
//! `logrotate` renamed the file), which flushes to the old file first.
//!
//! The timestamp is formatted once per second, not per line.

use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use hyper::{Method, Uri, Version};

use super::peer::PeerAddr;
use crate::config::{AccessLogFormat, AccessLogTarget};

/// A flush is due once the buffer holds this much.
const FLUSH_AT: usize = 32 << 10;

/// The most one `write` to stderr carries: `PIPE_BUF`, so that a pipe
/// shared with other processes gets whole chunks.
const STDERR_CHUNK: usize = 4096;

/// What a request leaves for its line before the handler has it.
pub(super) struct Noted {
    method: Method,
    uri: Uri,
    version: Version,
    started: Instant,
}

impl Noted {
    /// Notes `request` as it arrives.
    pub(super) fn new<B>(request: &hyper::Request<B>) -> Noted {
        Noted {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            started: Instant::now(),
        }
    }
}

/// One worker's access log.
pub struct AccessLog {
    format: AccessLogFormat,
    group: String,
    pid: u32,
    state: Mutex<State>,
}

struct State {
    output: Output,
    buffer: Vec<u8>,
    /// The Unix second `stamp` shows.
    stamp_second: u64,
    stamp: String,
    /// Whether the last write failed: the next failure is not logged again.
    failing: bool,
}

enum Output {
    Stderr,
    File {
        file: File,
        path: std::path::PathBuf,
    },
}

impl AccessLog {
    /// Opens `target` for the workers of `group`.
    pub(super) fn open(
        target: &AccessLogTarget,
        format: AccessLogFormat,
        group: &str,
    ) -> Result<AccessLog> {
        let output = match target {
            AccessLogTarget::Stderr => Output::Stderr,
            AccessLogTarget::File(path) => Output::File {
                file: open_append(path)?,
                path: path.clone(),
            },
        };
        Ok(AccessLog {
            format,
            group: group.to_owned(),
            pid: std::process::id(),
            state: Mutex::new(State {
                output,
                buffer: Vec::with_capacity(FLUSH_AT + 1024),
                stamp_second: u64::MAX,
                stamp: String::new(),
                failing: false,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the line of one answered request.
    pub(super) fn record(&self, noted: &Noted, peer: &PeerAddr, status: u16, bytes: u64) {
        let duration_us = noted.started.elapsed().as_micros() as u64;
        let second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut state = self.state();
        if state.stamp_second != second {
            state.stamp = stamp(second, self.format);
            state.stamp_second = second;
        }
        let line = Line {
            noted,
            peer: peer.as_str(),
            status,
            bytes,
            duration_us,
            group: &self.group,
            pid: self.pid,
        };
        let State { buffer, stamp, .. } = &mut *state;
        match self.format {
            AccessLogFormat::Common => line.common(stamp, buffer),
            AccessLogFormat::Json => line.json(stamp, buffer),
        }
        if state.buffer.len() >= FLUSH_AT {
            state.flush();
        }
    }

    /// Writes what is buffered.
    pub(super) fn flush(&self) {
        self.state().flush();
    }

    /// Flushes to the file, then opens its path again (after a rotation
    /// renamed it). A file that cannot be opened keeps the old one.
    pub(super) fn reopen(&self) {
        let mut state = self.state();
        state.flush();
        if let Output::File { file, path } = &mut state.output {
            match open_append(path) {
                Ok(reopened) => *file = reopened,
                Err(e) => tracing::warn!("{e:#}; still writing to the old file"),
            }
        }
    }
}

impl State {
    fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let written = match &mut self.output {
            Output::Stderr => {
                write_lines(&mut std::io::stderr().lock(), &self.buffer, STDERR_CHUNK)
            }
            Output::File { file, .. } => write_lines(file, &self.buffer, usize::MAX),
        };
        match written {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(error = %e, "cannot write the access log; lines are lost until it works again");
            }
            Err(_) => {}
        }
        self.buffer.clear();
    }
}

fn open_append(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open access log {}", path.display()))
}

/// Writes whole lines of `buffer`, at most `chunk` bytes per `write` (a
/// line longer than `chunk` goes alone).
fn write_lines(out: &mut impl std::io::Write, buffer: &[u8], chunk: usize) -> std::io::Result<()> {
    let mut rest = buffer;
    while !rest.is_empty() {
        let end = if rest.len() <= chunk {
            rest.len()
        } else {
            rest[..chunk].iter().rposition(|&b| b == b'\n').map_or_else(
                || {
                    rest.iter()
                        .position(|&b| b == b'\n')
                        .map_or(rest.len(), |i| i + 1)
                },
                |i| i + 1,
            )
        };
        out.write_all(&rest[..end])?;
        rest = &rest[end..];
    }
    Ok(())
}

/// The fields of one line.
struct Line<'a> {
    noted: &'a Noted,
    peer: &'a str,
    status: u16,
    bytes: u64,
    duration_us: u64,
    group: &'a str,
    pid: u32,
}

impl Line<'_> {
    /// `host - - [time] "request" status bytes`, the Common Log Format,
    /// then ` duration_us group pid`.
    fn common(&self, stamp: &str, out: &mut Vec<u8>) {
        let host = self
            .peer
            .rsplit_once(':')
            .map_or(self.peer, |(host, _)| host);
        out.extend_from_slice(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .as_bytes(),
        );
        out.extend_from_slice(b" - - [");
        out.extend_from_slice(stamp.as_bytes());
        out.extend_from_slice(b"] \"");
        out.extend_from_slice(self.noted.method.as_str().as_bytes());
        out.push(b' ');
        escaped(self.target(), out);
        out.push(b' ');
        out.extend_from_slice(protocol(self.noted.version).as_bytes());
        out.extend_from_slice(b"\" ");
        number(self.status, out);
        out.push(b' ');
        if self.bytes == 0 {
            out.push(b'-');
        } else {
            number(self.bytes, out);
        }
        out.push(b' ');
        number(self.duration_us, out);
        out.push(b' ');
        out.extend_from_slice(self.group.as_bytes());
        out.push(b' ');
        number(self.pid, out);
        out.push(b'\n');
    }

    /// One JSON object.
    fn json(&self, stamp: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        out.extend_from_slice(stamp.as_bytes());
        out.extend_from_slice(b"\",\"peer\":\"");
        out.extend_from_slice(self.peer.as_bytes());
        out.extend_from_slice(b"\",\"method\":\"");
        escaped(self.noted.method.as_str(), out);
        out.extend_from_slice(b"\",\"path\":\"");
        escaped(self.target(), out);
        out.extend_from_slice(b"\",\"protocol\":\"");
        out.extend_from_slice(protocol(self.noted.version).as_bytes());
        out.extend_from_slice(b"\",\"status\":");
        number(self.status, out);
        out.extend_from_slice(b",\"bytes\":");
        number(self.bytes, out);
        out.extend_from_slice(b",\"duration_us\":");
        number(self.duration_us, out);
        out.extend_from_slice(b",\"group\":\"");
        escaped(self.group, out);
        out.extend_from_slice(b"\",\"pid\":");
        number(self.pid, out);
        out.extend_from_slice(b"}\n");
    }

    /// The request target as the client sent it (path and query).
    fn target(&self) -> &str {
        self.noted
            .uri
            .path_and_query()
            .map_or("/", |target| target.as_str())
    }
}

fn number(n: impl itoa::Integer, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `text` inside double quotes: `"` and `\` escaped with a backslash,
/// control characters as `\u00XX` (valid JSON, and unambiguous in the
/// Common Log Format).
fn escaped(text: &str, out: &mut Vec<u8>) {
    for &byte in text.as_bytes() {
        match byte {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', byte]),
            0..=0x1f | 0x7f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            _ => out.push(byte),
        }
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    }
}

/// The time of a line, in UTC: `10/Oct/2000:13:55:36 +0000` (common) or
/// `2000-10-10T13:55:36Z` (JSON).
fn stamp(unix_second: u64, format: AccessLogFormat) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (year, month, day) = civil_date(unix_second / 86_400);
    let in_day = unix_second % 86_400;
    let (hour, minute, second) = (in_day / 3600, in_day / 60 % 60, in_day % 60);
    let mut text = String::with_capacity(32);
    let _ = match format {
        AccessLogFormat::Common => write!(
            text,
            "{day:02}/{}/{year}:{hour:02}:{minute:02}:{second:02} +0000",
            MONTHS[month as usize - 1]
        ),
        AccessLogFormat::Json => write!(
            text,
            "{year}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z"
        ),
    };
    text
}

/// Year, month (1-12) and day (1-31) of a day counted from 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: AccessLogFormat, target: &str) -> String {
        let request = hyper::Request::get(target).body(()).unwrap();
        let noted = Noted::new(&request);
        let line = Line {
            noted: &noted,
            peer: "10.0.0.7:5123",
            status: 200,
            bytes: 12,
            duration_us: 345,
            group: "web",
            pid: 4188,
        };
        let mut out = Vec::new();
        match format {
            AccessLogFormat::Common => line.common(&stamp(971_211_336, format), &mut out),
            AccessLogFormat::Json => line.json(&stamp(971_211_336, format), &mut out),
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_common_line_is_the_common_log_format_then_duration_group_and_pid() {
        assert_eq!(
            line(AccessLogFormat::Common, "/hello?name=a%22b"),
            "10.0.0.7 - - [10/Oct/2000:20:55:36 +0000] \"GET /hello?name=a%22b HTTP/1.1\" 200 12 345 web 4188\n"
        );
    }

    #[test]
    fn a_json_line_parses_and_carries_every_field() {
        let text = line(AccessLogFormat::Json, "/a\"b");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["time"], "2000-10-10T20:55:36Z");
        assert_eq!(value["peer"], "10.0.0.7:5123");
        assert_eq!(value["method"], "GET");
        assert_eq!(value["path"], "/a\"b");
        assert_eq!(value["status"], 200);
        assert_eq!(value["bytes"], 12);
        assert_eq!(value["duration_us"], 345);
        assert_eq!(value["group"], "web");
        assert_eq!(value["pid"], 4188);
    }

    #[test]
    fn dates_are_civil_dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(20_517), (2026, 3, 5));
    }

    #[test]
    fn writes_carry_whole_lines_within_the_chunk() {
        struct Writes(Vec<Vec<u8>>);
        impl std::io::Write for Writes {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.push(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut writes = Writes(Vec::new());
        write_lines(&mut writes, b"aaaa\nbbbb\ncccccccccccc\nd\n", 10).unwrap();
        assert_eq!(
            writes.0,
            vec![
                b"aaaa\nbbbb\n".to_vec(),
                b"cccccccccccc\n".to_vec(),
                b"d\n".to_vec()
            ]
        );
    }
}
