//! sample-chat's page in a real browser: headless Chromium, driven over the
//! DevTools protocol, loads the page from the chat's HTTP group; two pages
//! chat through the gateway group while `host reload` swaps the chat
//! handler under them.
//!
//! Without Chromium the test says it is skipped, unless
//! `HOST_REQUIRE_BROWSER=1` (CI) makes that a failure.

mod support;

#[path = "browser/chromium.rs"]
mod chromium;

use std::net::SocketAddr;

use chromium::{js, Chromium, Page};
use support::*;

/// Runs in each page before its own script: counts the WebSockets the page
/// makes and how often one opened or closed, so the test sees a reconnect
/// even if the page did it quietly.
const COUNT_SOCKETS: &str = r#"
(() => {
  const seen = window.socketsSeen = { made: 0, opened: 0, closed: 0 };
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      seen.made++;
      this.addEventListener("open", () => seen.opened++);
      this.addEventListener("close", () => seen.closed++);
    }
  };
})();
"#;

/// A gateway group `chat` on `port` and an HTTP group `web` serving the
/// page, which connects to the chat; both run `handler`.
fn chat_config(handler: &std::path::Path, port: u16) -> String {
    let handler = handler.display().to_string();
    format!(
        "run_dir = \"run\"\n\n\
         [[group]]\nname = \"chat\"\nlisten = \"127.0.0.1:{port}\"\nprotocol = \"websocket\"\ncount = 1\nhandler = {handler:?}\n\n\
         [[group]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\ncount = 1\nhandler = {handler:?}\n\n\
         [group.settings]\nwebsocket = \"ws://127.0.0.1:{port}/\"\n"
    )
}

fn web_addr(host: &Host) -> SocketAddr {
    host.status()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "web")
        .expect("a group web")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Types `line` into the page's input and clicks send, as a user would;
/// returns once the page has sent it (it clears the input).
fn send(page: &mut Page, line: &str) {
    page.type_into("#line", line);
    page.wait_for(
        &format!("{line:?} is typed"),
        &format!("document.getElementById('line').value === {}", js(line)),
    );
    page.click("#say button");
    page.wait_for(
        &format!("{line:?} is sent"),
        "document.getElementById('line').value === ''",
    );
}

/// Waits until the page's log shows `text`; fails at once if its
/// WebSocket closes first.
fn sees(page: &mut Page, text: &str) {
    let shown = format!(
        "document.getElementById('log').textContent.includes({})",
        js(text)
    );
    page.wait_for(
        &format!("the log shows {text:?}"),
        &format!("{shown} || socket.readyState !== WebSocket.OPEN"),
    );
    if page.value(&shown) != true {
        let state = page.value("document.getElementById('state').textContent");
        panic!(
            "page {}: its WebSocket ended ({state}) before the log showed {text:?}",
            page.name()
        );
    }
}

/// Waits until the page's WebSocket is open, and remembers it.
fn connected(page: &mut Page) {
    page.wait_for(
        "the page is connected",
        "document.getElementById('state').textContent.startsWith('connected to ')",
    );
    page.value("window.firstSocket = socket, true");
}

/// The page still has the one WebSocket it opened first, open, and made
/// no other.
fn assert_same_socket(page: &mut Page) {
    let name = page.name().to_owned();
    let seen = page.value(
        "({ same: socket === window.firstSocket, open: socket.readyState === WebSocket.OPEN, \
           state: document.getElementById('state').textContent, ...window.socketsSeen })",
    );
    assert_eq!(seen["same"], true, "page {name} changed sockets: {seen}");
    assert_eq!(seen["open"], true, "page {name}: socket not open: {seen}");
    assert_eq!(seen["made"], 1, "page {name} made another socket: {seen}");
    assert_eq!(seen["opened"], 1, "page {name} opened again: {seen}");
    assert_eq!(seen["closed"], 0, "page {name}: a socket closed: {seen}");
}

#[test]
fn two_pages_keep_chatting_on_their_websockets_across_a_reload_and_see_the_new_handler() {
    let Some(binary) = chromium::installed() else {
        assert!(
            std::env::var("HOST_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "HOST_REQUIRE_BROWSER=1 and chromium is not installed (apt-get install chromium)"
        );
        // Straight to stderr: the harness hides a passing test's output.
        let line = "SKIPPED: chromium not installed (apt-get install chromium)\n";
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        return;
    };
    let port = free_port();
    let dir = TestDir::new("browser");
    let handler = dir.install(Variant::ChatVersion("v1"), "chat.so");
    let host = Host::start(dir, &chat_config(&handler, port));
    let url = format!("http://{}/", web_addr(&host));

    let evidence = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/browser-test");
    let mut chromium = Chromium::launch(&binary, &evidence);
    let mut ann = chromium.open("ann", &url, COUNT_SOCKETS);
    let mut bob = chromium.open("bob", &url, COUNT_SOCKETS);
    for page in [&mut ann, &mut bob] {
        connected(page);
        sees(page, "(chat v1)");
    }
    send(&mut ann, "nick ann");
    sees(&mut ann, "you are ann");
    send(&mut bob, "nick bob");
    sees(&mut bob, "you are bob");
    send(&mut ann, "join lobby");
    sees(&mut ann, "* ann joined lobby (1 here)");
    send(&mut bob, "join lobby");
    sees(&mut ann, "* bob joined lobby (2 here)");
    send(&mut ann, "say hello bob");
    sees(&mut bob, "ann: hello bob");
    send(&mut bob, "say hi ann");
    sees(&mut ann, "bob: hi ann");

    // Rebuild the chat (another version), reload, and chat meanwhile.
    host.dir.install(Variant::ChatVersion("v2"), "chat.so");
    std::thread::scope(|scope| {
        let reload = scope.spawn(|| host.cli(&["reload"]));
        let mut during = 0;
        while during < 50 && !reload.is_finished() {
            let line = format!("during the reload {during}");
            send(&mut ann, &format!("say {line}"));
            sees(&mut bob, &format!("ann: {line}"));
            during += 1;
        }
        let output = reload.join().unwrap();
        assert!(output.status.success(), "reload failed: {}", text(&output));
        eprintln!("{during} messages went round while the reload ran");
    });

    send(&mut ann, "version");
    sees(&mut ann, "chat v2");
    send(&mut bob, "version");
    sees(&mut bob, "chat v2");
    send(&mut bob, "say still here");
    sees(&mut ann, "bob: still here");
    send(&mut ann, "say me too");
    sees(&mut bob, "ann: me too");
    assert_same_socket(&mut ann);
    assert_same_socket(&mut bob);
}
