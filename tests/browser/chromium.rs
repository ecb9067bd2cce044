//! A headless Chromium driven over the DevTools protocol, with just what the
//! browser test needs: open a page, evaluate in it, type and click, and on a
//! failure a screenshot and the text of every page.
//!
//! The protocol is JSON over a WebSocket; this speaks it on blocking sockets
//! with tungstenite (the crate the gateway uses), one connection per page,
//! every read bounded. Chromium runs in a process group of its own with a
//! fresh profile; dropping [`Chromium`] kills the group and removes the
//! profile, so a failed test leaves nothing behind.

use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

/// How long Chromium's start, one DevTools call, or a condition may take.
const PATIENCE: Duration = Duration::from_secs(60);

/// The Chromium executable on `PATH`, if there is one.
pub fn installed() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
}

/// A running headless Chromium.
pub struct Chromium {
    /// Ended on drop, after a failing test's pages are shown.
    _process: Process,
    /// `host:port` of its DevTools server.
    devtools: String,
    browser: Session,
    /// The pages opened, by name, for the evidence of a failure.
    pages: Vec<(String, String)>,
    /// Where a failing test's screenshots go.
    evidence: PathBuf,
}

/// The Chromium process group and its profile, ended and removed on drop.
struct Process {
    child: Child,
    profile: PathBuf,
    /// What Chromium printed on stderr, for a failed start.
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Chromium {
    /// Starts `binary` headless on a fresh profile. A failing test saves a
    /// screenshot of each page under `evidence`.
    pub fn launch(binary: &Path, evidence: &Path) -> Chromium {
        let profile =
            std::env::temp_dir().join(format!("host-test-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                // Nothing may reach for the network beyond 127.0.0.1.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            // Its temporary files and its crash reporter's database too
            // (which names the profile in the reporter's command line, see
            // `Process::drop`).
            .env("TMPDIR", &profile)
            .env("XDG_CONFIG_HOME", &profile)
            .env("XDG_CACHE_HOME", &profile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let stderr = child.stderr.take().unwrap();
        let process = Process {
            child,
            profile,
            stderr: Arc::default(),
        };
        // Read stderr to its end (Chromium blocks on a full pipe), handing
        // over the line that says where DevTools listens.
        let (found, listening) = mpsc::channel();
        let lines = process.stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = found.send(url.to_owned());
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let url = listening.recv_timeout(PATIENCE).unwrap_or_else(|e| {
            panic!(
                "chromium did not say where DevTools listens ({e}); its stderr:\n{}",
                process
                    .stderr
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .join("\n")
            )
        });
        let devtools = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("unexpected DevTools address {url}"))
            .to_owned();
        let browser = Session::connect(&url).unwrap_or_else(|e| panic!("{e}"));
        Chromium {
            _process: process,
            devtools,
            browser,
            pages: Vec::new(),
            evidence: evidence.to_owned(),
        }
    }

    /// Opens a page (a tab) named `name` at `url`, with `before_load`
    /// evaluated in it before any script of the page.
    pub fn open(&mut self, name: &str, url: &str, before_load: &str) -> Page {
        let target = self
            .browser
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .unwrap_or_else(|e| panic!("{e}"))["targetId"]
            .as_str()
            .expect("a target id")
            .to_owned();
        self.pages.push((name.to_owned(), target.clone()));
        let mut page = Page {
            name: name.to_owned(),
            session: self.page_session(&target).unwrap_or_else(|e| panic!("{e}")),
        };
        page.call("Page.enable", json!({}));
        page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": before_load }),
        );
        let navigated = page.call("Page.navigate", json!({ "url": url }));
        if let Some(error) = navigated.get("errorText") {
            panic!("page {name}: cannot load {url}: {error}");
        }
        page
    }

    fn page_session(&self, target: &str) -> Result<Session, String> {
        Session::connect(&format!("ws://{}/devtools/page/{target}", self.devtools))
    }

    /// Saves a screenshot of every page and prints where, with its text.
    fn show_pages(&self) {
        let _ = std::fs::create_dir_all(&self.evidence);
        for (name, target) in &self.pages {
            // A connection of its own: the test's may be mid-call.
            let mut page = match self.page_session(target) {
                Ok(session) => Page {
                    name: name.clone(),
                    session,
                },
                Err(e) => {
                    eprintln!("page {name}: no screenshot: {e}");
                    continue;
                }
            };
            let path = self.evidence.join(format!("{name}.png"));
            match page.screenshot(&path) {
                Ok(()) => eprintln!("page {name}: screenshot in {}", path.display()),
                Err(e) => eprintln!("page {name}: no screenshot: {e}"),
            }
            match page.evaluate("document.body.innerText") {
                Ok(text) => eprintln!("page {name}: its text:\n{}", text.as_str().unwrap_or("")),
                Err(e) => eprintln!("page {name}: no text: {e}"),
            }
        }
    }
}

impl Drop for Chromium {
    /// A failing test first shows the pages (the group ends after, in
    /// [`Process`]'s drop).
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.show_pages();
        }
    }
}

impl Drop for Process {
    /// Kills the group, then the crash reporters, which leave the group
    /// (they end by themselves once the browser is gone; this waits for
    /// that, boundedly).
    fn drop(&mut self) {
        let group = Pid::from_raw(-(self.child.id() as i32));
        let _ = kill(group, Signal::SIGKILL);
        let _ = self.child.wait();
        let start = Instant::now();
        loop {
            let left = processes_naming(&self.profile);
            if left.is_empty() {
                break;
            }
            if start.elapsed() > Duration::from_secs(5) {
                for pid in left {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Live processes whose command line names `path`.
fn processes_naming(path: &Path) -> Vec<Pid> {
    let needle = path.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            // A zombie's command line reads empty.
            let named = cmdline.windows(needle.len()).any(|w| w == needle);
            named.then_some(Pid::from_raw(pid))
        })
        .collect()
}

/// One page (a tab) and its DevTools connection.
pub struct Page {
    name: String,
    session: Session,
}

impl Page {
    /// The name the page was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls a DevTools method on this page; panics if it fails.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.session
            .call(method, params)
            .unwrap_or_else(|e| panic!("page {}: {e}", self.name))
    }

    /// The value of a JavaScript expression in the page (a promise is
    /// awaited), or the exception it threw.
    pub fn evaluate(&mut self, expression: &str) -> Result<Value, String> {
        let result = self.session.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("{expression} threw {exception}"));
        }
        Ok(result["result"]["value"].clone())
    }

    /// Like [`Page::evaluate`], panicking on an exception.
    pub fn value(&mut self, expression: &str) -> Value {
        self.evaluate(expression)
            .unwrap_or_else(|e| panic!("page {}: {e}", self.name))
    }

    /// Waits until `condition` (JavaScript) is true in the page; fails the
    /// test after [`PATIENCE`], saying `what` and showing the page's text.
    /// A condition that throws is not true yet (the page may still load).
    pub fn wait_for(&mut self, what: &str, condition: &str) {
        let start = Instant::now();
        loop {
            let outcome = self.evaluate(condition);
            if outcome == Ok(Value::Bool(true)) {
                return;
            }
            if start.elapsed() > PATIENCE {
                let text = self.evaluate("document.body.innerText");
                panic!(
                    "page {}: timed out waiting until {what} ({condition}: {outcome:?}); the page reads:\n{}",
                    self.name,
                    text.unwrap_or_default().as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `text` into the element `selector`, as a keyboard would.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.value(&format!("document.querySelector({}).focus()", js(selector)));
        self.call("Input.insertText", json!({ "text": text }));
    }

    /// Clicks the element `selector`.
    pub fn click(&mut self, selector: &str) {
        self.value(&format!("document.querySelector({}).click()", js(selector)));
    }

    /// Saves a PNG of what the page shows.
    fn screenshot(&mut self, path: &Path) -> Result<(), String> {
        let shot = self
            .session
            .call("Page.captureScreenshot", json!({ "format": "png" }))?;
        let png = decode_base64(shot["data"].as_str().unwrap_or(""))
            .ok_or("the screenshot is not base64")?;
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// `text` as a JavaScript string literal.
pub fn js(text: &str) -> String {
    Value::from(text).to_string()
}

/// A DevTools connection: commands out, their results back, events skipped.
struct Session {
    socket: WebSocket<TcpStream>,
    next_id: u64,
}

impl Session {
    fn connect(url: &str) -> Result<Session, String> {
        let addr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| format!("not a ws:// address: {url}"))?;
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(PATIENCE))
            .map_err(|e| e.to_string())?;
        let (socket, _) =
            tungstenite::client(url, stream).map_err(|e| format!("DevTools at {url}: {e}"))?;
        Ok(Session { socket, next_id: 0 })
    }

    /// Sends `method` and waits for its result.
    fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(command.to_string()))
            .map_err(|e| format!("{method}: {e}"))?;
        let start = Instant::now();
        while start.elapsed() < PATIENCE {
            let message = self.socket.read().map_err(|e| format!("{method}: {e}"))?;
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Value =
                serde_json::from_str(&text).map_err(|e| format!("{method}: {e}: {text}"))?;
            if reply["id"] != id {
                continue; // an event
            }
            if let Some(error) = reply.get("error") {
                return Err(format!("{method}: {error}"));
            }
            return Ok(reply["result"].clone());
        }
        Err(format!(
            "{method}: no answer within {} s",
            PATIENCE.as_secs()
        ))
    }
}

/// Standard base64 (what DevTools sends binary data in), or `None`.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(text.len() / 4 * 3);
    let (mut bits, mut count) = (0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6 | u32::from(value)) & 0xffff;
        count += 6;
        if count >= 8 {
            count -= 8;
            bytes.push((bits >> count) as u8);
        }
    }
    Some(bytes)
}

#[test]
fn base64_decodes() {
    assert_eq!(decode_base64("aG9zdA==").unwrap(), b"host");
    assert_eq!(decode_base64("aG9zdHM=").unwrap(), b"hosts");
    assert_eq!(decode_base64("aG9zdHMh").unwrap(), b"hosts!");
    assert_eq!(decode_base64("a?"), None);
}
