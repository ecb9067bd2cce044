//! Clients of a gateway group for the tests: a WebSocket client
//! (tungstenite, the crate the gateway uses, over a blocking socket) and a
//! newline-delimited text client. Reads wait at most [`super::DEADLINE`].

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

use super::DEADLINE;

/// A WebSocket client.
pub struct Ws {
    pub socket: WebSocket<TcpStream>,
}

/// How a read ended when it did not return a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The server closed with this code.
    Closed(u16),
    /// The connection ended without a close frame.
    Abrupt,
    /// Nothing arrived in time.
    Silent,
}

impl Ws {
    /// Connects to `ws://addr/` or panics.
    pub fn connect(addr: SocketAddr) -> Ws {
        Ws::connect_to(addr, "/", &[]).expect("WebSocket handshake")
    }

    /// Connects with a path and extra request headers.
    pub fn connect_to(
        addr: SocketAddr,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Ws, tungstenite::Error> {
        let stream = TcpStream::connect(addr).expect("connect to the gateway");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut request = format!("ws://{addr}{path}").into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(*name, value.parse().unwrap());
        }
        let (socket, _) = tungstenite::client(request, stream).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
        })?;
        Ok(Ws { socket })
    }

    /// Sends a text message.
    pub fn send(&mut self, text: &str) {
        self.socket.send(Message::text(text)).expect("send");
    }

    /// The next text or binary message, as text, or how the connection ended.
    pub fn next(&mut self, wait: Duration) -> Result<String, Ended> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Ended::Silent);
            }
            self.socket.get_mut().set_read_timeout(Some(left)).unwrap();
            match self.socket.read() {
                Ok(Message::Text(text)) => return Ok(text.to_string()),
                Ok(Message::Binary(data)) => return Ok(String::from_utf8_lossy(&data).into()),
                Ok(Message::Close(frame)) => {
                    return Err(Ended::Closed(
                        frame.map_or(1005, |f: CloseFrame| f.code.into()),
                    ))
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Ended::Silent)
                }
                Err(_) => return Err(Ended::Abrupt),
            }
        }
    }

    /// The next message, which must come.
    pub fn recv(&mut self) -> String {
        self.next(DEADLINE).expect("a message from the gateway")
    }

    /// Reads until the server closes; returns its close code.
    pub fn closed(&mut self) -> Ended {
        loop {
            match self.next(DEADLINE) {
                Ok(_) => {}
                Err(ended) => return ended,
            }
        }
    }
}

/// A client of the `text` protocol.
pub struct TextClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl TextClient {
    /// Connects or panics.
    pub fn connect(addr: SocketAddr) -> TextClient {
        let stream = TcpStream::connect(addr).expect("connect to the gateway");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        TextClient {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Sends one line.
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    /// The next line (without its newline); `None` at end of stream.
    pub fn recv(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches('\n').to_owned()),
        }
    }
}
