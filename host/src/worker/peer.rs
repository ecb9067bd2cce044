//! A client address as handlers see it (`Request::peer`): formatted once per
//! connection, inline, without `core::fmt` for IPv4 — `SocketAddr`'s
//! `Display` alone used to cost more than the rest of a connection's
//! bookkeeping — and borrowed by every request without a check.

use std::fmt::Write as _;
use std::net::SocketAddr;

/// `ip:port` (`[ip%scope]:port` for IPv6) in a fixed buffer.
pub struct PeerAddr {
    len: usize,
    text: [u8; PeerAddr::CAPACITY],
}

impl PeerAddr {
    /// `[` + the longest IPv6 text (45) + `%` + scope id (10) + `]:` + port (5).
    const CAPACITY: usize = 64;

    /// Formats `addr` as `SocketAddr`'s `Display` does.
    pub fn new(addr: SocketAddr) -> PeerAddr {
        let mut peer = PeerAddr {
            len: 0,
            text: [0; PeerAddr::CAPACITY],
        };
        match addr {
            SocketAddr::V4(v4) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        peer.push(".");
                    }
                    peer.push(itoa::Buffer::new().format(octet));
                }
                peer.push(":");
                peer.push(itoa::Buffer::new().format(v4.port()));
            }
            SocketAddr::V6(v6) => {
                if write!(peer, "{v6}").is_err() {
                    peer.len = 0;
                }
            }
        }
        peer
    }

    /// Appends all of `s` or nothing.
    fn push(&mut self, s: &str) -> bool {
        let Some(slot) = self.text.get_mut(self.len..self.len + s.len()) else {
            return false;
        };
        slot.copy_from_slice(s.as_bytes());
        self.len += s.len();
        true
    }

    /// The address text.
    pub fn as_str(&self) -> &str {
        // SAFETY: `text[..len]` only ever grows by whole `&str`s (`push`).
        unsafe { std::str::from_utf8_unchecked(&self.text[..self.len]) }
    }
}

impl std::fmt::Write for PeerAddr {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.push(s) {
            Ok(())
        } else {
            Err(std::fmt::Error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_print_as_socket_addr_does() {
        for addr in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.20.3.4:1",
            "[::1]:443",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
            "[::ffff:255.255.255.255]:65535",
        ] {
            let parsed: SocketAddr = addr.parse().unwrap();
            assert_eq!(PeerAddr::new(parsed).as_str(), parsed.to_string(), "{addr}");
        }
    }
}
